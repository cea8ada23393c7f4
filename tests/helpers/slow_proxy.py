"""A TCP proxy that delays every byte, to make a path to a peer slow."""

from __future__ import annotations

import asyncio
from pathlib import Path

from tests.helpers.tcp_proxy import Stream, TcpProxy


def edit_every(path: Path, old: str, new: str) -> None:
    text = path.read_text()
    assert old in text, f"{old!r} not in {path}"
    path.write_text(text.replace(old, new))


class SlowProxy(TcpProxy):
    """TCP proxy on 127.0.0.1 that holds back everything the receiver sends (a very slow path).

    While ``delay`` is set, even the TLS handshake's server flight is late, so the
    sender's request times out; once it is cleared the path is healthy again.
    """

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.delay = 0.0
        self.connections = 0
        super().__init__()

    async def _connect(self) -> Stream:
        self.connections += 1
        return await asyncio.open_connection("127.0.0.1", self.target_port)

    async def _before_answer(self) -> None:
        if self.delay:
            await asyncio.sleep(self.delay)
