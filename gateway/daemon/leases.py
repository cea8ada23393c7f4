"""This node's claims in the spool: renewed while it lives; the claims of nodes that
stopped, taken over once their lease runs out.

Every third of a lease the node renews all its claims in one transaction.  If it
cannot (the spool is unreachable) for half a lease, its sends in progress stop
(``Outbound.claims_lost``): by the time another node may take them over, this one
has let go.  Then it takes over the other nodes' claims whose lease ran out:
messages they were sending go back to the queue (audited ``message.taken_over``,
sent by whichever node claims them next), the documents they had taken in and
not yet prepared, kept in the spool's rows or in the bodies folder all nodes
share, are prepared here (audited ``message.taken_over``), deliveries they left
in the middle are settled here (gateway.inbound.recovery), and hand-overs to the
internal system they had taken are let go (audited ``message.taken_over``, handed
over by whichever node takes them next: gateway.delivery.http). And the documents
of this node's outbox whose intake another node held at its start are taken up
here once that claim comes back (gateway.outbound.recover).  Once a lease it also
removes the inbox work files no delivery needs that are a lease old (a node that
died and never comes back leaves them), as a start does; and every
RECEIPT_SWEEP_LEASES leases, the receipts in this node's folder no row names (an
operator's retry on another node cleared one this node stored), an hour old or more
(gateway.outbound.sweep), as a start does with all of them.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from gateway.audit import AuditEvent, AuditSink, EventType, Outcome, Severity
from gateway.clock import Clock, iso_time
from gateway.config import GatewayConfig
from gateway.errors import MedgwError
from gateway.inbound import InboundProcessor
from gateway.logs import Logger
from gateway.outbound import Outbound
from gateway.spool import HandoverRecord, OutboundRecord, OutboundState, Spool

# Documents another node took in, claimed at a time to be prepared here: a few, so
# that a node that cannot prepare them all soon leaves the rest to the others.
INTAKE_TAKE_OVER_BATCH = 16
# The receipts folder (as large as the receipts this node keeps) is read once in this
# many leases: every five minutes with the default lease.
RECEIPT_SWEEP_LEASES = 5


class LeaseKeeper:
    """Renews this node's claims and takes over those of stopped nodes."""

    def __init__(
        self,
        spool: Spool,
        clock: Clock,
        config: Callable[[], GatewayConfig],
        inbound: Callable[[], InboundProcessor],
        outbound: Outbound,
        audit: Callable[[], AuditSink],
        log: Logger,
        wake_handover: Callable[[], None],
    ) -> None:
        """``wake_handover``: tells this node's hand-over worker that there is work."""
        self._spool = spool
        self._clock = clock
        self._config = config
        self._inbound = inbound
        self._outbound = outbound
        self._audit = audit
        self._log = log
        self._wake_handover = wake_handover
        self._renewed_at = clock.monotonic()  # the claims made at start are fresh
        self._swept_at = clock.monotonic()  # the start removed the inbox's left-overs
        self._receipts_swept_at = clock.monotonic()  # and the receipts no row names
        self._failing: str | None = None
        self._claims = 0  # the claims this node held at its last renewal
        # Documents taken over here whose preparation failed part-way through a batch
        # (the spool did not answer): this node holds and renews their claims, so no
        # other node takes them; prepared first at the next round.
        self._unprepared: list[OutboundRecord] = []

    async def run(self) -> None:
        """Until cancelled: renew, then take over, every third of a lease."""
        preparing: asyncio.Task[int] | None = None
        sweeping: asyncio.Task[int | None] | None = None
        try:
            while True:
                lease = self._config().cluster.lease_seconds
                await self.renew(lease)
                try:
                    peers = await asyncio.to_thread(self.take_over)
                except MedgwError as exc:
                    if self._failing is None:  # else said once already (lease.renew_failed)
                        self._log.error("lease.take_over_failed", error=exc.message, fix=exc.fix)
                else:
                    for peer in peers:
                        if peer is None:
                            self._wake_handover()
                        else:
                            self._outbound.wake(peer)
                if preparing is None or preparing.done():
                    # Beside this loop: however long preparing them takes, renewals go on.
                    preparing = asyncio.create_task(self.prepare_taken_over())
                if sweeping is None or sweeping.done():
                    # Beside it too: a folder of many receipts takes seconds to read.
                    sweeping = asyncio.create_task(self.sweep_receipts())
                await asyncio.sleep(lease / 3)
        finally:
            for task in (preparing, sweeping):
                if task is not None:
                    task.cancel()
                    await asyncio.gather(task, return_exceptions=True)

    async def renew(self, lease: float) -> None:
        """Renew every claim of this node; after half a lease without a renewal, stop
        its sends in progress until one succeeds."""
        started = self._clock.monotonic()
        try:
            claims = await asyncio.to_thread(self._spool.renew_leases)
        except (MedgwError, OSError) as exc:
            error = exc.message if isinstance(exc, MedgwError) else str(exc)
            if error != self._failing:
                self._log.error(
                    "lease.renew_failed",
                    node=self._spool.node,
                    error=error,
                    fix="check the spool database and the network to it; after "
                    f"{lease / 2:g} s this node stops its sends, after {lease:g} s other "
                    "nodes take its messages over",
                )
                self._failing = error
        else:
            self._renewed_at = started
            self._claims = claims
            if self._failing is not None:
                self._log.info("lease.renew_recovered", node=self._spool.node)
                self._failing = None
        lost = self._outbound.claims_lost
        unrenewed = self._clock.monotonic() - self._renewed_at
        if unrenewed >= lease / 2:
            if not lost.is_set():
                self._claims_lost(lease, unrenewed)
            lost.set()
        elif lost.is_set():
            # No send of this node is in flight while its claims are lost: what they left
            # claimed (those the spool could not be told of) goes back to the queue first.
            try:
                requeued = await asyncio.to_thread(self._spool.requeue_interrupted)
            except MedgwError:
                return  # again at the next renewal
            self._log.info("lease.claims_back", node=self._spool.node, requeued=len(requeued))
            lost.clear()

    def _claims_lost(self, lease: float, unrenewed: float) -> None:
        """Said once, when this node stops its sends in progress: why, how many claims it
        held, what happens to them and what to do."""
        cause = self._failing or (
            f"the last renewal of its claims took {unrenewed:.1f} s (the spool database "
            "answered that slowly)"
        )
        self._log.error(
            "lease.claims_lost",
            node=self._spool.node,
            error=cause,
            claims=self._claims,
            unrenewed_seconds=round(unrenewed, 1),
            fix=f"check the spool database and the network to it; this node could not renew "
            f"its claims for half a lease ({lease / 2:g} s), so it stops the work of its "
            f"{self._claims} claims in progress (sends, deliveries into the inbox, hand-overs: "
            "as counted at its last renewal) before another node may take them; after a lease "
            f"({lease:g} s) other nodes take them over, or this node goes on once a renewal "
            "succeeds (lease.claims_back); nothing is sent or written twice",
        )

    async def prepare_taken_over(self) -> int:
        """The documents other nodes took in and left unprepared when their claims ran
        out (those kept in the spool, or in the shared bodies folder): claimed a few at a
        time, each audited as taken over, and prepared here; and those of this node's
        outbox another node held at its start, once given back (Outbound.take_back);
        how many."""
        count = 0
        try:
            # First the documents in this node's outbox another node held at its start.
            count += await self._outbound.take_back()
            while True:
                if self._unprepared:
                    self._unprepared = await asyncio.to_thread(self._still_held, self._unprepared)
                if not self._unprepared:
                    self._unprepared = await asyncio.to_thread(self._take_over_intake)
                    if not self._unprepared:
                        break
                while self._unprepared:
                    await self._outbound.prepare_taken_over(self._unprepared[:1])
                    self._unprepared.pop(0)
                    count += 1
        except MedgwError as exc:
            if self._failing is None:  # else said once already (lease.renew_failed)
                self._log.error("lease.take_over_failed", error=exc.message, fix=exc.fix)
        except Exception as exc:  # a defect: said here (no one awaits this task), tried again
            self._log.error(
                "lease.take_over_failed", error=f"{type(exc).__name__}: {exc}", exc_info=exc
            )
        return count

    async def sweep_receipts(self) -> int | None:
        """Once in RECEIPT_SWEEP_LEASES leases: the receipts in this node's folder no row
        names, an hour old or more, removed (gateway.outbound.sweep); how many (None: not
        yet due)."""
        now = self._clock.monotonic()
        every = self._config().cluster.lease_seconds * RECEIPT_SWEEP_LEASES
        if now - self._receipts_swept_at < every:
            return None
        self._receipts_swept_at = now
        try:
            return await self._outbound.remove_unrecorded_receipts()
        except OSError as exc:
            self._log.error(
                "lease.sweep_failed",
                error=str(exc),
                fix="check that the medgw user may read and write the receipts folder",
            )
        except MedgwError as exc:  # the spool: again at the next sweep
            if self._failing is None:  # else said once already (lease.renew_failed)
                self._log.error("lease.sweep_failed", error=exc.message, fix=exc.fix)
        except Exception as exc:  # a defect: said here (no one awaits this task)
            self._log.error(
                "lease.sweep_failed", error=f"{type(exc).__name__}: {exc}", exc_info=exc
            )
        return 0

    def _still_held(self, records: list[OutboundRecord]) -> list[OutboundRecord]:
        """Those of ``records`` still in intake and claimed by this node (a failed
        preparation may have queued or failed some before it stopped), as they were
        taken over (the node that took them in is what their preparation looks at)."""
        kept = []
        for record in records:
            now = self._spool.get(record.message_id)
            if (
                now is not None
                and now.state is OutboundState.INTAKE
                and now.node == self._spool.node
            ):
                kept.append(record)
        return kept

    def _take_over_intake(self) -> list[OutboundRecord]:
        intake = self._spool.intake_take_over(
            INTAKE_TAKE_OVER_BATCH, self._outbound.shared_payloads
        )
        for record in intake:
            self._taken_over(
                "message.taken_over",
                record,
                direction="outbound",
                reason=f"node {record.node} had taken it in and not yet signed and encrypted "
                f"it, and its claim ran out at {iso_time(record.lease_until)}; prepared by "
                f"node {self._spool.node}",
            )
        return intake

    def take_over(self) -> set[str | None]:
        """The other nodes' claims whose lease ran out: their messages queued again here,
        their deliveries settled, their hand-overs let go; returns the peers with
        messages to send, and None if there are hand-overs to make (worker thread)."""
        peers: set[str | None] = set()
        for record in self._spool.take_over_expired():
            peers.add(record.peer)
            self._taken_over(
                "message.taken_over",
                record,
                direction="outbound",
                reason=f"node {record.node} was sending it and its claim ran out at "
                f"{iso_time(record.lease_until)}; queued again by node {self._spool.node}",
            )
        settled = self._inbound().take_over()
        if settled:
            self._log.warning("delivery.taken_over", count=settled)
        self._sweep()
        for handover in self._spool.handover_take_over():
            peers.add(None)
            self._taken_over(
                "handover.taken_over",
                handover,
                direction="inbound",
                reason=f"node {handover.node} was handing it over to the internal system "
                f"and its claim ran out at {iso_time(handover.lease_until)}; let go by "
                f"node {self._spool.node}, handed over by the next node to take it",
            )
        return peers

    def _sweep(self) -> None:
        """Once a lease: the inbox work files no delivery needs, a lease old or more,
        removed (a node that died and never comes back leaves them; a start removes
        them too)."""
        now = self._clock.monotonic()
        if now - self._swept_at < self._config().cluster.lease_seconds:
            return
        self._swept_at = now
        try:
            self._inbound().sweep_work_files()
        except OSError as exc:
            self._log.error(
                "lease.sweep_failed",
                error=str(exc),
                fix="check that the medgw user may read and write the inbox folders",
            )

    def _taken_over(
        self, log_event: str, claim: OutboundRecord | HandoverRecord, *, direction: str, reason: str
    ) -> None:
        """Log and audit one claim of another node taken over here."""
        self._log.warning(
            log_event, peer=claim.peer, message_id=claim.message_id, from_node=claim.node
        )
        self._audit().emit(
            AuditEvent(
                EventType.MESSAGE_TAKEN_OVER,
                Outcome.SUCCESS,
                Severity.WARNING,
                peer=claim.peer,
                message_id=claim.message_id,
                direction=direction,
                service=claim.service,
                reason=reason,
                detail={"from_node": claim.node, "attempts": claim.attempts},
            )
        )
