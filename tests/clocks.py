"""Clocks for tests: time that moves only when the test says so."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta


class TickingClock:
    """Each ``now()`` is one millisecond after the last: rows written one after the
    other get distinct, ordered times, as they would on a real clock."""

    def __init__(self, start: datetime = datetime(2026, 11, 27, 3, 0, tzinfo=UTC)) -> None:
        self.at = start

    def now(self) -> datetime:
        self.at += timedelta(milliseconds=1)
        return self.at

    def monotonic(self) -> float:
        return self.at.timestamp()
