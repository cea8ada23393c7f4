"""Time, injected: library code never reads the wall clock directly."""

from __future__ import annotations

import time
from datetime import UTC, datetime
from typing import Protocol


class Clock(Protocol):
    def now(self) -> datetime:
        """Current time, timezone-aware UTC."""
        ...

    def monotonic(self) -> float:
        """Seconds on a clock that never goes backwards (for timeouts)."""
        ...


def iso_time(epoch: float) -> str | None:
    """A spool time (seconds since the epoch; 0 = not set) as ISO 8601 with its UTC offset,
    the one form every command and API shows times in."""
    if not epoch:
        return None
    return datetime.fromtimestamp(epoch, UTC).isoformat(timespec="seconds")


def iso_seconds(text: str) -> str:
    """An ISO 8601 time as stored (microseconds, offset) shortened to seconds, offset kept."""
    try:
        return datetime.fromisoformat(text).isoformat(timespec="seconds")
    except ValueError:
        return text


class SystemClock:
    def now(self) -> datetime:
        return datetime.now(UTC)

    def monotonic(self) -> float:
        return time.monotonic()
