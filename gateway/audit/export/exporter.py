"""Sends the audit trail to the hospital's collector, in order, as it is written.

One task per daemon.  It reads the audit log forward from a cursor
(gateway.audit.export.cursor), formats each record (ATNA or FHIR, in a worker
thread), and writes it to one TLS connection (RFC 5425 framing).  New records
are picked up within ``POLL_SECONDS``: an alert reaches the collector at once.

The collector never answers (RFC 5425 has no acknowledgements), so what was
written just before a connection broke may not have arrived: after a break,
the records sent in the last ``RESEND_SECONDS`` are sent again (a collector can
tell the repeat by the record's ``seq`` in the structured data).  Nothing is
lost, and the persisted cursor only ever names records sent that long before.

While the collector cannot be reached the records wait in the audit log.  The
wait is bounded (``max_backlog_mib``): at 80 % an ``audit.export_backlog``
alert is recorded (and exported first thing when the collector is back); at the
bound, the oldest unexported records are skipped so that half the bound is left
to send, and an ``audit.export_skipped`` alert names the skipped sequence
numbers: they stay in the audit log, and only their export is given up.

The connection goes through the connect path's internal route
(gateway.egress): the collector is on the hospital's side, never in a zone.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import ssl
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gateway.audit.events import AuditEvent, EventType, Outcome, Severity
from gateway.audit.export.atna import atna_message
from gateway.audit.export.cursor import (
    Broken,
    Position,
    end_position,
    load_position,
    read_forward,
    save_position,
    skip_to,
    waiting_bytes,
)
from gateway.audit.export.fhir import fhir_message
from gateway.audit.export.record import Source, describe
from gateway.audit.export.settings import ExportSettings
from gateway.audit.export.syslog import octet_counted, syslog_message
from gateway.audit.log import AuditSink
from gateway.clock import Clock
from gateway.egress import Route
from gateway.logs import Logger
from gateway.pki.keypair import KeyPair
from gateway.pki.tls import collector_context

POLL_SECONDS = 0.1  # how soon a new record is seen
RESEND_SECONDS = 2.0  # what was sent this recently is sent again after a break
SAVE_SECONDS = 1.0  # the cursor is written to disk at most this often
BATCH = 256  # records read and formatted at once
CONNECT_SECONDS = 10.0
RETRY_MIN_SECONDS = 0.5
RETRY_MAX_SECONDS = 30.0
WARN_FRACTION = 0.8
CURSOR_NAME = "audit-export.json"


@dataclass(frozen=True)
class Target:
    """Where and how to export, from the configuration in force."""

    settings: ExportSettings
    identity: KeyPair
    source: Source


class _Broken(Exception):
    """The collector closed the connection."""


class AuditExporter:
    def __init__(
        self,
        target: Callable[[], Target | None],
        *,
        log_path: Path,
        state_dir: Path,
        audit: AuditSink,
        route: Route,
        log: Logger,
        clock: Clock,
        on_broken: Callable[[Broken], None] | None = None,
        durable: Callable[[], int] | None = None,
    ) -> None:
        """``on_broken``: who alerts on a record whose chain link does not hold (the
        daemon's gateway.audit.watch.BrokenRecords, shared with its own check); by default
        this exporter, once each.  ``durable``: the seq of the writer's last durable
        record (AuditLog.durable_seq), when it writes in this process: none after it is
        sent, for a failed fsync may yet cut it off and give its seq to another record."""
        self._target = target
        self._durable = durable
        self._report_broken = on_broken or self._on_broken
        self._log_path = log_path
        self._cursor_path = state_dir / CURSOR_NAME
        self._audit = audit
        self._route = route
        self._log = log
        self._clock = clock
        saved = load_position(self._cursor_path)
        # First run with export on: what the log held before is not sent (README).
        self._position = saved if saved is not None else end_position(log_path)
        self._confirmed = self._position  # surely received: what the cursor file says
        self._saved_at = -SAVE_SECONDS
        self._sent: deque[tuple[float, Position]] = deque()
        self._down_since: float | None = None
        self._warned = False
        self._finishing = False
        self._wake = asyncio.Event()
        self._broken_reported: set[tuple[Path, int]] = set()
        save_position(self._cursor_path, self._position)

    @property
    def position(self) -> Position:
        return self._position

    async def run(self) -> None:
        pause = RETRY_MIN_SECONDS
        while True:
            target = self._target()
            if target is None:
                return
            self._bound_backlog(target.settings)
            try:
                reader, writer = await self._connect(target)
            except (OSError, ssl.SSLError, TimeoutError) as exc:
                self._interrupted(target, exc)
                if self._finishing:
                    return
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), pause)  # set by finish()
                pause = min(pause * 2, RETRY_MAX_SECONDS)
                continue
            pause = RETRY_MIN_SECONDS
            self._resumed(target)
            try:
                await self._pump(target, reader, writer)
            except (OSError, ssl.SSLError, _Broken) as exc:
                self._rewind()
                self._interrupted(target, exc)
            finally:
                writer.close()
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(writer.wait_closed(), 2.0)
            if self._finishing:
                return

    async def finish(self, task: asyncio.Task[None], timeout: float) -> None:
        """At shutdown: send what is left (the daemon's last record too), then stop."""
        self._finishing = True
        self._wake.set()
        with contextlib.suppress(TimeoutError, asyncio.CancelledError, Exception):
            await asyncio.wait_for(asyncio.shield(task), timeout)
        task.cancel()
        with contextlib.suppress(BaseException):
            await task
        self._save_now()

    async def _connect(self, target: Target) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        settings = target.settings
        context = collector_context(target.identity, settings.ca_certificates, settings.min_version)
        loop = asyncio.get_running_loop()
        async with asyncio.timeout(CONNECT_SECONDS):
            infos = await loop.getaddrinfo(settings.host, settings.port, type=socket.SOCK_STREAM)
            failure: OSError | None = None
            for info in infos:
                try:
                    sock = await self._route.open_socket(str(info[4][0]), settings.port)
                except OSError as exc:
                    failure = exc
                    continue
                try:
                    return await asyncio.open_connection(
                        sock=sock, ssl=context, server_hostname=settings.server_name
                    )
                except BaseException:
                    sock.close()
                    raise
            raise failure or OSError(f"{settings.host} resolves to no address")

    async def _pump(
        self, target: Target, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        closed = asyncio.ensure_future(reader.read(1))  # a collector never sends: EOF or reset
        try:
            while True:
                if closed.done():
                    raise _Broken("the collector closed the connection")
                if self._target() != target:
                    return  # reconnect with the reloaded settings
                self._bound_backlog(target.settings)
                position = self._position
                frames, after, full = await asyncio.to_thread(self._frames, target, position)
                if self._position != position:
                    continue  # the bound moved the cursor meanwhile
                if frames:
                    writer.write(frames)
                    await writer.drain()
                    self._sent.append((self._clock.monotonic(), after))
                    self._position = after
                    self._confirm(idle=False)
                    await self._save_due()
                    if full:
                        continue  # more is waiting: read on at once
                else:
                    self._confirm(idle=True)
                    await self._save_due()
                    if self._finishing:
                        return
                # What is written meanwhile goes out together: one read, one write.
                await asyncio.wait({closed}, timeout=POLL_SECONDS)
        finally:
            closed.cancel()

    def _frames(self, target: Target, start: Position) -> tuple[bytes, Position, bool]:
        """The next records after ``start``, framed for the wire, the cursor after them, and
        whether there may be more (a full batch)."""
        through = self._durable() if self._durable is not None else None
        reads = read_forward(self._log_path, start, BATCH, self._report_broken, through)
        if not reads:
            return b"", start, False
        settings = target.settings
        encode = atna_message if settings.message_format == "atna" else fhir_message
        frames = [
            octet_counted(
                syslog_message(
                    read.record,
                    encode(describe(read.record, target.source), target.source),
                    hostname=settings.hostname,
                    message_format=settings.message_format,
                )
            )
            for read in reads
        ]
        return b"".join(frames), reads[-1].after, len(reads) == BATCH

    def _confirm(self, *, idle: bool) -> None:
        """Move the persisted cursor to what was sent long enough ago."""
        now = self._clock.monotonic()
        while self._sent and self._sent[0][0] <= now - RESEND_SECONDS:
            self._confirmed = self._sent.popleft()[1]
        if idle and self._sent and self._sent[-1][0] <= now - RESEND_SECONDS:
            self._sent.clear()
            self._confirmed = self._position

    def _rewind(self) -> None:
        self._sent.clear()
        self._position = self._confirmed

    async def _save_due(self) -> None:
        """Write the cursor if it is due, in a worker thread (an fsync)."""
        now = self._clock.monotonic()
        if now - self._saved_at >= SAVE_SECONDS:
            self._saved_at = now
            await asyncio.to_thread(save_position, self._cursor_path, self._confirmed)

    def _save_now(self) -> None:
        """Write the cursor at once: at the end, and after the bound moved it."""
        save_position(self._cursor_path, self._position)
        self._saved_at = self._clock.monotonic()

    def _on_broken(self, broken: Broken) -> None:
        """A record read for export does not hold its chain link: an alert (once each)."""
        if (broken.path, broken.offset) in self._broken_reported:
            return
        self._broken_reported.add((broken.path, broken.offset))
        self._log.error("audit.verification_failed", offset=broken.offset, seq=broken.seq)
        self._alert(
            EventType.AUDIT_VERIFICATION_FAILED,
            f"{broken.path}: {broken.why} (byte {broken.offset})",
            {"seq": broken.seq, "offset": broken.offset},
        )

    def _alert(self, kind: EventType, reason: str, detail: dict[str, Any]) -> None:
        """An alert about the trail or its export: severity alert, so it goes out at once."""
        self._audit.emit(
            AuditEvent(kind, Outcome.FAILURE, Severity.ALERT, reason=reason, detail=detail)
        )

    @property
    def backlog_bytes(self) -> int:
        """Bytes of audit records written but not yet exported."""
        return self._backlog()

    def _backlog(self) -> int:
        return waiting_bytes(self._log_path, self._position)

    def _bound_backlog(self, settings: ExportSettings) -> None:
        bound = settings.max_backlog_bytes
        waiting = self._backlog()
        if waiting >= bound:
            self._skip(settings)
        elif waiting >= bound * WARN_FRACTION and not self._warned:
            self._warned = True
            self._log.warning("audit.export_backlog", bytes=waiting, bound=bound)
            self._alert(
                EventType.EXPORT_BACKLOG,
                (
                    f"{waiting} bytes of audit records wait for the collector "
                    f"{settings.collector} (bound {bound}); at the bound the oldest are "
                    "not exported (they stay in the audit log)"
                ),
                {"bytes": waiting, "bound": bound, "collector": settings.collector},
            )
        elif waiting < bound * WARN_FRACTION / 2:
            self._warned = False

    def _skip(self, settings: ExportSettings) -> None:
        found = skip_to(self._log_path, settings.max_backlog_bytes // 2)
        if found is None:
            return
        position, _ = found
        first, last = self._position.seq + 1, position.seq
        self._sent.clear()
        self._position = self._confirmed = position
        self._save_now()
        self._warned = False
        self._log.error("audit.export_skipped", first_seq=first, last_seq=last)
        self._alert(
            EventType.EXPORT_SKIPPED,
            (
                f"audit records {first} to {last} were not exported: the collector "
                f"{settings.collector} was unreachable until max_backlog_mib was reached; "
                "they remain in the audit log"
            ),
            {"first_seq": first, "last_seq": last, "collector": settings.collector},
        )

    def _interrupted(self, target: Target, exc: BaseException) -> None:
        cause = f"{type(exc).__name__}: {exc}"[:300]
        self._log.warning(
            "audit.export_interrupted", collector=target.settings.collector, error=cause
        )
        if self._down_since is not None:
            return
        self._down_since = self._clock.monotonic()
        if self._finishing:
            return  # the daemon has stopped: its last record stays the last
        self._audit.emit(
            AuditEvent(
                EventType.EXPORT_INTERRUPTED,
                Outcome.FAILURE,
                Severity.WARNING,
                reason=(
                    f"the audit collector {target.settings.collector} cannot be reached "
                    f"({cause}); records wait in the audit log"
                ),
                detail={"collector": target.settings.collector},
            )
        )

    def _resumed(self, target: Target) -> None:
        if self._down_since is None:
            return
        seconds = self._clock.monotonic() - self._down_since
        self._down_since = None
        self._log.info("audit.export_resumed", collector=target.settings.collector)
        if self._finishing:
            return  # the daemon has stopped: its last record stays the last
        self._audit.emit(
            AuditEvent(
                EventType.EXPORT_RESUMED,
                reason=f"the audit collector {target.settings.collector} is reachable again",
                detail={
                    "collector": target.settings.collector,
                    "down_seconds": round(seconds, 1),
                    "waiting_bytes": self._backlog(),
                },
            )
        )
