"""Work handed in by many tasks at once, done in groups: one worker-thread trip, one
spool transaction and one audit write for each group instead of each item.

The first item handed in while nothing is being done starts a group, at once when no
other item is on its way (no waiting for company: an idle gateway answers as fast as
before); items handed in while a group is in its worker thread make up the next group,
up to ``limit``.  Under load the groups grow by themselves, as group commit does (see
gateway.spool.groupcommit, gateway.audit.log).

Items the callers have announced as on their way (:meth:`Batches.coming`: a send whose
request is out, whose answer will be handed in) are waited for, for at most ``linger``
seconds, before a group goes to its thread: answers arriving a few milliseconds apart
share one trip, one transaction and one audit write instead of each starting a group
of its own.  A group waits for nothing once it is full or nothing more is on its way.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Iterator, Sequence
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
        linger: float = 0.0,
    ) -> None:
        self._ctx = context
        self._work = work
        self._limit = limit
        self._at_once = at_once  # groups in their worker threads at the same time
        self._linger = linger  # the longest a group waits for the items on their way
        self._waiting: list[tuple[T, asyncio.Future[None]]] = []
        self._workers: set[asyncio.Task[None]] = set()
        self._coming = 0  # items announced as on their way (coming), not yet handed in
        self._changed = asyncio.Event()  # an item handed in, or one on its way no longer

    @property
    def waiting(self) -> int:
        """Items handed in and not yet taken into a group (for tests)."""
        return len(self._waiting)

    @contextlib.contextmanager
    def coming(self) -> Iterator[None]:
        """While this lasts, an item is on its way (its caller hands it in with :meth:`do`
        right after, or not at all): a group about to start waits for it, up to
        ``linger`` seconds."""
        self._coming += 1
        try:
            yield
        finally:
            self._coming -= 1
            self._changed.set()

    async def do(self, item: T) -> None:
        """Return once ``item`` is done with its group; raise what kept it from being
        done.  Cancelled (shutdown), it still waits for its group to finish, so nothing
        is left half-recorded when the spool is closed."""
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiting.append((item, done))
        self._changed.set()
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
        stopping = False
        while self._waiting:
            if not stopping:
                try:
                    await self._company()
                except asyncio.CancelledError:
                    # The items handed in are still done (their callers wait for them,
                    # see do), without waiting for more; then the cancellation goes on.
                    stopping = True
                    task = asyncio.current_task()
                    if task is not None:
                        task.uncancel()
                if not self._waiting:
                    break  # another group, lingering beside this one, took them
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
        if stopping:
            raise asyncio.CancelledError

    async def _company(self) -> None:
        """Wait, up to ``linger`` seconds, for the items on their way to join the group
        about to start; at once if it is full or none is on its way."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._linger
        while self._coming > 0 and len(self._waiting) < self._limit:
            left = deadline - loop.time()
            if left <= 0:
                return
            self._changed.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._changed.wait(), left)
