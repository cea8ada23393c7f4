"""Human-readable summaries of a configuration for ``check-config``."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from urllib.parse import urlsplit

from cryptography import x509

from gateway.config import GatewayConfig, Peer, Zone
from gateway.config.network_rules import reach_problems, zone_problems
from gateway.errors import ConfigError, ConfigProblem
from gateway.pki.crl import CrlFinding, stale_crl_warnings
from gateway.pki.keypair import KeyPair
from gateway.pki.own import judge_own
from gateway.pki.peers import ROLES, PeerTrust
from gateway.pki.validate import Purpose
from gateway.policy import AlgorithmPolicy
from gateway.routing import endpoint, on_this_host, url_address

EXPIRY_WARNING_DAYS = 30  # check-config warns about a certificate expiring this soon


def _cert_line(cert: x509.Certificate) -> str:
    return f"{cert.subject.rfc4514_string()} (valid until {cert.not_valid_after_utc:%Y-%m-%d})"


def describe_config(config: GatewayConfig) -> str:
    lines = [
        f"gateway  {config.name}  AS2 id {config.as2_id}",
        f"  TLS      {_cert_line(config.tls.identity.certificate)}; "
        "client certificates required (trust and TLS version per zone)",
        f"  signing  {_cert_line(config.smime.signing.certificate)}",
        f"  decrypt  {_cert_line(config.smime.encryption.certificate)}",
        "zones",
    ]
    for zone in config.zones:
        lines.append(
            f"  {zone.name:<16} {zone.kind}; source address "
            f"{zone.source_address or '(chosen by the OS)'}; egress {egress_text(zone)}"
        )
        lines.append(
            f"  {'':<16} TLS >= {zone.min_version}, revocation {zone.revocation}, trust anchors: "
            + "; ".join(c.subject.rfc4514_string() for c in zone.trust_anchors)
        )
    lines.append("listeners (all HTTPS with mutual TLS; no plaintext listener exists)")
    for listener in config.listeners:
        lines.append(
            f"  {listener.name:<16} https://{listener.address}:{listener.port}{listener.path}"
            f"  zone {listener.zone}"
        )
    lines += _internal_side(config)
    lines.append("responsible (NET-6b: who to call)")
    for person in config.responsible:
        lines.append(f"  {', '.join(person.responsible_for):<16} {person.describe()}")
    if not config.responsible:
        lines.append("  (no one named: add [[responsible]] tables to gateway.toml)")
    lines.append("peers")
    for peer in config.peers:
        lines.append(f"  {peer.name:<16} AS2 id {peer.as2_id:<20} {peer.url}  zone {peer.zone}")
        lines.append(
            f"  {'':<16} cipher {peer.cipher}, digest {peer.digest}, "
            f"key transport {peer.key_transport}"
            + (
                f", ACCEPTS LEGACY: {', '.join(sorted(peer.accept_legacy))}"
                if peer.accept_legacy
                else ""
            )
        )
    if not config.peers:
        lines.append("  (none: add one file per peer in peers.d/)")
    lines.append("")
    lines.append(proof_table(config))
    return "\n".join(lines)


def _internal_side(config: GatewayConfig) -> list[str]:
    """The gateway's internal side: the local API and the hand-over targets."""
    lines = ["internal side (this host and the hospital's own systems, never a zone)"]
    if config.api is None:
        lines.append("  local API        off (no [api]): internal systems use the outbox folder")
    else:
        lines.append(
            f"  local API        {', '.join(config.api.endpoints())} "
            "(plain HTTP on this host only; each client a bearer token)"
        )
        for client in config.api.clients:
            lines.append(f"  {'':<16} client {client.name}: may send to {', '.join(client.peers)}")
    delivery = config.delivery
    targets = [("all documents", delivery.http_url)] if delivery and delivery.http_url else []
    targets += [(f"service {s.name}", s.http_url) for s in (delivery.services if delivery else ())]
    if not targets:
        lines.append("  hand-over        off (no [delivery]): documents stay in the inbox folder")
    for what, url in targets:
        lines.append(f"  hand-over        {what}: {url or 'inbox folder only'}")
    export = config.audit_export
    if export is None:
        lines.append(
            "  audit export     off (no [audit.export]): the audit trail stays on this host"
        )
    else:
        identity = (export.identity or config.tls.identity).certificate
        lines.append(
            f"  audit export     syslog over TLS (RFC 5425) to {export.collector}, "
            f"{'IHE ATNA (DICOM XML)' if export.message_format == 'atna' else 'FHIR AuditEvent'}"
        )
        lines.append(
            f"  {'':<16} TLS >= {export.min_version}, collector checked as {export.server_name} "
            f"against {export.ca}; our certificate {identity.subject.rfc4514_string()}; "
            f"at most {export.max_backlog_bytes // (1024 * 1024) or 1} MiB wait"
        )
    return lines


