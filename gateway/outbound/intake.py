"""Taking documents from the outbox folder into the spool, each in three committed steps
(an ``intake`` row, the file moved into the spool, then sealed and queued): a document
taken from the outbox is never lost and never sent twice as two messages.

Documents are taken in batches, each in one trip to a worker thread: their rows
in one transaction, the outbox folders synced once for them, then each signed and
encrypted, all queued in one transaction and their ``message.accepted`` records
written together (one fsync each, not one per document).

Each call takes one round of the outbox (gateway.intake.outbox): at most ROUND_PER_PEER
documents of each peer, the peers in turn, so one peer's backlog holds another peer's
documents back by a round at most."""

from __future__ import annotations

import asyncio
import errno
import math
import os
import stat
from collections.abc import Sequence
from pathlib import Path

from gateway.as2.headers import new_message_id
from gateway.atrest import Sealing, storing_all
from gateway.config import Peer
from gateway.errors import MedgwError, SpoolError
from gateway.fsutil import (
    FolderSync,
    file_identity,
    read_chunks,
    storage_fix,
    this_user,
    write_atomic,
)
from gateway.intake.outbox import Candidate, Outbox
from gateway.intake.submit import account_name
from gateway.outbound.context import Context
from gateway.outbound.seal import INLINE_BODY_BYTES, Sealer, ToSeal
from gateway.outbound.sweep import remove_if_sent_elsewhere
from gateway.routing import LOCAL_INTAKE
from gateway.spool import Intake, OutboundRecord, OutboundState
from gateway.spool.records import payload_item

# Documents taken in one trip to a worker thread (one transaction for their rows, one for
# their queueing, one audit write): bench/README.md measures the choice.
INTAKE_BATCH = 32
# Batches taken at once: while one waits for an fsync, another signs and encrypts.
INTAKE_PARALLELISM = 2
# Documents of one peer taken in one round: a peer alone in the outbox fills the batches
# taken at once, and another peer's first document waits behind at most this many of
# each other peer's (README "Sending and receiving documents").
ROUND_PER_PEER = INTAKE_BATCH * INTAKE_PARALLELISM


