"""No accountable action without its audit record.

An action an administrator, a maintainer or the break-glass login is accountable for
(emergency mode entered or left, a credential sealed or used, a maintainer's work
approved, a peer suspended...) takes effect only once its record is in the trail: the
record is written first, then the state.  If the record cannot be written (a full
disk under the audit log, say) nothing is done, and the caller gets an
:class:`~gateway.errors.AuditNotWrittenError` naming the audit log's folder, the rule
and the fix.  If the state then cannot be written, a record says so
(``audit.action_not_done``), as far as the trail takes it.

A change committed in the spool that keeps the record it owes (an operator's retry or
cancel of a message, a hand-over retried) is not recorded first: its record follows
the change (gateway.audit.owed), and :func:`owed` says so when it cannot be written now.
"""

from __future__ import annotations

import contextlib
import errno
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from gateway.audit.events import AuditEvent, EventType, Outcome, Severity
from gateway.audit.log import AuditSink
from gateway.errors import AuditNotWrittenError, AuditRecordOwedError
from gateway.fsutil import storage_fix
from gateway.logs import Logger

RULE = "no action without its audit record"

T = TypeVar("T")


def not_written(trail: Path | None, what: str, exc: OSError) -> AuditNotWrittenError:
    """The error of ``what`` refused because its record could not be written to
    ``trail`` (the audit log), for ``exc``."""
    code = errno.errorcode.get(exc.errno or 0, "error")
    cause = exc.strerror or str(exc)
    where = f"the audit log in {trail.parent}" if trail else "the audit log"
    if trail is not None:
        fix = storage_fix(exc, trail.parent, daemon=True)
    else:
        fix = "free disk space where [storage] audit_log is (df -h on its folder)"
    return AuditNotWrittenError(
        f"{what} was not done: its audit record could not be written to {where} "
        f"({code}: {cause}), and medgw takes {RULE}",
        fix=f"{fix}, then do it again",
        trail=trail,
        cause=exc,
    )


def owed(audit: AuditSink, trail: Path | None, what: str, event: AuditEvent) -> None:
    """Write ``event``, the record of ``what``, a change already committed in the spool,
    which keeps that it owes this record (gateway.audit.owed): if it cannot be written,
    AuditRecordOwedError says that ``what`` is done and its record follows."""
    try:
        audit.emit(event)
    except OSError as exc:
        code = errno.errorcode.get(exc.errno or 0, "error")
        where = f"the audit log in {trail.parent}" if trail else "the audit log"
        fix = (
            storage_fix(exc, trail.parent, daemon=True)
            if trail is not None
            else "free disk space where [storage] audit_log is (df -h on its folder)"
        )
        raise AuditRecordOwedError(
            f"{what} was done, but its audit record could not be written to {where} "
            f"({code}: {exc.strerror or exc}) yet: medgw writes it as soon as the audit log "
            "takes records again, or at its next start",
            fix=f"{fix}; do not do it again",
            trail=trail,
            cause=exc,
        ) from exc


def record_first(audit: AuditSink, trail: Path | None, what: str, event: AuditEvent) -> None:
    """Write ``event``, the record of ``what``, before ``what`` is done: raises
    AuditNotWrittenError if it cannot be written (then ``what`` must not be done)."""
    try:
        audit.emit(event)
    except OSError as exc:
        raise not_written(trail, what, exc) from exc


def recorded(
    audit: AuditSink, trail: Path | None, what: str, event: AuditEvent, act: Callable[[], T]
) -> T:
    """``act()``, the action ``what``, once ``event``, its record, is written.  Its record
    not written: nothing done, AuditNotWrittenError.  ``act`` failing after it: a record
    that ``what`` was not done (if the trail takes it), and ``act``'s error."""
    record_first(audit, trail, what, event)
    try:
        return act()
    except Exception as exc:
        with contextlib.suppress(OSError):  # the trail's own failure: the error says it
            audit.emit(
                AuditEvent(
                    EventType.ACTION_NOT_DONE,
                    Outcome.FAILURE,
                    Severity.WARNING,
                    actor=event.actor,
                    peer=event.peer,
                    message_id=event.message_id,
                    reason=f"{what} was recorded ({event.event.value}) but not done: {exc}",
                    detail={"recorded": event.event.value},
                )
            )
        raise


def log_not_written(log: Logger, exc: AuditNotWrittenError) -> None:
    """The daemon's log line for an action refused because its record was not written."""
    log.error(
        "audit.not_written",
        file=str(exc.trail) if exc.trail else None,
        errno=errno.errorcode.get(exc.cause.errno or 0, "error"),
        reason=exc.message,
        fix=exc.fix,
    )
