"""The spool database going away and coming back, told to the operator.

A PostgreSQL spool (gateway.spool.postgres) calls :meth:`SpoolReachability.changed`
when its server stops answering (with the cause) and when it answers again
(None), from whichever thread noticed.  Each change is one log line and one
audit record (an alert when it goes), and the readiness (gateway.daemon.observe)
is "not ready", naming the database, the cause and the fix, from the moment the
node finds it gone until it answers: in between, the gateway refuses new
documents and answers peers 503 (retryable), exactly as when a SQLite spool
cannot be written.  Its loops try the database again after a back-off that grows
to half a minute; :meth:`SpoolReachability.retry` tries one connection every
:data:`RETRY_SECONDS` meanwhile, so that every node sharing the database is ready
again within a second or two of its return, not each at its own back-off.  Those
refusals are alerted once (gateway.inbound.outages); the record of its return
says how many there were.

:meth:`SpoolReachability.replaced` hears that the spool was restored while this node
ran (gateway.spool.postgres.generation), or that another node took this node's name
while its session holding it was lost (``node.name_taken``): a critical log line and an
alert, then the daemon's ``stop`` (the daemon stops, and exits with a failure status).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from typing import Any

from gateway.audit import AuditEvent, AuditSink, EventType, Outcome, Severity
from gateway.daemon.observe import Readiness
from gateway.daemon.tasks import Tasks
from gateway.errors import NodeNameTakenError, SpoolReplacedError, SpoolUnreachableError
from gateway.inbound.outages import StorageOutages

# While the database does not answer, one connection is tried this often (seconds).
RETRY_SECONDS = 1.0


class SpoolReachability:
    def __init__(
        self,
        sink: Callable[[], AuditSink],
        log: Any,
        where: str,
        outages: StorageOutages,
        readiness: Readiness,
        stop: Callable[[SpoolReplacedError], None] = lambda _exc: None,
        *,
        lease: float = 60.0,
    ) -> None:
        """``lease``: ``[cluster] lease_seconds``, by which a clock's skew is judged."""
        self._sink = sink
        self._lease = lease
        self._skewed = False  # said that this node's clock is off the server's
        self._log = log
        self._where = where  # the database, as gateway.toml names it
        self._outages = outages  # the received documents it refused, counted
        self._readiness = readiness  # not ready while it does not answer
        self._stop = stop  # the daemon's, from whichever thread
        self._down = False  # the database does not answer (changed)

    def replaced(self, exc: SpoolReplacedError) -> None:
        """The spool was restored while this node ran: told, then the daemon stopped."""
        kind = (
            EventType.NODE_NAME_TAKEN
            if isinstance(exc, NodeNameTakenError)
            else EventType.SPOOL_REPLACED
        )
        self._log.critical(kind.value, database=self._where, error=exc.message, fix=exc.fix)
        event = AuditEvent(
            kind,
            Outcome.FAILURE,
            Severity.ALERT,
            reason=exc.message,
            detail={"database": self._where, "fix": exc.fix},
        )
        try:
            self._sink().emit(event)
        except OSError as failed:  # the audit log's disk may be failing too
            self._log.critical(
                "audit.write_failed", error=str(failed), audit_event=event.event.value
            )
        self._stop(exc)

    def clock(self, offset: float) -> None:
        """The database server's clock is ``offset`` seconds ahead of this node's (negative:
        behind), read at start and at each lease renewal: beyond a quarter of a lease, a
        warning and an alert, once until it is back within it (then an info line).  Leases
        are judged by the server's clock whatever it is; the node's other times are not."""
        skewed = abs(offset) > self._lease / 4
        if skewed == self._skewed:
            return
        self._skewed = skewed
        if not skewed:
            self._log.info("clock.in_step", database=self._where, offset_seconds=round(offset, 3))
            return
        way = "ahead of" if offset < 0 else "behind"
        fix = (
            "synchronise this host's clock (chrony or ntpd: chronyc tracking, timedatectl) "
            "with the same time source as the database server's and the other nodes'"
        )
        reason = (
            f"this node's clock is {abs(offset):.0f} s {way} the clock of the spool's database "
            f"server {self._where}, more than a quarter of a lease ({self._lease:g} s): leases "
            "are judged by the server's clock, but this node's retry waits, audit records and "
            "log lines carry its own"
        )
        self._log.warning(
            "clock.skewed", database=self._where, offset_seconds=round(offset, 3), fix=fix
        )
        event = AuditEvent(
            EventType.CLOCK_SKEWED,
            Outcome.FAILURE,
            Severity.ALERT,
            reason=reason,
            detail={"database": self._where, "offset_seconds": round(offset, 3), "fix": fix},
        )
        try:
            self._sink().emit(event)
        except OSError as exc:  # the audit log's disk may be failing too
            self._log.critical("audit.write_failed", error=str(exc), audit_event=event.event.value)

    async def retry(self, reach: Callable[[], None], tasks: Tasks) -> None:
        """While the database does not answer, ``reach`` (the spool's: one connection
        tried, whatever its back-off) every :data:`RETRY_SECONDS`, in a worker thread;
        when it answers, ``changed`` hears it from there.  Runs until the daemon stops."""
        while not tasks.stopping:
            if self._down:
                # Said when it went (spool.unreachable): tried again shortly.
                with contextlib.suppress(SpoolUnreachableError):
                    await asyncio.to_thread(reach)
            await tasks.sleep_unless_stopping(RETRY_SECONDS)

    def changed(self, cause: str | None) -> None:
        self._down = cause is not None
        if cause is not None:
            fix = (
                "check that the PostgreSQL server is running and that this host can reach "
                "it; medgw tries again by itself and needs no restart"
            )
            # Not ready from now: before the log line and record that say so.
            self._readiness.spool_unreachable = (
                f"the spool {self._where} is unreachable: {cause} (fix: {fix})"
            )
            self._log.error("spool.unreachable", database=self._where, error=cause, fix=fix)
            event = AuditEvent(
                EventType.SPOOL_UNREACHABLE,
                Outcome.FAILURE,
                Severity.ALERT,
                reason=f"the spool {self._where} is unreachable: {cause}; new documents are "
                "refused and peers asked to resend until it answers again",
                detail={"fix": fix},
            )
        else:
            outage = self._outages.spool_answers()
            self._readiness.spool_unreachable = None
            refused = outage.refused if outage is not None else 0
            self._log.info("spool.reachable", database=self._where, refused_during_outage=refused)
            event = AuditEvent(
                EventType.SPOOL_REACHABLE,
                reason=f"the spool {self._where} answers again; {refused} received documents "
                "were answered 503 during its outage (their peers resend them)",
                detail={"refused": refused},
            )
        try:
            self._sink().emit(event)
        except OSError as exc:  # the audit log's disk may be failing too
            self._log.critical("audit.write_failed", error=str(exc), audit_event=event.event.value)
