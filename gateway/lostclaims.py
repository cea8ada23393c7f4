"""Back-off for work whose claim this node lost before it could do it.

A sender (or the hand-over worker) that finds its claim on a message gone right
before its POST - the lease ran out while it worked, or nearly - queues the message
again unsent.  Were it due again at once, a node whose claims are lost at every try
(leases shorter than the work, a clock that jumps, a database that keeps cutting its
connections) would claim it, lose it and log it again in a tight loop.  So each
message lost in a row waits longer before it is due again: the first loss the retry
schedule's first step (``[runtime] retry_initial_seconds``), each next one twice the
one before, up to ``retry_max_seconds`` or :data:`CEILING_SECONDS`, whichever is
shorter; once a claim on it holds up to its POST, it starts again from the first
step.

The count is this node's, in memory; the wait is written in the spool (the message's
``next_attempt_at``, by this node's clock), so while it lasts no other node sends the
message either.  A message another node took over is let go, its count forgotten (that
node sends it as due).  A node that restarts starts counting again.  Counts are
dropped once a message has not been lost again for twice the ceiling, so they stay as
many as the messages lost lately.  Each message whose losses reach
:data:`PERSISTING_LOSSES` is reported once, and said to hold again once its own claim
holds: another message's claim holding says nothing about it.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

from gateway.clock import Clock

# The longest a message waits after a lost claim: a few minutes, however long the
# retry schedule's ceiling (a lost claim is no failure of the peer's).
CEILING_SECONDS = 300.0
# Losses of one message's claim in a row after which the node says, once, that its
# claims keep being lost (then again only after a claim held meanwhile).
PERSISTING_LOSSES = 5


@dataclass(frozen=True)
class Loss:
    """One more lost claim on a message: how many in a row, this one included, and how
    long the message waits before it is due again."""

    count: int
    delay: float


class LostClaims:
    """The claims this node lost in a row, per message (one per sender or hand-over
    worker; its calls may come from several worker threads at once)."""

    def __init__(self, clock: Clock) -> None:
        self._clock = clock
        self._lock = threading.Lock()
        self._counts: dict[str, tuple[int, float]] = {}  # key -> (losses, when: monotonic)
        self._pruned_at = clock.monotonic()
        # The messages whose losses reached PERSISTING_LOSSES (said so), until their
        # claim holds or they are no longer this node's.
        self._reported: set[str] = set()

    def next(self, key: str, initial: float, ceiling: float) -> Loss:
        """The loss that losing ``key``'s claim once more would be (nothing recorded
        yet: see :meth:`record`); ``initial`` and ``ceiling``: the retry schedule's."""
        count = self.losses(key) + 1
        top = max(0.0, min(ceiling, CEILING_SECONDS))
        delay = min(top, max(0.0, initial) * 2.0 ** min(count - 1, 64))
        return Loss(count, delay)

    def record(self, key: str, loss: Loss) -> bool:
        """``loss`` of ``key``'s claim happened (the message was queued again after its
        delay); True the first time the losses of this message reach PERSISTING_LOSSES
        since its claim last held (the caller says so, once)."""
        now = self._clock.monotonic()
        with self._lock:
            self._counts[key] = (loss.count, now)  # before the pruning: this one is new
            self._prune(now)
            if loss.count >= PERSISTING_LOSSES and key not in self._reported:
                self._reported.add(key)
                return True
            return False

    def held(self, key: str) -> bool:
        """A claim on ``key`` held up to its POST: its count starts again.  True if the
        node had said that this message's claims keep being lost (the caller says they
        hold again)."""
        with self._lock:
            self._counts.pop(key, None)
            if key in self._reported:
                self._reported.discard(key)
                return True
            return False

    def forget(self, key: str) -> None:
        """``key`` is no longer this node's (another node took it over, or it was
        settled): its count goes."""
        with self._lock:
            self._counts.pop(key, None)
            self._reported.discard(key)

    def losses(self, key: str) -> int:
        """How many times in a row ``key``'s claim was lost (0: none lately)."""
        with self._lock:
            return self._counts.get(key, (0, 0.0))[0]

    def _prune(self, now: float) -> None:
        """Drop the counts of messages not lost again for twice the ceiling (sent by
        another node, cancelled, or claimed and sent since): once per ceiling at most."""
        if now - self._pruned_at < CEILING_SECONDS:
            return
        self._pruned_at = now
        old = now - 2 * CEILING_SECONDS
        for key in [k for k, (_, at) in self._counts.items() if at < old]:
            del self._counts[key]
            self._reported.discard(key)
