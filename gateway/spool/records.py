"""What the spool keeps, whatever stores it: states and records of messages.

Outbound life cycle (:class:`OutboundState`)::

    intake ──► queued ──► sending ──► delivered
                 ▲ │         │
                 │ │         ├──► awaiting-receipt ──► delivered | failed
                 │ │         │      (accepted; the     (the asynchronous
                 │ │         │       receipt comes      receipt arrives)
                 │ │         │       later)  └──► queued (no receipt in time: resent)
                 │ │         ├──► (connection or HTTP failure) ──► queued, after a back-off
                 │ │         ├──► failed     (negative or invalid receipt)
                 │ │         └──► dead       (max_attempts reached: dead letter)
                 │ └──► expired              (not delivered before its expiry)
                 └── operator retry ◄── failed | expired | dead
    operator cancel: queued | failed | expired | dead ──► cancelled

``intake`` means "taken from the outbox, not yet signed and encrypted".
"""

from __future__ import annotations

import re
import socket
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path

from gateway.audit.events import EventType
from gateway.errors import SpoolError
from gateway.routing import LOCAL_INTAKE, Origin


class OutboundState(StrEnum):
    INTAKE = "intake"
    QUEUED = "queued"
    SENDING = "sending"
    AWAITING_RECEIPT = "awaiting-receipt"  # sent; the peer will POST the receipt later
    DELIVERED = "delivered"
    FAILED = "failed"
    EXPIRED = "expired"
    DEAD = "dead"
    CANCELLED = "cancelled"


# States of a message still on its way to its peer.
PENDING_STATES = frozenset(
    {
        OutboundState.INTAKE,
        OutboundState.QUEUED,
        OutboundState.SENDING,
        OutboundState.AWAITING_RECEIPT,
    }
)


RETRYABLE = (OutboundState.FAILED, OutboundState.EXPIRED, OutboundState.DEAD)
CANCELLABLE = (OutboundState.QUEUED, *RETRYABLE)
# The note an operator's cancel leaves as the message's last_error, before the actor
# (read back by recovery when the kill cut off the record of the cancel).
CANCELLED_BY = "cancelled by "
# Likewise an operator's retry: of a message sent before, and of one never prepared.
RETRIED_BY = ("retry requested by ", "preparation retried by ")
# The note of a message another node was sending, queued again here once its claim ran
# out (audited message.taken_over by the node that took it over).
TAKEN_OVER = "taken over: the claim of the node sending it ran out"


# A node's name: a host name's characters; it goes in logs, audit records and metric
# labels as it is.
NODE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$")
DEFAULT_LEASE_SECONDS = 60.0


def host_node_name() -> str:
    """The default node name: this host's name, up to its first dot."""
    name = socket.gethostname().split(".", 1)[0]
    return name if NODE_NAME.match(name) else "medgw"


@dataclass(frozen=True)
class Claimant:
    """Who takes work from the spool: a node's name (unique among the nodes sharing it)
    and how long a claim lasts unless that node renews it."""

    node: str = field(default_factory=host_node_name)
    lease_seconds: float = DEFAULT_LEASE_SECONDS


@dataclass(frozen=True)
class PeerControl:
    peer: str
    suspended: bool
    reason: str | None
    actor: str | None
    changed_at: str


