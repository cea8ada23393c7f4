"""How far the audit log has been exported: a cursor into the trail, and reading on from it.

The audit trail is the only copy of the events: what waits for the collector is
the part of the trail after the cursor (``seq`` of the last record sent, the
byte ``offset`` just after it, its ``hash``, and ``file``: the ``seq`` of the
first record of the file that offset is in).  A file is known by its first
record, not its name, so a rotation (the current file renamed, a new one
started: gateway.audit.files) does not move the cursor: reading goes on to the
end of the renamed file, then into the next one.  The cursor is kept in the
state folder (``audit-export.json``, replaced atomically), so a restart goes on
where the last run's collector had surely received everything.

While reading forward, every record's chain link is checked again (its hash,
its ``prev``, its ``seq``), also from one file to the next: an edit of the log
after it was written, or a file missing from the trail, is found here as well
as by ``medgw audit verify``, and reported at once.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import IO, Any

from gateway.audit.chain import GENESIS
from gateway.audit.files import trail_files

MAX_LINE = 1 << 20  # a record line longer than this is not one the log writes


@dataclass(frozen=True)
class Position:
    seq: int = 0
    offset: int = 0
    hash: str = GENESIS
    file: int = 0  # seq of the first record of the file ``offset`` is in; 0: the one with seq+1


@dataclass(frozen=True)
class Broken:
    """A record whose chain link does not hold."""

    seq: int | None
    offset: int
    why: str
    path: Path


@dataclass(frozen=True)
class Read:
    record: dict[str, Any]
    after: Position  # the cursor once this record is sent


def load_position(path: Path) -> Position | None:
    try:
        data = json.loads(path.read_text())
        file = int(data.get("file", 0))  # absent: written before rotation
        return Position(int(data["seq"]), int(data["offset"]), str(data["hash"]), file)
    except FileNotFoundError:
        return None
    except (ValueError, KeyError, TypeError, OSError):
        return None  # unreadable: start from the log's end, said by the caller


def save_position(path: Path, position: Position) -> None:
    temporary = path.with_name(path.name + ".tmp")
    with temporary.open("w") as handle:
        json.dump(asdict(position), handle)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(temporary, path)


def end_position(log: Path) -> Position:
    """The cursor just after the last complete record of the trail (nothing to send)."""
    for path in reversed(trail_files(log)):
        try:
            handle = path.open("rb")
        except FileNotFoundError:
            continue
        with handle:
            first = _first_seq(handle)
            size = os.fstat(handle.fileno()).st_size
            handle.seek(max(0, size - MAX_LINE))
            tail = handle.read()
        end = tail.rfind(b"\n")
        for line in reversed(tail[:end].split(b"\n") if end >= 0 else []):
            try:
                record = json.loads(line)
                offset = size - len(tail) + end + 1
                return Position(int(record["seq"]), offset, str(record["hash"]), first or 0)
            except (ValueError, KeyError, TypeError):
                continue
    return Position()


def _first_seq(handle: IO[bytes]) -> int | None:
    """The seq of the first record of an open file; the handle is left at its start."""
    handle.seek(0)
    line = handle.readline(MAX_LINE)
    handle.seek(0)
    try:
        return _int(json.loads(line)["seq"])
    except (ValueError, KeyError, TypeError):
        return None


def _open_at(log: Path, start: Position) -> tuple[list[Path], int, IO[bytes]] | None:
    """The trail's files, and the index and an open handle of the file ``start`` is in:
    the one whose first record is ``start.file``, or (``file`` 0, or that file is gone)
    the newest whose first record is at most ``start.seq + 1``."""
    files = trail_files(log)
    fallback: tuple[int, IO[bytes]] | None = None
    for index in range(len(files) - 1, -1, -1):
        try:
            handle = files[index].open("rb")
        except FileNotFoundError:
            continue  # renamed meanwhile: found under its new name next time
        first = _first_seq(handle)
        if start.file and first == start.file:
            if fallback is not None:
                fallback[1].close()
            return files, index, handle
        if fallback is None and first is not None and first <= start.seq + 1:
            fallback = (index, handle)
            if not start.file:
                return files, index, handle
            continue
        handle.close()
    if fallback is None:
        return None
    return files, fallback[0], fallback[1]


def read_forward(
    log: Path,
    start: Position,
    limit: int,
    on_broken: Callable[[Broken], None],
    through: int | None = None,
) -> list[Read]:
    """Up to ``limit`` complete records after ``start``, from the file it is in and on
    into the files after it; none after seq ``through``, if given (the writer's last
    durable record: one after it may yet be cut off, and its seq taken by another).

    If that file no longer holds ``start`` where it was (it was replaced or cut, or it
    is gone and the file holding the next record is read instead), it is read from its
    beginning, skipping records up to ``start.seq``.
    """
    found: list[Read] = []
    opened = _open_at(log, start)
    if opened is None:
        return found
    files, index, handle = opened
    offset = start.offset
    if start.file and _first_seq(handle) != start.file:
        offset = -1  # not the file the cursor was in: from its start, skipping what was sent
    reader = _Reader(start, found, limit, on_broken, through)
    while True:
        with handle:
            reader.read(handle, files[index], offset)
        if len(found) >= limit or index + 1 >= len(files) or reader.held:
            return found
        index += 1
        offset = 0
        try:
            handle = files[index].open("rb")
        except FileNotFoundError:
            return found  # renamed meanwhile: read on next time
        first = _first_seq(handle)
        if first is not None and first != reader.seq + 1 and trail_files(log) != files:
            handle.close()
            return found  # a rotation happened while the files were listed: list them again


class _Reader:
    """Reads records on from one file to the next, checking each link."""

    def __init__(
        self,
        start: Position,
        found: list[Read],
        limit: int,
        on_broken: Callable[[Broken], None],
        through: int | None = None,
    ) -> None:
        self.prev, self.seq = start.hash, start.seq
        self._through = through
        self.held = False  # stopped at a record not yet durable
        self._sent = start.seq  # records up to this one were sent before
        self._found = found
        self._limit = limit
        self._on_broken = on_broken

    def read(self, handle: IO[bytes], path: Path, offset: int) -> None:
        """From ``offset`` (-1: from the start, skipping records sent before) to the end
        of the complete records of ``path``, or until ``limit`` records are found."""
        file = _first_seq(handle) or 0
        size = os.fstat(handle.fileno()).st_size
        rereading = offset < 0 or size < offset
        if offset > size:
            shorter = f"the log is shorter ({size} bytes) than when read"
            self._on_broken(Broken(None, offset, shorter, path))
        offset = 0 if rereading else offset
        handle.seek(offset)
        while len(self._found) < self._limit:
            line = handle.readline(MAX_LINE)
            if not line.endswith(b"\n"):
                break  # being written, or torn: read again later
            here = offset
            offset += len(line)
            if not line.strip():
                continue
            try:
                record = json.loads(line)
                if not isinstance(record, dict):
                    raise ValueError("not an object")
            except ValueError:
                self._on_broken(Broken(None, here, "a line that is not an audit record", path))
                continue
            number = _int(record.get("seq"))
            if rereading and number is not None and number <= self._sent:
                self.prev, self.seq = str(record.get("hash")), number  # sent before: skip
                continue
            # Held back by where the chain is, never by the seq a record claims: an edited
            # seq must not hide the record (and all after it) from the check.
            at = self.seq + 1 if number is None else min(number, self.seq + 1)
            if self._through is not None and at > self._through:
                self.held = True  # not durable yet: read again later
                break
            rereading = False
            why = _link_problem(record, line, self.prev, self.seq)
            if why is not None:
                self._on_broken(Broken(number, here, why, path))
            self.seq = number if number is not None else self.seq + 1
            self.prev = str(record.get("hash"))
            self._found.append(Read(record, Position(self.seq, offset, self.prev, file)))


def _int(value: object) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _link_problem(record: dict[str, Any], line: bytes, prev: str, seq: int) -> str | None:
    if record.get("seq") != seq + 1 or record.get("prev") != prev:
        return f"chain broken before record {record.get('seq')} (expected seq {seq + 1})"
    claimed = record.get("hash")
    # The log writes each record in canonical form with its hash among the sorted keys:
    # without that member, the line is what was hashed (no second serialisation).  A line
    # not in that form was not written so by the log, and is reported like an edit.
    member = f'"hash":"{claimed}"'.encode()
    body = line.rstrip(b"\n").replace(member + b",", b"", 1)
    if body == line.rstrip(b"\n"):
        body = body.replace(b"," + member, b"", 1)
    if not isinstance(claimed, str) or hashlib.sha256(body).hexdigest() != claimed:
        return f"record {record.get('seq')} was altered after it was written"
    return None


def waiting_bytes(log: Path, position: Position) -> int:
    """How many bytes of the trail are after ``position``: what waits to be sent."""
    opened = _open_at(log, position)
    if opened is None:
        return 0
    files, index, handle = opened
    with handle:
        size = os.fstat(handle.fileno()).st_size
        here = _first_seq(handle) == position.file or not position.file
    waiting = max(0, size - position.offset) if here else size
    for path in files[index + 1 :]:
        try:
            waiting += path.stat().st_size
        except FileNotFoundError:
            continue
    return waiting


def skip_to(log: Path, keep_bytes: int) -> tuple[Position, dict[str, Any]] | None:
    """The cursor before the first complete record in the last ``keep_bytes`` of the
    trail, and that record (None when there is none)."""
    files = trail_files(log)
    remaining = keep_bytes
    newer: list[Path] = []  # the files after the one looked in, oldest first
    for number, path in enumerate(reversed(files)):
        try:
            handle = path.open("rb")
        except FileNotFoundError:
            continue
        with handle:
            size = os.fstat(handle.fileno()).st_size
            if size < remaining and number < len(files) - 1:
                remaining -= size
                newer.insert(0, path)
                continue
            found = _first_record_after(handle, max(0, size - remaining))
        if found is not None:
            return found
        break
    for path in newer:  # none after the cut in that file: the first of the next one
        try:
            with path.open("rb") as handle:
                found = _first_record_after(handle, 0)
        except FileNotFoundError:
            continue
        if found is not None:
            return found
    return None


def _first_record_after(handle: IO[bytes], offset: int) -> tuple[Position, dict[str, Any]] | None:
    file = _first_seq(handle) or 0
    handle.seek(offset)
    if offset:
        offset += len(handle.readline(MAX_LINE))  # the rest of a record cut in two
    while True:
        line = handle.readline(MAX_LINE)
        if not line.endswith(b"\n"):
            return None
        try:
            record = json.loads(line)
            seq = int(record["seq"])
            return Position(seq - 1, offset, str(record["prev"]), file), record
        except (ValueError, KeyError, TypeError):
            offset += len(line)
