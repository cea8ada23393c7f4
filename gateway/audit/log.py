"""Append-only audit log: JSON lines, each chained to the previous by SHA-256.

Each record carries ``seq`` (1, 2, ...), ``prev`` (the hash of the previous
record's line, or 64 zeros) and ``hash`` (SHA-256 over the record without the
``hash`` field, canonical JSON).  Removing, reordering or editing a line breaks
the chain, which :func:`verify_chain` reports with the line number.  Every
record is written and fsync'ed before :meth:`AuditLog.emit` returns: an event
that was acted upon is on disk.  :meth:`AuditLog.emit_all` records several
events the same way at the cost of one: chained in order, written with one
``os.write`` and made durable by one fsync, each still its own line and chain
link; all of them are on disk when it returns, or none is and it raises.  A
record that could not be written whole (a full disk) is cut off again before
``emit`` raises, so it never merges with the next one.

:meth:`AuditLog.emit_later` writes records at once, chained in order like
``emit_all``, and returns a :class:`Pending` whose ``wait()`` makes them durable
(or raises, the records cut off, exactly as ``emit_all`` would have): a caller
writes a record, does other work, and waits just before the step the record must
precede.  Meanwhile an fsync begun by another record (of another thread) covers it,
so one fsync serves both.  ``emit_all`` is ``emit_later`` waited at once.  Every
handle must be waited, also on a path that gives the step up: until then the log
remembers that its records may have to be reported lost.

Records are synced in groups (group commit): they are written in chain order
under one lock, and the fsync happens outside it, one at a time; each fsync
covers every record written before it began, so threads that emit at the same
moment share one fsync instead of queueing for one each.  On a disk where an
fsync takes milliseconds this keeps the audit trail from limiting the whole
gateway.  If an fsync fails, every record it was to make durable (and any
written while it ran) is cut off, the chain goes back to the last durable
record, and each of those ``emit`` calls raises.

Records the gateway still owes the trail (``owed``: about a change already committed,
which nothing will record again) are kept when their write fails, a full disk say,
and written before the next record, in the same write: so the trail never goes on past
a record it lacks, and a kill meanwhile leaves them to the start's check (the changes
made since the trail's last record).  Each carries ``detail.first_tried_at``.

A record the process was writing when it died (a kill can stop ``write`` at a page
boundary; a power cut can keep part of what was not synced) is an unfinished last line.
The next open cuts it off and writes an ``audit.record_cut_short`` record of its size,
hash and beginning in its place: every line of the file stays a record of the chain, and
the unfinished one is accounted for.  A start that must know where the trail ended
before (gateway.audit.owed.changes_since) reads that before it opens the log.

Beside the trail, the writer keeps notes for reviews (gateway.audit.order): each file's
first record, and each record stamped more than CLOCK_MARGIN before the latest one before
it (a clock stepped back), each noted durably before the record is written.

With rotation settings, the file is closed when it reaches a size or when the
first record of a new UTC day is written (gateway.audit.rotation): sealed by a
checkpoint, synced, renamed to its closed name (gateway.audit.files), and the
chain goes on in a new file.  A rotation that fails (a rename refused) leaves
the records where they are and is tried again later: it never costs a record.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import replace
from datetime import date, datetime, timedelta
from pathlib import Path
from typing import Any, NamedTuple, Protocol

from gateway.audit import rotation as steps  # by module: a crash test can stop between them
from gateway.audit.chain import GENESIS, hashed_line
from gateway.audit.events import AuditEvent, EventType, Severity
from gateway.audit.files import closed_at, closed_files, closed_name, trail_backwards
from gateway.audit.order import CLOCK_MARGIN, Steps, read_notes
from gateway.audit.rotation import RETRY_SECONDS, RotationSettings
from gateway.audit.seal import CHECKPOINT_EVENT, Sealer
from gateway.audit.verify import AuditChainError, verify_chain
from gateway.clock import Clock
from gateway.fsutil import shared_folder

__all__ = [
    "CLOCK_MARGIN",
    "DURABLE",
    "GENESIS",
    "AuditChainError",
    "AuditLog",
    "AuditSink",
    "Pending",
    "recorded_since",
    "verify_chain",
]

# At most this many owed records are kept while the trail cannot be written (memory).
MAX_OWED = 10_000


class Pending(Protocol):
    """Records written, not yet known to be durable."""

    def wait(self) -> None:
        """Return once the records are on disk; raise OSError if they were cut off
        instead (then none of them is in the trail).  A second call returns or raises
        as the first did."""


class _Durable:
    """Records already durable (or none): nothing to wait for."""

    def wait(self) -> None:
        return None


DURABLE: Pending = _Durable()


class Then:
    """``pending``, then ``after()`` once it is durable (a sink that passes records on
    and notes them once recorded): ``after`` runs once, never if the wait raised."""

    def __init__(self, pending: Pending, after: Callable[[], None]) -> None:
        self._pending = pending
        self._after: Callable[[], None] | None = after

    def wait(self) -> None:
        self._pending.wait()
        after, self._after = self._after, None
        if after is not None:
            after()


class AuditSink(Protocol):
    def emit(self, event: AuditEvent) -> None: ...

    def emit_all(self, events: Sequence[AuditEvent]) -> None:
        """Record ``events`` in order, all or none: as ``emit`` of each, at once."""

    def emit_later(self, events: Sequence[AuditEvent]) -> Pending:
        """Write ``events`` now, in order, all or none; durable once the handle's
        ``wait()`` returns (which raises if they were cut off instead).  A sink that
        cannot defer records them at once and returns :data:`DURABLE`."""


class AuditLog:
    def __init__(
        self,
        path: Path,
        clock: Clock,
        *,
        node: str,
        sync: Callable[[int], None] = os.fsync,
        sealer: Sealer | None = None,
        rotation: RotationSettings | None = None,
        owed: Callable[[AuditEvent], bool] = lambda event: False,
    ) -> None:
        self._path = path
        self._owes = owed  # whether a record whose write failed is kept, to be written later
        self._clock = clock
        self._node = node
        self._sync = sync
        self._sealer = sealer
        self._rotation = rotation
        self._lock = threading.Lock()  # the chain: seq, prev and the write of each record
        self._sync_lock = threading.Lock()  # one fsync at a time; taken before _lock
        shared_folder(path.parent)
        self._fd = steps.open_current(path)
        self._torn: int | None = None  # size to cut the file back to before the next record
        # What the next write records first: records the gateway owes the trail, each
        # with when it was first tried.
        self._owed: list[tuple[AuditEvent, datetime]] = []
        # A record a kill or a power cut left unfinished, cut off before the chain's end
        # is read: all of it, even a record that lacks only its newline, is not the chain's.
        cut = _cut_torn_tail(path, self._fd)
        self._seq, self._prev, self._sealed = self._tail(path)
        # Records stamped before the latest one (a clock stepped back), noted for reviews.
        try:
            self._steps = Steps(path, last_record_time(path))
        except OSError:
            os.close(self._fd)
            raise
        self._sync(self._fd)
        self._size = os.fstat(self._fd).st_size  # of the current file
        self._day = _first_day(path)  # when its first record was written (None: empty)
        closed = closed_files(path)
        self._last_closed = closed[-1].name if closed else ""
        self._retry_at = float("-inf")  # monotonic: no rotation before (one failed)
        # Records are also numbered by ticket: never reused, unlike seq after a rollback.
        self._written = 0  # tickets of the records written so far
        self._durable = _Mark(0, self._seq, self._prev, os.fstat(self._fd).st_size, self._sealed)
        self._lost: list[tuple[int, int, OSError]] = []  # (after, through, why): failed fsyncs
        self._waiting: set[int] = set()  # tickets whose emit has not returned or raised yet
        if cut is not None:
            try:
                self._record_cut(cut)
            except OSError:
                # Not recorded (a full disk): the bytes go back, for the next start to cut
                # and record; never gone without a trace.
                if cut.data is not None:
                    with contextlib.suppress(OSError):
                        view = memoryview(cut.data)
                        while view:  # all of it, or as much as the disk takes
                            view = view[os.write(self._fd, view) :]
                        self._sync(self._fd)
                os.close(self._fd)
                self._steps.close()
                raise

    def _record_cut(self, cut: _CutShort) -> None:
        """Record what was cut off the file at once, durably, as the first record after
        the last complete one: in the same file (no rotation before it), and before
        anything a kill could stop again."""
        with self._sync_lock, self._lock:
            self._write_all([cut.event(self._path).to_record(self._clock.now())])
            self._flush()

    def _tail(self, path: Path) -> tuple[int, str, int]:
        """Sequence number and hash of the last complete record, to continue the chain,
        and the sequence number of the last checkpoint (0 if none).  Reads backwards,
        into the closed files if the current one is empty or missing (a rotation was cut
        short): with an audit key, a checkpoint is at most a few thousand records back."""
        last: tuple[int, str] | None = None
        for line in trail_backwards(path):
            try:
                record = json.loads(line)
                seq, digest = int(record["seq"]), str(record["hash"])
            except (ValueError, KeyError, TypeError):
                continue  # a torn last line after a crash: chain on from the last good one
            last = last or (seq, digest)
            if self._sealer is None:
                return seq, digest, 0
            if record.get("event") == CHECKPOINT_EVENT:
                return last[0], last[1], seq
        return (*last, 0) if last else (0, GENESIS, 0)

    def emit(self, event: AuditEvent) -> None:
        self.emit_all((event,))

    def emit_all(self, events: Sequence[AuditEvent]) -> None:
        """Record ``events`` in order, each its own line and link of the chain, written
        with one ``os.write`` and made durable by one fsync: when this returns every one
        is on disk; if it raises none is in the file (a failed write or fsync cuts them
        all off, and the chain goes on from the record before them).  A checkpoint due
        after one of them is written in its place among them.  A rotation that is due is
        done before them: a batch is never split over two files."""
        self.emit_later(events).wait()

    def emit_later(self, events: Sequence[AuditEvent]) -> Pending:
        """Write ``events`` as ``emit_all`` does, now, and return without waiting for
        their fsync: the handle's ``wait()`` does (an fsync that began after the write,
        perhaps another thread's, covers them), and raises if it failed, the records
        cut off.  Raises at once if the write itself fails (nothing of it stays)."""
        if not events and not self._owed:
            return DURABLE
        if self._rotation is not None:
            self._rotate_if_due(self._rotation)
        with self._lock:
            now = self._clock.now()
            owed, self._owed = self._owed, []
            records = [_late(event, at).to_record(now) for event, at in owed]
            try:
                self._write_all([*records, *(event.to_record(now) for event in events)])
            except OSError:
                self._owe(owed, events, now)
                raise
            ticket = self._written
            self._waiting.add(ticket)
        return Written(self, ticket, owed, tuple(events), now)

    def _wait(
        self,
        ticket: int,
        owed: list[tuple[AuditEvent, datetime]],
        events: Sequence[AuditEvent],
        now: datetime,
    ) -> None:
        """Make the records written as ``ticket`` durable (Written.wait)."""
        try:
            self._make_durable(ticket)
        except OSError:
            with self._lock:
                self._owe(owed, events, now)
            raise
        finally:
            with self._lock:
                self._waiting.discard(ticket)

    def _owe(
        self, owed: list[tuple[AuditEvent, datetime]], events: Sequence[AuditEvent], now: datetime
    ) -> None:
        """Keep the owed records of a write that failed (``_lock`` held), before those
        owed meanwhile: the next write begins with them."""
        kept = [*owed, *((event, now) for event in events if self._owes(event)), *self._owed]
        self._owed = kept[:MAX_OWED]

    def checkpoint(self, trigger: str) -> bool:
        """Seal the records written since the last checkpoint (none: nothing is written).

        Returns whether a checkpoint was written; raises OSError if it could not be
        made durable.  For the timer (``trigger`` "time") and at shutdown.
        """
        if self._owed:
            self.emit_all(())  # a checkpoint never goes on past a record the trail lacks
        with self._lock:
            if self._sealer is None or self._seq == self._sealed or self._fd < 0:
                return False
            self._write_checkpoint(self._sealer, trigger)
            self._written += 1
            ticket = self._written
            self._waiting.add(ticket)
        try:
            self._make_durable(ticket)
        finally:
            with self._lock:
                self._waiting.discard(ticket)
        return True

    def _rotate_if_due(self, rotation: RotationSettings) -> None:
        now = self._clock.now()
        if not rotation.due(self._size, self._day, now):
            return  # read without the lock: looked at again under it
        if self._clock.monotonic() < self._retry_at:
            # One failed a moment ago: until it is tried again, a record is written
            # without both locks (it would wait for any fsync under way).
            return
        with self._sync_lock, self._lock:
            if self._fd < 0 or not rotation.due(self._size, self._day, now):
                return
            if self._clock.monotonic() < self._retry_at:
                return
            closed = self._closed_name(now)
            if closed is None:
                return
            try:
                self._rotate(closed)
            except OSError:
                self._retry_at = self._clock.monotonic() + RETRY_SECONDS

    def _closed_name(self, now: datetime) -> Path | None:
        """The name the current file is closed under at ``now``: never one before a file
        closed earlier, so that the names list the trail in its order.  None within the
        second the last file was closed (one a second).  With the clock behind that file's
        time (set back since), one second after it: the rotation goes on, and the names
        stay unique and in order until the clock is past them again."""
        closed = closed_name(self._path, now)
        if closed.name > self._last_closed:
            return closed
        last = closed_at(self._path, self._path.with_name(self._last_closed))
        if last is None or now >= last:
            return None
        return closed_name(self._path, last + timedelta(seconds=1))

    def _rotate(self, closed: Path) -> None:
        """Seal, sync and close the current file as ``closed``; go on in a new one (both
        locks held).  On an OSError the records stay in the current file."""
        if self._sealer is not None and self._seq > self._sealed:
            self._write_checkpoint(self._sealer, "rotation")
            self._written += 1
        self._flush()
        steps.close_file(self._path, closed)
        try:
            fd = steps.open_current(self._path)
        except OSError:
            with contextlib.suppress(OSError):
                os.rename(closed, self._path)  # else the records go on into the closed file
            raise
        os.close(self._fd)
        self._fd = fd
        with contextlib.suppress(OSError):  # if it fails, a power cut may undo the rename
            steps.sync_folder(self._path.parent)
        self._durable = _Mark(self._written, self._seq, self._prev, 0, self._sealed)
        self._size, self._day, self._torn = 0, None, None
        self._last_closed = closed.name

    def _flush(self) -> None:
        """Sync every record written (both locks held); if that fails, cut them off and raise."""
        if self._written > self._durable.ticket:
            try:
                size = os.fstat(self._fd).st_size
                self._sync(self._fd)
            except OSError as exc:
                self._roll_back(exc)
                raise
            self._durable = _Mark(self._written, self._seq, self._prev, size, self._sealed)

    def durable_seq(self) -> int:
        """The seq of the last record known durable: a reader in this process (the
        export, the trail's own check) reads no further, for a record after it may yet be
        cut off by a failed fsync and its seq taken by the next record."""
        return self._durable.seq

    @property
    def unsealed(self) -> int:
        """How many records no checkpoint covers yet."""
        with self._lock:
            return self._seq - self._sealed

    def _write_all(self, records: list[dict[str, Any]]) -> None:
        """Chain ``records`` on and write them with one ``os.write`` (``_lock`` held), with
        a checkpoint after each record that makes one due.  If the write fails, nothing
        of it stays and the chain is as it was; a failure with a checkpoint among the
        lines is tried once more without it (the next record tries again): a checkpoint
        never costs a record."""
        sealer = self._sealer
        try:
            self._write_lines(records, sealer)
        except OSError:
            every = sealer.settings.every_records if sealer is not None else 0
            if not every or self._seq + len(records) - self._sealed < every:
                raise  # no checkpoint was among them
            self._write_lines(records, None)

    def _write_lines(self, records: list[dict[str, Any]], sealer: Sealer | None) -> None:
        before = self._chain_state()
        lines = []
        try:
            for record in records:
                lines.append(self._chain(record))
                if sealer is not None and self._seq - self._sealed >= sealer.settings.every_records:
                    lines.append(self._checkpoint_line(sealer, "records"))
        except OSError:  # a note (gateway.audit.order) not written: nor are the records
            self._back_to(before)
            raise
        self._append_chained(b"".join(lines), before)
        self._written += len(lines)

    def _write_checkpoint(self, sealer: Sealer, trigger: str) -> None:
        before = self._chain_state()
        try:
            line = self._checkpoint_line(sealer, trigger)
        except OSError:
            self._back_to(before)
            raise
        self._append_chained(line, before)

    def _chain_state(self) -> _State:
        return _State(self._seq, self._prev, self._sealed, self._day, self._steps.latest)

    def _back_to(self, before: _State) -> None:
        self._seq, self._prev, self._sealed, self._day, self._steps.latest = before

    def _append_chained(self, lines: bytes, before: _State) -> None:
        """Write ``lines``, chained on from ``before``; if that fails, go back to it."""
        try:
            self._append(lines)
        except OSError:
            self._back_to(before)
            raise

    def _chain(self, record: dict[str, Any]) -> bytes:
        """Link ``record`` to the chain (``_lock`` held): its line, to be written."""
        record.pop("hash", None)  # of a write tried before (_write_all): not what is hashed
        record["node"] = self._node
        record["seq"] = self._seq + 1
        record["prev"] = self._prev
        at = datetime.fromisoformat(record["time"])
        self._steps.check(record["seq"], at)  # noted before the record is written
        digest, line = hashed_line(record)
        if self._day is None:  # the first record of the file
            self._steps.first(record["seq"], digest)
            self._day = at.date()
        record["hash"] = digest
        self._seq += 1
        self._prev = digest
        return line + b"\n"

    def _checkpoint_line(self, sealer: Sealer, trigger: str) -> bytes:
        """A checkpoint sealing the records chained so far, chained on (``_lock`` held)."""
        seq = self._seq + 1
        detail = sealer.detail(self._node, seq, self._prev, self._sealed, trigger)
        event = AuditEvent(EventType.AUDIT_CHECKPOINT, detail=detail)
        line = self._chain(event.to_record(self._clock.now()))
        self._sealed = seq
        return line

    def _append(self, line: bytes) -> None:
        """Write all of ``line``, or leave the file as it was and raise.

        A full disk (ENOSPC) or an I/O error can cut a record short; its bytes are
        cut off again so that the next record starts on a line of its own and the
        chain goes on (seq and prev are not advanced for a record not written).
        """
        if self._torn is not None:
            os.ftruncate(self._fd, self._torn)  # an earlier cut-off did not succeed
            self._size, self._torn = self._torn, None
        # Where the file ends: kept here (only this object writes it) rather than asked of
        # the file at every record, a system call that also lets go of the GIL.
        size = self._size
        try:
            view = memoryview(line)
            while view:
                written = os.write(self._fd, view)
                if written <= 0:
                    raise OSError(errno.EIO, f"wrote nothing of an audit record to {self._path}")
                view = view[written:]
        except OSError:
            self._cut_back(size)
            raise
        self._size = size + len(line)

    def _make_durable(self, ticket: int) -> None:
        """Return once record ``ticket`` is on disk; raise if it was cut off instead."""
        with self._sync_lock:
            self._raise_if_lost(ticket)
            if self._durable.ticket >= ticket:
                return  # an fsync that began after it was written has covered it
            with self._lock:
                mark = _Mark(self._written, self._seq, self._prev, self._size, self._sealed)
            try:
                self._sync(self._fd)
            except OSError as exc:
                with self._lock:
                    self._roll_back(exc)
                raise
            self._durable = mark

    def _roll_back(self, exc: OSError) -> None:
        """After a failed fsync (``_sync_lock`` and ``_lock`` held): nothing after the last
        durable record is known to be on disk.  Cut it all off (records written while the
        fsync ran too), chain on from there; the emits of those records raise."""
        self._lost.append((self._durable.ticket, self._written, exc))
        # Only a record still waiting can ask about a loss: forget the others, so a disk
        # that keeps failing does not make the list (and every emit's look at it) grow.
        oldest = min(self._waiting, default=self._written + 1)
        self._lost = [lost for lost in self._lost if lost[1] >= oldest]
        self._cut_back(self._durable.size)
        self._seq, self._prev = self._durable.seq, self._durable.prev
        self._sealed = self._durable.sealed

    def _raise_if_lost(self, ticket: int) -> None:
        for after, through, why in self._lost:
            if after < ticket <= through:
                raise OSError(
                    why.errno, f"the audit record was not made durable in {self._path}: {why}"
                ) from why

    def _cut_back(self, size: int) -> None:
        try:
            os.ftruncate(self._fd, size)
            self._size = size
        except OSError:
            self._torn = size  # try again before the next record

    def close(self) -> None:
        """Close the file once every record written is on disk.

        A record may be written while its ``emit`` still waits for its fsync; it is
        synced here (no new record is written meanwhile), so that ``emit`` returns,
        or, if this fsync fails, it is cut off and that ``emit`` raises.
        """
        if self._fd >= 0:
            # If it cannot be written the records stay unsealed; `medgw audit verify` says so.
            with contextlib.suppress(OSError):
                self.checkpoint("shutdown")
        with self._sync_lock, self._lock:
            if self._fd < 0:
                return
            with contextlib.suppress(OSError):  # cut off: those emits raise
                self._flush()
            os.close(self._fd)
            self._fd = -1
            self._steps.close()


class Written:
    """Records :meth:`AuditLog.emit_later` wrote: ``wait()`` makes them durable once."""

    def __init__(
        self,
        log: AuditLog,
        ticket: int,
        owed: list[tuple[AuditEvent, datetime]],
        events: tuple[AuditEvent, ...],
        now: datetime,
    ) -> None:
        self._log = log
        self._ticket = ticket
        self._owed = owed
        self.events = events  # as given (the owed written before them are not among them)
        self._now = now
        self._done = False
        self._failed: BaseException | None = None

    def wait(self) -> None:
        if self._failed is not None:
            raise self._failed
        if self._done:
            return
        try:
            self._log._wait(self._ticket, self._owed, self.events, self._now)
        except BaseException as exc:  # not known durable: every later wait raises too
            self._failed = exc
            raise
        self._done = True


class _State(NamedTuple):
    """Where the chain is, to go back to if a write fails."""

    seq: int
    prev: str
    sealed: int
    day: date | None
    latest: datetime | None  # the latest time written (gateway.audit.order)


class _Mark(NamedTuple):
    """Where the chain stood when an fsync began: what it makes durable."""

    ticket: int
    seq: int
    prev: str
    size: int
    sealed: int  # the last checkpoint


def _late(event: AuditEvent, at: datetime) -> AuditEvent:
    """An owed record, written after its first try at ``at`` failed."""
    return replace(
        event, detail={**event.detail, "first_tried_at": at.isoformat(timespec="microseconds")}
    )


def _first_day(path: Path) -> date | None:
    with path.open("rb") as handle:
        line = handle.readline(1 << 20)
    try:
        return datetime.fromisoformat(json.loads(line)["time"]).date()
    except (ValueError, KeyError, TypeError):
        return None


class _CutShort(NamedTuple):
    """The unfinished last line of the trail's current file, cut off at start."""

    offset: int  # where it began: the file's size now
    size: int  # how many bytes it had
    sha256: str  # of those bytes
    start: bytes  # the first TORN_KEPT of them
    data: bytes | None  # all of them (None: longer than RESTORABLE)

    def event(self, path: Path) -> AuditEvent:
        """Its record: what was cut off, so that nothing leaves the file unaccounted."""
        return AuditEvent(
            EventType.AUDIT_RECORD_CUT_SHORT,
            severity=Severity.WARNING,
            reason=(
                "a record being written when the gateway was stopped (killed, or the host "
                "lost power) was left unfinished: it was never complete, so never "
                "acknowledged; its bytes were cut off the file at start and are kept here"
            ),
            detail={
                "file": str(path),
                "offset": self.offset,
                "size": self.size,
                "sha256": self.sha256,
                "text": self.start.decode("utf-8", "backslashreplace"),
            },
        )


TORN_KEPT = 1024  # bytes of an unfinished line kept in its record (all of it by its hash)
RESTORABLE = 1 << 20  # an unfinished line up to this long is put back if its record fails


def _cut_torn_tail(path: Path, fd: int, block: int = 1 << 16) -> _CutShort | None:
    """Cut off what follows the last newline of the file at ``path`` (open for writing
    as ``fd``): a record the process was writing when it died (``write`` can stop at a
    page boundary on a kill, and a power cut can keep part of what was not yet synced).
    Returns what it was.  Every complete record ends with its newline, so nothing
    complete is cut."""
    with path.open("rb") as handle:
        size = os.fstat(handle.fileno()).st_size
        end = size  # the torn part begins here
        while end > 0:
            start = max(0, end - block)
            handle.seek(start)
            chunk = handle.read(end - start)
            newline = chunk.rfind(b"\n")
            if newline >= 0:
                end = start + newline + 1
                break
            end = start
        if end == size:
            return None
        handle.seek(end)
        # All of it, to put back if its record cannot be written (no line the log writes
        # is longer); a longer one (not the log's) is kept by its hash only.
        whole = handle.read(RESTORABLE + 1)
        digest = hashlib.sha256(whole)
        while chunk := handle.read(block):
            digest.update(chunk)
    os.ftruncate(fd, end)
    data = whole if len(whole) <= RESTORABLE else None
    return _CutShort(end, size - end, digest.hexdigest(), whole[:TORN_KEPT], data)


def last_record_time(path: Path, block: int = 1 << 16) -> datetime | None:
    """The time of the newest record of the trail (None: none yet).  For recovery: what
    changed in the spool after it may lack its record."""
    return next(record_times(path, block), None)


def record_times(path: Path, block: int = 1 << 16) -> Iterator[datetime]:
    """The times of the trail's records, from the newest to the oldest."""
    for line in trail_backwards(path, block):
        try:
            yield datetime.fromisoformat(json.loads(line)["time"])
        except (ValueError, KeyError, TypeError):
            continue  # an empty or torn line


def recorded_since(
    path: Path, since: datetime, match: Callable[[dict[str, Any]], bool], block: int = 1 << 16
) -> bool:
    """Whether a record written at ``since`` or later satisfies ``match``.

    Reads the trail backwards from its end (into closed files too), so the cost is
    that of the records written since then (plus a margin for a clock set back meanwhile), whatever
    the size of the log.  Past a record stamped earlier than that, it reads on while the
    writer's notes (gateway.audit.order) say a record before it was stamped later (the
    clock was set back since): the records written before the step are read too.  For
    recovery: whether an event was recorded before a process died.
    """
    limit = since - CLOCK_MARGIN
    notes = read_notes(path)
    for line in trail_backwards(path, block):
        try:
            record = json.loads(line)
            at = datetime.fromisoformat(record["time"])
        except (ValueError, KeyError, TypeError):
            continue  # an empty or torn line
        if at < limit:
            seq = record.get("seq")
            later = notes.latest_before(seq) if isinstance(seq, int) else None
            if later is None or later < limit:
                return False
        if match(record):
            return True
    return False
