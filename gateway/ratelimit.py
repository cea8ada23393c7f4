"""How much one source may put into the audit trail or the log in a minute.

Anyone who can open a connection can make the gateway record something: a
refused API token, a failed TLS handshake, a health check that connects and
hangs up.  Each is worth recording, but not ten thousand times a minute: that
would bury the records that matter, fill the disk and cost an fsync each.
:class:`SourceBudget` passes the first ``per_window`` events of each source in
a window one by one and counts the rest; when the window is over, the caller
writes one record with the count (:meth:`SourceBudget.closed`).  So every
event is accounted for, and what one source can write is bounded.  The number
of sources tracked at once is bounded too: beyond ``max_sources`` they share
one budget, :data:`OTHER_SOURCES`.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field

from gateway.clock import Clock

OTHER_SOURCES = "other sources"  # where sources beyond max_sources are counted
NOTES_KEPT = 8  # distinct notes (say, addresses) remembered per window
IPV6_SOURCE_PREFIX = 64  # one IPv6 host (one subscriber, one VM) holds a whole /64


def address_source(address: str) -> str:
    """The source a remote address is counted as: an IPv4 address itself, an IPv6
    address its /64.  Whoever holds one IPv6 address can send from any other of its
    /64; counted one by one, a single host would get a fresh budget per connection and
    could fill every tracked source."""
    try:
        ip = ipaddress.ip_address(address.partition("%")[0])  # without a zone (fe80::1%eth0)
    except ValueError:
        return address
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:  # ::ffff:192.0.2.1 on a dual-stack socket
            return str(ip.ipv4_mapped)
        return str(ipaddress.IPv6Network((ip, IPV6_SOURCE_PREFIX), strict=False))
    return str(ip)


@dataclass
class Window:
    """One source's window: events passed, events only counted, what they noted."""

    source: str
    start: float  # the clock's monotonic seconds
    passed: int = 0
    held_back: int = 0
    notes: list[str] = field(default_factory=list)
    more_notes: bool = False  # more distinct notes than NOTES_KEPT


class SourceBudget:
    def __init__(
        self,
        clock: Clock,
        *,
        per_window: int,
        window_seconds: float = 60.0,
        max_sources: int = 256,
    ) -> None:
        self._clock = clock
        self.per_window = per_window
        self.window_seconds = window_seconds
        self._max_sources = max_sources
        self._windows: dict[str, Window] = {}
        self._over: list[Window] = []  # ended while their source was quiet, not yet taken

    def admit(self, source: str, note: str | None = None) -> bool:
        """Count an event of ``source``; True if it is to be recorded one by one."""
        now = self._clock.monotonic()
        window = self._windows.get(source)
        if window is not None and now - window.start >= self.window_seconds:
            self._over.append(self._windows.pop(source))
            window = None
        if window is None:
            if source != OTHER_SOURCES and len(self._windows) >= self._max_sources:
                return self.admit(OTHER_SOURCES, note or source)
            window = self._windows[source] = Window(source, now)
        if note is not None and note not in window.notes:
            if len(window.notes) < NOTES_KEPT:
                window.notes.append(note)
            else:
                window.more_notes = True
        if window.passed < self.per_window:
            window.passed += 1
            return True
        window.held_back += 1
        return False

    def closed(self, *, everything: bool = False) -> list[Window]:
        """The windows that are over (every window with ``everything``) in which events
        were held back: each needs one record with its count.  They are forgotten."""
        now = self._clock.monotonic()
        over, self._over = self._over, []
        for source, window in list(self._windows.items()):
            if everything or now - window.start >= self.window_seconds:
                over.append(self._windows.pop(source))
        return [w for w in over if w.held_back]
