"""Sending: the queued messages due for a peer claimed, POSTed, retried with back-off,
expired or made dead letters; each peer has its own sender task (in the daemon), so a
slow or dead peer never delays documents to the others."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import random
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from datetime import timedelta
from typing import BinaryIO, NamedTuple

from gateway.atrest import open_bytes, open_file
from gateway.atrest.chunked import failure_of
from gateway.audit import EventType, Outcome, Severity
from gateway.channel.client import PeerClient, Response
from gateway.config import Peer
from gateway.errors import AtRestError, MedgwError, TransportError
from gateway.lostclaims import Loss, LostClaims
from gateway.outbound.batches import Batches
from gateway.outbound.context import Context
from gateway.outbound.settle import Answer, Settler, asks_async_receipt
from gateway.spool import OutboundRecord, OutboundState
from gateway.spool.records import body_item

# The most answered messages settled together: one worker-thread trip, one spool
# transaction, one audit write for them all (a group forms while the one before it is
# being settled, so an idle gateway settles each at once).
SETTLE_BATCH = 64
# Groups settled at the same moment, each in its worker thread: the receipt files and
# commits of one overlap the other's.
SETTLE_GROUPS = 2
# The longest a group of answered messages waits for the answers to the requests still
# out before it goes to its worker thread (none out: it goes at once).  Answers that
# come a few milliseconds apart then share a trip, a transaction and an audit write.
SETTLE_LINGER_SECONDS = 0.02

Ready = tuple[bytes | BinaryIO, tuple[tuple[str, str], ...]]  # the body to POST, its headers
# Why a message claimed for sending is queued again, due now, unsent: its peer's sender
# stopped before the peer took it (`medgw queue show` shows it as the last error).
INTERRUPTED = (
    "send interrupted before the peer took it (medgw stopping, the peer removed by a "
    "reload, or its sender restarted after an error); sent again when due"
)
# Why a message this node claimed went back to the queue unsent (its last error).
CLAIM_LOST = "this node's claim ran out before the send"


class _Opened(NamedTuple):
    """A small message's body opened in the trip that claimed it, and when that trip
    began (the clock's monotonic seconds): its claim runs a lease from then at least."""

    ready: Ready
    claimed_at: float


class Sender:
    """What a peer's sender task does with the messages queued for it."""

    def __init__(self, context: Context, settler: Settler) -> None:
        self._ctx = context
        self._settler = settler
        # The messages the peers have answered, settled in groups (see outbound.batches).
        self.settling = Batches(
            context, self._sent_all, SETTLE_BATCH, SETTLE_GROUPS, SETTLE_LINGER_SECONDS
        )
        # The small messages claimed with their bodies opened, until each one's send
        # takes its body (see due_for_sending); by Message-ID.
        self._opened: dict[str, _Opened] = {}
        # The claims lost in a row per message: each waits longer (see gateway.lostclaims).
        self.lost_claims = LostClaims(context.clock)

    def backoff(self, attempts: int, rng: random.Random) -> float:
        runtime = self._ctx.config.runtime
        base = min(
            runtime.retry_max_seconds, runtime.retry_initial_seconds * 2 ** max(0, attempts - 1)
        )
        return float(base * (0.5 + rng.random() / 2))  # "equal jitter"

    def send_one(
        self,
        record: OutboundRecord,
        peer: Peer,
        client: PeerClient,
        rng: random.Random,
        posted: Callable[[], None] | None = None,
    ) -> Coroutine[object, object, float]:
        """Send one message; returns 0, or how long the peer should rest after a failure.
        ``posted`` is called once the peer has taken it, before it is settled (its
        connection is free for the next message from then on).  The body opened when
        it was claimed is the send's from this call on, not from the send's first step:
        a task cancelled before that step runs none of the send's code."""
        return self._send(
            record, self._opened.pop(record.message_id, None), peer, client, rng, posted
        )

    async def _send(
        self,
        record: OutboundRecord,
        opened: _Opened | None,
        peer: Peer,
        client: PeerClient,
        rng: random.Random,
        posted: Callable[[], None] | None,
    ) -> float:
        assert record.sealed and record.mic is not None
        # The caller has marked it "sending" (so no other task or node picks it up).
        try:
            if self._ctx.claims_lost.is_set():
                await self._ctx.in_thread(functools.partial(self._claim_lost, record, unsent=True))
                return 0.0
            if opened is not None and self._fresh(opened):
                ready: Ready | None = opened.ready
            else:
                ready = await self._ctx.in_thread(self._ready, record, peer, on_cancel=_close)
        except asyncio.CancelledError:
            await self._interrupted(record, unsent=True)  # before the POST: any node sends it
            raise
        if ready is None:
            return 0.0
        body, headers = ready
        out = asyncio.Event()  # set once a byte of the request may have reached the peer
        try:
            # Its answer is on its way to the settling groups (see outbound.batches).
            with self.settling.coming():
                response = await self._while_claimed(
                    client.post(peer.url, headers, body, began=out.set)
                )
            if response is None:
                lost = functools.partial(self._claim_lost, record, unsent=not out.is_set())
                await self._ctx.in_thread(lost)
                return 0.0
            self._claim_held(record)
            # What the message itself asked for when it was signed, not the peer's
            # configuration now (a reload may have changed it while it was queued).
            awaiting = asks_async_receipt(record) and 200 <= response.status < 300
            if awaiting and not response.body.strip():
                pass  # accepted; the signed receipt will be POSTed to us later
            elif response.status != 200:
                raise TransportError(f"peer answered HTTP {response.status}")
            else:
                awaiting = False
        except TransportError as exc:
            self._claim_held(record)
            if not isinstance(body, bytes) and (failure := failure_of(body)) is not None:
                return await self._ctx.in_thread(self._unreadable, record, peer, failure)
            delay = self.backoff(record.attempts + 1, rng)
            return await self._ctx.in_thread(self._send_failed, record, peer, str(exc), delay)
        except asyncio.CancelledError:
            # Shutting down mid-send: park it; the receiver deduplicates a resend.
            await self._interrupted(record, unsent=not out.is_set())
            raise
        finally:
            if not isinstance(body, bytes):
                body.close()
        if posted is not None:
            posted()
        await self.settling.do(Answer(record, peer, response, awaiting=awaiting))
        return 0.0

    async def _interrupted(self, record: OutboundRecord, *, unsent: bool) -> None:
        """A send stopped (shutdown, reload) before the peer took the message: back to the
        queue, due now, for whichever node claims it next (a change it made meanwhile,
        such as a failure recorded, stands: then nothing changes).  ``unsent``: stopped
        before any byte of its request went out, so it does not count as an attempt
        (medgw's own stops never bring a document closer to max_attempts); one stopped
        while its request was going out counts, as the peer may have seen it."""
        await self._ctx.in_thread(
            functools.partial(
                self._ctx.spool.mark_retry, record.message_id, INTERRUPTED, 0, unsent=unsent
            )
        )

    def _fresh(self, opened: _Opened) -> bool:
        """Whether the claim of a message opened when it was claimed still has half a
        lease to spare, as :meth:`_ready` checks it: its trip began less than half a
        lease ago (a lease renewal failed meanwhile sets ``claims_lost``), so no other
        node can have taken it over.  Else it is checked again before its POST."""
        lease = self._ctx.config.cluster.lease_seconds
        return self._ctx.clock.monotonic() - opened.claimed_at < lease / 2

    def _ready(self, record: OutboundRecord, peer: Peer) -> Ready | None:
        """Right before the POST, in one worker-thread trip: the claim checked (still held
        by this node, with half a lease to spare), then the stored body opened.  None:
        not to be sent now (the claim was lost, or the body cannot be read back), which
        is recorded here.  (A small message claimed moments ago skips this trip: its
        claim's trip opened its body, see :meth:`due_for_sending`.)"""
        if not self._ctx.spool.holds_lease(record.message_id):
            self._claim_lost(record, unsent=True)
            return None
        try:
            return self._stored_body(record)
        except AtRestError as exc:
            self._unreadable(record, peer, exc)
            return None

    def _stored_body(self, record: OutboundRecord) -> Ready:
        """The AS2 body as kept at rest, opened for sending, and the headers to send it
        with (worker thread)."""
        item = body_item(record.message_id)
        if record.body is not None:
            return open_bytes(self._ctx.vault, item, record.body), record.headers
        assert record.body_path is not None
        reader = open_file(self._ctx.vault, item, record.body_path)
        size = (
            self._ctx.vault.size(item, record.body_path)
            if self._ctx.vault is not None
            else record.body_path.stat().st_size
        )
        return reader, (*record.headers, ("Content-Length", str(size)))

    def _unreadable(self, record: OutboundRecord, peer: Peer, error: AtRestError) -> float:
        """The stored body cannot be read back as it was written: never sent; the message
        fails, its stored copy kept for the operator (worker thread).  Unless this node
        no longer holds it: its asynchronous receipt settled it, or another node took it
        over (whose own read of the body decides)."""
        if not self._ctx.spool.mark_done(
            record.message_id,
            OutboundState.FAILED,
            "not-sent",
            None,
            error=error.message,
            owed=EventType.AT_REST_INTEGRITY_FAILED,
        ):
            self._settled_meanwhile(record)
            return 0.0
        self._ctx.failed(
            "message.stored_body_unreadable",
            EventType.AT_REST_INTEGRITY_FAILED,
            peer=peer.name,
            message_id=record.message_id,
            audit_reason=error.message,
            detail={"fix": error.fix} if error.fix else None,
            error=error.message,
            fix=error.fix,
        )
        return 0.0

    async def _while_claimed(self, post: Awaitable[Response]) -> Response | None:
        """The POST, stopped (None) if this node cannot renew its claims meanwhile: once
        its lease runs out another node sends the message, never both at once."""
        sending = asyncio.ensure_future(post)
        lost = asyncio.ensure_future(self._ctx.claims_lost.wait())
        try:
            await asyncio.wait({sending, lost}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            lost.cancel()
            if not sending.done():
                sending.cancel()
                await asyncio.gather(sending, return_exceptions=True)
        return None if sending.cancelled() else sending.result()

    def _claim_lost(self, record: OutboundRecord, *, unsent: bool = False) -> None:
        """This node may no longer hold the message (its lease ran out, or nearly): not
        sent now.  Queued again if it still holds it (``unsent``: no byte of its request
        went out, so not counted as an attempt), due after a back-off that grows while
        its claims keep being lost (gateway.lostclaims); else left as it is to the node
        that took it over, which sends it as due (worker thread)."""
        runtime = self._ctx.config.runtime
        key = record.message_id
        loss = self.lost_claims.next(key, runtime.retry_initial_seconds, runtime.retry_max_seconds)
        fix = (
            "check that this node reaches the spool, that its clock is right (NTP) and that "
            "[cluster] lease_seconds is longer than a send takes; the message is sent once "
            "a claim holds, by this node or another"
        )
        try:
            requeued = self._ctx.spool.mark_retry(
                key, CLAIM_LOST, self._ctx.clock.now().timestamp() + loss.delay, unsent=unsent
            )
        except MedgwError as exc:  # the spool is unreachable: the lease keeper requeues it
            # Lost all the same: the next one waits longer, and is said as any other.
            persisting = self.lost_claims.record(key, loss)
            self._ctx.log.warning(
                "message.claim_lost", peer=record.peer, message_id=key, losses=loss.count, fix=fix
            )
            self._ctx.log.warning("message.requeue_failed", error=exc.message)
            if persisting:
                self._keep_failing(record, loss, fix)
            return
        if not requeued:
            # Another node took it over (or its receipt settled it): no back-off, no count.
            self.lost_claims.forget(key)
            self._ctx.log.info(
                "message.claim_taken_over",
                peer=record.peer,
                message_id=key,
                node=self._ctx.spool.node,
            )
            return
        persisting = self.lost_claims.record(key, loss)
        self._ctx.log.warning(
            "message.claim_lost",
            peer=record.peer,
            message_id=key,
            losses=loss.count,
            retry_in_seconds=round(loss.delay, 1),
            fix=fix,
        )
        if persisting:
            self._keep_failing(record, loss, fix)

    def _keep_failing(self, record: OutboundRecord, loss: Loss, fix: str) -> None:
        self._ctx.log.error(
            "message.claims_keep_failing",
            node=self._ctx.spool.node,
            peer=record.peer,
            message_id=record.message_id,
            losses=loss.count,
            fix=fix,
        )

    def _claim_held(self, record: OutboundRecord) -> None:
        """The claim on the message held up to its POST: its lost claims start again."""
        if self.lost_claims.held(record.message_id):
            self._ctx.log.info(
                "message.claims_holding",
                node=self._ctx.spool.node,
                peer=record.peer,
                message_id=record.message_id,
            )

    def _send_failed(self, record: OutboundRecord, peer: Peer, error: str, delay: float) -> float:
        """The send failed (connection, TLS, HTTP): queue it again after ``delay``, or make
        it a dead letter after its last attempt; returns how long the peer should rest
        (worker thread)."""
        if self._settled_meanwhile(record):
            return 0.0
        if record.attempts + 1 >= self._ctx.config.runtime.max_attempts:
            self._dead_letter(record, peer, error)
            return delay
        self._ctx.spool.mark_retry(
            record.message_id,
            error,
            self._ctx.clock.now().timestamp() + delay,
            owed=EventType.MESSAGE_SEND_FAILED,
        )
        self._ctx.log.warning(
            "message.send_failed",
            peer=peer.name,
            message_id=record.message_id,
            reason=error,
            retry_in_seconds=round(delay, 1),
        )
        self._ctx.record(
            EventType.MESSAGE_SEND_FAILED,
            peer=peer.name,
            message_id=record.message_id,
            outcome=Outcome.FAILURE,
            severity=Severity.WARNING,
            reason=error,
            detail={"attempt": record.attempts + 1, "retry_in_seconds": round(delay, 1)},
        )
        return delay

    def _sent_all(self, answers: Sequence[Answer]) -> list[Exception | None]:
        """The peers took these messages: recorded as sent (one audit write), then each
        settled by the receipt in its answer, or marked awaiting the one its peer will
        POST, together (worker thread; see Settler.settle_all)."""
        self._ctx.record_all(
            [
                self._ctx.event(
                    EventType.MESSAGE_SENT,
                    peer=answer.peer.name,
                    message_id=answer.record.message_id,
                    service=answer.record.service,
                    detail={
                        "attempt": answer.record.attempts + 1,
                        "receipt": "async" if answer.awaiting else "sync",
                    },
                )
                for answer in answers
            ]
        )
        return self._settler.settle_all(answers)

    def _settled_meanwhile(self, record: OutboundRecord) -> bool:
        """Whether this node no longer holds the message it is sending: its asynchronous
        receipt has already settled it (some peers POST it before they answer the send
        itself), or another node took it over when this node's claim ran out."""
        current = self._ctx.spool.get(record.message_id)
        if current is None or (
            current.state is OutboundState.SENDING and current.node == self._ctx.spool.node
        ):
            return False
        if current.state is OutboundState.SENDING:  # by the node that took it over
            self._claim_lost(record)
            return True
        self._ctx.log.info(
            "message.settled_during_send",
            peer=record.peer,
            message_id=record.message_id,
            state=current.state.value,
        )
        return True

    async def due_for_sending(
        self, peer: Peer, now: float, free: int
    ) -> tuple[list[OutboundRecord], float | None]:
        """The peer's sender asks what to send next: expired messages and overdue
        asynchronous receipts are dealt with, then up to ``free`` due messages are
        claimed (marked sending), unless the exchange is suspended.  Returns them and
        when the next queued one is due.  One trip to a worker thread: the spool's
        transactions stay off the event loop.  Interrupted (shutdown), what was
        claimed goes back to the queue.

        The bodies of the small messages claimed (kept in the spool row) are opened in
        the same trip, so that their sends need no trip of their own before the POST:
        the claim made now is the check that :meth:`_ready` would make moments later.
        (A larger body is a file, opened by its send: nothing is held open for it.)"""
        Claimed = tuple[list[OutboundRecord], float | None, dict[str, _Opened]]

        def claim() -> Claimed:
            self.expire(peer)
            self.requeue_unanswered(peer)
            if free <= 0 or self._ctx.spool.is_suspended(peer.name):
                return [], None, {}
            began = self._ctx.clock.monotonic()
            records, next_at = self._ctx.spool.claim_due(peer.name, now, free)
            opened: dict[str, _Opened] = {}
            for record in records:
                # One that cannot be read back is read again by its send, which records why.
                with contextlib.suppress(AtRestError):
                    if record.body is not None:
                        opened[record.message_id] = _Opened(self._stored_body(record), began)
            return records, next_at, opened

        def give_back(result: Claimed) -> None:
            for record in result[0]:
                self._ctx.spool.mark_retry(record.message_id, INTERRUPTED, 0, unsent=True)

        records, next_at, opened = await self._ctx.in_thread(claim, on_cancel=give_back)
        self._opened.update(opened)
        return records, next_at

    def requeue_unanswered(self, peer: Peer) -> None:
        """Asynchronous receipts that did not come within request_timeout_seconds: resend."""
        limit = self._ctx.clock.now() - timedelta(
            seconds=self._ctx.config.runtime.request_timeout_seconds
        )
        for message_id in self._ctx.spool.requeue_unanswered(peer.name, limit.isoformat()):
            self._ctx.log.warning("message.receipt_overdue", peer=peer.name, message_id=message_id)
            self._ctx.record(
                EventType.MESSAGE_SEND_FAILED,
                peer=peer.name,
                message_id=message_id,
                outcome=Outcome.FAILURE,
                severity=Severity.WARNING,
                reason="no asynchronous receipt within request_timeout_seconds; resending "
                "(the peer answers a resend with its receipt)",
            )

    def expire(self, peer: Peer) -> None:
        for message_id in self._ctx.spool.expire_due(peer.name, self._ctx.clock.now().timestamp()):
            self._ctx.failed(
                "message.expired",
                EventType.MESSAGE_EXPIRED,
                peer=peer.name,
                message_id=message_id,
                audit_reason="not delivered before its expiry; retry or cancel it "
                "(medgw queue retry|cancel)",
            )

    def _dead_letter(self, record: OutboundRecord, peer: Peer, error: str) -> None:
        attempts = record.attempts + 1
        reason = f"{attempts} attempts failed; last: {error}"
        if not self._ctx.spool.mark_dead(record.message_id, reason):
            self._settled_meanwhile(record)  # no longer this node's: logged, not audited
            return
        self._ctx.failed(
            "message.dead",
            EventType.MESSAGE_DEAD,
            peer=peer.name,
            message_id=record.message_id,
            audit_reason=f"gave up after {attempts} attempts (max_attempts); last error: {error}",
            attempts=attempts,
            reason=error,
        )


def _close(ready: Ready | None) -> None:
    """A body opened for a send that a shutdown cancelled is closed unsent."""
    if ready is not None and not isinstance(ready[0], bytes):
        ready[0].close()
