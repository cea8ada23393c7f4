"""A message's state as a local submitter or an operator sees it, with its stored
receipt verified again."""

from __future__ import annotations

import asyncio
import hashlib
import threading
from collections.abc import Mapping
from types import MappingProxyType
from typing import Any

from gateway.as2.mdn import mic_matches, parse_receipt
from gateway.atrest import open_bytes, open_file
from gateway.audit import EventType
from gateway.channel.client import MAX_RECEIPT_BYTES
from gateway.errors import (
    AtRestError,
    AtRestTamperedError,
    DataKeyAlteredError,
    DataKeyMissingError,
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
# wholesale has been told by the alerts already written; each is still logged).
MAX_ALERTED = 10_000
# How often a status reads a message again when its receipt fails a check and the row
# changed meanwhile (a retry, retention, a new receipt): a check that fails on a row
# that moved on is no sign of tampering.
MAX_READS = 3
ALTERED_FIX = (
    "the spool or the state folder was changed outside medgw: find out how, restore them"
    " from a backup, and run medgw audit verify"
)


class MessageStatus:
    """What the spool and the stored receipt say about one outbound message."""

    def __init__(self, context: Context, *, max_alerted: int = MAX_ALERTED) -> None:
        self._ctx = context
        self._max_alerted = max_alerted
        # Messages whose stored receipt failed its integrity check (audited), or could
        # not be opened (logged): once each (a client polling the status does not fill
        # the trail or the log with the same line).  Status requests run in several
        # worker threads at once: each check-and-add is made under the lock.
        self._lock = threading.Lock()
        self._alerted: set[str] = set()
        self._unopenable: set[str] = set()

    async def status(self, message_id: str, submitter: str | None = None) -> dict[str, Any] | None:
        """A message's state, who submitted it, and its receipt verified again from the store.

        With ``submitter``: None unless that submitter sent it, decided before any work is
        done for it (a client learns nothing of other clients' messages, not even by time).
        """
        # In a worker thread as every spool read here: a PostgreSQL spool's answer can take
        # long, and the event loop serves every peer's transfers meanwhile.
        submitted_by = await asyncio.to_thread(self._ctx.spool.submitter, message_id)
        if submitter is not None and submitted_by != submitter:
            return None
        found = await asyncio.to_thread(self._read, message_id)
        if found is None:
            return None
        record, receipt = found
        view = record_view(record, self._ctx.clock.now())
        view["submitted_by"] = submitted_by
        view["final"] = record.state in FINAL_STATES
        view["receipt"] = receipt
        if receipt is not None and receipt.get("altered"):
            # The disposition the row records comes from the spool that was altered:
            # nothing verifies it, and it is not shown.
            view["disposition"] = None
        return view

    def _read(self, message_id: str) -> tuple[OutboundRecord, dict[str, Any] | None] | None:
        """The message's record and its stored receipt verified again (worker thread),
        both of one version of the row.

        The row, its receipt and the receipt's data key are read in statements of their
        own: a retry, a new receipt or retention between them pairs a row with another
        version's receipt (a new receipt verified beside the old row's state), or makes
        an intact receipt fail a check (another receipt's key, or none; its file removed
        by retention or a retry once they cleared the row).  So once a receipt was read the row is
        read again, and if it changed meanwhile, the status is read again from it; a
        receipt that fails a check is reported only if the row is still as it was read."""
        record = self._ctx.spool.get(message_id)
        for _ in range(MAX_READS):
            if record is None:
                return None
            try:
                receipt = self._verified_again(record)
            except (_NotAsStored, _Unopenable, _FileGone) as failed:
                again = self._ctx.spool.get(message_id)
                if again is None or _receipt_state(again) != _receipt_state(record):
                    record = again  # moved on meanwhile: not tampering
                    continue
                if isinstance(failed, _FileGone):
                    failed = self._file_gone(record, failed)
                if isinstance(failed, _NotAsStored):
                    self._integrity_failed(record, failed)
                    return record, {**failed.view, "altered": True}
                self._unopened(record, failed)
                return record, failed.view
            if not record.has_receipt:
                return record, receipt  # the row alone was read
            again = self._ctx.spool.get(message_id)
            if again is not None and _receipt_state(again) == _receipt_state(record):
                return record, receipt
            record = again  # the receipt read may be a newer version's
        if record is None:
            return None
        return record, {
            "verified": False,
            "error": "the message changed while its receipt was read (a retry, a new"
            " receipt, retention): ask again",
        }

    def _file_gone(self, record: OutboundRecord, gone: _FileGone) -> _NotAsStored | _Unopenable:
        """What a receipt file that is not there means, its row unchanged since it was
        read (so not retention nor a retry, which clear the row before they remove the
        file): removed outside medgw if this node settled the message into its own
        receipts folder with the file's SHA-256 recorded; otherwise it cannot be read
        here (another node's state folder, or settled before a file's SHA-256 was
        recorded, when nothing tells a removal from a file never checked)."""
        assert record.receipt_path is not None
        if record.receipt_sha256 is None:
            return _Unopenable(
                "the stored receipt cannot be read now (its file is not there; the message"
                " was settled before medgw recorded a receipt file's SHA-256)",
                gone.kept,
                gone.cause,
            )
        settler = _settled_by(record)
        here = self._ctx.spool.node
        ours = record.receipt_path.parent == self._ctx.receipts
        if settler == here and ours:
            return _NotAsStored(_file_removed(record.message_id), gone.kept)
        if settler == here:
            error = (
                "the stored receipt cannot be read now: its spool row names a file outside"
                " this node's receipts folder (the state folder moved since the message was"
                " settled?), and it is not there"
            )
        elif settler is not None:
            error = (
                "the stored receipt cannot be read on this node: it is a file in the state"
                f" folder of node {settler!r}, which settled the message (ask for its status"
                " on that node)"
            )
        else:
            error = (
                "the stored receipt cannot be read on this node: its file is not in this"
                " node's state folder, and the spool does not say which node settled the"
                " message (a receipt file is kept by the node that settled it: ask there)"
            )
        kept = {**gone.kept, "settled_by": settler} if settler is not None else gone.kept
        return _Unopenable(error, kept, gone.cause)

    def _first(self, seen: set[str], message_id: str) -> bool | None:
        """Whether ``message_id`` is new to ``seen`` (added now: True), already in it
        (False), or new but not added, ``seen`` being full (None); atomically."""
        with self._lock:
            if message_id in seen:
                return False
            if len(seen) >= self._max_alerted:
                return None
            seen.add(message_id)
            return True

    def _integrity_failed(self, record: OutboundRecord, failed: _NotAsStored) -> None:
        """An error line in the log and an alert in the audit trail, once per message;
        past MAX_ALERTED messages, the log line alone (at each request: an administrator
        still learns of each, the trail does not grow with a spool altered wholesale)."""
        first = self._first(self._alerted, record.message_id)
        if first is False:
            return
        error = failed.view["error"]
        self._ctx.log.error(
            "receipt.stored_altered",
            peer=record.peer,
            message_id=record.message_id,
            error=error,
            audited=first is True,
            **failed.kept,
        )
        if first is None:
            return
        # Once, also when the write fails (the trail's disk full, say): the daemon's audit
        # log keeps an outbound record it could not write and writes it at its next write.
        self._ctx.alert(
            EventType.AT_REST_INTEGRITY_FAILED,
            peer=record.peer,
            message_id=record.message_id,
            service=record.service,
            reason=f"the stored receipt is not the one medgw kept: {error}",
            detail={"fix": ALTERED_FIX, **failed.kept},
        )

    def _unopened(self, record: OutboundRecord, failed: _Unopenable) -> None:
        """A warning in the log, with the cause the status does not show (it names the
        gateway's files), once per message (past MAX_ALERTED, at each request)."""
        if self._first(self._unopenable, record.message_id) is False:
            return
        self._ctx.log.warning(
            "receipt.unopenable",
            peer=record.peer,
            message_id=record.message_id,
            error=failed.cause,
            **failed.kept,
        )

    def _verified_again(self, record: OutboundRecord) -> dict[str, Any] | None:
        """The receipt kept for ``record`` checked to be the one medgw stored, then its
        signature verified again (raises _NotAsStored, _Unopenable).  The checks come
        first: a receipt altered is reported so whether its peer is configured or not.
        No text of the view names the gateway's files (the local API answers with it):
        the log and the audit trail do (``receipt_file``, as settlement's records)."""
        item = receipt_item(record.message_id)
        row: RowReceipt | None = None
        kept_in: Mapping[str, str]
        if record.receipt_kept:
            kept_in = IN_ROW
            try:
                row = self._ctx.spool.row_receipt(record.message_id, MAX_SEALED_RECEIPT)
            except StoredReceiptTooLargeError:
                raise _NotAsStored(_too_large("in the spool"), kept_in) from None
            except StoredReceiptRefusedError as exc:  # not stored as bytes
                raise _NotAsStored({"verified": False, "error": str(exc)}, kept_in) from None
            if row is None:  # cleared since it was read (a retry, retention)
                return None
        elif record.receipt_sha256 is not None and record.receipt_path is None:
            # Its SHA-256 recorded, its bytes gone: settlement, a retry and retention set
            # or clear both at once.
            raise _NotAsStored(_removed(record.message_id), IN_ROW)
        elif record.receipt_path is None:
            return None
        else:
            kept_in = {"receipt_file": str(record.receipt_path)}
        where = "in the spool" if row is not None else "in its receipt file"
        try:
            if row is not None:
                kept = open_bytes(self._ctx.vault, item, row.stored)
            else:
                assert record.receipt_path is not None
                with open_file(self._ctx.vault, item, record.receipt_path) as handle:
                    kept = handle.read(MAX_STORED_RECEIPT + 1)
        except AtRestTamperedError as exc:  # changed, truncated, another item's
            # Its own fix (restore the file, or cancel the message) is for a body not
            # yet sent; a receipt altered is the spool's or the state folder's fault.
            raise _NotAsStored(
                {"verified": False, "error": f"{exc.message} (fix: {ALTERED_FIX})"}, kept_in
            ) from None
        except (DataKeyMissingError, DataKeyAlteredError) as exc:
            # Settlement stores the data key with the receipt (and records its SHA-256),
            # and a retry or retention clears the receipt with its key in one transaction
            # (a file removed first): a receipt still kept, its row unchanged (which _read
            # checks before reporting), its key gone from the spool, or changed there
            # (another data key under the same key-encryption key unwraps, so the key
            # folder is the right one), was altered outside medgw, a sealed negative
            # receipt hidden so.  Not so a receipt file settled before its SHA-256 was
            # recorded: a PostgreSQL backup of then could carry the file without its key
            # (next: it cannot be opened now).
            if record.receipt_sha256 is not None:
                changed = isinstance(exc, DataKeyAlteredError)
                raise _NotAsStored(_key_removed(record.message_id, changed), kept_in) from None
            raise _Unopenable(_UNOPENABLE, kept_in, str(exc)) from None
        except AtRestError as exc:  # a key-encryption key missing or destroyed
            raise _Unopenable(_UNOPENABLE, kept_in, str(exc)) from None
        except FileNotFoundError as exc:  # removed: by retention, or not (see _read)
            raise _FileGone(kept_in, str(exc)) from None
        except OSError as exc:  # its file unreadable
            raise _Unopenable(
                f"the stored receipt cannot be read now ({exc.strerror or 'unreadable'})",
                kept_in,
                str(exc),
            ) from None
        if len(kept) > MAX_STORED_RECEIPT:
            raise _NotAsStored(_too_large(where), kept_in)
        if row is not None and hashlib.sha256(kept).hexdigest() != row.sha256:
            raise _NotAsStored(_altered(record.message_id), kept_in)
        if row is None and record.receipt_sha256 not in (None, hashlib.sha256(kept).hexdigest()):
            # A file's SHA-256 recorded at settlement (None: settled before it was, and
            # so never compared): another receipt put in its place, or its bytes edited.
            raise _NotAsStored(_altered_file(record.message_id), kept_in)
        peer = self._ctx.config.peer(record.peer)
        if peer is None:
            return {"verified": False, "error": f"peer {record.peer!r} is no longer configured"}
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


_UNOPENABLE = (
    "the stored receipt cannot be opened now: its at-rest key cannot be used"
    " (the gateway's log says why: receipt.unopenable)"
)

# A receipt kept in its spool row, as the log and the audit trail name it (one kept in
# a file: {"receipt_file": its path}), as the records of its settlement do.
IN_ROW: Mapping[str, str] = MappingProxyType({"receipt": "spool"})


def _receipt_state(record: OutboundRecord) -> tuple[object, ...]:
    """What a retry, a new receipt or retention changes of a row, and tampering with its
    receipt alone does not."""
    return (
        record.state,
        record.attempts,
        record.updated_at,
        record.receipt_kept,
        record.receipt_sha256,
        record.receipt_path,
    )


def _settled_by(record: OutboundRecord) -> str | None:
    """The node that settled ``record`` by the receipt it keeps, if its row still says:
    a delivered or failed message's last audited change is its settlement (a retry
    clears the receipt; a cancel, after which this is not known, does not)."""
    if record.state in (OutboundState.DELIVERED, OutboundState.FAILED):
        return record.audited_by
    return None


class _NotAsStored(Exception):
    """The stored receipt is not what the gateway stored (``view``: what is shown;
    ``kept``: where it is, the spool row or its file, see IN_ROW)."""

    def __init__(self, view: dict[str, Any], kept: Mapping[str, str]) -> None:
        super().__init__(view["error"])
        self.view = view
        self.kept = kept


class _Unopenable(Exception):
    """The stored receipt cannot be read now (its at-rest key, its file): not a sign that
    it was altered.  ``error``: what is shown; ``cause``: the full error, for the log."""

    def __init__(self, error: str, kept: Mapping[str, str], cause: str) -> None:
        super().__init__(error)
        self.view: dict[str, Any] = {"verified": False, "error": error}
        self.kept = kept
        self.cause = cause


class _FileGone(Exception):
    """The receipt file the row names is not there (``kept``: that file, see IN_ROW;
    ``cause``: the error, for the log): removed by retention or a retry if the row
    changed meanwhile, else judged by MessageStatus._file_gone."""

    def __init__(self, kept: Mapping[str, str], cause: str) -> None:
        super().__init__(cause)
        self.kept = kept
        self.cause = cause


def _too_large(where: str) -> dict[str, Any]:
    """A stored receipt ``where`` (in its file, or "in the spool") larger than any medgw
    stores: not one the gateway stored, refused after a bounded read (of a file) or by
    its size alone (a row's)."""
    return {
        "verified": False,
        "error": f"the stored receipt ({where}) is larger than {MAX_STORED_RECEIPT} bytes,"
        f" more than any receipt medgw accepts (fix: {ALTERED_FIX})",
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


def _key_removed(message_id: str, changed: bool = False) -> dict[str, Any]:
    """A receipt of ``message_id`` still kept sealed at rest, its data key gone from the
    spool (``changed``: there, but changed so that it no longer unwraps): settlement, a
    retry and retention store or delete both at once, and nothing else writes it."""
    how = "was changed in the spool" if changed else "was removed from the spool"
    # A cluster whose nodes each made their own key folder sees other nodes' data keys
    # as changed: said without naming the folder (the view names no gateway files).
    cluster = (
        "; or, in a cluster, the nodes do not share one key folder: give every node the"
        " same [at_rest] key_dir"
        if changed
        else ""
    )
    return {
        "verified": False,
        "altered": True,
        "error": f"the receipt of {message_id} is kept sealed, but its data key {how}:"
        f" the spool was altered outside medgw (fix: {ALTERED_FIX}{cluster})",
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


def _file_removed(message_id: str) -> dict[str, Any]:
    """A receipt file this node stored for ``message_id``, its SHA-256 recorded in the
    row when it settled the message, gone while the row still names it: retention and a
    retry clear the row before they remove it."""
    return {
        "verified": False,
        "error": f"the receipt file kept for {message_id} was removed from this node's state"
        " folder while its spool row still names it, with the SHA-256 recorded when the"
        f" message was settled: the state folder was altered outside medgw (fix: {ALTERED_FIX})",
    }


def _altered_file(message_id: str) -> dict[str, Any]:
    """As :func:`_altered`, for a receipt kept as a file (one too large for the spool
    row) whose SHA-256 is not the one the row of ``message_id`` recorded when it settled
    the message."""
    return {
        "verified": False,
        "altered": True,
        "error": f"the receipt file kept for {message_id} does not match the receipt"
        " recorded when the message was settled (its SHA-256 is not the one recorded,"
        " outbound.receipt_sha256): the state folder was altered outside medgw, and this"
        " receipt is not shown (fix: restore the spool and the state folder from a"
        " backup, and run medgw audit verify: the audit record of the settlement names"
        " the SHA-256 of the receipt received)",
    }
