"""The demo hospital's AS2 listener run in the test's own event loop, on a free port of
127.0.0.1, requiring a client certificate from the demo CA; and a peer that accepts
connections and never answers."""

from __future__ import annotations

import asyncio
import contextlib
import io
import ssl
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, replace
from typing import Any

from gateway.audit import AuditSink
from gateway.channel.server import As2Server, RequestHandler
from gateway.clock import Clock
from gateway.config import GatewayConfig, load_config
from gateway.demo_run import free_ports
from gateway.logs import make_logger
from gateway.pki.demo import DemoLayout


def hospital_listener(
    layout: DemoLayout,
    handler: RequestHandler,
    audit: AuditSink,
    clock: Clock,
    log: io.StringIO | None = None,
    **limits: Any,
) -> As2Server:
    """``handler`` answers the requests; ``log`` collects the JSON log lines (none:
    dropped); ``limits`` are As2Server's (``max_handshakes``, ...)."""
    config = load_config(layout.hospital.config_path)
    certs = layout.hospital.root / "certs"
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(certs / "tls.crt", certs / "tls.key")
    context.verify_mode = ssl.CERT_REQUIRED
    context.load_verify_locations(layout.ca_certificate)
    listener = replace(config.listeners[0], address="127.0.0.1", port=0)
    return As2Server(
        listener,
        lambda: context,
        handler,
        audit,
        make_logger("info", log if log is not None else io.StringIO()),
        1 << 20,
        clock,
        **limits,
    )


@dataclass(frozen=True)
class SilentPeer:
    """A peer on ``port`` of 127.0.0.1 that accepts connections and never answers (a TLS
    handshake with it never ends; with a TLS context of its own, nothing after the
    handshake): the connections it holds, whether one came, and what each has sent so
    far (one entry a connection)."""

    port: int
    held: list[asyncio.StreamWriter]
    accepted: asyncio.Event
    received: list[bytes]

    @property
    def url(self) -> str:
        return f"https://127.0.0.1:{self.port}/as2"

    def sent_to(self, config: GatewayConfig) -> GatewayConfig:
        """``config`` with its one peer's URL here."""
        [peer] = config.peers
        return replace(config, peers=(replace(peer, url=self.url),))


@asynccontextmanager
async def silent_peer(tls: ssl.SSLContext | None = None) -> AsyncIterator[SilentPeer]:
    """A :class:`SilentPeer` listening on a free port (``tls``: its server context); the
    listener and the connections it holds closed after."""
    held: list[asyncio.StreamWriter] = []
    accepted = asyncio.Event()
    received: list[bytes] = []

    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        held.append(writer)
        index = len(received)
        received.append(b"")
        accepted.set()
        with contextlib.suppress(OSError):
            while chunk := await reader.read(65536):
                received[index] += chunk

    [port] = free_ports(1)
    listener = await asyncio.start_server(silent, "127.0.0.1", port, ssl=tls)
    try:
        yield SilentPeer(port, held, accepted, received)
    finally:
        for writer in held:
            writer.close()
        listener.close()
