"""The front door of every HTTP listener: the AS2 listeners, the local API, the control
socket.

What aiohttp does by itself when a request cannot be parsed (bad header bytes,
folded headers, a Content-Length with chunked encoding, a bad chunk size) or
when a handler raises: it logs a multi-line traceback through the stdlib
``logging`` module (not our JSON lines), writes nothing to the audit trail,
echoes the parser's detail in the 400 body, and names the aiohttp and Python
versions in a ``Server`` header of every answer.  Here instead:

* a request aiohttp refuses is answered with a generic body for its status
  (``bad request``), logged as one JSON line (``http.bad_request``) and audited
  (``http.request_refused``, the parser's reason kept there);
* an exception that escapes a handler is answered ``500 internal error``, logged
  as one JSON line with the traceback in a field (``http.internal_error``) and
  audited; the client learns nothing of it;
* the ``Server`` header says ``medgw``, without versions.

Stopping (:func:`stop_serving`, :func:`finish_requests`): aiohttp's own shutdown
ignores every byte that arrives once it has begun, so a request whose body was
still arriving could only wait for its deadline and be cut.  Here a request
already started (its headers all received) goes on reading its body and runs to
its answer, which says ``Connection: close``; a connection waiting for its next
request is closed at once; what is still in progress at the deadline is cut.

Audit records of one source are bounded as for failed handshakes: the first
RECORDED a minute one by one, the rest counted in one record (:meth:`flush`).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
from collections.abc import Awaitable, Callable
from http import HTTPStatus
from typing import Any

from aiohttp import web
from aiohttp.web_protocol import RequestHandler
from cryptography import x509

from gateway.audit import AuditEvent, AuditSink, EventType, Outcome, Severity
from gateway.clock import Clock
from gateway.logs import Logger
from gateway.ratelimit import SourceBudget, address_source

SERVER_NAME = "medgw"
RECORDED = 10  # refused requests audited one by one per source and minute
# While stopping: how often the connections are looked at again (one that has answered
# its request, or has none, is closed), and how long the requests cut at the deadline
# get to see it before they are cancelled.
DRAIN_CHECK_SECONDS = 0.05
CUT_SECONDS = 0.5
REASON_CHARS = 300  # of a parser's reason kept in a log line or audit record
# Answers to a refused request: one text per status, nothing from the request.
_BODIES = {400: "bad request\n", 413: "request too large\n", 431: "bad request\n"}
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class FrontDoor:
    """One listener's refusals: answers, log lines, audit records."""

    def __init__(
        self,
        listener: str,
        log: Logger,
        audit: Callable[[], AuditSink | None],
        clock: Clock,
    ) -> None:
        """``audit`` finds the audit sink when one is written to (None: log only)."""
        self.listener = listener
        self._log = log
        self._audit = audit
        self._budget = SourceBudget(clock, per_window=RECORDED)

    def runner(self, app: web.Application, **kwargs: Any) -> web.AppRunner:
        """An AppRunner for ``app`` whose connections go through this front door."""
        app.middlewares.append(self._middleware)
        app.on_response_prepare.append(_name_server)
        return _Runner(self, app, **kwargs)

    @web.middleware
    async def _middleware(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        try:
            return await handler(request)
        except (web.HTTPException, asyncio.CancelledError, ConnectionError):
            raise
        except Exception as exc:
            return self.internal_error(request, exc)

    def internal_error(self, request: web.BaseRequest, exc: BaseException) -> web.Response:
        remote = request.remote or "unknown"
        what = _printable(f"{type(exc).__name__}: {exc}")
        self._log.error(
            "http.internal_error",
            remote=remote,
            method=_printable(request.method),
            path=_printable(request.path),
            error=what,
            exc_info=exc,
        )
        # Answered even if the trail cannot take its record (a full disk under it: the
        # line above says so): a client is never left without an answer.
        with contextlib.suppress(OSError):
            self._record(
                request,
                f"internal error while answering {_printable(request.method)} "
                f"{_printable(request.path)}: {what}; "
                "answered 500 without detail",
                500,
                Severity.ALERT,
            )
        return _answer(500)

    def refused(self, request: web.BaseRequest, status: int, reason: str) -> web.Response:
        """aiohttp could not read the request (``status`` is its 4xx)."""
        remote = request.remote or "unknown"
        reason = _printable(reason) or HTTPStatus(status).phrase
        self._log.warning("http.bad_request", remote=remote, status=status, reason=reason)
        refusal = f"malformed HTTP request refused ({status}): {reason}"
        self._record(request, refusal, status, Severity.WARNING)
        return _answer(status)

    def _record(
        self, request: web.BaseRequest, reason: str, status: int, severity: Severity
    ) -> None:
        sink = self._sink()
        if sink is None:
            return
        self.flush()
        remote = request.remote or "unknown"
        if not self._budget.admit(address_source(remote)):
            return
        detail: dict[str, object] = {"listener": self.listener, "status": status}
        certificate = _client_certificate(request)
        if certificate is not None:  # who sent it, on a listener with client certificates
            detail["client_certificate"] = certificate
        sink.emit(
            AuditEvent(
                EventType.HTTP_REQUEST_REFUSED,
                Outcome.FAILURE,
                severity,
                remote_address=remote,
                direction="inbound",
                reason=reason,
                detail=detail,
            )
        )

    def flush(self, *, everything: bool = False) -> None:
        """One record for each source whose refusals were counted, not written one by one."""
        sink = self._sink()
        if sink is None:
            return
        for window in self._budget.closed(everything=everything):
            sink.emit(
                AuditEvent(
                    EventType.HTTP_REQUEST_REFUSED,
                    Outcome.FAILURE,
                    Severity.WARNING,
                    remote_address=window.source,
                    direction="inbound",
                    reason=f"{window.held_back} more requests refused from {window.source} "
                    f"within {self._budget.window_seconds:.0f} s, beyond the {RECORDED} "
                    "recorded one by one",
                    detail={
                        "listener": self.listener,
                        "not_recorded_one_by_one": window.held_back,
                        "window_seconds": self._budget.window_seconds,
                    },
                )
            )

    def cut(self, remote: str, deadline: float) -> None:
        """A request still in progress when the stop's deadline came was cut."""
        self._log.warning(
            "http.request_cut",
            remote=remote,
            reason=f"a request was still in progress {deadline:g} s after the stop began "
            "(runtime.shutdown_deadline_seconds): its connection was closed without an "
            "answer, and the client has to send it again",
        )

    def _sink(self) -> AuditSink | None:
        return self._audit()

    def log_exception(self, message: str, exc: BaseException | None) -> None:
        """What aiohttp itself would have logged through stdlib logging."""
        self._log.error("http.internal_error", reason=message[:REASON_CHARS], exc_info=exc)


def _client_certificate(request: web.BaseRequest) -> dict[str, str] | None:
    """Subject and SHA-256 of the TLS client certificate of the request's connection."""
    transport = request.transport
    ssl_object = transport.get_extra_info("ssl_object") if transport is not None else None
    der = ssl_object.getpeercert(binary_form=True) if ssl_object is not None else None
    if not der:
        return None
    try:
        subject = x509.load_der_x509_certificate(der).subject.rfc4514_string()
    except ValueError:
        subject = "unreadable"
    return {"subject": _printable(subject), "sha256": hashlib.sha256(der).hexdigest()}


def _printable(text: str) -> str:
    """One line of printable US-ASCII, at most REASON_CHARS: what a client sent may hold
    anything (bytes that are not UTF-8 arrive as lone surrogates)."""
    flat = " ".join(text.split())
    return flat.encode("ascii", "backslashreplace").decode()[:REASON_CHARS]


def _answer(status: int) -> web.Response:
    body = _BODIES.get(status, "internal error\n" if status >= 500 else "bad request\n")
    response = web.Response(status=status, text=body, headers={"Server": SERVER_NAME})
    response.force_close()
    return response


async def _name_server(request: web.Request, response: web.StreamResponse) -> None:
    response.headers["Server"] = SERVER_NAME


class _Handler(RequestHandler):
    """aiohttp's per-connection protocol, answering and logging through a FrontDoor."""

    front: FrontDoor
    draining = False  # the listener is stopping: this connection takes no next request

    def settle(self) -> bool:
        """While stopping: close the connection if it waits for a next request (one whose
        headers have not all arrived is not started); True once it is closing, False
        while a request is in progress on it (its body may still be arriving)."""
        self.draining = True
        transport = self.transport
        if transport is None or transport.is_closing():
            return True
        waiter = self._waiter
        if waiter is not None and not waiter.done() and not self._messages:
            self.force_close()
            return True
        return False

    def cut(self, deadline: float) -> None:
        """The stop's deadline (``deadline`` seconds) has come with a request still in
        progress: the connection is dropped now (a TLS close would wait for the peer)
        and the request's handler cancelled."""
        self.draining = True
        task = self._task_handler
        transport = self.transport
        if transport is not None:
            peername = transport.get_extra_info("peername")
            self.front.cut(peername[0] if isinstance(peername, tuple) else "local", deadline)
            transport.abort()
        if task is not None:
            task.cancel()

    async def finish_response(
        self, request: web.BaseRequest, resp: web.StreamResponse, start_time: float | None
    ) -> tuple[web.StreamResponse, bool]:
        # While stopping, the answer says Connection: close (if it was not already on its
        # way) and aiohttp closes the connection after it.
        if self.draining:
            resp.force_close()
        answered, reset = await super().finish_response(request, resp, start_time)
        if self.draining:
            answered.force_close()
        return answered, reset

    def handle_error(
        self,
        request: web.BaseRequest,
        status: int = 500,
        exc: BaseException | None = None,
        message: str | None = None,
    ) -> web.StreamResponse:
        if request.writer.output_size > 0:  # part of an answer is out: nothing more to say
            raise ConnectionError("response already started")
        if status >= 500:
            return self.front.internal_error(request, exc or RuntimeError(message or "error"))
        return self.front.refused(request, status, message or str(exc or ""))

    def log_exception(self, *args: Any, **kw: Any) -> None:
        exc = kw.get("exc_info")
        self.front.log_exception(
            str(args[0]) if args else "error", exc if isinstance(exc, BaseException) else None
        )


class _Server(web.Server):
    def __init__(self, front: FrontDoor, plain: web.Server) -> None:
        super().__init__(
            plain.request_handler,
            request_factory=plain.request_factory,
            handler_cancellation=plain.handler_cancellation,
            loop=asyncio.get_running_loop(),
            **plain._kwargs,
        )
        self._front = front

    def __call__(self) -> RequestHandler:
        handler = _Handler(self, loop=self._loop, **self._kwargs)
        handler.front = self._front
        return handler


async def finish_requests(server: web.Server | None, timeout: float) -> None:
    """Stop ``server``'s connections (its listening sockets already closed): each
    request already started runs to its answer, its body still read as it arrives, for
    at most ``timeout`` seconds; a connection without one is closed at once, and one
    whose request has been answered right after it.  At the deadline the requests still
    in progress are cut: their connections dropped, their handlers cancelled (a body
    still arriving is not kept; work already handed to a worker thread ends there: an
    AS2 peer's resend is answered from the duplicate check, a local submission's by its
    idempotency key).
    """
    if server is None:
        return
    loop = asyncio.get_running_loop()
    end = loop.time() + timeout
    while True:
        handlers = [h for h in list(server.connections) if isinstance(h, _Handler)]
        # Each looked at every time (not all() with its shortcut): one that has just
        # answered is closed as soon as it waits for a next request.
        settled = [h.settle() for h in handlers]
        left = end - loop.time()
        if all(settled) or left <= 0:
            break
        await asyncio.sleep(min(DRAIN_CHECK_SECONDS, left))
    for handler, done in zip(handlers, settled, strict=True):
        if not done:
            handler.cut(timeout)
    await server.shutdown(CUT_SECONDS)


async def stop_serving(runner: web.AppRunner, timeout: float) -> None:
    """Stop listening, let the requests in progress finish within ``timeout`` seconds,
    then cut the rest (:func:`finish_requests`).

    ``runner.cleanup()`` alone would wait aiohttp's own 60 s for each of them, whatever
    the daemon's shutdown deadline, and ignore what arrives meanwhile.
    """
    for site in list(runner.sites):
        await site.stop()
    await finish_requests(runner.server, timeout)
    await runner.cleanup()


class _Runner(web.AppRunner):
    def __init__(self, front: FrontDoor, app: web.Application, **kwargs: Any) -> None:
        super().__init__(app, **kwargs)
        self._front = front

    async def _make_server(self) -> web.Server:
        return _Server(self._front, await super()._make_server())
