"""A message's state as a local submitter or an operator sees it, with its stored
receipt verified again."""

from __future__ import annotations

import asyncio
import hashlib
from typing import Any

from gateway.as2.mdn import mic_matches, parse_receipt
from gateway.atrest import open_bytes, open_file
from gateway.audit import EventType
from gateway.channel.client import MAX_RECEIPT_BYTES
from gateway.errors import (
    AtRestError,
    AtRestTamperedError,
    MedgwError,
    StoredReceiptRefusedError,
    StoredReceiptTooLargeError,
)
from gateway.operations import record_view
from gateway.outbound.context import Context
from gateway.spool import OutboundRecord, OutboundState
from gateway.spool.records import RowReceipt, receipt_item

FINAL_STATES = frozenset(
    {
        OutboundState.DELIVERED,
        OutboundState.FAILED,
        OutboundState.EXPIRED,
        OutboundState.DEAD,
        OutboundState.CANCELLED,
    }
)


# A receipt as stored: its Content-Type line, then a body of at most MAX_RECEIPT_BYTES.
MAX_STORED_RECEIPT = MAX_RECEIPT_BYTES + (16 << 10)
# And as sealed at rest in a spool row: sealing adds less than its chunks' tags.
MAX_SEALED_RECEIPT = MAX_STORED_RECEIPT + (64 << 10)
# How many messages' altered receipts one process audits (past that, a spool altered
# wholesale has been told by the alerts already written).
MAX_ALERTED = 10_000
ALTERED_FIX = (
    "the spool or the state folder was changed outside medgw: find out how, restore them"
    " from a backup, and run medgw audit verify"
)


