"""What the monitoring team sees of the daemon (gateway.metrics): the metrics of what
happens (counted from the audit events), a snapshot of what it holds at each scrape,
why it is not ready, and the endpoint that serves them (``[metrics]``)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import threading
from collections.abc import Callable, Mapping, Sequence
from datetime import datetime, timedelta
from pathlib import Path
from typing import Protocol

from gateway.audit import AuditEvent, AuditSink, Pending
from gateway.audit.log import Then
from gateway.clock import Clock
from gateway.config import GatewayConfig, MetricsSettings
from gateway.config.access import access_problems
from gateway.daemon.trust import held_certificates
from gateway.fsutil import no_hard_links
from gateway.inbound.outages import StorageOutages
from gateway.logs import Logger
from gateway.metrics.collector import Certificate, Crl, GatewayMetrics, Snapshot
from gateway.metrics.server import MetricsServer
from gateway.pki.tls import certificate_fingerprint

MIN_FREE_BYTES = 64 << 20  # the spool's file system with less free: not ready
STORAGE_FAILURE_SECONDS = 60.0  # a received document that could not be stored: not ready
FOLDER_CHECK_SECONDS = 5.0  # the readiness's folder checks answer this long from one run


class QueueCounts(Protocol):
    def counts(self) -> Mapping[tuple[str, str], int]:
        """Messages per (peer, state): the spool's, kept by gateway.daemon.spoolview."""
        ...

    def size_bytes(self) -> int | None:
        """The spool database's size on disk, as last read (None: not yet)."""
        ...


def _free_space(config: GatewayConfig) -> list[str]:
    """The state folder's file system nearly full: with SQLite it holds the spool; with
    PostgreSQL the bodies of larger documents and the receipts (the database's disk is
    the server's: a full one is a refused write, SQLSTATE 53100)."""
    state = config.storage.state_dir
    what = "state folder" if config.spool.postgres is not None else "spool's state folder"
    try:
        free = shutil.disk_usage(state).free
    except OSError as exc:
        return [f"the {what} {state} cannot be read: {exc.strerror}"]
    if free >= MIN_FREE_BYTES:
        return []
    return [
        f"the file system of the {what} {state} is full: {free >> 20} MiB free "
        f"(fix: free space on the file system of {state})"
    ]


Visit = Callable[[Path], None]  # told of each folder before a check's calls on it
FolderCheck = Callable[[GatewayConfig, Visit], list[str]]


class FolderProblems:
    """What the folders a configuration's ``[storage]`` names lack for the daemon to
    work: the access its user needs, the state folder's free space.  File-system calls,
    which a hung network mount holds: run by :class:`FolderChecks`, never on the event
    loop, one at a time.

    An inbox folder's hard links are tried (hidden files made, linked and removed: the
    work of a delivery) once per configuration in force, at the start and after each
    reload, and at a check only while they have not passed, or once another file system
    is mounted there: not every few seconds in every folder an inbox tool watches."""

    def __init__(self) -> None:
        self._of: GatewayConfig | None = None  # the configuration the folders passed of
        # Its inbox folders whose hard links passed, each with the file system's device
        # it passed on.
        self._linked: dict[Path, int] = {}

    def __call__(self, config: GatewayConfig, visit: Visit) -> list[str]:
        if config is not self._of:
            self._of, self._linked = config, {}
        # A folder medgw's user may not write (an inbox: documents answered 503).
        found = access_problems(config, daemon=True, links=self._links, visit=visit)
        out = [f"{p.message} (fix: {p.fix})" for p in found]
        visit(config.storage.state_dir)
        return out + _free_space(config)

    def _links(self, folder: Path) -> OSError | None:
        try:
            device: int | None = os.stat(folder).st_dev
        except OSError:
            device = None  # tried, and the access check says why it cannot be
        if device is not None and self._linked.get(folder) == device:
            return None
        refused = no_hard_links(folder)
        if refused is None and device is not None:
            self._linked[folder] = device
        else:
            self._linked.pop(folder, None)
        return refused