def proof_table(config: GatewayConfig) -> str:
    """NET-1 / NET-4 as a table: each rule, whether it holds, and the evidence (NET-8)."""
    rows = proof(config)
    check_width = max(len(r.check) for r in rows)
    header = f"{'req':<6} {'check':<{check_width}}  {'result':<8} evidence"
    lines = ["network separation proof (NET-8: NET-1 and NET-4 hold)", header, "-" * len(header)]
    for row in rows:
        result = "holds" if row.holds else "VIOLATED"
        for index, evidence in enumerate(row.evidence):
            if index == 0:
                lines.append(
                    f"{row.requirement:<6} {row.check:<{check_width}}  {result:<8} {evidence}"
                )
            else:
                lines.append(f"{'':<6} {'':<{check_width}}  {'':<8} {evidence}")
    zone_header = f"{'zone':<16} {'kind':<15} {'TLS':<6} {'revocation':<10} peers"
    lines += ["", "zone TLS profiles", zone_header, "-" * len(zone_header)]
    for zone in config.zones:
        peers = ", ".join(p.name for p in config.peers if p.zone == zone.name) or "-"
        lines.append(
            f"{zone.name:<16} {zone.kind:<15} {'>= ' + zone.min_version:<6} "
            f"{zone.revocation:<10} {peers}"
        )
    return "\n".join(lines)


@dataclass(frozen=True)
class ProofRow:
    requirement: str
    check: str
    holds: bool
    evidence: tuple[str, ...]


def egress_text(zone: Zone) -> str:
    ranges = ", ".join(str(n) for n in zone.egress) or "(none)"
    if zone.egress_except:
        ranges += f" (egress_except {', '.join(str(n) for n in zone.egress_except)})"
    return ranges


