"""Recovery at start, after a crash: the deliveries a stopped process left unfinished."""

from __future__ import annotations

from pathlib import Path

from gateway.delivery import inbox
from gateway.errors import MedgwError
from gateway.inbound.exactly_once import InboxDelivery
from gateway.logs import Logger
from gateway.spool import Spool


def recover(delivery: InboxDelivery, spool: Spool, log: Logger, inbox_dir: Path) -> None:
    """At start, before any request: settle every delivery a stopped process left in
    the middle, so that none is written twice and each is audited once; then remove
    the work files no unfinished delivery needs."""
    for record in spool.inbound_unfinished():
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
            continue
        log.info(
            "recovery.inbound_settled",
            peer=record.peer,
            message_id=record.message_id,
            in_inbox=settled is not None,
        )
    keep = {r.work_path for r in spool.inbound_unfinished() if r.work_path}
    for path in inbox.remove_stale_work_files(inbox_dir, keep):
        log.info("recovery.removed_work_file", folder=path.parent.name)
