"""Taking documents from the outbox folder into the spool, each in three committed steps
(an ``intake`` row, the file moved into the spool, then sealed and queued): a document
taken from the outbox is never lost and never sent twice as two messages."""

from __future__ import annotations

import asyncio
import errno
import os
from pathlib import Path

from gateway.as2.headers import new_message_id
from gateway.atrest import Sealing, storing
from gateway.config import Peer
from gateway.errors import MedgwError, SpoolError
from gateway.fsutil import FolderSync, read_chunks, storage_fix, write_atomic
from gateway.intake.outbox import Candidate, scan
from gateway.intake.submit import account_name
from gateway.outbound.context import Context
from gateway.outbound.seal import INLINE_BODY_BYTES, Sealer
from gateway.routing import LOCAL_INTAKE
from gateway.spool import OutboundRecord
from gateway.spool.records import payload_item

INTAKE_PARALLELISM = 8


class OutboxIntake:
    """The outbox folder's documents, taken into the spool and handed to the sealer."""

    def __init__(self, context: Context, sealer: Sealer) -> None:
        self._ctx = context
        self._sealer = sealer
        self._reported_unknown: set[str] = set()
        self._reported_unknown_services: set[tuple[str, str]] = set()
        self._reported_skipped: set[Path] = set()
        # Rows of takes that failed and whose removal failed too (the spool's disk full):
        # removed before any document is taken again, see intake_once.
        self._unabandoned: set[str] = set()
        # Documents taken into the spool whose signing and queueing stopped half-way (the
        # spool did not answer): prepared again at the next scan, not only at a restart.
        self._unsealed: set[str] = set()

    async def intake_once(self) -> int:
        if self._unabandoned:
            await self._ctx.in_thread(self._abandon_failed_takes)
        for message_id in sorted(self._unsealed):
            await self._sealer.prepare_again(message_id)  # raises while it still cannot
            self._unsealed.discard(message_id)
        peers = {p.name: p.services for p in self._ctx.config.peers}
        result = scan(self._ctx.config.storage.outbox_dir, peers)
        for peer_name, folder in result.unknown_services:
            if (peer_name, folder) not in self._reported_unknown_services:
                self._reported_unknown_services.add((peer_name, folder))
                services = ", ".join(peers[peer_name]) or "none"
                self._ctx.log.warning(
                    "outbox.unknown_service_folder",
                    peer=peer_name,
                    folder=folder,
                    services=services,
                    fix=f"its files are not sent: add {folder!r} to `services` in "
                    f"peers.d/{peer_name}.toml (as agreed with the peer), or move them into "
                    f"outbox/{peer_name}/ or one of its service folders ({services})",
                )
        for folder in result.unknown_folders:
            if folder not in self._reported_unknown:
                self._reported_unknown.add(folder)
                self._ctx.log.warning(
                    "outbox.unknown_peer_folder",
                    folder=folder,
                    fix="create peers.d/<name>.toml or remove the folder",
                )
        for bad in result.bad_names:
            if bad in self._reported_skipped:
                continue
            self._reported_skipped.add(bad)
            # The folder only: the name cannot be written as text, and may identify a patient.
            self._ctx.log.warning(
                "outbox.bad_file_name",
                folder=bad.parent.name,
                fix="a file there has a name that is not UTF-8 (a Windows share writing "
                "Shift_JIS, say); it is not sent until it is renamed to a UTF-8 name "
                "(for example: convmv -f shift_jis -t utf-8 --notest FILE)",
            )
        for skipped in result.skipped:
            if skipped in self._reported_skipped:
                continue
            self._reported_skipped.add(skipped)
            # The folder, not the file name: names can carry patient identifiers.
            self._ctx.log.warning(
                "outbox.not_a_regular_file",
                folder=skipped.parent.name,
                fix="rename regular files into the outbox; links and folders are not sent",
            )
        # Several documents are taken at once: each take is mostly fsync and
        # crypto in worker threads, so they overlap well.
        limit = asyncio.Semaphore(INTAKE_PARALLELISM)

        async def take(candidate: Candidate) -> None:
            async with limit:
                await self._take(candidate)

        # Every take finishes before this returns, even when one fails: the next scan
        # must not start a second take of a file this one is still moving.
        outcomes = await asyncio.gather(
            *(take(c) for c in result.candidates), return_exceptions=True
        )
        for outcome in outcomes:
            if isinstance(outcome, BaseException):
                raise outcome
        return len(result.candidates)

    def _abandon_failed_takes(self) -> None:
        """Remove the rows of earlier takes that could not be removed when they failed.
        Raises SpoolError while one stays: no document is taken again (under a new
        Message-ID) beside the row of a failed take, which a restart would act on."""
        for message_id in sorted(self._unabandoned):
            self._ctx.spool.abandon_intake(message_id)
            self._unabandoned.discard(message_id)

    async def _take(self, candidate: Candidate) -> None:

        def take_and_seal() -> str | None:
            taken = self._take_into_spool(candidate)
            if taken is None:
                return None
            record, peer, submitter = taken
            try:
                sealed = self._sealer.seal_and_queue(record, peer, submitter)
            except (MedgwError, OSError):
                self._unsealed.add(record.message_id)
                raise
            return peer.name if sealed else None

        queued_for = await self._ctx.in_thread(take_and_seal)  # one trip to a worker thread
        if queued_for is not None:
            self._ctx.wake(queued_for)

    def _take_into_spool(self, candidate: Candidate) -> tuple[OutboundRecord, Peer, str] | None:
        """Record the document and move it from the outbox into the spool (worker thread);
        None if its peer was removed (by a reload) since the scan: it stays in the outbox,
        and the next scan reports the folder as one without a peer.  The submitter
        recorded is the file's owner, the account that wrote it into the outbox."""
        peer = self._ctx.config.peer(candidate.peer)
        if peer is None:
            return None
        try:
            status = candidate.path.lstat()
        except FileNotFoundError:
            return None  # taken away since the scan
        owner = status.st_uid
        submitter = f"outbox:{account_name(owner)} (uid {owner})"
        message_id = new_message_id(self._ctx.config.as2_id)
        token = os.urandom(12).hex()
        payload_path = self._ctx.payloads / token
        with storing(self._ctx.vault, payload_item(message_id)) as sealing:
            sealing.begin()  # its key is stored with the row, before the copy is written
            # A small document's copy is kept in its row, committed with it: no file, no
            # fsync of its own (None: too large, or it grew since; stored as a file).
            kept = (
                _small_copy(candidate.path, sealing)
                if sealing.encrypting and status.st_size <= INLINE_BODY_BYTES
                else None
            )
            # Its row is removed before the next take unless it is known to be recorded:
            # a commit whose outcome is unknown (the spool's connection lost) may have
            # recorded it, and this document, still in the outbox, would be taken twice.
            self._unabandoned.add(message_id)
            self._ctx.spool.add_intake(
                message_id,
                peer.name,
                candidate.path.name,
                candidate.content_type,
                candidate.path,
                payload_path,
                expires_at=self._ctx.clock.now().timestamp()
                + self._ctx.config.runtime.message_expiry_seconds,
                zone=peer.zone,
                origin=LOCAL_INTAKE,
                submitted_by=submitter,
                service=candidate.service,
                data_key=sealing.key,
                payload=kept,
            )
            self._unabandoned.discard(message_id)
            try:
                if kept is None:
                    move_into_spool(candidate.path, payload_path, self._ctx.folder_sync, sealing)
                else:
                    _remove_from_outbox(candidate.path, self._ctx.folder_sync)
            except OSError as exc:
                if candidate.path.exists():
                    # Still in the outbox (say the spool's disk is full): a later scan takes
                    # it again. The row must not outlive this try, or a restart would take a
                    # new document of the same name for this message as well.
                    payload_path.unlink(missing_ok=True)
                    try:
                        self._ctx.spool.abandon_intake(message_id)
                    except SpoolError:
                        self._unabandoned.add(message_id)  # removed before the next take
                # The folder, not the file name: names can carry patient identifiers.
                raise SpoolError(
                    f"cannot move a document from outbox/{candidate.peer} into the spool "
                    f"({self._ctx.payloads}): {exc.strerror or exc}",
                    fix=storage_fix(exc, self._ctx.payloads),
                ) from exc
        try:
            record = self._ctx.spool.get(message_id)
        except SpoolError:
            self._unsealed.add(message_id)  # taken, not yet prepared
            raise
        assert record is not None
        return record, peer, submitter