class MessageStatus:
    """What the spool and the stored receipt say about one outbound message."""

    def __init__(self, context: Context) -> None:
        self._ctx = context
        # Messages whose stored receipt failed its integrity check: audited once each (a
        # client polling the status does not fill the trail with the same alert).
        self._alerted: set[str] = set()

    async def status(self, message_id: str, submitter: str | None = None) -> dict[str, Any] | None:
        """A message's state, who submitted it, and its receipt verified again from the store.

        With ``submitter``: None unless that submitter sent it, decided before any work is
        done for it (a client learns nothing of other clients' messages, not even by time).
        """
        submitted_by = self._ctx.spool.submitter(message_id)
        if submitter is not None and submitted_by != submitter:
            return None
        record = self._ctx.spool.get(message_id)
        if record is None:
            return None
        view = record_view(record)
        view["submitted_by"] = submitted_by
        view["final"] = record.state in FINAL_STATES
        view["receipt"] = await asyncio.to_thread(self._stored_receipt, record)
        return view

    def _stored_receipt(self, record: OutboundRecord) -> dict[str, Any] | None:
        """The receipt kept for ``record`` (in its row, or in its file) verified again; one
        that is not what the gateway stored is not shown, and is an alert in the audit
        trail (once per message)."""
        try:
            return self._verified_again(record)
        except _NotAsStored as refused:
            self._integrity_failed(record, refused.view["error"])
            return {**refused.view, "altered": True}

    def _integrity_failed(self, record: OutboundRecord, error: str) -> None:
        if record.message_id in self._alerted or len(self._alerted) >= MAX_ALERTED:
            return
        self._alerted.add(record.message_id)
        self._ctx.log.error(
            "receipt.stored_altered", peer=record.peer, message_id=record.message_id, error=error
        )
        self._ctx.alert(
            EventType.AT_REST_INTEGRITY_FAILED,
            peer=record.peer,
            message_id=record.message_id,
            reason=f"the stored receipt is not the one medgw kept: {error}",
            detail={"fix": ALTERED_FIX},
        )

    def _verified_again(self, record: OutboundRecord) -> dict[str, Any] | None:
        item = receipt_item(record.message_id)
        row: RowReceipt | None = None
        if record.receipt_kept:
            try:
                row = self._ctx.spool.row_receipt(record.message_id, MAX_SEALED_RECEIPT)
            except StoredReceiptTooLargeError:
                raise _NotAsStored(_too_large("in the spool")) from None
            except StoredReceiptRefusedError as exc:  # not stored as bytes
                raise _NotAsStored({"verified": False, "error": str(exc)}) from None
            if row is None:  # cleared since it was read (a retry, retention)
                return None
            where = "in the spool"
        elif record.receipt_sha256 is not None and record.receipt_path is None:
            # Its SHA-256 recorded, its bytes gone: settlement, a retry and retention set
            # or clear both at once.
            raise _NotAsStored(_removed(record.message_id))
        elif record.receipt_path is None or not record.receipt_path.is_file():
            return None
        else:
            where = str(record.receipt_path)
        peer = self._ctx.config.peer(record.peer)
        if peer is None:
            return {"verified": False, "error": f"peer {record.peer!r} is no longer configured"}
        try:
            if row is not None:
                kept = open_bytes(self._ctx.vault, item, row.stored)
            else:
                assert record.receipt_path is not None
                with open_file(self._ctx.vault, item, record.receipt_path) as handle:
                    kept = handle.read(MAX_STORED_RECEIPT + 1)
        except AtRestTamperedError as exc:  # changed, truncated, another item's
            raise _NotAsStored({"verified": False, "error": str(exc)}) from None
        except AtRestError as exc:  # its key missing or destroyed
            return {"verified": False, "error": str(exc)}
        if len(kept) > MAX_STORED_RECEIPT:
            raise _NotAsStored(_too_large(where))
        if row is not None and hashlib.sha256(kept).hexdigest() != row.sha256:
            raise _NotAsStored(_altered(record.message_id))
        head, _, body = kept.partition(b"\r\n\r\n")
        content_type = head.decode("latin-1").partition(":")[2].strip()
        try:
            receipt = parse_receipt(
                content_type, body, trusted_signers=self._ctx.signers(peer), policy=peer.policy
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


class _NotAsStored(Exception):
    """The stored receipt is not what the gateway stored (``view``: what is shown)."""

    def __init__(self, view: dict[str, Any]) -> None:
        super().__init__(view["error"])
        self.view = view


def _too_large(where: str) -> dict[str, Any]:
    """A stored receipt ``where`` (its file, or "in the spool") larger than any medgw
    stores: not one the gateway stored, refused after a bounded read (of a file) or by
    its size alone (a row's)."""
    return {
        "verified": False,
        "error": f"the stored receipt ({where}) is larger than {MAX_STORED_RECEIPT} bytes,"
        " more than any receipt medgw accepts",
    }


def _removed(message_id: str) -> dict[str, Any]:
    """A receipt whose SHA-256 the spool row of ``message_id`` records, its bytes gone from
    the row (no file named either)."""
    return {
        "verified": False,
        "error": f"the receipt of {message_id} was removed from its spool row (its SHA-256,"
        " recorded when the message was settled, is still there): the spool was altered"
        f" outside medgw (fix: {ALTERED_FIX})",
    }


def _altered(message_id: str) -> dict[str, Any]:
    """A receipt kept in the spool row of ``message_id`` whose SHA-256 is not the one
    recorded when it settled the message: another receipt put in its place (another
    message's, validly signed by the same peer), or its bytes edited.  Not shown, its
    signature neither verified nor reported: it says nothing of this message."""
    return {
        "verified": False,
        "altered": True,
        "error": f"the receipt kept in the spool row of {message_id} does not match the"
        " receipt recorded when the message was settled (its SHA-256 is not the one"
        " recorded, outbound.receipt_sha256): the spool was altered outside medgw, and"
        " this receipt is not shown (fix: restore the spool from a backup, and run medgw"
        " audit verify: the audit record of the settlement names the SHA-256 of the"
        " receipt received)",
    }
