"""A peer's sender stopped while its messages are being sent: they go back to the queue
at once, due now (not left "sending" by this node until the next start, or until
another node's take-over once its lease runs out); and a stop that came before a
request's first byte went out does not count as an attempt, so medgw's own stops and
reloads never make a document a dead letter.

The sender loop is the daemon's own (gateway.daemon.sending), over the real sending
pipeline, a real spool of each backend and a real TLS client; the peer accepts the
connections and never answers, so the sends are under way when the sender stops:
its peer removed by a reload (what Daemon._swap does), or the daemon's shutdown
with its deadline passed.
"""

from __future__ import annotations

import asyncio
import gc
import io
import random
import ssl
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import pytest

from gateway.audit.log import AuditLog
from gateway.config import GatewayConfig, Peer, load_config
from gateway.daemon.sending import Senders
from gateway.daemon.state import Parts, RuntimeState, build_state
from gateway.daemon.tasks import Tasks
from gateway.demo_run import free_ports, read_audit
from gateway.egress import Network
from gateway.inbound.locks import InboundLocks
from gateway.logs import make_logger
from gateway.outbound import Outbound
from gateway.outbound.send import INTERRUPTED
from gateway.pki.demo import DemoLayout
from gateway.pki.peers import assess_peers
from gateway.spool import OutboundState, Spool
from tests.clocks import LaterClock
from tests.conftest import MakeSpool, Processes
from tests.helpers.listener import SilentPeer, silent_peer
from tests.helpers.waiting import until

DOCUMENTS = 3


@dataclass
class Sending:
    """The hospital's sending side in the test's process, with its peer (the lab); the
    senders start at the first reload that names the peer's URL.  ``reload_without_peer``
    and ``shutdown`` stop the peer's sender as a reload that removes the peer and a
    SIGTERM do."""

    layout: DemoLayout
    config: GatewayConfig  # as loaded, with the test's [runtime]
    clock: LaterClock
    spool: Spool
    audit: AuditLog
    outbound: Outbound
    states: list[RuntimeState]
    tasks: Tasks
    senders: Senders
    parts: Parts

    @property
    def peer(self) -> Peer:
        [peer] = self.config.peers
        return peer

    def with_peer_at(self, url: str | None) -> None:
        """A reload that sets the peer's URL (None: the lab's own listener); its sender
        starts, or goes on with the new URL."""
        peer = self.peer if url is None else replace(self.peer, url=url)
        self._use(replace(self.config, peers=(peer,)))

    def reload_without_peer(self) -> None:
        """A reload that removes the peer from peers.d: its sender is stopped."""
        self._use(replace(self.config, peers=()))

    def _use(self, config: GatewayConfig) -> None:
        self.states.append(replace(self.states[0], config=config))
        self.outbound.use(self.states[-1])
        self.senders.sync()

    async def shutdown(self) -> None:
        """SIGTERM with the sends in progress not ended within the stop's deadline; then
        the senders of the next run, not started yet."""
        self.tasks.stopping = True
        await self.senders.stop(0.1)
        self.tasks = Tasks(lambda: self.audit, self.parts.log, self.clock)
        self.senders = Senders(
            lambda: self.states[-1], self.parts, self.outbound, self.tasks, random.Random(1)
        )

    async def take_in(self, count: int) -> None:
        """``count`` documents for the peer dropped into the outbox, and taken in."""
        folder = self.layout.hospital.outbox_for(self.peer.name)
        folder.mkdir(parents=True, exist_ok=True)
        for number in range(count):
            (folder / f"order-{number}.hl7").write_bytes(b"MSH|^~\\&|order|%d\r" % number)
        taken = 0
        while taken < count:
            taken += await self.outbound.intake_once()

    def states_now(self) -> list[OutboundState]:
        return [r.state for r in self.spool.list_outbound()]

    def attempts(self) -> list[int]:
        return [r.attempts for r in self.spool.list_outbound()]


@asynccontextmanager
async def sending(
    layout: DemoLayout, tmp_path: Path, make_spool: MakeSpool, **runtime: Any
) -> AsyncIterator[Sending]:
    """The hospital's senders to the lab, not started; ``runtime``: settings of its
    [runtime] changed."""
    config = load_config(layout.hospital.config_path)
    config = replace(config, runtime=replace(config.runtime, **runtime))
    clock = LaterClock()
    log = make_logger(stream=io.StringIO())
    spool = make_spool(clock)
    audit = AuditLog(tmp_path / "audit.jsonl", clock, node=spool.node)
    parts = Parts(spool, audit, log, clock, Network.fixed(config.network_map), InboundLocks())
    trust = await assess_peers(config.peers, config.zones, at=clock.now())
    states = [build_state(config, trust, parts)]
    outbound = Outbound(states[0], spool, audit, log, clock)
    tasks = Tasks(lambda: audit, log, clock)
    senders = Senders(lambda: states[-1], parts, outbound, tasks, random.Random(1))
    found = Sending(layout, config, clock, spool, audit, outbound, states, tasks, senders, parts)
    try:
        yield found
    finally:
        found.tasks.stopping = True
        await found.senders.stop(0.1)
        for client in states[0].clients.values():
            await client.close()
        audit.close()