def _small_copy(source: Path, sealing: Sealing) -> bytes | None:
    """The document ``source`` sealed under ``sealing``'s key, to be kept in its row;
    None if it is larger than a row keeps (it grew since it was listed)."""
    with source.open("rb") as handle:
        plain = handle.read(INLINE_BODY_BYTES + 1)
    return sealing.seal(plain) if len(plain) <= INLINE_BODY_BYTES else None


def _remove_from_outbox(source: Path, folders: FolderSync) -> None:
    source.unlink()
    folders.sync(source.parent)


def move_into_spool(source: Path, target: Path, folders: FolderSync, sealing: Sealing) -> None:
    """Copy the document into the spool encrypted at rest under ``sealing``'s key (begun
    and stored with its row), fsync, unlink it from the outbox: no plaintext copy of it
    is ever written under the state folder.  Stored as it is (at-rest encryption off):
    rename (same file system) or copy-fsync-unlink (another file system)."""
    if sealing.encrypting:
        sealing.write(target, read_chunks(source), folders)
    else:
        try:
            os.rename(source, target)
        except OSError as exc:
            if exc.errno != errno.EXDEV:
                raise
            write_atomic(target, read_chunks(source), mode=0o600, folder_sync=folders)
        else:
            folders.sync(target.parent)
            folders.sync(source.parent)
            return
    _remove_from_outbox(source, folders)