def proof(config: GatewayConfig) -> list[ProofRow]:
    """What ``check-config`` shows to prove NET-1/NET-4 for a loaded configuration."""
    handover = config.delivery.targets() if config.delivery else ()
    api = config.api.endpoint if config.api else None
    problems = zone_problems(config.source, config.zones, config.listeners, config.peers)
    problems += reach_problems(
        config.source,
        config.zones,
        config.listeners,
        api,
        config.peers,
        handover,
        config.resolved_hosts,
    )
    errors = [p for p in problems if p.severity == "error"]

    def failing(test: Callable[[ConfigProblem], bool]) -> tuple[str, ...]:
        return tuple(str(p) for p in errors if test(p))

    listener_lines = tuple(
        f"{lst.name}: https://{lst.address}:{lst.port}{lst.path}, zone {lst.zone}, "
        "client certificate required"
        for lst in config.listeners
    )
    bound = []
    for zone in config.zones:
        own = [f"{lst.address}:{lst.port}" for lst in config.listeners if lst.zone == zone.name]
        bound.append(f"{zone.name}: {', '.join(own) or '(no listener: outbound only)'}")
    shared = failing(lambda p: p.key.startswith("listeners") or "source_address" in p.key)
    overlapping = failing(lambda p: p.key.endswith(".egress"))
    ranges = tuple(f"{zone.name}: {egress_text(zone)}" for zone in config.zones)
    egress_lines = []
    for peer in config.peers:
        found = config.zone(peer.zone)
        address = url_address(peer.url)
        zone_ranges = egress_text(found) if found else "?"
        if address is None:
            host = urlsplit(peer.url).hostname or ""
            now = ", ".join(config.resolved_hosts.get(host, ())) or "not resolved now"
            egress_lines.append(
                f"{peer.name}: {host} ({now}; host name: every resolved address checked at "
                f"connect against {zone_ranges})"
            )
        else:
            egress_lines.append(f"{peer.name}: {address} in {zone_ranges} (zone {peer.zone})")
        if peer.async_receipt_url:
            egress_lines.append(
                f"{peer.name}: asks for receipts at {peer.async_receipt_url} (not a listener "
                "or the egress of another zone)"
            )
    misplaced = failing(lambda p: p.key in ("url", "async_receipt_url"))
    internal = [
        f"{key}: {url} -> {_where(url, config.resolved_hosts)}" for key, url in handover if url
    ] or ["(no hand-over: received documents stay in the inbox folder)"]
    if config.api is not None:
        if config.api.endpoint is not None:
            api_address, api_port = config.api.endpoint
            internal.append(
                f"local API: http://{api_address}:{api_port} (loopback: this host only)"
            )
        if config.api.socket is not None:
            internal.append(f"local API: unix socket {config.api.socket} (this host only)")
    leaking = failing(lambda p: p.key.startswith("delivery."))
    return [
        ProofRow(
            "NET-1",
            "no plaintext listener",
            True,
            listener_lines or ("(no listener: this gateway only sends)",),
        ),
        ProofRow("NET-4", "no listener shared by two zones", not shared, tuple(bound) + shared),
        ProofRow(
            "NET-4",
            "no address in two zones' egress",
            not overlapping,
            ranges + overlapping or ("(no zones)",),
        ),
        ProofRow(
            "NET-4",
            "each peer's URL inside its zone's egress",
            not misplaced,
            tuple(egress_lines) + misplaced or ("(no peers)",),
        ),
        ProofRow(
            "NET-4",
            "hand-over and local API outside every zone",
            not leaking,
            tuple(internal) + leaking,
        ),
        ProofRow(
            "NET-4",
            "no cross-zone route",
            True,
            (
                "inbound messages are delivered to the local inbox only; medgw does not "
                "forward, so no route exists between any two zones",
                "a message addressed through this gateway to another peer is refused "
                "and audited (routing.transit_refused)",
                "the spool refuses to queue a message from zone A for a peer of zone B",
                "a peer is accepted only on its own zone's listener (TLS pins + "
                "zone check, zone.violation)",
            ),
        ),
    ]


def _where(url: str, resolved: Mapping[str, Sequence[str]]) -> str:
    found = endpoint(url, resolved)
    if found is None:
        return "(host name not resolved: not shown)"
    addresses, port = found
    return ", ".join(f"{ip} port {port}" for ip in addresses) + (
        " (this host; no listener and no peer endpoint)"
        if all(on_this_host(ip) for ip in addresses)
        else " (in no zone's egress)"
    )


