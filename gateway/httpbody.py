"""Reading an HTTP body: whole up to a limit, and never slower than a floor.

aiohttp's ``StreamReader.read(n)`` returns what has arrived so far, not ``n``
bytes nor the whole body: a receipt that comes in two TCP segments, two TLS
records or two chunks would be cut, and a valid receipt judged invalid.

A body that stops arriving, or trickles in (a byte every few seconds), would
hold its connection, its slot and its partial spool file for ever: every read
has a deadline.  :class:`BodyPace` says how long a body may pause and how slow
it may be on average; :func:`paced_chunks` raises :class:`BodyTooSlow` when it
is broken.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Protocol

import aiohttp

from gateway.errors import ProtocolError

CHUNK = 1 << 20
# A peer's request body may pause at most this long, and after this long must have kept
# an average of BODY_MIN_BYTES_PER_SECOND (defaults of [runtime] body_idle_seconds and
# body_min_bytes_per_second).
BODY_IDLE_SECONDS = 60.0
BODY_MIN_BYTES_PER_SECOND = 4096.0


class PaceSettings(Protocol):
    """Where the pace is configured (``gateway.config.Runtime`` is one)."""

    @property
    def body_idle_seconds(self) -> float: ...

    @property
    def body_min_bytes_per_second(self) -> float: ...


@dataclass(frozen=True)
class BodyPace:
    idle_seconds: float = BODY_IDLE_SECONDS
    min_bytes_per_second: float = BODY_MIN_BYTES_PER_SECOND

    @classmethod
    def of(cls, runtime: PaceSettings) -> BodyPace:
        return cls(runtime.body_idle_seconds, runtime.body_min_bytes_per_second)


class BodyTooSlow(ProtocolError):
    """The body paused longer than allowed, or arrived slower than the floor."""


async def paced_chunks(
    stream: aiohttp.StreamReader, pace: BodyPace, *, chunk: int = CHUNK
) -> AsyncIterator[bytes]:
    """The body's chunks as they arrive, to its end.

    At any time ``t`` seconds after the first read, the body must have sent
    ``min_bytes_per_second * (t - idle_seconds)`` bytes, and no pause may last
    longer than ``idle_seconds``: a stalled or trickling body costs at most
    ``idle_seconds`` plus its size divided by the floor.
    """
    loop = asyncio.get_running_loop()
    start = loop.time()
    size = 0
    while True:
        now = loop.time()
        # the moment the average would fall below the floor if nothing more came
        behind_at = start + pace.idle_seconds + size / pace.min_bytes_per_second
        wait = min(pace.idle_seconds, behind_at - now)
        try:
            if wait <= 0:
                raise TimeoutError
            # What has arrived already is taken without a timer (a small body is all
            # there with its headers); only a wait for more is bounded.
            data = stream.read_nowait(chunk)
            if not data and not stream.at_eof():
                async with asyncio.timeout(wait):
                    data = await stream.read(chunk)
        except TimeoutError:
            elapsed = loop.time() - start
            raise BodyTooSlow(
                f"the request body arrived too slowly: {size} bytes in {elapsed:.0f} s "
                f"(a pause of at most {pace.idle_seconds:g} s and an average of at least "
                f"{pace.min_bytes_per_second:g} bytes/s are allowed)",
                fix="if the link to this peer is really this slow, lower "
                "[runtime] body_min_bytes_per_second or raise body_idle_seconds",
            ) from None
        if not data:
            return
        size += len(data)
        yield data


async def read_capped(
    stream: aiohttp.StreamReader, limit: int, pace: BodyPace | None = None
) -> bytes:
    """The body to its end; or, when it is longer than ``limit``, its first
    ``limit + 1`` bytes (the caller refuses it, nothing more is read).  With
    ``pace``, :class:`BodyTooSlow` if the body is too slow."""
    parts: list[bytes] = []
    size = 0
    chunks = stream.iter_any() if pace is None else paced_chunks(stream, pace)
    async for data in chunks:
        parts.append(data)
        size += len(data)
        if size > limit:
            break
    return b"".join(parts)[: limit + 1]
