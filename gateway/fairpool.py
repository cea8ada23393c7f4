"""Worker threads shared fairly between peers.

Receiving a message is CPU work (decryption, verification) done in a worker
thread.  With one pool shared first come, first served, a peer sending many
expensive messages at once would take every worker, and another peer's message
would wait behind all of them.  :class:`FairPool` gives each peer (any key) at
most ``per_key`` shares of its ``workers`` threads at once (a job weighs one
share or more: an expensive one can take a peer's whole share), and when a
thread comes free it serves the peers that are waiting in turn, not in order of
arrival.  So while fewer than ``workers / per_key`` peers are busy, a message
from any other peer starts at once; beyond, it waits for at most one message of
each busy peer.
"""

from __future__ import annotations

import asyncio
import functools
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

from gateway.errors import InvalidValueError

T = TypeVar("T")


class FairPool:
    def __init__(self, workers: int, per_key: int, *, name: str = "worker") -> None:
        if not 1 <= per_key <= workers:
            raise InvalidValueError(
                f"per_key={per_key}: one key's share of {workers} workers is 1..{workers}",
                fix=f"pass a per_key from 1 to {workers}",
            )
        self._executor = ThreadPoolExecutor(max_workers=workers, thread_name_prefix=name)
        self._workers = workers
        self._per_key = per_key
        self._running: dict[str, int] = {}
        self._total = 0
        self._waiting: dict[str, deque[tuple[asyncio.Future[None], int]]] = {}
        self._turns: deque[str] = deque()  # keys with work waiting, in the order served

    def running(self, key: str) -> int:
        """The shares ``key`` holds now."""
        return self._running.get(key, 0)

    async def run(self, key: str, function: Callable[..., T], *args: object, weight: int = 1) -> T:
        """``function(*args)`` in a worker thread, when ``key``'s turn comes and ``weight``
        of its shares are free (at most ``per_key`` are ever asked for).

        Cancelled while it runs, the thread's share stays taken until the function
        returns (a thread cannot be stopped), so the accounting stays true.
        """
        weight = max(1, min(weight, self._per_key))
        await self._admit(key, weight)
        try:
            work = asyncio.get_running_loop().run_in_executor(
                self._executor, functools.partial(function, *args)
            )
        except BaseException:
            self._release(key, weight)
            raise
        work.add_done_callback(lambda _: self._release(key, weight))  # once the thread is done
        return await asyncio.shield(work)

    async def _admit(self, key: str, weight: int) -> None:
        if key not in self._waiting and self._free(key, weight):
            self._start(key, weight)
            return
        ticket: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        if key not in self._waiting:
            self._waiting[key] = deque()
            self._turns.append(key)
        self._waiting[key].append((ticket, weight))
        try:
            await ticket
        except asyncio.CancelledError:
            if ticket.done() and not ticket.cancelled():
                self._release(key, weight)  # admitted just before the cancellation
            else:
                queue = self._waiting.get(key)
                if queue is not None and (ticket, weight) in queue:
                    queue.remove((ticket, weight))
                    if not queue:
                        del self._waiting[key]
                        self._turns.remove(key)
            raise

    def _free(self, key: str, weight: int) -> bool:
        return self._total < self._workers and self._running.get(key, 0) + weight <= self._per_key

    def _start(self, key: str, weight: int) -> None:
        self._running[key] = self._running.get(key, 0) + weight
        self._total += 1

    def _release(self, key: str, weight: int) -> None:
        self._running[key] -= weight
        if not self._running[key]:
            del self._running[key]
        self._total -= 1
        self._dispatch()

    def _dispatch(self) -> None:
        """Admit waiting work, one key at a time in turn, while threads are free."""
        passed = 0  # keys looked at in a row without admitting one
        while self._turns and self._total < self._workers and passed < len(self._turns):
            key = self._turns.popleft()
            queue = self._waiting[key]
            if self._free(key, queue[0][1]):
                ticket, weight = queue.popleft()
                self._start(key, weight)
                ticket.set_result(None)
                passed = 0
            else:
                passed += 1
            if queue:
                self._turns.append(key)
            else:
                del self._waiting[key]

    async def close(self) -> None:
        """No new work; returns when what the threads run has returned."""
        await asyncio.to_thread(self._executor.shutdown, wait=True, cancel_futures=True)
