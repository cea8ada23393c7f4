"""Clocks for tests: time that moves only when the test says so, or runs ahead of the
system's by as much as the test says."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from gateway.clock import SystemClock


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

    def boottime(self) -> float:
        return self.monotonic()


@dataclass
class SetClock:
    """Time that stands where the test set it (``at``) until the test moves it."""

    at: datetime = datetime(2026, 11, 27, 3, 0, tzinfo=UTC)

    def now(self) -> datetime:
        return self.at

    def monotonic(self) -> float:
        return self.at.timestamp()

    def boottime(self) -> float:
        return self.monotonic()

    def advance(self, seconds: float) -> None:
        """Move the time on by ``seconds``."""
        self.at += timedelta(seconds=seconds)


@dataclass
class SecondsClock:
    """Time kept as seconds since the epoch (``seconds``), moved on by the test."""

    seconds: float = 1000.0

    def now(self) -> datetime:
        return datetime.fromtimestamp(self.seconds, UTC)

    def monotonic(self) -> float:
        return self.seconds

    def boottime(self) -> float:
        return self.monotonic()


class LaterClock(SystemClock):
    """The system's clock, moved forward by ``ahead`` seconds (its monotonic and boot
    readings by ``monotonic_ahead`` more)."""

    ahead = 0.0
    monotonic_ahead = 0.0

    def now(self) -> datetime:
        return super().now() + timedelta(seconds=self.ahead)

    def monotonic(self) -> float:
        return super().monotonic() + self.ahead + self.monotonic_ahead

    def boottime(self) -> float:
        return super().boottime() + self.ahead + self.monotonic_ahead
