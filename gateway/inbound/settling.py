"""The received documents' receipts stored in groups: one audit fsync, one spool
transaction and one audit write for the documents ready at one moment, instead of
each of them.

A document delivered into the inbox is answered once three steps are durable, in
this order: its ``message.delivered`` record, the spool's change to "delivered" with
the receipt (and its hand-over, and the receipt's data key), then ``receipt.sent``.
Here the documents ready at the same moment take each step together, as the spool's
group commit does for its transactions (gateway.spool.groupcommit): the first one
to arrive while no group is being stored leads a group of every document waiting
then (up to ``limit``); the documents arriving while that group is stored make up
the next.  A group about to be stored waits, at most ``linger`` seconds, for the
documents already on their way through the pipeline (:meth:`ReceiptGroups.coming`)
while it is not full; with none on its way it goes at once (an idle gateway answers
as fast as before).

Each document's order of steps is as when stored alone.  A document whose own step
fails (its record could not be made durable, its receipt not sealed) fails alone:
the others of its group go on.  A group whose transaction fails is stored again one
document at a time, so that one document's failure is its own only, except when the
spool cannot be written for now (:class:`~gateway.errors.SpoolUnavailableError`: it
cannot be reached, another process holds it, its disk is full): that fails every
document of the group at once (each retry would fail too, after its own timeout).  A failed
``receipt.sent`` write fails every document of its write (the trail is one file),
as it would have failed each of them alone.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass

from gateway.atrest import Vault, storing_all
from gateway.audit import AuditEvent, AuditSink, Pending
from gateway.errors import SpoolOutcomeUnknownError, SpoolUnavailableError
from gateway.logs import Logger
from gateway.spool import InboundDelivered, Spool
from gateway.spool.records import sent_receipt_item

GROUP_LIMIT = 32  # documents stored in one group at most
GROUP_LINGER_SECONDS = 0.01  # the longest a group waits for the documents on their way


@dataclass(frozen=True)
class ReceiptToStore:
    """A delivered document's receipt, to be stored once ``recorded`` (its
    ``message.delivered``) is durable; ``sent`` is its ``receipt.sent`` record."""

    peer: str
    message_id: str
    headers: list[tuple[str, str]]
    body: bytes  # as sent (sealed here when encrypted at rest)
    handover: tuple[str, int] | None  # (content type, size): queued with the receipt
    recorded: Pending
    sent: AuditEvent


@dataclass
class _Waiting:
    receipt: ReceiptToStore
    done: bool = False
    error: BaseException | None = None


@dataclass
class Arrival:
    """A document on its way (see :meth:`ReceiptGroups.coming`); ``arrived`` once it is
    handed in."""

    arrived: bool = False


@dataclass
class _Stored:
    waiting: _Waiting
    row: InboundDelivered
    stored: bool = False


class ReceiptGroups:
    """Stores delivered documents' receipts, several at a time (see module doc)."""

    def __init__(
        self,
        spool: Spool,
        audit: AuditSink,
        log: Logger,
        vault: Vault | None,
        *,
        limit: int = GROUP_LIMIT,
        linger: float = GROUP_LINGER_SECONDS,
    ) -> None:
        self._spool = spool
        self._audit = audit
        self._log = log
        self._vault = vault
        self._limit = limit
        self._linger = linger
        self._leader = threading.Lock()  # held while a group is stored
        self._changed = threading.Condition()  # guards what follows; told of each change
        self._waiting: list[_Waiting] = []
        self._coming = 0  # documents on their way, not yet handed in

    @property
    def waiting(self) -> int:
        """Receipts handed in and not yet taken into a group (for tests)."""
        with self._changed:
            return len(self._waiting)

    @contextlib.contextmanager
    def coming(self) -> Iterator[Arrival]:
        """While this lasts, a document is on its way: a group about to be stored waits
        for it (up to ``linger`` seconds) until it is handed in with :meth:`store` (given
        the arrival yielded here), or this ends."""
        arrival = Arrival()
        with self._changed:
            self._coming += 1
        try:
            yield arrival
        finally:
            with self._changed:
                if not arrival.arrived:
                    self._coming -= 1
                    self._changed.notify_all()

    def store(self, receipt: ReceiptToStore, arrival: Arrival | None = None) -> None:
        """Return once ``receipt`` is stored and its ``receipt.sent`` written (worker
        thread); raise what kept it from being so (its ``message.delivered`` written
        before is waited for either way)."""
        waiting = _Waiting(receipt)
        with self._changed:
            self._waiting.append(waiting)
            if arrival is not None and not arrival.arrived:
                arrival.arrived = True
                self._coming -= 1
            self._changed.notify_all()
        while not waiting.done:
            with self._leader:
                if not waiting.done:  # not stored by the leader before us: lead
                    group = self._company()
                    # Ours is in it unless ``limit`` documents handed in before ours fill
                    # it (more threads hand documents in at once than a group holds):
                    # those are stored first, in their order, and ours in a later group,
                    # on a next turn of this loop; this thread never returns before.
                    assert any(one is waiting for one in group) or len(group) == self._limit
                    self._store_group(group)
        if waiting.error is not None:
            raise waiting.error

    def _company(self) -> list[_Waiting]:
        """The next group: the documents waiting once those on their way have joined
        them, or ``linger`` seconds have passed, or the group is full."""
        with self._changed:
            deadline = time.monotonic() + self._linger
            while self._coming > 0 and len(self._waiting) < self._limit:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._changed.wait(left)
            group = self._waiting[: self._limit]
            del self._waiting[: self._limit]
            return group

    def _store_group(self, group: list[_Waiting]) -> None:
        try:
            ready: list[_Waiting] = []
            for waiting in group:
                try:
                    # Each record precedes its document's change in the spool; the first
                    # wait's fsync covers the records of the others written before it.
                    waiting.receipt.recorded.wait()
                    ready.append(waiting)
                except Exception as exc:  # its own document fails, not the rest
                    waiting.error = exc
            items = [sent_receipt_item(w.receipt.peer, w.receipt.message_id) for w in ready]
            with storing_all(self._vault, items) as sealings:
                rows: list[_Stored] = []
                for waiting, sealing in zip(ready, sealings, strict=True):
                    receipt = waiting.receipt
                    try:
                        body = sealing.seal(receipt.body)
                    except Exception as exc:
                        waiting.error = exc
                        continue
                    row = InboundDelivered(
                        receipt.peer,
                        receipt.message_id,
                        receipt.headers,
                        body,
                        receipt.handover,
                        sealing.key,
                    )
                    rows.append(_Stored(waiting, row))
                self._commit(rows)
            stored = [one for one in rows if one.stored]
            for one in stored:
                self._log.info(
                    "message.delivered",
                    peer=one.row.peer,
                    message_id=one.row.message_id,
                )
            try:
                self._audit.emit_all([one.waiting.receipt.sent for one in stored])
            except Exception as exc:  # one trail: its write failed for all of them
                for one in stored:
                    one.waiting.error = exc
        except BaseException as exc:  # a defect: every document not yet answered fails
            for waiting in group:
                waiting.error = waiting.error or exc
            raise
        finally:
            for waiting in group:
                waiting.done = True

    def _commit(self, rows: list[_Stored]) -> None:
        """The rows' changes in one transaction; if it fails, each in one of its own."""
        if not rows:
            return
        try:
            self._spool.inbound_delivered_all([one.row for one in rows])
        except Exception as exc:
            if len(rows) == 1:
                rows[0].waiting.error = exc
                return
            # Each document alone, unless the spool cannot be reached, another process
            # holds it or its disk is full: that fails every transaction, and each retry
            # would hold the group (and the documents behind it) for one more timeout.  A
            # commit whose outcome is unknown is retried: storing a receipt twice changes
            # nothing.
            alone = not isinstance(exc, SpoolUnavailableError) or isinstance(
                exc, SpoolOutcomeUnknownError
            )
            self._log.warning(
                "inbound.receipt_group_failed",
                documents=len(rows),
                error=str(exc),
                action="each stored in a transaction of its own" if alone else "none stored",
            )
            for one in rows:
                if alone:
                    self._commit([one])
                else:
                    one.waiting.error = exc
            return
        for one in rows:
            one.stored = True
