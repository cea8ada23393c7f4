"""Recovery at start, after a crash: the deliveries a stopped process left unfinished."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from gateway.delivery import inbox
from gateway.errors import ClaimHeldError, MedgwError
from gateway.inbound.exactly_once import InboxDelivery
from gateway.inbound.locks import InboundLocks
from gateway.logs import Logger
from gateway.spool import InboundRecord, Spool


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
