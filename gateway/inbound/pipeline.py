"""The receiving pipeline: peer check -> decrypt -> verify -> deliver -> receipt.

:meth:`InboundProcessor.process` is synchronous (it does the CPU-bound
cryptography) and is run in a worker thread by the channel handler.  It never
raises for a problem with the peer's message: every outcome becomes a signed
receipt whose disposition says which check failed, plus an audit event with
the detail.  The peer learns only the standard disposition, nothing internal.
"""

from __future__ import annotations

import contextlib
import secrets
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, replace
from datetime import datetime
from pathlib import Path
from typing import Any

from cryptography import x509

from gateway.as2.asyncmdn import async_receipt_url
from gateway.as2.entity import payload_chunks, payload_digest, read_entity_info
from gateway.as2.headers import (
    DIGEST_TO_MICALG,
    PROBE_HEADER,
    PROBE_MAX_BYTES,
    PROBE_PREFIX,
    PROBE_SUFFIX,
    check_message_id,
    parse_receipt_request,
    unquote_as2_id,
)
from gateway.as2.mdn import Disposition
from gateway.atrest import Vault, open_bytes
from gateway.audit import DURABLE, AuditEvent, AuditSink, EventType, Outcome, Pending, Severity
from gateway.audit.patients import patients_in_chunks
from gateway.channel.answers import ANSWERS, Answer, refusal_event
from gateway.clock import Clock
from gateway.cms.decrypting import DecryptedFile, decrypt_bytes, decrypt_file
from gateway.cms.stream import verify_entity_span
from gateway.config import GatewayConfig, Peer
from gateway.egress import Network
from gateway.errors import (
    AtRestError,
    DecryptionError,
    InboxUnavailableError,
    MalformedMessageError,
    MedgwError,
    PolicyError,
    ProtocolError,
    SignatureError,
    SignerNotTrustedError,
    SpoolError,
    SpoolUnreachableError,
)
from gateway.fsutil import private_folder, storage_fix
from gateway.inbound.exactly_once import InboxDelivery
from gateway.inbound.locks import InboundLocks
from gateway.inbound.outages import SPOOL_UNREACHABLE, Outage, StorageOutages
from gateway.inbound.outcomes import (
    DuplicateReceipt,
    Refused,
    audit_inbound,
    audit_inbound_later,
)
from gateway.inbound.receipts import Receipts
from gateway.inbound.recovery import record_cut_off, recover, remove_unrecorded, take_over
from gateway.inbound.settling import Arrival, ReceiptGroups, ReceiptToStore
from gateway.inbound.signers import AcceptedSigners, describe_signer
from gateway.logs import Logger
from gateway.routing import Refusal, route_inbound
from gateway.spool import Spool
from gateway.spool.records import sent_receipt_item


@dataclass(frozen=True)
class InboundRequest:
    peer: Peer
    remote: str
    headers: Mapping[str, str]  # lower-case names
    body: Path | bytes  # the AS2 body as received: a spooled file (any size), or bytes


@dataclass(frozen=True)
class InboundResponse:
    answer: Answer  # its HTTP status and text: gateway.channel.answers
    headers: tuple[tuple[str, str], ...]
    body: bytes
    # Set when the sender asked for an asynchronous receipt (RFC 4130 7.3): the
    # HTTP answer is then empty, and ``receipt`` is POSTed to ``receipt_url``.
    receipt_url: str | None = None
    receipt: tuple[tuple[tuple[str, str], ...], bytes] | None = None
    # A hand-over of the delivered document to an internal system was queued with the
    # receipt (the hand-over worker has work); not for a document left in the inbox only.
    handover: bool = False

    @property
    def status(self) -> int:
        return ANSWERS[self.answer].status

    @classmethod
    def refused(cls, answer: Answer) -> InboundResponse:
        found = ANSWERS[answer]
        return cls(answer, found.headers(), found.text.encode())


