"""Hand-over of received documents to an internal system over HTTP (``[delivery]``).

The receipt ``processed`` means one thing: the document is durably in the
inbox folder.  Handing it to an internal system (an EHR's import endpoint, a
LIS interface engine) is a second, separate step: the row for it is written in
the same spool transaction that stores the receipt, and this worker POSTs the
inbox file, streamed, until the system answers 2xx.  It is retried with capped
exponential back-off across restarts, so it is *at least once*: the system
must treat ``Idempotency-Key`` (the AS2 Message-ID, unique per peer) as the
key of the document and ignore a repeat.  A repeat comes when the daemon stops
between the system's answer and the record of it; it carries the same key,
headers and body.

Headers of each POST::

    Content-Type        the document's media type, as the peer sent it
    Content-Length      its size
    Idempotency-Key     the document's key: see :func:`idempotency_key`
    X-Medgw-Message-Id  the AS2 Message-ID
    X-Medgw-Peer        the sending peer's name (peers.d/)
    X-Medgw-Service     the service, when the document has one
    X-Medgw-Filename    the file's name in the inbox
    X-Medgw-Sha256      SHA-256 (hex) of the body

Several nodes may share the spool: a node takes due hand-overs in its name
under a lease (``Spool.handover_due``), renewed with its other claims
(gateway.daemon.leases), checks right before each POST that it still holds the
claim, and lets go of those it took and did not attempt (after a failure, and
at a stop: the other nodes take them at once); so one document is
POSTed by one node at a time, and a dead node's are taken over by the others
once its lease runs out.

The body is read from the inbox file; if that file is gone or no longer has
the SHA-256 it was received with, the hand-over stops (state ``failed``,
an alert) rather than POST something else.

The internal system belongs to the internal side, not to any zone: the POST
goes through the connect path's internal route (:mod:`gateway.egress`), which
never connects to an address inside a zone's egress ranges or to one of our
own listeners (NET-4), whatever the URL or its name resolves to at the time.

It is not retried for ever: after ``[runtime] max_attempts`` attempts, or once
``[runtime] message_expiry_seconds`` have passed since the document arrived (or
since an operator's ``medgw handover retry``), it becomes ``failed`` too, with
an alert naming the document, the internal system's host and the last error.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import random
import ssl
from collections.abc import AsyncIterator, Callable
from datetime import datetime
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlsplit

import aiohttp
from cryptography import x509

from gateway.audit import AuditEvent, AuditSink, EventType, Outcome, PatientId, Severity
from gateway.audit.patients import patients_in_file
from gateway.clock import Clock
from gateway.config import DeliverySettings, GatewayConfig, Runtime
from gateway.egress import Route
from gateway.errors import EgressRefused, MedgwError
from gateway.httpbody import read_capped
from gateway.logs import Logger
from gateway.lostclaims import LostClaims
from gateway.pki.tls import delivery_tls_context
from gateway.spool import HandoverRecord, Spool

T = TypeVar("T")

CHUNK = 1 << 20
MAX_ANSWER_BYTES = 64 << 10  # of the internal system's answer: read, never kept whole
IDLE_CHECK_SECONDS = 5.0


def idempotency_key(peer: str, message_id: str) -> str:
    """The key of one received document: SHA-256 (hex) of the peer's name and the
    Message-ID.  A Message-ID is unique only per peer, and a peer chooses it: with
    the Message-ID alone, a peer could send one it expects another peer to use, and
    an internal system would drop that peer's document as a repeat."""
    both = f"{peer}\0{message_id}".encode("utf-8", "surrogateescape")
    return hashlib.sha256(both).hexdigest()


class _Changed(Exception):
    """The inbox file is not the document that was received (gone, or other content)."""


class _NoContext(Exception):
    """The TLS context for an https:// internal system could not be built."""


async def _body(path: Path, size: int, sha256: str) -> AsyncIterator[bytes]:
    """The file in chunks; the last chunk only once its SHA-256 is confirmed.

    A mismatch raises before the request is complete, so the internal system
    never receives a whole body that is not the received document.
    """
    digest = hashlib.sha256()
    seen = 0
    with path.open("rb") as handle:
        pending = b""
        while chunk := await asyncio.to_thread(handle.read, CHUNK):
            if pending:
                yield pending
            digest.update(chunk)
            seen += len(chunk)
            pending = chunk
    if seen != size or digest.hexdigest() != sha256:
        raise _Changed(f"the inbox file {path} changed after delivery")
    if pending:
        yield pending


