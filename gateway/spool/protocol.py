"""The spool as its callers see it: a protocol any backend implements.

The daemon, the sender, the receiver, the hand-over and the operator commands
depend on :class:`Spool` only; :class:`gateway.spool.sqlite.SqliteSpool` (the
default) and :class:`gateway.spool.postgres.PostgresSpool` (shared by several
nodes) implement it, with the same statements (see gateway.spool.sql).  Every
method is one committed transaction (or a read of committed state), safe to call
from worker threads.

Several nodes may share one spool.  A spool handle belongs to one node
(:class:`~gateway.spool.records.Claimant`): work it takes (a message to send, a
received document to write to the inbox, a document to hand over to the
internal system) is claimed in its name under a lease that lasts
``lease_seconds`` unless renewed (:meth:`Spool.renew_leases`, which a live node
calls every third of that).  A node takes back at start-up only its own
interrupted work and the claims whose lease ran out (sends excepted: the lease
keeper takes those over, from the start on, and audits each); while running, it takes
over the expired claims of other nodes (:meth:`Spool.take_over_expired`,
:meth:`Spool.intake_take_over`, :meth:`Spool.inbound_take_over`,
:meth:`Spool.handover_take_over`).  Before each
step that cannot be undone (the POST to the peer, linking a document into the
inbox, the POST to the internal system) the holder checks that it still holds
its claim with at least half a lease to spare (:meth:`Spool.holds_lease`,
:meth:`Spool.inbound_holds`, :meth:`Spool.handover_holds`), and stops if not: a
message is never sent by two nodes at once, a document never written, nor
handed over, by two at once.  Lease times are the nodes' wall clocks: they must
agree to well within a lease (NTP).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Protocol

from gateway.audit.events import EventType
from gateway.routing import LOCAL_INTAKE, Origin
from gateway.spool.records import (
    DataKey,
    DisplacedOwed,
    Disposable,
    HandoverRecord,
    HandoverState,
    InboundDelivered,
    InboundRecord,
    Intake,
    OutboundRecord,
    OutboundState,
    PeerControl,
    Prepared,
    RetainedKind,
    RowReceipt,
    Settled,
)


class Spool(Protocol):
    """The durable store of messages in transit (see gateway.spool.records for states)."""

    @property
    def node(self) -> str:
        """The node this handle claims work for."""
        ...

    def close(self) -> None: ...

    def reach(self) -> None:
        """A spool database that did not answer: one connection tried now, whatever the
        back-off (it answers: ``on_change`` hears it); nothing if it answers, or if the
        spool is a file.  Still unreachable: :class:`~gateway.errors.SpoolUnreachableError`."""

    def add_intake(
        self,
        message_id: str,
        peer: str,
        filename: str,
        content_type: str,
        source_path: Path,
        payload_path: Path,
        expires_at: float = 0.0,
        *,
        zone: str | None = None,
        origin: Origin = LOCAL_INTAKE,
        submitted_by: str | None = None,
        service: str | None = None,
        data_key: DataKey | None = None,
        payload: bytes | None = None,
        idempotency_key: str | None = None,
        content_sha256: str | None = None,
    ) -> str | None:
        """Queue a message for ``peer`` (of network ``zone``); ``data_key``: the key its
        document (``payload_path``, or for a small one ``payload``, its stored copy kept
        in this same row) is encrypted under at rest, until it is sealed.

        NET-4 invariant, enforced here whatever the caller checked before: a
        message that came in from a peer is never queued for a peer of another
        zone (:class:`~gateway.routing.TransitRefused`; the caller audits it).
        ``submitted_by`` (a local API client, an operator, an outbox file's owner) is
        recorded in the same transaction.

        ``idempotency_key`` (with ``submitted_by``): the key the submitter sent with it.
        When that submitter's key already names a message (recorded earlier, or at the
        same time by any node sharing the spool), nothing is recorded and that
        message's id is returned; otherwise None.  ``content_sha256``: the SHA-256 (hex)
        of the document as submitted, kept with the key (see :meth:`submitted_sha256`)."""
        ...

    def add_intakes(self, intakes: Sequence[Intake]) -> dict[str, str]:
        """Several documents taken in, each as :meth:`add_intake` records it, all in one
        transaction: every one is recorded, or (an error raised) none is; but those
        whose idempotency key names a message already, returned with that message's id."""
        ...

    def submitter(self, message_id: str) -> str | None:
        """Who submitted the message (None: not recorded, or no such message)."""
        ...

    def submitted_sha256(self, message_id: str) -> str | None:
        """The SHA-256 (hex) of the document as its submitter sent it, kept with its
        idempotency key (None: submitted without a key or fingerprint, recorded before
        fingerprints were kept, or no such message)."""
        ...

    def payloads_recorded(self, names: Sequence[str]) -> dict[str, bool]:
        """Of the file names ``names`` (files found in a payloads folder), those a
        message's row names as its payload, each with whether its plaintext is still
        needed: not once the message was signed and encrypted (it has a MIC) and is past
        intake.  Asked by name, never by whole path (the state folder may have been moved
        or restored elsewhere since); an index lookup per name, however many rows the
        spool keeps."""
        ...

    def intakes_by_payload(self, names: Sequence[str]) -> list[OutboundRecord]:
        """Of the file names ``names`` (files found in a payloads folder), the messages
        still in intake whose rows name one as their payload, by name as
        :meth:`payloads_recorded` (an index lookup per name)."""
        ...

    def receipts_recorded(self, names: Sequence[str]) -> set[str]:
        """Of the file names ``names`` (files found in a receipts folder), those of the
        receipts the outbound messages' rows name, by name as :meth:`payloads_recorded`:
        a name is unique to one receipt received, whichever node stored it."""
        ...

    def outbound_by_source(self, paths: Sequence[str]) -> list[OutboundRecord]:
        """The messages taken from the files ``paths`` (found in this node's outbox), by
        the whole path their rows keep as ``source_path``: an index lookup per path,
        however many rows the spool keeps.  A path may name several messages (a name
        used again for later documents)."""
        ...

    def mark_queued(
        self,
        message_id: str,
        body_path: Path | None,
        headers: list[tuple[str, str]],
        mic: str,
        size: int,
        encrypted_for: str | None = None,
        *,
        body: bytes | None = None,
        data_key: DataKey | None = None,
    ) -> bool:
        """Signed and encrypted: the AS2 body is the file ``body_path`` or, for a small
        message, ``body``, stored in this same transaction, with ``data_key`` (the key
        the body is encrypted under at rest, gateway.atrest); the document's own data
        key is deleted in it (its copy is removed next).  False (nothing queued) if the
        message is no longer in intake, or no longer claimed by this node (its claim ran
        out, and another node took it over): another node prepared it or prepares it now
        (and the keys stay as they are)."""
        ...

    def mark_queued_all(self, prepared: Sequence[Prepared]) -> list[str]:
        """Several documents signed and encrypted, each as :meth:`mark_queued` queues it,
        in one transaction; returns the Message-IDs of those it queued (the others were
        no longer in intake, or no longer this node's)."""
        ...

    def pending_by_recipient(self, peer: str) -> dict[str, int]:
        """Messages for ``peer`` not yet delivered, by the SHA-256 of the certificate they
        are encrypted to (those prepared before it was recorded are left out)."""
        ...

    def mark_sending(self, message_id: str) -> None:
        """Claim one message for sending by this node (as :meth:`claim_due` does)."""
        ...

    def mark_awaiting_receipt(self, message_id: str) -> bool:
        """Sent, its receipt to come later; False if that receipt has already settled it
        (or this node's claim was taken over)."""
        ...

    def requeue_unanswered(self, peer: str, sent_before: str) -> list[str]:
        """Messages whose asynchronous receipt never came go back to the queue (resend:
        the receiver deduplicates and answers with the receipt again)."""
        ...

    def mark_retry(
        self,
        message_id: str,
        error: str,
        next_attempt_at: float,
        *,
        owed: EventType | None = None,
        unsent: bool = False,
    ) -> bool:
        """A send that did not get through goes back to the queue; False (nothing changed)
        if this node is no longer sending it (its asynchronous receipt settled it, or
        another node took over the claim).  ``owed``: the audit record this node writes
        of it once committed (kept with the change, see ``OutboundRecord.audit_owed``).
        ``unsent``: this node stopped it before any byte of its request went out, so
        the attempt its claim counted is given back (same statement: it costs nothing)."""
        ...

    def mark_done(
        self,
        message_id: str,
        state: OutboundState,
        disposition: str,
        receipt_path: Path | None,
        error: str | None = None,
        *,
        data_key: DataKey | None = None,
        owed: EventType | None = None,
    ) -> bool:
        """A message this node is sending finished; ``data_key``: the key the receipt
        is encrypted under at rest, stored in the same transaction; ``owed``: the
        audit record written of it (None: as :attr:`Settled.owes`).  False (nothing
        changed, no key stored) if this node no longer holds it: another node took it
        over when this node's claim ran out, or its asynchronous receipt settled it."""
        ...

    def mark_settled(self, settled: Sequence[Settled], awaiting: Sequence[str] = ()) -> list[str]:
        """Several sent messages settled in one transaction: each of ``settled`` finished,
        with its receipt's data key, if it is still as its settler found it (see
        :class:`~gateway.spool.records.Settled`), and each of ``awaiting`` (Message-IDs)
        marked as :meth:`mark_awaiting_receipt` marks it.  Returns the Message-IDs of
        those changed, of both.  All or nothing: on an error none of these changes is
        made."""
        ...

    def stored_receipt(self, message_id: str, at_most: int) -> bytes | None:
        """The receipt kept in the message's row, as stored (sealed under
        ``receipt_item`` when encrypted at rest); None: no receipt in the row (see
        :attr:`OutboundRecord.receipt_kept`).  Raises StoredReceiptTooLargeError, its
        bytes left unread, if it is more than ``at_most`` bytes, and
        StoredReceiptNotBytesError, unread too, if it is not stored as bytes."""
        ...

    def row_receipt(self, message_id: str, at_most: int) -> RowReceipt | None:
        """The same as :meth:`stored_receipt`, with the SHA-256 recorded of it when it
        settled the message, read in the same statement (a reader compares the two:
        a receipt read with the SHA-256 of another row version would not match)."""
        ...

    def get(self, message_id: str) -> OutboundRecord | None: ...

    def in_state(self, state: OutboundState) -> list[OutboundRecord]: ...

    def intake_interrupted(self) -> list[OutboundRecord]:
        """At start-up: messages this node took in and had not finished preparing (state
        ``intake``), and those whose node's claim ran out (a node renamed, or dead:
        their documents are in that node's state folder, which this node may not
        reach), oldest first, each claimed by this node under a new lease in the same
        transaction (so that two nodes starting at once never both prepare one).
        Returns them as they were (``node``: who held them)."""
        ...

    def intake_take_over(self, limit: int, shared: Path | None = None) -> list[OutboundRecord]:
        """While running: up to ``limit`` of the messages other nodes took in and had not
        finished preparing whose lease ran out, and whose document is kept in the spool
        row, or (given ``shared``, the folder of the copies all nodes mount) in a
        complete file under ``shared`` (any node can prepare those; one kept in a file
        elsewhere is in its node's state folder, and one whose copy was not finished is
        still in its node's outbox: taken up when that node starts), oldest first,
        claimed by this node (returned as they were: ``node`` is who held them)."""
        ...

    def intake_reclaim(self, message_ids: Sequence[str]) -> list[OutboundRecord]:
        """While running: of ``message_ids`` (interrupted intakes whose documents are in
        this node's outbox, found under another node's claim at its start; a few at a
        time), those still in intake that are this node's (given back to it, or claimed
        by an earlier call) or whose holder's lease ran out, claimed by this node in one
        transaction (returned as they were: ``node`` is who held them)."""
        ...

    def intake_release(self, message_id: str, node: str | None) -> bool:
        """Let go of an interrupted intake this node claimed and cannot prepare (its
        document is in the state folder of ``node``, which took it in): held by ``node``
        again, its lease run out, so that node takes it up at once when it starts.
        False (nothing changed) if this node no longer holds it."""
        ...

    def intake_renew(self, message_id: str, key: DataKey | None = None) -> bool:
        """Renew this node's claim on an interrupted intake whose document it takes into
        the spool again, storing ``key`` (that document's new data key) in the same
        transaction; False (nothing changed) if this node no longer holds it: another
        node took it over, and that node's key is the one that stays."""
        ...

    def all_outbound(self) -> list[OutboundRecord]: ...

    def claim_due(
        self, peer: str, now: float, limit: int
    ) -> tuple[list[OutboundRecord], float | None]:
        """Take up to ``limit`` of ``peer``'s queued messages that are due at ``now``,
        oldest first, and mark them ``sending`` by this node under a new lease in one
        transaction (so no other task or node picks them up).  Returns them as they
        were before (``attempts`` not yet counted), and when the next queued message
        is due (None: none is queued)."""
        ...

    def requeue_interrupted(self, peer: str | None = None) -> list[str]:
        """Messages whose sending was interrupted go back to the queue: at start-up this
        node's (and those claimed before nodes were recorded), or ``peer``'s when its
        sender starts again after a failure.  Another node's claims are left alone,
        live or not: those whose lease ran out are taken over by the lease keeper
        (:meth:`take_over_expired`), which audits each."""
        ...

    def outbound_changed_since(self, since: str) -> list[OutboundRecord]:
        """The outbound messages this node queued, or whose last audited change
        (settled, given up, retried) it made, whose row changed at ``since`` (ISO 8601,
        UTC) or later (of rows from before that was kept: those this node holds, or
        nobody).  For recovery: the changes a kill may have cut off from their audit
        records, which belong in this node's trail whoever holds the message now."""
        ...

    def inbound_changed_since(self, since: str) -> list[InboundRecord]:
        """The received messages whose last audited change (the receipt stored) this node
        made at ``since`` (ISO 8601, UTC) or later: for recovery, as
        :meth:`outbound_changed_since`."""
        ...

    def handover_changed_since(self, since: str) -> list[HandoverRecord]:
        """The hand-overs whose last audited change (done, failed, retried by an
        operator) this node made at ``since`` (ISO 8601, UTC) or later: for recovery, as
        :meth:`outbound_changed_since`."""
        ...

    def displaced_owed(self) -> DisplacedOwed:
        """The records this node's changes owe (see ``OutboundRecord.audit_owed``) whose
        rows another node took on since (claimed, or changed naming its own record,
        which displaces this node's): the first such change kept the row as it was then
        in its own transaction.  For recovery, as :meth:`outbound_changed_since`: a kill
        may have cut them off.  One per row (this node's latest record), until
        :meth:`forget_displaced` or the row's disposal (retention)."""
        ...

    def forget_displaced(self, displaced: DisplacedOwed) -> None:
        """Delete these of :meth:`displaced_owed` (their records are in this node's trail
        now); one another node's change displaced since (a later change of this node, or
        the same row read again) stays."""
        ...

    def take_over_expired(self) -> list[OutboundRecord]:
        """Messages other nodes were sending whose lease ran out (the node died, or lost
        the spool) go back to the queue, due now; returns them as they were (``node``:
        who held them)."""
        ...

    def holds_lease(self, message_id: str) -> bool:
        """Whether this node still holds its claim to send the message, with at least
        half a lease to spare: asked right before the POST."""
        ...

    def renew_leases(self) -> int:
        """Extend every claim this node holds (preparing, sending, writing to the inbox,
        handing over) by a lease from now; returns how many."""
        ...

    def list_outbound(
        self, *, state: OutboundState | None = None, peer: str | None = None, limit: int = 1000
    ) -> list[OutboundRecord]: ...

    def counts(self) -> dict[tuple[str, str], int]:
        """Number of messages per (peer, state)."""
        ...

    def size_bytes(self) -> int:
        """The spool database's size on disk: SQLite's file with its write-ahead log, or
        PostgreSQL's ``pg_database_size`` (SpoolError if it does not answer)."""
        ...

    def expire_due(self, peer: str, now: float) -> list[str]:
        """Queued messages for ``peer`` past their expiry become ``expired``."""
        ...

    def mark_dead(self, message_id: str, reason: str) -> bool:
        """A message this node is sending failed its last attempt: ``dead`` (``reason``),
        until an operator retries it.  False (nothing changed) if this node no longer
        holds it: another node took it over, or its asynchronous receipt settled it."""
        ...

    def operator_retry(self, message_id: str, actor: str, expires_at: float) -> OutboundRecord: ...

    def operator_cancel(self, message_id: str, actor: str) -> OutboundRecord: ...

    def set_suspended(self, peer: str, suspended: bool, reason: str, actor: str) -> None: ...

    def peer_controls(self) -> dict[str, PeerControl]: ...

    def is_suspended(self, peer: str) -> bool: ...

    def abandon_intake(self, message_id: str) -> bool:
        """Forget a message whose document could not be taken from the outbox (it is
        still there, and a later scan takes it again under a new Message-ID), with the
        data key of its document.  Only from ``intake``, and not while another node's
        claim on it is live: False (nothing changed, the key kept) if another node
        prepared it, or took it over and holds it now (this node's claim ran out while
        it could not reach the spool), or it was never recorded.  Who submitted it goes
        with it (its idempotency key names nothing then)."""
        ...

    def fail_intake(self, message_id: str, error: str) -> bool:
        """A document that cannot be signed and encrypted: failed, not sent (``error``
        says why), its document kept for ``queue retry``.  Only from ``intake``, while
        this node holds the intake: False (nothing changed) if another preparation has
        queued it meanwhile, or another node holds it now (its claim began when this
        node's ran out: that node's preparation decides)."""
        ...

    def inbound_get(self, peer: str, message_id: str) -> InboundRecord | None: ...

    def inbound_unfinished(self) -> list[InboundRecord]:
        """At start-up: deliveries this node's stopped process left in the middle (state
        ``delivering``), and those of other nodes whose lease ran out, each claimed by
        this node in the same transaction (returned as they were)."""
        ...

    def inbound_in_progress(self) -> list[InboundRecord]:
        """Every delivery in the middle, whichever node holds it (a read)."""
        ...

    def inbound_take_over(self) -> list[InboundRecord]:
        """While running: deliveries other nodes left in the middle whose lease ran out,
        claimed by this node (returned as they were: ``node`` is who held them)."""
        ...

    def inbound_take(self, peer: str, message_id: str) -> InboundRecord | None:
        """Claim one delivery left in the middle for this node to settle (its own, or one
        whose lease ran out); None if it is no longer in the middle.  Raises
        :class:`~gateway.errors.ClaimHeldError` if another node holds it."""
        ...

    def inbound_holds(self, peer: str, message_id: str) -> bool:
        """Whether this node still holds the delivery, with at least half a lease to
        spare: asked right before the document is linked into the inbox."""
        ...

    def inbound_target_claimed(self, target_path: Path) -> bool: ...

    def inbound_begin(
        self,
        peer: str,
        message_id: str,
        sha256: str,
        target_path: Path,
        service: str | None = None,
        *,
        work_path: Path | None = None,
        size: int | None = None,
    ) -> None:
        """Claim the delivery of a new document for this node.  Raises
        :class:`~gateway.errors.ClaimHeldError` if (peer, Message-ID) is already
        recorded: another request or node is delivering it (the caller settles one left
        in the middle first, with :meth:`inbound_take`)."""
        ...

    def inbound_retarget(self, peer: str, message_id: str, target_path: Path) -> None:
        """A delivery in progress takes another name (its first one was taken meanwhile)."""
        ...

    def inbound_release(self, peer: str, message_id: str) -> bool:
        """Forget a delivery that did not reach the inbox: a resend starts afresh.  False
        (nothing changed) if this node no longer holds it (another node took it over)."""
        ...

    def inbound_written(self, peer: str, message_id: str) -> None:
        """An interrupted delivery is known to be in the inbox (and audited as such)."""
        ...

    def inbound_delivered(
        self,
        peer: str,
        message_id: str,
        receipt_headers: list[tuple[str, str]],
        receipt_body: bytes,
        handover: tuple[str, int] | None = None,
        *,
        data_key: DataKey | None = None,
    ) -> None:
        """The document is durably in the inbox and its receipt stored (with ``data_key``,
        the key it is encrypted under at rest, in the same transaction).

        ``handover`` (content type, size): also queue its hand-over to the internal
        system, in the same transaction, so that every document answered
        ``processed`` is handed over even if the process dies right after."""
        ...

    def inbound_delivered_all(self, delivered: Sequence[InboundDelivered]) -> None:
        """:meth:`inbound_delivered` for several documents in ONE transaction: their
        receipts, data keys and hand-overs are all stored, or (an error raised) none."""
        ...

    def handover_due(self, now: float, limit: int = 16) -> list[HandoverRecord]:
        """Take up to ``limit`` pending hand-overs due at ``now`` (earliest due, then
        oldest), held by no node or by this one, for this node under a new lease, in one
        transaction (so no other node POSTs them meanwhile).  Returns them as they were.
        Each is then settled (:meth:`handover_done`, :meth:`handover_retry`,
        :meth:`handover_failed`) or let go (:meth:`handover_release`)."""
        ...

    def handover_next_at(self) -> float | None:
        """When the earliest pending hand-over this node may take is due (None: none;
        those another node holds are left out)."""
        ...

    def handover_holds(self, peer: str, message_id: str) -> bool:
        """Whether this node still holds the hand-over, with at least half a lease to
        spare: asked right before the POST to the internal system."""
        ...

    def handover_release(
        self, peer: str, message_id: str, next_attempt_at: float | None = None
    ) -> bool:
        """Let go of a hand-over this node took and did not attempt (any node may take it
        again, as due as it was, or at ``next_attempt_at`` if given: a claim lost before
        its POST); False (nothing changed) if this node no longer holds it."""
        ...

    def handover_take_over(self) -> list[HandoverRecord]:
        """Hand-overs other nodes took whose lease ran out (the node died, or lost the
        spool) are let go, for whichever node takes them next; returns them as they
        were (``node``: who held them)."""
        ...

    def handover_get(self, peer: str, message_id: str) -> HandoverRecord | None: ...

    def handover_done(self, peer: str, message_id: str) -> None:
        """The internal system answered 2xx: ``done``, whichever node holds it."""
        ...

    def handover_retry(self, peer: str, message_id: str, error: str, next_at: float) -> bool:
        """A failed attempt, counted; due again at ``next_at``, for any node.  False
        (nothing changed) if another node holds it now, or it is no longer pending."""
        ...

    def handover_failed(self, peer: str, message_id: str, error: str) -> bool:
        """Final: ``failed``, until an operator retries it.  False (nothing changed) if
        another node holds it now, or it is no longer pending."""
        ...

    def handover_list(
        self, state: HandoverState | None = None, message_id: str | None = None
    ) -> list[HandoverRecord]:
        """Hand-overs, newest first; only those in ``state`` / with ``message_id`` if given."""
        ...

    def handover_operator_retry(
        self, peer: str, message_id: str, actor: str, expires_at: float
    ) -> HandoverRecord:
        """A ``failed`` hand-over back to ``pending``: attempts reset, a new expiry."""
        ...

    def retained_groups(self, kind: RetainedKind) -> list[tuple[str, str | None]]:
        """The (peer, service) pairs that have something of ``kind`` to dispose of."""
        ...

    def disposable(
        self,
        kind: RetainedKind,
        before: str,
        *,
        peer: str | None = None,
        service: str | None = None,
        any_service: bool = True,
        limit: int = 64,
    ) -> list[Disposable]:
        """Up to ``limit`` things of ``kind`` finished before ``before`` (ISO 8601) of
        ``peer`` and ``service``, on which nothing is owed any more (see
        gateway.spool.sqlite.retention), oldest first; an inbox copy with the SHA-256 and
        size its hand-over record keeps."""
        ...

    def count_disposable(
        self,
        kind: RetainedKind,
        before: str,
        *,
        peer: str | None = None,
        service: str | None = None,
        any_service: bool = True,
    ) -> int:
        """How many things a purge with these filters would dispose of (a dry run)."""
        ...

    def dispose(self, items: Sequence[Disposable]) -> list[Disposable]:
        """Dispose of ``items`` in one transaction, each only if it still may be; returns
        those disposed of.  Their files are the caller's to remove, after the commit;
        then :meth:`files_removed`."""
        ...

    def files_pending(self, limit: int = 64) -> list[Disposable]:
        """Up to ``limit`` things disposed of whose files a process killed after the
        disposal's commit left to remove (inbox copies; a receipt file no row names any
        more is found by the receipts folder's sweep instead)."""
        ...

    def files_removed(self, items: Sequence[Disposable]) -> None:
        """The files of ``items``, disposed of, are removed: no longer owed."""
        ...

    def data_key(self, item: str) -> DataKey | None:
        """The wrapped data key of an item kept encrypted at rest (gateway.atrest)."""
        ...

    def put_data_key(self, key: DataKey) -> None: ...

    def sample_data_keys(self, kek: int, around: str) -> list[DataKey]:
        """The data keys wrapped under the key-encryption key of version ``kek`` nearest
        the item ``around`` (one on each side by item, not ``around`` itself: at most
        two, none if there are none), to tell a data key changed in the spool from a
        key-encryption key that is not the one it was wrapped under."""
        ...

    def data_key_versions(self) -> list[int]:
        """The key-encryption key versions the stored data keys are wrapped under."""
        ...

    def rewrap_data_keys(
        self, newest: Callable[[], int], rewrap: Callable[[DataKey, int], bytes]
    ) -> int:
        """In one transaction, under a lock that every store of a data key also takes (a
        store on another node waits for it, then sees the new key-encryption key):
        ``newest()`` (which may create a new key-encryption key) gives the version to wrap
        under, and every data key wrapped under another is re-wrapped under it (``rewrap``
        gives the new wrapped bytes); returns that version."""
        ...

    def shred(self) -> bool:
        """Leave no copy of deleted rows in the spool's files (after a purge): deleted
        bytes overwritten, the write-ahead log emptied.  False: the log could not be
        emptied now (readers kept it busy), so it may still hold deleted rows' bytes."""
        ...
