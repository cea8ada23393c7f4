"""The sending pipeline: outbox -> sign and encrypt -> spool -> POST -> receipt.

Intake is crash-safe in three committed steps: a spool row in state
``intake`` is written first, then the file is moved from the outbox into the
spool, then the signed and encrypted AS2 body is written and the row becomes
``queued`` (and the plaintext copy is removed).  :meth:`Outbound.recover`
finishes whatever a killed process left half-done, so a document taken from
the outbox is never lost and never sent twice as two messages.

Documents submitted over HTTP (the local API, the control socket) arrive
through :meth:`Outbound.submit`: the body is streamed to a temporary file in
the spool, fsync'ed and renamed, then the ``intake`` row is written together
with who submitted it, and from there on it is prepared exactly like a
document from the outbox.  A payload file without a row (killed between the
rename and the row) is removed at start-up: its submitter never got a
Message-ID and submits again.

Each peer has its own sender task, so a slow or dead peer never delays
documents to the others.
"""

from __future__ import annotations

import asyncio
import errno
import filecmp
import hashlib
import os
import random
import secrets
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import IO, Any, Protocol, TypeVar

from cryptography import x509

from gateway.as2.headers import new_message_id
from gateway.as2.mdn import mic_matches, parse_receipt
from gateway.as2.message import MessageSpec, build_message, build_message_file
from gateway.audit import AuditEvent, AuditSink, EventType, Outcome, PatientId, Severity
from gateway.audit.patients import SCAN_BYTES, patients_in, unique_patients
from gateway.channel.client import PeerClient, Response
from gateway.clock import Clock
from gateway.cms.enveloped import key_transport_for
from gateway.config import GatewayConfig, Peer
from gateway.errors import MedgwError, ObjectSecurityError, SpoolError, TransportError
from gateway.fsutil import (
    fsync_dir,
    private_folder,
    read_chunks,
    remove_stale_partials,
    storage_fix,
    write_atomic,
)
from gateway.intake.outbox import Candidate, scan
from gateway.intake.submit import Submission, SubmissionRefused, account_name
from gateway.logs import Logger
from gateway.operations import record_view
from gateway.pki.peers import PeerTrust
from gateway.pki.tls import certificate_fingerprint
from gateway.policy import DEFAULT_KEY_TRANSPORT
from gateway.routing import LOCAL_INTAKE
from gateway.spool import OutboundRecord, OutboundState, Spool

T = TypeVar("T")

INTAKE_PARALLELISM = 8
# A document up to this size is signed and encrypted in memory, and its AS2 body kept
# in the spool's row (committed with the row, no file); a larger one streams file
# to file, its body in state/outgoing.
INLINE_BODY_BYTES = 64 * 1024
WRITE_BATCH = 1 << 20  # bytes gathered from the request before one write in a worker thread
FINAL_STATES = frozenset(
    {
        OutboundState.DELIVERED,
        OutboundState.FAILED,
        OutboundState.EXPIRED,
        OutboundState.DEAD,
        OutboundState.CANCELLED,
    }
)

# A message that asked for its receipt later is settled by that receipt (verified, for
# this message, from this peer) in these states too: the peer may POST it before it
# answers the send, or after the receipt was given up as overdue and the message was
# queued again, expired, marked dead or cancelled.  The receipt is the peer's word
# that it has the document; the message's state must not say otherwise.
LATE_RECEIPT_STATES = frozenset(
    {
        OutboundState.SENDING,
        OutboundState.QUEUED,
        OutboundState.EXPIRED,
        OutboundState.DEAD,
        OutboundState.CANCELLED,
    }
)
GIVEN_UP = frozenset({OutboundState.EXPIRED, OutboundState.DEAD, OutboundState.CANCELLED})


class Current(Protocol):
    """The runtime state the sender reads: one configuration and the trust judged for it
    (the daemon's RuntimeState is one; :class:`Settings` for tests and tools)."""

    @property
    def config(self) -> GatewayConfig: ...

    @property
    def trust(self) -> Mapping[str, PeerTrust]: ...


@dataclass(frozen=True)
class Settings:
    config: GatewayConfig
    trust: Mapping[str, PeerTrust]


