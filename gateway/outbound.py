"""The sending pipeline: outbox -> sign and encrypt -> spool -> POST -> receipt.

Intake is crash-safe in three committed steps: a spool row in state
``intake`` is written first, then the file is moved from the outbox into the
spool, then the signed and encrypted AS2 body is written and the row becomes
``queued`` (and the plaintext copy is removed).  :meth:`Outbound.recover`
finishes whatever a killed process left half-done, so a document taken from
the outbox is never lost and never sent twice as two messages.

Each peer has its own sender task, so a slow or dead peer never delays
documents to the others.
"""

from __future__ import annotations

import asyncio
import errno
import os
import random
from pathlib import Path

from gateway.as2.headers import new_message_id
from gateway.as2.mdn import mic_matches, parse_receipt
from gateway.as2.message import build_message_file
from gateway.audit import AuditEvent, AuditSink, EventType, Outcome, Severity
from gateway.channel.client import PeerClient, Response, TransportError
from gateway.clock import Clock
from gateway.config import GatewayConfig, Peer
from gateway.errors import MedgwError
from gateway.fsutil import fsync_dir, read_chunks, remove_stale_partials, write_atomic
from gateway.intake.outbox import Candidate, scan
from gateway.logs import Logger
from gateway.routing import LOCAL_INTAKE
from gateway.spool import OutboundRecord, OutboundState, Spool

INTAKE_PARALLELISM = 8


