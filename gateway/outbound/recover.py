"""Recovery at start-up: finish whatever a killed process left half-done, so that a
document taken in is never lost and never sent twice as two messages."""

from __future__ import annotations

import asyncio
import re
from datetime import UTC, datetime
from functools import partial
from pathlib import Path

from gateway.atrest import storing
from gateway.atrest.chunked import CHUNK
from gateway.audit import AuditEvent, EventType, Outcome, Severity
from gateway.audit.owed import RECOVERED, Owed, changes_since, owed_since, write_unrecorded
from gateway.fsutil import file_identity, fsync_dir, remove_partials_of, remove_stale_partials
from gateway.outbound.context import Context
from gateway.outbound.intake import move_into_spool
from gateway.outbound.seal import Sealer, open_document, recovered_accepted
from gateway.outbound.sweep import (
    intakes_of_copies,
    remove_sent_elsewhere,
    remove_spent_copies_of_others,
    remove_unrecorded_payloads,
    remove_unrecorded_receipts,
)
from gateway.spool import OutboundRecord, OutboundState
from gateway.spool.records import (
    CANCELLED_BY,
    RETRIED_BY,
    TAKEN_OVER,
    DisplacedOwed,
    payload_item,
)

SHARED_PARTIAL_SECONDS = 24 * 3600.0
COMMAND_PARTIAL_SECONDS = 3600.0
# Intakes asked about, and claimed, in one transaction when taken back (Recovery.take_back).
TAKE_BACK_BATCH = 16
# Why a message still in intake was taken over (its row keeps no note of it).
INTAKE_TAKEN_OVER = (
    "taken over: the claim of the node that had taken it in, and not yet signed and "
    "encrypted it, ran out"
)
# The records a settlement by receipt writes, by the state it leaves (see settle.py).
_SETTLED = {
    OutboundState.DELIVERED: frozenset({EventType.RECEIPT_RECEIVED.value}),
    OutboundState.FAILED: frozenset(
        {EventType.MESSAGE_FAILED.value, EventType.RECEIPT_INVALID.value}
    ),
}
# The record of a message given up without a receipt, by the state it leaves: failed at
# its preparation (seal.py, and _fail below), expired or dead (send.py), cancelled by an
# operator (operations.py).
_GIVEN_UP = {
    OutboundState.FAILED: EventType.MESSAGE_FAILED,
    OutboundState.EXPIRED: EventType.MESSAGE_EXPIRED,
    OutboundState.DEAD: EventType.MESSAGE_DEAD,
    OutboundState.CANCELLED: EventType.MESSAGE_CANCELLED,
}


def _retried(record: OutboundRecord) -> bool:
    """Whether an operator's retry is the last change of ``record`` that has a record: it
    went back to the queue, or back to intake to be prepared again (once prepared, its
    last record is the ``message.accepted`` of that)."""
    note = record.last_error or ""
    if record.state is OutboundState.INTAKE:
        return note.startswith(RETRIED_BY[1])
    return record.state in (OutboundState.QUEUED, OutboundState.SENDING) and note.startswith(
        RETRIED_BY[0]
    )


def _taken_over(record: OutboundRecord) -> bool:
    """Whether its last change that has a record is its take-over from another node whose
    claim ran out (queued again; perhaps claimed since, not yet sent)."""
    return (
        record.state in (OutboundState.QUEUED, OutboundState.SENDING)
        and record.last_error == TAKEN_OVER
    )


def _is_source_file(record: OutboundRecord) -> bool:
    """Whether the file at ``record``'s source path is the one it was taken from (one
    taken before that was recorded: whether there is one).  Another node's outbox may be
    out of reach here, and this node's own may have a file of that name."""
    try:
        status = record.source_path.stat(follow_symlinks=False)
    except FileNotFoundError:
        return False
    return record.source_file in (None, file_identity(status))


