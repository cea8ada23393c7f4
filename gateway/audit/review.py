"""The audit review (MNT-5), answered the same wherever it is asked: ``medgw audit
query`` and ``patients`` on the host, and ``audit query`` in the maintenance console.

Both read the trail's files in order, take the window's times by the same rules, and
go through the review index (:mod:`gateway.audit.index`) when it helps: for ``query``
when a filter narrows beyond the time window (a window alone is found by bisecting the
log), for ``patients`` always.  An index that cannot be written (an archived copy on
read-only media) is done without, with a note; the answer is the same, only slower.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from gateway.audit import index, query
from gateway.audit.files import trail_files
from gateway.audit.index import AuditIndexError
from gateway.audit.query import Filters, PatientAccesses
from gateway.errors import InvalidValueError

Note = Callable[[str], None]


def trail(current: Path) -> list[Path]:
    """The trail's files, oldest first (the configured file alone if there is none: it
    is then reported missing)."""
    return trail_files(current) or [current]


def since(text: str) -> datetime:
    """The start of a window: an ISO 8601 date or time, UTC if it has no offset."""
    try:
        at = datetime.fromisoformat(text)
    except ValueError:
        raise InvalidValueError(
            f"{text!r} is not an ISO 8601 date or time",
            fix="give e.g. 2026-11-01 or 2026-11-01T09:00+09:00",
        ) from None
    return at if at.tzinfo is not None else at.replace(tzinfo=UTC)


def until(text: str) -> datetime:
    """The end of a window (excluded); a date alone includes that whole day."""
    at = since(text)
    return at + timedelta(days=1) if len(text) == len("2026-11-01") else at


def _indexed(paths: Sequence[Path], use_index: bool, note: Note) -> bool:
    """Whether to read through the indexes, built or brought up to date here."""
    if not use_index:
        return False
    try:
        index.prepare(paths)
    except AuditIndexError as exc:
        note(f"{exc} (reading the log without it: slower)")
        return False
    return True


def records(
    paths: Sequence[Path], filters: Filters, *, use_index: bool = True, note: Note
) -> Iterator[dict[str, Any]]:
    """The records of ``paths`` that match ``filters``, oldest first.  Raises OSError
    if a log cannot be read, AuditIndexError if an index fails while it is read."""
    narrowed = any(
        value is not None for value in (filters.patient, filters.peer, filters.actor, filters.event)
    )
    if narrowed and _indexed(paths, use_index, note):
        return index.records(paths, filters)
    return query.records(paths, filters)


def accesses(
    paths: Sequence[Path], filters: Filters, *, use_index: bool = True, note: Note
) -> tuple[Iterable[PatientAccesses], bool]:
    """How many records name each patient (see :func:`gateway.audit.query.accesses`)."""
    if _indexed(paths, use_index, note):
        return index.accesses(paths, filters)
    return query.accesses(paths, filters)
