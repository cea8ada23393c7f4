"""Where the audit trail's times go backwards: which files a review may bisect on time.

A review finds a window's first record by bisecting a file on its ``time`` and stops
reading once records are past the window (gateway.audit.query): right only while each
record is at most CLOCK_MARGIN earlier than every record before it.  A clock stepped
back (an NTP step, ``date -s``, a host started with a wrong clock and corrected later)
breaks that, and a bisecting review would miss records of the window.

So the writer notes every record stamped earlier than the latest record before it by
more than CLOCK_MARGIN (a *step back*) in ``<current file>.order`` beside the trail, one
JSON line each, made durable before the record is written.  A file that holds a step
back is read whole by a review; the others are bisected.  The writer compares the
records that follow a step back with that record's time, so a clock that stays behind
costs one line, not one per record.

The notes also name the first record of each file the writer started (its seq and
hash): only such a file is bisected.  A file begun before notes were kept (by an earlier
version, or before the notes went missing), one whose first record the notes do not
name (a trail restored or replaced under them), and files reviewed without their notes
(``--file`` copies without their ``.order``) are read whole.  Records may be slow to
review, never missed.  The file is derived data of the writer; it is not the
authority on the records (the hash chain is) and holds no patient data.
"""

from __future__ import annotations

import json
import os
from bisect import bisect_right
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path

from gateway.audit.events import AuditEvent, EventType, Severity
from gateway.audit.files import backwards, closed_at, is_closed_name
from gateway.audit.rotation import open_current

CLOCK_MARGIN = timedelta(minutes=10)  # how far back the clock may have been set: see above
SUFFIX = ".order"


def order_path(current: Path) -> Path:
    """The notes of the trail whose current file is ``current``."""
    return current.with_name(current.name + SUFFIX)


def trail_current(path: Path) -> Path:
    """The current file of the trail ``path`` is a file of (``audit-STAMP.jsonl`` is a
    closed file of ``audit.jsonl``)."""
    if not is_closed_name(path):
        return path
    stem, _, _ = path.stem.rpartition("-")
    current = path.with_name(stem + path.suffix)
    return current if closed_at(current, path) is not None else path


@dataclass(frozen=True)
class Notes:
    firsts: frozenset[tuple[int, str]]  # (seq, hash) of each file's first record, as written
    steps: tuple[int, ...]  # seq of each record that stepped back, ascending
    # (seq, time) of each step back, ascending: the latest time written before it or any
    # earlier step (so at most that, plus CLOCK_MARGIN, before it)
    latest: tuple[tuple[int, datetime], ...] = ()

    def latest_before(self, seq: int) -> datetime | None:
        """How late a record before ``seq`` may be stamped, beyond CLOCK_MARGIN after the
        record ``seq`` itself, by the steps back noted (None: no step back before it)."""
        found = bisect_right(self.latest, seq, key=lambda step: step[0])
        return self.latest[found - 1][1] if found else None


def read_notes(current: Path) -> Notes:
    """The notes of ``current``'s trail; none if missing or unreadable."""
    try:
        text = order_path(current).read_bytes()
    except OSError:
        return Notes(frozenset(), ())
    firsts: set[tuple[int, str]] = set()
    steps: dict[int, datetime | None] = {}
    for line in text.splitlines():
        try:
            note = json.loads(line)
        except ValueError:
            continue  # torn by a crash: the record it was for was never written
        if not isinstance(note, dict) or not isinstance(note.get("seq"), int):
            continue
        if isinstance(note.get("first_hash"), str):
            firsts.add((note["seq"], note["first_hash"]))
        else:
            steps[note["seq"]] = _time(note.get("latest"))
    latest: list[tuple[int, datetime]] = []
    for seq in sorted(steps):
        at = steps[seq]
        if at is not None and (not latest or at > latest[-1][1]):
            latest.append((seq, at))
    return Notes(frozenset(firsts), tuple(sorted(steps)), tuple(latest))


def _time(text: object) -> datetime | None:
    try:
        return datetime.fromisoformat(text) if isinstance(text, str) else None
    except ValueError:
        return None