@dataclass(frozen=True)
class _Delivered:
    """Where a document went, and what its hand-over to an internal system needs."""

    target: Path
    service: str | None
    content_type: str
    size: int
    recorded: Pending  # its message.delivered, written: waited for before the spool's change


def _unverified(exc: Exception | None, opened: DecryptedFile) -> Refused:
    """The refusal of content whose signature did not verify, or whose CBC padding was
    invalid.  The two get one answer (integrity-check-failed), one audit event type and
    the same work (the signature is checked either way): a sender that could tell them
    apart could decrypt, block by block, any CBC message captured on its way to us by
    altering it and sending it as its own (a padding oracle)."""
    if not opened.intact:
        reason = (
            f"the decrypted content is not intact: its {opened.content_cipher} padding is "
            "invalid (the encrypted content was altered in transit, or encrypted with "
            "another key); answered as a failed signature check"
        )
        return Refused(Disposition.INTEGRITY_CHECK_FAILED, EventType.SIGNATURE_FAILED, reason)
    if isinstance(exc, SignerNotTrustedError):
        return Refused(Disposition.AUTHENTICATION_FAILED, EventType.SIGNATURE_FAILED, str(exc))
    return Refused(Disposition.INTEGRITY_CHECK_FAILED, EventType.SIGNATURE_FAILED, str(exc))


def _is_probe(headers: Mapping[str, str], filename: str | None, size: int) -> bool:
    """A ``medgw diagnose`` test message (see gateway.diagnose): verified, never delivered.

    Only a small text file with the probe's name counts, so that a real
    document can never be diverted by the header alone.
    """
    return (
        headers.get(PROBE_HEADER.lower()) == "1"
        and filename is not None
        and filename.startswith(PROBE_PREFIX)
        and filename.endswith(PROBE_SUFFIX)
        and size <= PROBE_MAX_BYTES
    )


