"""Exactly-once delivery of a received document to the inbox.

A document is claimed in the spool, written to a work file, linked into the
inbox under a name nobody else holds, and audited once; a resend, or the next
start (see ``recovery``), settles a delivery that an interruption left in the
middle, so that no document is written twice.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace
from datetime import datetime
from enum import Enum
from pathlib import Path
from typing import Any, Literal

from gateway.as2.mdn import Disposition
from gateway.audit import DURABLE, AuditSink, EventType, Pending
from gateway.audit.log import recorded_since
from gateway.config import GatewayConfig, Peer
from gateway.delivery import inbox
from gateway.errors import (
    ClaimHeldError,
    DeliveryError,
    InboxUnavailableError,
    SpoolOutcomeUnknownError,
)
from gateway.inbound.locks import InboundLocks
from gateway.inbound.outcomes import DuplicateReceipt, Refused, audit_inbound, audit_inbound_later
from gateway.logs import Logger
from gateway.spool import InboundRecord, Spool


class _Unread(Enum):
    UNREAD = 0  # the caller has not read the message's record: deliver_once reads it


@dataclass(frozen=True)
class Delivered:
    """Where :meth:`InboxDelivery.deliver` put a document, and its ``message.delivered``
    record (or ``message.duplicate``), written: to be waited for before the spool calls
    the message delivered."""

    target: Path
    recorded: Pending


class InboxDelivery:
    """Puts received documents in the inbox, each exactly once."""

    def __init__(
        self,
        config: GatewayConfig,
        spool: Spool,
        audit: AuditSink,
        log: Logger,
        locks: InboundLocks,
    ) -> None:
        self._config = config
        self._spool = spool
        self._audit = audit
        self._log = log
        self._locks = locks

    def deliver_once(
        self,
        peer: Peer,
        message_id: str,
        filename: str | None,
        payload: Callable[[], Iterable[bytes]],
        size: int,
        sha256: str,
        service: str | None,
        *,
        recorded: InboundRecord | Literal[_Unread.UNREAD] | None = _Unread.UNREAD,
    ) -> Path:
        """Put the document in the inbox, unless it is there already: exactly once; its
        record durable when this returns (see :meth:`deliver`)."""
        delivered = self.deliver(
            peer, message_id, filename, payload, size, sha256, service, recorded=recorded
        )
        delivered.recorded.wait()
        return delivered.target

    def deliver(
        self,
        peer: Peer,
        message_id: str,
        filename: str | None,
        payload: Callable[[], Iterable[bytes]],
        size: int,
        sha256: str,
        service: str | None,
        *,
        recorded: InboundRecord | Literal[_Unread.UNREAD] | None = _Unread.UNREAD,
        received: Pending = DURABLE,
    ) -> Delivered:
        """Put the document in the inbox, unless it is there already: exactly once.

        ``recorded``: the spool's record of the message as the caller has just read it
        with this (peer, Message-ID) held (InboundLocks.exclusive), not read again; a
        record another node makes meanwhile makes the claim fail (ClaimHeldError) as it
        would after a read here.

        A resend whose document reached the inbox before an interruption (the process
        died, or the audit log or spool could not be written, before the receipt was
        stored) is not written again: it is audited as ``message.duplicate`` and
        answered with a new receipt.

        ``received``: the document's ``message.received``, written by the caller and
        waited for here once the work file is complete, just before the link into the
        inbox (the record precedes the document's arrival there); the caller waits for
        it too whatever this raises.  The ``message.delivered`` returned is written,
        not waited for: the caller waits before the spool calls the message delivered.
        """
        existing = (
            self._spool.inbound_get(peer.name, message_id)
            if recorded is _Unread.UNREAD
            else recorded
        )
        if existing is not None and (existing.sha256 != sha256 or existing.service != service):
            raise Refused(
                Disposition.UNEXPECTED_ERROR,
                EventType.MESSAGE_REJECTED,
                f"Message-ID {message_id} was already received with different content "
                "or service (a resend must carry the same document)",
            )
        if existing is not None and existing.state == "delivering":
            # Left in the middle by this node's earlier attempt, or by a node whose claim
            # ran out: settled here.  Another node's live claim: ClaimHeldError (503).
            taken = self._spool.inbound_take(peer.name, message_id)
            existing = (
                self.settle(taken)
                if taken is not None
                else self._spool.inbound_get(peer.name, message_id)
            )
        if existing is not None and existing.state == "delivered" and existing.receipt_body:
            raise DuplicateReceipt(existing.receipt_headers, existing.receipt_body)
        if existing is not None:
            self._record(
                EventType.MESSAGE_DUPLICATE,
                peer.name,
                message_id,
                service=service,
                reason="resend of a message whose document was put in the inbox before "
                "an interruption: not written again, answered with a receipt",
                detail={"inbox_file": str(existing.target_path)},
            )
            return Delivered(existing.target_path, DURABLE)
        try:
            with self._locks.target:  # two documents with one name never share a target
                target = self._choose_target(peer, message_id, filename, service)
                opened = inbox.prepare(target, self._spool.node)
                work = opened.path
                try:
                    # Its name durable before the claim names it: a claim whose work
                    # file is gone reads as "in the inbox" (see inbox.landed).  An
                    # OSError is answered 503 (see unavailable()): nothing is claimed.
                    inbox.sync_work_name(opened, self._locks.folders)
                    self._spool.inbound_begin(
                        peer.name, message_id, sha256, target, service, work_path=work, size=size
                    )
                except SpoolOutcomeUnknownError:
                    # The claim may be recorded, naming the work file: kept, for a record
                    # whose work file is gone reads as "in the inbox".  Not recorded, it is
                    # an unrecorded work file, removed as such (see recovery).
                    opened.close()
                    raise
                except BaseException:
                    opened.close()
                    inbox.discard(work)
                    raise
            try:
                target = self._write(
                    peer, message_id, filename, service, payload, opened, target, received
                )
            except ClaimHeldError:
                raise  # another node took the delivery over: it settles the work file
            except BaseException:  # whatever it was, nothing reached the inbox
                # Kept if the release failed, or another node took the delivery over:
                # the record needs it (a work file gone means "in the inbox").
                if self._spool.inbound_release(peer.name, message_id):
                    inbox.discard(work)
                raise
            finally:
                opened.close()  # filled and closed already, unless that failed first
        except InboxUnavailableError:
            raise  # passes once space is freed or the folder writable: the peer resends
        except DeliveryError as exc:  # needs the administrator: the sender is told now
            self._log.error("delivery.failed", peer=peer.name, error=exc.message, fix=exc.fix)
            raise Refused(
                Disposition.UNEXPECTED_ERROR, EventType.MESSAGE_REJECTED, str(exc)
            ) from exc
        # From here on the document is in the inbox: whatever fails, it is never released
        # nor written again (the resend, or the next start, settles it).  An OSError
        # is answered 503 (see unavailable()): the peer resends.
        inbox.finish(work, target, self._locks.folders)
        written = audit_inbound_later(
            self._audit,
            EventType.MESSAGE_DELIVERED,
            peer.name,
            message_id,
            service=service,
            detail={"inbox_file": str(target), "size": size, "sha256": sha256},
        )
        return Delivered(target, written)

    def _choose_target(
        self, peer: Peer, message_id: str, filename: str | None, service: str | None
    ) -> Path:
        """A free name for a new document (with ``self._locks.target`` held)."""
        return inbox.choose_target(
            self._config.storage.inbox_dir,
            peer.name,
            filename,
            message_id,
            claimed=self._spool.inbound_target_claimed,
            service=service,
            services=peer.services,
        )

    def _write(
        self,
        peer: Peer,
        message_id: str,
        filename: str | None,
        service: str | None,
        payload: Callable[[], Iterable[bytes]],
        opened: inbox.WorkFile,
        target: Path,
        received: Pending,
    ) -> Path:
        """Fill the work file (held open since it was made) and link it into the inbox;
        the name it took.  Raises only before the link: DeliveryError
        (InboxUnavailableError) for a file-system error, an OSError if ``received`` could
        not be made durable."""
        work = opened.path
        try:
            inbox.fill(opened, payload())
        except OSError as exc:
            raise inbox.delivery_error(exc, target) from exc
        # The document's arrival is recorded before it arrives.  Written before the claim
        # and waited for only now, after the work file's sync: an audit fsync begun
        # meanwhile (another document's) has made it durable already, or this one
        # covers the records written since.
        received.wait()
        for _ in range(3):
            if not self._spool.inbound_holds(peer.name, message_id):
                # Stalled for so long that this node's claim ran out (or nearly): another
                # node may settle the delivery now, so this one must not link it.
                raise ClaimHeldError(
                    f"message {message_id} from peer {peer.name}: this node's claim on its "
                    "delivery ran out before the document was linked into the inbox",
                    fix="check that the spool is reachable and the node not overloaded; "
                    "the peer resends it and the node holding it answers",
                )
            try:
                inbox.link(work, target)
                return target
            except FileExistsError:
                # Something outside medgw took the name meanwhile: never replaced, another one.
                with self._locks.target:
                    target = self._choose_target(peer, message_id, filename, service)
                    self._spool.inbound_retarget(peer.name, message_id, target)
            except OSError as exc:
                raise inbox.delivery_error(exc, target) from exc
        raise DeliveryError(
            f"cannot write the received document to {target.parent}: every free name "
            "chosen for it was taken before it could be written",
            fix=f"check {target.parent}: something else creates files there",
        )

    def settle(self, record: InboundRecord) -> InboundRecord | None:
        """An interrupted delivery, claimed by this node (Spool.inbound_take,
        inbound_unfinished, inbound_take_over): if its document reached the inbox, make
        sure that is durable (its folder synced), then audited (once in this node's
        trail) and recorded; else forget it, for a resend to start afresh.  Returns the
        record as it now is (None: forgotten).  Raises OSError if the folder cannot be
        synced: the delivery stays in the middle."""
        if not inbox.landed(record.work_path, record.target_path):
            released = self._spool.inbound_release(record.peer, record.message_id)
            if released and record.work_path is not None:
                inbox.discard(record.work_path)
            return None
        # In the inbox, but perhaps not on disk: the folder's sync after the link failed
        # (that request was answered 503), or a kill cut it off.  Nothing records the
        # document delivered, nor answers the peer, before it is: an OSError leaves the
        # delivery as it is, the resend answered 503 as the first attempt was, and the
        # next resend (or start) tries again.
        inbox.sync_folder(record.target_path, self._locks.folders)
        received = datetime.fromisoformat(record.received_at)

        def delivered(event: dict[str, object]) -> bool:
            return (
                event.get("event") == EventType.MESSAGE_DELIVERED.value
                and event.get("peer") == record.peer
                and event.get("message_id") == record.message_id
            )

        if not recorded_since(self._config.storage.audit_log, received, delivered):
            self._record(
                EventType.MESSAGE_DELIVERED,
                record.peer,
                record.message_id,
                service=record.service,
                reason="put in the inbox before an interruption; recorded now",
                detail={
                    "inbox_file": str(record.target_path),
                    "size": record.size,
                    "sha256": record.sha256,
                },
            )
        self._spool.inbound_written(record.peer, record.message_id)
        return replace(record, state="written")

    def _record(self, event: EventType, peer: str, message_id: str | None, **fields: Any) -> None:
        audit_inbound(self._audit, event, peer, message_id, **fields)
