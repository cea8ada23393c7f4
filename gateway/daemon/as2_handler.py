"""The AS2 request handler: what a peer's POST on a listener gets, from the TLS
client certificate to the answer.

Peer by certificate (or by a pinned key, validated in full here), the zone of the
listener (NET-4), a suspended exchange, undecodable headers, the size and pace of
the body, one peer's share of the workers; then the message goes to the inbound
pipeline (:mod:`gateway.inbound.pipeline`) or the asynchronous receipt to the outbound
side.
"""

from __future__ import annotations

import asyncio
import secrets
import threading
import weakref
from collections.abc import Awaitable, Callable, Mapping
from pathlib import Path

from aiohttp import web
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

from gateway.as2.asyncmdn import is_receipt
from gateway.as2.headers import undecodable_header
from gateway.audit import AuditEvent, EventType, Outcome, Severity
from gateway.channel.answers import ANSWERS, Answer, refusal_event, response
from gateway.channel.client import MAX_RECEIPT_BYTES
from gateway.clock import Clock
from gateway.config import Listener, Peer, Runtime, Zone
from gateway.daemon.state import Parts, RuntimeState
from gateway.daemon.tasks import Tasks
from gateway.errors import TransportError
from gateway.fairpool import FairPool
from gateway.fsutil import create_private
from gateway.httpbody import BodyPace, BodyTooSlow, paced_chunks, read_capped
from gateway.inbound import InboundRequest, InboundResponse
from gateway.outbound import Outbound
from gateway.pki.ocsp import OcspClient
from gateway.pki.tls import der_spki_fingerprint, fingerprint
from gateway.pki.validate import Purpose, RevocationPolicy, ValidationResult, validate
from gateway.routing import admit

INBOUND_PER_PEER = 8  # messages of one peer received at once; more wait their turn
# Worker threads that decrypt, verify and deliver received messages, and how many of
# them one peer's messages may take at once (gateway.fairpool): a peer flooding the
# gateway with expensive messages leaves the others threads that start at once.  A
# message larger than SMALL_BODY takes the peer's whole share: one such at a time.
INBOUND_WORKERS = 4
INBOUND_WORKERS_PER_PEER = 2
# A request body up to this size is held in memory (at most INBOUND_PER_PEER per peer);
# a larger one is streamed to a file under state_dir/incoming.
SMALL_BODY = 1 << 20
ASYNC_RECEIPT_ATTEMPTS = 5
# A TLS client certificate accepted by a key pin is judged in full (path, revocation) at
# the first request of its connection; later requests on that connection reuse the
# verdict while the trust in force is the same (a reload or trust change closes such
# connections), for at most this long and never past the certificate's end of validity.
PINNED_RECHECK_SECONDS = 60.0
_DER = Encoding.DER


