"""Reload (SIGHUP, or a maintainer's command): build a complete new runtime state
from the files and swap it in only if that succeeds; and the same, without the
files, when the verdicts on the peers' certificates change as time passes."""

from __future__ import annotations

import asyncio
import contextlib
import functools
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from gateway.audit import AuditEvent, EventType, Outcome, Severity
from gateway.channel.client import PeerClient
from gateway.config import GatewayConfig, Runtime, load_config
from gateway.config.access import access_problems
from gateway.daemon.crls import DaemonCrls
from gateway.daemon.observe import Readiness
from gateway.daemon.reports import report_config_warnings, report_stranded_messages
from gateway.daemon.state import Parts, RuntimeState, StartupError
from gateway.daemon.tasks import Tasks
from gateway.daemon.trust import TrustKeeper, trust_changed
from gateway.errors import ConfigError, MedgwError
from gateway.fsutil import this_user
from gateway.maintenance import accounts
from gateway.operations import Reloaded, ReloadRefused
from gateway.pki.peers import PeerTrust
from gateway.report import crl_problems, trust_problems
from gateway.sdnotify import Notifier

TRUST_REFRESH_SECONDS = 300.0
SIGNAL = "signal"  # the actor of a SIGHUP's reload: the kernel does not say who sent it
CLIENT_CLOSE_MARGIN_SECONDS = 5.0  # after request_timeout_seconds, before a replaced client closes
# Why a reload under way when the shutdown began was not applied.
STOPPING = (
    "medgw is stopping: the new configuration was not applied (the transfers in progress "
    "finish with the one in force); medgw reads the files again when it starts"
)


