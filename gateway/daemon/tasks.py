"""The daemon's background tasks: started, supervised (started again after a
failure), and stopped together."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any

from gateway.audit import AuditEvent, AuditSink, EventType, Outcome, Severity
from gateway.clock import Clock
from gateway.errors import SpoolUnreachableError
from gateway.logs import Logger

SUPERVISED_MAX_PAUSE = 30.0  # a failing loop is started again at most this long after


class Tasks:
    """Long-lived loops and one-off background work of one daemon run."""

    def __init__(self, audit: Callable[[], AuditSink], log: Logger, clock: Clock) -> None:
        self._audit = audit
        self._log = log
        self._clock = clock
        self.stop_requested = asyncio.Event()  # SIGTERM / SIGINT
        self.stopping = False  # set once the shutdown has begun
        self._background: set[asyncio.Task[Any]] = set()

    def spawn(self, coro: Coroutine[Any, Any, Any]) -> None:
        """Run ``coro`` in the background; it is cancelled at the shutdown."""
        task = asyncio.get_running_loop().create_task(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def cancel_all(self) -> None:
        for task in list(self._background):
            task.cancel()
        await asyncio.gather(*self._background, return_exceptions=True)

    async def supervised(self, what: str, loop: Callable[[], Awaitable[None]]) -> None:
        """Run one of the daemon's long-lived loops, and start it again if it fails.

        A failure (a defect, or the spool's disk full for a moment) must not stop
        sending, intake or hand-overs silently until the next restart: it is logged
        and audited as an alert, and the loop starts again after a pause that grows
        from 1 s to 30 s while the failures go on.  A spool database that does not
        answer is alerted once by the spool's own watch (gateway.daemon.spoolwatch):
        the loops wait for it with a log line each, not an alert each.
        """
        pause = 1.0
        while not self.stopping:
            started = self._clock.monotonic()
            try:
                await loop()
                return
            except Exception as exc:
                if self._clock.monotonic() - started > SUPERVISED_MAX_PAUSE:
                    pause = 1.0  # it ran well for a while: this is a new failure
                cause = f"{type(exc).__name__}: {exc}"
                if isinstance(exc, SpoolUnreachableError):
                    # Told once, when it went (spool.unreachable): not as an alert per loop.
                    self._log.warning("daemon.task_waiting", task=what, error=cause)
                else:
                    self._failed(what, cause, pause, exc)
            await self.sleep_unless_stopping(pause)
            pause = min(pause * 2, SUPERVISED_MAX_PAUSE)

    def _failed(self, what: str, cause: str, pause: float, exc: Exception) -> None:
        self._log.error(
            "daemon.task_failed", task=what, error=cause, restart_in_seconds=pause, exc_info=exc
        )
        with contextlib.suppress(Exception):  # the audit log's disk may be the problem
            self._audit().emit(
                AuditEvent(
                    EventType.TASK_FAILED,
                    Outcome.FAILURE,
                    Severity.ALERT,
                    reason=f"{what} failed ({cause[:300]}); started again in {pause:.0f} s",
                    detail={"task": what},
                )
            )

    async def sleep_unless_stopping(self, seconds: float) -> None:
        """Wait ``seconds``, or until a stop is asked for.  Once it has been, return at
        the next turn of the event loop, not at once: the daemon's loops go round
        (``while not stopping``) until the shutdown has begun, and the shutdown must get
        to run.  Awaiting an event already set returns without giving the loop a turn
        (``asyncio.wait_for`` too, since Python 3.12), so a loop woken by the stop before
        the shutdown's own waiter would go round for ever, and the daemon would never
        stop."""
        if self.stop_requested.is_set():
            await asyncio.sleep(0)
            return
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.stop_requested.wait(), timeout=seconds)
