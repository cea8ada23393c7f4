"""Work handed in by many tasks at once, done in groups: one worker-thread trip, one
spool transaction and one audit write for each group instead of each item.

The first item handed in while nothing is being done starts a group at once (no
waiting for company: an idle gateway answers as fast as before); items handed in
while a group is in its worker thread make up the next group, up to ``limit``.
Under load the groups grow by themselves, as group commit does (see
gateway.spool.groupcommit, gateway.audit.log).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from typing import Generic, TypeVar

from gateway.outbound.context import Context

T = TypeVar("T")


class Batches(Generic[T]):
    """Items done together by ``work`` (run in a worker thread), which returns, for each
    item, the error that kept it from being done (None: done)."""

    def __init__(
        self,
        context: Context,
        work: Callable[[Sequence[T]], list[Exception | None]],
        limit: int,
        at_once: int = 1,
    ) -> None:
        self._ctx = context
        self._work = work
        self._limit = limit
        self._at_once = at_once  # groups in their worker threads at the same time
        self._waiting: list[tuple[T, asyncio.Future[None]]] = []
        self._workers: set[asyncio.Task[None]] = set()

    @property
    def waiting(self) -> int:
        """Items handed in and not yet taken into a group (for tests)."""
        return len(self._waiting)

    async def do(self, item: T) -> None:
        """Return once ``item`` is done with its group; raise what kept it from being
        done.  Cancelled (shutdown), it still waits for its group to finish, so nothing
        is left half-recorded when the spool is closed."""
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiting.append((item, done))
        if len(self._workers) < self._at_once:
            worker = asyncio.get_running_loop().create_task(self._drain())
            self._workers.add(worker)
            worker.add_done_callback(self._workers.discard)
        try:
            await asyncio.shield(done)
        except asyncio.CancelledError:
            await asyncio.wait([done])
            if not done.cancelled() and (error := done.exception()) is not None:
                self._ctx.log.error(
                    "shutdown.step_failed",
                    step="settle",
                    error=str(error) or type(error).__name__,
                    fix="the message is sent again at the next start (the peer answers "
                    "with its receipt); see the spool's state with `medgw queue list`",
                )
            raise

    async def _drain(self) -> None:
        """Do groups while items are waiting."""
        while self._waiting:
            group = self._waiting[: self._limit]
            del self._waiting[: self._limit]
            try:
                errors = await self._ctx.in_thread(self._work, [item for item, _ in group])
            except asyncio.CancelledError:
                for _, done in group:
                    done.cancel()
                raise
            except Exception as exc:  # a defect in the work: every item of its group fails
                errors = [exc] * len(group)
            for (_, done), error in zip(group, errors, strict=True):
                if done.done():
                    continue
                if error is None:
                    done.set_result(None)
                else:
                    done.set_exception(error)
