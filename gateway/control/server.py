"""HTTP over the control unix socket, for ``medgw queue`` / ``peers`` / ``send`` / ``handover``.

``POST /v1/messages`` and ``GET /v1/messages/{id}`` are the local API's (see
gateway.intake.submit), with its ``Idempotency-Key``, for the administrator: the
submitter recorded (whose keys they are) is the caller's account as the kernel
reports it, e.g. ``operator:alice (uid 1000)``, and every message is visible; the
audit trail's actor adds the name sudo passes, as a claim.
"""

from __future__ import annotations

import asyncio
import os
import socket
import struct
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any
from urllib.parse import unquote

from aiohttp import web

from gateway.audit.first import log_not_written
from gateway.clock import SystemClock
from gateway.errors import AuditNotWrittenError, MedgwError, SpoolError
from gateway.fsutil import MAX_SOCKET_PATH
from gateway.httpfront import FrontDoor, stop_serving
from gateway.intake.submit import (
    IDLE_CONNECTION_SECONDS,
    StatusFn,
    SubmitFn,
    account_name,
    parse_submission,
    status,
    submit,
)
from gateway.logs import Logger, make_logger
from gateway.maintenance.approvals import approve
from gateway.operations import (
    Operations,
    Reloaded,
    ReloadRefused,
    UnknownPeerError,
    handover_view,
    record_view,
)
from gateway.retention.purge import purge_request
from gateway.spool import HandoverState, OutboundState

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def caller(request: web.Request) -> str:
    """Who is on the other end, as the audit trail's ``actor``: the account and uid the
    kernel reports for the socket, first; then the login name the command passes (sudo's
    SUDO_USER, else USER) - which medgw cannot verify (only sudo's own log does), and so
    is marked as claimed."""
    return operator(_peer_uid(request), unquote(request.headers.get("X-Medgw-Operator", "")))


def _peer_uid(request: web.Request) -> int:
    """The uid the kernel reports for the socket's other end (-1 if none)."""
    sock = request.transport.get_extra_info("socket") if request.transport else None
    if sock is None:
        return -1
    creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    _pid, uid, _gid = struct.unpack("3i", creds)
    return int(uid)


def operator(uid: int, passed: str) -> str:
    """The actor for account ``uid`` that says it is ``passed`` (see :func:`caller`)."""
    name = account_name(uid)
    claimed = "".join(c for c in passed if c.isprintable())
    claimed = claimed.strip()[:64]
    if claimed and claimed != name:
        return f"operator:{name} (uid {uid}, claims to be {claimed})"
    return f"operator:{name} (uid {uid})"


def _error(exc: MedgwError, status: int) -> web.Response:
    return web.json_response({"error": exc.message, "fix": exc.fix}, status=status)


async def _json_object(request: web.Request) -> dict[str, Any] | web.Response:
    """The request's JSON object (empty without a body), or the 400 to answer."""
    if not request.can_read_body:
        return {}
    try:
        body = await request.json()
    except ValueError:  # not JSON, or not UTF-8
        body = None
    if not isinstance(body, dict):
        return web.json_response(
            {
                "error": "the request body is not a JSON object",
                "fix": "send a JSON object (as medgw peers and medgw handover do), or no body",
            },
            status=400,
        )
    return body