class Recovery:
    """The spool and its folders made whole again after a crash or SIGKILL."""

    def __init__(self, context: Context, sealer: Sealer) -> None:
        self._ctx = context
        self._sealer = sealer

    async def recover(self, since: datetime | None = None) -> None:
        """Finish what a previous run left half-done (after a crash or SIGKILL); the
        records a kill cut off from changes made ``since`` (None: since the trail's
        end, see changes_since) are written."""
        # First, before anything changes the spool or writes to the trail.
        await self._ctx.in_thread(self._record_cut_off, since)
        config = self._ctx.config
        shared = config.cluster.bodies_dir is not None
        # The node's own copies: with a shared bodies folder, its folder there, and the
        # state folder's, where they were kept before (a kill there left copies too).
        own = [self._ctx.payloads]
        if shared and (old := config.storage.state_dir / "payloads").is_dir():
            own.append(old)
        for folder in (
            config.storage.inbox_dir,
            self._ctx.outgoing,
            self._ctx.receipts,
            *own,
        ):
            # In folders the nodes share (the inbox may be, the bodies folder and the
            # copies of documents in it are), a partial file may be another node's write
            # in progress: only those older than a day are left-overs.
            older = (
                self._ctx.clock.now().timestamp() - SHARED_PARTIAL_SECONDS
                if shared
                and folder in (config.storage.inbox_dir, self._ctx.outgoing, self._ctx.payloads)
                else None
            )
            for path in remove_stale_partials(folder, older_than=older):
                self._ctx.log.info("recovery.removed_partial_file", folder=path.parent.name)
        if shared:
            # Except the bodies this node was writing when it was killed: their names say
            # whose they are, only this node writes them, and none of its writes runs yet.
            # (A message another node has taken over since is never prepared here again,
            # so they are not removed then.)
            for path in remove_own_body_partials(self._ctx.outgoing, config.cluster.node_name):
                self._ctx.log.info("recovery.removed_partial_file", folder=path.parent.name)
        # The state folder itself (the emergency window, the break-glass credential) and
        # the CRL cache: a `medgw` command of this node may be writing there as it
        # starts, so only those an hour old.
        state = config.storage.state_dir
        an_hour_ago = self._ctx.clock.now().timestamp() - COMMAND_PARTIAL_SECONDS
        for folder, recursive in ((state, False), (state / "crls", True)):
            for path in remove_stale_partials(folder, older_than=an_hour_ago, recursive=recursive):
                self._ctx.log.info("recovery.removed_partial_file", folder=path.parent.name)
        # Files no row names (see sweep.py): no writer runs yet, so every one is a
        # left-over, whatever its age.
        ctx = self._ctx
        for folder in own:
            await ctx.in_thread(remove_unrecorded_payloads, ctx.spool, ctx.log, folder)
        if ctx.shared_payloads is not None:
            await ctx.in_thread(
                remove_spent_copies_of_others, ctx.spool, ctx.log, ctx.shared_payloads, ctx.payloads
            )
        await ctx.in_thread(remove_unrecorded_receipts, ctx.spool, ctx.log, ctx.receipts)
        for message_id in self._ctx.spool.requeue_interrupted():
            self._ctx.log.info("message.requeued_after_restart", message_id=message_id)
        # Claimed here (two nodes starting at once never both prepare one), and renewed
        # while this goes on: the lease keeper starts after it.
        lease = config.cluster.lease_seconds
        renewed_at = self._ctx.clock.monotonic()
        for record in self._ctx.spool.intake_interrupted():
            if self._ctx.clock.monotonic() - renewed_at >= lease / 3:
                self._ctx.spool.renew_leases()
                renewed_at = self._ctx.clock.monotonic()
            await self._finish(record)
        # Then the documents left in the outbox that another node took over and sent; and
        # those of intakes another node holds (in the outbox, or copied into this node's
        # folders), to be taken up when they come back.
        waiting = await ctx.in_thread(
            remove_sent_elsewhere, ctx.spool, ctx.log, config.storage.outbox_dir
        )
        for folder in own:
            waiting += await ctx.in_thread(intakes_of_copies, ctx.spool, folder)
        ctx.waiting_intakes = {record.message_id: record for record in waiting}
        for record in ctx.waiting_intakes.values():
            ctx.log.warning(
                "recovery.intake_held_elsewhere",
                peer=record.peer,
                message_id=record.message_id,
                node=record.node,
            )

    def _record_cut_off(self, since: datetime | None) -> None:
        """Write the audit records a kill cut off (worker thread): every change of an
        outbound message an audit record follows is committed before its record is
        written.  Only the rows changed since the trail's last record whose step this
        node made are looked at (the spool keeps which node queued a message and which
        made its last such change: their records belong in its trail, whichever node
        holds the message now), and the trail only as far back as they need; each step
        keeps exactly one record.

        The row names the record its last such change owes and when that change was
        made (``audit_owed``): it is owed unless the trail has it from then on.  A row
        last changed by a medgw from before that was kept tells it by its state and
        notes instead: a message queued (``message.accepted``), settled by its receipt
        (``receipt.received``, ``message.failed``), given up without one
        (``message.failed`` at its preparation, ``message.expired``, ``message.dead``,
        ``message.cancelled``), retried by an operator (``message.retried``) or taken
        over from another node (``message.taken_over``)."""
        trail = self._ctx.config.storage.audit_log
        if since is None:
            since = changes_since(trail, self._ctx.clock.now())
        spool = self._ctx.spool
        # And the rows as this node's changes left them, whose records another node's
        # later change displaced (see Spool.displaced_owed).
        displaced = DisplacedOwed(outbound=spool.displaced_owed().outbound)
        changed = [
            *spool.outbound_changed_since(since.astimezone(UTC).isoformat()),
            *owed_since(displaced.outbound, since),
        ]
        me = spool.node
        # (message, record to write) -> the row, and the record it owes.
        wanted: dict[tuple[str, EventType], tuple[OutboundRecord, Owed]] = {}

        def want(
            record: OutboundRecord,
            kind: EventType,
            at: datetime,
            kinds: frozenset[str] | None = None,
            *,
            exact: bool = False,
        ) -> None:
            owed = Owed(kinds or frozenset({kind.value}), record.message_id, at, exact=exact)
            wanted.setdefault((record.message_id, kind), (record, owed))

        for record in changed:
            created = datetime.fromisoformat(record.created_at)
            if record.audit_owed is not None and record.audit_owed_at is not None:
                if record.audited_by == me:
                    owed_at = datetime.fromisoformat(record.audit_owed_at)
                    want(record, EventType(record.audit_owed), owed_at, exact=True)
                if record.queued_by == me and created >= since:
                    # Queued here, its last change made by another node since.
                    want(record, EventType.MESSAGE_ACCEPTED, created)
                continue
            updated = datetime.fromisoformat(record.updated_at)
            first = record.attempts <= (record.state is OutboundState.SENDING)
            kept = record.queued_by is not None or record.audited_by is not None
            if (record.queued_by == me and created >= since) or (
                not kept
                and record.state in (OutboundState.QUEUED, OutboundState.SENDING)
                and first
                and not _retried(record)
            ):
                # Queued here since the trail's last record, whichever node sends it now
                # (a row from before that was kept: queued, not yet sent, or in its first
                # sending): its record was written after it was taken in.
                want(record, EventType.MESSAGE_ACCEPTED, created)
            if record.audited_by not in (None, me):
                continue  # its last step is in another node's trail
            if _retried(record) and first:
                # An operator's retry: its record was written after it.
                want(record, EventType.MESSAGE_RETRIED, updated)
            elif _taken_over(record):
                # Another node's send queued again here: recorded after it.
                want(record, EventType.MESSAGE_TAKEN_OVER, updated)
            elif record.state in _SETTLED and record.has_receipt:
                delivered = record.state is OutboundState.DELIVERED
                kind = EventType.RECEIPT_RECEIVED if delivered else EventType.MESSAGE_FAILED
                want(record, kind, updated, _SETTLED[record.state])
            elif record.state in _GIVEN_UP:
                want(record, _GIVEN_UP[record.state], updated)
        to_write = [
            (owed, partial(self._cut_off_event, record, kind))
            for (_, kind), (record, owed) in wanted.items()
        ]
        write_unrecorded(trail, to_write, self._ctx.audit, self._ctx.log)
        spool.forget_displaced(displaced)  # in the trail now, or from before `since`

    def _cut_off_event(self, record: OutboundRecord, kind: EventType) -> AuditEvent:
        """The record ``kind`` of ``record``'s step (its queueing, or its last step), as
        far as its row tells it."""
        note = record.last_error or ""
        if kind is EventType.MESSAGE_ACCEPTED:
            return self._accepted_event(record)
        if kind is EventType.MESSAGE_TAKEN_OVER:
            # As the lease keeper writes it, but for the node it came from (not known here).
            if record.state is OutboundState.INTAKE:
                note = INTAKE_TAKEN_OVER
            return AuditEvent(
                EventType.MESSAGE_TAKEN_OVER,
                severity=Severity.WARNING,
                peer=record.peer,
                message_id=record.message_id,
                direction="outbound",
                service=record.service,
                reason=f"{note}; {RECOVERED}",
                detail={"attempts": record.attempts, "recorded_at_recovery": True},
            )
        if kind in (EventType.MESSAGE_CANCELLED, EventType.MESSAGE_RETRIED):
            # As operations.py writes them, but for the state before (not known here).
            operator = [p for p in (CANCELLED_BY, *RETRIED_BY) if note.startswith(p)]
            return AuditEvent(
                kind,
                severity=Severity.WARNING,
                peer=record.peer,
                message_id=record.message_id,
                direction="outbound",
                actor=note.removeprefix(operator[0]) if operator else None,
                reason=f"{note or record.state.value}; {RECOVERED}",
                detail={"recorded_at_recovery": True},
            )
        if kind is EventType.MESSAGE_SEND_FAILED:
            # As send.py writes it, but without the back-off chosen (not kept).
            return self._ctx.event(
                kind,
                peer=record.peer,
                message_id=record.message_id,
                outcome=Outcome.FAILURE,
                severity=Severity.WARNING,
                reason=f"{note}; {RECOVERED}",
                detail={"attempts": record.attempts, "recorded_at_recovery": True},
            )
        # As settle.py, seal.py and send.py write them: receipt.received, or an alert.
        delivered = kind is EventType.RECEIPT_RECEIVED
        settled = record.state in _SETTLED and record.has_receipt
        why = "settled by its receipt" if delivered else record.last_error or record.state.value
        return self._ctx.event(
            kind,
            peer=record.peer,
            message_id=record.message_id,
            outcome=Outcome.SUCCESS if delivered else Outcome.FAILURE,
            severity=Severity.INFO if delivered else Severity.ALERT,
            service=record.service,
            reason=f"{why}; {RECOVERED}",
            detail={
                "disposition": record.disposition,
                **(_receipt_detail(record) if settled else {}),
                **({} if delivered else {"attempts": record.attempts}),
                "recorded_at_recovery": True,
            },
        )

    def _accepted_event(self, record: OutboundRecord) -> AuditEvent:
        return recovered_accepted(record, self._ctx.spool.submitter(record.message_id))

    async def take_over(self, taken: list[OutboundRecord]) -> None:
        """While running: prepare the documents other nodes had taken in, and left
        unprepared when their claims ran out, claimed here (Spool.intake_take_over)."""
        for record in taken:
            await self._finish(record)

    async def take_back(self) -> int:
        """While running: the interrupted intakes whose documents are in this node's
        outbox, found at its start under another node's claim (Context.waiting_intakes),
        claimed here once that claim is no longer live (the other node, which cannot
        reach them, gave them back; or its lease ran out) and prepared under their own
        Message-IDs; those no longer in intake (prepared, failed or cancelled elsewhere)
        are forgotten, their files left to the intake.  Returns how many it prepared."""
        ctx = self._ctx
        prepared = 0
        waiting = sorted(ctx.waiting_intakes)
        for start in range(0, len(waiting), TAKE_BACK_BATCH):
            asked = waiting[start : start + TAKE_BACK_BATCH]
            claimed = await ctx.in_thread(ctx.spool.intake_reclaim, asked)
            done = set()
            for record in claimed:
                ctx.log.info(
                    "recovery.intake_taken_back",
                    peer=record.peer,
                    message_id=record.message_id,
                    from_node=record.node,
                )
                await self._finish(record, taken_in_here=True)
                done.add(record.message_id)
                prepared += 1
            for message_id in set(asked) - done:
                current = await ctx.in_thread(ctx.spool.get, message_id)
                if current is None or current.state is not OutboundState.INTAKE:
                    done.add(message_id)
            ctx.waiting_intakes = {m: r for m, r in ctx.waiting_intakes.items() if m not in done}
        return prepared

    async def _finish(self, record: OutboundRecord, *, taken_in_here: bool = False) -> None:
        """Prepare an interrupted intake this node claimed, or give it back, or fail it
        saying why.  ``taken_in_here``: its document was found in this node's outbox (see
        take_back): never given back."""
        peer = self._ctx.config.peer(record.peer)
        owner = None if taken_in_here else self._taken_in_by(record)
        if owner is not None and not record.has_document and not _is_source_file(record):
            # Taken in by another node that stopped: its document is in that node's
            # state folder (or, its copy not finished, still in that node's outbox, out of
            # reach here: a file of that name here is another); given back to it, it
            # prepares it when it starts again (or, started meanwhile, once given back).
            await self._ctx.in_thread(self._ctx.spool.intake_release, record.message_id, owner)
            return
        # Prepared here from now on.  A kill while its body (or its document's copy) was
        # being written left that write's partial file.  In a bodies folder the nodes
        # share, partial files are otherwise left for a day (they may be another node's
        # write in progress); these are known: only the node that claims the message
        # writes its body and its copy.
        for written in (self._ctx.body_path(record), record.payload_path):
            for path in await asyncio.to_thread(remove_partials_of, written):
                self._ctx.log.info(
                    "recovery.removed_partial_file",
                    folder=path.parent.name,
                    message_id=record.message_id,
                )
        if record.has_document and peer is not None:
            source = record.source_path
            if (
                source != record.payload_path
                and _is_source_file(record)
                and await asyncio.to_thread(self._same_document, record)
            ):
                # Killed after copying the document into the spool (its file, or its
                # row for a small one), before removing it from the outbox (the copy
                # is complete: written atomically, or committed with the row). Remove
                # it, or the next scan sends it again.
                # (A different document dropped since under the same name stays.)
                source.unlink()
                fsync_dir(source.parent)
            submitter = await self._ctx.in_thread(self._ctx.spool.submitter, record.message_id)
            await self._sealer.prepare(record, peer, submitted_by=submitter)
        elif peer is not None and _is_source_file(record):
            if not await asyncio.to_thread(self._take_again, record):
                return  # another node took it over meanwhile: it prepares it
            submitter = await self._ctx.in_thread(self._ctx.spool.submitter, record.message_id)
            await self._sealer.prepare(record, peer, submitted_by=submitter)
        else:
            reason, fix = "peer no longer configured", None
            if peer is not None:
                reason, fix = self._out_of_reach(record)
            await self._ctx.in_thread(self._fail, record, reason, fix)

    def _out_of_reach(self, record: OutboundRecord) -> tuple[str, str | None]:
        """Why an interrupted intake this node holds has no document here, and the fix.

        Nodes sharing the spool without a shared bodies folder each keep the copies of
        what they take in in their own state folder: one this node claimed (another
        node's, left when that node stopped) and did not give back before it was
        stopped itself is held here now under this node's name.  Which node took it in
        is not known here: this node's own intake (its file removed or replaced since)
        looks the same.  So the alert names both, and says the document may be lost."""
        config = self._ctx.config
        if config.spool.postgres is None or config.cluster.bodies_dir is not None:
            return "the document vanished between outbox and spool", None
        retry = f"medgw queue retry {record.message_id}"
        reason = (
            f"its document is neither in this node's ({self._ctx.spool.node}) state folder "
            "nor in its outbox, and which node took it in is not known here (the nodes "
            "share the spool without [cluster] bodies_dir: each keeps the copies of the "
            "documents it takes in in its own state folder). Either this node took it in "
            "and the file was removed or replaced in its outbox before its copy was "
            "written: then the document is lost here; or another node took it in and "
            "this node held its claim (a node claims at its start those another node "
            "left, to give them back): then its copy is in that node's state folder or, "
            "not finished, the file is still in that node's outbox"
        )
        fix = (
            "check every node that shares the spool: on one that took it in, a file "
            "still in its outbox is taken in again as a new message when it runs, and a "
            f"copy in its state folder is sent by `{retry}` on that node; if no node "
            "has it, the document is lost: have it sent again from its source. So that "
            "any node can prepare another's documents, set [cluster] bodies_dir on every "
            "node (a folder they all mount)"
        )
        return reason, fix

    def _taken_in_by(self, record: OutboundRecord) -> str | None:
        """The other node that took ``record``'s document in, as far as known here: the
        node that held it (one that stopped); or, for one this node holds, the node
        whose folder of the shared bodies folder its copy is in (this node claimed it
        at an earlier start and was killed before giving it back).  None: this node,
        or not known (its copy in a state folder)."""
        me = self._ctx.spool.node
        if record.node not in (None, me):
            return record.node
        folder = record.payload_path.parent
        shared = self._ctx.shared_payloads
        if record.node == me and shared is not None and folder.parent == shared:
            return folder.name if folder.name != me else None
        return None

    def _fail(self, record: OutboundRecord, reason: str, fix: str | None = None) -> None:
        """Mark an interrupted intake that cannot be prepared failed, and alert (worker
        thread: the spool and the audit record, each with its sync); unless another node
        prepared it meanwhile (its document is gone with that)."""
        if not self._ctx.spool.fail_intake(record.message_id, reason):
            return
        self._ctx.alert(
            EventType.MESSAGE_FAILED,
            peer=record.peer,
            message_id=record.message_id,
            reason=reason,
            detail={"fix": fix} if fix else None,
        )

    def _same_document(self, record: OutboundRecord) -> bool:
        """Whether the spool's copy of the document (encrypted at rest, or as it is) holds
        the bytes of the outbox file it was taken from."""
        with (
            record.source_path.open("rb") as source,
            open_document(self._ctx.vault, record) as copy,
        ):
            while True:
                mine = source.read(CHUNK)
                if mine != copy.read(len(mine) or 1):
                    return False
                if not mine:
                    return True

    def _take_again(self, record: OutboundRecord) -> bool:
        """Take the document of an interrupted intake into the spool, under a new key (into
        its file: a small one kept in its row never comes here, the row holds its copy);
        False if this node no longer holds the intake (another node took it over, and
        its key stays)."""
        with storing(self._ctx.vault, payload_item(record.message_id)) as sealing:
            sealing.begin()
            if not self._ctx.spool.intake_renew(record.message_id, sealing.key):
                self._ctx.log.warning(
                    "recovery.intake_taken_over",
                    peer=record.peer,
                    message_id=record.message_id,
                    node=self._ctx.spool.node,
                )
                return False
            move_into_spool(record.source_path, record.payload_path, self._ctx.folder_sync, sealing)
        return True


def remove_own_body_partials(bodies: Path, node: str) -> list[Path]:
    """Delete the partial files (fsutil.partial_name) of the bodies ``node`` writes into
    the shared ``bodies`` folder (Context.body_path: ``<24 hex>.<node>.as2``), whatever
    their age: for ``node``'s own start, when none of its writes is in progress."""
    pattern = re.compile(rf"\.[0-9a-f]{{24}}\.{re.escape(node)}\.as2\.[0-9a-f]{{12}}\.partial")
    removed = []
    for path in bodies.glob(".*.partial"):
        if pattern.fullmatch(path.name) and path.is_file():
            path.unlink(missing_ok=True)
            removed.append(path)
    return removed


def _receipt_detail(record: OutboundRecord) -> dict[str, str]:
    """Where a settled message's receipt is kept, as settle.py's records name it: its
    file or its row, and the receipt's SHA-256 (which ties the record to the bytes; not
    recorded of a file settled before it was kept)."""
    sha256 = {"receipt_sha256": record.receipt_sha256} if record.receipt_sha256 else {}
    if record.receipt_path is not None:
        return {"receipt_file": str(record.receipt_path), **sha256}
    return {"receipt": "spool", **sha256}
