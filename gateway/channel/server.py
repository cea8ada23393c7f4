"""AS2 listener: HTTPS with client certificates required; no plaintext path exists.

The listening socket hands every accepted connection straight to a TLS
handshake (``loop.start_tls``); only a completed handshake with a certificate
that chains to our anchors *and* is pinned to a configured peer reaches the
HTTP layer.  Doing the handshake here rather than inside ``create_server``
lets us audit each failed handshake with the remote address and OpenSSL's
reason — asyncio would otherwise drop it silently.

The TLS context is looked up for every new connection, so a reload swaps
trust for new connections atomically.

A failed handshake (no certificate, an unknown or unpinned one, plain HTTP,
an old protocol) is audited as an alert, the first FAILURES_RECORDED a minute
from each address (an IPv6 address: its /64) one by one and then one record
with the count.  Many of them from one address or from all together are a
storm (gateway.channel.storms): one alert for the storm, and its failed
handshakes are recorded as warnings while it lasts.  A
connection closed or left silent before the handshake ends (a load balancer's
or a monitor's TCP check, a port scan, a client that gave up) is no
authentication attempt: it is logged, once per address every
ABANDONED_WINDOW_SECONDS with the count, not audited.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import ssl
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web
from cryptography import x509

from gateway.audit import AuditEvent, AuditSink, EventType, Outcome, Severity
from gateway.channel.storms import HandshakeStorms, StormNotice
from gateway.clock import Clock
from gateway.config import Listener
from gateway.httpfront import FrontDoor, finish_requests
from gateway.logs import Logger
from gateway.pki.tls import fingerprint, refusal_alert, refusal_reason
from gateway.ratelimit import SourceBudget, address_source

RequestHandler = Callable[[web.Request], Awaitable[web.StreamResponse]]
HANDSHAKE_TIMEOUT = 15.0
# How long a closing connection waits for the peer's answer to its TLS close (asyncio's
# default is 30 s): a peer that never answers cannot hold a stop, or a closed
# connection's memory, longer than this.
TLS_CLOSE_SECONDS = 2.0
FAILURES_RECORDED = 10  # failed handshakes audited one by one per address and minute
ABANDONED_WINDOW_SECONDS = 600.0  # one log line per address for abandoned handshakes
SUMMARY_SECONDS = 10.0  # how often the counts of windows that are over are written
IDLE_CONNECTION_SECONDS = 75.0  # a peer's connection without a request is closed after
# Handshakes in progress at once on one listener (each lasts at most HANDSHAKE_TIMEOUT):
# a flood of connections from anyone who can reach the port cannot take every socket
# and CPU; beyond it a new connection is closed at once.
MAX_HANDSHAKES = 256
# Connections open at once with one client certificate (one peer): our own sender
# opens at most 8 to a peer, other AS2 products fewer.  Beyond it a new connection is
# closed right after its handshake, so one peer cannot take every file descriptor
# with connections it leaves idle (each lasts up to IDLE_CONNECTION_SECONDS).
MAX_CONNECTIONS_PER_CERTIFICATE = 32
# The other side closed or went silent: nothing to authenticate, nothing to alert on.
_ABANDONED = (
    ConnectionResetError,
    ConnectionAbortedError,
    BrokenPipeError,
    TimeoutError,
    ssl.SSLEOFError,
)


def _subject(der: bytes) -> str:
    return x509.load_der_x509_certificate(der).subject.rfc4514_string()


def _fingerprint_of(transport: asyncio.Transport) -> str | None:
    ssl_object = transport.get_extra_info("ssl_object")
    der = ssl_object.getpeercert(binary_form=True) if ssl_object is not None else None
    return fingerprint(der) if der is not None else None


class _TlsAcceptor(asyncio.Protocol):
    """Accepts a TCP connection and immediately upgrades it to TLS (server side)."""

    def __init__(self, server: As2Server) -> None:
        self._server = server

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        transport.pause_reading()  # nothing is read until TLS owns the connection
        if not self._server.handshake_slot_free(transport):
            return
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
        clock: Clock,
        *,
        max_handshakes: int = MAX_HANDSHAKES,
        max_connections_per_certificate: int = MAX_CONNECTIONS_PER_CERTIFICATE,
    ) -> None:
        self.listener = listener
        self._context = context
        self._audit = audit
        self._log = log.bind(listener=listener.name)
        self._failures = SourceBudget(clock, per_window=FAILURES_RECORDED)
        self._storms = HandshakeStorms(clock)
        self._abandoned = SourceBudget(clock, per_window=1, window_seconds=ABANDONED_WINDOW_SECONDS)
        self._summaries: asyncio.Task[None] | None = None
        self._max_handshakes = max_handshakes
        self._busy = SourceBudget(clock, per_window=1, window_seconds=ABANDONED_WINDOW_SECONDS)
        self._crowded = SourceBudget(clock, per_window=1, window_seconds=ABANDONED_WINDOW_SECONDS)
        self._max_per_certificate = max_connections_per_certificate
        app = web.Application(client_max_size=max_body_bytes)
        app.router.add_post(listener.path, handler)
        self._front = FrontDoor(listener.name, self._log, lambda: audit, clock)
        self._runner = self._front.runner(
            app, access_log=None, handle_signals=False, keepalive_timeout=IDLE_CONNECTION_SECONDS
        )
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        self.port: int = listener.port

    @property
    def handshakes_in_progress(self) -> int:
        """Accepted connections whose TLS handshake has not ended yet."""
        return len(self._tasks)

    def handshake_slot_free(self, transport: asyncio.Transport) -> bool:
        """False (and the connection closed) when MAX_HANDSHAKES are already in progress."""
        if self.handshakes_in_progress < self._max_handshakes:
            return True
        transport.abort()
        peername = transport.get_extra_info("peername")
        host = peername[0] if peername else "unknown"
        if self._busy.admit(self.listener.name):
            self._log.warning(
                "listener.busy",
                remote=host,
                handshakes=self.handshakes_in_progress,
                reason=f"{self._max_handshakes} TLS handshakes already in progress: new "
                "connections are closed at once until some end",
                fix="if this is not a flood from one address (see tls.handshake_abandoned "
                "and tls.handshake_failed), look for a peer opening connections in a loop",
            )
        return False

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
        self._summaries = loop.create_task(self._summary_loop())
        self._log.info("listener.started", address=self.listener.address, port=self.port)

    async def upgrade(self, transport: asyncio.Transport) -> None:
        loop = asyncio.get_running_loop()
        peername = transport.get_extra_info("peername")
        remote = f"{peername[0]}:{peername[1]}" if peername else "unknown"
        http = self._runner.server
        assert http is not None
        handoff = _Handoff()
        # asyncio closes a connection whose handshake failed without sending what OpenSSL
        # wrote to answer it (the alert saying why): a second descriptor of the socket
        # keeps the connection for that until the alert is sent.
        spare = _spare_descriptor(transport)
        try:
            tls_transport = await loop.start_tls(
                transport,
                handoff,
                self._context(),
                server_side=True,
                ssl_handshake_timeout=HANDSHAKE_TIMEOUT,
                ssl_shutdown_timeout=TLS_CLOSE_SECONDS,
            )
        except (ssl.SSLError, ConnectionError, TimeoutError, OSError) as exc:
            transport.abort()
            _send_alert(spare, refusal_alert(exc))
            host = address_source(peername[0]) if peername else "unknown"
            if isinstance(exc, _ABANDONED):
                if self._abandoned.admit(host):
                    self._log.info(
                        "tls.handshake_abandoned",
                        remote=remote,
                        reason=_abandoned_reason(exc),
                    )
                return
            reason = refusal_reason(exc)
            self._audit_storms(self._storms.failed(host))
            if self._failures.admit(host):
                self._log.warning("tls.handshake_failed", remote=remote, reason=reason)
                self._audit.emit(
                    AuditEvent(
                        EventType.TLS_HANDSHAKE_FAILED,
                        Outcome.FAILURE,
                        self._failure_severity(host),
                        remote_address=remote,
                        reason=reason,
                        direction="inbound",
                        detail={"listener": self.listener.name},
                    )
                )
            return
        finally:
            if spare is not None:
                os.close(spare)
        if tls_transport is None or handoff.lost:
            return
        if not self._connection_allowed(tls_transport, remote):
            return
        # From here on the HTTP server owns the connection, and lists it while it is open.
        handoff.hand_over(tls_transport, http())

    def _connection_allowed(self, transport: asyncio.Transport, remote: str) -> bool:
        """False (and the connection closed) when its certificate already has
        MAX_CONNECTIONS_PER_CERTIFICATE connections open."""
        ssl_object = transport.get_extra_info("ssl_object")
        der = ssl_object.getpeercert(binary_form=True) if ssl_object is not None else None
        if der is None:
            return True
        print_ = fingerprint(der)
        http = self._runner.server
        open_now = sum(
            1
            for handler in (http.connections if http is not None else ())
            if isinstance(handler.transport, asyncio.Transport)
            and not handler.transport.is_closing()
            and _fingerprint_of(handler.transport) == print_
        )
        if open_now < self._max_per_certificate:
            return True
        transport.abort()
        if self._crowded.admit(print_):
            self._log.warning(
                "listener.peer_connections_full",
                remote=remote,
                subject=_subject(der),
                connections=open_now,
                reason=f"{open_now} connections with this certificate are open: new ones "
                "are closed right after the handshake until some end (said once every "
                f"{ABANDONED_WINDOW_SECONDS / 60:.0f} minutes per certificate)",
                fix="ask the peer why its gateway keeps this many connections open",
            )
        return False

    def _failure_severity(self, source: str) -> Severity:
        """A failed handshake is an alert, unless it is part of a storm: then the storm is."""
        return Severity.WARNING if self._storms.in_storm(source) else Severity.ALERT

    def _audit_storms(self, notices: list[StormNotice]) -> None:
        for notice in notices:
            storm = notice.storm
            source = storm.source or "all addresses together"
            window = self._storms.window_seconds
            detail = {
                "listener": self.listener.name,
                "source": storm.source or "all",
                "failures": notice.failures,
                "threshold": storm.threshold,
                "window_seconds": window,
            }
            if not notice.ended:
                reason = (
                    f"a TLS handshake storm: {notice.failures} failed handshakes from {source} "
                    f"within {window:.0f} s (a storm from {storm.threshold}); until it ends, its "
                    "failed handshakes are recorded as warnings"
                )
                self._log.error("tls.handshake_storm", remote=storm.source, reason=reason)
                event = AuditEvent(
                    EventType.TLS_HANDSHAKE_STORM,
                    Outcome.FAILURE,
                    Severity.ALERT,
                    remote_address=storm.source,
                    reason=reason,
                    direction="inbound",
                    detail=detail,
                )
            else:
                reason = (
                    f"the TLS handshake storm from {source} ended: {notice.failures} failed "
                    f"handshakes in {notice.seconds:.0f} s"
                )
                self._log.warning("tls.handshake_storm_ended", remote=storm.source, reason=reason)
                event = AuditEvent(
                    EventType.TLS_HANDSHAKE_STORM_ENDED,
                    Outcome.FAILURE,
                    Severity.WARNING,
                    remote_address=storm.source,
                    reason=reason,
                    direction="inbound",
                    detail={**detail, "seconds": round(notice.seconds, 1)},
                )
            self._audit.emit(event)

    async def _summary_loop(self) -> None:
        while True:
            await asyncio.sleep(SUMMARY_SECONDS)
            try:
                self.write_summaries()
            except Exception as exc:  # the audit log's disk may be full for now
                self._log.warning("listener.summary_failed", error=str(exc))

    def write_summaries(self, *, everything: bool = False) -> None:
        """One record for each address whose events were counted, not written one by one."""
        self._front.flush(everything=everything)
        for window in self._failures.closed(everything=everything):
            reason = (
                f"{window.held_back} more failed TLS handshakes from {window.source} within "
                f"{self._failures.window_seconds:.0f} s, beyond the {FAILURES_RECORDED} "
                "recorded one by one"
            )
            self._log.warning("tls.handshake_failed", remote=window.source, reason=reason)
            self._audit.emit(
                AuditEvent(
                    EventType.TLS_HANDSHAKE_FAILED,
                    Outcome.FAILURE,
                    self._failure_severity(window.source),
                    remote_address=window.source,
                    reason=reason,
                    direction="inbound",
                    detail={
                        "listener": self.listener.name,
                        "not_recorded_one_by_one": window.held_back,
                        "window_seconds": self._failures.window_seconds,
                    },
                )
            )
        self._audit_storms(self._storms.tick(everything=everything))  # after their summaries
        for window in self._busy.closed(everything=everything):
            self._log.warning(
                "listener.busy",
                more=window.held_back,
                window_seconds=self._busy.window_seconds,
                reason="more connections closed at once: too many TLS handshakes in progress",
            )
        for window in self._crowded.closed(everything=everything):
            if window.held_back:
                self._log.warning(
                    "listener.peer_connections_full",
                    certificate=window.source,
                    more=window.held_back,
                    window_seconds=self._crowded.window_seconds,
                    reason="more connections closed right after the handshake: "
                    f"{self._max_per_certificate} with this certificate were open",
                )
        for window in self._abandoned.closed(everything=everything):
            self._log.info(
                "tls.handshake_abandoned",
                remote=window.source,
                more=window.held_back,
                window_seconds=self._abandoned.window_seconds,
                reason="more connections closed or left silent before the TLS handshake "
                "ended (a TCP health check or port scan does this)",
            )

    def _open_connections(self) -> list[tuple[asyncio.Transport, str, str, str]]:
        """Established connections still open: transport, remote address, certificate
        SHA-256, subject.  The HTTP server lists a connection from the end of its
        handshake until it closes; nothing here outlives it."""
        http = self._runner.server
        out = []
        for handler in http.connections if http is not None else ():
            transport = handler.transport
            if not isinstance(transport, asyncio.Transport) or transport.is_closing():
                continue
            ssl_object = transport.get_extra_info("ssl_object")
            der = ssl_object.getpeercert(binary_form=True) if ssl_object is not None else None
            if der is None:
                continue
            peername = transport.get_extra_info("peername")
            remote = f"{peername[0]}:{peername[1]}" if peername else "unknown"
            out.append((transport, remote, fingerprint(der), _subject(der)))
        return out

    def established(self) -> list[tuple[str, str, str]]:
        """(remote, certificate SHA-256, subject) of each established connection still open."""
        return [
            (remote, print_, subject) for _, remote, print_, subject in self._open_connections()
        ]

    def close_unaccepted(self, accepted: set[str]) -> list[tuple[str, str]]:
        """Close established connections whose certificate (SHA-256) is not in ``accepted``.

        Called when trust changes (reload, revocation, expiry): a revoked peer
        must not keep using a connection opened before.  Returns (remote, subject)
        of each connection closed.
        """
        closed = []
        for transport, remote, print_, subject in self._open_connections():
            if print_ not in accepted:
                transport.abort()
                closed.append((remote, subject))
        return closed

    def stop_accepting(self) -> None:
        if self._server is not None:
            self._server.close()
        if self._summaries is not None:
            self._summaries.cancel()
            self._summaries = None
            with contextlib.suppress(Exception):  # the audit log's disk may be full
                self.write_summaries(everything=True)  # the last counts are not lost

    async def stop(self, timeout: float) -> None:
        """Stop accepting; each request already started (its body may still be arriving)
        runs to its answer within ``timeout`` seconds, the rest are cut then; idle
        keep-alive connections and handshakes in progress end now."""
        self.stop_accepting()
        for task in list(self._tasks):
            task.cancel()
        await finish_requests(self._runner.server, timeout)
        await self._runner.cleanup()
        if self._server is not None:
            # From Python 3.12 this waits for every connection to be gone, each closed
            # within TLS_CLOSE_SECONDS; bounded again here, so that nothing a peer does
            # holds the stop.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(TLS_CLOSE_SECONDS + 1):
                    await self._server.wait_closed()
        self._log.info("listener.stopped")


def _spare_descriptor(transport: asyncio.Transport) -> int | None:
    """A second descriptor of the connection's socket (None if it has none)."""
    sock = transport.get_extra_info("socket")
    if sock is None:
        return None
    try:
        return os.dup(sock.fileno())
    except OSError:  # out of descriptors: the refusal goes without its alert
        return None


def _send_alert(descriptor: int | None, alert: bytes) -> None:
    """Write OpenSSL's alert on the connection (a few dozen bytes: the socket takes them
    at once, or they are dropped - the refusal stands either way)."""
    if descriptor is None or not alert:
        return
    with contextlib.suppress(OSError):
        os.write(descriptor, alert)


def _abandoned_reason(exc: BaseException) -> str:
    if isinstance(exc, TimeoutError):
        return f"nothing, or not a whole handshake, within {HANDSHAKE_TIMEOUT:.0f} s"
    return "closed by the other side before the TLS handshake ended"
