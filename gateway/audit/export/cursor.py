"""How far the audit log has been exported: a cursor into the log, and reading on from it.

The audit log is the only copy of the events: what waits for the collector is
the part of the log after the cursor (``seq`` of the last record sent, the
byte ``offset`` just after it, its ``hash``).  The cursor is kept in the state
folder (``audit-export.json``, replaced atomically), so a restart goes on where
the last run's collector had surely received everything.

While reading forward, every record's chain link is checked again (its hash,
its ``prev``, its ``seq``): an edit of the log after it was written is found
here as well as by ``medgw audit verify``, and reported at once.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from gateway.audit.chain import GENESIS

MAX_LINE = 1 << 20  # a record line longer than this is not one the log writes


@dataclass(frozen=True)
class Position:
    seq: int = 0
    offset: int = 0
    hash: str = GENESIS


@dataclass(frozen=True)
class Broken:
    """A record whose chain link does not hold."""

    seq: int | None
    offset: int
    why: str


@dataclass(frozen=True)
class Read:
    record: dict[str, Any]
    after: Position  # the cursor once this record is sent


def load_position(path: Path) -> Position | None:
    try:
        data = json.loads(path.read_text())
        return Position(int(data["seq"]), int(data["offset"]), str(data["hash"]))
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
    """The cursor just after the last complete record of ``log`` (nothing to send)."""
    try:
        size = log.stat().st_size
    except FileNotFoundError:
        return Position()
    with log.open("rb") as handle:
        handle.seek(max(0, size - MAX_LINE))
        tail = handle.read()
    end = tail.rfind(b"\n")
    if end < 0:
        return Position()
    lines = tail[:end].split(b"\n")
    for line in reversed(lines):
        try:
            record = json.loads(line)
            return Position(int(record["seq"]), size - len(tail) + end + 1, str(record["hash"]))
        except (ValueError, KeyError, TypeError):
            continue
    return Position()


def read_forward(
    log: Path, start: Position, limit: int, on_broken: Callable[[Broken], None]
) -> list[Read]:
    """Up to ``limit`` complete records after ``start``.

    If the log no longer holds ``start`` where it was (it was replaced or cut), it
    is read from its beginning, skipping records up to ``start.seq``.
    """
    found: list[Read] = []
    try:
        handle = log.open("rb")
    except FileNotFoundError:
        return found
    with handle:
        size = os.fstat(handle.fileno()).st_size
        offset = start.offset
        rereading = size < offset
        if rereading:
            on_broken(Broken(None, offset, f"the log is shorter ({size} bytes) than when read"))
            offset = 0
        handle.seek(offset)
        prev, seq = start.hash, start.seq
        while len(found) < limit:
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
                on_broken(Broken(None, here, "a line that is not an audit record"))
                continue
            number = _int(record.get("seq"))
            if rereading and number is not None and number <= start.seq:
                prev, seq = str(record.get("hash")), number  # sent before: skip
                continue
            rereading = False
            why = _link_problem(record, line, prev, seq)
            if why is not None:
                on_broken(Broken(_int(record.get("seq")), here, why))
            seq = number if number is not None else seq + 1
            prev = str(record.get("hash"))
            found.append(Read(record, Position(seq, offset, prev)))
    return found


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


def skip_to(log: Path, keep_bytes: int) -> tuple[Position, dict[str, Any]] | None:
    """The cursor before the first complete record in the last ``keep_bytes`` of ``log``,
    and that record (None when there is none)."""
    with log.open("rb") as handle:
        size = os.fstat(handle.fileno()).st_size
        offset = max(0, size - keep_bytes)
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
                return Position(seq - 1, offset, str(record["prev"])), record
            except (ValueError, KeyError, TypeError):
                offset += len(line)
