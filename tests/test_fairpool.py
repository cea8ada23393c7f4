"""Worker threads shared fairly: one peer's flood leaves the others a thread at once."""

from __future__ import annotations

import asyncio
import threading

import pytest

from gateway.fairpool import FairPool


async def _wait_for(predicate: object, what: str) -> None:
    for _ in range(2000):
        if predicate():  # type: ignore[operator]
            return
        await asyncio.sleep(0.005)
    raise AssertionError(f"never: {what}")


async def test_a_flooding_key_takes_its_share_and_another_key_starts_at_once() -> None:
    pool = FairPool(4, 2)
    gate = threading.Event()
    started: list[str] = []
    lock = threading.Lock()

    def job(key: str) -> str:
        with lock:
            started.append(key)
        gate.wait(30)
        return key

    flood = [asyncio.create_task(pool.run("a", job, "a")) for _ in range(10)]
    await _wait_for(lambda: started.count("a") == 2, "a's share started")
    assert pool.running("a") == 2  # not more, although threads are free
    other = asyncio.create_task(pool.run("b", lambda: "b-done"))
    assert await asyncio.wait_for(other, 10) == "b-done"  # while a's run
    assert started.count("a") == 2
    gate.set()
    assert await asyncio.gather(*flood) == ["a"] * 10
    await pool.close()


async def test_waiting_keys_are_served_in_turn_not_in_order_of_arrival() -> None:
    pool = FairPool(1, 1)
    gate = threading.Event()
    order: list[str] = []

    def job(key: str) -> None:
        gate.wait(30)
        order.append(key)

    first = asyncio.create_task(pool.run("a", job, "a0"))
    await _wait_for(lambda: pool.running("a") == 1, "the first job")
    tasks = [asyncio.create_task(pool.run("a", job, f"a{i}")) for i in range(1, 4)]
    await asyncio.sleep(0.05)
    tasks.append(asyncio.create_task(pool.run("b", job, "b1")))
    await asyncio.sleep(0.05)
    gate.set()
    await asyncio.gather(first, *tasks)
    assert order == ["a0", "a1", "b1", "a2", "a3"]  # b is not behind all of a's
    await pool.close()


async def test_a_cancelled_wait_or_run_keeps_the_accounting_true() -> None:
    pool = FairPool(2, 1)
    gate = threading.Event()
    running = asyncio.create_task(pool.run("a", gate.wait, 30))
    await _wait_for(lambda: pool.running("a") == 1, "a running")
    waiting = asyncio.create_task(pool.run("a", lambda: None))
    await asyncio.sleep(0.05)
    waiting.cancel()  # it never started: nothing to give back
    running.cancel()  # the thread goes on: its share stays taken until it returns
    with pytest.raises(asyncio.CancelledError):
        await running
    assert pool.running("a") == 1
    gate.set()
    await _wait_for(lambda: pool.running("a") == 0, "the share given back")
    assert await pool.run("a", lambda: 5) == 5
    await pool.close()


async def test_a_heavy_job_takes_its_keys_whole_share() -> None:
    pool = FairPool(4, 2)
    gate = threading.Event()
    heavy = asyncio.create_task(pool.run("a", gate.wait, 30, weight=2))
    await _wait_for(lambda: pool.running("a") == 2, "the heavy job")
    light = asyncio.create_task(pool.run("a", lambda: "a-light"))
    assert await asyncio.wait_for(pool.run("b", lambda: "b"), 10) == "b"
    assert not light.done()  # a's share is taken until its heavy job ends
    gate.set()
    assert await asyncio.wait_for(light, 10) == "a-light"
    await heavy
    await pool.close()
