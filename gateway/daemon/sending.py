"""The loops that move outbound messages: outbox intake, and one sender per peer."""

from __future__ import annotations

import asyncio
import functools
import random
from collections.abc import Callable

from gateway.audit import AuditEvent, EventType, Outcome, Severity
from gateway.daemon.state import PARALLEL_SENDS_PER_PEER, Parts, RuntimeState
from gateway.daemon.tasks import Tasks
from gateway.errors import MedgwError
from gateway.outbound import Outbound
from gateway.spool import OutboundRecord

PEER_IDLE_CHECK_SECONDS = 5.0
# Messages of one peer being settled (receipt stored and verified, state and audit
# recorded) after the peer took them, beside the PARALLEL_SENDS_PER_PEER being sent:
# settling no longer holds a connection, so the next send starts meanwhile.
SETTLING_PER_PEER = PARALLEL_SENDS_PER_PEER
# While some of a peer's messages are being sent, more are claimed once this many
# connections are free, several in one claim (one worker-thread trip, one transaction),
# not one at every send that ends; with none being sent, whatever is free at once.
CLAIM_AT_LEAST = PARALLEL_SENDS_PER_PEER // 2
INTAKE_ERROR_REPEAT_SECONDS = 60.0  # a lasting intake failure is logged again this often


