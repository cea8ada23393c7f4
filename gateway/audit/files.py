"""The files of one audit trail, in order: the closed ones, then the one being written.

The writer appends to the configured file (``[storage] audit_log``, e.g.
``audit.jsonl``).  When it rotates, it renames that file to
``<name>-YYYYMMDDTHHMMSSZ<suffix>`` (the UTC time it was closed, e.g.
``audit-20261205T000000Z.jsonl``) and starts a new one; the chain goes on
across files.  The names sort in time order, before the current file's: what
``ls`` shows is the trail from its oldest record to its newest.

:func:`trail_files` is the one place that says which files make up a trail and
in which order: verification, review queries, the export cursor and the
writer itself (continuing the chain after a restart) all read the set from it.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

STAMP = "%Y%m%dT%H%M%SZ"  # a closed file's name: when it was closed, UTC, to the second
_STAMP_PATTERN = r"\d{8}T\d{6}Z"


def closed_name(current: Path, at: datetime) -> Path:
    """The name ``current`` gets when it is closed at ``at``."""
    stamp = at.astimezone(UTC).strftime(STAMP)
    return current.with_name(f"{current.stem}-{stamp}{current.suffix}")


def closed_at(current: Path, closed: Path) -> datetime | None:
    """When ``closed`` (a closed file of ``current``'s trail) was closed; None if it is not one."""
    pattern = re.escape(current.stem) + "-(" + _STAMP_PATTERN + ")" + re.escape(current.suffix)
    found = re.fullmatch(pattern, closed.name)
    if found is None:
        return None
    return datetime.strptime(found.group(1), STAMP).replace(tzinfo=UTC)


def is_closed_name(path: Path) -> bool:
    """Whether ``path`` is named as a closed file of some trail (``NAME-STAMP.SUFFIX``)."""
    return re.fullmatch(r".*-" + _STAMP_PATTERN + r"(\.[^.]*)?", path.name) is not None


def closed_files(current: Path) -> list[Path]:
    """The closed files of the trail whose current file is ``current``, oldest first."""
    try:
        names = os.listdir(current.parent)
    except FileNotFoundError:
        return []
    found = [current.with_name(n) for n in names if closed_at(current, current.with_name(n))]
    return sorted(found, key=lambda p: p.name)  # the fixed-width stamp sorts in time order


def trail_files(current: Path) -> list[Path]:
    """Every file of the trail, oldest first: the closed files, then ``current`` if it exists.

    ``current`` may be missing between two steps of a rotation (renamed, the new one
    not yet created): the trail then ends with the last closed file.
    """
    files = closed_files(current)
    if current.exists():
        files.append(current)
    return files


def backwards(path: Path, block: int = 1 << 16) -> Iterator[bytes]:
    """The lines of ``path`` from the last to the first (none if it does not exist)."""
    try:
        handle = path.open("rb")
    except FileNotFoundError:
        return
    with handle:
        end = handle.seek(0, os.SEEK_END)
        rest = b""
        while end > 0:
            start = max(0, end - block)
            handle.seek(start)
            lines = (handle.read(end - start) + rest).split(b"\n")
            end = start
            rest = lines.pop(0) if start > 0 else b""  # may be cut: read with the block before
            yield from reversed(lines)


def trail_backwards(current: Path, block: int = 1 << 16) -> Iterator[bytes]:
    """The lines of the whole trail from the newest to the oldest."""
    if current.exists():
        yield from backwards(current, block)
    for path in reversed(closed_files(current)):
        yield from backwards(path, block)


def first_seq(path: Path) -> int | None:
    """The sequence number of the first record of ``path`` (None: empty, missing or torn)."""
    try:
        with path.open("rb") as handle:
            line = handle.readline(1 << 20)
    except FileNotFoundError:
        return None
    try:
        seq = json.loads(line)["seq"]
    except (ValueError, KeyError, TypeError):
        return None
    return seq if isinstance(seq, int) and not isinstance(seq, bool) else None
