"""Recovery at start-up: finish whatever a killed process left half-done, so that a
document taken in is never lost and never sent twice as two messages."""

from __future__ import annotations

import asyncio

from gateway.atrest import storing
from gateway.atrest.chunked import CHUNK
from gateway.audit import EventType
from gateway.fsutil import fsync_dir, remove_stale_partials
from gateway.outbound.context import Context
from gateway.outbound.intake import move_into_spool
from gateway.outbound.seal import Sealer, open_document
from gateway.spool import OutboundRecord
from gateway.spool.records import payload_item

SHARED_PARTIAL_SECONDS = 24 * 3600.0


class Recovery:
    """The spool and its folders made whole again after a crash or SIGKILL."""

    def __init__(self, context: Context, sealer: Sealer) -> None:
        self._ctx = context
        self._sealer = sealer

    async def recover(self) -> None:
        """Finish what a previous run left half-done (after a crash or SIGKILL)."""
        config = self._ctx.config
        shared = config.cluster.bodies_dir is not None
        for folder in (
            config.storage.inbox_dir,
            self._ctx.outgoing,
            self._ctx.receipts,
            self._ctx.payloads,
        ):
            # In folders the nodes share (the inbox may be, the bodies folder is), a
            # partial file may be another node's write in progress: only those older than
            # a day are left-overs.
            older = (
                self._ctx.clock.now().timestamp() - SHARED_PARTIAL_SECONDS
                if shared and folder in (config.storage.inbox_dir, self._ctx.outgoing)
                else None
            )
            for path in remove_stale_partials(folder, older_than=older):
                self._ctx.log.info("recovery.removed_partial_file", folder=path.parent.name)
        known = self._ctx.spool.payload_names()  # name -> whether the plaintext is needed
        for path in self._ctx.payloads.iterdir():
            if path.name.startswith(".") or not path.is_file():
                continue
            if path.name not in known:
                # Killed between spooling a submitted body and recording it: the submitter
                # got no Message-ID and submits again.
                path.unlink(missing_ok=True)
                self._ctx.log.info("recovery.removed_unrecorded_submission", file=path.name)
            elif not known[path.name]:
                # Killed between "queued" and removing the plaintext copy (the message
                # may have moved on since): only the encrypted form stays at rest.
                path.unlink(missing_ok=True)
                self._ctx.log.info("recovery.removed_plaintext_copy", file=path.name)
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

    async def take_over(self, taken: list[OutboundRecord]) -> None:
        """While running: prepare the documents other nodes had taken in, and left
        unprepared when their claims ran out, claimed here (Spool.intake_take_over)."""
        for record in taken:
            await self._finish(record)

    async def _finish(self, record: OutboundRecord) -> None:
        """Prepare an interrupted intake this node claimed, or give it back, or fail it
        saying why."""
        peer = self._ctx.config.peer(record.peer)
        if (
            record.node not in (None, self._ctx.spool.node)
            and not record.has_document
            and not record.source_path.exists()
        ):
            # Taken in by another node that stopped: its document is in that node's
            # state folder; given back to it, it prepares it when it starts again.
            await self._ctx.in_thread(
                self._ctx.spool.intake_release, record.message_id, record.node
            )
            return
        if record.has_document and peer is not None:
            source = record.source_path
            if (
                source != record.payload_path
                and source.exists()
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
        elif record.source_path.exists() and peer is not None:
            if not await asyncio.to_thread(self._take_again, record):
                return  # another node took it over meanwhile: it prepares it
            submitter = await self._ctx.in_thread(self._ctx.spool.submitter, record.message_id)
            await self._sealer.prepare(record, peer, submitted_by=submitter)
        else:
            reason = (
                "peer no longer configured"
                if peer is None
                else "the document vanished between outbox and spool"
            )
            await self._ctx.in_thread(self._fail, record, reason)

    def _fail(self, record: OutboundRecord, reason: str) -> None:
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
