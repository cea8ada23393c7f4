"""Settling: a sent message delivered or failed by its signed receipt, synchronous (in
the answer to the POST) or asynchronous (POSTed to us later, RFC 4130 7.3.2)."""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from secrets import token_hex
from typing import Any

from gateway.as2.mdn import mic_matches, parse_receipt
from gateway.atrest import Sealing, storing_all
from gateway.audit import AuditEvent, EventType, Outcome, Severity
from gateway.channel.client import Response
from gateway.config import Peer
from gateway.errors import MedgwError
from gateway.fsutil import DeferredFolderSync, FolderSync, storage_fix
from gateway.outbound.context import Context
from gateway.outbound.seal import INLINE_BODY_BYTES
from gateway.spool import DataKey, OutboundRecord, OutboundState, Settled
from gateway.spool.records import receipt_item

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
# A receipt (its Content-Type line and body) of at most this many bytes is kept in the
# message's spool row, as an AS2 body is: no file created and synced per message.  A
# larger one (rare: receipts are a few KiB) is a file in state/receipts.
INLINE_RECEIPT_BYTES = INLINE_BODY_BYTES


class Settler:
    """Receipts judged, and the messages they answer settled."""

    def __init__(self, context: Context) -> None:
        self._ctx = context

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
                trusted_signers=self._ctx.signers(peer),
                policy=peer.policy,
            )
        except MedgwError as exc:
            self._receipt_refused(peer, None, f"asynchronous receipt could not be verified: {exc}")
            return "refused"
        record = self._ctx.spool.get(receipt.original_message_id or "")
        if (
            record is None
            or record.peer != peer.name
            or not (
                record.state is OutboundState.AWAITING_RECEIPT
                or (record.state in LATE_RECEIPT_STATES and asks_async_receipt(record))
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
        await self._ctx.in_thread(self.settle, record, peer, response, record.state in GIVEN_UP)
        return "accepted"

    def _receipt_refused(self, peer: Peer, message_id: str | None, reason: str) -> None:
        self._ctx.log.warning(
            "receipt.refused", peer=peer.name, message_id=message_id, reason=reason
        )
        self._ctx.alert(
            EventType.RECEIPT_INVALID,
            peer=peer.name,
            message_id=message_id,
            reason=reason,
        )

    def settle(
        self, record: OutboundRecord, peer: Peer, response: Response, given_up: bool = False
    ) -> None:
        """Settle ``record`` by its receipt (worker thread); ``given_up``: it had been
        marked expired, dead or cancelled before this receipt came."""
        answer = Answer(record, peer, response, given_up=given_up, found=record.state)
        [error] = self.settle_all([answer])
        if error is not None:
            raise error

    def settle_all(self, answers: Sequence[Answer]) -> list[Exception | None]:
        """Settle the messages the peers answered, together (worker thread): each receipt
        stored (encrypted at rest, gateway.atrest) and judged on its own, then every
        state change in ONE spool transaction with the receipts' data keys, then their
        audit records in one write.  Returns, for each answer, the error that kept it
        from being settled (None: settled): a receipt that cannot be stored fails its
        own message only; a failed transaction fails them all and changes none (each
        is still ``sending``: sent again, and the peer answers with its receipt)."""
        errors: list[Exception | None] = [None] * len(answers)
        judged: list[tuple[int, _Outcome]] = []
        items = [receipt_item(a.record.message_id) for a in answers]
        # The receipts' folder synced once for the group, before anything relies on them
        # (only a receipt too large for its row is a file).
        folders = DeferredFolderSync(self._ctx.folder_sync)
        with storing_all(self._ctx.vault, items) as sealings:
            for index, (answer, sealing) in enumerate(zip(answers, sealings, strict=True)):
                if answer.awaiting:
                    continue
                try:
                    judged.append((index, self._judge(answer, sealing, folders)))
                except Exception as exc:  # its own message fails, not the rest
                    errors[index] = exc
            try:
                folders.flush()
                changed = set(
                    self._ctx.spool.mark_settled(
                        [outcome.settled for _, outcome in judged],
                        [a.record.message_id for a in answers if a.awaiting],
                    )
                )
            except Exception as exc:  # none of them is settled
                return [error or exc for error in errors]
        for _, outcome in judged:
            if outcome.settled.message_id not in changed:
                self._moved_on(outcome)
        judged = [(i, outcome) for i, outcome in judged if outcome.settled.message_id in changed]
        events = [event for _, outcome in judged for event in outcome.events]
        try:
            self._ctx.record_all(events)
        except OSError as exc:
            # Settled all the same: the trail keeps their records and writes them first
            # in its next write, or the next start does (gateway.audit.log).  Nothing
            # of the send failed, so it is not reported as a failed send.
            trail = self._ctx.config.storage.audit_log
            self._ctx.log.critical(
                "audit.write_failed",
                error=exc.strerror or str(exc),
                events=sorted({e.event.value for e in events}),
                count=len(events),
                kept="written first in the trail's next write, or at the next start",
                fix=storage_fix(exc, trail.parent, daemon=True),
            )
        except Exception as exc:  # settled, not recorded: their callers say so
            for index, _ in judged:
                errors[index] = exc
            return errors
        for _, outcome in judged:
            if outcome.log_level is not None:
                getattr(self._ctx.log, outcome.log_level)(outcome.log_event, **outcome.log_fields)
            record = outcome.answer.record
            if outcome.settled.state is OutboundState.DELIVERED and record.body_path is not None:
                record.body_path.unlink(missing_ok=True)
        return errors

    def _moved_on(self, outcome: _Outcome) -> None:
        """The message was no longer as its settler found it: another node took it over
        (this node's claim ran out) or another receipt settled it.  What that node or
        receipt recorded stands, and this receipt is not recorded (logged only: the
        audit trail keeps one record of a message's settlement); its file, if it has
        one, goes (a receipt for the row was never stored)."""
        answer, receipt = outcome.answer, outcome.settled.receipt_path
        if receipt is not None:
            receipt.unlink(missing_ok=True)
        try:
            current = self._ctx.spool.get(answer.record.message_id)
        except MedgwError:
            current = None
        self._ctx.log.warning(
            "message.settled_elsewhere",
            peer=answer.peer.name,
            message_id=answer.record.message_id,
            disposition=outcome.settled.disposition,
            state=current.state.value if current else None,
            node=current.node if current else None,
        )

    def _judge(self, answer: Answer, sealing: Sealing, folders: FolderSync) -> _Outcome:
        """The receipt of ``answer`` stored and verified: what it settles, and how that is
        to be recorded."""
        record, peer, response = answer.record, answer.peer, answer.response
        assert record.mic is not None
        stored = f"Content-Type: {response.content_type}\r\n\r\n".encode() + response.body
        kept = _Kept.of(stored)
        if len(stored) <= INLINE_RECEIPT_BYTES:
            kept.sealed = sealing.seal(stored)  # in the row, by the settlement's commit
        else:
            # A name of its own: two receipts for one message (a peer POSTing it twice at
            # once) never write one file, and the one not recorded is removed (_moved_on).
            kept.path = self._ctx.receipts / f"{record.payload_path.name}.{token_hex(6)}.mdn"
            sealing.write(kept.path, [stored], folders)
        judge = _Judging(self._ctx, answer, kept, sealing.key)
        try:
            receipt = parse_receipt(
                response.content_type,
                response.body,
                trusted_signers=self._ctx.signers(peer),
                policy=peer.policy,
            )
        except MedgwError as exc:
            return judge.failed(
                "receipt-invalid",
                f"receipt could not be verified: {exc}",
                EventType.RECEIPT_INVALID,
            )
        for algorithm in receipt.compat_algorithms:  # e.g. a receipt signed with SHA-1
            judge.events.append(
                self._ctx.compat_event(
                    peer.name,
                    record.message_id,
                    algorithm,
                    f"monitored-list algorithm {algorithm} accepted in the receipt "
                    "(named in this peer's accept_legacy)",
                    **kept.detail,
                )
            )
        if receipt.original_message_id != record.message_id:
            return judge.failed(
                "receipt-invalid",
                f"receipt is for {receipt.original_message_id!r}, not this message",
                EventType.RECEIPT_INVALID,
            )
        if receipt.duplicate_warning and record.attempts >= 1 and receipt.mic is None:
            # An earlier attempt reached the peer (some products answer a resend this way,
            # without a MIC). Delivered, but the content check rests on that first attempt.
            return judge.delivered(
                receipt.disposition,
                self._ctx.event(
                    EventType.RECEIPT_RECEIVED,
                    peer=peer.name,
                    message_id=record.message_id,
                    severity=Severity.WARNING,
                    reason="peer reports it already has this document (resend after a lost "
                    "receipt) and returned no MIC",
                    detail={
                        "disposition": receipt.disposition,
                        "mic_verified": False,
                        **kept.detail,
                    },
                ),
                logged=False,
            )
        if not receipt.processed:
            return judge.failed(
                receipt.disposition,
                f"peer reported {receipt.disposition}",
                EventType.MESSAGE_FAILED,
            )
        if not mic_matches(record.mic, receipt.mic):
            return judge.failed(
                "mic-mismatch",
                f"receipt MIC {receipt.mic!r} does not match what was sent "
                f"({record.mic!r}): the peer did not receive this document intact",
                EventType.RECEIPT_INVALID,
            )
        return judge.delivered(
            receipt.disposition,
            self._ctx.event(
                EventType.RECEIPT_RECEIVED,
                peer=peer.name,
                message_id=record.message_id,
                service=record.service,
                severity=Severity.WARNING if answer.given_up else Severity.INFO,
                reason=(
                    f"the receipt came after the message was marked {record.state.value}: "
                    "the peer has the document, do not send it again"
                    if answer.given_up
                    else None
                ),
                detail={
                    "disposition": receipt.disposition,
                    "mic": receipt.mic,
                    "mic_verified": True,
                    "signer": receipt.signer.subject.rfc4514_string(),
                    **kept.detail,
                },
            ),
        )


@dataclass(frozen=True)
class Answer:
    """A peer's answer to a message sent: the response that carries its receipt, or
    (``awaiting``) word that the receipt will be POSTed later.  ``given_up``: the
    message had been marked expired, dead or cancelled before this receipt came.
    ``found``: the state an asynchronous receipt found the message in, which it settles
    only if still in it; None: the answer to this node's POST, which settles it only
    while this node holds it (see Settled)."""

    record: OutboundRecord
    peer: Peer
    response: Response
    awaiting: bool = False
    given_up: bool = False
    found: OutboundState | None = None

    def settled(
        self,
        state: OutboundState,
        disposition: str,
        receipt: _Kept,
        key: DataKey | None,
        error: str | None = None,
        *,
        owed: EventType,
    ) -> Settled:
        """The spool's change that settles the message (see :meth:`Spool.mark_settled`),
        ``owed`` the record written of it."""
        found = OutboundState.SENDING if self.found is None else self.found
        return Settled(
            self.record.message_id,
            state,
            disposition,
            receipt.path,
            error,
            key,
            found=found,
            held=self.found is None,
            owed=owed,
            receipt=receipt.sealed,
            receipt_sha256=receipt.sha256,
        )


@dataclass
class _Kept:
    """Where a receipt received is kept: ``sealed`` (the bytes stored in the message's
    row) or the file ``path``; ``sha256``: of the receipt as received (its Content-Type
    line and body, before encryption at rest), recorded in the row beside either (a
    reader compares what it reads with it: a file or row swapped for another message's
    receipt does not match) and named by the audit record."""

    sha256: str
    sealed: bytes | None = None
    path: Path | None = None

    @classmethod
    def of(cls, stored: bytes) -> _Kept:
        return cls(hashlib.sha256(stored).hexdigest())

    @property
    def detail(self) -> dict[str, str]:
        """What the audit records of its settlement say of it: the file, or the row, and
        the receipt's SHA-256 (which ties the record to the bytes kept)."""
        if self.path is not None:
            return {"receipt_file": str(self.path), "receipt_sha256": self.sha256}
        return {"receipt": "spool", "receipt_sha256": self.sha256}


@dataclass
class _Outcome:
    """What one receipt settles: the spool's change, then the audit records and the log
    line written once that is committed."""

    answer: Answer
    settled: Settled
    events: list[AuditEvent]
    log_level: str | None  # the log's method ("info", "error"); None: no line
    log_event: str
    log_fields: dict[str, Any]


class _Judging:
    """One receipt being judged: the audit records gathered so far, and the outcome."""

    def __init__(self, ctx: Context, answer: Answer, kept: _Kept, key: DataKey | None) -> None:
        self._ctx, self._answer, self._kept, self._key = ctx, answer, kept, key
        self.events: list[AuditEvent] = []

    def delivered(self, disposition: str, event: AuditEvent, *, logged: bool = True) -> _Outcome:
        record = self._answer.record
        self.events.append(event)
        return _Outcome(
            self._answer,
            self._answer.settled(
                OutboundState.DELIVERED, disposition, self._kept, self._key, owed=event.event
            ),
            self.events,
            "info" if logged else None,
            "message.receipt_verified",
            {"peer": self._answer.peer.name, "message_id": record.message_id},
        )

    def failed(self, disposition: str, reason: str, event: EventType) -> _Outcome:
        """Failed by its receipt: an error line for the administrator and an alert in the
        audit trail (as :meth:`Context.failed` writes them)."""
        record, peer = self._answer.record, self._answer.peer
        self.events.append(
            self._ctx.event(
                event,
                peer=peer.name,
                message_id=record.message_id,
                outcome=Outcome.FAILURE,
                severity=Severity.ALERT,
                service=record.service,
                reason=reason,
                detail={"disposition": disposition, **self._kept.detail},
            )
        )
        return _Outcome(
            self._answer,
            self._answer.settled(
                OutboundState.FAILED, disposition, self._kept, self._key, reason, owed=event
            ),
            self.events,
            "error",
            "message.failed",
            {"peer": peer.name, "message_id": record.message_id, "reason": reason},
        )


def asks_async_receipt(record: OutboundRecord) -> bool:
    """Whether the message asked the peer to POST its receipt later (Receipt-Delivery-Option)."""
    return any(name.lower() == "receipt-delivery-option" for name, _ in record.headers)
