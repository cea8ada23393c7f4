"""Handshake storms: many failed TLS handshakes from one source, or from all, in a window.

One failed handshake is audited as it happens (gateway.channel.server).  A
storm is one security alert (EMG-4), not one per handshake: ``tls.handshake_storm``
when at least ``per_source`` failures come from one source (an IPv4 address, an
IPv6 /64) or ``total`` failures from all sources together within one window,
and ``tls.handshake_storm_ended`` with the count once a whole window passes below
that.  While a storm lasts, the failed handshakes it is made of are recorded with
severity warning, so the storm's alert is the one that calls a person.

Memory is bounded: counts are kept for the current window only, for at most
``max_sources`` sources (beyond, a failure counts in the total only), and a
storm is kept per source only for those.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from gateway.clock import Clock

PER_SOURCE = 20  # failed handshakes from one source within a window: a storm
TOTAL = 50  # failed handshakes from all sources within a window: a storm
WINDOW_SECONDS = 60.0
MAX_SOURCES = 1024
EVERYWHERE = None  # the key of a storm from all sources together


@dataclass
class Storm:
    source: str | None  # EVERYWHERE: from all sources
    began: datetime
    began_monotonic: float
    failures: int  # since the window it was found in began
    threshold: int


@dataclass(frozen=True)
class StormNotice:
    """A storm began (``ended`` False) or ended: what to audit."""

    storm: Storm
    ended: bool
    seconds: float  # how long it has lasted
    failures: int  # its failed handshakes so far


class HandshakeStorms:
    def __init__(
        self,
        clock: Clock,
        *,
        per_source: int = PER_SOURCE,
        total: int = TOTAL,
        window_seconds: float = WINDOW_SECONDS,
        max_sources: int = MAX_SOURCES,
    ) -> None:
        self._clock = clock
        self.per_source = per_source
        self.total = total
        self.window_seconds = window_seconds
        self._max_sources = max_sources
        self._window_start = clock.monotonic()
        self._counts: dict[str, int] = {}  # this window's failures per source
        self._all = 0  # this window's failures from all sources
        self._storms: dict[str | None, Storm] = {}

    def failed(self, source: str) -> list[StormNotice]:
        """Count one failed handshake from ``source``: the storms it ends (a window
        before was quiet) or begins."""
        notices = self._roll()
        self._all += 1
        if source in self._counts or len(self._counts) < self._max_sources:
            self._counts[source] = self._counts.get(source, 0) + 1
        for key, count, threshold in (
            (source, self._counts.get(source, 0), self.per_source),
            (EVERYWHERE, self._all, self.total),
        ):
            storm = self._storms.get(key)
            if storm is not None:
                storm.failures += 1
            elif count >= threshold and (key is EVERYWHERE or source in self._counts):
                storm = Storm(key, self._clock.now(), self._clock.monotonic(), count, threshold)
                self._storms[key] = storm
                notices.append(StormNotice(storm, ended=False, seconds=0.0, failures=count))
        return notices

    def in_storm(self, source: str) -> bool:
        """Whether a failure from ``source`` is part of a storm going on."""
        return EVERYWHERE in self._storms or source in self._storms

    def tick(self, *, everything: bool = False) -> list[StormNotice]:
        """The storms that ended (every storm with ``everything``, at shutdown)."""
        notices = self._roll()
        if everything:
            now = self._clock.monotonic()
            notices += [self._ended(storm, now) for storm in self._storms.values()]
            self._storms.clear()
        return notices

    @staticmethod
    def _ended(storm: Storm, now: float) -> StormNotice:
        return StormNotice(storm, True, now - storm.began_monotonic, storm.failures)

    def _roll(self) -> list[StormNotice]:
        """At the end of a window: the storms that stayed below their threshold in it end."""
        now = self._clock.monotonic()
        if now - self._window_start < self.window_seconds:
            return []
        ended: list[StormNotice] = []
        for key, storm in list(self._storms.items()):
            count = self._all if key is EVERYWHERE else self._counts.get(key, 0)
            if count < storm.threshold or now - self._window_start >= 2 * self.window_seconds:
                ended.append(self._ended(storm, now))
                del self._storms[key]
        self._counts = {}
        self._all = 0
        self._window_start = now
        return ended