class Outbound:
    def __init__(
        self, config: GatewayConfig, spool: Spool, audit: AuditSink, log: Logger, clock: Clock
    ) -> None:
        self.config = config
        self._spool = spool
        self._audit = audit
        self._log = log
        self._clock = clock
        state = config.storage.state_dir
        self._payloads = state / "payloads"
        self._outgoing = state / "outgoing"
        self._receipts = state / "receipts"
        for folder in (self._payloads, self._outgoing, self._receipts):
            folder.mkdir(parents=True, exist_ok=True, mode=0o700)
        self._reported_unknown: set[str] = set()
        self._reported_skipped: set[Path] = set()
        self.wakeups: dict[str, asyncio.Event] = {}

    def wake(self, peer: str) -> None:
        event = self.wakeups.get(peer)
        if event is not None:
            event.set()

    # -- intake ---------------------------------------------------------------

    async def intake_once(self) -> int:
        peers = frozenset(p.name for p in self.config.peers)
        result = scan(self.config.storage.outbox_dir, peers)
        for folder in result.unknown_folders:
            if folder not in self._reported_unknown:
                self._reported_unknown.add(folder)
                self._log.warning(
                    "outbox.unknown_peer_folder",
                    folder=folder,
                    fix="create peers.d/<name>.toml or remove the folder",
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

        await asyncio.gather(*(take(c) for c in result.candidates))
        return len(result.candidates)

    async def _take(self, candidate: Candidate) -> None:
        peer = self.config.peer(candidate.peer)
        assert peer is not None
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
        )
        await asyncio.to_thread(_move_into_spool, candidate.path, payload_path)
        record = self._spool.get(message_id)
        assert record is not None
        await self._prepare(record, peer)

    async def _prepare(self, record: OutboundRecord, peer: Peer) -> None:
        smime = self.config.smime
        at = self._clock.now()
        body_path = self._outgoing / (record.payload_path.name + ".as2")

        def build() -> tuple[tuple[tuple[str, str], ...], str, int]:
            # File to file through the streaming CMS engine: a DICOM study of
            # gigabytes is never held in memory.
            built = build_message_file(
                record.payload_path,
                body_path,
                filename=record.filename,
                content_type=record.content_type,
                message_id=record.message_id,
                sender_as2_id=self.config.as2_id,
                receiver_as2_id=peer.as2_id,
                signing=smime.signing,
                recipients=peer.encryption_certificates,
                digest=peer.digest,
                cipher=peer.cipher,
                policy=peer.policy,
                at=at,
            )
            return built.headers, built.mic, built.size

        try:
            headers, mic, size = await asyncio.to_thread(build)
        except MedgwError as exc:
            self._spool.mark_done(
                record.message_id, OutboundState.FAILED, "not-sent", None, error=str(exc)
            )
            self._log.error(
                "message.prepare_failed",
                peer=peer.name,
                message_id=record.message_id,
                error=exc.message,
                fix=exc.fix,
            )
            self._audit.emit(
                AuditEvent(
                    EventType.MESSAGE_FAILED,
                    Outcome.FAILURE,
                    Severity.ALERT,
                    peer=peer.name,
                    message_id=record.message_id,
                    direction="outbound",
                    reason=str(exc),
                )
            )
            return
        self._spool.mark_queued(record.message_id, body_path, list(headers), mic, size)
        record.payload_path.unlink(missing_ok=True)  # only the encrypted form stays at rest
        self._log.info("message.accepted", peer=peer.name, message_id=record.message_id, size=size)
        self._audit.emit(
            AuditEvent(
                EventType.MESSAGE_ACCEPTED,
                peer=peer.name,
                message_id=record.message_id,
                direction="outbound",
                detail={
                    "filename": record.filename,
                    "content_type": record.content_type,
                    "size": size,
                    "mic": mic,
                    "cipher": peer.cipher,
                    "digest": peer.digest,
                },
            )
        )
        self.wake(peer.name)

    async def recover(self) -> None:
        """Finish what a previous run left half-done (after a crash or SIGKILL)."""
        storage = self.config.storage
        for folder in (storage.inbox_dir, self._outgoing, self._receipts, self._payloads):
            for path in remove_stale_partials(folder):
                self._log.info("recovery.removed_partial_file", folder=path.parent.name)
        for record in self._spool.in_state(OutboundState.QUEUED):
            # Killed between "queued" and removing the plaintext copy: remove it now.
            record.payload_path.unlink(missing_ok=True)
        for message_id in self._spool.requeue_interrupted():
            self._log.info("message.requeued_after_restart", message_id=message_id)
        for record in self._spool.in_state(OutboundState.INTAKE):
            peer = self.config.peer(record.peer)
            if record.payload_path.exists() and peer is not None:
                await self._prepare(record, peer)
            elif record.source_path.exists() and peer is not None:
                await asyncio.to_thread(_move_into_spool, record.source_path, record.payload_path)
                await self._prepare(record, peer)
            else:
                reason = (
                    "peer no longer configured"
                    if peer is None
                    else "the document vanished between outbox and spool"
                )
                self._spool.mark_done(
                    record.message_id, OutboundState.FAILED, "not-sent", None, error=reason
                )
                self._audit.emit(
                    AuditEvent(
                        EventType.MESSAGE_FAILED,
                        Outcome.FAILURE,
                        Severity.ALERT,
                        peer=record.peer,
                        message_id=record.message_id,
                        direction="outbound",
                        reason=reason,
                    )
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
        assert record.body_path is not None and record.mic is not None
        # The caller has marked it "sending" (so no other task picks it up).
        log = self._log.bind(peer=peer.name, message_id=record.message_id)
        try:
            response = await client.post(peer.url, record.headers, record.body_path)
            if response.status != 200:
                raise TransportError(f"peer answered HTTP {response.status}")
        except TransportError as exc:
            delay = self.backoff(record.attempts + 1, rng)
            if record.attempts + 1 >= self.config.runtime.max_attempts:
                self._dead_letter(record, peer, str(exc))
                return delay
            self._spool.mark_retry(
                record.message_id, str(exc), self._clock.now().timestamp() + delay
            )
            log.warning("message.send_failed", reason=str(exc), retry_in_seconds=round(delay, 1))
            self._audit.emit(
                AuditEvent(
                    EventType.MESSAGE_SEND_FAILED,
                    Outcome.FAILURE,
                    Severity.WARNING,
                    peer=peer.name,
                    message_id=record.message_id,
                    direction="outbound",
                    reason=str(exc),
                    detail={"attempt": record.attempts + 1, "retry_in_seconds": round(delay, 1)},
                )
            )
            return delay
        except asyncio.CancelledError:
            # Shutting down mid-send: park it; the receiver deduplicates a resend.
            self._spool.mark_retry(record.message_id, "interrupted by shutdown", 0)
            raise
        self._audit.emit(
            AuditEvent(
                EventType.MESSAGE_SENT,
                peer=peer.name,
                message_id=record.message_id,
                direction="outbound",
                detail={"attempt": record.attempts + 1},
            )
        )
        await self._handle_receipt(record, peer, response)
        return 0.0

    async def _handle_receipt(self, record: OutboundRecord, peer: Peer, response: Response) -> None:
        assert record.mic is not None
        receipt_path = self._receipts / (record.payload_path.name + ".mdn")
        stored = f"Content-Type: {response.content_type}\r\n\r\n".encode() + response.body
        await asyncio.to_thread(write_atomic, receipt_path, [stored], mode=0o600)
        try:
            receipt = await asyncio.to_thread(
                parse_receipt,
                response.content_type,
                response.body,
                trusted_signers=peer.signing_certificates,
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
            self._audit.emit(
                AuditEvent(
                    EventType.RECEIPT_RECEIVED,
                    Outcome.SUCCESS,
                    Severity.WARNING,
                    peer=peer.name,
                    message_id=record.message_id,
                    direction="outbound",
                    reason="peer reports it already has this document (resend after a lost "
                    "receipt) and returned no MIC",
                    detail={
                        "disposition": receipt.disposition,
                        "mic_verified": False,
                        "receipt_file": str(receipt_path),
                    },
                )
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
        self._audit.emit(
            AuditEvent(
                EventType.RECEIPT_RECEIVED,
                peer=peer.name,
                message_id=record.message_id,
                direction="outbound",
                detail={
                    "disposition": receipt.disposition,
                    "mic": receipt.mic,
                    "mic_verified": True,
                    "signer": receipt.signer.subject.rfc4514_string(),
                    "receipt_file": str(receipt_path),
                },
            )
        )
        if record.body_path is not None:
            record.body_path.unlink(missing_ok=True)

    def expire(self, peer: Peer) -> None:
        for message_id in self._spool.expire_due(peer.name, self._clock.now().timestamp()):
            self._log.error("message.expired", peer=peer.name, message_id=message_id)
            self._audit.emit(
                AuditEvent(
                    EventType.MESSAGE_EXPIRED,
                    Outcome.FAILURE,
                    Severity.ALERT,
                    peer=peer.name,
                    message_id=message_id,
                    direction="outbound",
                    reason="not delivered before its expiry; retry or cancel it "
                    "(medgw queue retry|cancel)",
                )
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
        self._audit.emit(
            AuditEvent(
                EventType.MESSAGE_DEAD,
                Outcome.FAILURE,
                Severity.ALERT,
                peer=peer.name,
                message_id=record.message_id,
                direction="outbound",
                reason=f"gave up after {attempts} attempts (max_attempts); last error: {error}",
            )
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
        self._audit.emit(
            AuditEvent(
                event,
                Outcome.FAILURE,
                Severity.ALERT,
                peer=peer.name,
                message_id=record.message_id,
                direction="outbound",
                reason=reason,
                detail={"disposition": disposition, "receipt_file": str(receipt_path)},
            )
        )


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
