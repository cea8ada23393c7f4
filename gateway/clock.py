"""Time, injected: library code never reads the wall clock directly."""

from __future__ import annotations

import sys
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

    def boottime(self) -> float:
        """Seconds on a clock that never goes backwards and, unlike :meth:`monotonic`,
        goes on while the host is suspended (for the time elapsed between two readings
        of another host's clock: the spool's leases)."""
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

    def boottime(self) -> float:
        # Linux's CLOCK_MONOTONIC (time.monotonic) stops while the host is suspended,
        # CLOCK_BOOTTIME does not; elsewhere (no systemd service) the monotonic clock.
        if sys.platform == "linux":
            return time.clock_gettime(time.CLOCK_BOOTTIME)
        return time.monotonic()