def trust_problems(
    peer: Peer, trust: PeerTrust, *, at: datetime, warn_days: int = EXPIRY_WARNING_DAYS
) -> list[ConfigProblem]:
    """What ``check-config`` says about one peer's certificates: an error for a use with
    no acceptable certificate left (the daemon marks the peer unusable), a warning for
    each unacceptable one beside an acceptable one, and for each acceptable one that
    expires within ``warn_days``."""
    problems = []
    source = str(peer.source)
    for name, key, label in ROLES:
        verdicts = trust.role(name)
        good = [v for v in verdicts if v.valid]
        for verdict in verdicts:
            if verdict.valid:
                left = verdict.certificate.not_valid_after_utc - at
                if left < timedelta(days=warn_days):
                    problems.append(
                        ConfigProblem(
                            source,
                            key,
                            f"{label} certificate {verdict.subject} of peer {peer.name!r} "
                            f"expires on {verdict.certificate.not_valid_after_utc:%Y-%m-%d %H:%M}Z"
                            f" (in {max(left.days, 0)} day(s))",
                            f"ask {peer.name} for its next certificate now and add it to {key} "
                            "beside this one (both are accepted until this one expires)",
                            "warning",
                        )
                    )
            elif good:
                problems.append(
                    ConfigProblem(
                        source,
                        key,
                        f"{label} certificate {verdict.subject} of peer {peer.name!r} is not "
                        f"acceptable and is not used ({len(good)} other(s) are): "
                        f"{verdict.result.reason}",
                        f"remove it from {key}, or correct what the reason says",
                        "warning",
                    )
                )
        if not good:
            reasons = "; ".join(f"{v.subject}: {v.result.reason}" for v in verdicts)
            problems.append(
                ConfigProblem(
                    source,
                    key,
                    f"peer {peer.name!r} has no acceptable {label} certificate"
                    + (f" ({reasons})" if reasons else " (none is listed)")
                    + ": medgw marks the peer unusable and exchanges nothing with it",
                    f"put the peer's current {label} certificate in {key} (one that chains "
                    f"to zone {peer.zone!r}'s trust_anchors, is valid now, is made for this "
                    "use and is not revoked), or correct what the reason says",
                )
            )
    return problems


# Our certificates, each with the keys naming it in gateway.toml and its uses: the TLS
# one serves our listeners and our connections to the peers; the audit export's client
# certificate (when it is not the TLS one) is shown to the collector alone.
_OWN = (
    ("TLS", "tls", "certificate", "key", (Purpose.TLS_SERVER, Purpose.TLS_CLIENT)),
    ("S/MIME signing", "smime", "signing_certificate", "signing_key", (Purpose.SMIME_SIGN,)),
    (
        "S/MIME encryption",
        "smime",
        "encryption_certificate",
        "encryption_key",
        (Purpose.SMIME_ENCRYPT,),
    ),
    ("audit export client", "audit.export", "certificate", "key", (Purpose.TLS_CLIENT,)),
)


async def own_certificate_problems(config: GatewayConfig, *, at: datetime) -> list[ConfigProblem]:
    """Our TLS, S/MIME signing and S/MIME encryption certificates judged by the rules
    applied to a peer's (gateway.pki.own): an error for one outside its validity period,
    not made for its use or revoked by a CRL of a zone it chains to (every peer refuses
    it), a warning for one that chains to no zone's trust anchors.  The audit export's
    client certificate likewise for validity and clientAuth (its collector refuses it),
    but only as a warning: without it the export waits (and says so), while documents
    go on flowing; a monitoring certificate never stops the gateway.  Its path ends at
    the collector's trust anchors, not a zone's."""
    export = config.audit_export
    pairs: dict[str, KeyPair | None] = {
        "TLS": config.tls.identity,
        "S/MIME signing": config.smime.signing,
        "S/MIME encryption": config.smime.encryption,
        "audit export client": export.identity if export is not None else None,
    }
    anchors = {zone.name: zone.trust_anchors for zone in config.zones}
    crls = {zone.name: zone.crls_in_use for zone in config.zones}
    problems = []
    for label, table, cert_key, key_key, purposes in _OWN:
        pair = pairs[label]
        if pair is None:  # no export, or it uses the TLS certificate
            continue
        for finding in await judge_own(
            pair.certificate,
            chain=pair.chain,
            purposes=purposes,
            anchors=None if table == "audit.export" else anchors,
            at=at,
            policy=AlgorithmPolicy(),
            crls=crls,
        ):
            fix = finding.fix
            if finding.replace:
                fix += (
                    f"; then point {table}.{cert_key} and {table}.{key_key} at the new "
                    "certificate and its key"
                )
            if finding.clock:
                fix += f"; {finding.clock}"
            message = f"our {label} {finding.message} (file {pair.certificate_path})"
            severity = finding.severity
            if table == "audit.export":
                message += (
                    "; the collector refuses it: the audit export waits, and the records "
                    "wait in the audit log, while documents go on flowing"
                )
                severity = "warning"
            problems.append(
                ConfigProblem(str(config.source), f"{table}.{cert_key}", message, fix, severity)
            )
    return problems