def _head(path: Path) -> tuple[int, str] | None:
    """The seq and hash of the first record of ``path``."""
    try:
        with path.open("rb") as handle:
            record = json.loads(handle.readline(1 << 20))
        return int(record["seq"]), str(record["hash"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _last_seq(path: Path) -> int | None:
    for line in backwards(path):
        try:
            seq = json.loads(line)["seq"]
        except (ValueError, KeyError, TypeError):
            continue
        return seq if isinstance(seq, int) else None
    return None


def ordered(paths: Sequence[Path]) -> list[bool]:
    """For each file of ``paths`` (one trail, oldest first), whether a review may bisect
    it: it was written from its first record with notes kept (the notes name that record
    and its hash: notes of another trail, or of files since replaced, vouch for nothing),
    and none of its records stepped back."""
    notes = read_notes(trail_current(paths[-1])) if paths else Notes(frozenset(), ())
    heads = [_head(p) for p in paths]
    found: list[bool] = []
    for number, (path, head) in enumerate(zip(paths, heads, strict=True)):
        if head is None or head not in notes.firsts:
            found.append(False)
            continue
        following = heads[number + 1] if number + 1 < len(paths) else None
        last = following[0] - 1 if following is not None else _last_seq(path)
        first = head[0]
        found.append(last is not None and not any(first <= s <= last for s in notes.steps))
    return found


def _end_line(path: Path, fd: int) -> None:
    """End a line a crash left torn (its record was never written), durably, so that the
    next note begins a line of its own instead of being lost with it."""
    with path.open("rb") as handle:
        if handle.seek(0, os.SEEK_END) == 0:
            return
        handle.seek(-1, os.SEEK_END)
        if handle.read(1) == b"\n":
            return
    os.write(fd, b"\n")
    os.fsync(fd)


def _append(fd: int, note: dict[str, object]) -> None:
    """Add ``note`` to the notes, durably."""
    data = json.dumps(note, sort_keys=True, separators=(",", ":")).encode() + b"\n"
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]
    os.fsync(fd)


class Steps:
    """The writer's side: the latest time written, and a note for each step back and for
    each file's first record."""

    def __init__(self, current: Path, last_time: datetime | None) -> None:
        # The latest time in the trail is at most CLOCK_MARGIN after its last record's,
        # if that one did not step back (and if it did, its file is read whole anyway).
        self.latest = None if last_time is None else last_time + CLOCK_MARGIN
        path = order_path(current)
        self._fd = open_current(path)  # as the log: at the writer's start
        try:
            _end_line(path, self._fd)
        except OSError:
            os.close(self._fd)
            raise

    def check(self, seq: int, at: datetime) -> None:
        """Record ``seq`` is stamped ``at``: noted first if that steps back (raises
        OSError if the note cannot be written: the record is not written either)."""
        latest = self.latest
        if latest is not None and at < latest - CLOCK_MARGIN:
            _append(
                self._fd,
                {
                    "seq": seq,
                    "time": at.isoformat(timespec="microseconds"),
                    "latest": latest.isoformat(timespec="microseconds"),
                },
            )
            self.latest = at  # the records after it are compared with it
        elif latest is None or at > latest:
            self.latest = at

    def first(self, seq: int, digest: str) -> None:
        """Record ``seq``, hash ``digest``, is the first of a file: noted before it is
        written (raises OSError as :meth:`check`).  A note of a record whose write then
        fails matches no file: that file is read whole."""
        _append(self._fd, {"seq": seq, "first_hash": digest})

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


def clock_behind(last: datetime | None, now: datetime) -> AuditEvent | None:
    """The alert for a start at ``now`` on a trail whose last record is stamped ``last``,
    if the clock is behind it by more than CLOCK_MARGIN; else None.  The start goes on:
    refusing it would stop the documents over a clock."""
    if last is None or now >= last - CLOCK_MARGIN:
        return None
    behind = last - now
    return AuditEvent(
        EventType.CLOCK_BEHIND_TRAIL,
        severity=Severity.ALERT,
        reason=(
            f"this host's clock ({now.isoformat(timespec='seconds')}) is {_span(behind)} "
            f"behind the audit trail's last record ({last.isoformat(timespec='seconds')}): "
            "it was set back, or it ran ahead when that record was written; the records "
            "written now are stamped earlier than those before them (reviews read their "
            "files whole, and medgw audit verify names them); fix: check the host's clock "
            "and its time source (timedatectl; chronyc tracking or ntpq -p) and keep it "
            "synchronised"
        ),
        detail={
            "now": now.isoformat(timespec="microseconds"),
            "last_record": last.isoformat(timespec="microseconds"),
            "behind_seconds": int(behind.total_seconds()),
        },
    )


def _span(delta: timedelta) -> str:
    seconds = int(delta.total_seconds())
    if seconds >= 2 * 86400:
        return f"{seconds // 86400} days"
    if seconds >= 2 * 3600:
        return f"{seconds // 3600} hours"
    return f"{seconds // 60} minutes"
