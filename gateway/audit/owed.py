"""The records that changes committed in the spool owe, found missing from a trail.

A change an audit record follows is committed first and its record written after it; a
kill in between cuts the record off.  At start, recovery asks which of the records the
changes since the trail's last record owe are not in it, and writes those, marked
(:data:`RECOVERED`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol, TypeVar

from gateway.audit.events import AuditEvent, EventType
from gateway.audit.log import CLOCK_MARGIN, AuditSink, record_times, recorded_since
from gateway.logs import Logger

RECOVERED = (
    "recorded at recovery: the change was committed before an interruption cut off its record"
)
# The records owed that another node's later change of the row does not displace (see
# gateway.spool.schema.DISPLACES): the row keeps who queued a message (queued_by), and
# that node's start finds its message.accepted by that, whoever changed the row since.
KEPT_BY_ROW = frozenset({EventType.MESSAGE_ACCEPTED.value})
EVER = datetime.min.replace(tzinfo=UTC)


class OwingRow(Protocol):
    @property
    def audit_owed_at(self) -> str | None: ...


R = TypeVar("R", bound=OwingRow)


def owed_since(rows: Sequence[R], since: datetime) -> list[R]:
    """Of ``rows`` (each as a change that owes a record left it), those whose change was
    made at ``since`` or later: the others' records are in the trail."""
    return [
        row
        for row in rows
        if row.audit_owed_at is not None and datetime.fromisoformat(row.audit_owed_at) >= since
    ]


def changes_since(trail: Path, now: datetime | None = None) -> datetime:
    """From when on a change committed in the spool may lack its record in ``trail``:
    its last record's time (less the margin of a clock set back), or ever (none).

    With the clock at this start (``now``) behind that record by more than the margin, the
    clock was set back after it was written (or it was written ahead): a change made since
    was stamped before it, by how much the trail cannot say.  From the newest record the
    clock has passed then (a clock set right was set to a time after it), or ever if none
    has been: the records stamped ahead are read back once, at this start."""
    times = record_times(trail)
    last = next(times, None)
    if last is None:
        return EVER
    if now is None or now >= last - CLOCK_MARGIN:
        return last - CLOCK_MARGIN
    passed = next((at for at in times if at <= now), None)
    return EVER if passed is None else passed - CLOCK_MARGIN


@dataclass(frozen=True)
class Owed:
    """A record a change owes: one of ``events`` about ``message_id`` (from or to
    ``peer``, if given), written at ``at`` or later (``exact``: the spool said when the
    change was made); or, not ``exact`` (judged from a row's state), any one written
    since ``at``, less the clock's margin."""

    events: frozenset[str]
    message_id: str
    at: datetime
    peer: str | None = None
    exact: bool = True


def unrecorded(trail: Path, owed: Sequence[Owed]) -> list[Owed]:
    """Those of ``owed`` that ``trail`` lacks, reading it back only as far as the oldest
    needs."""
    if not owed:
        return []
    latest: dict[tuple[object, object, object], datetime] = {}
    messages = {one.message_id for one in owed}  # only theirs kept: a long read stays small

    def seen(event: dict[str, Any]) -> bool:
        if event.get("message_id") not in messages:
            return False
        at = datetime.fromisoformat(event["time"])
        for peer in (event.get("peer"), None):
            key = (event.get("event"), event.get("message_id"), peer)
            latest[key] = max(at, latest.get(key, at))
        return False  # read on, as far back as the oldest needs

    recorded_since(trail, min(one.at for one in owed), seen)

    def recorded(one: Owed) -> bool:
        times = [latest.get((event, one.message_id, one.peer)) for event in one.events]
        return any(t is not None and (not one.exact or t >= one.at) for t in times)

    return [one for one in owed if not recorded(one)]


def write_unrecorded(
    trail: Path,
    owed: Sequence[tuple[Owed, Callable[[], AuditEvent]]],
    audit: AuditSink,
    log: Logger,
) -> None:
    """Write, together and in their order, the records of ``owed`` that ``trail`` lacks
    (each made only if it is written), and log each as written at recovery."""
    missing = set(unrecorded(trail, [one for one, _ in owed]))
    events = [make() for one, make in owed if one in missing]
    if not events:
        return
    audit.emit_all(events)
    for event in events:
        log.warning(
            "recovery.audit_record_written",
            audit_event=event.event.value,
            peer=event.peer,
            message_id=event.message_id,
        )