class ControlServer:
    def __init__(
        self,
        path: Path,
        operations: Callable[[], Operations],
        submit_fn: SubmitFn,
        status_fn: StatusFn,
        reload: Callable[[str], Awaitable[Reloaded | ReloadRefused]],
        front: FrontDoor | None = None,
        log: Logger | None = None,
    ) -> None:
        """``reload``: the daemon's, for the caller (the warnings once done, else why not).
        ``front``: how malformed requests and internal errors are answered, logged and
        audited (without: a front door that only logs).  ``log``: the daemon's log."""
        if len(str(path)) > MAX_SOCKET_PATH:
            raise MedgwError(
                f"control socket path {path} is longer than {MAX_SOCKET_PATH} characters",
                fix="use a shorter [storage] state_dir",
            )
        self.path = path
        self._ops = operations
        self._submit = submit_fn
        self._status = status_fn
        self._reload = reload
        self._draining = False
        self._log = log or make_logger()
        app = web.Application(middlewares=[self._refused_while_stopping])
        app.router.add_get("/v1/queue", self._list)
        app.router.add_get("/v1/queue/{message_id}", self._show)
        app.router.add_post("/v1/queue/{message_id}/retry", self._retry)
        app.router.add_post("/v1/queue/{message_id}/cancel", self._cancel)
        app.router.add_get("/v1/peers", self._peers)
        app.router.add_post("/v1/peers/{peer}/suspend", self._suspend)
        app.router.add_post("/v1/peers/{peer}/resume", self._resume)
        app.router.add_get("/v1/handover", self._handover_list)
        app.router.add_post("/v1/handover/{message_id}/retry", self._handover_retry)
        app.router.add_post("/v1/maintenance/approve", self._maintenance_approve)
        app.router.add_post("/v1/maintenance/unlock", self._maintenance_unlock)
        app.router.add_post("/v1/purge", self._purge)
        app.router.add_post("/v1/audit/verification-failed", self._verification_failed)
        app.router.add_post("/v1/reload", self._reload_config)
        app.router.add_post("/v1/backup", self._backup)
        app.router.add_post("/v1/backup/restore-refused", self._restore_refused)
        app.router.add_get("/v1/emergency", self._emergency)
        app.router.add_post("/v1/emergency/{action:seal|enter|leave}", self._emergency)
        app.router.add_post("/v1/messages", self._submit_message)
        app.router.add_get("/v1/messages/{message_id}", self._message_status)
        front = front or FrontDoor("control", self._log, lambda: None, SystemClock())
        self._runner = front.runner(
            app,
            access_log=None,
            handle_signals=False,
            keepalive_timeout=IDLE_CONNECTION_SECONDS,
        )

    async def start(self) -> None:
        await self._runner.setup()
        self.path.unlink(missing_ok=True)  # a stale socket of a killed run
        # Bound here and made owner-only before it listens. (Not by changing the umask:
        # that is process-wide, and the listeners are already writing inbox files.)
        # Until the chmod no one else can connect: connecting needs write permission,
        # which the umask never gives to others.
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.bind(str(self.path))
            os.chmod(self.path, 0o600)
        except OSError:
            sock.close()
            raise
        await web.SockSite(self._runner, sock).start()

    def drain(self) -> None:
        """The daemon is stopping: the socket goes on answering what reads (queue, peers)
        while the transfers in progress finish, and refuses whatever would change or start
        something (a reload, a document sent, a backup, a purge, an emergency...)."""
        self._draining = True

    @web.middleware
    async def _refused_while_stopping(
        self, request: web.Request, handler: Handler
    ) -> web.StreamResponse:
        if self._draining and request.method not in ("GET", "HEAD"):
            # Nothing is done: 409, which `medgw send` reads as "nothing was spooled".
            return web.json_response(
                {
                    "error": "medgw is stopping: it takes no new command while the "
                    "transfers in progress finish, and did nothing",
                    "fix": "run the command again once medgw runs again (systemctl start medgw)",
                },
                status=409,
            )
        return await handler(request)

    async def stop(self, timeout: float = 60.0) -> None:
        """Stop listening; requests in progress get ``timeout`` seconds, then are cancelled."""
        await stop_serving(self._runner, timeout)
        self.path.unlink(missing_ok=True)

    async def _list(self, request: web.Request) -> web.Response:
        state = request.query.get("state")
        try:
            wanted = OutboundState(state) if state else None
        except ValueError:
            names = ", ".join(s.value for s in OutboundState)
            return web.json_response(
                {"error": f"unknown state {state!r}", "fix": f"use one of: {names}"}, status=400
            )
        ops, who, peer = self._ops(), caller(request), request.query.get("peer")

        def listed() -> list[dict[str, Any]]:
            now = ops.clock.now()
            views = [record_view(r, now) for r in ops.spool.list_outbound(state=wanted, peer=peer)]
            ops.listed(views, who, "queue", request.query)
            return views

        return await self._read(listed)

    async def _show(self, request: web.Request) -> web.Response:
        ops, who = self._ops(), caller(request)

        def shown() -> dict[str, Any] | None:
            record = ops.spool.get(request.match_info["message_id"])
            if record is None:
                return None
            view = record_view(record, ops.clock.now())
            ops.viewed(view, who, "control socket")
            return view

        try:
            view = await asyncio.to_thread(shown)
        except SpoolError as exc:
            return _error(exc, 409)
        if view is None:
            return web.json_response(
                {"error": "no such message", "fix": "check the id with medgw queue list"},
                status=404,
            )
        return web.json_response(view)

    async def _read(self, work: Callable[[], Any]) -> web.Response:
        """``work()`` in a worker thread (as :meth:`_act`), answered as JSON; a spool
        that fails it, with what failed and what to do."""
        try:
            return web.json_response(await asyncio.to_thread(work))
        except SpoolError as exc:
            return _error(exc, 409)

    async def _act(self, request: web.Request, action: Callable[[Operations], Any]) -> web.Response:
        """``action`` in a worker thread: a spool database that does not answer never
        holds the event loop (the daemon's other work and pages go on meanwhile)."""
        ops = self._ops()
        try:
            result = await asyncio.to_thread(action, ops)
        except UnknownPeerError as exc:
            return _error(exc, 404)
        except AuditNotWrittenError as exc:
            return self._not_written(exc)
        except SpoolError as exc:
            return _error(exc, 409)
        if result is None:
            return web.json_response({"ok": True})
        return web.json_response(record_view(result, ops.clock.now()))

    def _not_written(self, exc: AuditNotWrittenError) -> web.Response:
        """An action refused because its audit record could not be written: logged, and
        answered with what, why and the fix (503: it works again once the trail can be
        written)."""
        log_not_written(self._log, exc)
        return _error(exc, 503)

    async def _retry(self, request: web.Request) -> web.Response:
        who = caller(request)
        return await self._act(
            request, lambda ops: ops.retry(request.match_info["message_id"], who)
        )

    async def _cancel(self, request: web.Request) -> web.Response:
        who = caller(request)
        return await self._act(
            request, lambda ops: ops.cancel(request.match_info["message_id"], who)
        )

    async def _peers(self, request: web.Request) -> web.Response:
        return await self._read(self._ops().peers)

    async def _suspend(self, request: web.Request) -> web.Response:
        who = caller(request)
        body = await _json_object(request)
        if isinstance(body, web.Response):
            return body
        reason = str(body.get("reason") or "suspended by operator")[:500]
        return await self._act(
            request, lambda ops: ops.suspend(request.match_info["peer"], reason, who)
        )

    async def _verification_failed(self, request: web.Request) -> web.Response:
        who = caller(request)
        body = await _json_object(request)
        if isinstance(body, web.Response):
            return body
        reason = str(body.get("reason") or "medgw audit verify found the trail broken")[:2000]
        return await self._act(request, lambda ops: ops.audit_verification_failed(reason, who))

    async def _reload_config(self, request: web.Request) -> web.Response:
        """``medgw reload``: as SIGHUP, recorded with who asked.  Shielded: a client that
        gives up waiting does not cut a reload short."""
        refused = await asyncio.shield(self._reload(caller(request)))
        if isinstance(refused, Reloaded):
            return web.json_response({"reloaded": True, "warnings": list(refused.warnings)})
        # Decided by why it was refused, not by whether the daemon is stopping now: files
        # refused during a stop would be refused again at the next start.
        return web.json_response({"error": refused.error, "fix": refused.fix}, status=409)

    async def _restore_refused(self, request: web.Request) -> web.Response:
        """``medgw restore`` refused because this daemon runs: recorded in its trail."""
        who = caller(request)
        body = await _json_object(request)
        if isinstance(body, web.Response):
            return body
        bundle = Path(str(body.get("file") or "")[:1000])
        reason = str(body.get("reason") or "daemon-running")[:100]
        message = str(body.get("error") or "")[:2000]
        forced = body.get("forced") is True
        return await self._act(
            request, lambda ops: ops.restore_refused(bundle, reason, message, who, forced)
        )

    async def _resume(self, request: web.Request) -> web.Response:
        who = caller(request)
        return await self._act(request, lambda ops: ops.resume(request.match_info["peer"], who))

    async def _handover_list(self, request: web.Request) -> web.Response:
        state = request.query.get("state")
        try:
            wanted = HandoverState(state) if state else None
        except ValueError:
            names = ", ".join(s.value for s in HandoverState)
            return web.json_response(
                {"error": f"unknown hand-over state {state!r}", "fix": f"use one of: {names}"},
                status=400,
            )
        ops, who = self._ops(), caller(request)

        def listed() -> list[dict[str, Any]]:
            views = ops.handovers(wanted)
            ops.listed(views, who, "handover", request.query)
            return views

        return await self._read(listed)

    async def _handover_retry(self, request: web.Request) -> web.Response:
        who = caller(request)
        body = await _json_object(request)
        if isinstance(body, web.Response):
            return body
        peer = body.get("peer")
        try:
            record = await asyncio.to_thread(
                self._ops().handover_retry,
                request.match_info["message_id"],
                who,
                str(peer) if peer else None,
            )
        except AuditNotWrittenError as exc:
            return self._not_written(exc)
        except SpoolError as exc:
            return _error(exc, 409)
        return web.json_response(handover_view(record))

    async def _purge(self, request: web.Request) -> web.Response:
        who = caller(request)
        body = await _json_object(request)
        if isinstance(body, web.Response):
            return body
        ops = self._ops()
        try:
            purge = purge_request(body, ops.clock.now(), ops.config.retention.audit_days)
            counts = await asyncio.to_thread(ops.purge, purge, who)
        except MedgwError as exc:
            return _error(exc, 400)
        return web.json_response({"dry_run": purge.dry_run, "counts": counts})

    async def _backup(self, request: web.Request) -> web.Response:
        who = caller(request)
        body = await _json_object(request)
        if isinstance(body, web.Response):
            return body
        to = str(body.get("to") or "")
        if not to.startswith("/"):
            return web.json_response(
                {
                    "error": f"backup file {to[:200]!r} is not an absolute path",
                    "fix": "give --to an absolute path the medgw user may write",
                },
                status=400,
            )
        try:
            written = await asyncio.to_thread(self._ops().backup, Path(to), who)
        except MedgwError as exc:
            return _error(exc, 409)
        return web.json_response(written.view())

    async def _maintenance_approve(self, request: web.Request) -> web.Response:
        who = caller(request)
        body = await _json_object(request)
        if isinstance(body, web.Response):
            return body
        try:
            entry = approve(
                self._ops(),
                str(body.get("person", "")),
                str(body.get("until", "")),
                str(body.get("reason", "")),
                who,
            )
        except AuditNotWrittenError as exc:
            return self._not_written(exc)
        except MedgwError as exc:
            return _error(exc, 400)
        return web.json_response(entry)

    async def _maintenance_unlock(self, request: web.Request) -> web.Response:
        who = caller(request)
        body = await _json_object(request)
        if isinstance(body, web.Response):
            return body
        try:
            return web.json_response(self._ops().unlock(str(body.get("person", "")), who))
        except AuditNotWrittenError as exc:
            return self._not_written(exc)
        except MedgwError as exc:
            return _error(exc, 400)

    async def _emergency(self, request: web.Request) -> web.Response:
        """Where emergencies stand; seal a break-glass credential; enter or leave
        emergency mode (gateway.emergency), each audited with the caller."""
        who = caller(request)
        emergency = self._ops().emergency
        if emergency is None:
            return _error(MedgwError("emergencies are not handled here"), 503)
        if request.method == "GET":
            return web.json_response(emergency.status())
        body = await _json_object(request)
        if isinstance(body, web.Response):
            return body
        action = request.match_info["action"]
        hours = body.get("hours")
        try:
            if action == "seal":
                answer = emergency.seal(
                    str(body.get("public_key", "")),
                    str(body.get("salt", "")),
                    str(body.get("verifier", "")),
                    who,
                )
            elif action == "enter":
                answer = emergency.enter(
                    str(body.get("reason", "")),
                    str(body["until"]) if body.get("until") is not None else None,
                    float(hours) if isinstance(hours, int | float) else None,
                    who,
                )
            else:
                answer = emergency.leave(str(body.get("reason", "")), who)
        except AuditNotWrittenError as exc:
            return self._not_written(exc)
        except MedgwError as exc:
            return _error(exc, 400)
        return web.json_response(answer)

    async def _submit_message(self, request: web.Request) -> web.Response:
        # The message, and its Idempotency-Key, are the account's: a resend is recognised
        # whoever sudo names (the name is kept as a claim in the audit trail's actor).
        account = operator(_peer_uid(request), "")
        submission = parse_submission(request, caller(request), account)
        if isinstance(submission, web.Response):
            return submission
        return await submit(request, submission, self._submit)

    async def _message_status(self, request: web.Request) -> web.Response:
        who = caller(request)

        async def status_fn(message_id: str, submitter: str | None) -> dict[str, Any] | None:
            view = await self._status(message_id, submitter)
            if view is not None:
                self._ops().viewed(view, who, "control socket")
            return view

        return await status(request, None, status_fn)
