"""Sealing: a spooled document signed and encrypted for its peer (S/MIME in AS2) and
queued, or kept unsent with an alert saying what to correct."""

from __future__ import annotations

import hashlib
import io
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from gateway.as2.message import MessageSpec, build_message, build_message_file
from gateway.atrest import Sealing, Vault, open_bytes, open_file, storing_all
from gateway.audit import AuditEvent, EventType, PatientId
from gateway.audit.owed import RECOVERED
from gateway.audit.patients import SCAN_BYTES, patients_in, unique_patients
from gateway.cms.enveloping import key_transport_for
from gateway.config import Peer
from gateway.errors import MedgwError
from gateway.fsutil import storage_fix
from gateway.outbound.context import Context
from gateway.pki.tls import certificate_fingerprint
from gateway.policy import DEFAULT_KEY_TRANSPORT
from gateway.spool import OutboundRecord, OutboundState, Prepared
from gateway.spool.records import DataKey, body_item, payload_item

# A document up to this size is signed and encrypted in memory, and its AS2 body kept
# in the spool's row (committed with the row, no file); a larger one streams file
# to file, its body in state/outgoing.
INLINE_BODY_BYTES = 64 * 1024


class Sealer:
    """Signs, encrypts and queues the documents taken in, whatever their way in."""

    def __init__(self, context: Context) -> None:
        self._ctx = context

    async def prepare(
        self,
        record: OutboundRecord,
        peer: Peer,
        *,
        submitted_by: str | None = None,
        declared: tuple[PatientId, ...] = (),
    ) -> None:
        if await self._ctx.in_thread(self.seal_and_queue, record, peer, submitted_by, declared):
            self._ctx.wake(peer.name)

    def seal_and_queue(
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
        event loop.  The AS2 body is kept encrypted at rest (gateway.atrest), its data
        key stored with it."""
        return bool(self.seal_and_queue_all([ToSeal(record, peer, submitted_by, declared)]))

    def seal_and_queue_all(self, documents: Sequence[ToSeal]) -> list[ToSeal]:
        """:meth:`seal_and_queue` of several documents, each signed and encrypted on its
        own (one that cannot be is kept, unsent, with its alert, as there), queued in one
        transaction, their ``message.accepted`` records written together; returns those
        it queued.  A document another node prepared meanwhile, or took over from this
        one (no longer in intake, or no longer claimed here), is left to it: no record
        of it here."""
        built: list[tuple[ToSeal, _Sealed]] = []
        items = [body_item(d.record.message_id) for d in documents]
        with storing_all(self._ctx.vault, items) as sealings:
            for document, sealing in zip(documents, sealings, strict=True):
                sealed = self._build_or_keep(document, sealing)
                if sealed is not None:
                    built.append((document, sealed))
            queued = set(
                self._ctx.spool.mark_queued_all(
                    [
                        Prepared(
                            d.record.message_id,
                            sealed.body_path,
                            sealed.headers,
                            sealed.mic,
                            sealed.size,
                            sealed.encrypted_for,
                            sealed.body,
                            sealed.key,
                        )
                        for d, sealed in built
                    ]
                )
            )
        done: list[ToSeal] = []
        events: list[AuditEvent] = []
        for document, sealed in built:
            record, peer = document.record, document.peer
            if record.message_id not in queued:
                self._prepared_elsewhere(record, peer.name, sealed.body_path)
                continue
            record.payload_path.unlink(missing_ok=True)  # only the encrypted form stays at rest
            if record.node not in (None, self._ctx.spool.node):
                # Taken over: the body the node that held it wrote before it stopped, if
                # any (no row names it now; that node, if still at work, removes its own).
                self._ctx.body_path(record, record.node).unlink(missing_ok=True)
            self._ctx.log.info(
                "message.accepted", peer=peer.name, message_id=record.message_id, size=sealed.size
            )
            events.extend(self._accepted(document, sealed))
            done.append(document)
        self._ctx.record_all(events)
        return done

    def _prepared_elsewhere(
        self, record: OutboundRecord, peer: str, written: Path | None = None
    ) -> None:
        """``record`` is no longer in intake, or no longer this node's: another node
        prepared it or prepares it now (this node's claim on it ran out meanwhile);
        nothing of it is recorded here, and the body this node ``written`` for it (a file
        of its own name, see Context.body_path) is removed, unless its row names it
        after all; the document's copy stays, the other node's now."""
        if written is not None:
            current = self._ctx.spool.get(record.message_id)
            if current is None or current.body_path != written:
                written.unlink(missing_ok=True)
        self._ctx.log.info(
            "message.prepared_elsewhere",
            peer=peer,
            message_id=record.message_id,
            node=self._ctx.spool.node,
        )

    def _build_or_keep(self, document: ToSeal, sealing: Sealing) -> _Sealed | None:
        """The document signed and encrypted; None if it cannot be: it is kept (in the
        spool, not sent) and an alert says what to correct.  Once the cause is corrected,
        `medgw queue retry` signs, encrypts and sends it; `queue cancel` deletes it."""
        record, peer = document.record, document.peer
        try:
            return self._build(record, peer, sealing, document.taken)
        except (MedgwError, OSError) as exc:
            if isinstance(exc, MedgwError):
                error, fix = exc.message, exc.fix
            else:
                error = f"cannot write the signed, encrypted message: {exc.strerror or exc}"
                fix = storage_fix(exc, self._ctx.outgoing, daemon=True)
            if not self._ctx.spool.fail_intake(record.message_id, error):
                # Queued by another node meanwhile, which dropped the document's key (it
                # cannot be read here any more): not a failure, and not this node's.
                self._prepared_elsewhere(record, peer.name)
                return None
            retry = f"medgw queue retry {record.message_id}"
            self._ctx.failed(
                "message.prepare_failed",
                EventType.MESSAGE_FAILED,
                peer=peer.name,
                message_id=record.message_id,
                audit_reason=f"{error}; the document is kept, not sent: correct the cause, then "
                f"{retry} (or cancel it)",
                detail={"fix": fix} if fix else None,
                error=error,
                fix=f"{fix + '; then ' if fix else 'correct the cause, then '}{retry}",
            )
            return None

    def _build(
        self, record: OutboundRecord, peer: Peer, sealing: Sealing, taken: bytes | None = None
    ) -> _Sealed:
        """Sign and encrypt ``record``'s document (``taken``: a small one's bytes, as just
        taken in) for ``peer``, its body sealed at rest under ``sealing``."""
        smime = self._ctx.config.smime
        at = self._ctx.clock.now()
        body_path = self._ctx.body_path(record)

        def open_payload() -> BinaryIO:
            # The document as taken in: encrypted at rest, or as it is (from before).
            return open_document(self._ctx.vault, record)

        recipient = self._ctx.recipient(peer)
        spec = MessageSpec(
            filename=record.filename,
            content_type=record.content_type,
            message_id=record.message_id,
            sender_as2_id=self._ctx.config.as2_id,
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
        if taken is not None:
            head = taken[:SCAN_BYTES]
        else:
            with open_payload() as handle:
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
                sealing.seal(message.body),
                key_transport,
                patients,
                sealing.key,
            )
        # File to file through the streaming CMS engine: a DICOM study of
        # gigabytes is never held in memory.
        # Stored encrypted at rest under its own key as the CMS engine writes it.
        built = build_message_file(
            open_payload,
            body_path,
            spec,
            writer=sealing.write if sealing.encrypting else None,
        )
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
            sealing.key,
        )

    def _accepted(self, document: ToSeal, sealed: _Sealed) -> list[AuditEvent]:
        """The audit records of a document queued: ``message.accepted``, and a warning for
        a legacy key transport."""
        record, peer = document.record, document.peer
        events = [
            accepted_event(
                record,
                document.submitted_by,
                size=sealed.size,
                mic=sealed.mic,
                sealed=SealedWith(
                    sha256=sealed.sha256,
                    cipher=peer.cipher,
                    digest=peer.digest,
                    key_transport=sealed.key_transport,
                    patients=unique_patients([*document.declared, *sealed.patients]),
                ),
            )
        ]
        if sealed.key_transport not in ("ecdh", DEFAULT_KEY_TRANSPORT):
            # RSAES-OAEP with SHA-1, or RSAES-PKCS1-v1_5: chosen for this peer, and
            # counted per message like every legacy algorithm.
            events.append(
                self._ctx.compat_event(
                    peer.name,
                    record.message_id,
                    sealed.key_transport,
                    f"key transport {sealed.key_transport} used to send (this peer's "
                    "key_transport)",
                )
            )
        return events

    async def prepare_again(self, message_id: str) -> None:
        """Sign, encrypt and queue a kept document whose preparation an operator retried."""
        # In a worker thread: a spool database that does not answer never holds the loop.
        record = await self._ctx.in_thread(self._ctx.spool.get, message_id)
        if record is None or record.state is not OutboundState.INTAKE:
            return
        peer = self._ctx.config.peer(record.peer)
        if peer is None or not record.has_document:
            return  # recovery at the next start marks it failed, saying why
        submitter = await self._ctx.in_thread(self._ctx.spool.submitter, message_id)
        await self.prepare(record, peer, submitted_by=submitter)

    async def prepare_unsealed(self, message_id: str) -> None:
        """Sign, encrypt and queue a document taken in whose preparation stopped when the
        spool did not answer (raises while it still does not), unless it was queued
        meanwhile: by this node, its commit's answer lost (its ``message.accepted``
        record, never written, is written now from its row); or by another node that
        took it over while this node could not reach the spool for longer than its
        lease (that node recorded it)."""
        record = await self._ctx.in_thread(self._ctx.spool.get, message_id)
        if record is None or record.state is OutboundState.INTAKE:
            await self.prepare_again(message_id)
        elif record.queued_by == self._ctx.spool.node:
            await self._ctx.in_thread(self._record_queued, record)
        elif record.queued_by is not None:
            self._prepared_elsewhere(record, record.peer)

    def _record_queued(self, record: OutboundRecord) -> None:
        """(worker thread) What queueing ``record`` here is followed by, its commit's answer
        lost: its document's copy removed, and its ``message.accepted`` record, as far as
        the row tells it."""
        record.payload_path.unlink(missing_ok=True)  # only the encrypted form stays at rest
        self._ctx.log.info(
            "message.accepted", peer=record.peer, message_id=record.message_id, size=record.size
        )
        submitter = self._ctx.spool.submitter(record.message_id)
        self._ctx.record_all([recovered_accepted(record, submitter)])


def recovered_accepted(record: OutboundRecord, submitted_by: str | None) -> AuditEvent:
    """The ``message.accepted`` record of ``record``, queued, whose record an interruption
    cut off: from its spool row alone."""
    return accepted_event(
        record,
        submitted_by,
        size=record.size,
        mic=record.mic,
        recovered=f"queued; {RECOVERED} (its SHA-256, algorithms and patients are not known here)",
    )


@dataclass(frozen=True)
class SealedWith:
    """What only the sealing of a document knows, for its ``message.accepted`` record."""

    sha256: str  # of the document (hex)
    cipher: str
    digest: str
    key_transport: str
    patients: tuple[PatientId, ...]  # declared by its submitter and found in it


def accepted_event(
    record: OutboundRecord,
    submitted_by: str | None,
    *,
    size: int | None,
    mic: str | None,
    sealed: SealedWith | None = None,
    recovered: str | None = None,
) -> AuditEvent:
    """The ``message.accepted`` record of ``record`` queued: written as it is sealed,
    with ``sealed``; or at recovery from its spool row alone (its SHA-256, algorithms
    and patients are not known there), ``recovered`` saying so as its reason."""
    return AuditEvent(
        EventType.MESSAGE_ACCEPTED,
        peer=record.peer,
        message_id=record.message_id,
        direction="outbound",
        service=record.service,
        actor=submitted_by,
        reason=recovered,
        patient_ids=sealed.patients if sealed is not None else (),
        detail={
            "filename": record.filename,
            "content_type": record.content_type,
            "size": size,
            "mic": mic,
            **(
                {
                    "sha256": sealed.sha256,
                    "cipher": sealed.cipher,
                    "digest": sealed.digest,
                    "key_transport": sealed.key_transport,
                }
                if sealed is not None
                else {}
            ),
            **({"recorded_at_recovery": True} if recovered is not None else {}),
            **({"submitted_by": submitted_by} if submitted_by else {}),
        },
    )


def open_document(vault: Vault | None, record: OutboundRecord) -> BinaryIO:
    """The document taken in for ``record``, for reading its plaintext: the copy kept in
    its spool row (a small one) or its file in state/payloads."""
    item = payload_item(record.message_id)
    if record.payload is not None:
        return io.BytesIO(open_bytes(vault, item, record.payload))
    return open_file(vault, item, record.payload_path)


@dataclass(frozen=True)
class ToSeal:
    """A document taken into the spool, to be signed, encrypted and queued;
    ``submitted_by`` and ``declared`` as for :meth:`Sealer.seal_and_queue`."""

    record: OutboundRecord
    peer: Peer
    submitted_by: str | None
    declared: tuple[PatientId, ...] = ()
    # A small document as it was just taken (the bytes its row's copy was sealed from, in
    # the same trip): sealed from these, not read back from the row.  None: read back.
    taken: bytes | None = None


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
    key: DataKey | None  # the body's data key, stored with it
