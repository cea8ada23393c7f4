"""What the event loop asks of the spool often, answered from memory.

The AS2 handler asks, for every request, whether an operator suspended its
peer; the metrics scrape asks how many messages wait per peer and state, and the
spool database's size.  Asked
of the spool on the event loop, each held the loop while the spool's database
did not answer (up to its connect timeout with PostgreSQL), and the counts
grow with the queue (a scan of a million waiting messages takes a tenth of a
second).  Here both are kept in memory and read again in a worker thread:

* the suspensions every :data:`SUSPENSIONS_SECONDS` (a suspension made on
  another node sharing the spool is in force here within that), and at once
  when an operator suspends or resumes a peer on this node;
* the counts every :data:`COUNTS_SECONDS`, or less often when counting takes
  long, so that counting takes at most :data:`COUNTS_SHARE` of the time: the
  metrics show them as of then; the database's size with them (a PostgreSQL
  spool's is the server's ``pg_database_size``, a sum of file sizes it keeps).

While the database does not answer, the last answers stand (the requests that
need the spool are answered 503 when they reach it).  Maintained counters,
updated in every state change's transaction, would be exact but make every
change of a peer's messages, on every node, wait for one row's lock.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Mapping

from gateway.clock import Clock
from gateway.spool import Spool

SUSPENSIONS_SECONDS = 1.0
COUNTS_SECONDS = 5.0
COUNTS_SHARE = 0.05


class SpoolView:
    """The suspended peers and the message counts, kept fresh (see module doc)."""

    def __init__(self, spool: Spool, clock: Clock) -> None:
        self._spool = spool
        self._clock = clock
        self._lock = threading.Lock()
        self._suspended: frozenset[str] = frozenset()
        self._changes = 0  # suspensions changed here: a read begun before is stale
        self._counts: Mapping[tuple[str, str], int] = {}
        self._size: int | None = None  # the database's bytes (None: not read yet)
        self._counts_due = 0.0  # clock.monotonic() when the counts are read again
        self.counts_every = COUNTS_SECONDS  # seconds between two counts, by their cost

    def load(self) -> None:
        """Read both now (worker thread, or at start-up)."""
        self.read_suspensions()
        self.read_counts()

    def is_suspended(self, peer: str) -> bool:
        return peer in self._suspended

    def counts(self) -> Mapping[tuple[str, str], int]:
        """Messages per (peer, state), as of the last count."""
        return self._counts

    def size_bytes(self) -> int | None:
        """The spool database's size on disk, as of the last count (None: none yet)."""
        return self._size

    def suspension_changed(self, peer: str, suspended: bool) -> None:
        """An operator suspended or resumed ``peer`` on this node (committed)."""
        with self._lock:
            self._changes += 1
            self._suspended = self._suspended | {peer} if suspended else self._suspended - {peer}

    def read_suspensions(self) -> None:
        with self._lock:
            before = self._changes
        controls = self._spool.peer_controls()
        suspended = frozenset(name for name, c in controls.items() if c.suspended)
        with self._lock:
            if self._changes == before:  # else a change made meanwhile is newer
                self._suspended = suspended

    def read_counts(self) -> None:
        started = self._clock.monotonic()
        self._counts = self._spool.counts()
        self._size = self._spool.size_bytes()
        took = self._clock.monotonic() - started
        self.counts_every = max(COUNTS_SECONDS, took / COUNTS_SHARE)
        self._counts_due = started + self.counts_every

    async def run(self) -> None:
        """Until cancelled (a daemon's supervised loop): keep both fresh, each on its
        own, so that a long count never holds up the suspensions."""
        try:
            async with asyncio.TaskGroup() as both:  # one failing ends the other
                both.create_task(self._keep_suspensions())
                both.create_task(self._keep_counts())
        except ExceptionGroup as failed:  # as the supervisor knows it (the spool unreachable)
            raise failed.exceptions[0] from None

    async def _keep_suspensions(self) -> None:
        while True:
            await asyncio.sleep(SUSPENSIONS_SECONDS)
            await asyncio.to_thread(self.read_suspensions)

    async def _keep_counts(self) -> None:
        while True:
            await asyncio.sleep(SUSPENSIONS_SECONDS)
            if self._clock.monotonic() >= self._counts_due:
                await asyncio.to_thread(self.read_counts)