class Senders:
    """Outbox intake and the per-peer senders, by the runtime state in force."""

    def __init__(
        self,
        state: Callable[[], RuntimeState],
        parts: Parts,
        outbound: Outbound,
        tasks: Tasks,
        rng: random.Random,
    ) -> None:
        self._state, self._outbound, self._tasks, self._rng = state, outbound, tasks, rng
        self._parts = parts
        self.peer_tasks: dict[str, asyncio.Task[None]] = {}

    async def intake_loop(self) -> None:
        """Take documents from the outbox, a round at a time.  A failure (say, the
        spool's disk is full) leaves them there and is logged when it starts, every
        INTAKE_ERROR_REPEAT_SECONDS while it lasts (not at every poll), and when it ends."""
        failing: str | None = None  # the error being reported
        said_at = 0.0
        polls = 0  # failed polls since it was last said
        while not self._tasks.stopping:
            error, fix = None, None
            try:
                await self._outbound.intake_once()
            except MedgwError as exc:
                error, fix = exc.message, exc.fix
            except OSError as exc:
                error = str(exc)
                fix = "check the outbox and state folders' permissions and free space (df -h)"
            now = self._parts.clock.monotonic()
            if error is None:
                if failing is not None:
                    self._parts.log.info("intake.recovered", failed_polls=polls)
                    failing, polls = None, 0
            elif error != failing or now - said_at >= INTAKE_ERROR_REPEAT_SECONDS:
                self._parts.log.error(
                    "intake.failed",
                    error=error,
                    fix=f"{fix}; the documents stay in the outbox until then",
                    failed_polls=polls + 1,
                )
                failing, said_at, polls = error, now, 0
            else:
                polls += 1
            # A backlog left for the next rounds is taken at once, not a poll later.
            backlog = error is None and self._outbound.outbox_waiting > 0
            await asyncio.sleep(0 if backlog else self._state().config.runtime.outbox_poll_seconds)

    def sync(self) -> None:
        """One sender task per configured peer: start new ones, stop removed ones."""
        names = {p.name for p in self._state().config.peers}
        for name in list(self.peer_tasks):
            if name not in names:
                self.peer_tasks.pop(name).cancel()
        for name in names - set(self.peer_tasks):
            self._outbound.wakeups[name] = asyncio.Event()
            self.peer_tasks[name] = asyncio.get_running_loop().create_task(
                self._tasks.supervised(
                    f"sender for peer {name}", functools.partial(self._peer_loop, name)
                )
            )

    async def stop(self, deadline: float) -> None:
        """Let sends in progress finish within ``deadline`` seconds; cancel the rest
        (send_one parks an interrupted message back in the queue)."""
        for event in self._outbound.wakeups.values():
            event.set()
        senders = list(self.peer_tasks.values())
        if senders:
            _, pending = await asyncio.wait(senders, timeout=deadline)
            for task in pending:
                task.cancel()  # send_one parks the message back in the queue
            await asyncio.gather(*pending, return_exceptions=True)

    async def _peer_loop(self, name: str) -> None:
        """Send this peer's due messages, up to PARALLEL_SENDS_PER_PEER at a time, while
        up to SETTLING_PER_PEER that the peer has taken are settled."""
        wakeup = self._outbound.wakeups[name]
        inflight: dict[asyncio.Task[float], str] = {}  # task -> Message-ID
        settling: set[str] = set()  # of those, the ones the peer has taken

        def posted(message_id: str) -> None:
            settling.add(message_id)
            wakeup.set()  # a connection is free

        # Started again after a failure: what the failed run was sending is queued again.
        # (In a worker thread: a spool database that does not answer never holds the loop.)
        for message_id in await asyncio.to_thread(self._parts.spool.requeue_interrupted, name):
            self._parts.log.info("message.requeued_after_failure", peer=name, message_id=message_id)
        resume_at = 0.0  # the whole peer rests after a transport failure
        # With no connection free, the spool is asked nothing (no worker thread, no
        # transaction) on every wakeup - a document queued, a send finished - but only
        # every PEER_IDLE_CHECK_SECONDS, for what expires meanwhile.
        checked_at: float | None = None
        next_at: float | None = None
        try:
            while not self._tasks.stopping:
                wakeup.clear()
                state = self._state()
                peer = state.config.peer(name)
                if peer is None:
                    break
                now = self._parts.clock.now().timestamp()
                free = 0
                if now >= resume_at:
                    sending = len(inflight) - len(settling)
                    free = min(
                        PARALLEL_SENDS_PER_PEER - sending,
                        PARALLEL_SENDS_PER_PEER + SETTLING_PER_PEER - len(inflight),
                    )
                    if sending > 0 and free < CLAIM_AT_LEAST:
                        free = 0  # claimed together once more are free
                if state.trust[name].unusable is not None:
                    free = 0  # said once (peer.unusable); its messages wait, unsent
                claimed: list[OutboundRecord] = []
                if free > 0 or checked_at is None or now - checked_at >= PEER_IDLE_CHECK_SECONDS:
                    claimed, next_at = await self._outbound.due_for_sending(peer, now, free)
                    checked_at = now
                for record in claimed:
                    task = asyncio.get_running_loop().create_task(
                        self._outbound.send_one(
                            record,
                            peer,
                            state.clients[name],
                            self._rng,
                            functools.partial(posted, record.message_id),
                        )
                    )
                    inflight[task] = record.message_id
                wait = PEER_IDLE_CHECK_SECONDS
                if now < resume_at:
                    wait = resume_at - now
                elif next_at is not None and next_at > now:
                    wait = min(wait, next_at - now)
                woken = asyncio.ensure_future(wakeup.wait())
                try:
                    done, _ = await asyncio.wait(
                        {*inflight, woken}, timeout=wait, return_when=asyncio.FIRST_COMPLETED
                    )
                finally:
                    # Also when this loop is cancelled in the wait (the peer removed by a
                    # reload, the daemon stopping): a waiter left pending is destroyed
                    # pending.
                    woken.cancel()
                for finished in [task for task in inflight if task in done]:
                    message_id = inflight.pop(finished)
                    settling.discard(message_id)
                    try:
                        pause = finished.result()
                    except Exception as exc:  # a defect must not stop this peer's queue
                        pause = await self._send_crashed(name, message_id, exc)
                    if pause > 0:
                        # The peer is unreachable: back off for the whole peer instead of
                        # trying every queued message in a row.
                        resume_at = max(resume_at, self._parts.clock.now().timestamp() + pause)
            if inflight:
                await asyncio.gather(*inflight, return_exceptions=True)
        finally:
            for task in inflight:
                task.cancel()  # send_one parks an interrupted message back in the queue
            if inflight:
                await asyncio.gather(*inflight, return_exceptions=True)

    async def _send_crashed(self, peer: str, message_id: str, exc: Exception) -> float:
        """An unexpected error while sending: park the message, alert, keep the queue going.
        (The spool in a worker thread: a database that does not answer never holds the loop.)"""
        delay = self._state().config.runtime.retry_max_seconds
        await asyncio.to_thread(
            functools.partial(
                self._parts.spool.mark_retry,
                message_id,
                f"internal error: {type(exc).__name__}",
                self._parts.clock.now().timestamp() + delay,
                owed=EventType.MESSAGE_SEND_FAILED,
            )
        )
        log = self._parts.log
        log.error("message.send_crashed", peer=peer, message_id=message_id, exc_info=exc)
        self._parts.audit.emit(
            AuditEvent(
                EventType.MESSAGE_SEND_FAILED,
                Outcome.FAILURE,
                Severity.ALERT,
                peer=peer,
                message_id=message_id,
                direction="outbound",
                reason=f"internal error while sending ({type(exc).__name__}); retried in "
                f"{delay:.0f} s; please report it with the daemon's log",
            )
        )
        return 0.0