class Outbound:
    def __init__(
        self, state: Current, spool: Spool, audit: AuditSink, log: Logger, clock: Clock
    ) -> None:
        self._state = state
        self._spool = spool
        self._audit = audit
        self._log = log
        self._clock = clock
        state_dir = state.config.storage.state_dir
        self._payloads = state_dir / "payloads"
        self._outgoing = state_dir / "outgoing"
        self._receipts = state_dir / "receipts"
        for folder in (self._payloads, self._outgoing, self._receipts):
            private_folder(folder)
        self._reported_unknown: set[str] = set()
        self._reported_unknown_services: set[tuple[str, str]] = set()
        self._reported_skipped: set[Path] = set()
        # Rows of takes that failed and whose removal failed too (the spool's disk full):
        # removed before any document is taken again, see intake_once.
        self._unabandoned: set[str] = set()
        self.wakeups: dict[str, asyncio.Event] = {}

    def use(self, state: Current) -> None:
        """Read ``state`` from now on: a reload swaps the configuration and the trust
        judged for it together, never one without the other."""
        self._state = state

    @property
    def config(self) -> GatewayConfig:
        return self._state.config

    @property
    def trust(self) -> Mapping[str, PeerTrust]:
        """Which peer certificates are acceptable now."""
        return self._state.trust

    def _recipient(self, peer: Peer) -> x509.Certificate:
        """The newest acceptable encryption certificate of ``peer`` (rotation: see pki.peers)."""
        judged = self.trust.get(peer.name)
        recipient = judged.encryption_recipient if judged else None
        if recipient is None:
            reasons = "; ".join(
                v.result.reason or "" for v in (judged.encryption if judged else ())
            )
            raise ObjectSecurityError(
                f"peer {peer.name!r} has no acceptable encryption certificate"
                + (f" ({reasons})" if reasons else ""),
                fix=f"put the peer's current encryption certificate in {peer.source} "
                "encryption_certificates and reload",
            )
        return recipient

    def _signers(self, peer: Peer) -> tuple[x509.Certificate, ...]:
        judged = self.trust.get(peer.name)
        return judged.signing_certificates if judged else ()

    def wake(self, peer: str) -> None:
        event = self.wakeups.get(peer)
        if event is not None:
            event.set()

    async def _in_thread(
        self,
        function: Callable[..., T],
        *args: Any,
        on_cancel: Callable[[T], None] | None = None,
    ) -> T:
        """Run ``function`` in a worker thread: the spool's transactions, audit records
        and files, each with its fsync, stay off the event loop, which keeps serving
        other messages meanwhile.  A cancellation (shutdown) waits until it has
        finished, so nothing is left half-recorded when the spool is closed;
        ``on_cancel`` then undoes what its result would have started, and an error
        it raised meanwhile is logged (its caller is gone)."""
        work = asyncio.ensure_future(asyncio.to_thread(function, *args))
        try:
            return await asyncio.shield(work)
        except asyncio.CancelledError:
            await asyncio.wait([work])
            error = None if work.cancelled() else work.exception()
            if error is not None:
                self._log.error(
                    "shutdown.step_failed",
                    step=getattr(function, "__name__", "step"),
                    error=str(error) or type(error).__name__,
                    fix="the message is queued again at the next start; see the spool's "
                    "state with `medgw queue list`",
                )
            elif on_cancel is not None and not work.cancelled():
                on_cancel(work.result())
            raise

    # -- audit ----------------------------------------------------------------

    def _record(
        self,
        event: EventType,
        *,
        peer: str,
        message_id: str | None,
        outcome: Outcome = Outcome.SUCCESS,
        severity: Severity = Severity.INFO,
        service: str | None = None,
        reason: str | None = None,
        detail: dict[str, Any] | None = None,
    ) -> None:
        """One audit record about an outbound message."""
        self._audit.emit(
            AuditEvent(
                event,
                outcome,
                severity,
                peer=peer,
                message_id=message_id,
                direction="outbound",
                service=service,
                reason=reason,
                detail=detail or {},
            )
        )

    def _alert(
        self,
        event: EventType,
        *,
        peer: str,
        message_id: str | None,
        reason: str,
        service: str | None = None,
        detail: dict[str, Any] | None = None,
    ) -> None:
        """An outbound message failed in a way an operator must look at."""
        self._record(
            event,
            peer=peer,
            message_id=message_id,
            outcome=Outcome.FAILURE,
            severity=Severity.ALERT,
            service=service,
            reason=reason,
            detail=detail,
        )

    # -- intake ---------------------------------------------------------------

    async def intake_once(self) -> int:
        if self._unabandoned:
            await self._in_thread(self._abandon_failed_takes)
        peers = {p.name: p.services for p in self.config.peers}
        result = scan(self.config.storage.outbox_dir, peers)
        for peer_name, folder in result.unknown_services:
            if (peer_name, folder) not in self._reported_unknown_services:
                self._reported_unknown_services.add((peer_name, folder))
                services = ", ".join(peers[peer_name]) or "none"
                self._log.warning(
                    "outbox.unknown_service_folder",
                    peer=peer_name,
                    folder=folder,
                    services=services,
                    fix=f"its files are not sent: add {folder!r} to `services` in "
                    f"peers.d/{peer_name}.toml (as agreed with the peer), or move them into "
                    f"outbox/{peer_name}/ or one of its service folders ({services})",
                )
        for folder in result.unknown_folders:
            if folder not in self._reported_unknown:
                self._reported_unknown.add(folder)
                self._log.warning(
                    "outbox.unknown_peer_folder",
                    folder=folder,
                    fix="create peers.d/<name>.toml or remove the folder",
                )
        for bad in result.bad_names:
            if bad in self._reported_skipped:
                continue
            self._reported_skipped.add(bad)
            # The folder only: the name cannot be written as text, and may identify a patient.
            self._log.warning(
                "outbox.bad_file_name",
                folder=bad.parent.name,
                fix="a file there has a name that is not UTF-8 (a Windows share writing "
                "Shift_JIS, say); it is not sent until it is renamed to a UTF-8 name "
                "(for example: convmv -f shift_jis -t utf-8 --notest FILE)",
            )
        for skipped in result.skipped:
            if skipped in self._reported_skipped:
                continue
            self._reported_skipped.add(skipped)
            # The folder, not the file name: names can carry patient identifiers.
            self._log.warning(
                "outbox.not_a_regular_file",
                folder=skipped.parent.name,
                fix="rename regular files into the outbox; links and folders are not sent",
            )
        # Several documents are taken at once: each take is mostly fsync and
        # crypto in worker threads, so they overlap well.
        limit = asyncio.Semaphore(INTAKE_PARALLELISM)

        async def take(candidate: Candidate) -> None:
            async with limit:
                await self._take(candidate)

        # Every take finishes before this returns, even when one fails: the next scan
        # must not start a second take of a file this one is still moving.
        outcomes = await asyncio.gather(
            *(take(c) for c in result.candidates), return_exceptions=True
        )
        for outcome in outcomes:
            if isinstance(outcome, BaseException):
                raise outcome
        return len(result.candidates)

    def _abandon_failed_takes(self) -> None:
        """Remove the rows of earlier takes that could not be removed when they failed.
        Raises SpoolError while one stays: no document is taken again (under a new
        Message-ID) beside the row of a failed take, which a restart would act on."""
        for message_id in sorted(self._unabandoned):
            self._spool.abandon_intake(message_id)
            self._unabandoned.discard(message_id)

    async def _take(self, candidate: Candidate) -> None:

        def take_and_seal() -> str | None:
            taken = self._take_into_spool(candidate)
            if taken is None:
                return None
            record, peer, submitter = taken
            return peer.name if self._seal_and_queue(record, peer, submitter) else None

        queued_for = await self._in_thread(take_and_seal)  # one trip to a worker thread
        if queued_for is not None:
            self.wake(queued_for)

    def _take_into_spool(self, candidate: Candidate) -> tuple[OutboundRecord, Peer, str] | None:
        """Record the document and move it from the outbox into the spool (worker thread);
        None if its peer was removed (by a reload) since the scan: it stays in the outbox,
        and the next scan reports the folder as one without a peer.  The submitter
        recorded is the file's owner, the account that wrote it into the outbox."""
        peer = self.config.peer(candidate.peer)
        if peer is None:
            return None
        try:
            owner = candidate.path.lstat().st_uid
        except FileNotFoundError:
            return None  # taken away since the scan
        submitter = f"outbox:{account_name(owner)} (uid {owner})"
        message_id = new_message_id(self.config.as2_id)
        token = os.urandom(12).hex()
        payload_path = self._payloads / token
        self._spool.add_intake(
            message_id,
            peer.name,
            candidate.path.name,
            candidate.content_type,
            candidate.path,
            payload_path,
            expires_at=self._clock.now().timestamp() + self.config.runtime.message_expiry_seconds,
            zone=peer.zone,
            origin=LOCAL_INTAKE,
            submitted_by=submitter,
            service=candidate.service,
        )
        try:
            _move_into_spool(candidate.path, payload_path)
        except OSError as exc:
            if candidate.path.exists():
                # Still in the outbox (say the spool's disk is full): a later scan takes it
                # again. The row must not outlive this try, or a restart would take a new
                # document of the same name for this message as well.
                payload_path.unlink(missing_ok=True)
                try:
                    self._spool.abandon_intake(message_id)
                except SpoolError:
                    self._unabandoned.add(message_id)  # removed before the next take
            # The folder, not the file name: names can carry patient identifiers.
            raise SpoolError(
                f"cannot move a document from outbox/{candidate.peer} into the spool "
                f"({self._payloads}): {exc.strerror or exc}",
                fix=storage_fix(exc, self._payloads),
            ) from exc
        record = self._spool.get(message_id)
        assert record is not None
        return record, peer, submitter

    async def submit(self, submission: Submission, chunks: AsyncIterator[bytes]) -> dict[str, Any]:
        """Spool a document streamed from a local submitter; returns the message's view.

        Memory use does not grow with the body: chunks are gathered up to
        WRITE_BATCH and written by a worker thread.  Raises SubmissionRefused
        (unknown peer, empty, too large) before anything is recorded.
        """
        peer = self.config.peer(submission.peer)
        if peer is None:
            known = ", ".join(p.name for p in self.config.peers) or "(none)"
            raise SubmissionRefused(
                f"no peer named {submission.peer!r}",
                fix=f"use one of: {known}",
                status=404,
            )
        if submission.service is not None and submission.service not in peer.services:
            configured = ", ".join(peer.services) or "none"
            raise SubmissionRefused(
                f"peer {peer.name!r} has no service {submission.service!r} "
                f"(its services: {configured})",
                fix=f"use one of its services, leave the service out, or add it to `services` "
                f"in {peer.source.name} once agreed with the peer",
                status=400,
            )
        limit = self.config.runtime.max_message_bytes
        token = os.urandom(12).hex()
        payload_path = self._payloads / token
        partial = self._payloads / f".{token}.{secrets.token_hex(6)}.partial"
        try:
            fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
            with os.fdopen(fd, "wb", closefd=True) as out:
                size = 0
                batch: list[bytes] = []
                batched = 0
                async for chunk in chunks:
                    size += len(chunk)
                    if size > limit:
                        raise SubmissionRefused(
                            f"the document is larger than runtime.max_message_bytes ({limit})",
                            fix="send a smaller document, or raise max_message_bytes in "
                            "gateway.toml (the peer must accept it too)",
                            status=413,
                        )
                    batch.append(chunk)
                    batched += len(chunk)
                    if batched >= WRITE_BATCH:
                        await asyncio.to_thread(out.writelines, batch)
                        batch, batched = [], 0
                if size == 0:
                    raise SubmissionRefused(
                        "the request body is empty", fix="send the document as the body", status=400
                    )
                await asyncio.to_thread(_finish_file, out, batch)
            await asyncio.to_thread(_rename_durably, partial, payload_path)
        except BaseException as exc:
            partial.unlink(missing_ok=True)
            if isinstance(exc, OSError) and not isinstance(exc, ConnectionError):
                # This disk, not the submitter (who may have hung up: ConnectionError).
                error = f"cannot write a submitted document: {exc.strerror or exc}"
                raise self._not_stored(error, storage_fix(exc, self._payloads)) from exc
            raise
        message_id = new_message_id(self.config.as2_id)
        try:
            self._spool.add_intake(
                message_id,
                peer.name,
                submission.filename,
                submission.content_type,
                payload_path,
                payload_path,
                expires_at=self._clock.now().timestamp()
                + self.config.runtime.message_expiry_seconds,
                zone=peer.zone,
                origin=LOCAL_INTAKE,
                submitted_by=submission.submitter,
                service=submission.service,
            )
        except BaseException as exc:
            payload_path.unlink(missing_ok=True)
            if isinstance(exc, SpoolError):
                raise self._not_stored(exc.message, exc.fix or "") from exc
            raise
        record = self._spool.get(message_id)
        assert record is not None
        # Durable from here: finish even if the submitter hangs up now.
        # The patients the submitter named go into message.accepted with the document's
        # own; they are not kept in the spool (only the audit trail holds patient ids),
        # so a preparation finished after a restart records the document's only.
        await asyncio.shield(
            self._prepare(
                record, peer, submitted_by=submission.submitter, declared=submission.patients
            )
        )
        view = await self.status(message_id)
        assert view is not None
        return view

    def _not_stored(self, error: str, fix: str) -> SubmissionRefused:
        """The answer to a submission this gateway cannot store now (its disk is full, say).

        The administrator gets the cause and the fix in the log; the submitter, who can
        do nothing about them, is told to send again later (503), not our paths.
        """
        self._log.error(
            "submission.not_stored",
            error=error,
            fix=f"{fix}; the submitter was answered 503 (nothing spooled) and sends again",
        )
        return SubmissionRefused(
            "the gateway cannot store the document just now; nothing was spooled",
            fix="send it again later; if this goes on, tell the gateway administrator",
            status=503,
        )

    async def status(self, message_id: str, submitter: str | None = None) -> dict[str, Any] | None:
        """A message's state, who submitted it, and its receipt verified again from the store.

        With ``submitter``: None unless that submitter sent it, decided before any work is
        done for it (a client learns nothing of other clients' messages, not even by time).
        """
        submitted_by = self._spool.submitter(message_id)
        if submitter is not None and submitted_by != submitter:
            return None
        record = self._spool.get(message_id)
        if record is None:
            return None
        view = record_view(record)
        view["submitted_by"] = submitted_by
        view["final"] = record.state in FINAL_STATES
        view["receipt"] = await asyncio.to_thread(self._stored_receipt, record)
        return view

    def _stored_receipt(self, record: OutboundRecord) -> dict[str, Any] | None:
        if record.receipt_path is None or not record.receipt_path.is_file():
            return None
        peer = self.config.peer(record.peer)
        if peer is None:
            return {"verified": False, "error": f"peer {record.peer!r} is no longer configured"}
        head, _, body = record.receipt_path.read_bytes().partition(b"\r\n\r\n")
        content_type = head.decode("latin-1").partition(":")[2].strip()
        try:
            receipt = parse_receipt(
                content_type, body, trusted_signers=self._signers(peer), policy=peer.policy
            )
        except MedgwError as exc:
            return {"verified": False, "error": str(exc)}
        return {
            "verified": True,
            "disposition": receipt.disposition,
            "mic": receipt.mic,
            "mic_matches": record.mic is not None and mic_matches(record.mic, receipt.mic),
            "signer": receipt.signer.subject.rfc4514_string(),
            "original_message_id": receipt.original_message_id,
        }

    async def _prepare(
        self,
        record: OutboundRecord,
        peer: Peer,
        *,
        submitted_by: str | None = None,
        declared: tuple[PatientId, ...] = (),
    ) -> None:
        if await self._in_thread(self._seal_and_queue, record, peer, submitted_by, declared):
            self.wake(peer.name)

    def _seal_and_queue(
        self,
        record: OutboundRecord,
        peer: Peer,
        submitted_by: str | None,
        declared: tuple[PatientId, ...] = (),
    ) -> bool:
        """Sign and encrypt a spooled document and queue it (True); or keep it, unsent,
        and alert (False).  ``declared``: the patients its submitter named (the local
        API), recorded with those the document itself names.  Runs in a worker thread:
        crypto, files and the spool's transactions, each with its fsync, stay off the
        event loop."""
        smime = self.config.smime
        at = self._clock.now()
        body_path = self._outgoing / (record.payload_path.name + ".as2")

        def build() -> _Sealed:
            recipient = self._recipient(peer)
            spec = MessageSpec(
                filename=record.filename,
                content_type=record.content_type,
                message_id=record.message_id,
                sender_as2_id=self.config.as2_id,
                receiver_as2_id=peer.as2_id,
                signing=smime.signing,
                recipients=(recipient,),
                digest=peer.digest,
                cipher=peer.cipher,
                policy=peer.policy,
                at=at,
                service=record.service,
                receipt_url=peer.async_receipt_url or None,
            )
            encrypted_for = certificate_fingerprint(recipient)
            key_transport = key_transport_for(recipient, peer.policy)
            # The patients are read from the document's first bytes: all of a small one,
            # a bounded prefix of a large one (read again as it streams; from the cache).
            with record.payload_path.open("rb") as handle:
                head = handle.read(SCAN_BYTES)
            patients = patients_in(head)
            if len(head) <= INLINE_BODY_BYTES:
                small = head
                # Sealed in memory and kept in the spool row itself: no more files.
                message = build_message(small, spec)
                return _Sealed(
                    message.headers,
                    message.mic,
                    len(small),
                    hashlib.sha256(small).hexdigest(),
                    encrypted_for,
                    None,
                    message.body,
                    key_transport,
                    patients,
                )
            # File to file through the streaming CMS engine: a DICOM study of
            # gigabytes is never held in memory.
            built = build_message_file(record.payload_path, body_path, spec)
            return _Sealed(
                built.headers,
                built.mic,
                built.size,
                built.sha256,
                encrypted_for,
                body_path,
                None,
                key_transport,
                patients,
            )

        try:
            sealed = build()
        except (MedgwError, OSError) as exc:
            # The document is kept (in the spool, not sent): once the cause is corrected,
            # `medgw queue retry` signs, encrypts and sends it; `queue cancel` deletes it.
            if isinstance(exc, MedgwError):
                error, fix = exc.message, exc.fix
            else:
                error = f"cannot write the signed, encrypted message: {exc.strerror or exc}"
                fix = storage_fix(exc, self._outgoing)
            self._spool.mark_done(
                record.message_id, OutboundState.FAILED, "not-sent", None, error=error
            )
            retry = f"medgw queue retry {record.message_id}"
            self._log.error(
                "message.prepare_failed",
                peer=peer.name,
                message_id=record.message_id,
                error=error,
                fix=f"{fix + '; then ' if fix else 'correct the cause, then '}{retry}",
            )
            self._alert(
                EventType.MESSAGE_FAILED,
                peer=peer.name,
                message_id=record.message_id,
                reason=f"{error}; the document is kept, not sent: correct the cause, then "
                f"{retry} (or cancel it)",
                detail={"fix": fix} if fix else None,
            )
            return False
        self._spool.mark_queued(
            record.message_id,
            sealed.body_path,
            list(sealed.headers),
            sealed.mic,
            sealed.size,
            sealed.encrypted_for,
            body=sealed.body,
        )
        record.payload_path.unlink(missing_ok=True)  # only the encrypted form stays at rest
        self._log.info(
            "message.accepted", peer=peer.name, message_id=record.message_id, size=sealed.size
        )
        self._audit.emit(
            AuditEvent(
                EventType.MESSAGE_ACCEPTED,
                peer=peer.name,
                message_id=record.message_id,
                direction="outbound",
                service=record.service,
                actor=submitted_by,
                patient_ids=unique_patients([*declared, *sealed.patients]),
                detail={
                    "filename": record.filename,
                    "content_type": record.content_type,
                    "size": sealed.size,
                    "sha256": sealed.sha256,
                    "mic": sealed.mic,
                    "cipher": peer.cipher,
                    "digest": peer.digest,
                    "key_transport": sealed.key_transport,
                    **({"submitted_by": submitted_by} if submitted_by else {}),
                },
            )
        )
        if sealed.key_transport not in ("ecdh", DEFAULT_KEY_TRANSPORT):
            # RSAES-OAEP with SHA-1, or RSAES-PKCS1-v1_5: chosen for this peer, and
            # counted per message like every legacy algorithm.
            self._record(
                EventType.COMPAT_ALGORITHM_USED,
                peer=peer.name,
                message_id=record.message_id,
                severity=Severity.WARNING,
                reason=f"key transport {sealed.key_transport} used to send (this peer's "
                "key_transport)",
                detail={"algorithm": sealed.key_transport},
            )
        return True

    async def prepare_again(self, message_id: str) -> None:
        """Sign, encrypt and queue a kept document whose preparation an operator retried."""
        record = self._spool.get(message_id)
        if record is None or record.state is not OutboundState.INTAKE:
            return
        peer = self.config.peer(record.peer)
        if peer is None or not record.payload_path.exists():
            return  # recovery at the next start marks it failed, saying why
        await self._prepare(record, peer, submitted_by=self._spool.submitter(message_id))

    async def recover(self) -> None:
        """Finish what a previous run left half-done (after a crash or SIGKILL)."""
        storage = self.config.storage
        for folder in (storage.inbox_dir, self._outgoing, self._receipts, self._payloads):
            for path in remove_stale_partials(folder):
                self._log.info("recovery.removed_partial_file", folder=path.parent.name)
        known = self._spool.payload_names()  # name -> whether the plaintext is needed
        for path in self._payloads.iterdir():
            if path.name.startswith(".") or not path.is_file():
                continue
            if path.name not in known:
                # Killed between spooling a submitted body and recording it: the submitter
                # got no Message-ID and submits again.
                path.unlink(missing_ok=True)
                self._log.info("recovery.removed_unrecorded_submission", file=path.name)
            elif not known[path.name]:
                # Killed between "queued" and removing the plaintext copy (the message
                # may have moved on since): only the encrypted form stays at rest.
                path.unlink(missing_ok=True)
                self._log.info("recovery.removed_plaintext_copy", file=path.name)
        for message_id in self._spool.requeue_interrupted():
            self._log.info("message.requeued_after_restart", message_id=message_id)
        for record in self._spool.in_state(OutboundState.INTAKE):
            peer = self.config.peer(record.peer)
            if record.payload_path.exists() and peer is not None:
                source = record.source_path
                if (
                    source != record.payload_path
                    and source.exists()
                    and filecmp.cmp(source, record.payload_path, shallow=False)
                ):
                    # Killed after copying the document from another file system into the
                    # spool, before removing it from the outbox (the copy is complete: it
                    # was written atomically). Remove it, or the next scan sends it again.
                    # (A different document dropped since under the same name stays.)
                    source.unlink()
                    fsync_dir(source.parent)
                submitter = self._spool.submitter(record.message_id)
                await self._prepare(record, peer, submitted_by=submitter)
            elif record.source_path.exists() and peer is not None:
                await asyncio.to_thread(_move_into_spool, record.source_path, record.payload_path)
                submitter = self._spool.submitter(record.message_id)
                await self._prepare(record, peer, submitted_by=submitter)
            else:
                reason = (
                    "peer no longer configured"
                    if peer is None
                    else "the document vanished between outbox and spool"
                )
                self._spool.mark_done(
                    record.message_id, OutboundState.FAILED, "not-sent", None, error=reason
                )
                self._alert(
                    EventType.MESSAGE_FAILED,
                    peer=record.peer,
                    message_id=record.message_id,
                    reason=reason,
                )

    # -- sending --------------------------------------------------------------

    def backoff(self, attempts: int, rng: random.Random) -> float:
        runtime = self.config.runtime
        base = min(
            runtime.retry_max_seconds, runtime.retry_initial_seconds * 2 ** max(0, attempts - 1)
        )
        return float(base * (0.5 + rng.random() / 2))  # "equal jitter"

    async def send_one(
        self, record: OutboundRecord, peer: Peer, client: PeerClient, rng: random.Random
    ) -> float:
        """Send one message; returns 0, or how long the peer should rest after a failure."""
        assert record.sealed and record.mic is not None
        # The caller has marked it "sending" (so no other task picks it up).
        try:
            body = record.body if record.body is not None else record.body_path
            assert body is not None
            response = await client.post(peer.url, record.headers, body)
            # What the message itself asked for when it was signed, not the peer's
            # configuration now (a reload may have changed it while it was queued).
            awaiting = _asks_async_receipt(record) and 200 <= response.status < 300
            if awaiting and not response.body.strip():
                pass  # accepted; the signed receipt will be POSTed to us later
            elif response.status != 200:
                raise TransportError(f"peer answered HTTP {response.status}")
            else:
                awaiting = False
        except TransportError as exc:
            delay = self.backoff(record.attempts + 1, rng)
            return await self._in_thread(self._send_failed, record, peer, str(exc), delay)
        except asyncio.CancelledError:
            # Shutting down mid-send: park it; the receiver deduplicates a resend.
            await self._in_thread(
                self._spool.mark_retry, record.message_id, "interrupted by shutdown", 0
            )
            raise
        await self._in_thread(self._sent, record, peer, response, awaiting)
        return 0.0

    def _send_failed(self, record: OutboundRecord, peer: Peer, error: str, delay: float) -> float:
        """The send failed (connection, TLS, HTTP): queue it again after ``delay``, or make
        it a dead letter after its last attempt; returns how long the peer should rest
        (worker thread)."""
        if self._settled_meanwhile(record):
            return 0.0
        if record.attempts + 1 >= self.config.runtime.max_attempts:
            self._dead_letter(record, peer, error)
            return delay
        self._spool.mark_retry(record.message_id, error, self._clock.now().timestamp() + delay)
        self._log.warning(
            "message.send_failed",
            peer=peer.name,
            message_id=record.message_id,
            reason=error,
            retry_in_seconds=round(delay, 1),
        )
        self._record(
            EventType.MESSAGE_SEND_FAILED,
            peer=peer.name,
            message_id=record.message_id,
            outcome=Outcome.FAILURE,
            severity=Severity.WARNING,
            reason=error,
            detail={"attempt": record.attempts + 1, "retry_in_seconds": round(delay, 1)},
        )
        return delay

    def _sent(self, record: OutboundRecord, peer: Peer, response: Response, awaiting: bool) -> None:
        """The peer took the message: record it, and settle it by the receipt in the
        answer, or wait for the one it will POST (worker thread)."""
        self._record(
            EventType.MESSAGE_SENT,
            peer=peer.name,
            message_id=record.message_id,
            service=record.service,
            detail={"attempt": record.attempts + 1, "receipt": "async" if awaiting else "sync"},
        )
        if awaiting:
            # Unless its receipt came before this answer and settled it already.
            self._spool.mark_awaiting_receipt(record.message_id)
            return
        self._settle(record, peer, response)

    def _settled_meanwhile(self, record: OutboundRecord) -> bool:
        """Whether the asynchronous receipt of a message being sent has already settled it
        (some peers POST it before they answer the send itself)."""
        current = self._spool.get(record.message_id)
        if current is None or current.state is OutboundState.SENDING:
            return False
        self._log.info(
            "message.settled_during_send",
            peer=record.peer,
            message_id=record.message_id,
            state=current.state.value,
        )
        return True

    async def receive_async_receipt(self, peer: Peer, content_type: str, body: bytes) -> str:
        """A receipt POSTed to us later (RFC 4130 7.3.2): settle the message it answers.

        Returns what happened, for the HTTP answer's log line.  A receipt that
        cannot be verified, or answers no message of this peer that awaits one,
        changes nothing and is audited.
        """
        try:
            receipt = await asyncio.to_thread(
                parse_receipt,
                content_type,
                body,
                trusted_signers=self._signers(peer),
                policy=peer.policy,
            )
        except MedgwError as exc:
            self._receipt_refused(peer, None, f"asynchronous receipt could not be verified: {exc}")
            return "refused"
        record = self._spool.get(receipt.original_message_id or "")
        if (
            record is None
            or record.peer != peer.name
            or not (
                record.state is OutboundState.AWAITING_RECEIPT
                or (record.state in LATE_RECEIPT_STATES and _asks_async_receipt(record))
            )
        ):
            state = record.state.value if record is not None and record.peer == peer.name else None
            self._receipt_refused(
                peer,
                receipt.original_message_id,
                f"asynchronous receipt for {receipt.original_message_id!r}, which is "
                + (f"{state}, not awaiting a receipt" if state else "no message sent to this peer"),
            )
            return "ignored"
        response = Response(200, content_type, (), body)
        await self._in_thread(self._settle, record, peer, response, record.state in GIVEN_UP)
        return "accepted"

    def _receipt_refused(self, peer: Peer, message_id: str | None, reason: str) -> None:
        self._log.warning("receipt.refused", peer=peer.name, message_id=message_id, reason=reason)
        self._alert(
            EventType.RECEIPT_INVALID,
            peer=peer.name,
            message_id=message_id,
            reason=reason,
        )

    async def due_for_sending(
        self, peer: Peer, now: float, free: int
    ) -> tuple[list[OutboundRecord], float | None]:
        """The peer's sender asks what to send next: expired messages and overdue
        asynchronous receipts are dealt with, then up to ``free`` due messages are
        claimed (marked sending), unless the exchange is suspended.  Returns them and
        when the next queued one is due.  One trip to a worker thread: the spool's
        transactions stay off the event loop.  Interrupted (shutdown), what was
        claimed goes back to the queue."""

        def claim() -> tuple[list[OutboundRecord], float | None]:
            self.expire(peer)
            self.requeue_unanswered(peer)
            if free <= 0 or self._spool.is_suspended(peer.name):
                return [], None
            return self._spool.claim_due(peer.name, now, free)

        def give_back(result: tuple[list[OutboundRecord], float | None]) -> None:
            for record in result[0]:
                self._spool.mark_retry(record.message_id, "interrupted by shutdown", 0)

        return await self._in_thread(claim, on_cancel=give_back)

    def requeue_unanswered(self, peer: Peer) -> None:
        """Asynchronous receipts that did not come within request_timeout_seconds: resend."""
        limit = self._clock.now() - timedelta(seconds=self.config.runtime.request_timeout_seconds)
        for message_id in self._spool.requeue_unanswered(peer.name, limit.isoformat()):
            self._log.warning("message.receipt_overdue", peer=peer.name, message_id=message_id)
            self._record(
                EventType.MESSAGE_SEND_FAILED,
                peer=peer.name,
                message_id=message_id,
                outcome=Outcome.FAILURE,
                severity=Severity.WARNING,
                reason="no asynchronous receipt within request_timeout_seconds; resending "
                "(the peer answers a resend with its receipt)",
            )

    def _settle(
        self, record: OutboundRecord, peer: Peer, response: Response, given_up: bool = False
    ) -> None:
        """Settle ``record`` by its receipt (worker thread); ``given_up``: it had been
        marked expired, dead or cancelled before this receipt came."""
        assert record.mic is not None
        receipt_path = self._receipts / (record.payload_path.name + ".mdn")
        stored = f"Content-Type: {response.content_type}\r\n\r\n".encode() + response.body
        write_atomic(receipt_path, [stored], mode=0o600)
        try:
            receipt = parse_receipt(
                response.content_type,
                response.body,
                trusted_signers=self._signers(peer),
                policy=peer.policy,
            )
        except MedgwError as exc:
            self._fail(
                record,
                peer,
                "receipt-invalid",
                receipt_path,
                f"receipt could not be verified: {exc}",
                EventType.RECEIPT_INVALID,
            )
            return
        for algorithm in receipt.compat_algorithms:  # e.g. a receipt signed with SHA-1
            self._record(
                EventType.COMPAT_ALGORITHM_USED,
                peer=peer.name,
                message_id=record.message_id,
                severity=Severity.WARNING,
                reason=f"monitored-list algorithm {algorithm} accepted in the receipt "
                "(named in this peer's accept_legacy)",
                detail={"algorithm": algorithm, "receipt_file": str(receipt_path)},
            )
        if receipt.original_message_id != record.message_id:
            self._fail(
                record,
                peer,
                "receipt-invalid",
                receipt_path,
                f"receipt is for {receipt.original_message_id!r}, not this message",
                EventType.RECEIPT_INVALID,
            )
            return
        if receipt.duplicate_warning and record.attempts >= 1 and receipt.mic is None:
            # An earlier attempt reached the peer (some products answer a resend this way,
            # without a MIC). Delivered, but the content check rests on that first attempt.
            self._spool.mark_done(
                record.message_id, OutboundState.DELIVERED, receipt.disposition, receipt_path
            )
            self._record(
                EventType.RECEIPT_RECEIVED,
                peer=peer.name,
                message_id=record.message_id,
                severity=Severity.WARNING,
                reason="peer reports it already has this document (resend after a lost "
                "receipt) and returned no MIC",
                detail={
                    "disposition": receipt.disposition,
                    "mic_verified": False,
                    "receipt_file": str(receipt_path),
                },
            )
            return
        if not receipt.processed:
            self._fail(
                record,
                peer,
                receipt.disposition,
                receipt_path,
                f"peer reported {receipt.disposition}",
                EventType.MESSAGE_FAILED,
            )
            return
        if not mic_matches(record.mic, receipt.mic):
            self._fail(
                record,
                peer,
                "mic-mismatch",
                receipt_path,
                f"receipt MIC {receipt.mic!r} does not match what was sent "
                f"({record.mic!r}): the peer did not receive this document intact",
                EventType.RECEIPT_INVALID,
            )
            return
        self._spool.mark_done(
            record.message_id, OutboundState.DELIVERED, receipt.disposition, receipt_path
        )
        self._log.info("message.receipt_verified", peer=peer.name, message_id=record.message_id)
        self._record(
            EventType.RECEIPT_RECEIVED,
            peer=peer.name,
            message_id=record.message_id,
            service=record.service,
            severity=Severity.WARNING if given_up else Severity.INFO,
            reason=(
                f"the receipt came after the message was marked {record.state.value}: "
                "the peer has the document, do not send it again"
                if given_up
                else None
            ),
            detail={
                "disposition": receipt.disposition,
                "mic": receipt.mic,
                "mic_verified": True,
                "signer": receipt.signer.subject.rfc4514_string(),
                "receipt_file": str(receipt_path),
            },
        )
        if record.body_path is not None:
            record.body_path.unlink(missing_ok=True)

    def expire(self, peer: Peer) -> None:
        for message_id in self._spool.expire_due(peer.name, self._clock.now().timestamp()):
            self._log.error("message.expired", peer=peer.name, message_id=message_id)
            self._alert(
                EventType.MESSAGE_EXPIRED,
                peer=peer.name,
                message_id=message_id,
                reason="not delivered before its expiry; retry or cancel it "
                "(medgw queue retry|cancel)",
            )

    def _dead_letter(self, record: OutboundRecord, peer: Peer, error: str) -> None:
        attempts = record.attempts + 1
        self._spool.mark_dead(record.message_id, f"{attempts} attempts failed; last: {error}")
        self._log.error(
            "message.dead",
            peer=peer.name,
            message_id=record.message_id,
            attempts=attempts,
            reason=error,
        )
        self._alert(
            EventType.MESSAGE_DEAD,
            peer=peer.name,
            message_id=record.message_id,
            reason=f"gave up after {attempts} attempts (max_attempts); last error: {error}",
        )

    def _fail(
        self,
        record: OutboundRecord,
        peer: Peer,
        disposition: str,
        receipt_path: Path,
        reason: str,
        event: EventType,
    ) -> None:
        self._spool.mark_done(
            record.message_id, OutboundState.FAILED, disposition, receipt_path, error=reason
        )
        self._log.error(
            "message.failed", peer=peer.name, message_id=record.message_id, reason=reason
        )
        self._alert(
            event,
            peer=peer.name,
            message_id=record.message_id,
            service=record.service,
            reason=reason,
            detail={"disposition": disposition, "receipt_file": str(receipt_path)},
        )


