"""Waiting, inside a test's own event loop, for what the test is about to assert on."""

from __future__ import annotations

import asyncio
import inspect
import time
from collections.abc import Awaitable, Callable
from typing import Any

from tests.helpers.audit import DEADLINE


async def until(
    check: Callable[[], Any | Awaitable[Any]], what: str, timeout: float = DEADLINE
) -> Any:
    """The first true result of ``check`` (a function or a coroutine function), polled
    while the event loop runs the code under test; after ``timeout`` seconds, fails
    naming ``what`` was awaited.  Generous by default: a loaded machine is slow, not
    wrong."""
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if inspect.isawaitable(result):
            result = await result
        if result:
            return result
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")
        await asyncio.sleep(0.01)
