"""The AS2 listener keeps track of established connections (to close them when trust
changes) only while they are open: a peer that opens a short connection per message,
for months, must not grow the listener's memory by one entry per connection.

A real listener on a real socket, real TLS handshakes with the lab's certificate.
"""

from __future__ import annotations

import asyncio
import ssl
from pathlib import Path

from aiohttp import web

from gateway.audit.log import AuditLog
from gateway.channel.server import As2Server
from gateway.clock import SystemClock
from gateway.pki.demo import DemoLayout
from tests.helpers.listener import hospital_listener

CONNECTIONS = 300


async def _ok(request: web.Request) -> web.Response:
    await request.read()
    return web.Response(text="ok\n")


def _server(layout: DemoLayout, audit: AuditLog) -> As2Server:
    return hospital_listener(layout, _ok, audit, SystemClock())


def _client(layout: DemoLayout) -> ssl.SSLContext:
    certs = layout.lab.root / "certs"
    context = ssl.create_default_context(cafile=layout.ca_certificate)
    context.load_cert_chain(certs / "tls.crt", certs / "tls.key")
    return context


async def _one_request(port: int, context: ssl.SSLContext) -> bytes:
    reader, writer = await asyncio.open_connection(
        "127.0.0.1", port, ssl=context, server_hostname="localhost"
    )
    writer.write(b"POST /as2 HTTP/1.1\r\nHost: localhost\r\nContent-Length: 0\r\n\r\n")
    answer = await reader.readuntil(b"ok\n")
    writer.close()
    await writer.wait_closed()
    return answer


async def _wait_for(server: As2Server, count: int) -> int:
    """The number of established connections once it is ``count`` (or after 30 s)."""
    for _ in range(3000):
        if len(server.established()) == count:
            break
        await asyncio.sleep(0.01)
    return len(server.established())


async def test_closed_connections_are_forgotten_and_open_ones_closed_on_trust_change(
    layout: DemoLayout, tmp_path: Path
) -> None:
    audit = AuditLog(tmp_path / "audit.jsonl", SystemClock(), node="hospital")
    server = _server(layout, audit)
    await server.start()
    context = _client(layout)
    try:
        for _ in range(CONNECTIONS // 10):  # ten at a time, each a whole handshake
            answers = await asyncio.gather(*(_one_request(server.port, context) for _ in range(10)))
            assert all(a.startswith(b"HTTP/1.1 200") for a in answers)
        assert await _wait_for(server, 0) == 0  # none of the closed ones is kept

        reader, writer = await asyncio.open_connection(
            "127.0.0.1", server.port, ssl=context, server_hostname="localhost"
        )
        writer.write(b"POST /as2 HTTP/1.1\r\nHost: localhost\r\nContent-Length: 0\r\n\r\n")
        await reader.readuntil(b"ok\n")
        assert await _wait_for(server, 1) == 1  # kept open (keep-alive): it is known
        [(remote, sha256, subject)] = server.established()
        assert remote.startswith("127.0.0.1:") and len(sha256) == 64 and "lab" in subject.lower()

        # Trust changed and the lab's certificate is no longer accepted: it is closed.
        assert server.close_unaccepted({sha256}) == []
        assert server.close_unaccepted(set()) == [(remote, subject)]
        assert await asyncio.wait_for(reader.read(), 10) == b""
        assert await _wait_for(server, 0) == 0
        writer.close()
    finally:
        await server.stop(5)
        audit.close()
