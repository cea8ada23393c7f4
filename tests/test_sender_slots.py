"""A peer's sender: a message the peer has taken is settled (receipt stored, verified,
recorded) without holding one of the peer's connections, within a bound; with no
connection free, a wakeup does not make it ask the spool for work; while sends are
under way, more are claimed several at a time.

The sender loop is the daemon's own (gateway.daemon.sending); the sending pipeline
under it is a stand-in that records what the loop asks of it and holds every message
in its settling step until the test lets it go, which a real peer cannot be made to
do at an exact moment.  The real pipeline's settling, and its crash guarantees, are
tested end to end in tests/test_crash.py, tests/test_exactly_once.py and
tests/test_async_receipts.py.
"""

from __future__ import annotations

import asyncio
import functools
import io
import itertools
import random
import time
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from gateway.audit.log import AuditLog
from gateway.clock import SystemClock
from gateway.daemon.sending import (
    CLAIM_AT_LEAST,
    PEER_IDLE_CHECK_SECONDS,
    SETTLING_PER_PEER,
    Senders,
)
from gateway.daemon.state import PARALLEL_SENDS_PER_PEER
from gateway.daemon.tasks import Tasks
from gateway.logs import make_logger
from gateway.spool import SqliteSpool

DEADLINE = 30.0


class HeldPipeline:
    """Hands out ``due`` messages; each send is taken by the peer at once (``posted``),
    then stays in its settling step until ``release`` is set."""

    def __init__(self, due: int) -> None:
        self.wakeups: dict[str, asyncio.Event] = {}
        self.due = [f"<m{i}@lab>" for i in range(due)]
        self.sending: set[str] = set()  # POSTs under way (the peer has not taken them yet)
        self.settling: set[str] = set()
        self.most_sending = 0
        self.settled: list[str] = []
        self.release = asyncio.Event()
        self.asked: list[tuple[float, int]] = []  # (when, free) of every due_for_sending

    async def due_for_sending(self, peer: Any, now: float, free: int) -> tuple[list[Any], None]:
        self.asked.append((time.monotonic(), free))
        claimed, self.due = self.due[:free], self.due[free:]
        return [SimpleNamespace(message_id=m) for m in claimed], None

    async def send_one(
        self,
        record: Any,
        peer: Any,
        client: Any,
        rng: random.Random,
        posted: Callable[[], None] | None = None,
    ) -> float:
        self.sending.add(record.message_id)
        self.most_sending = max(self.most_sending, len(self.sending))
        await asyncio.sleep(0)  # the POST
        self.sending.discard(record.message_id)
        self.settling.add(record.message_id)
        if posted is not None:
            posted()
        await self.release.wait()  # settling: the receipt stored, verified, recorded
        self.settling.discard(record.message_id)
        self.settled.append(record.message_id)
        return 0.0


class PacedPipeline(HeldPipeline):
    """Each POST lasts until the test ends it (``finish``); settling is immediate.
    Notes how many were being sent at each claim, and how many it took."""

    def __init__(self, due: int) -> None:
        super().__init__(due)
        self.posts: dict[str, asyncio.Event] = {}
        self.claims: list[tuple[int, int, int]] = []  # (free, being sent, claimed)
        self.release.set()

    async def due_for_sending(self, peer: Any, now: float, free: int) -> tuple[list[Any], None]:
        sending = len(self.sending)
        claimed, _ = await super().due_for_sending(peer, now, free)
        self.claims.append((free, sending, len(claimed)))
        return claimed, None

    async def send_one(
        self,
        record: Any,
        peer: Any,
        client: Any,
        rng: random.Random,
        posted: Callable[[], None] | None = None,
    ) -> float:
        self.sending.add(record.message_id)
        await self.posts.setdefault(record.message_id, asyncio.Event()).wait()
        self.sending.discard(record.message_id)
        self.settled.append(record.message_id)
        return 0.0

    def finish(self) -> None:
        """End the POST that began first of those under way."""
        for message_id in sorted(self.sending, key=lambda m: int(m[2:-5])):
            self.posts.setdefault(message_id, asyncio.Event()).set()
            return


