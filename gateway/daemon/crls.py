"""The daemon's side of CRLs fetched from distribution points (gateway.pki.crlfetch):
which points each configuration needs, the zones with the CRLs held, what each
attempt gave (audit trail and log), and when a zone's CRLs must be alerted on."""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

from gateway.audit import AuditEvent, AuditSink, EventType, Outcome, Severity
from gateway.clock import Clock
from gateway.config import GatewayConfig, Zone
from gateway.egress import Network, Refused
from gateway.logs import Logger
from gateway.pki.crl import CrlFinding, stale_crl_warnings
from gateway.pki.crlfetch import CrlKeeper, FetchOutcome, Wanted, wanted_points

IDLE_CHECK_SECONDS = 60.0  # with nothing due, the loop looks again this often (reloads)


class DaemonCrls:
    """The CRLs one daemon fetches, across reloads."""

    def __init__(
        self,
        state_dir: Path,
        clock: Clock,
        network: Network,
        audit: Callable[[], AuditSink],
        log: Logger,
        rng: random.Random,
        on_refused: Callable[[Refused], None],
    ) -> None:
        """``network``: the daemon's connect path; ``on_refused``: what a refused
        connection of a configuration not yet in force is told to."""
        self.keeper = CrlKeeper(state_dir / "crls", clock, network.zone, rng)
        self._on_refused = on_refused
        self._audit = audit
        self._log = log
        self._clock = clock

    def plan(self, config: GatewayConfig, *, fetch_now: bool = False) -> None:
        """Keep the points ``config`` needs (read from the cache); ``fetch_now``: ask every
        one again at once (a reload)."""
        wanted: list[Wanted] = []
        hours: dict[str, int] = {}
        for zone in config.zones:
            if not zone.fetch_crls:
                continue
            certificates = [
                cert
                for peer in config.peers
                if peer.zone == zone.name
                for cert in (
                    *peer.tls_certificates,
                    *peer.signing_certificates,
                    *peer.encryption_certificates,
                )
            ]
            wanted.extend(wanted_points(zone.name, zone.trust_anchors, certificates))
            hours[zone.name] = zone.crl_refresh_hours
        self.keeper.plan(wanted, hours, fetch_now=fetch_now)

    def applied(self, config: GatewayConfig) -> GatewayConfig:
        """``config`` with each fetching zone holding the CRLs kept for it now."""
        zones = tuple(
            replace(zone, fetched_crls=self.keeper.crls(zone.name)) if zone.fetch_crls else zone
            for zone in config.zones
        )
        return replace(config, zones=zones)

    def findings(self, zone: Zone) -> list[CrlFinding]:
        """What the operator must act on about ``zone``'s CRLs: its files, and the fetched."""
        found = stale_crl_warnings(zone.crls, at=self._clock.now(), warn_days=zone.crl_warn_days)
        if zone.fetch_crls:
            found += self.keeper.findings(zone.name, warn_days=zone.crl_warn_days)
        return found

    def sources(self, zone: Zone) -> set[str]:
        """What ``zone`` has CRLs from, as its findings name them: the issuers of its files
        and of the CRLs fetched for it, and each distribution point it fetches from."""
        held = [*zone.crls]
        if zone.fetch_crls:
            held += self.keeper.crls(zone.name)
        points = self.keeper.urls(zone.name) if zone.fetch_crls else []
        return {crl.issuer.rfc4514_string() for crl in held} | set(points)

    async def refresh(self, config: GatewayConfig | None = None) -> bool:
        """Fetch what is due; True when a new CRL is held (trust must be judged again).
        ``config``: the configuration whose zones the requests leave by (at start and at a
        reload, the one being built; default: the one in force)."""
        route = None
        if config is not None:
            route = Network(lambda: config.network_map, on_refused=self._on_refused).zone
        outcomes = await self.keeper.refresh_due(route)
        for outcome in outcomes:
            self._record(outcome)
        return any(o.crl is not None for o in outcomes)

    def seconds_to_next(self) -> float:
        due = self.keeper.next_due()
        if due is None:
            return IDLE_CHECK_SECONDS
        wait = (due - self._clock.now()).total_seconds()
        return min(max(wait, 0.0), IDLE_CHECK_SECONDS)

    def _record(self, outcome: FetchOutcome) -> None:
        detail: dict[str, object] = {"zone": outcome.zone, "url": outcome.url}
        if outcome.next_attempt is not None:
            detail["next_attempt"] = outcome.next_attempt.isoformat(timespec="seconds")
        if outcome.error is not None:
            self._log.warning(
                "crl.fetch_failed", zone=outcome.zone, url=outcome.url, error=outcome.error.message
            )
            if outcome.error.fix:
                detail["fix"] = outcome.error.fix
            self._audit().emit(
                AuditEvent(
                    EventType.CRL_FETCH_FAILED,
                    Outcome.FAILURE,
                    Severity.WARNING,
                    reason=outcome.error.message,
                    detail=detail,
                )
            )
            return
        if outcome.crl is None:
            return  # the same CRL as before
        crl = outcome.crl
        detail["issuer"] = crl.issuer.rfc4514_string()
        detail["this_update"] = crl.last_update_utc.isoformat(timespec="seconds")
        if crl.next_update_utc is not None:
            detail["next_update"] = crl.next_update_utc.isoformat(timespec="seconds")
        detail["revoked"] = len(crl)
        self._log.info("crl.fetched", zone=outcome.zone, url=outcome.url)
        self._audit().emit(AuditEvent(EventType.CRL_FETCHED, detail=detail))