@dataclass(frozen=True)
class _Sealed:
    """A document signed and encrypted: its AS2 headers and body (a file, or bytes)."""

    headers: tuple[tuple[str, str], ...]
    mic: str
    size: int  # of the document
    sha256: str  # of the document (hex), as message.delivered records it at the receiver
    encrypted_for: str  # SHA-256 of the recipient's certificate
    body_path: Path | None
    body: bytes | None
    key_transport: str  # how the content-encryption key was sent to the recipient
    patients: tuple[PatientId, ...]  # found in the document's first bytes


def _asks_async_receipt(record: OutboundRecord) -> bool:
    """Whether the message asked the peer to POST its receipt later (Receipt-Delivery-Option)."""
    return any(name.lower() == "receipt-delivery-option" for name, _ in record.headers)


def _finish_file(out: IO[bytes], batch: list[bytes]) -> None:
    out.writelines(batch)
    out.flush()
    os.fsync(out.fileno())


def _rename_durably(source: Path, target: Path) -> None:
    os.rename(source, target)
    fsync_dir(target.parent)


def _move_into_spool(source: Path, target: Path) -> None:
    """Rename (same file system) or copy-fsync-unlink (another file system)."""
    try:
        os.rename(source, target)
    except OSError as exc:
        if exc.errno != errno.EXDEV:
            raise
        write_atomic(target, read_chunks(source), mode=0o600)
        source.unlink()
        fsync_dir(source.parent)
        return
    fsync_dir(target.parent)
    fsync_dir(source.parent)
