"""AS2 listener: HTTPS with client certificates required; no plaintext path exists.

The listening socket hands every accepted connection straight to a TLS
handshake (``loop.start_tls``); only a completed handshake with a certificate
that chains to our anchors *and* is pinned to a configured peer reaches the
HTTP layer.  Doing the handshake here rather than inside ``create_server``
lets us audit each failed handshake with the remote address and OpenSSL's
reason — asyncio would otherwise drop it silently.

The TLS context is looked up for every new connection, so a reload swaps
trust for new connections atomically.
"""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web
from cryptography import x509

from gateway.audit import AuditEvent, AuditSink, EventType, Outcome, Severity
from gateway.config import Listener
from gateway.logs import Logger
from gateway.pki.tls import fingerprint

RequestHandler = Callable[[web.Request], Awaitable[web.StreamResponse]]
HANDSHAKE_TIMEOUT = 15.0


def _subject(der: bytes) -> str:
    return x509.load_der_x509_certificate(der).subject.rfc4514_string()


class _TlsAcceptor(asyncio.Protocol):
    """Accepts a TCP connection and immediately upgrades it to TLS (server side)."""

    def __init__(self, server: As2Server) -> None:
        self._server = server

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        transport.pause_reading()  # nothing is read until TLS owns the connection
        task = asyncio.get_running_loop().create_task(self._server.upgrade(transport))
        self._server.track(task)

    def data_received(self, data: bytes) -> None:  # pragma: no cover - reading is paused
        raise AssertionError("plaintext data must never reach the acceptor")


class _Handoff(asyncio.Protocol):
    """Holds what arrives between the end of the handshake and the HTTP protocol taking over.

    ``start_tls`` does not call ``connection_made`` on the protocol it is given,
    and the first request bytes can arrive together with the client's Finished
    message; this stand-in keeps them until the real protocol is attached.
    """

    def __init__(self) -> None:
        self.buffered: list[bytes] = []
        self.eof = False
        self.lost = False

    def data_received(self, data: bytes) -> None:
        self.buffered.append(data)

    def eof_received(self) -> bool:
        self.eof = True
        return True

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True

    def hand_over(self, transport: asyncio.Transport, protocol: asyncio.Protocol) -> None:
        transport.set_protocol(protocol)
        protocol.connection_made(transport)
        for data in self.buffered:
            protocol.data_received(data)
        if self.eof:
            protocol.eof_received()


class As2Server:
    def __init__(
        self,
        listener: Listener,
        context: Callable[[], ssl.SSLContext],
        handler: RequestHandler,
        audit: AuditSink,
        log: Logger,
        max_body_bytes: int,
    ) -> None:
        self.listener = listener
        self._context = context
        self._audit = audit
        self._log = log.bind(listener=listener.name)
        app = web.Application(client_max_size=max_body_bytes)
        app.router.add_post(listener.path, handler)
        self._runner = web.AppRunner(app, access_log=None, handle_signals=False)
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        # Established connections: remote address, certificate SHA-256, subject.
        self._connections: dict[asyncio.Transport, tuple[str, str, str]] = {}
        self.port: int = listener.port

    def track(self, task: asyncio.Task[Any]) -> None:
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def start(self) -> None:
        await self._runner.setup()
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(
            lambda: _TlsAcceptor(self),
            self.listener.address,
            self.listener.port,
            reuse_address=True,
        )
        sockets = self._server.sockets
        if sockets:
            self.port = sockets[0].getsockname()[1]
        self._log.info("listener.started", address=self.listener.address, port=self.port)

    async def upgrade(self, transport: asyncio.Transport) -> None:
        loop = asyncio.get_running_loop()
        peername = transport.get_extra_info("peername")
        remote = f"{peername[0]}:{peername[1]}" if peername else "unknown"
        http = self._runner.server
        assert http is not None
        handoff = _Handoff()
        try:
            tls_transport = await loop.start_tls(
                transport,
                handoff,
                self._context(),
                server_side=True,
                ssl_handshake_timeout=HANDSHAKE_TIMEOUT,
            )
        except (ssl.SSLError, ConnectionError, TimeoutError, OSError) as exc:
            transport.abort()
            reason = getattr(exc, "verify_message", None) or str(exc) or type(exc).__name__
            self._log.warning("tls.handshake_failed", remote=remote, reason=reason)
            self._audit.emit(
                AuditEvent(
                    EventType.TLS_HANDSHAKE_FAILED,
                    Outcome.FAILURE,
                    Severity.ALERT,
                    remote_address=remote,
                    reason=reason,
                    direction="inbound",
                    detail={"listener": self.listener.name},
                )
            )
            return
        if tls_transport is None or handoff.lost:
            return
        handoff.hand_over(tls_transport, http())
        ssl_object = tls_transport.get_extra_info("ssl_object")
        der = ssl_object.getpeercert(binary_form=True) if ssl_object is not None else None
        if der is not None:
            self._connections[tls_transport] = (remote, fingerprint(der), _subject(der))

    def close_unaccepted(self, accepted: set[str]) -> list[tuple[str, str]]:
        """Close established connections whose certificate (SHA-256) is not in ``accepted``.

        Called when trust changes (reload, revocation, expiry): a revoked peer
        must not keep using a connection opened before.  Returns (remote, subject)
        of each connection closed.
        """
        closed = []
        for transport, (remote, print_, subject) in list(self._connections.items()):
            if transport.is_closing():
                del self._connections[transport]
            elif print_ not in accepted:
                transport.abort()
                del self._connections[transport]
                closed.append((remote, subject))
        return closed

    def stop_accepting(self) -> None:
        if self._server is not None:
            self._server.close()

    async def stop(self, timeout: float) -> None:
        """Stop accepting, let requests in progress finish within ``timeout``."""
        self.stop_accepting()
        for task in list(self._tasks):
            task.cancel()
        http = self._runner.server
        if http is not None:
            # Idle keep-alive connections end now; a request in progress finishes first.
            for connection in http.connections:
                connection.close()
        await self._runner.shutdown()
        if http is not None:
            await http.shutdown(timeout)
        await self._runner.cleanup()
        if self._server is not None:
            await self._server.wait_closed()
        self._log.info("listener.stopped")
