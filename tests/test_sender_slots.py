"""A peer's sender: a message the peer has taken is settled (receipt stored, verified,
recorded) without holding one of the peer's connections, within a bound; with no
connection free, a wakeup does not make it ask the spool for work.

The sender loop is the daemon's own (gateway.daemon.sending); the sending pipeline
under it is a stand-in that records what the loop asks of it and holds every message
in its settling step until the test lets it go, which a real peer cannot be made to
do at an exact moment.  The real pipeline's settling, and its crash guarantees, are
tested end to end in tests/test_crash.py, tests/test_exactly_once.py and
tests/test_async_receipts.py.
"""

from __future__ import annotations

import asyncio
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
from gateway.daemon.sending import PEER_IDLE_CHECK_SECONDS, SETTLING_PER_PEER, Senders
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


async def wait_for(condition: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + DEADLINE
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.01)


async def test_messages_being_settled_free_their_connections_up_to_a_bound(
    tmp_path: Path,
) -> None:
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
    total = PARALLEL_SENDS_PER_PEER + SETTLING_PER_PEER + 5
    pipeline = HeldPipeline(total)
    senders = Senders(
        lambda: state,  # type: ignore[arg-type, return-value]
        parts,  # type: ignore[arg-type]
        pipeline,  # type: ignore[arg-type]
        tasks,
        random.Random(1),
    )
    senders.sync()
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
