"""The sending pipeline as the daemon holds it: one object over the steps, each in its
own module, all reading one :class:`~gateway.outbound.context.Context`."""

from __future__ import annotations

import asyncio
import functools
import random
from collections.abc import AsyncIterator, Callable, Coroutine, Mapping
from datetime import datetime
from pathlib import Path
from typing import Any

from gateway.atrest import Vault
from gateway.audit import AuditSink
from gateway.channel.client import PeerClient
from gateway.clock import Clock
from gateway.config import GatewayConfig, Peer
from gateway.intake.submit import Submission
from gateway.logs import Logger
from gateway.outbound.context import Context, Current
from gateway.outbound.intake import OutboxIntake
from gateway.outbound.recover import Recovery
from gateway.outbound.seal import Sealer
from gateway.outbound.send import Sender
from gateway.outbound.settle import Settler
from gateway.outbound.status import MessageStatus
from gateway.outbound.submit import Submissions
from gateway.outbound.sweep import SETTLING_SECONDS, remove_unrecorded_receipts
from gateway.pki.peers import PeerTrust
from gateway.spool import OutboundRecord, Spool


class Outbound:
    """outbox or local API -> sign and encrypt -> spool -> POST -> receipt."""

    def __init__(
        self,
        state: Current,
        spool: Spool,
        audit: AuditSink,
        log: Logger,
        clock: Clock,
        vault: Vault | None = None,
    ) -> None:
        self._ctx = Context(state, spool, audit, log, clock, vault)
        sealer = Sealer(self._ctx)
        status = MessageStatus(self._ctx)
        settler = Settler(self._ctx)
        self._intake = OutboxIntake(self._ctx, sealer)
        self._submissions = Submissions(self._ctx, sealer, status)
        self._status = status
        self._sealer = sealer
        self._recovery = Recovery(self._ctx, sealer)
        self._sender = Sender(self._ctx, settler)
        self._settler = settler

    def use(self, state: Current) -> None:
        """Read ``state`` from now on: a reload swaps the configuration and the trust
        judged for it together, never one without the other."""
        self._ctx.use(state)

    @property
    def config(self) -> GatewayConfig:
        return self._ctx.config

    @property
    def trust(self) -> Mapping[str, PeerTrust]:
        """Which peer certificates are acceptable now."""
        return self._ctx.trust

    @property
    def wakeups(self) -> dict[str, asyncio.Event]:
        """Each peer's sender task waits on its event for messages queued for it."""
        return self._ctx.wakeups

    @property
    def claims_lost(self) -> asyncio.Event:
        """Set while this node cannot renew its claims (its sends in progress stop)."""
        return self._ctx.claims_lost

    @property
    def shared_payloads(self) -> Path | None:
        """The folder of the documents taken in that all nodes reach (None: each node's
        are in its state folder): a dead node's there are taken over (Spool.intake_take_over)."""
        return self._ctx.shared_payloads

    def wake(self, peer: str) -> None:
        self._ctx.wake(peer)

    async def intake_once(self) -> int:
        """Take a round of the outbox's documents (each peer's first ones, the peers in
        turn); returns how many were found.  Submissions answered 503 and recorded
        after all are settled first (Submissions.settle_unknown)."""
        await self._submissions.settle_unknown()
        return await self._intake.intake_once()

    @property
    def outbox_waiting(self) -> int:
        """Documents listed in the outbox and left for the next rounds of intake."""
        return self._intake.waiting

    async def submit(self, submission: Submission, chunks: AsyncIterator[bytes]) -> dict[str, Any]:
        """Spool a document streamed from a local submitter; returns the message's view."""
        return await self._submissions.submit(submission, chunks)

    async def status(self, message_id: str, submitter: str | None = None) -> dict[str, Any] | None:
        """A message's state, who submitted it, and its receipt verified again."""
        return await self._status.status(message_id, submitter)

    async def prepare_again(self, message_id: str) -> None:
        """Sign, encrypt and queue a kept document whose preparation an operator retried."""
        await self._sealer.prepare_again(message_id)

    async def recover(self, since: datetime | None = None) -> None:
        """Finish what a previous run left half-done (after a crash or SIGKILL); the
        records a kill cut off from changes made ``since`` (None: since the trail's
        end) are written."""
        await self._recovery.recover(since)

    async def remove_unrecorded_receipts(self) -> int:
        """While running, in a worker thread: the receipts in this node's folder no row
        names, written SETTLING_SECONDS ago or more; how many were removed (sweep.py)."""
        ctx = self._ctx
        older = ctx.clock.now().timestamp() - SETTLING_SECONDS
        return await ctx.in_thread(
            functools.partial(remove_unrecorded_receipts, older_than=older),
            ctx.spool,
            ctx.log,
            ctx.receipts,
        )

    async def prepare_taken_over(self, taken: list[OutboundRecord]) -> None:
        """Sign, encrypt and queue the documents other nodes took in and left unprepared
        when their claims ran out, claimed by this node (Spool.intake_take_over)."""
        await self._recovery.take_over(taken)

    async def take_back(self) -> int:
        """Prepare the interrupted intakes of this node's outbox files that were under
        another node's claim at its start, once they come back (Recovery.take_back)."""
        return await self._recovery.take_back()

    async def due_for_sending(
        self, peer: Peer, now: float, free: int
    ) -> tuple[list[OutboundRecord], float | None]:
        """Up to ``free`` due messages of ``peer``, claimed, and when the next is due."""
        return await self._sender.due_for_sending(peer, now, free)

    def send_one(
        self,
        record: OutboundRecord,
        peer: Peer,
        client: PeerClient,
        rng: random.Random,
        posted: Callable[[], None] | None = None,
    ) -> Coroutine[object, object, float]:
        """Send one message; returns 0, or how long the peer should rest after a failure.
        ``posted``: called when the peer has taken it, before it is settled.  (Not a
        coroutine itself: what the claim opened for the send is handed over by this call,
        so a task cancelled before its first step holds nothing.)"""
        return self._sender.send_one(record, peer, client, rng, posted)

    async def receive_async_receipt(self, peer: Peer, content_type: str, body: bytes) -> str:
        """A receipt POSTed to us later: settle the message it answers."""
        return await self._settler.receive_async_receipt(peer, content_type, body)
