"""Reading an HTTP body whole, up to a limit.

aiohttp's ``StreamReader.read(n)`` returns what has arrived so far, not ``n``
bytes nor the whole body: a receipt that comes in two TCP segments, two TLS
records or two chunks would be cut, and a valid receipt judged invalid.
"""

from __future__ import annotations

import aiohttp


async def read_capped(stream: aiohttp.StreamReader, limit: int) -> bytes:
    """The body to its end; or, when it is longer than ``limit``, its first
    ``limit + 1`` bytes (the caller refuses it, nothing more is read)."""
    parts: list[bytes] = []
    size = 0
    async for chunk in stream.iter_any():
        parts.append(chunk)
        size += len(chunk)
        if size > limit:
            break
    return b"".join(parts)[: limit + 1]