class Reloader:
    """Builds, validates and swaps runtime states; one at a time."""

    def __init__(
        self,
        config_path: Path,
        state: Callable[[], RuntimeState],
        build: Callable[[GatewayConfig, Mapping[str, PeerTrust]], RuntimeState],
        swap: Callable[[RuntimeState], None],
        trust: TrustKeeper,
        *,
        parts: Parts,
        crls: DaemonCrls,
        readiness: Readiness,
        tasks: Tasks,
        notifier: Notifier,
    ) -> None:
        self._config_path = config_path
        self._state = state
        self._build = build
        self._swap = swap
        self._trust = trust
        self._spool, self._audit, self._log = parts.spool, parts.audit, parts.log
        self._clock = parts.clock
        self._crls = crls
        self._readiness = readiness
        self._tasks = tasks
        self._notifier = notifier
        self._lock = asyncio.Lock()
        # Called after a reload from the files is swapped in: old and new config, and who
        # asked for it (SIGNAL: SIGHUP, whose sender is not known).
        self.on_reloaded: Callable[[GatewayConfig, GatewayConfig, str], None] = (
            lambda old, new, actor: None
        )

    def request(self) -> None:
        """SIGHUP."""
        if self._tasks.stopping:
            # Shutdown may still be waiting for worker threads, which no new work can
            # use: a reload now could only fail (or apply a configuration nobody serves).
            self._log.info("config.reload_skipped", reason="the daemon is stopping")
            return
        self._tasks.spawn(self.reload(SIGNAL))

    async def reload(self, actor: str) -> Reloaded | ReloadRefused:
        """Reload for ``actor`` (who asked; SIGNAL for SIGHUP), recorded with it in the
        audit trail: the new configuration's warnings once its state serves, else why it
        was refused (the previous one goes on serving): the files, or the stop."""
        async with self._lock:
            if self._tasks.stopping:  # asked before SIGTERM, waited for the lock since
                return self._skipped(actor)
            self._notifier.reloading()
            old = self._state()
            try:
                new_config = await asyncio.to_thread(load_config, self._config_path)
                unchanged = restart_only_changes(old.config, new_config)
                if unchanged:
                    raise StartupError(
                        f"{unchanged} cannot change while running",
                        fix="restart medgw (systemctl restart medgw) to apply it",
                    )
                # An operator's reload fetches every CRL again (an urgent revocation).
                self._crls.plan(new_config, fetch_now=True)
                await self._crls.refresh(new_config)
                new_config = self._crls.applied(new_config)
                # Ours judged by the CRLs the zones hold now: their files and the fetched.
                own_warnings = await self._trust.judge_own(new_config, old.config)
                new_trust = await self._trust.assess(new_config)
                new_state = self._build(new_config, new_trust)
            except Exception as exc:
                self._crls.plan(old.config)
                # A defect must be a failed reload too, never a dead task that leaves the
                # old configuration half-replaced and systemd waiting in RELOADING.
                if isinstance(exc, ConfigError):
                    problems = [str(p) for p in exc.problems]
                elif isinstance(exc, MedgwError):
                    problems = [str(exc)]
                else:
                    problems = [
                        f"unexpected error while reading {self._config_path} "
                        f"({type(exc).__name__}: {exc}); run `sudo -u {this_user()} medgw "
                        f"check-config --config "
                        f"{self._config_path}` and report it if it names no problem"
                    ]
                defect: dict[str, Any] = {} if isinstance(exc, MedgwError) else {"exc_info": exc}
                self._log.error(
                    "config.reload_failed",
                    problems=problems,
                    action="still serving with the previous configuration",
                    **defect,
                )
                self._not_applied(actor, "; ".join(problems)[:2000])
                if not self._tasks.stopping:  # systemd was told STOPPING: no READY now
                    self._notifier.ready("reload failed; serving previous configuration")
                self._readiness.reload_failed = "; ".join(problems)
                if isinstance(exc, MedgwError) and not isinstance(exc, ConfigError) and exc.fix:
                    # Its own fix (restart to apply it, the TLS key to check), not "correct
                    # the files": a restart-only change is right as it is.
                    return ReloadRefused(
                        exc.message[:2000], stopping=self._tasks.stopping, fix_given=exc.fix
                    )
                return ReloadRefused("; ".join(problems)[:2000], stopping=self._tasks.stopping)
            if self._tasks.stopping:
                # The shutdown began while the CRLs were fetched: the transfers finishing
                # now keep the configuration and trust they started with.
                self._crls.plan(old.config)
                for client in new_state.clients.values():  # built, never used
                    await client.close()
                return self._skipped(actor)
            self._readiness.reload_failed = None
            self._trust.audit(new_config, new_state.trust, old.trust)
            self._replace(old, new_state)
            self.on_reloaded(old.config, new_config, actor)
            warnings = report_config_warnings(new_config, own_warnings, self._log)
            self._log.info("config.reloaded", peers=[p.name for p in new_config.peers])
            # Each account added, removed or changed, before the reload's own record.
            for event in accounts.changes(old.config.maintenance, new_config.maintenance, actor):
                self._audit.emit(event)
            self._audit.emit(
                AuditEvent(
                    EventType.CONFIG_RELOADED,
                    actor=actor,
                    detail={"peers": [p.name for p in new_config.peers]},
                )
            )
            # Off the event loop: it counts the queue, which a large spool makes slow.
            await asyncio.to_thread(
                report_stranded_messages, new_config, self._spool, self._audit, self._log
            )
            self._notifier.ready("configuration reloaded")
            # For the one who asked: all that check-config would say of these files now
            # (the daemon alerts and logs the peers', CRLs' and folders' on its own).
            found = await asyncio.to_thread(self._findings, new_config, new_state.trust)
            return Reloaded((*warnings, *found))

    def _findings(self, config: GatewayConfig, trust: Mapping[str, PeerTrust]) -> list[str]:
        """What ``check-config`` says of ``config``'s CRLs, peer certificates and folders
        (worker thread: the folder checks touch the disk).  Judged once the reload is in
        force: a check that fails (a folder this user cannot search) is a finding of its
        own, saying what was not judged and why; the others are still given."""
        now = self._clock.now()
        checks: list[tuple[str, str, Callable[[], Sequence[object]]]] = [
            ("the CRLs", "tls", lambda: crl_problems(config, at=now)),
            *(
                (
                    f"the certificates of peer {peer.name}",
                    "peers",
                    functools.partial(trust_problems, peer, trust[peer.name], at=now),
                )
                for peer in config.peers
            ),
            (
                "the folders [storage] names",
                "storage",
                lambda: access_problems(config, daemon=True),
            ),
        ]
        found: list[str] = []
        for what, key, check in checks:
            try:
                found += [str(problem) for problem in check()]
            except Exception as exc:  # said to the admin, and logged
                found.append(self._unchecked(config, what, key, exc))
        return found

    def _unchecked(self, config: GatewayConfig, what: str, key: str, exc: Exception) -> str:
        """A finding of the reload that could not be judged (``what``, of the
        configuration's ``key``), as ``check-config`` words its findings; logged."""
        user = this_user()
        check = f"sudo -u {user} medgw check-config --config {self._config_path}"
        if isinstance(exc, OSError) and exc.filename is not None:
            why = f"{exc.strerror or exc}: {exc.filename}"
            fix = (
                f"let user {user}, whom medgw runs as, read and search {exc.filename} and "
                f"the folders above it (ls -ld {exc.filename}, then each parent folder), "
                f"then run `{check}`"
            )
        else:
            why = f"{type(exc).__name__}: {exc}"
            fix = f"run `{check}`, and report it if it names no problem"
        self._log.error(
            "config.reload_check_failed",
            what=what,
            error=why,
            action="the reload is applied; this was not judged",
            **({} if isinstance(exc, OSError) else {"exc_info": exc}),
        )
        return (
            f"warning: {config.source}: {key}: {what} could not be checked after the reload "
            f"({why}); the reload is applied, and this was not judged (fix: {fix})"
        )

    def _skipped(self, actor: str) -> ReloadRefused:
        """A reload not applied because the daemon is stopping: logged, and audited for
        ``actor`` as a reload that did not take effect; systemd already knows STOPPING."""
        self._log.info("config.reload_skipped", reason="the daemon is stopping", actor=actor)
        self._not_applied(actor, STOPPING, {"refused": "stopping"})
        return ReloadRefused(STOPPING, for_stop=True, stopping=True)

    def _not_applied(self, actor: str, reason: str, detail: dict[str, Any] | None = None) -> None:
        """A reload asked for by ``actor`` that did not take effect, in the audit trail
        (``config.reload_failed``), as far as the audit log's disk allows."""
        with contextlib.suppress(Exception):  # the audit log's disk may be the problem
            self._audit.emit(
                AuditEvent(
                    EventType.CONFIG_RELOAD_FAILED,
                    Outcome.FAILURE,
                    Severity.WARNING,
                    actor=actor,
                    reason=reason,
                    detail=detail or {},
                )
            )

    async def trust_refresh_loop(self) -> None:
        """Re-judge peer certificates as time passes (expiry, CRL nextUpdate, OCSP)."""
        while True:
            await asyncio.sleep(TRUST_REFRESH_SECONDS)
            await self.refresh_trust()

    async def refresh_trust(self) -> None:
        """Re-judge peer certificates now (also when emergency mode begins or ends)."""
        async with self._lock:
            old = self._state()
            trust = await self._trust.assess(old.config)
            self._trust.audit(old.config, trust, old.trust)
            if trust_changed(old.trust, trust):
                self._replace(old, self._build(old.config, trust))
                self._log.info("trust.refreshed")

    async def crl_refresh_loop(self) -> None:
        """Fetch the zones' CRLs when due; a new one is applied at once: the peers'
        certificates are judged again with it and a new state is swapped in."""
        while not self._tasks.stopping:
            await self._tasks.sleep_unless_stopping(self._crls.seconds_to_next())
            # Woken by SIGTERM before the shutdown has begun (from Python 3.12 this loop's
            # wait can be the first to see the stop): no new fetch, nothing swapped in
            # under the transfers that are finishing.
            if self._tasks.stopping or self._tasks.stop_requested.is_set():
                continue
            if not await self._crls.refresh():
                continue
            async with self._lock:
                old = self._state()
                config = self._crls.applied(old.config)
                await self._trust.recheck_own(config)  # the new CRL may revoke ours
                trust = await self._trust.assess(config)
                self._trust.audit(config, trust, old.trust)
                self._replace(old, self._build(config, trust))
                self._log.info("trust.refreshed", reason="a new CRL")

    def _replace(self, old: RuntimeState, new: RuntimeState) -> None:
        self._swap(new)
        for client in old.clients.values():
            self._tasks.spawn(_close_later(client, old.config.runtime))