class FolderChecks:
    """The readiness's folder checks, off the event loop: a folder on a network mount
    that hangs must not stop the daemon's work, nor its answers.

    One check at a time, in a thread of its own; its answer is given for
    ``FOLDER_CHECK_SECONDS`` (a readiness probe or scrape each second checks no more
    often), and while the next check runs: a check that hangs leaves the last answer,
    and no more threads, until it returns; once one folder has not answered for twice
    that time, the answer says so too (a folder on a mount that hangs is not ready: the
    documents delivered there would hang).  Judged per folder, not for the whole check:
    many peers' folders on a slow mount make a long check of folders that all answer."""

    def __init__(
        self, clock: Clock, check: FolderCheck, fresh: float = FOLDER_CHECK_SECONDS
    ) -> None:
        self._clock = clock
        self._check = check
        self._fresh = fresh
        self._lock = threading.Lock()
        self._done = threading.Condition(self._lock)  # a check finished
        self._answer: list[str] = []
        self._of: GatewayConfig | None = None  # the configuration the answer is of
        self._at = 0.0  # when it was found (monotonic)
        self._running = False
        # The folder the running check is at (None: it has named none yet), and since
        # when (monotonic): the folder's first call, or the check's start.
        self._folder: Path | None = None
        self._since = 0.0

    def reasons(self, config: GatewayConfig) -> list[str]:
        """The last answer; a check of ``config`` started if that answer is stale or of
        another configuration (a reload) and none is running."""
        with self._lock:
            stale = self._of is not config or self._clock.monotonic() - self._at >= self._fresh
            now = self._clock.monotonic()
            if stale and not self._running:
                self._begin(now)
                threading.Thread(
                    target=self._run, args=(config,), name="folder checks", daemon=True
                ).start()
            answer = list(self._answer)
            waited = now - self._since
            if self._running and waited >= 2 * self._fresh:
                folder = self._folder
                answer.append(
                    f"the folder checks have not answered for {waited:.0f} s (fix: a folder "
                    "on a network mount that does not answer? findmnt -T <folder>, and the "
                    "mount's server)"
                    if folder is None
                    else f"the folder {folder} has not answered its check for {waited:.0f} s "
                    f"(fix: a network mount that does not answer? findmnt -T {folder}, and "
                    "the mount's server)"
                )
            return answer

    async def check(self, config: GatewayConfig) -> None:
        """Check now (after the check running, if one is) and wait for the answer (at the
        start: the readiness has one from its first question on)."""
        await asyncio.to_thread(self._check_now, config)

    def _check_now(self, config: GatewayConfig) -> None:
        with self._done:
            while self._running:
                self._done.wait()
            self._begin(self._clock.monotonic())
        self._run(config)

    def _begin(self, now: float) -> None:
        """A check starts at ``now`` (the lock held)."""
        self._running, self._folder, self._since = True, None, now

    def _visit(self, folder: Path) -> None:
        with self._lock:
            self._folder, self._since = folder, self._clock.monotonic()

    def _run(self, config: GatewayConfig) -> None:
        try:
            found = self._check(config, self._visit)
        except Exception as exc:  # the answer says so, rather than a thread dying unseen
            found = [f"the folders could not be checked: {exc}"]
        with self._lock:
            self._answer, self._of, self._at = found, config, self._clock.monotonic()
            self._running = False
            self._done.notify_all()


class Readiness:
    """Why the gateway is not ready now."""

    def __init__(
        self,
        clock: Clock,
        outages: StorageOutages,
        folder_check: FolderCheck | None = None,
    ) -> None:
        self._clock = clock
        self._outages = outages  # the received documents that could not be stored
        self.folders = FolderChecks(clock, folder_check or FolderProblems())
        self.started = False  # listeners, spool and trust are up
        self.stopping = False
        self.reload_failed: str | None = None  # the problems of the last reload, if it failed
        # The spool's database does not answer: what to say (gateway.daemon.spoolwatch).
        self.spool_unreachable: str | None = None

    def reasons(self, config: GatewayConfig | None) -> list[str]:
        out = []
        if self.stopping:
            out.append("the daemon is stopping")
        elif not self.started:
            out.append("starting: listeners, spool and trust are not all up yet")
        if self.reload_failed is not None:
            out.append(
                f"the last reload failed ({self.reload_failed[:300]}); serving the previous "
                "configuration"
            )
        unreachable = self.spool_unreachable
        if unreachable is not None:
            out.append(unreachable)
        failed = self._outages.latest()
        recent = timedelta(seconds=STORAGE_FAILURE_SECONDS)
        if failed is None or (failed.spool_unreachable and unreachable is not None):
            pass  # nothing, or said above by its cause
        elif self._clock.now() - failed.at < recent:
            out.append(
                "a received document could not be stored within the last minute: "
                f"{failed.cause} (fix: {failed.fix})"
            )
        if config is not None:
            out += self.folders.reasons(config)
        return out


