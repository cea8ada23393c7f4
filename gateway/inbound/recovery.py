"""Recovery at start, after a crash: the records a kill cut off, and the deliveries a
stopped process left unfinished."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from datetime import UTC, datetime
from functools import partial
from pathlib import Path

from gateway.audit import AuditEvent, AuditSink, EventType, Outcome, Severity
from gateway.audit.owed import RECOVERED, Owed, changes_since, owed_since, write_unrecorded
from gateway.delivery import inbox
from gateway.errors import ClaimHeldError, MedgwError
from gateway.inbound.exactly_once import InboxDelivery
from gateway.inbound.locks import InboundLocks
from gateway.logs import Logger
from gateway.spool import HandoverRecord, InboundRecord, Spool
from gateway.spool.records import RETRIED_BY, DisplacedOwed


def recover(
    delivery: InboxDelivery,
    spool: Spool,
    log: Logger,
    inbox_dir: Path,
    unrecorded_before: float,
) -> None:
    """At start, before any request: settle every delivery this node's stopped process
    left in the middle (and those of nodes whose claim ran out), so that none is
    written twice and each is audited once; then remove the work files no delivery
    needs: this node's own at once (it has none in progress yet), another node's once
    made before ``unrecorded_before`` (seconds since the epoch)."""
    for record in spool.inbound_unfinished():
        _settle(delivery, record, log)
    # This node's own, made before a kill between creating and recording (or between
    # forgetting and removing) it, goes now, however young: nothing else would remove it.
    remove_unrecorded(spool, log, inbox_dir, unrecorded_before, own=spool.node)


def record_cut_off(
    spool: Spool, audit: AuditSink, trail: Path, log: Logger, since: datetime | None = None
) -> None:
    """At start, before anything writes to ``trail``: write the records a kill cut off
    from changes of received messages this node committed (a receipt stored:
    ``receipt.sent``; a hand-over done, failed for good, or retried by an operator:
    ``message.handed_over``, ``message.handover_failed``,
    ``message.handover_retried``), each once, marked as written at recovery; those
    of changes made ``since`` (None: since the trail's end, see changes_since)."""
    since = changes_since(trail) if since is None else since
    after = since.astimezone(UTC).isoformat()
    # And the rows as this node's changes left them, whose records another node's later
    # change displaced (see Spool.displaced_owed).
    found = spool.displaced_owed()
    displaced = DisplacedOwed(inbound=found.inbound, handover=found.handover)
    changed: list[InboundRecord | HandoverRecord] = [
        *spool.inbound_changed_since(after),
        *spool.handover_changed_since(after),
        *owed_since(displaced.inbound, since),
        *owed_since(displaced.handover, since),
    ]
    wanted: dict[Owed, Callable[[], AuditEvent]] = {}
    for row in changed:
        if row.audit_owed is None or row.audit_owed_at is None:
            continue
        owed = Owed(
            frozenset({row.audit_owed}),
            row.message_id,
            datetime.fromisoformat(row.audit_owed_at),
            peer=row.peer,
        )
        wanted[owed] = partial(_cut_off_event, row, EventType(row.audit_owed))
    write_unrecorded(trail, list(wanted.items()), audit, log)
    spool.forget_displaced(displaced)  # in the trail now, or from before `since`


def _cut_off_event(row: InboundRecord | HandoverRecord, kind: EventType) -> AuditEvent:
    """The record ``kind`` that ``row``'s last audited change owes, as far as the row
    tells it."""
    if isinstance(row, InboundRecord):
        # As the pipeline writes it once the receipt is stored (always "processed").
        return AuditEvent(
            kind,
            peer=row.peer,
            message_id=row.message_id,
            direction="inbound",
            service=row.service,
            reason=f"receipt stored; {RECOVERED} (its MIC is not known here)",
            detail={
                "disposition": "processed",
                "inbox_file": str(row.target_path),
                "recorded_at_recovery": True,
            },
        )
    note = row.last_error or ""
    if kind is EventType.HANDOVER_RETRIED:
        # As operations.py writes it, but for the state before (not known here).
        return AuditEvent(
            kind,
            severity=Severity.WARNING,
            peer=row.peer,
            message_id=row.message_id,
            direction="inbound",
            service=row.service,
            actor=note.removeprefix(RETRIED_BY[0]) if note.startswith(RETRIED_BY[0]) else None,
            reason=RECOVERED,
            detail={"recorded_at_recovery": True},
        )
    # As delivery/http.py writes them: handed over, or an alert that it never will be.
    done = kind is EventType.MESSAGE_HANDED_OVER
    return AuditEvent(
        kind,
        Outcome.SUCCESS if done else Outcome.FAILURE,
        Severity.INFO if done else Severity.ALERT,
        peer=row.peer,
        message_id=row.message_id,
        direction="inbound",
        service=row.service,
        actor="medgw" if done else None,
        reason=(
            f"{RECOVERED} (the URL, the answer and the patients are not known here)"
            if done
            else f"{note}; not retried; {RECOVERED}"
        ),
        detail={
            "attempt": row.attempts,
            "size": row.size,
            "sha256": row.sha256,
            **({} if done else {"final": True, "inbox_file": str(row.path)}),
            "recorded_at_recovery": True,
        },
    )


def remove_unrecorded(
    spool: Spool,
    log: Logger,
    inbox_dir: Path,
    unrecorded_before: float,
    *,
    own: str | None = None,
) -> None:
    """Remove the work files in the inbox that no delivery in the middle names, made
    before ``unrecorded_before`` (seconds since the epoch) or, given ``own``, by that
    node.  At start (``own``: this node), and while running, once a lease: a node that
    died and never comes back leaves its own there (worker thread)."""
    # The inbox may be shared with other nodes: their deliveries in the middle keep
    # their work files, and so does one another node just created, not yet recorded.
    keep = {r.work_path for r in spool.inbound_in_progress() if r.work_path}
    for path in inbox.remove_stale_work_files(
        inbox_dir, keep, older_than=unrecorded_before, own=own
    ):
        log.info("recovery.removed_work_file", folder=path.parent.name)


def take_over(delivery: InboxDelivery, spool: Spool, log: Logger, locks: InboundLocks) -> int:
    """While running: settle the deliveries other nodes left in the middle whose claims
    ran out (each under its request lock: a resend arriving here waits); how many."""
    taken = spool.inbound_take_over()
    for record in taken:
        with locks.exclusive((record.peer, record.message_id)):
            # A resend may have settled it meanwhile (read again, under the lock).
            try:
                current = spool.inbound_take(record.peer, record.message_id)
            except ClaimHeldError:
                continue
            if current is not None:
                _settle(delivery, replace(current, node=record.node), log)
    return len(taken)


def _settle(delivery: InboxDelivery, record: InboundRecord, log: Logger) -> None:
    """Settle one delivery left in the middle, claimed by this node."""
    try:
        settled = delivery.settle(record)
    except (OSError, MedgwError) as exc:  # left as it is: a resend settles it
        log.error(
            "recovery.inbound_failed",
            peer=record.peer,
            message_id=record.message_id,
            error=str(exc),
            fix=f"check {record.target_path.parent} and the disk under it",
        )
        return
    log.info(
        "recovery.inbound_settled",
        peer=record.peer,
        message_id=record.message_id,
        in_inbox=settled is not None,
        held_by=record.node,
    )
