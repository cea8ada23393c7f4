"""The daemon's background loops let a stop through, whatever wakes first."""

from __future__ import annotations

import asyncio
import io
from pathlib import Path

from gateway.audit import AuditLog
from gateway.daemon.tasks import Tasks
from gateway.logs import make_logger
from tests.clocks import TickingClock

ROUNDS_ALLOWED = 1000  # far more than a stop takes; a loop that spins gets there at once


def _tasks(tmp_path: Path) -> Tasks:
    clock = TickingClock()
    audit = AuditLog(tmp_path / "audit.jsonl", clock, node="vm")
    return Tasks(lambda: audit, make_logger(stream=io.StringIO()), clock)


async def test_a_loop_woken_by_the_stop_before_the_shutdown_lets_the_shutdown_run(
    tmp_path: Path,
) -> None:
    """A background loop waits for the stop before the daemon's own waiter does (the
    daemon awaited something else at its start). At the stop the loop is woken first;
    its next sleep must give the shutdown a turn, which ends the loop. Before, it went
    round without one (Python 3.12 and later), and the daemon never stopped."""
    tasks = _tasks(tmp_path)
    rounds = 0

    async def background() -> None:
        nonlocal rounds
        while not tasks.stopping:
            rounds += 1
            assert rounds < ROUNDS_ALLOWED, "the loop went round without letting the stop run"
            await tasks.sleep_unless_stopping(60)

    async def shutdown() -> None:
        await tasks.stop_requested.wait()
        tasks.stopping = True

    loop_task = asyncio.create_task(background())
    await asyncio.sleep(0)  # the loop now waits for the stop, before the shutdown does
    shutdown_task = asyncio.create_task(shutdown())
    await asyncio.sleep(0)
    tasks.stop_requested.set()
    await asyncio.wait_for(asyncio.gather(loop_task, shutdown_task), timeout=10)
    assert tasks.stopping and rounds < ROUNDS_ALLOWED


async def test_a_sleep_with_no_stop_asked_for_lasts_its_time_or_until_the_stop(
    tmp_path: Path,
) -> None:
    tasks = _tasks(tmp_path)
    loop = asyncio.get_running_loop()
    started = loop.time()
    await tasks.sleep_unless_stopping(0.05)
    assert loop.time() - started >= 0.04
    sleeper = asyncio.create_task(tasks.sleep_unless_stopping(60))
    await asyncio.sleep(0)
    tasks.stop_requested.set()
    await asyncio.wait_for(sleeper, timeout=10)