class InboundProcessor:
    def __init__(
        self,
        config: GatewayConfig,
        spool: Spool,
        audit: AuditSink,
        log: Logger,
        clock: Clock,
        *,
        signers: Mapping[str, tuple[x509.Certificate, ...]] | None = None,
        locks: InboundLocks | None = None,
        network: Network | None = None,
        vault: Vault | None = None,
        outages: StorageOutages | None = None,
    ) -> None:
        # ``signers``: each peer's signing certificates that validate now (PKI layer);
        # without it (tests of this layer alone), every configured one.
        # ``locks``: the daemon's, kept across reloads (alone: its own).
        # ``network``: the daemon's connect path, for OCSP about personal signers
        # (alone: one judged by this configuration).
        # ``vault``: the daemon's encryption at rest (alone: receipts kept as they are).
        # ``outages``: the daemon's, kept across reloads (alone: its own).
        self._vault = vault
        self._outages = outages if outages is not None else StorageOutages(clock)
        network = network if network is not None else Network.fixed(config.network_map)
        self._signers = AcceptedSigners(config, network, clock, signers)
        self._receipts = Receipts(config, audit, log, clock)
        self._config = config
        self._clock = clock
        self._spool = spool
        self._audit = audit
        self._log = log
        self._locks = locks if locks is not None else InboundLocks()
        self._delivery = InboxDelivery(config, spool, audit, log, self._locks)
        self._receipt_groups = ReceiptGroups(spool, audit, log, vault)
        self._work_ready = False  # state_dir/incoming made (see _accept)

    @property
    def receipts_waiting(self) -> int:
        """Delivered documents whose receipts wait for a group to store them (for tests)."""
        return self._receipt_groups.waiting

    def _decrypt(
        self, body: Path | bytes, signed_path: Path, peer: Peer
    ) -> tuple[Path | bytes, DecryptedFile]:
        """Decrypt with our current key pair, or one of ``[[smime.decryption_keys]]``
        (rotation).  Returns the signed entity: a body held in memory (a small one)
        is decrypted in memory, a body in a file into ``signed_path``."""
        first: Exception | None = None
        for pair in self._config.smime.decryption_keys:
            try:
                if isinstance(body, bytes):
                    return decrypt_bytes(body, pair.certificate, pair.key, policy=peer.policy)
                opened = decrypt_file(
                    body, signed_path, pair.certificate, pair.key, policy=peer.policy
                )
                return signed_path, opened
            except DecryptionError as exc:
                first = first or exc  # encrypted for another of our keys, perhaps
            except (MalformedMessageError, PolicyError) as exc:
                first = exc
                break
        raise Refused(Disposition.DECRYPTION_FAILED, EventType.DECRYPTION_FAILED, str(first))

    def recover(self, since: datetime | None = None) -> None:
        """At start, before any request: write the records a kill cut off from changes
        made ``since`` (None: since the trail's end), and settle the deliveries a
        stopped process left."""
        trail = self._config.storage.audit_log
        record_cut_off(self._spool, self._audit, trail, self._log, since)
        recover(
            self._delivery,
            self._spool,
            self._log,
            self._config.storage.inbox_dir,
            self._clock.now().timestamp() - self._config.cluster.lease_seconds,
        )

    def take_over(self) -> int:
        """While running: settle the deliveries other nodes left when their claims ran
        out; how many (worker thread)."""
        return take_over(self._delivery, self._spool, self._log, self._locks)

    def sweep_work_files(self) -> None:
        """While running: remove the inbox work files no delivery needs, made a lease
        ago or more (by a node that died and never came back; worker thread)."""
        remove_unrecorded(
            self._spool,
            self._log,
            self._config.storage.inbox_dir,
            self._clock.now().timestamp() - self._config.cluster.lease_seconds,
        )

    def process(self, request: InboundRequest) -> InboundResponse:
        """Handle one AS2 request; the receipt comes back in the answer or, if the
        sender asked for it and the URL is its own gateway's, for later delivery."""
        response = self._process(request)
        url = async_receipt_url(request.headers.get("receipt-delivery-option"), request.peer.url)
        if url is None or response.answer is not Answer.RECEIPT or not response.body:
            return response
        return InboundResponse(
            Answer.RECEIPT_LATER,
            ANSWERS[Answer.RECEIPT_LATER].headers(),
            b"",
            receipt_url=url,
            receipt=(response.headers, response.body),
            handover=response.handover,
        )

    def _process(self, request: InboundRequest) -> InboundResponse:
        peer = request.peer
        headers = request.headers
        try:
            message_id = check_message_id(headers.get("message-id"))
        except ProtocolError as exc:
            self._reject(request, None, Answer.BAD_MESSAGE_ID, exc.message)
            return InboundResponse.refused(Answer.BAD_MESSAGE_ID)
        receipt_request = parse_receipt_request(headers)
        digest = receipt_request.choose_digest(peer.digest)
        # One request per (peer, Message-ID) at a time: a resend racing the original
        # waits for it and is then answered with the original receipt.
        with (
            self._locks.exclusive((peer.name, message_id)),
            self._receipt_groups.coming() as arrival,
        ):
            try:
                answered, stored = self._accept_and_answer(request, message_id, digest, arrival)
            except (InboxUnavailableError, SpoolError, OSError) as exc:
                return self.unavailable(request, message_id, exc)
        if stored is not None:  # an answer that stored nothing says nothing of the storage
            for outage in self._outages.stored(stored):
                self._storage_available(outage)
        return answered

    def unavailable(
        self, request: InboundRequest, message_id: str | None, exc: MedgwError | OSError
    ) -> InboundResponse:
        """What a peer sent could not be stored here for now: no space left for the
        document, an inbox folder this user may not write (or mounted read-only), or the
        spool, working files or audit log could not be written.

        Nothing is acknowledged: the answer is HTTP 503 without a receipt, so the
        peer keeps the message and resends it (a document that reached the inbox
        before the failure is not written again: see exactly_once).  An alert
        names the cause and the fix, once per outage (gateway.inbound.outages: the
        next failures of the same cause are counted; an alert the audit log could not
        take is tried again at the next); the peer learns nothing of it.  (An inbox the
        administrator must repair, such as a file where a folder should be, is
        answered with a negative receipt instead: the sender learns at once that
        the document was not delivered.)
        """
        fix: str | None = None
        if isinstance(exc, MedgwError):
            cause, fix = exc.message, exc.fix
        elif isinstance(exc, OSError) and exc.filename:
            cause = f"{exc.strerror or exc} ({exc.filename})"
            fix = storage_fix(exc, Path(exc.filename).parent, daemon=True)
        else:
            cause = str(exc)
        fix = fix or "free disk space, or fix the permissions, of the state and inbox folders"
        if isinstance(exc, SpoolUnreachableError):
            kind = SPOOL_UNREACHABLE  # its text names the back-off's seconds left
        else:
            kind = f"{type(exc).__name__}|{getattr(exc, 'errno', None)}|{fix}"
        # An inbox folder's cause is that folder's: a document stored in another one
        # (another service's) does not end its outage.
        folder = exc.folder if isinstance(exc, InboxUnavailableError) else None
        refused, outage = self._outages.refused(kind, cause, fix, folder)
        counted = {"refused_during_outage": refused} if refused > 1 else {}
        if outage is None:  # alerted already in this outage
            self._log.warning(
                "storage.unavailable",
                peer=request.peer.name,
                message_id=message_id,
                error=cause,
                **counted,
            )
            return InboundResponse.refused(Answer.UNAVAILABLE)
        written = False
        try:
            self._log.error(
                "storage.unavailable",
                peer=request.peer.name,
                message_id=message_id,
                error=cause,
                fix=fix,
                **counted,
            )
            alert = refusal_event(
                Answer.UNAVAILABLE,
                peer=request.peer.name,
                message_id=message_id,
                remote=request.remote,
                reason=f"could not store a received message: {cause}; answered "
                f"{ANSWERS[Answer.UNAVAILABLE].status}, the peer keeps it and resends",
                detail={"fix": fix},
            )
            self._audit.emit(alert)
            written = True
        except OSError as audit_exc:  # the audit log's disk may be the full one
            self._log.critical(
                "audit.write_failed",
                error=str(audit_exc),
                audit_event=EventType.STORAGE_UNAVAILABLE.value,
            )
        finally:  # not written: tried again at the next document refused for it
            self._outages.alert_written(outage, written)
        return InboundResponse.refused(Answer.UNAVAILABLE)

    def _storage_available(self, outage: Outage) -> None:
        """A document was stored where an outage's cause was: the outage is over."""
        since = outage.since.isoformat(timespec="seconds")
        self._log.info(
            "storage.available",
            cause=outage.cause,
            since=since,
            refused_during_outage=outage.refused,
        )
        try:
            self._audit.emit(
                AuditEvent(
                    EventType.STORAGE_AVAILABLE,
                    reason=f"received documents are stored again; {outage.refused} "
                    f"documents were answered 503 during the outage since {since} "
                    f"({outage.cause})",
                    detail={"refused": outage.refused, "since": since},
                )
            )
        except OSError as exc:
            self._log.critical(
                "audit.write_failed",
                error=str(exc),
                audit_event=EventType.STORAGE_AVAILABLE.value,
            )

    def _accept_and_answer(
        self, request: InboundRequest, message_id: str, digest: str, arrival: Arrival
    ) -> tuple[InboundResponse, Path | None]:
        """The answer, and the inbox folder the document was stored in (delivered, and its
        receipt written to the spool); None for a negative receipt, a resend answered with
        the receipt kept from before, or a probe, which write nothing there."""
        peer = request.peer
        try:
            mic, delivered, details = self._accept(request, message_id, digest)
        except Refused as refused:
            self._reject(request, message_id, refused.event, refused.reason)
            return self._receipt(request, message_id, refused.disposition, None, digest), None
        except DuplicateReceipt as duplicate:
            try:
                kept = open_bytes(
                    self._vault, sent_receipt_item(peer.name, message_id), duplicate.body
                )
            except AtRestError as exc:
                self._record(
                    EventType.AT_REST_INTEGRITY_FAILED,
                    peer.name,
                    message_id,
                    outcome=Outcome.FAILURE,
                    severity=Severity.ALERT,
                    reason=f"{exc.message}; the resend is answered with an error receipt",
                    detail={"fix": exc.fix} if exc.fix else None,
                )
                answer = self._receipt(
                    request, message_id, Disposition.UNEXPECTED_ERROR, None, digest
                )
                return answer, None
            self._record(
                EventType.MESSAGE_DUPLICATE,
                peer.name,
                message_id,
                remote_address=request.remote,
                reason="resend of a delivered message: answered with the original receipt",
            )
            return InboundResponse(Answer.RECEIPT, duplicate.headers, kept), None
        try:
            answer = self._answer(request, message_id, digest, mic, delivered, details, arrival)
            if delivered is None or answer.answer is not Answer.RECEIPT:
                return answer, None
            return answer, delivered.target.parent
        except BaseException:
            if delivered is not None:  # every record written is waited for
                with contextlib.suppress(OSError):
                    delivered.recorded.wait()
            raise

    def _answer(
        self,
        request: InboundRequest,
        message_id: str,
        digest: str,
        mic: str,
        delivered: _Delivered | None,
        details: str | None,
        arrival: Arrival,
    ) -> InboundResponse:
        """The receipt of a document delivered (or a probe), stored with its hand-over
        (``arrival``: the document on its way to the receipt groups)."""
        peer = request.peer
        response = self._receipt(request, message_id, Disposition.PROCESSED, mic, digest, details)
        if delivered is None:  # a `medgw diagnose` probe: audited, never delivered
            return response
        if response.answer is not Answer.RECEIPT:
            # Not built (our signing key failed: logged): the error answer is no receipt,
            # so nothing is stored, sent nor handed over.  The document stays in the inbox,
            # delivered but without a receipt in the spool, and the peer's resend (answered
            # 5xx now, as any internal failure) gets a receipt built then, delivered once.
            delivered.recorded.wait()
            return response
        delivery = self._config.delivery
        hand_over = delivery is not None and bool(delivery.url_for(delivered.service))
        # message.delivered (written before the receipt was signed, waited for there: it
        # precedes the spool's "delivered"), then the receipt and the hand-over to the
        # internal system in one transaction (every document answered "processed" is
        # handed over; the receipt kept encrypted at rest, with its data key), then
        # receipt.sent: each step taken together with the documents ready with this one.
        sent = AuditEvent(
            EventType.RECEIPT_SENT,
            peer=peer.name,
            message_id=message_id,
            direction="inbound",
            service=delivered.service,
            detail={
                "disposition": Disposition.PROCESSED.value,
                "mic": mic,
                "inbox_file": str(delivered.target),
                "handover": "queued" if hand_over else "none",
            },
        )
        receipt = ReceiptToStore(
            peer.name,
            message_id,
            list(response.headers),
            response.body,
            (delivered.content_type, delivered.size) if hand_over else None,
            delivered.recorded,
            sent,
        )
        self._receipt_groups.store(receipt, arrival)
        return replace(response, handover=hand_over)

    def _accept(
        self, request: InboundRequest, message_id: str, digest: str
    ) -> tuple[str, _Delivered | None, str | None]:
        """The MIC, where the document was delivered (None for a diagnose probe), and a
        line for the receipt about the signer (None: nothing to add)."""
        peer = request.peer
        headers = request.headers
        as2_from = unquote_as2_id(headers.get("as2-from", ""))
        as2_to = unquote_as2_id(headers.get("as2-to", ""))
        if as2_from != peer.as2_id:
            raise Refused(
                Disposition.AUTHENTICATION_FAILED,
                EventType.PEER_AUTHENTICATION_FAILED,
                f"AS2-From {as2_from!r} does not match the TLS client certificate's peer "
                f"{peer.name!r} (AS2 id {peer.as2_id!r})",
            )
        # NET-4: a message from a peer is delivered here or nowhere (no transit, no forwarding).
        route = route_inbound(self._config.as2_id, peer, as2_to, self._config.peers)
        if isinstance(route, Refusal):
            raise Refused(Disposition.AUTHENTICATION_FAILED, route.event, route.reason)
        work = self._config.storage.state_dir / "incoming"
        if not self._work_ready:  # the daemon made it at start; alone, made here once
            private_folder(work)
            self._work_ready = True
        token = secrets.token_hex(8)
        signed_path, entity_path = (work / f"{token}.{suffix}" for suffix in ("signed", "entity"))
        # A body held in memory is decrypted in memory: no signed file is written.  The
        # entity is written only in the rare forms verified in memory (see
        # verify_entity_span): a name never written is not removed (a system call each).
        written = [] if isinstance(request.body, bytes) else [signed_path]
        try:
            accepted = self._open_and_deliver(
                request, message_id, digest, signed_path, entity_path, written
            )
        except BaseException:
            written.append(entity_path)  # perhaps written before the failure
            self._remove_work_files(written)
            raise
        # Nothing may raise between the delivery and the caller's answer: the document is
        # in the inbox and its message.delivered written, to be waited for there.
        self._remove_work_files(written)
        return accepted

    def _remove_work_files(self, paths: list[Path]) -> None:
        """Remove a request's work files; one that cannot be removed now is left to the
        next start, which empties the work folder, and logged."""
        for path in paths:
            try:
                path.unlink(missing_ok=True)
            except OSError as exc:
                self._log.warning("inbound.work_file_left", file=path.name, error=str(exc))

    def _open_and_deliver(
        self,
        request: InboundRequest,
        message_id: str,
        digest: str,
        signed_path: Path,
        entity_path: Path,
        written: list[Path],
    ) -> tuple[str, _Delivered | None, str | None]:
        """Decrypt, verify and deliver, file to file: memory does not grow with the size
        (a small body is held in memory, and so is its signed entity unless it must be
        verified in memory: then it is written to ``entity_path``, added to ``written``)."""
        peer = request.peer
        headers = request.headers
        signed, opened = self._decrypt(request.body, signed_path, peer)
        self._legacy_accepted(peer, message_id, opened.compat_algorithms, "")
        personal = self._signers.personal(peer)
        try:
            verified, entity, mic_value = verify_entity_span(
                signed,
                entity_path,
                trusted_signers=self._signers.pinned(peer),
                policy=peer.policy,
                validate_signer=personal,
                mic_digest=digest,
            )
        except (SignerNotTrustedError, SignatureError, MalformedMessageError, PolicyError) as exc:
            raise _unverified(exc, opened) from exc
        if entity.path == entity_path:
            written.append(entity_path)
        if not opened.intact:  # verified all the same: the answer must not depend on it
            raise _unverified(None, opened)
        # e.g. signed with SHA-1
        self._legacy_accepted(peer, message_id, verified.compat_algorithms, " in the signature")
        mic = f"{mic_value}, {DIGEST_TO_MICALG[digest]}"
        signer = describe_signer(verified, personal)
        try:
            info = read_entity_info(entity.path, entity.start, entity.end)
            size, sha256 = payload_digest(entity.path, info)
        except ProtocolError as exc:
            raise Refused(
                Disposition.UNEXPECTED_ERROR, EventType.MESSAGE_REJECTED, str(exc)
            ) from exc
        content_type, filename, service = info.content_type, info.filename, info.service
        if service is not None and service not in peer.services:
            # Signed by the peer, so not forged in transit: a service we did not agree with it.
            configured = ", ".join(peer.services) or "none"
            raise Refused(
                Disposition.UNEXPECTED_ERROR,
                EventType.MESSAGE_REJECTED,
                f"the document names service {service[:80]!r}, which is not configured for "
                f"peer {peer.name!r} (its services: {configured}); add it to `services` in "
                f"{peer.source.name} if it was agreed with the peer",
            )
        if _is_probe(headers, filename, size):
            self._record(
                EventType.PROBE_RECEIVED,
                peer.name,
                message_id,
                remote_address=request.remote,
                reason="`medgw diagnose` test message: verified, answered, not delivered",
                detail={
                    "filename": filename,
                    "size": size,
                    "sha256": sha256,
                    **signer.detail,
                    "mic": mic,
                },
            )
            return mic, None, signer.receipt_line
        recorded = self._spool.inbound_get(peer.name, message_id)
        received: Pending = DURABLE
        if recorded is None:
            # Recorded once: a resend of a document recorded before is recorded by
            # InboxDelivery.deliver, as message.duplicate (or refused when it differs).
            # Written now, durable before the document is linked into the inbox (the
            # delivery waits for it there, after the work file's sync).
            received = audit_inbound_later(
                self._audit,
                EventType.MESSAGE_RECEIVED,
                peer.name,
                message_id,
                service=service,
                remote_address=request.remote,
                actor=f"peer:{peer.name}",
                # read from the decrypted document's first bytes (see SCAN_BYTES)
                patient_ids=patients_in_chunks(payload_chunks(entity.path, info)),
                detail={
                    "content_type": content_type,
                    "filename": filename,
                    "size": size,
                    "sha256": sha256,
                    **signer.detail,
                    "signature_algorithm": verified.signature_algorithm,
                    "digest": verified.digest,
                    "content_cipher": opened.content_cipher,
                    "key_transport": opened.key_transport,
                },
            )
        try:
            delivered = self._delivery.deliver(
                peer,
                message_id,
                filename,
                lambda: payload_chunks(entity.path, info),
                size,
                sha256,
                service,
                recorded=recorded,
                received=received,
            )
        except BaseException:
            with contextlib.suppress(OSError):  # every record written is waited for
                received.wait()
            raise
        received.wait()  # done before the link: returns at once
        where = _Delivered(delivered.target, service, content_type, size, delivered.recorded)
        return mic, where, signer.receipt_line

    # -- audit ----------------------------------------------------------------

    def _record(self, event: EventType, peer: str, message_id: str | None, **fields: Any) -> None:
        audit_inbound(self._audit, event, peer, message_id, **fields)

    def _legacy_accepted(
        self, peer: Peer, message_id: str, algorithms: Iterable[str], where: str
    ) -> None:
        """A warning for each monitored-list algorithm the peer's accept_legacy let in."""
        for algorithm in algorithms:
            self._record(
                EventType.COMPAT_ALGORITHM_USED,
                peer.name,
                message_id,
                outcome=Outcome.SUCCESS,
                severity=Severity.WARNING,
                reason=f"monitored-list algorithm {algorithm} accepted{where} (named in this "
                "peer's accept_legacy)",
                detail={"algorithm": algorithm},
            )

    def _reject(
        self,
        request: InboundRequest,
        message_id: str | None,
        why: Answer | EventType,
        reason: str,
    ) -> None:
        event = refusal_event(
            why,
            peer=request.peer.name,
            message_id=message_id,
            remote=request.remote,
            reason=reason,
        )
        self._log.warning(
            "message.rejected",
            peer=request.peer.name,
            message_id=message_id,
            audit_event=event.event.value,
            reason=reason,
        )
        self._audit.emit(event)

    def _receipt(
        self,
        request: InboundRequest,
        message_id: str,
        disposition: Disposition,
        mic: str | None,
        digest: str,
        details: str | None = None,
    ) -> InboundResponse:
        built = self._receipts.build(request.peer, message_id, disposition, mic, digest, details)
        if built is None:
            return InboundResponse.refused(Answer.RECEIPT_NOT_BUILT)
        return InboundResponse(Answer.RECEIPT, built.headers, built.body)