def _senders(tmp_path: Path, pipeline: HeldPipeline) -> tuple[Senders, Tasks, SqliteSpool]:
    clock = SystemClock()
    log = make_logger(stream=io.StringIO())
    spool = SqliteSpool(tmp_path / "spool.sqlite3", clock)
    audit = AuditLog(tmp_path / "audit.jsonl", clock, node="lab")
    peer = SimpleNamespace(name="hospital")
    state = SimpleNamespace(
        config=SimpleNamespace(
            peers=[peer], peer=lambda name: peer if name == "hospital" else None
        ),
        trust={"hospital": SimpleNamespace(unusable=None)},
        clients={"hospital": None},
    )
    parts = SimpleNamespace(spool=spool, audit=audit, log=log, clock=clock)
    tasks = Tasks(lambda: audit, log, clock)
    senders = Senders(
        lambda: state,  # type: ignore[arg-type, return-value]
        parts,  # type: ignore[arg-type]
        pipeline,  # type: ignore[arg-type]
        tasks,
        random.Random(1),
    )
    senders.sync()
    return senders, tasks, spool


async def test_while_sends_are_under_way_more_are_claimed_several_at_a_time(
    tmp_path: Path,
) -> None:
    """Each send that ends frees a connection; the sender claims more only once
    CLAIM_AT_LEAST are free (one claim, one transaction for them), or at once when
    none is being sent: the connections are used, and claims come in groups."""
    total = 3 * PARALLEL_SENDS_PER_PEER
    pipeline = PacedPipeline(total)
    senders, tasks, spool = _senders(tmp_path, pipeline)
    try:
        await wait_for(
            lambda: len(pipeline.sending) == PARALLEL_SENDS_PER_PEER, "every connection used"
        )
        for ended in range(1, total + 1):  # one send ends at a time
            pipeline.finish()
            await wait_for(
                functools.partial(lambda n: len(pipeline.settled) >= n, ended), "the send to end"
            )
        claims = [(free, sent) for free, sent, _ in pipeline.claims if free > 0]
        assert claims[0] == (PARALLEL_SENDS_PER_PEER, 0)
        assert all(free >= CLAIM_AT_LEAST or sent == 0 for free, sent in claims), claims
        # Each claim that found work took CLAIM_AT_LEAST or more, or what was left.
        took = [n for _, _, n in pipeline.claims if n]
        assert sum(took) == total and all(n >= CLAIM_AT_LEAST for n in took[:-1]), took
    finally:
        for event in pipeline.posts.values():
            event.set()
        tasks.stopping = True
        await senders.stop(DEADLINE)
        spool.close()


async def wait_for(condition: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + DEADLINE
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.01)


async def test_messages_being_settled_free_their_connections_up_to_a_bound(
    tmp_path: Path,
) -> None:
    total = PARALLEL_SENDS_PER_PEER + SETTLING_PER_PEER + 5
    pipeline = HeldPipeline(total)
    senders, tasks, spool = _senders(tmp_path, pipeline)
    try:
        bound = PARALLEL_SENDS_PER_PEER + SETTLING_PER_PEER
        # Every message the peer took is held in settling; the connections it freed
        # were used for the next ones, until the bound on settling stops the sender.
        await wait_for(lambda: len(pipeline.settling) == bound, f"{bound} messages settling")
        assert len(pipeline.due) == total - bound  # the rest wait in the queue, unclaimed
        assert pipeline.most_sending <= PARALLEL_SENDS_PER_PEER
        # Documents queued meanwhile wake the sender; with no connection free it asks
        # the spool nothing (a worker thread and transactions each time), but once
        # every PEER_IDLE_CHECK_SECONDS (what expires meanwhile).
        for _ in range(20):
            pipeline.wakeups["hospital"].set()
            await asyncio.sleep(0.001)
        pipeline.release.set()
        await wait_for(lambda: len(pipeline.settled) == total, "every message settled")
        assert sorted(pipeline.settled) == sorted(f"<m{i}@lab>" for i in range(total))
        for (before, _), (at, free) in itertools.pairwise(pipeline.asked):
            assert free > 0 or at - before >= PEER_IDLE_CHECK_SECONDS, pipeline.asked
    finally:
        pipeline.release.set()
        tasks.stopping = True
        await senders.stop(DEADLINE)
        spool.close()
