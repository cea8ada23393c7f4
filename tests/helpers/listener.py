"""The demo hospital's AS2 listener run in the test's own event loop, on a free port of
127.0.0.1, requiring a client certificate from the demo CA; and a peer that accepts
connections and never answers."""

from __future__ import annotations

import asyncio
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
    handshake with it never ends): the connections it holds, and whether one came."""

    port: int
    held: list[asyncio.StreamWriter]
    accepted: asyncio.Event

    def sent_to(self, config: GatewayConfig) -> GatewayConfig:
        """``config`` with its one peer's URL here."""
        [peer] = config.peers
        url = f"https://127.0.0.1:{self.port}/as2"
        return replace(config, peers=(replace(peer, url=url),))


@asynccontextmanager
async def silent_peer() -> AsyncIterator[SilentPeer]:
    """A :class:`SilentPeer` listening on a free port; the listener and the connections it
    holds closed after."""
    held: list[asyncio.StreamWriter] = []
    accepted = asyncio.Event()

    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        held.append(writer)
        accepted.set()

    [port] = free_ports(1)
    listener = await asyncio.start_server(silent, "127.0.0.1", port)
    try:
        yield SilentPeer(port, held, accepted)
    finally:
        for writer in held:
            writer.close()
        listener.close()