def restart_only_changes(old: GatewayConfig, new: GatewayConfig) -> str | None:
    """What of ``new`` only a restart can apply (None: a reload can apply it all)."""
    if old.listeners != new.listeners:
        return "[[listeners]]"
    if old.storage != new.storage:
        return "[storage]"
    if old.as2_id != new.as2_id:
        return "gateway.as2_id"
    if old.audit != new.audit:
        return "[audit]"
    if _api_endpoints(old) != _api_endpoints(new):
        return "[api] socket and listen"
    if _maintenance_endpoint(old) != _maintenance_endpoint(new):
        return "[maintenance] listen and host_key (and whether it is there)"
    if old.metrics != new.metrics:
        return "[metrics] (and whether it is there)"
    return None


def _maintenance_endpoint(config: GatewayConfig) -> tuple[object, ...] | None:
    found = config.maintenance
    return (found.address, found.port, found.host_key_path) if found is not None else None


def _api_endpoints(config: GatewayConfig) -> tuple[object, ...] | None:
    api = config.api
    return (api.socket, api.address, api.port) if api is not None else None


async def _close_later(client: PeerClient, runtime: Runtime) -> None:
    """Close a replaced client once sends that were using it have had time to finish.

    No new request starts on it, and each one already started ends within the
    ``request_timeout_seconds`` it was made with (a large document to a slow peer
    may need all of it): closing sooner would break off a send in progress.
    """
    try:
        await asyncio.sleep(runtime.request_timeout_seconds + CLIENT_CLOSE_MARGIN_SECONDS)
    finally:
        await client.close()