async def own_certificates_usable(config: GatewayConfig, *, at: datetime) -> list[ConfigProblem]:
    """The warnings about our certificates (:func:`own_certificate_problems`); raises
    :class:`ConfigError` with the errors when there is one: medgw does not start, or
    reload, with a certificate every peer refuses."""
    problems = await own_certificate_problems(config, at=at)
    errors = [p for p in problems if p.severity == "error"]
    if errors:
        raise ConfigError(errors)
    return problems


def crl_problems(config: GatewayConfig, *, at: datetime) -> list[ConfigProblem]:
    """A warning for each CRL file of a zone close to its nextUpdate (within the zone's
    crl_warn_days) or without one, as ``medgw pki check`` says it.  A stale one (or one
    dated after ``at``) is not repeated under revocation "require": the peer certificates
    it covers are refused, and their errors say why.  Under "prefer" and "off" nothing
    is refused for it, so it is a warning here, saying what the policy does with it."""
    problems = []
    for index, zone in enumerate(config.zones):
        for finding in stale_crl_warnings(zone.crls, at=at, warn_days=zone.crl_warn_days):
            if finding.severity == "warning":
                text = f"zone {zone.name}'s CRL of {finding.issuer}: {finding.message}"
                fix = finding.fix
            elif zone.revocation == "require":
                continue
            else:
                what, fix = unused_crl(zone, finding, at)
                text = f"zone {zone.name}'s CRL of {finding.issuer} {what}"
            problems.append(
                ConfigProblem(str(config.source), f"zones[{index}].crls", text, fix, "warning")
            )
    return problems


def unused_crl(zone: Zone, finding: CrlFinding, at: datetime) -> tuple[str, str]:
    """What check-config (and ``medgw pki check``) says of a zone's CRL file that cannot be
    used (stale, or dated after ``at``) under revocation "prefer" or "off", after the
    CRL's name, and its fix."""
    next_update = finding.next_update
    if next_update is not None and next_update <= at:
        what = f"is stale: its nextUpdate {next_update:%Y-%m-%d %H:%M}Z has passed"
        fix = "download the CA's current CRL into the zone's `crls` folder and reload"
    else:
        until = f", nextUpdate {next_update:%Y-%m-%d %H:%M}Z" if next_update else ""
        what = f"cannot be used yet: {finding.message}{until}"
        fix = finding.fix
    does, fix = crl_policy(zone, fix)
    return f"{what}; {does}", fix


def crl_policy(zone: Zone, fix: str) -> tuple[str, str]:
    """What ``zone``'s revocation policy does while one of its CRLs cannot be used (stale,
    dated after now, never fetched), and what ``fix`` (that CRL's) becomes under it."""
    unless = " unless their OCSP responder answers" if zone.ocsp else ""
    if zone.revocation == "require":
        does = (
            f'revocation = "require" refuses the certificates of its CA{unless}, and with '
            "them the zone's peers that hold them"
        )
    elif zone.revocation == "off":
        does = (
            'revocation = "off" checks no certificate against any CRL, so a revoked '
            "certificate of this zone's peers is accepted whatever its CRLs say"
        )
        fix = (
            f'set revocation = "require" (or "prefer") to use the zone\'s CRLs, and {fix}; '
            "or take it out of `crls`"
        )
    else:
        does = (
            'revocation = "prefer" accepts the certificates of its CA with their revocation '
            f"status unknown{unless}: a revocation this CRL does not list goes unseen (the "
            "certificates it lists stay refused)"
        )
    return does, fix