class As2Handler:
    """Answers the AS2 requests of every listener, by the runtime state in force."""

    def __init__(
        self,
        state: Callable[[], RuntimeState],
        parts: Parts,
        outbound: Outbound,
        tasks: Tasks,
        *,
        ocsp_client: Callable[[Zone], OcspClient],
        on_handover: Callable[[], None],
        suspended: Callable[[str], bool],
    ) -> None:
        """``on_handover``: a delivered document's hand-over to an internal system was
        queued (the hand-over worker has work); ``suspended``: whether an operator
        suspended a peer, answered from memory (gateway.daemon.spoolview), never by a
        query on the event loop."""
        self._state = state
        self._audit, self._log, self._clock = parts.audit, parts.log, parts.clock
        self._outbound = outbound
        self._tasks = tasks
        self._ocsp_client = ocsp_client
        self._on_handover = on_handover
        self._suspended = suspended
        self._inbound_slots: dict[str, asyncio.Semaphore] = {}  # per peer
        self._pinned = PinnedVerdicts(self._clock)  # connections a key pin let in
        # Decrypting and verifying received messages: each peer gets its share.
        self.pool = FairPool(INBOUND_WORKERS, INBOUND_WORKERS_PER_PEER, name="inbound")

    def for_listener(
        self, listener: Listener
    ) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
        async def handle(request: web.Request) -> web.StreamResponse:
            return await self.handle(request, listener)

        return handle

    async def handle(self, request: web.Request, listener: Listener) -> web.StreamResponse:
        state = self._state()
        transport = request.transport
        ssl_object = transport.get_extra_info("ssl_object") if transport else None
        der = ssl_object.getpeercert(binary_form=True) if ssl_object else None
        peer = state.peers_by_tls.get(fingerprint(der)) if der else None
        remote = request.remote or "unknown"
        if peer is None and der:
            peer = self._pinned.peer(transport, state)
        if peer is None and der:
            pinned = state.peers_by_spki.get(der_spki_fingerprint(der) or "")
            if pinned is not None:
                # Accepted at the handshake by its key pin only: judge it now, in full.
                cert = x509.load_der_x509_certificate(der)
                verdict = await self._validate_spki_pinned(state, pinned, cert)
                if not verdict.valid:
                    return self._refuse_spki_pinned(pinned, cert, verdict, remote, listener)
                self._pinned_accepted(transport, state, pinned, cert, remote)
                peer = pinned
        if peer is None:
            # Pinned at the handshake; reaching here means the peer was removed by a reload.
            return self._refuse(
                Answer.UNKNOWN_CERTIFICATE,
                None,
                remote,
                "TLS client certificate belongs to no configured peer",
            )
        refusal = admit(listener.name, listener.zone, peer)
        if refusal is not None:
            # Pinned per zone at the handshake; reaching here means the zones changed on reload.
            self._log.warning("zone.violation", peer=peer.name, listener=listener.name)
            detail = {"rule": refusal.rule, **refusal.detail}
            return self._refuse(Answer.WRONG_ZONE, peer, remote, refusal.reason, detail)
        if self._suspended(peer.name):
            reason = "exchange with this peer is suspended by an operator"
            return self._refuse(Answer.SUSPENDED, peer, remote, reason)
        headers = {k.lower(): v for k, v in request.headers.items()}
        receipt = is_receipt(headers)
        bad = undecodable_header(headers)
        if bad is not None:
            return self._refuse(
                Answer.UNDECODABLE_RECEIPT_HEADER if receipt else Answer.UNDECODABLE_HEADER,
                peer,
                remote,
                f"header {bad} holds bytes that are not UTF-8 (AS2 headers are "
                "US-ASCII): the request was refused unread",
            )
        limit = MAX_RECEIPT_BYTES if receipt else state.config.runtime.max_message_bytes
        declared = request.content_length
        if declared is not None and declared > limit:
            # Refused before a byte of the body is read or a slot is taken.
            return self._refuse_body(
                Answer.TOO_LARGE,
                peer,
                remote,
                f"declared Content-Length {declared} is above the limit of {limit} bytes "
                + ("for a receipt" if receipt else "(runtime.max_message_bytes)"),
            )
        # A peer's requests (messages and asynchronous receipts) beyond INBOUND_PER_PEER
        # wait here, holding only their connection: one peer cannot fill the disk with
        # bodies or take every worker.
        slots = self._inbound_slots.setdefault(peer.name, asyncio.Semaphore(INBOUND_PER_PEER))
        async with slots:
            if receipt:
                return await self._receive_receipt(request, peer)
            return await self._receive_message(request, state, peer, remote, headers)

    async def _receive_message(
        self,
        request: web.Request,
        state: RuntimeState,
        peer: Peer,
        remote: str,
        headers: dict[str, str],
    ) -> web.StreamResponse:
        """Spool the body of an AS2 message, process it, answer with its receipt."""
        body_path = self._incoming_dir() / f"{secrets.token_hex(8)}.as2"
        body: bytes | Path | None = None
        work = _Work()
        try:
            try:
                body = await self._receive_body(request, body_path, state.config.runtime)
            except BodyTooSlow as exc:
                return self._refuse_body(Answer.TOO_SLOW, peer, remote, exc.message)
            if body is None:
                return self._refuse_body(
                    Answer.TOO_LARGE,
                    peer,
                    remote,
                    "message larger than runtime.max_message_bytes "
                    f"({state.config.runtime.max_message_bytes} bytes)",
                )
            if self._state() is not state:
                # Trust changed while the body arrived (a reload, a revocation found by the
                # refresh): it is not judged under the trust of before. Nothing was
                # acknowledged; the peer resends and is judged anew from the handshake on.
                self._log.warning(
                    "inbound.trust_changed_during_upload", peer=peer.name, remote_address=remote
                )
                return response(Answer.TRUST_CHANGED)
            processed = await self.pool.run(
                peer.name,
                _process,
                state,
                InboundRequest(peer, remote, headers, body),
                work,
                # a large body (spooled to a file) may be costly to read: it takes the
                # peer's whole share, small ones half of it each
                weight=INBOUND_WORKERS_PER_PEER if isinstance(body, Path) else 1,
            )
            assert processed is not None  # given up only once this handler has ended
            result = processed
        except ConnectionError as exc:  # the peer hung up mid-upload: it will resend
            self._log.warning(
                "inbound.aborted", peer=peer.name, remote_address=remote, reason=str(exc)
            )
            return response(Answer.INCOMPLETE)
        except OSError as exc:  # the body could not be spooled: disk full, permissions
            request_seen = InboundRequest(peer, remote, headers, body_path)
            result = state.inbound.unavailable(request_seen, None, exc)
        except Exception as exc:  # a defect must not leak details to the peer
            self._log.exception("inbound.unexpected_error", peer=peer.name)
            reason = f"internal error: {type(exc).__name__}: {exc}"[:500]
            return self._refuse(Answer.INTERNAL_ERROR, peer, remote, reason)
        finally:
            # (held in memory: no file was written)  A handler cancelled while its worker
            # thread reads the file (the stop's deadline) leaves it to the thread.
            if not isinstance(body, bytes) and work.give_up():
                body_path.unlink(missing_ok=True)
        if result.handover:
            # Only then: without one (no [delivery], or a service left in the inbox) the
            # worker has nothing to do, and waking it costs a spool transaction.
            self._on_handover()
        if result.receipt_url is not None and result.receipt is not None:
            self._tasks.spawn(
                self._deliver_async_receipt(peer, result.receipt_url, *result.receipt)
            )
        return response(result.answer, headers=result.headers, body=result.body)

    def _refuse(
        self,
        answer: Answer,
        peer: Peer | None,
        remote: str,
        reason: str,
        detail: Mapping[str, object] | None = None,
    ) -> web.Response:
        """A refused request: audited, answered as every refusal of its kind."""
        name = peer.name if peer is not None else None
        self._audit.emit(
            refusal_event(answer, peer=name, remote=remote, reason=reason, detail=detail)
        )
        return response(answer)

    def _refuse_body(self, answer: Answer, peer: Peer, remote: str, reason: str) -> web.Response:
        """Too large or too slow, audited; the connection is closed after it."""
        status = ANSWERS[answer].status
        self._log.warning(
            "inbound.body_refused", peer=peer.name, remote_address=remote, status=status
        )
        return self._refuse(answer, peer, remote, reason, {"http_status": status})

    async def _validate_spki_pinned(
        self, state: RuntimeState, peer: Peer, cert: x509.Certificate
    ) -> ValidationResult:
        """Path validation of an unlisted TLS client certificate with a pinned key."""
        zone = next(z for z in state.config.zones if z.name == peer.zone)
        return await validate(
            cert,
            anchors=zone.trust_anchors,
            purpose=Purpose.TLS_CLIENT,
            at=self._clock.now(),
            revocation=RevocationPolicy(zone.revocation),
            crls=zone.crls_in_use,
            ocsp=zone.ocsp,
            ocsp_client=self._ocsp_client(zone),
            policy=peer.policy,
        )

    def _pinned_accepted(
        self,
        transport: asyncio.BaseTransport | None,
        state: RuntimeState,
        peer: Peer,
        cert: x509.Certificate,
        remote: str,
    ) -> None:
        self._log.info(
            "peer.pinned_key_accepted",
            peer=peer.name,
            remote_address=remote,
            sha256=fingerprint(cert.public_bytes(_DER)),
        )
        self._pinned.accepted(transport, state, peer, cert)

    def _refuse_spki_pinned(
        self,
        peer: Peer,
        cert: x509.Certificate,
        verdict: ValidationResult,
        remote: str,
        listener: Listener,
    ) -> web.Response:
        subject = cert.subject.rfc4514_string()
        self._log.warning(
            "peer.authentication_failed", peer=peer.name, subject=subject, reason=verdict.reason
        )
        return self._refuse(
            Answer.PINNED_KEY_REFUSED,
            peer,
            remote,
            f"TLS client certificate with a pinned key (tls_spki_pins) is not "
            f"acceptable: {verdict.reason}",
            {
                "listener": listener.name,
                "subject": subject,
                "sha256": fingerprint(cert.public_bytes(_DER)),
                "revocation": verdict.revocation,
            },
        )

    async def _receive_receipt(self, request: web.Request, peer: Peer) -> web.StreamResponse:
        """An asynchronous receipt POSTed by a peer for one of our messages."""
        pace = BodyPace.of(self._state().config.runtime)
        remote = request.remote or "unknown"
        try:
            body = await read_capped(request.content, MAX_RECEIPT_BYTES, pace)
        except BodyTooSlow as exc:
            return self._refuse_body(Answer.TOO_SLOW, peer, remote, exc.message)
        if len(body) > MAX_RECEIPT_BYTES:
            reason = f"receipt larger than {MAX_RECEIPT_BYTES} bytes"
            return self._refuse_body(Answer.TOO_LARGE, peer, remote, reason)
        outcome = await self._outbound.receive_async_receipt(
            peer, request.headers.get("Content-Type", ""), body
        )
        return response(Answer.RECEIPT_TAKEN, body=f"receipt {outcome}\n".encode())

    async def _deliver_async_receipt(
        self, peer: Peer, url: str, headers: tuple[tuple[str, str], ...], body: bytes
    ) -> None:
        """POST a receipt the sender asked to get later; a few tries with back-off."""
        message_id = dict(headers).get("Original-Message-ID")
        delay = 1.0
        for attempt in range(1, ASYNC_RECEIPT_ATTEMPTS + 1):
            client = self._state().clients.get(peer.name)
            if client is None:
                return
            try:
                answer = await client.post(url, headers, body)
                if 200 <= answer.status < 300:
                    self._log.info("receipt.delivered_async", peer=peer.name, attempt=attempt)
                    return
                problem = f"HTTP {answer.status}"
            except TransportError as exc:
                if exc.refused:  # NET-4: the URL is outside the peer's zone as configured now
                    why = f"{exc}; not tried again"
                    break
                problem = str(exc)
            self._log.warning("receipt.async_delivery_failed", peer=peer.name, reason=problem)
            await asyncio.sleep(delay)
            delay = min(delay * 4, 300.0)
        else:
            why = f"{ASYNC_RECEIPT_ATTEMPTS} attempts failed, the last: {problem}"
        self._audit.emit(
            AuditEvent(
                EventType.RECEIPT_SENT,
                Outcome.FAILURE,
                Severity.WARNING,
                peer=peer.name,
                message_id=message_id,
                direction="inbound",
                reason=f"asynchronous receipt not delivered to {url}: {why}; the peer will "
                "resend the message and get it again",
            )
        )

    def _incoming_dir(self) -> Path:
        return self._state().config.storage.state_dir / "incoming"

    @staticmethod
    async def _receive_body(
        request: web.Request, path: Path, runtime: Runtime
    ) -> bytes | Path | None:
        """The request body: in memory up to SMALL_BODY, else streamed to ``path``
        (from the start when the declared length says so); None if it exceeds the
        size limit."""
        held: list[bytes] = []
        size = 0
        declared = request.content_length
        out = create_private(path) if declared is not None and declared > SMALL_BODY else None
        try:
            async for chunk in paced_chunks(request.content, BodyPace.of(runtime)):
                size += len(chunk)
                if size > runtime.max_message_bytes:
                    return None
                if out is None and size <= SMALL_BODY:
                    held.append(chunk)
                    continue
                if out is None:  # too big to hold: to the file from here on
                    out = create_private(path)
                    held.append(chunk)
                    await asyncio.to_thread(out.writelines, held)
                    held.clear()
                else:
                    await asyncio.to_thread(out.write, chunk)
        finally:
            if out is not None:
                out.close()
        return path if out is not None else b"".join(held)