class Observer:
    """The daemon's metrics, readiness and their endpoint."""

    def __init__(
        self,
        clock: Clock,
        log: Logger,
        *,
        config: Callable[[], GatewayConfig | None],
        spool: Callable[[], QueueCounts | None],
        export_backlog: Callable[[], int | None],
        folder_check: FolderCheck | None = None,
        outages: StorageOutages | None = None,
    ) -> None:
        """``config``: the configuration in force (None before there is one);
        ``folder_check``: what the readiness finds of its folders (default:
        :class:`FolderProblems`); ``outages``: the
        daemon's received documents that could not be stored (alone: its own)."""
        self._clock = clock
        self._log = log
        self._config = config
        self._spool = spool
        self._export_backlog = export_backlog
        self.readiness = Readiness(clock, outages or StorageOutages(clock), folder_check)
        # The configured peers' names, kept with the configuration they were read from.
        self._peer_names: tuple[GatewayConfig | None, frozenset[str]] = (None, frozenset())
        self.metrics = GatewayMetrics(clock, self._snapshot, self._peers)
        self._server: MetricsServer | None = None

    def sink(self, inner: AuditSink) -> AuditSink:
        """``inner``, with every event also counted."""
        return _Counting(inner, self)

    def not_ready(self) -> list[str]:
        return self.readiness.reasons(self._config())

    async def check_folders(self) -> None:
        """The folders of the configuration in force checked, the readiness's answer
        waited for (at the start, before it says ready)."""
        config = self._config()
        if config is not None:
            await self.readiness.folders.check(config)

    async def start(self, settings: MetricsSettings | None, audit: AuditSink) -> None:
        if settings is None:
            return
        self._server = MetricsServer(
            self.metrics, self.not_ready, audit=lambda: audit, clock=self._clock, log=self._log
        )
        await self._server.start(settings.address, settings.port)

    async def stop(self) -> None:
        if self._server is not None:
            with contextlib.suppress(Exception):
                await self._server.stop()
            self._server = None

    def _peers(self) -> frozenset[str]:
        """The peers' names (asked for every audit event): read again only when a reload
        put another configuration in force."""
        config = self._config()
        kept = self._peer_names
        if kept[0] is not config:
            names = frozenset(p.name for p in config.peers) if config is not None else frozenset()
            kept = self._peer_names = (config, names)
        return kept[1]

    def _snapshot(self) -> Snapshot:
        config = self._config()
        spool = self._spool()
        if config is None or spool is None:
            return Snapshot(not_ready=self.not_ready())
        return snapshot(
            config,
            spool,
            at=self._clock.now(),
            not_ready=self.not_ready(),
            export_backlog=self._export_backlog(),
        )


class _Counting:
    def __init__(self, inner: AuditSink, observer: Observer) -> None:
        self._inner = inner
        self._observer = observer

    def emit(self, event: AuditEvent) -> None:
        self._inner.emit(event)
        self._noted(event)

    def emit_all(self, events: Sequence[AuditEvent]) -> None:
        self._inner.emit_all(events)
        for event in events:
            self._noted(event)

    def emit_later(self, events: Sequence[AuditEvent]) -> Pending:
        kept = tuple(events)

        def noted() -> None:
            for event in kept:
                self._noted(event)

        return Then(self._inner.emit_later(kept), noted)

    def _noted(self, event: AuditEvent) -> None:
        self._observer.metrics.observe(event)


# The metric's ``use`` label of each use the expiry alerts name (gateway.daemon.trust).
_USE_LABELS = {
    "TLS": "tls",
    "S/MIME signing": "signing",
    "S/MIME decryption": "encryption",
    "S/MIME encryption": "encryption",
    "audit export client": "export",
    "CA": "ca",
}


def snapshot(
    config: GatewayConfig,
    spool: QueueCounts,
    *,
    at: datetime,
    not_ready: list[str],
    export_backlog: int | None,
) -> Snapshot:
    """What Prometheus reads at one scrape, from the configuration in force; its
    certificates are those the expiry alerts watch (the CA certificates sent with ours
    on the path a peer builds at ``at``)."""
    certificates = [
        Certificate(
            held.peer if held.peer is not None else "self",
            _USE_LABELS[held.use],
            certificate_fingerprint(held.certificate)[:16],
            held.certificate.not_valid_after_utc,
        )
        for held in held_certificates(config, at)
    ]
    crls = [
        Crl(
            zone.name,
            crl.issuer.rfc4514_string(),
            crl.last_update_utc,
            crl.next_update_utc,
            fetched,
        )
        for zone in config.zones
        for fetched, held in ((False, zone.crls), (True, zone.fetched_crls))
        for crl in held
    ]
    return Snapshot(
        messages={(peer, str(state)): n for (peer, state), n in spool.counts().items()},
        certificates=certificates,
        crls=crls,
        export_backlog_bytes=export_backlog,
        spool_bytes=spool.size_bytes(),
        not_ready=not_ready,
        node=config.cluster.node_name,
    )