@dataclass(frozen=True)
class OutboundRecord:
    message_id: str
    peer: str
    filename: str
    content_type: str
    source_path: Path
    payload_path: Path
    body_path: Path | None
    headers: tuple[tuple[str, str], ...]
    mic: str | None
    size: int | None
    state: OutboundState
    attempts: int
    next_attempt_at: float
    last_error: str | None
    disposition: str | None
    receipt_path: Path | None
    expires_at: float
    created_at: str
    updated_at: str
    zone: str | None = None  # the destination peer's network zone
    origin: Origin = LOCAL_INTAKE  # local intake, or the peer (and zone) it came in from
    service: str | None = None  # the routing key agreed with the peer, if any
    # The signed, encrypted AS2 body of a small message, kept in the spool itself (a
    # larger one is the file at body_path); until it is delivered or cancelled.
    body: bytes | None = None
    # The node that holds it (intake: preparing it; sending: sending it) and until when
    # its claim lasts without renewal (seconds since the epoch; see Spool.claim_due).
    node: str | None = None
    lease_until: float = 0.0
    # A small document taken in, its copy (encrypted at rest) kept in the spool itself
    # until it is sealed (a larger one is the file at payload_path).
    payload: bytes | None = None
    # Whose audit trail holds its records (None: rows from before these were kept): the
    # node that queued it (message.accepted), and the node that made its last change an
    # audit record follows (settled, given up, retried).
    queued_by: str | None = None
    audited_by: str | None = None
    # The audit event audited_by's last change owes (an EventType's value), and when that
    # change was made (ISO 8601): its record, at that time or later, is in that node's
    # trail (None: changed before this was kept).
    audit_owed: str | None = None
    audit_owed_at: str | None = None
    # The outbox file it was taken from, as it was then (see gateway.fsutil.file_identity;
    # None: not taken from an outbox, or taken before this was recorded).
    source_file: str | None = None
    # Its receipt is kept in the spool row (read by Spool.stored_receipt; the bytes are
    # not part of the record); else in the file receipt_path names, if any.
    receipt_kept: bool = False
    # The SHA-256 (hex) of the receipt kept, in the row or in the file receipt_path, as
    # received (see Settled; None: no receipt, or a file settled before this was kept).
    receipt_sha256: str | None = None

    @property
    def has_receipt(self) -> bool:
        """A receipt of it is kept, in the spool row or in a file."""
        return self.receipt_kept or self.receipt_path is not None

    @property
    def receipt_form(self) -> str | None:
        """Where its receipt is kept: "spool" (the row), "file", or None (no receipt)."""
        if self.receipt_kept:
            return "spool"
        return "file" if self.receipt_path is not None else None

    @property
    def has_document(self) -> bool:
        """The document taken in is still kept (in the spool or its file)."""
        return self.payload is not None or self.payload_path.exists()

    @property
    def sealed(self) -> bool:
        """Signed and encrypted: its AS2 body is stored (in a file or in the spool)."""
        return self.body_path is not None or self.body is not None


@dataclass(frozen=True)
class InboundRecord:
    peer: str
    message_id: str
    sha256: str
    target_path: Path
    # "delivering": the document is being written (or was, when the process died);
    # "written": it is in the inbox, its receipt not yet sent; "delivered": receipt stored.
    state: str
    receipt_headers: tuple[tuple[str, str], ...]
    receipt_body: bytes | None
    service: str | None = None
    work_path: Path | None = None  # see gateway.delivery.inbox
    size: int | None = None
    received_at: str = ""
    node: str | None = None  # the node writing it to the inbox ("delivering")
    lease_until: float = 0.0  # until when that node's claim lasts without renewal
    # As OutboundRecord's: the node whose change (the receipt stored) owes a record, which
    # one, and when.
    audited_by: str | None = None
    audit_owed: str | None = None
    audit_owed_at: str | None = None


class HandoverState(StrEnum):
    PENDING = "pending"  # to be POSTed to the internal system (again, after a back-off)
    DONE = "done"  # the internal system answered 2xx
    FAILED = "failed"  # final: gone/changed inbox file, or attempts/time ran out; an operator


@dataclass(frozen=True)
class HandoverRecord:
    """A received document to POST to the internal system (at least once, see delivery.http)."""

    peer: str
    message_id: str
    service: str | None
    path: Path
    content_type: str
    sha256: str
    size: int
    state: HandoverState
    attempts: int
    next_attempt_at: float
    last_error: str | None
    created_at: str = ""
    updated_at: str = ""
    expires_at: float = 0.0  # 0: created_at + [runtime] message_expiry_seconds
    # The node that took it to POST (while ``pending``) and until when its claim lasts
    # without renewal (seconds since the epoch; see Spool.handover_due).
    node: str | None = None
    lease_until: float = 0.0
    # As OutboundRecord's: the node whose change (done, failed, retried) owes a record,
    # which one, and when.
    audited_by: str | None = None
    audit_owed: str | None = None
    audit_owed_at: str | None = None


@dataclass(frozen=True)
class DisplacedOwed:
    """Records this node's changes owe whose rows another node took on since (see
    Spool.displaced_owed): each row as it was then (its binary data left out), naming
    that record (``audit_owed``, ``audit_owed_at``)."""

    outbound: tuple[OutboundRecord, ...] = ()
    inbound: tuple[InboundRecord, ...] = ()
    handover: tuple[HandoverRecord, ...] = ()


