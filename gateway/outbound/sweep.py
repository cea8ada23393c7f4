"""Files in this node's payloads and receipts folders that no message's row names (and
the copies no longer needed in the other nodes' folders of a shared payloads folder),
and the documents in its outbox that another node has sent.

A process killed between spooling a submitted document and recording it leaves its
file in ``payloads``, one killed between queueing a message and removing its
plaintext copy leaves that copy, and one killed between storing a receipt and the
commit that records it (or between an operator's retry and removing the receipt it
cleared) leaves that receipt.  The folders are read a batch of files at a time and
the spool asked about those names (an index lookup each): the cost follows the files
found, never the number of rows the spool keeps.

While running, the lease keeper sweeps the receipts folder too (an operator's retry
on another node of a cluster cannot remove the receipt this node stored), leaving
alone the receipts written less than SETTLING_SECONDS ago: their commits may be in
flight.
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

from gateway.fsutil import file_identity, fsync_dir
from gateway.logs import Logger
from gateway.spool import OutboundRecord, OutboundState, Spool

# Files read from a folder, then asked about in the spool, at a time: memory stays flat
# however many files a folder holds.
SWEEP_BATCH = 500
# While running, a receipt stored is recorded by its settlement's commit moments later
# (the answers of a moment settled in one transaction); one no row names an hour after
# it was written never will be.  Younger ones are left for the next sweep.
SETTLING_SECONDS = 3600.0


def _is_payload(entry: os.DirEntry[str]) -> bool:
    """A document spooled (not a partial write, not a link)."""
    return not entry.name.startswith(".") and entry.is_file(follow_symlinks=False)


def _is_receipt(entry: os.DirEntry[str]) -> bool:
    """A receipt file settling stored (see settle.py): ``<payload>.<hex>.mdn``, or
    ``<payload>.mdn`` from before; not a partial write, not a link."""
    return (
        not entry.name.startswith(".")
        and entry.name.endswith(".mdn")
        and entry.is_file(follow_symlinks=False)
    )


def _batches(folder: Path, wanted: Callable[[os.DirEntry[str]], bool]) -> Iterator[list[str]]:
    """The names of the files of ``folder`` that are ``wanted``, SWEEP_BATCH at a time."""
    batch: list[str] = []
    with os.scandir(folder) as entries:
        for entry in entries:
            if wanted(entry):
                batch.append(entry.name)
                if len(batch) >= SWEEP_BATCH:
                    yield batch
                    batch = []
    if batch:
        yield batch


def remove_unrecorded_payloads(
    spool: Spool, log: Logger, folder: Path, *, unrecorded: bool = True
) -> None:
    """At start, before any writer (worker thread): the documents in this node's payloads
    ``folder`` no row names, and the plaintext copies no longer needed.  ``unrecorded``
    False: another node's folder, where a document no row names yet may be that node's
    submission in progress: only the copies no longer needed go."""
    for names in _batches(folder, _is_payload):
        recorded = spool.payloads_recorded(names)  # name -> whether the plaintext is needed
        for name in names:
            if name not in recorded:
                if not unrecorded:
                    continue
                # Killed between spooling a submitted body and recording it: the submitter
                # got no Message-ID and submits again.
                (folder / name).unlink(missing_ok=True)
                log.info("recovery.removed_unrecorded_submission", file=name)
            elif not recorded[name]:
                # Killed between "queued" and removing the plaintext copy (the message
                # may have moved on since): only the encrypted form stays at rest.
                (folder / name).unlink(missing_ok=True)
                log.info("recovery.removed_plaintext_copy", file=name)


def intakes_of_copies(spool: Spool, folder: Path) -> list[OutboundRecord]:
    """At start, once this node's interrupted intakes are finished (worker thread): the
    messages still in intake whose documents' copies are in this node's payloads
    ``folder``: held by another node (one that started while this one was down, which
    gives back those whose copies it cannot reach), or given back since.  As those of
    :func:`remove_sent_elsewhere`, this node takes them up once they come back."""
    found: list[OutboundRecord] = []
    for names in _batches(folder, _is_payload):
        found += spool.intakes_by_payload(names)
    return found


def remove_unrecorded_receipts(
    spool: Spool, log: Logger, folder: Path, *, older_than: float | None = None
) -> int:
    """The receipts in this node's receipts ``folder`` (private to it) no row names, compared
    by name (a row keeps the path its receipt was stored at, and the state folder may
    have been moved or restored elsewhere since); how many were removed (worker thread).

    At start (``older_than`` None) no writer runs yet: every such file is a left-over.
    While running, a receipt just stored is not recorded until its settlement commits:
    only those last changed before ``older_than`` (seconds since the epoch) go."""
    removed = 0
    for names in _batches(folder, _is_receipt):
        recorded = spool.receipts_recorded(names)
        for name in names:
            if name in recorded:
                continue
            path = folder / name
            if older_than is not None:
                try:
                    if path.stat(follow_symlinks=False).st_mtime >= older_than:
                        continue
                except FileNotFoundError:
                    continue
            # Nothing names it, nothing can open it (its data key was never stored, or
            # was deleted with the retry): its message is sent again, or was answered
            # with another receipt, the one its row names.
            path.unlink(missing_ok=True)
            log.info("recovery.removed_unrecorded_receipt", file=name)
            removed += 1
    return removed


def remove_spent_copies_of_others(spool: Spool, log: Logger, shared: Path, own: Path) -> None:
    """At start (worker thread): in the other nodes' folders of the ``shared`` payloads
    folder, the copies no longer needed.  A node that took over another's document and
    was killed between queueing it and removing its copy left it there; the node it
    belongs to may never start again to remove it."""
    with os.scandir(shared) as entries:
        folders = sorted(
            Path(e.path) for e in entries if e.is_dir(follow_symlinks=False) and e.path != str(own)
        )
    for folder in folders:
        remove_unrecorded_payloads(spool, log, folder, unrecorded=False)


def _outbox_files(outbox: Path) -> Iterator[Path]:
    """The documents in ``outbox``: in its peers' folders and their service folders (not
    partial writes, not links)."""
    if not outbox.is_dir():
        return
    folders = [outbox]
    for depth in range(2):
        deeper: list[Path] = []
        for folder in folders:
            with os.scandir(folder) as entries:
                for entry in entries:
                    if entry.name.startswith("."):
                        continue
                    if entry.is_dir(follow_symlinks=False):
                        deeper.append(Path(entry.path))
                    elif depth and entry.is_file(follow_symlinks=False):
                        yield Path(entry.path)
        folders = deeper


def remove_sent_elsewhere(spool: Spool, log: Logger, outbox: Path) -> list[OutboundRecord]:
    """At start, once this node's interrupted intakes are finished and before its outbox
    intake runs (worker thread): the documents in its ``outbox`` another node took over
    and prepares or has sent.  A node killed after taking a document in (its copy
    complete) and before removing it from its outbox leaves it there; when its claim
    runs out another node, which cannot reach this node's outbox, prepares and sends
    it from the copy.  The file is that document only if it is still the file taken
    (file_identity): a new document dropped since under the same name stays, and is
    sent.

    Returns the interrupted intakes of these files still in intake: held by another
    node (one that started while this one was down, which gives back those it cannot
    reach: their copies not finished, or in this node's state folder), or given back
    since this node's own were finished.  This node takes them up under their own
    Message-IDs once their claims come back, and its intake does not take their files
    meanwhile as new documents."""
    node = spool.node
    waiting: list[OutboundRecord] = []
    files = _outbox_files(outbox)
    while batch := list(itertools.islice(files, SWEEP_BATCH)):
        taken: dict[str, list[OutboundRecord]] = {}
        for record in spool.outbound_by_source([str(p) for p in batch]):
            taken.setdefault(str(record.source_path), []).append(record)
        for path in batch:
            records = taken.get(str(path), ())
            if not records:
                continue
            try:
                identity = file_identity(path.stat(follow_symlinks=False))
            except FileNotFoundError:
                continue
            waiting += [
                r for r in records if r.source_file == identity and r.state is OutboundState.INTAKE
            ]
            remove_if_sent_elsewhere(node, log, path, records)
    return waiting


def remove_if_sent_elsewhere(
    node: str, log: Logger, path: Path, records: Iterable[OutboundRecord]
) -> bool:
    """Remove the outbox file ``path`` if it is still the very file one of ``records``
    (messages taken from that path) was taken from, and that message is no longer this
    node's to take in: see :func:`left_elsewhere`; whether it was removed (worker
    thread).  A file dropped since under the same name is another document, and stays."""
    try:
        identity = file_identity(path.stat(follow_symlinks=False))
    except FileNotFoundError:
        return False
    sent = [r for r in records if r.source_file == identity and left_elsewhere(node, r)]
    if not sent:
        return False
    path.unlink(missing_ok=True)
    fsync_dir(path.parent)
    record = sent[0]
    log.warning(
        "recovery.removed_sent_elsewhere",
        peer=record.peer,
        message_id=record.message_id,
        node=record.queued_by or record.node,
    )
    return True


def left_elsewhere(node: str, record: OutboundRecord) -> bool:
    """Whether the document of ``record``, whose file is still in this ``node``'s outbox,
    is safe elsewhere: another node holds it in intake with its complete copy (from
    which it prepares it), or it left intake with its document kept in the spool
    (prepared, sent, or failed or cancelled with its copy).  Not a message failed
    before it was ever prepared with its copy out of reach (a node that held another's
    intake, without a shared bodies folder, could not reach it and failed it):
    the file is its only copy, and is taken in again, as a new message."""
    if record.state is OutboundState.INTAKE:
        return record.node not in (None, node) and record.has_document
    never_prepared = (
        record.state is OutboundState.FAILED
        and record.queued_by is None
        and not record.sealed
        and record.attempts == 0
        and not record.has_receipt
    )
    return not never_prepared or record.has_document
