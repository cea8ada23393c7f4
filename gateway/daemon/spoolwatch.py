"""The spool database going away and coming back, told to the operator.

A PostgreSQL spool (gateway.spool.postgres) calls :meth:`SpoolReachability.changed`
when its server stops answering (with the cause) and when it answers again
(None), from whichever thread noticed.  Each change is one log line and one
audit record (an alert when it goes): in between, the gateway refuses new
documents and answers peers 503 (retryable), exactly as when a SQLite spool
cannot be written, and tries the database again after a back-off.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from gateway.audit import AuditEvent, AuditSink, EventType, Outcome, Severity


class SpoolReachability:
    def __init__(self, sink: Callable[[], AuditSink], log: Any, where: str) -> None:
        self._sink = sink
        self._log = log
        self._where = where  # the database, as gateway.toml names it

    def changed(self, cause: str | None) -> None:
        if cause is not None:
            fix = (
                "check that the PostgreSQL server is running and that this host can reach "
                "it; medgw tries again by itself and needs no restart"
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
            self._log.info("spool.reachable", database=self._where)
            event = AuditEvent(
                EventType.SPOOL_REACHABLE,
                reason=f"the spool {self._where} answers again",
            )
        try:
            self._sink().emit(event)
        except OSError as exc:  # the audit log's disk may be failing too
            self._log.critical("audit.write_failed", error=str(exc), event=event.event.value)