class RetainedKind(StrEnum):
    """What the gateway keeps after a message is finished, each with its own retention."""

    RECEIVED = "received"  # the inbox copy of a document handed over to the internal system
    RECEIPTS = "receipts"  # receipts received (files) and sent (kept to answer a resend)
    HANDOVER = "handover"  # records of hand-overs to the internal system
    SPOOL = "spool"  # records of finished messages (inbound: the resend detection)


@dataclass(frozen=True)
class Disposable:
    """One kept thing of a finished message that retention may dispose of."""

    kind: RetainedKind
    table: str  # where the spool keeps it: "outbound", "inbound" or "handover"
    peer: str
    message_id: str
    service: str | None
    file: Path | None  # the file it is (a received copy, a receipt), if any
    # What its row records of that file, where it does (a received copy): the SHA-256
    # (hex) and size of the file as it was received.
    sha256: str | None = None
    size: int | None = None


@dataclass(frozen=True)
class DataKey:
    """The data key of one item kept encrypted at rest (gateway.atrest), as the spool
    stores it: wrapped under the key-encryption key of version ``kek``."""

    item: str
    kek: int
    wrapped: bytes
    # Called in the transaction that stores the key, after the lock a rotation of the
    # key-encryption keys takes (see SqlStore.key_lock): the key as it is to be stored
    # now, wrapped under the newest key-encryption key if another was made meanwhile.
    current: Callable[[], DataKey] | None = field(default=None, compare=False, repr=False)

    @classmethod
    def cleared(cls, item: str) -> DataKey:
        """``item`` stored in the clear (at-rest encryption off): storing this removes a
        data key it had (from when it was stored encrypted), so that none is left that
        says it must be encrypted."""
        return cls(item, 0, b"")

    @property
    def is_cleared(self) -> bool:
        return self.kek == 0


@dataclass(frozen=True)
class RowReceipt:
    """A receipt kept in its message's spool row, read in one statement with what was
    recorded of it: ``stored``, as stored (sealed under ``receipt_item`` when encrypted
    at rest); ``sha256``, the SHA-256 (hex) of the receipt as received, recorded when it
    settled the message (see Settled; None only in a row changed outside medgw)."""

    stored: bytes
    sha256: str | None


@dataclass(frozen=True)
class InboundDelivered:
    """A received document durably in the inbox, its receipt to be stored (see
    :meth:`Spool.inbound_delivered_all`): the receipt's ``headers`` and ``body`` (sealed
    when encrypted at rest, under ``data_key``, stored in the same transaction), and
    ``handover`` (content type, size): its hand-over to the internal system to queue with
    it (None: the document stays in the inbox only)."""

    peer: str
    message_id: str
    headers: list[tuple[str, str]]
    body: bytes
    handover: tuple[str, int] | None = None
    data_key: DataKey | None = None


@dataclass(frozen=True)
class Settled:
    """A sent message finished by its receipt (see :meth:`Spool.mark_settled`):
    ``state`` delivered or failed, the receipt's ``disposition``, where the receipt is
    kept (``receipt``: the stored bytes, kept in the row; or the file ``receipt_path``)
    and the ``data_key`` it is encrypted under at rest.

    Finished only if it is still as its settler found it: in state ``found`` and, with
    ``held`` (the answer to this node's own POST), still claimed by this node; else
    another node took it over once this node's claim ran out, or another receipt
    settled it, and that is left as it is.  An asynchronous receipt (any node may be
    POSTed one) names the state it found the message in, ``held`` False (see
    :attr:`settles_from`)."""

    message_id: str
    state: OutboundState
    disposition: str
    receipt_path: Path | None
    error: str | None = None
    data_key: DataKey | None = None
    found: OutboundState = OutboundState.SENDING
    held: bool = True
    # The audit record written once it is committed (None: the receipt.received or
    # message.failed of its state).
    owed: EventType | None = None
    # The receipt as stored in the row (sealed under receipt_item when encrypted at
    # rest); None: kept in the file receipt_path, or no receipt.
    receipt: bytes | None = None
    # The SHA-256 (hex) of the receipt as received, before sealing, kept in the row or
    # in the file: what the audit record of the settlement names, recorded beside it
    # (its readers compare the bytes they read with it).  Given with ``receipt``
    # always; with ``receipt_path`` as medgw settles (a spool's caller may leave it out,
    # as for files settled before it was recorded); never without either.
    receipt_sha256: str | None = None

    def __post_init__(self) -> None:
        if self.receipt is not None and self.receipt_path is not None:
            raise SpoolError(
                f"the settlement of {self.message_id} keeps its receipt both in its row and"
                f" in the file {self.receipt_path}",
                fix="give either receipt (kept in the row) or receipt_path (a file)",
            )
        if self.receipt is not None and self.receipt_sha256 is None:
            raise SpoolError(
                f"the settlement of {self.message_id} gives a receipt for its row without"
                " its SHA-256",
                fix="give receipt_sha256 with receipt",
            )
        if self.receipt_sha256 is not None and self.receipt is None and self.receipt_path is None:
            raise SpoolError(
                f"the settlement of {self.message_id} gives a receipt's SHA-256 without the"
                " receipt (in its row or in a file)",
                fix="give receipt or receipt_path with receipt_sha256, or neither",
            )

    @property
    def settles_from(self) -> tuple[OutboundState, ...]:
        """The states it is finished from: ``found``, and for an asynchronous receipt
        that found the message ``sending``, ``awaiting-receipt`` too.  The peer may POST
        that receipt at once, before the answer to the sender's own POST is recorded
        (its empty 200 moves the message to ``awaiting-receipt``): refused for that, it
        would leave the message waiting for the receipt it already has, to be sent again
        once that is overdue."""
        if not self.held and self.found is OutboundState.SENDING:
            return (OutboundState.SENDING, OutboundState.AWAITING_RECEIPT)
        return (self.found,)

    @property
    def owes(self) -> EventType:
        """The audit record written once this is committed."""
        if self.owed is not None:
            return self.owed
        if self.state is OutboundState.DELIVERED:
            return EventType.RECEIPT_RECEIVED
        return EventType.MESSAGE_FAILED