@pytest.mark.parametrize("stopped_by", ["reload", "shutdown"])
async def test_messages_being_sent_go_back_to_the_queue_when_their_sender_stops(
    layout: DemoLayout,
    tmp_path: Path,
    make_spool: MakeSpool,
    silent: SilentPeer,
    stopped_by: str,
) -> None:
    async with sending(layout, tmp_path, make_spool) as hospital:
        await hospital.take_in(DOCUMENTS)
        hospital.with_peer_at(silent.url)  # the peer's sender starts: claims them all, sends
        await until(lambda: len(silent.held) >= DOCUMENTS, f"{DOCUMENTS} connections to the peer")
        assert hospital.states_now() == [OutboundState.SENDING] * DOCUMENTS

        if stopped_by == "reload":
            hospital.reload_without_peer()
        else:
            await hospital.shutdown()
        await until(
            lambda: hospital.states_now() == [OutboundState.QUEUED] * DOCUMENTS,
            "the messages back in the queue",
        )
        for record in hospital.spool.list_outbound():
            assert record.lease_until == 0  # no claim left
            assert record.next_attempt_at == 0  # due now, for whichever node
            assert record.last_error == INTERRUPTED
            assert record.attempts == 0  # stopped in the TLS handshake: not an attempt


async def test_a_sender_stopped_by_a_reload_leaves_no_waiter_behind(
    layout: DemoLayout,
    tmp_path: Path,
    make_spool: MakeSpool,
    silent: SilentPeer,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The peer's sender is cancelled in its wait for a send or a wakeup; the wakeup's
    waiter goes with it (left pending, asyncio reports it destroyed while pending, an
    error in the daemon's log for a routine reload)."""
    async with sending(layout, tmp_path, make_spool) as hospital:
        await hospital.take_in(DOCUMENTS)
        hospital.with_peer_at(silent.url)
        await until(lambda: len(silent.held) >= DOCUMENTS, f"{DOCUMENTS} connections to the peer")
        [sender] = hospital.senders.peer_tasks.values()
        hospital.reload_without_peer()
        await asyncio.gather(sender, return_exceptions=True)
        await until(
            lambda: hospital.states_now() == [OutboundState.QUEUED] * DOCUMENTS,
            "the messages back in the queue",
        )
        waiting = [
            task
            for task in asyncio.all_tasks()
            if getattr(task.get_coro(), "__qualname__", "") == "Event.wait"
        ]
        assert waiting == []
        gc.collect()
        assert "destroyed but it is pending" not in caplog.text


async def test_stops_before_a_request_went_out_never_make_a_document_a_dead_letter(
    layout: DemoLayout,
    tmp_path: Path,
    make_spool: MakeSpool,
    silent: SilentPeer,
    processes: Processes,
) -> None:
    """max_attempts = 2: a document whose send is stopped three times before its request
    went out (a reload removing the peer, a shutdown, a reload again), then refused by
    the peer once, is sent at its retry and delivered, never a dead letter."""
    processes.start(layout.lab.config_path)
    async with sending(
        layout, tmp_path, make_spool, max_attempts=2, retry_initial_seconds=60, retry_max_seconds=60
    ) as hospital:
        await hospital.take_in(1)
        for stop in ("reload", "shutdown", "reload"):

            def sending_again(connections: int = len(silent.held)) -> bool:
                return len(silent.held) > connections and hospital.states_now() == [
                    OutboundState.SENDING
                ]

            hospital.with_peer_at(silent.url)  # added again, or started again
            await until(sending_again, "a connection to the peer")
            if stop == "reload":
                hospital.reload_without_peer()
            else:
                await hospital.shutdown()
            await until(lambda: hospital.states_now() == [OutboundState.QUEUED], "it queued again")
            assert hospital.attempts() == [0], stop

        [refusing] = free_ports(1)  # nothing listens there
        hospital.with_peer_at(f"https://127.0.0.1:{refusing}/as2")
        await until(
            lambda: "cannot connect" in (hospital.spool.list_outbound()[0].last_error or ""),
            "the refusal recorded",
        )
        [refused] = hospital.spool.list_outbound()
        assert refused.state is OutboundState.QUEUED  # 1 of 2 attempts: retried
        assert refused.attempts == 1

        hospital.with_peer_at(None)  # the lab's own listener
        hospital.clock.ahead = 60  # the retry is due
        hospital.outbound.wakeups[hospital.peer.name].set()
        await until(
            lambda: hospital.states_now() == [OutboundState.DELIVERED], "the document delivered"
        )
    records = read_audit(tmp_path / "audit.jsonl")
    assert [r["detail"]["attempt"] for r in records if r["event"] == "message.sent"] == [2]
    assert [r for r in records if r["event"] == "message.dead"] == []
    delivered = [f for f in layout.lab.inbox_dir.rglob("*") if f.is_file()]
    assert [f.read_bytes() for f in delivered] == [b"MSH|^~\\&|order|0\r"]


async def test_a_stop_while_the_request_was_going_out_counts_as_an_attempt(
    layout: DemoLayout, tmp_path: Path, make_spool: MakeSpool
) -> None:
    """The peer may have the document (a resend is answered as a duplicate): counted, so
    a run of stops in mid-request is bounded by max_attempts like failures are."""
    tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    certs = layout.lab.root / "certs"
    tls.load_cert_chain(certs / "tls.crt", certs / "tls.key")
    async with (
        silent_peer(tls) as peer,
        sending(layout, tmp_path, make_spool) as hospital,
    ):
        await hospital.take_in(1)
        hospital.with_peer_at(peer.url)
        await until(lambda: any(b"\r\n\r\n" in r for r in peer.received), "the request's headers")
        await hospital.shutdown()
        await until(lambda: hospital.states_now() == [OutboundState.QUEUED], "it queued again")
        assert hospital.attempts() == [1]