class _Work:
    """Whether a received body's processing has begun in its worker thread (which then
    removes the body's file) or was given up before (its handler removes it)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._state = "waiting"

    def begin(self) -> bool:
        """The worker thread: False if the handler has given it up already."""
        with self._lock:
            if self._state == "given up":
                return False
            self._state = "running"
            return True

    def give_up(self) -> bool:
        """The handler, at its end: True if the thread never began (nor will)."""
        with self._lock:
            if self._state == "running":
                return False
            self._state = "given up"
            return True


def _process(state: RuntimeState, request: InboundRequest, work: _Work) -> InboundResponse | None:
    """In a worker thread: process ``request``, then remove its body's file (None, and
    nothing done, if its handler gave it up before this thread began)."""
    if not work.begin():
        return None
    try:
        return state.inbound.process(request)
    finally:
        if isinstance(request.body, Path):
            request.body.unlink(missing_ok=True)


class PinnedVerdicts:
    """What the full judgement of a certificate accepted by a key pin found, per
    connection: its later requests reuse it while the trust in force is the same, for
    at most PINNED_RECHECK_SECONDS and never past the certificate's end of validity."""

    def __init__(self, clock: Clock) -> None:
        self._clock = clock
        # connection -> (the trust it was judged under, until when, the peer)
        self._judged: weakref.WeakKeyDictionary[
            asyncio.BaseTransport, tuple[RuntimeState, float, Peer]
        ] = weakref.WeakKeyDictionary()

    def peer(self, connection: asyncio.BaseTransport | None, state: RuntimeState) -> Peer | None:
        """The peer judged acceptable on ``connection`` under ``state``, if that still
        holds (None: judge it again)."""
        judged = self._judged.get(connection) if connection is not None else None
        if judged is None:
            return None
        under, until, peer = judged
        if under is not state or self._clock.now().timestamp() >= until:
            return None
        return peer

    def accepted(
        self,
        connection: asyncio.BaseTransport | None,
        state: RuntimeState,
        peer: Peer,
        cert: x509.Certificate,
    ) -> None:
        if connection is not None:
            until = min(
                self._clock.now().timestamp() + PINNED_RECHECK_SECONDS,
                cert.not_valid_after_utc.timestamp(),
            )
            self._judged[connection] = (state, until, peer)
