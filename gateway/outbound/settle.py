"""Settling: a sent message delivered or failed by its signed receipt, synchronous (in
the answer to the POST) or asynchronous (POSTed to us later, RFC 4130 7.3.2)."""

from __future__ import annotations

import asyncio
from pathlib import Path

from gateway.as2.mdn import mic_matches, parse_receipt
from gateway.atrest import Sealing, storing
from gateway.audit import EventType, Severity
from gateway.channel.client import Response
from gateway.config import Peer
from gateway.errors import MedgwError
from gateway.outbound.context import Context
from gateway.spool import DataKey, OutboundRecord, OutboundState
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
        marked expired, dead or cancelled before this receipt came.  The receipt is kept
        encrypted at rest (gateway.atrest), its data key stored with the settlement."""
        with storing(self._ctx.vault, receipt_item(record.message_id)) as sealing:
            self._settle(record, peer, response, given_up, sealing)

    def _settle(
        self,
        record: OutboundRecord,
        peer: Peer,
        response: Response,
        given_up: bool,
        sealing: Sealing,
    ) -> None:
        assert record.mic is not None
        receipt_path = self._ctx.receipts / (record.payload_path.name + ".mdn")
        stored = f"Content-Type: {response.content_type}\r\n\r\n".encode() + response.body
        sealing.write(receipt_path, [stored], self._ctx.folder_sync)
        key = sealing.key
        try:
            receipt = parse_receipt(
                response.content_type,
                response.body,
                trusted_signers=self._ctx.signers(peer),
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
                key,
            )
            return
        for algorithm in receipt.compat_algorithms:  # e.g. a receipt signed with SHA-1
            self._ctx.record(
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
                key,
            )
            return
        if receipt.duplicate_warning and record.attempts >= 1 and receipt.mic is None:
            # An earlier attempt reached the peer (some products answer a resend this way,
            # without a MIC). Delivered, but the content check rests on that first attempt.
            self._ctx.spool.mark_done(
                record.message_id,
                OutboundState.DELIVERED,
                receipt.disposition,
                receipt_path,
                data_key=key,
            )
            self._ctx.record(
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
                key,
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
                key,
            )
            return
        self._ctx.spool.mark_done(
            record.message_id,
            OutboundState.DELIVERED,
            receipt.disposition,
            receipt_path,
            data_key=key,
        )
        self._ctx.log.info("message.receipt_verified", peer=peer.name, message_id=record.message_id)
        self._ctx.record(
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

    def _fail(
        self,
        record: OutboundRecord,
        peer: Peer,
        disposition: str,
        receipt_path: Path,
        reason: str,
        event: EventType,
        key: DataKey | None,
    ) -> None:
        self._ctx.spool.mark_done(
            record.message_id,
            OutboundState.FAILED,
            disposition,
            receipt_path,
            error=reason,
            data_key=key,
        )
        self._ctx.failed(
            "message.failed",
            event,
            peer=peer.name,
            message_id=record.message_id,
            service=record.service,
            audit_reason=reason,
            detail={"disposition": disposition, "receipt_file": str(receipt_path)},
            reason=reason,
        )


def asks_async_receipt(record: OutboundRecord) -> bool:
    """Whether the message asked the peer to POST its receipt later (Receipt-Delivery-Option)."""
    return any(name.lower() == "receipt-delivery-option" for name, _ in record.headers)