# The names of the items kept encrypted at rest, each with its own data key.
def payload_item(message_id: str) -> str:
    """The document of an outbound message, from its intake until it is signed and
    encrypted (a file in state/payloads; kept while its preparation failed)."""
    return f"outbound-payload:{message_id}"


def body_item(message_id: str) -> str:
    """The signed, encrypted AS2 body of an outbound message (file or spool row)."""
    return f"outbound-body:{message_id}"


def receipt_item(message_id: str) -> str:
    """The receipt received for an outbound message (in its spool row, or a file in
    state/receipts)."""
    return f"outbound-receipt:{message_id}"


def sent_receipt_item(peer: str, message_id: str) -> str:
    """The receipt sent for an inbound message, kept to answer a resend."""
    return f"inbound-receipt:{peer}:{message_id}"


def items_of(table: str, peer: str, message_id: str, kind: RetainedKind) -> tuple[str, ...]:
    """The items whose data keys go when ``kind`` of a message in ``table`` is disposed of."""
    if table == "outbound" and kind is RetainedKind.RECEIPTS:
        return (receipt_item(message_id),)
    if table == "outbound" and kind is RetainedKind.SPOOL:
        return (body_item(message_id), receipt_item(message_id), payload_item(message_id))
    if table == "inbound" and kind in (RetainedKind.RECEIPTS, RetainedKind.SPOOL):
        return (sent_receipt_item(peer, message_id),)
    return ()


@dataclass(frozen=True)
class Intake:
    """A document taken in, as :meth:`~gateway.spool.Spool.add_intakes` records it (the
    arguments of :meth:`~gateway.spool.Spool.add_intake`)."""

    message_id: str
    peer: str
    filename: str
    content_type: str
    source_path: Path
    payload_path: Path
    expires_at: float = 0.0
    zone: str | None = None
    origin: Origin = LOCAL_INTAKE
    submitted_by: str | None = None
    service: str | None = None
    data_key: DataKey | None = None
    payload: bytes | None = None
    source_file: str | None = None  # the outbox file's identity (OutboundRecord.source_file)
    # The submitter's Idempotency-Key (with submitted_by): one message per key and submitter.
    idempotency_key: str | None = None
    # The SHA-256 (hex) of the document as submitted, kept with idempotency_key.
    content_sha256: str | None = None


@dataclass(frozen=True)
class Prepared:
    """A document signed and encrypted, as :meth:`~gateway.spool.Spool.mark_queued_all`
    queues it (the arguments of :meth:`~gateway.spool.Spool.mark_queued`)."""

    message_id: str
    body_path: Path | None
    headers: tuple[tuple[str, str], ...]
    mic: str
    size: int
    encrypted_for: str | None = None
    body: bytes | None = None
    data_key: DataKey | None = None