class OutboxIntake:
    """The outbox folder's documents, taken into the spool and handed to the sealer."""

    def __init__(self, context: Context, sealer: Sealer) -> None:
        self._ctx = context
        self._sealer = sealer
        self._outbox = Outbox()
        self._reported_unknown: set[str] = set()
        self._reported_unknown_services: set[tuple[str, str]] = set()
        self._reported_skipped: set[Path] = set()
        # Rows of takes that failed and whose removal failed too (the spool's disk full):
        # removed before any document is taken again, see intake_once.
        self._unabandoned: set[str] = set()
        # Documents taken into the spool whose signing and queueing stopped half-way (the
        # spool did not answer): prepared again at the next scan, not only at a restart.
        self._unsealed: set[str] = set()

    @property
    def waiting(self) -> int:
        """Documents listed in the outbox and left for the next rounds."""
        return self._outbox.waiting

    async def intake_once(self) -> int:
        """Take one round of the outbox's documents; returns how many it offered."""
        if self._unabandoned:
            held = await self._ctx.in_thread(self._abandon_failed_takes)
            for record in held:
                self._ctx.log.warning(
                    "recovery.intake_held_elsewhere",
                    peer=record.peer,
                    message_id=record.message_id,
                    node=record.node,
                )
            if held:
                # Here, on the event loop, as the lease keeper's take_back changes it.
                self._ctx.waiting_intakes = {
                    **self._ctx.waiting_intakes,
                    **{record.message_id: record for record in held},
                }
        for message_id in sorted(self._unsealed):
            await self._sealer.prepare_unsealed(message_id)  # raises while it still cannot
            self._unsealed.discard(message_id)
        peers = {p.name: p.services for p in self._ctx.config.peers}
        result = self._outbox.next_round(self._ctx.config.storage.outbox_dir, peers, ROUND_PER_PEER)
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
        # Several batches are taken at once: each is mostly fsync and crypto in worker
        # threads, so they overlap well.
        limit = asyncio.Semaphore(INTAKE_PARALLELISM)

        async def take(batch: Sequence[Candidate]) -> None:
            async with limit:
                await self._take_batch(batch)

        # Every take finishes before this returns, even when one fails: the next scan
        # must not start a second take of a file this one is still moving.
        try:
            outcomes = await asyncio.gather(
                *(take(b) for b in batches(result.candidates)), return_exceptions=True
            )
            for outcome in outcomes:
                if isinstance(outcome, BaseException):
                    raise outcome
        except BaseException:
            # What a failed take left in the outbox comes first again, in name order.
            self._outbox.forget()
            raise
        return len(result.candidates)

    def _abandon_failed_takes(self) -> list[OutboundRecord]:
        """Remove the rows of earlier takes that could not be removed when they failed.
        Raises SpoolError while one stays: no document is taken again (under a new
        Message-ID) beside the row of a failed take, which a restart would act on.

        A take whose row was recorded after all (its commit's answer lost with the
        spool) may have been taken over meanwhile: this node, cut off from the spool
        for longer than its lease, no longer held it.  If another node prepared it, or
        holds it with the copy kept in its row, its outbox file is removed, not taken
        again (gateway.outbound.sweep).  If another node holds it without a copy (one
        that started meanwhile, which gives back what it cannot reach), it is returned:
        its file is left alone, and taken up under its own Message-ID once it is given
        back (Context.waiting_intakes, Recovery.take_back)."""
        held: list[OutboundRecord] = []
        for message_id in sorted(self._unabandoned):
            if not self._ctx.spool.abandon_intake(message_id):
                record = self._ctx.spool.get(message_id)
                if record is not None and not self._left_to_another(record):
                    held.append(record)
            self._unabandoned.discard(message_id)
        return held

    def _left_to_another(self, record: OutboundRecord) -> bool:
        """Whether this node is done with ``record``, a take of its own it could not
        abandon: another node prepared it, or holds it with its complete copy (the
        outbox file, if still the one taken, removed; not if it failed before it was
        prepared, its copy lost: the file is taken in again, as a new message); or its
        file is no longer the one taken.  False while another node holds it without a
        copy (it gives it back to this node, or its claim runs out)."""
        if record.state is not OutboundState.INTAKE or record.has_document:
            remove_if_sent_elsewhere(
                self._ctx.spool.node, self._ctx.log, record.source_path, [record]
            )
            return True
        try:
            status = record.source_path.stat(follow_symlinks=False)
        except FileNotFoundError:
            return True
        return file_identity(status) != record.source_file

    async def _take_batch(self, batch: Sequence[Candidate]) -> None:
        """Take ``batch`` into the spool, sign, encrypt and queue it, in one trip to a
        worker thread; an error of one document is raised once the others are queued."""
        queued, errors = await self._ctx.in_thread(self._take_and_seal, batch)
        for peer in sorted(queued):
            self._ctx.wake(peer)
        if errors:
            raise errors[0]

    def _take_and_seal(self, batch: Sequence[Candidate]) -> tuple[set[str], list[MedgwError]]:
        """(worker thread) The peers with a document queued, and the errors of those that
        could not be taken."""
        errors: list[MedgwError] = []
        taken = self._take_into_spool(batch, errors)
        try:
            queued = self._sealer.seal_and_queue_all(taken)
        except (MedgwError, OSError):
            self._unsealed.update(t.record.message_id for t in taken)
            raise
        return {t.peer.name for t in queued}, errors

    def _take_into_spool(
        self, batch: Sequence[Candidate], errors: list[MedgwError]
    ) -> list[ToSeal]:
        """Record the documents (one transaction) and move them from the outbox into the
        spool (worker thread); those taken, to be sealed.  A document whose peer was
        removed (by a reload) since the scan stays in the outbox, and the next scan
        reports the folder as one without a peer.  The submitter recorded is the file's
        owner, the account that wrote it into the outbox.  A document that could not be
        moved is left out, its error added to ``errors``; if the rows cannot be recorded,
        none is taken and this raises."""
        found: list[tuple[Candidate, Peer, os.stat_result, str]] = []
        waiting = self._ctx.waiting_intakes
        held = {(r.source_path, r.source_file) for r in waiting.values()} if waiting else None
        for candidate in batch:
            peer = self._ctx.config.peer(candidate.peer)
            if peer is None:
                continue
            try:
                status = candidate.path.lstat()
            except FileNotFoundError:
                continue  # taken away since the scan
            if not stat.S_ISREG(status.st_mode):
                # Replaced since it was listed (a listing may be rounds old): a link could
                # make the gateway send a file its writer may not read.  The next listing
                # reports it as skipped.
                continue
            if held and (candidate.path, file_identity(status)) in held:
                continue  # an interrupted intake's document, to be taken up under its own ID
            found.append((candidate, peer, status, new_message_id(self._ctx.config.as2_id)))
        if not found:
            return []
        expires_at = (
            self._ctx.clock.now().timestamp() + self._ctx.config.runtime.message_expiry_seconds
        )
        items = [payload_item(message_id) for *_, message_id in found]
        with storing_all(self._ctx.vault, items) as sealings:
            intakes: list[tuple[Candidate, Peer, Intake, Sealing]] = []
            plain: dict[str, bytes] = {}  # the small documents as taken, by Message-ID
            for (candidate, peer, status, message_id), sealing in zip(found, sealings, strict=True):
                sealing.begin()  # its key is stored with the row, before the copy is written
                # A small document's copy is kept in its row, committed with it: no file, no
                # fsync of its own (None: too large, or it grew since; stored as a file).
                try:
                    small = (
                        _small_copy(candidate.path)
                        if sealing.encrypting and status.st_size <= INLINE_BODY_BYTES
                        else None
                    )
                    kept = None if small is None else sealing.seal(small)
                except FileNotFoundError:
                    continue  # taken away since the scan
                except OSError as exc:
                    errors.append(self._not_moved(candidate.peer, exc, candidate.path))
                    continue
                owner = status.st_uid
                intake = Intake(
                    message_id,
                    peer.name,
                    candidate.path.name,
                    candidate.content_type,
                    candidate.path,
                    self._ctx.payloads / os.urandom(12).hex(),
                    expires_at=expires_at,
                    zone=peer.zone,
                    origin=LOCAL_INTAKE,
                    submitted_by=f"outbox:{account_name(owner)} (uid {owner})",
                    service=candidate.service,
                    data_key=sealing.key,
                    payload=kept,
                    source_file=file_identity(status),
                )
                intakes.append((candidate, peer, intake, sealing))
                if small is not None:
                    plain[message_id] = small
            # Their rows are removed before the next take unless known to be recorded: a
            # commit whose outcome is unknown (the spool's connection lost) may have
            # recorded them, and these documents, still in the outbox, would be taken
            # twice, two messages each.
            recording = {intake.message_id for _, _, intake, _ in intakes}
            self._unabandoned |= recording
            self._ctx.spool.add_intakes([intake for _, _, intake, _ in intakes])
            self._unabandoned -= recording
            moved = [
                (candidate, peer, intake)
                for candidate, peer, intake, sealing in intakes
                if self._moved(candidate, intake, sealing, errors)
            ]
        # Removed from the outbox for good (its folder synced) before any of them is
        # queued: after a power cut a document sent must not come back to be sent again.
        folders = {c.path.parent: c.peer for c, _, i in moved if i.payload is not None}
        synced = set()
        for folder, peer_name in sorted(folders.items()):
            try:
                self._ctx.folder_sync.sync(folder)
            except OSError as exc:
                errors.append(self._not_moved(peer_name, exc))
            else:
                synced.add(folder)
        taken: list[ToSeal] = []
        for candidate, peer, intake in moved:
            if intake.payload is not None and candidate.path.parent not in synced:
                continue  # its row stays in intake: the next start prepares it
            try:
                record = self._ctx.spool.get(intake.message_id)
            except SpoolError as exc:
                self._unsealed.add(intake.message_id)  # taken, not yet prepared
                errors.append(exc)
                continue
            assert record is not None
            taken.append(
                ToSeal(record, peer, intake.submitted_by, taken=plain.get(intake.message_id))
            )
        return taken

    def _moved(
        self, candidate: Candidate, intake: Intake, sealing: Sealing, errors: list[MedgwError]
    ) -> bool:
        """Move the document of ``intake`` (recorded) from the outbox into the spool: its
        file removed (a small one: its copy is in the row; its folder is synced for all of
        them next), or copied into state/payloads first.  False if it could not be, its
        error added to ``errors``."""
        try:
            if intake.payload is None:
                move_into_spool(candidate.path, intake.payload_path, self._ctx.folder_sync, sealing)
            else:
                candidate.path.unlink()
        except OSError as exc:
            if candidate.path.exists():
                # Still in the outbox (say the spool's disk is full): a later scan takes it
                # again. The row must not outlive this try, or a restart would take a new
                # document of the same name for this message as well.
                intake.payload_path.unlink(missing_ok=True)
                try:
                    abandoned = self._ctx.spool.abandon_intake(intake.message_id)
                except SpoolError:
                    abandoned = False
                if not abandoned:
                    # Removed before the next take (another node may hold it now).
                    self._unabandoned.add(intake.message_id)
            errors.append(self._not_moved(candidate.peer, exc, candidate.path))
            return False
        return True

    def _not_moved(self, peer: str, exc: OSError, source: Path | None = None) -> SpoolError:
        """Why a document of ``peer`` (``source``, when it is one document) could not be
        taken: the read of the document, its removal from the outbox folder, or the
        write into the spool, whichever failed."""
        reason = exc.strerror or str(exc)
        if source is None or exc.errno not in (errno.EACCES, errno.EPERM, errno.EROFS):
            return self._not_stored(peer, exc)
        folder = source.parent
        try:
            where = f"outbox/{folder.relative_to(self._ctx.config.storage.outbox_dir)}"
            status = source.lstat()
        except (ValueError, OSError):
            return self._not_stored(peer, exc)
        # The file's inode, owner and mode, not its name: names can carry patient
        # identifiers; `find FOLDER -inum N` finds it.
        document = (
            f"a document in {where} (inode {status.st_ino}, owner "
            f"{account_name(status.st_uid)}, mode {stat.S_IMODE(status.st_mode):o})"
        )
        user = this_user()
        if exc.filename == str(source) and not os.access(source, os.R_OK):
            return SpoolError(
                f"cannot read {document}: {reason}; medgw (user {user}) reads each "
                "document it takes from the outbox",
                fix=f"have the files written into {folder} readable by user {user} (their "
                f"writer's umask, or mode 640 and a group {user} is in), or chmod this one; "
                f"find it with: find {folder} -inum {status.st_ino}",
            )
        if not os.access(folder, os.W_OK | os.X_OK) or exc.errno == errno.EROFS:
            return SpoolError(
                f"cannot remove {document} from {folder}: {reason}; medgw moves each "
                "document out of the outbox when it takes it",
                fix=storage_fix(exc, folder, daemon=True),
            )
        return self._not_stored(peer, exc)

    def _not_stored(self, peer: str, exc: OSError) -> SpoolError:
        # The folder, not the file name: names can carry patient identifiers.
        return SpoolError(
            f"cannot move a document from outbox/{peer} into the spool "
            f"({self._ctx.payloads}): {exc.strerror or exc}",
            fix=storage_fix(exc, self._ctx.payloads, daemon=True),
        )


def batches(candidates: Sequence[Candidate]) -> list[Sequence[Candidate]]:
    """``candidates`` in batches of at most INTAKE_BATCH, in order, as many as there are
    batches taken at once when there are fewer documents than that (so that they
    overlap)."""
    if not candidates:
        return []
    count = max(math.ceil(len(candidates) / INTAKE_BATCH), min(INTAKE_PARALLELISM, len(candidates)))
    size = math.ceil(len(candidates) / count)
    return [candidates[i : i + size] for i in range(0, len(candidates), size)]


def _small_copy(source: Path) -> bytes | None:
    """The document ``source``, to be kept in its row (sealed at rest) and sealed from
    as it is; None if it is larger than a row keeps (it grew since it was listed)."""
    with source.open("rb") as handle:
        plain = handle.read(INLINE_BODY_BYTES + 1)
    return plain if len(plain) <= INLINE_BODY_BYTES else None


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
