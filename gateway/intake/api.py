"""The local submission API for internal systems (NET-3).

Listens on a unix socket and/or a loopback address only (never a routable
one: internal systems on other hosts use the outbox folder on a share).  Each
internal client has its own bearer token; the configuration stores only the
token's SHA-256, so a leaked config file does not leak a token.  A client may
send only to the peers listed for it, sees only its own messages, and every
submission and every refused token is in the audit trail.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import os
import secrets
import socket
import stat
from collections.abc import AsyncIterator, Callable, Sequence
from pathlib import Path
from typing import Any

from aiohttp import web

from gateway.audit import AuditEvent, AuditSink, EventType, Outcome, Severity
from gateway.clock import Clock, SystemClock
from gateway.config import ApiClient
from gateway.errors import MedgwError
from gateway.httpfront import FrontDoor, stop_serving
from gateway.intake.submit import (
    BODY_IDLE_SECONDS,
    IDLE_CONNECTION_SECONDS,
    StatusFn,
    Submission,
    SubmitFn,
    json_error,
    parse_submission,
    status,
    submit,
)
from gateway.listening import bind_cause, bind_fix
from gateway.logs import Logger, make_logger
from gateway.operations import viewed
from gateway.ratelimit import SourceBudget


def new_token() -> tuple[str, str]:
    """A fresh token and the SHA-256 (hex) to put in the configuration."""
    token = secrets.token_urlsafe(32)
    return token, hashlib.sha256(token.encode()).hexdigest()


def authenticate(clients: Sequence[ApiClient], header: str) -> ApiClient | None:
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return None
    # The bytes as sent: aiohttp hands header bytes that are not UTF-8 over as
    # surrogate escapes, which a plain encode() refuses (no answer, no audit record).
    presented = hashlib.sha256(token.strip().encode("utf-8", "surrogateescape")).hexdigest()
    match = None
    for client in clients:  # compare with every client, in constant time
        if hmac.compare_digest(presented, client.token_sha256):
            match = client
    return match


def unauthorized() -> web.Response:
    response = json_error(
        401,
        "missing or unknown API token",
        "send 'Authorization: Bearer <token>' with this client's token (medgw api token "
        "makes one; its token_sha256 goes into [[api.clients]] in gateway.toml)",
    )
    response.headers["WWW-Authenticate"] = 'Bearer realm="medgw"'
    return response


def _remove_stale_socket(path: Path) -> None:
    """Remove the socket a killed run left behind; never anything else at that path."""
    try:
        mode = path.lstat().st_mode
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(mode):
        raise MedgwError(
            f"cannot listen for the local API on {path}: it exists and is not a socket "
            "(medgw replaces only a socket left by an earlier run, never another file)",
            fix="set [api] socket in gateway.toml to a path of its own, e.g. "
            '"/run/medgw/api.sock", or move that file away if it is not needed',
        )
    path.unlink(missing_ok=True)


# Refused tokens: every local user can reach the API, so what one address can put into
# the audit trail is bounded.  Up to FAILURES_RECORDED a minute are recorded one by
# one; the rest of that minute are counted, and one record says how many there were.
# All TCP clients are counted as one address: the API listens on loopback only, and
# any local user can connect from any address of 127.0.0.0/8.
FAILURES_RECORDED = 10
FAILURE_WINDOW_SECONDS = 60.0
PATH_RECORDED = 200  # characters of the request path kept in a record
UNIX_SOCKET = "local socket"  # the remote address recorded for the unix socket
LOOPBACK = "loopback"  # the remote address of a summary of several loopback addresses


class _FailureRecorder:
    """Audits refused tokens, at most FAILURES_RECORDED a minute from the unix socket
    and as many from loopback TCP."""

    def __init__(self, audit: AuditSink, clock: Clock) -> None:
        self._audit = audit
        self._budget = SourceBudget(
            clock, per_window=FAILURES_RECORDED, window_seconds=FAILURE_WINDOW_SECONDS
        )

    def failed(self, remote: str, path: str) -> None:
        source = UNIX_SOCKET if remote == UNIX_SOCKET else LOOPBACK
        if not self._budget.admit(source, remote):
            return
        detail: dict[str, object] = {"path": path}
        if len(path) > PATH_RECORDED:
            detail = {"path": path[:PATH_RECORDED] + "...", "path_length": len(path)}
        self._audit.emit(
            AuditEvent(
                EventType.API_AUTHENTICATION_FAILED,
                Outcome.FAILURE,
                Severity.ALERT,
                remote_address=remote,
                reason="missing or unknown API token",
                detail=detail,
            )
        )

    def flush(self, *, everything: bool = False) -> None:
        """Write the count of each minute that is over (of every minute with ``everything``)."""
        for window in self._budget.closed(everything=everything):
            mixed = len(window.notes) > 1 or window.more_notes
            where = "loopback addresses" if mixed else "this address"
            self._audit.emit(
                AuditEvent(
                    EventType.API_AUTHENTICATION_FAILED,
                    Outcome.FAILURE,
                    Severity.ALERT,
                    remote_address=LOOPBACK if mixed else window.notes[0],
                    reason=f"{window.held_back} more failed token attempts from {where} "
                    f"within {FAILURE_WINDOW_SECONDS:.0f} s, beyond the {FAILURES_RECORDED} "
                    "recorded one by one",
                    detail={
                        "not_recorded_one_by_one": window.held_back,
                        "window_seconds": FAILURE_WINDOW_SECONDS,
                    },
                )
            )


SOCKET_MODE = 0o660  # the medgw user and its group (the internal systems)


def _bind_unix(path: Path) -> socket.socket:
    """A unix stream socket bound at ``path`` with SOCKET_MODE, not yet listening.

    The mode is set on the path before listen(), so no connection is ever accepted
    under another mode; the process-wide umask is left alone, since other tasks and
    threads create inbox and spool files meanwhile.
    """
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind(str(path))
        os.chmod(path, SOCKET_MODE)
    except BaseException:
        sock.close()
        raise
    return sock


# Connections from local clients open at once (idle ones close after
# IDLE_CONNECTION_SECONDS); beyond it a new one is closed at once, so that a client
# opening connections in a loop cannot take the file descriptors the gateway needs
# for its peers, its spool and its inbox.
MAX_CONNECTIONS = 128
BUSY_LOG_SECONDS = 600.0  # the "too many connections" line, at most once per this


class _Refuse(asyncio.Protocol):
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        transport.abort()


class _CappedSite(web.SockSite):
    """A listening socket whose new connections are closed at once while ``limit``
    are open (``on_full`` is told)."""

    def __init__(
        self,
        runner: web.AppRunner,
        sock: socket.socket,
        *,
        limit: int,
        on_full: Callable[[int], None],
        shutdown_timeout: float = 60.0,
    ) -> None:
        super().__init__(runner, sock, shutdown_timeout=shutdown_timeout)
        self._limit = limit
        self._on_full = on_full

    async def start(self) -> None:
        await web.BaseSite.start(self)  # registers the site with its runner
        server = self._runner.server
        assert server is not None

        def protocol() -> asyncio.Protocol:
            open_now = len(server.connections)
            if open_now >= self._limit:
                self._on_full(open_now)
                return _Refuse()
            return server()

        self._server = await asyncio.get_running_loop().create_server(
            protocol, sock=self._sock, backlog=self._backlog
        )


# Fields of a message's view that are the gateway's own business: where it keeps
# files and receipts.  The administrator's view (control socket, `medgw queue show`)
# has them.
INTERNAL_FIELDS = frozenset({"receipt_file", "receipt_kept"})


def _client_view(view: dict[str, Any]) -> dict[str, Any]:
    return {key: value for key, value in view.items() if key not in INTERNAL_FIELDS}


class LocalApi:
    def __init__(
        self,
        clients: Callable[[], Sequence[ApiClient]],
        submit_fn: SubmitFn,
        status_fn: StatusFn,
        audit: AuditSink,
        *,
        clock: Clock | None = None,
        flush_seconds: float = 1.0,
        body_idle_seconds: float = BODY_IDLE_SECONDS,
        idle_connection_seconds: float = IDLE_CONNECTION_SECONDS,
        max_connections: int = MAX_CONNECTIONS,
        log: Logger | None = None,
    ) -> None:
        self._clients = clients

        async def submit_for_client(
            submission: Submission, chunks: AsyncIterator[bytes]
        ) -> dict[str, Any]:
            return _client_view(await submit_fn(submission, chunks))

        async def status_for_client(
            message_id: str, submitter: str | None
        ) -> dict[str, Any] | None:
            view = await status_fn(message_id, submitter)
            return _client_view(view) if view is not None else None

        self._submit: SubmitFn = submit_for_client
        self._status: StatusFn = status_for_client
        self._audit = audit
        self._failures = _FailureRecorder(audit, clock or SystemClock())
        self._flush_seconds = flush_seconds
        self._body_idle_seconds = body_idle_seconds
        self._flusher: asyncio.Task[None] | None = None
        self._socket_path: Path | None = None
        self._max_connections = max_connections
        self._log = log
        self._busy = SourceBudget(
            clock or SystemClock(), per_window=1, window_seconds=BUSY_LOG_SECONDS
        )
        # Bodies are streamed from request.content; client_max_size limits only what
        # aiohttp itself would buffer (we never call request.read()).
        app = web.Application()
        app.router.add_post("/v1/messages", self._post)
        app.router.add_get("/v1/messages/{message_id}", self._get)
        self._front = FrontDoor("api", log or make_logger(), lambda: audit, clock or SystemClock())
        self._runner = self._front.runner(
            app,
            access_log=None,
            handle_signals=False,
            keepalive_timeout=idle_connection_seconds,
        )

    async def start(
        self, *, socket_path: Path | None, address: str | None, port: int | None
    ) -> None:
        """Listen on the unix socket (SOCKET_MODE) and/or the loopback address."""
        await self._runner.setup()
        self._flusher = asyncio.create_task(self._flush_loop())
        where, on_tcp = str(socket_path), False
        try:
            if socket_path is not None:
                socket_path.parent.mkdir(parents=True, exist_ok=True)
                _remove_stale_socket(socket_path)
                listening = _bind_unix(socket_path)
                self._socket_path = socket_path
                await self._listen(listening)
            if address is not None and port is not None:
                where, on_tcp = f"{address}:{port}", True
                family = socket.AF_INET6 if ":" in address else socket.AF_INET
                await self._listen(socket.create_server((address, port), family=family))
        except MedgwError:
            await self.stop()
            raise
        except OSError as exc:
            await self.stop()
            if on_tcp and address is not None and port is not None:
                fix = bind_fix(exc, address, port, "[api] listen")
            else:
                fix = (
                    f"check that medgw's user may create {where} (its folder's owner and "
                    "mode), or change [api] socket in gateway.toml"
                )
            raise MedgwError(
                f"cannot listen for the local API on {where}: {bind_cause(exc)}", fix=fix
            ) from exc

    async def _listen(self, listening: socket.socket) -> None:
        site = _CappedSite(self._runner, listening, limit=self._max_connections, on_full=self._full)
        try:
            await site.start()
        except BaseException:
            listening.close()
            raise

    def _full(self, open_now: int) -> None:
        if self._log is not None and self._busy.admit("api"):
            self._log.warning(
                "api.busy",
                connections=open_now,
                reason=f"{self._max_connections} local API connections are open: new ones "
                "are closed at once until some end (idle ones close after "
                f"{IDLE_CONNECTION_SECONDS:g} s)",
                fix="look for an internal client that opens connections without closing "
                "them (ss -xp or ss -tnp on the API's socket or port shows which process)",
            )

    async def stop(self, timeout: float = 60.0) -> None:
        """Stop listening; requests in progress get ``timeout`` seconds, then are cancelled
        (a submission not yet spooled leaves nothing behind)."""
        await stop_serving(self._runner, timeout)
        if self._flusher is not None:
            self._flusher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._flusher
            self._flusher = None
        self._failures.flush(everything=True)  # the count of the last minute is not lost
        if self._socket_path is not None:
            self._socket_path.unlink(missing_ok=True)
            self._socket_path = None

    async def _flush_loop(self) -> None:
        while True:
            await asyncio.sleep(self._flush_seconds)
            with contextlib.suppress(Exception):  # the audit log's disk may be full for now
                self._failures.flush()

    def _client(self, request: web.Request) -> ApiClient | None:
        client = authenticate(self._clients(), request.headers.get("Authorization", ""))
        if client is None:
            self._failures.failed(request.remote or UNIX_SOCKET, request.path)
        return client

    async def _post(self, request: web.Request) -> web.Response:
        client = self._client(request)
        if client is None:
            return unauthorized()
        submission = parse_submission(request, f"api:{client.name}")
        if isinstance(submission, web.Response):
            return submission
        if submission.peer not in client.peers:
            # NET-3: a client sends only where its entry allows; an attempt is audited.
            self._audit.emit(
                AuditEvent(
                    EventType.API_REQUEST_REFUSED,
                    Outcome.FAILURE,
                    Severity.ALERT,
                    peer=submission.peer,
                    direction="outbound",
                    remote_address=request.remote or "local socket",
                    reason=f"API client {client.name!r} may not send to this peer",
                    detail={"client": client.name},
                )
            )
            return json_error(
                403,
                f"this client may not send to {submission.peer!r}",
                "ask the gateway administrator to add the peer to this client's `peers` "
                "in [[api.clients]]",
            )
        return await submit(request, submission, self._submit, idle_seconds=self._body_idle_seconds)

    async def _get(self, request: web.Request) -> web.Response:
        client = self._client(request)
        if client is None:
            return unauthorized()
        actor = f"api:{client.name}"

        async def status_fn(message_id: str, submitter: str | None) -> dict[str, Any] | None:
            view = await self._status(message_id, submitter)
            if view is not None and view.get("submitted_by") == actor:
                viewed(self._audit, view, actor, "local API")  # its own message: a read
            return view

        return await status(request, actor, status_fn)
