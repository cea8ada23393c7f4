"""Judging the peers' certificates: at start, at each reload, and as time passes.

Every configured certificate is validated (RFC 5280, with the zone's revocation
policy); what is not acceptable, what expires soon, a stale CRL and a peer left
without a usable certificate are logged and audited as alerts, each once.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Collection, Mapping, Sequence
from datetime import datetime
from typing import Protocol

from cryptography import x509

from gateway.audit import AuditEvent, AuditSink, EventType, Outcome, Severity
from gateway.clock import Clock
from gateway.config import GatewayConfig, Zone
from gateway.egress import Network, Refused, ZonePath
from gateway.errors import ConfigError
from gateway.logs import Logger
from gateway.pki.crl import CrlFinding, stale_crl_warnings
from gateway.pki.expiry import Held, expiring
from gateway.pki.keypair import KeyPair
from gateway.pki.ocsp import OcspClient
from gateway.pki.own import peer_path
from gateway.pki.peers import PeerTrust, TrustSettings, assess_peers
from gateway.pki.tls import certificate_fingerprint
from gateway.report import crl_policy, own_certificate_problems, own_certificates_usable


class _OwnProblem(Protocol):
    """An error about a certificate of ours (a configuration problem: the key naming it)."""

    @property
    def key(self) -> str: ...
    @property
    def message(self) -> str: ...
    @property
    def fix(self) -> str: ...


def _own_identities(config: GatewayConfig) -> dict[str, object]:
    """The certificates (with their chains) medgw presents, signs and exports with, by
    the key their problems name."""
    export = config.audit_export
    pairs = {
        "tls.certificate": config.tls.identity,
        "smime.signing_certificate": config.smime.signing,
        "smime.encryption_certificate": config.smime.encryption,
        "audit.export.certificate": export.identity if export is not None else None,
    }
    return {k: (p.certificate, p.chain) if p is not None else None for k, p in pairs.items()}


class TrustKeeper:
    """The verdicts on the configured certificates, and the alerts about them."""

    def __init__(
        self,
        network: Network,
        audit: Callable[[], AuditSink],
        log: Logger,
        clock: Clock,
        on_refused: Callable[[Refused], None],
        crl_findings: Callable[[Zone], list[CrlFinding]] | None = None,
        crl_sources: Callable[[Zone], Collection[str]] | None = None,
        adjust: Callable[[GatewayConfig, str, TrustSettings], TrustSettings] | None = None,
    ) -> None:
        """``network``: the daemon's connect path (judged by the configuration in force);
        ``on_refused``: what a refused OCSP connection is told to; ``crl_findings``: what to
        say about a zone's CRLs, ``crl_sources``: what it has CRLs from, by the ``issuer``
        its findings name (default for both: its files)."""
        self._network = network
        self._audit = audit
        self._log = log
        self._clock = clock
        self._on_refused = on_refused
        # What to say about a zone's CRLs (default: its files' freshness).
        self._crl_findings = crl_findings or self._file_crl_findings
        self._crl_sources = crl_sources or _file_crl_sources
        self._adjust = adjust  # emergency mode's relaxations (gateway.emergency.relax)
        # Per zone, with the way out it was made for: each keeps its OCSP cache.
        self._ocsp_clients: dict[str, tuple[ZonePath, OcspClient]] = {}
        # (fingerprint, owner, use, days): certificate expiry alerts already raised
        self._expiry_alerted: set[tuple[str, str, str, int]] = set()
        # Per zone, the causes of the CRL findings in force (each alerted once): a zone
        # left out of a reload is forgotten, so it is alerted again if it comes back.
        self._crl_alerted: dict[str, frozenset[tuple[str, str, datetime | None]]] = {}
        # The (key, message) of each error about a certificate of ours in force, alerted:
        # one that goes away is forgotten, so it is alerted again if it comes back.
        self._own_alerted: frozenset[tuple[str, str]] = frozenset()

    def ocsp_client(self, zone: Zone, network: Network | None = None) -> OcspClient:
        """The zone's OCSP client: its cache survives reloads while the zone's way out
        (source address, egress) stays the same.  Its requests go through ``network``'s
        route of the zone (default: the daemon's, judged by the configuration in force)."""
        known = self._ocsp_clients.get(zone.name)
        if known is None or known[0] != zone.network:
            client = OcspClient(self._network.zone(zone.name))
            known = self._ocsp_clients[zone.name] = (zone.network, client)
        return known[1] if network is None else known[1].via(network.zone(zone.name))

    async def assess(self, config: GatewayConfig) -> dict[str, PeerTrust]:
        """Path validation (with the zone's revocation policy) of every configured peer cert.

        OCSP requests go out by ``config``'s zones: it is the configuration being judged
        (at a reload, the new one, before it is in force)."""
        network = Network(lambda: config.network_map, on_refused=self._on_refused)
        adjust = self._adjust
        return await assess_peers(
            config.peers,
            config.zones,
            at=self._clock.now(),
            ocsp_client=lambda zone: self.ocsp_client(zone, network),
            adjust=functools.partial(adjust, config) if adjust is not None else None,
        )

    async def judge_own(
        self, config: GatewayConfig, in_force: GatewayConfig | None = None
    ) -> Sequence[object]:
        """Our certificates judged by the rules a peer applies to them: raises
        :class:`ConfigError` naming each one every peer refuses (a reload keeps the
        configuration in force); returns a warning for each one a peer may refuse.

        At a reload (``in_force``: the configuration serving), certificates found wanting
        that are the very ones serving (expired while medgw ran, or revoked by the CRL
        the reload brings) do not refuse it, whatever else of ours it changes: that
        would keep the old CRLs, peers and zones too, and change nothing about them.
        They are alerted instead (once per cause: see :meth:`recheck_own`), and returned
        with the warnings.  ``config``'s zones hold the CRLs fetched for them (a reload
        judges ours after it has fetched them)."""
        try:
            found = await own_certificates_usable(config, at=self._clock.now())
        except ConfigError as exc:
            if in_force is None:
                raise
            now, before = _own_identities(config), _own_identities(in_force)
            if any(p.key not in now or now[p.key] != before[p.key] for p in exc.problems):
                raise  # a certificate the reload would change to
            self._alert_own(exc.problems)
            return list(exc.problems)
        if in_force is not None:
            self._alert_own([])
        return found

    async def recheck_own(self, config: GatewayConfig) -> None:
        """Our certificates in force judged again by the CRLs ``config``'s zones hold now:
        those fetched at the start (after the files' check, which refuses the start) and
        each new one fetched while medgw runs.  A CRL fetched for the peers' certificates
        is often our CA's too: one that revokes ours does not stop medgw (the peers that
        check no CRL still accept us); each such error is alerted, once per cause."""
        problems = await own_certificate_problems(config, at=self._clock.now())
        self._alert_own([p for p in problems if p.severity == "error"])

    def _alert_own(self, errors: Sequence[_OwnProblem]) -> None:
        """One ``pki.own_certificate_unusable`` alert for each of ``errors`` (about our
        certificates in force) not alerted already; the ones no longer found are forgotten."""
        said = set(self._own_alerted & {(p.key, p.message) for p in errors})
        self._own_alerted = frozenset(said)
        for problem in errors:
            cause = (problem.key, problem.message)
            if cause in said:
                continue
            self._log.error("pki.own_certificate_unusable", problem=str(problem))
            try:
                self._audit().emit(
                    AuditEvent(
                        EventType.OWN_CERTIFICATE_UNUSABLE,
                        Outcome.FAILURE,
                        Severity.ALERT,
                        reason=problem.message,
                        detail={"key": problem.key, "fix": problem.fix},
                    )
                )
            except OSError as exc:
                # Not marked: raised again at the next check.  The check itself goes on
                # (a CRL fetched is applied to the peers all the same).
                self._log.critical(
                    "audit.write_failed",
                    error=str(exc),
                    audit_event=EventType.OWN_CERTIFICATE_UNUSABLE.value,
                )
                continue
            said.add(cause)
            self._own_alerted = frozenset(said)

    def audit(
        self,
        config: GatewayConfig,
        trust: Mapping[str, PeerTrust],
        previous: Mapping[str, PeerTrust],
    ) -> None:
        """Alert on every configured certificate that is not acceptable (new ones only)."""
        self._alert_expiring(config)
        for name, verdicts in trust.items():
            before = previous.get(name)
            already = {(v.fingerprint, v.purpose) for v in before.rejected} if before else set()
            for verdict in verdicts.rejected:
                if (verdict.fingerprint, verdict.purpose) in already:
                    continue
                self._log.warning(
                    "peer.certificate_rejected",
                    peer=name,
                    purpose=verdict.purpose.value,
                    reason=verdict.result.reason,
                )
                self._alert(
                    EventType.PEER_CERTIFICATE_REJECTED,
                    name,
                    verdict.result.reason,
                    {
                        "purpose": verdict.purpose.value,
                        "subject": verdict.subject,
                        "sha256": verdict.fingerprint,
                        "revocation": verdict.result.revocation,
                    },
                )
        self._audit_unusable(trust, previous)
        self._audit_crls(config)

    def _audit_crls(self, config: GatewayConfig) -> None:
        """One ``pki.crl_stale`` for a zone's CRL when it needs acting on (near or past its
        nextUpdate; again when its finding changes in kind, warning to error, or it is
        another CRL), one ``pki.crl_fresh`` when it does not any more (while the zone still
        has that CRL: one taken out of it is no all-clear, and says nothing); nothing while it
        stays as it was: compared by cause (the CRL and the kind of finding), not by the
        message, which counts the time left."""
        said = self._crl_alerted
        self._crl_alerted = {}
        for zone in config.zones:
            findings = self._crl_findings(zone)
            before = said.get(zone.name, frozenset())
            for finding in findings:
                if finding.cause in before:
                    continue
                reason, fix, severity = finding.message, finding.fix, Severity.WARNING
                if finding.severity == "error":  # not usable: what the zone's policy does
                    does, fix = crl_policy(zone, fix)
                    reason = f"{reason}; {does}"
                    if zone.revocation != "off":  # "off" uses no CRL
                        severity = Severity.ALERT
                self._log.warning("crl.stale", zone=zone.name, finding=reason)
                self._audit().emit(
                    AuditEvent(
                        EventType.CRL_STALE,
                        Outcome.FAILURE,
                        severity,
                        reason=reason,
                        detail={"zone": zone.name, "issuer": finding.issuer, "fix": fix},
                    )
                )
            still = {f.issuer for f in findings}
            held = self._crl_sources(zone)
            for issuer in sorted({issuer for issuer, _, _ in before} - still):
                if issuer not in held:
                    # Taken out of the zone (its file, or the last peer whose certificates
                    # point to it): no CRL of it is current, so this is no all-clear.
                    self._log.info("crl.no_longer_used", zone=zone.name, issuer=issuer)
                    continue
                self._log.info("crl.fresh", zone=zone.name, issuer=issuer)
                self._audit().emit(
                    AuditEvent(
                        EventType.CRL_FRESH,
                        reason=f"zone {zone.name}'s CRL of {issuer} is fresh again: neither "
                        "past nor near its nextUpdate, or downloaded again",
                        detail={"zone": zone.name, "issuer": issuer},
                    )
                )
            if findings:
                self._crl_alerted[zone.name] = frozenset(f.cause for f in findings)

    def _file_crl_findings(self, zone: Zone) -> list[CrlFinding]:
        return stale_crl_warnings(zone.crls, at=self._clock.now(), warn_days=zone.crl_warn_days)

    def _audit_unusable(
        self, trust: Mapping[str, PeerTrust], previous: Mapping[str, PeerTrust]
    ) -> None:
        """One alert when a peer becomes unusable (a use with no acceptable certificate:
        nothing is sent to it until that changes), one record when it is usable again;
        nothing while it stays as it was: compared by its cause (the uses, certificates
        and revocation statuses), not by the reason's text, which names the clock."""
        for name, verdicts in trust.items():
            before = previous.get(name)
            was = before.unusable if before is not None else None
            now = verdicts.unusable
            changed = before is None or verdicts.unusable_cause != before.unusable_cause
            if now is not None and (was is None or changed):
                fix = (
                    f"put the peer's current certificates in peers.d/{name}.toml and reload "
                    f"(medgw check-config names each one and why it is refused); messages for "
                    f"{name} wait in the queue meanwhile"
                )
                self._log.error("peer.unusable", peer=name, reason=now, fix=fix)
                self._alert(EventType.PEER_UNUSABLE, name, now, {"fix": fix})
            elif now is None and was is not None:
                self._log.info("peer.usable", peer=name)
                self._audit().emit(
                    AuditEvent(
                        EventType.PEER_USABLE,
                        peer=name,
                        reason="every use has an acceptable certificate again",
                    )
                )

    def _alert(
        self, event: EventType, peer: str | None, reason: str | None, detail: dict[str, object]
    ) -> None:
        """An alert about a certificate of ours (``peer`` None) or of a peer."""
        self._audit().emit(
            AuditEvent(
                event, Outcome.FAILURE, Severity.ALERT, peer=peer, reason=reason, detail=detail
            )
        )

    def _alert_expiring(self, config: GatewayConfig) -> None:
        """An alert for each of our and the peers' certificates that expires within 30, 7
        and 1 day(s): once per certificate and threshold in this run."""
        now = self._clock.now()
        for found in expiring(held_certificates(config, now), now):
            key = (found.fingerprint, found.held.owner, found.held.use, found.threshold_days)
            if key in self._expiry_alerted:
                continue
            self._expiry_alerted.add(key)
            self._log.warning(
                "pki.certificate_expiring",
                owner=found.held.owner,
                use=found.held.use,
                days_left=round(found.days_left, 1),
            )
            detail: dict[str, object] = {
                "use": found.held.use,
                "fingerprint": found.fingerprint,
                "threshold_days": found.threshold_days,
                "days_left": round(found.days_left, 2),
                "not_after": found.not_after.isoformat(timespec="seconds"),
                "fix": _EXPIRY_FIX,
            }
            if found.held.sent_with:  # a CA certificate sent with ours (their uses)
                detail.update(sent_with=list(found.held.sent_with), fix=_CA_EXPIRY_FIX)
            self._audit().emit(
                AuditEvent(
                    EventType.CERTIFICATE_EXPIRING,
                    Outcome.FAILURE if found.days_left <= 0 else Outcome.SUCCESS,
                    Severity.ALERT,
                    peer=found.held.peer,
                    reason=found.text(),
                    detail=detail,
                )
            )


def _file_crl_sources(zone: Zone) -> set[str]:
    """The issuers of ``zone``'s CRL files, as its findings name them."""
    return {crl.issuer.rfc4514_string() for crl in zone.crls}


def unusable(trust: Mapping[str, PeerTrust]) -> dict[str, str]:
    """Peers the exchange cannot work with now, and why."""
    return {name: t.unusable for name, t in trust.items() if t.unusable is not None}


def trust_changed(old: Mapping[str, PeerTrust], new: Mapping[str, PeerTrust]) -> bool:
    """Whether ``new`` accepts other certificates than ``old``, or a peer is unusable for
    another cause (a new state is due: the next re-check compares with it, so each cause
    is alerted once)."""
    pins = {n: {v.fingerprint for v in t.tls if v.valid} for n, t in new.items()}
    old_pins = {n: {v.fingerprint for v in t.tls if v.valid} for n, t in old.items()}
    return pins != old_pins or any(
        new[n].signing_certificates != old[n].signing_certificates
        or new[n].encryption_recipient != old[n].encryption_recipient
        or new[n].unusable_cause != old[n].unusable_cause
        for n in new
    )


_EXPIRY_FIX = "issue and install a new certificate (README: rotation runbook)"
_CA_EXPIRY_FIX = (
    "ask the CA for its current CA certificate and put it in this one's place, after yours "
    "in each certificate file that holds it, or for new certificates of yours issued under "
    "a current one (README: rotation runbook)"
)


def held_certificates(config: GatewayConfig, at: datetime) -> list[Held]:
    """Every certificate the configuration uses, ours and the peers'; of the CA
    certificates sent with ours, those on the path a peer builds (at ``at``), once each."""
    ours = "this gateway"
    held = [
        Held(ours, "TLS", config.tls.identity.certificate),
        Held(ours, "S/MIME signing", config.smime.signing.certificate),
        *(Held(ours, "S/MIME decryption", k.certificate) for k in config.smime.decryption_keys),
    ]
    sent: list[tuple[str, KeyPair]] = [
        ("TLS", config.tls.identity),
        ("S/MIME signing", config.smime.signing),
        ("S/MIME encryption", config.smime.encryption),
    ]
    export = config.audit_export
    if export is not None and export.identity is not None:
        held.append(Held(ours, "audit export client", export.identity.certificate))
        sent.append(("audit export client", export.identity))
    # fingerprint -> the CA certificate and the uses of ours it is sent with
    cas: dict[str, tuple[x509.Certificate, list[str]]] = {}
    for use, pair in sent:
        for ca in peer_path(pair.certificate, pair.chain, at):
            uses = cas.setdefault(certificate_fingerprint(ca), (ca, []))[1]
            if use not in uses:
                uses.append(use)
    held += [Held(ours, "CA", ca, sent_with=tuple(uses)) for ca, uses in cas.values()]
    for peer in config.peers:
        owner = f"peer {peer.name!r}"
        held += [Held(owner, "TLS", c, peer.name) for c in peer.tls_certificates]
        held += [Held(owner, "S/MIME signing", c, peer.name) for c in peer.signing_certificates]
        held += [
            Held(owner, "S/MIME encryption", c, peer.name) for c in peer.encryption_certificates
        ]
    return held