async def _off_loop(
    function: Callable[..., T], *args: Any, on_cancel: Callable[[T], object] | None = None
) -> T:
    """``function`` in a worker thread: the spool's calls (and the audit records with
    them) never hold the event loop, which a database that does not answer would for up
    to its connect timeout.  A cancellation (shutdown) waits for it to finish, so that
    nothing is left half-recorded when the spool is closed; if it finished, what it
    returned is handed to ``on_cancel`` (in a worker thread too) before the cancellation
    goes on: what it took is given back, not held by a node that is stopping."""
    work = asyncio.ensure_future(asyncio.to_thread(function, *args))
    try:
        return await asyncio.shield(work)
    except asyncio.CancelledError:
        await asyncio.wait([work])
        if on_cancel is not None and not work.cancelled() and work.exception() is None:
            await asyncio.wait([asyncio.ensure_future(asyncio.to_thread(on_cancel, work.result()))])
        raise


class HandOver:
    """POSTs every pending hand-over in the spool; one worker per daemon."""

    def __init__(
        self,
        spool: Spool,
        audit: Callable[[], AuditSink],
        log: Logger,
        clock: Clock,
        config: Callable[[], GatewayConfig],
        rng: random.Random,
        route: Route,
    ) -> None:
        """``route``: the connect path's route to the internal side."""
        self._route = route
        self._spool = spool
        self._audit = audit
        self._log = log
        self._clock = clock
        self._config = config
        self._rng = rng
        self._wakeup = asyncio.Event()
        # Keyed by the CA certificates themselves: a reloaded config with other
        # certificates in the same file gets a new context.
        self._contexts: dict[tuple[x509.Certificate, ...], ssl.SSLContext] = {}
        # The claims lost in a row per hand-over: each waits longer (gateway.lostclaims).
        self.lost_claims = LostClaims(clock)

    def wake(self) -> None:
        self._wakeup.set()

    def session(self) -> aiohttp.ClientSession:
        """The HTTP session hand-overs are made with (each request sets its own TLS
        context and timeout)."""
        return self._route.session(timeout=aiohttp.ClientTimeout(total=300, sock_connect=30))

    async def run(self) -> None:
        """Until cancelled: hand over what is due; rest the whole queue after a failure.

        A new configuration gets a new session: a connection kept alive from before a
        reload is not used after it (the connect path judges each new connection by
        the configuration in force)."""
        made_for: GatewayConfig | None = None
        session: aiohttp.ClientSession | None = None
        try:
            resume_at = 0.0
            while True:
                self._wakeup.clear()
                now = self._clock.now().timestamp()
                if now >= resume_at:
                    # Taken by this node; let go at once if it stops before it gets them.
                    due = await _off_loop(self._spool.handover_due, now, on_cancel=self._let_go)
                    started = 0
                    try:
                        for record in due:
                            if session is None or self._config() is not made_for:
                                if session is not None:
                                    await session.close()
                                made_for, session = self._config(), self.session()
                            started += 1
                            pause = await self.hand_over(session, record)
                            if pause > 0:
                                resume_at = self._clock.now().timestamp() + pause
                                break
                    finally:
                        # The rest waits (after a failure), or this node stops: let go of
                        # what it took and did not attempt, for any node to take at once.
                        if started < len(due):
                            await _off_loop(self._let_go, due[started:])
                now = self._clock.now().timestamp()
                next_at = await _off_loop(self._spool.handover_next_at)
                wait = IDLE_CHECK_SECONDS
                if next_at is not None:
                    wait = min(wait, max(next_at, resume_at) - now)
                if wait > 0:
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self._wakeup.wait(), timeout=wait)
        finally:
            if session is not None:
                await session.close()

    def _let_go(self, records: list[HandoverRecord]) -> None:
        """Let go of hand-overs this node took and did not attempt (each is due as it
        was); one the spool cannot be told of is taken over once its lease runs out."""
        for record in records:
            try:
                self._spool.handover_release(record.peer, record.message_id)
            except MedgwError as exc:
                self._log.warning(
                    "handover.release_failed",
                    peer=record.peer,
                    message_id=record.message_id,
                    error=exc.message,
                    fix="check that this node reaches the spool; the hand-over is made "
                    "by another node once this node's claim runs out",
                )

    def _context(self, delivery: DeliverySettings) -> ssl.SSLContext:
        """Raises _NoContext: load_config checked the certificates, but a failure here
        must still fail one attempt, not the worker."""
        certificates = delivery.ca_certificates
        context = self._contexts.get(certificates)
        if context is None:
            try:
                context = delivery_tls_context(certificates)
            except (ssl.SSLError, ValueError) as exc:
                raise _NoContext(
                    f"no TLS context from [delivery] ca {delivery.ca} "
                    f"({type(exc).__name__}: {exc}); fix: give the CA certificate(s) that "
                    "issued the internal system's certificate (PEM or DER), then run "
                    "`medgw check-config` and reload"
                ) from exc
            self._contexts[certificates] = context
        return context

    async def hand_over(self, session: aiohttp.ClientSession, record: HandoverRecord) -> float:
        """One attempt; returns 0, or how long the queue should rest after a failure."""
        config = self._config()
        delivery = config.delivery
        url = delivery.url_for(record.service) if delivery is not None else ""
        if delivery is None or not url:
            await _off_loop(
                self._give_up,
                record,
                "the hand-over is no longer configured ([delivery] in "
                "gateway.toml); the document stays in the inbox",
            )
            return 0.0
        headers = {
            "Content-Type": record.content_type,
            "Content-Length": str(record.size),
            "Idempotency-Key": idempotency_key(record.peer, record.message_id),
            "X-Medgw-Message-Id": record.message_id,
            "X-Medgw-Peer": record.peer,
            "X-Medgw-Filename": record.path.name,
            "X-Medgw-Sha256": record.sha256,
            **({"X-Medgw-Service": record.service} if record.service else {}),
        }
        ssl_context: ssl.SSLContext | bool = True
        try:
            if urlsplit(url).scheme == "https":
                ssl_context = self._context(delivery)
            if not record.path.is_file():
                raise _Changed(f"the inbox file {record.path} is gone")
            if not await _off_loop(self._spool.handover_holds, record.peer, record.message_id):
                await _off_loop(self._claim_lost, record)
                return 0.0
            if self.lost_claims.held(_key(record)):
                self._log.info(
                    "message.handover_claims_holding",
                    node=self._spool.node,
                    peer=record.peer,
                    message_id=record.message_id,
                )
            async with session.post(
                url,
                data=_body(record.path, record.size, record.sha256),
                headers=headers,
                ssl=ssl_context,
                timeout=aiohttp.ClientTimeout(total=delivery.timeout_seconds),
                allow_redirects=False,
            ) as response:
                status = response.status  # the answer's body says nothing more: read a
                await read_capped(response.content, MAX_ANSWER_BYTES)  # bounded part of it
        except _Changed as exc:
            await _off_loop(self._give_up, record, f"{exc}: nothing was handed over")
            return 0.0
        except _NoContext as exc:
            return await _off_loop(self._retry, record, url, str(exc))
        except (aiohttp.ClientError, TimeoutError, OSError, ssl.SSLError) as exc:
            cause = exc.__cause__
            if isinstance(cause, _Changed):
                await _off_loop(self._give_up, record, f"{cause}: nothing was handed over")
                return 0.0
            if isinstance(exc, aiohttp.ClientConnectorError) and isinstance(
                exc.os_error, EgressRefused
            ):
                why = f"not connected: {exc.os_error.message}"
                return await _off_loop(self._retry, record, url, why)
            return await _off_loop(self._retry, record, url, f"{type(exc).__name__}: {exc}")
        if not 200 <= status < 300:
            why = f"the internal system answered HTTP {status}"
            return await _off_loop(self._retry, record, url, why)
        await _off_loop(self._spool.handover_done, record.peer, record.message_id)
        self._log.info("message.handed_over", peer=record.peer, message_id=record.message_id)
        self._audit().emit(
            AuditEvent(
                EventType.MESSAGE_HANDED_OVER,
                peer=record.peer,
                service=record.service,
                message_id=record.message_id,
                direction="inbound",
                actor="medgw",
                patient_ids=await asyncio.to_thread(_patients, record.path),
                detail={
                    "url": _shown(url),
                    "status": status,
                    "attempt": record.attempts + 1,
                    "size": record.size,
                    "sha256": record.sha256,
                },
            )
        )
        return 0.0

    def _claim_lost(self, record: HandoverRecord) -> None:
        """This node may no longer hold the hand-over (its lease ran out, or nearly: it
        could not renew it): not POSTed now, not counted as an attempt.  Let go if it
        still holds it, due after a back-off that grows while its claims keep being lost
        (gateway.lostclaims); else left as it is to the node that took it over."""
        runtime = self._config().runtime
        key = _key(record)
        loss = self.lost_claims.next(key, runtime.retry_initial_seconds, runtime.retry_max_seconds)
        due = self._clock.now().timestamp() + loss.delay
        if not self._spool.handover_release(record.peer, record.message_id, due):
            self.lost_claims.forget(key)  # another node holds it: it hands it over as due
            self._log.info(
                "message.handover_claim_taken_over",
                peer=record.peer,
                message_id=record.message_id,
                node=self._spool.node,
            )
            return
        fix = (
            "check that this node reaches the spool, that its clock is right (NTP) and "
            "that [cluster] lease_seconds is longer than a hand-over takes; the document "
            "is handed over once a claim holds, by this node or another"
        )
        persisting = self.lost_claims.record(key, loss)
        self._log.warning(
            "message.handover_claim_lost",
            peer=record.peer,
            message_id=record.message_id,
            node=self._spool.node,
            losses=loss.count,
            retry_in_seconds=round(loss.delay, 1),
            fix=fix,
        )
        if persisting:
            self._log.error(
                "message.handover_claims_keep_failing",
                node=self._spool.node,
                peer=record.peer,
                message_id=record.message_id,
                losses=loss.count,
                fix=fix,
            )

    def _retry(self, record: HandoverRecord, url: str, reason: str) -> float:
        runtime = self._config().runtime
        attempt = record.attempts + 1
        base = min(
            runtime.retry_max_seconds, runtime.retry_initial_seconds * 2 ** max(0, attempt - 1)
        )
        delay = float(base * (0.5 + self._rng.random() / 2))
        now = self._clock.now().timestamp()
        if attempt >= runtime.max_attempts or now >= _deadline(record, runtime):
            self._expire(record, url, reason, attempt)
            return delay  # the system is still failing: the rest of the queue waits too
        self._log.warning(
            "message.handover_failed",
            peer=record.peer,
            message_id=record.message_id,
            reason=reason,
            retry_in_seconds=round(delay, 1),
            fix=f"check that the internal system at {_shown(url)} is up and answers 2xx; "
            "the document is safe in the inbox and is handed over again",
        )
        self._alert_failed(
            record,
            f"{reason}; retried in {delay:.0f} s",
            {
                "url": _shown(url),
                "attempt": attempt,
                "retry_in_seconds": round(delay, 1),
            },
        )
        # Counted only once audited: a crash in between leaves an audited attempt that
        # the spool did not count (its number is audited again), never a counted one
        # the audit trail does not show.
        self._spool.handover_retry(
            record.peer, record.message_id, reason, self._clock.now().timestamp() + delay
        )
        return delay

    def _expire(self, record: HandoverRecord, url: str, error: str, attempt: int) -> None:
        """Attempts or time ran out: ``failed``, not retried until an operator says so."""
        host = urlsplit(url).hostname or ""
        why = (
            f"gave up after {attempt} attempt{'s' if attempt != 1 else ''} ([runtime] "
            f"max_attempts / message_expiry_seconds); last error: {error}"
        )
        self._spool.handover_failed(record.peer, record.message_id, why)
        self._log.error(
            "message.handover_failed",
            peer=record.peer,
            message_id=record.message_id,
            reason=why,
            fix=f"bring the internal system at {host} back, then "
            f"`medgw handover retry {record.message_id}`; the document is in the inbox",
        )
        self._alert_failed(
            record,
            f"{why}; not retried",
            {
                "final": True,
                "url": _shown(url),
                "host": host,
                "inbox_file": str(record.path),
                "attempt": attempt,
                "last_error": error,
            },
        )

    def _alert_failed(self, record: HandoverRecord, reason: str, detail: dict[str, Any]) -> None:
        """The audit alert of a failed hand-over attempt (retried, or final)."""
        self._audit().emit(
            AuditEvent(
                EventType.HANDOVER_FAILED,
                Outcome.FAILURE,
                Severity.ALERT,
                peer=record.peer,
                service=record.service,
                message_id=record.message_id,
                direction="inbound",
                reason=reason,
                detail=detail,
            )
        )

    def _give_up(self, record: HandoverRecord, reason: str) -> None:
        self._spool.handover_failed(record.peer, record.message_id, reason)
        self._log.error(
            "message.handover_failed",
            peer=record.peer,
            message_id=record.message_id,
            reason=reason,
            fix="hand the document to the internal system by hand; it is not retried",
        )
        self._alert_failed(record, f"{reason}; not retried", {"final": True})


def _deadline(record: HandoverRecord, runtime: Runtime) -> float:
    """When the hand-over expires: set by an operator's retry, else arrival + expiry."""
    if record.expires_at > 0:
        return record.expires_at
    try:
        arrived = datetime.fromisoformat(record.created_at).timestamp()
    except ValueError:
        return float("inf")  # no usable arrival time: max_attempts still applies
    return arrived + runtime.message_expiry_seconds


def _key(record: HandoverRecord) -> str:
    """A hand-over's key among the lost claims (a Message-ID is unique per peer only)."""
    return f"{record.peer}\0{record.message_id}"


def _shown(url: str) -> str:
    """The URL without credentials or query, for logs and the audit trail."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    port = f":{parts.port}" if parts.port else ""
    return f"{parts.scheme}://{host}{port}{parts.path}"


def _patients(path: Path) -> tuple[PatientId, ...]:
    """The patients of a document handed over (none if its inbox file went meanwhile)."""
    try:
        return patients_in_file(path)
    except OSError:
        return ()
