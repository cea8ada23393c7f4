"""A send that fails records it off the event loop, like a send that succeeds.

Each failure of a send (the peer refuses the connection, the last attempt fails,
shutdown interrupts it) commits to the spool and writes an audit record, each
with its fsync.  On the event loop that would stall every other peer's sends
and every receive for as long as the disk takes, at the moment a peer is down
and all its queued messages fail in a row.

Real spool, real audit log, a real TLS client against a closed port and a
silent one; the spool and the audit log only note which thread wrote to them.
"""

from __future__ import annotations

import asyncio
import io
import random
import threading
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from gateway.audit import AuditEvent
from gateway.audit.log import AuditLog
from gateway.channel.client import PeerClient
from gateway.clock import SystemClock
from gateway.config import GatewayConfig, Peer, load_config
from gateway.demo_run import read_audit
from gateway.egress import Network
from gateway.logs import make_logger
from gateway.outbound import Outbound, Settings
from gateway.outbound.send import INTERRUPTED
from gateway.pki.demo import DemoLayout
from gateway.pki.peers import assess_peers
from gateway.pki.tls import client_context
from gateway.spool import OutboundRecord, OutboundState, SqliteSpool
from tests.clocks import LaterClock
from tests.helpers.listener import SilentPeer


class NotedSpool(SqliteSpool):
    """The real spool; notes the thread of each state change a failed send makes."""

    threads: list[tuple[str, int]]

    def mark_retry(self, *args: Any, **kwargs: Any) -> bool:
        self.threads.append(("mark_retry", threading.get_ident()))
        return super().mark_retry(*args, **kwargs)

    def mark_dead(self, *args: Any, **kwargs: Any) -> bool:
        self.threads.append(("mark_dead", threading.get_ident()))
        return super().mark_dead(*args, **kwargs)


class HeldSpool(NotedSpool):
    """The real spool; its check of a claim before a POST waits until ``go`` is set."""

    asked: threading.Event | None = None
    go: threading.Event | None = None

    def holds_lease(self, message_id: str) -> bool:
        if self.asked is not None and self.go is not None:
            self.asked.set()
            self.go.wait(60)
        return super().holds_lease(message_id)


class HeldClaims(NotedSpool):
    """The real spool; its claims wait, once claimed, until ``go`` is set."""

    asked: threading.Event | None = None
    go: threading.Event | None = None

    def claim_due(self, *args: Any, **kwargs: Any) -> tuple[list[OutboundRecord], float | None]:
        claimed = super().claim_due(*args, **kwargs)
        if self.asked is not None and self.go is not None:
            self.asked.set()
            self.go.wait(60)
        return claimed


class NotedReads(NotedSpool):
    """The real spool; notes the thread of each read of a message's row."""

    def get(self, message_id: str) -> OutboundRecord | None:
        self.threads.append(("get", threading.get_ident()))
        return super().get(message_id)

    def submitter(self, message_id: str) -> str | None:
        self.threads.append(("submitter", threading.get_ident()))
        return super().submitter(message_id)


class NotedAudit(AuditLog):
    """The real audit log; notes the thread of each record."""

    threads: list[tuple[str, int]]

    def emit(self, event: AuditEvent) -> None:
        self.threads.append((str(event.event), threading.get_ident()))
        super().emit(event)


async def _sender(
    layout: DemoLayout,
    tmp_path: Path,
    config: GatewayConfig,
    spool_type: type[NotedSpool] = NotedSpool,
    clock: SystemClock | None = None,
) -> tuple[Outbound, NotedSpool, NotedAudit, Peer]:
    clock = clock or SystemClock()
    spool = spool_type(tmp_path / "spool.sqlite3", clock)
    spool.threads = []
    audit = NotedAudit(tmp_path / "audit.jsonl", clock, node="hospital")
    audit.threads = []
    trust = await assess_peers(config.peers, config.zones, at=clock.now())
    outbound = Outbound(
        Settings(config, trust), spool, audit, make_logger(stream=io.StringIO()), clock
    )
    [peer] = config.peers
    return outbound, spool, audit, peer


def _client(outbound: Outbound, peer: Peer) -> PeerClient:
    config = outbound.config
    [zone] = [z for z in config.zones if z.name == peer.zone]
    context = client_context(
        config.tls.identity,
        zone.trust_anchors,
        outbound.trust[peer.name].tls_certificates,
        zone.min_version,
    )
    route = Network.fixed(config.network_map).zone(zone.name)
    return PeerClient(context, 5, 10, route=route)


async def _claim_one(outbound: Outbound, peer: Peer, layout: DemoLayout) -> OutboundRecord:
    folder = layout.hospital.outbox_dir / peer.name
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "order.hl7").write_bytes(b"MSH|^~\\&|order\r")
    assert await outbound.intake_once() == 1
    now = SystemClock().now().timestamp()
    [record], _ = await outbound.due_for_sending(peer, now, 1)
    return record


def _on_loop(noted: list[tuple[str, int]]) -> list[str]:
    loop_thread = threading.get_ident()
    return [what for what, thread in noted if thread == loop_thread]


async def test_a_refused_connection_and_the_last_attempt_are_recorded_off_the_event_loop(
    layout: DemoLayout, tmp_path: Path
) -> None:
    config = load_config(layout.hospital.config_path)  # the lab is not running: refused
    outbound, spool, audit, peer = await _sender(layout, tmp_path, config)
    client = _client(outbound, peer)
    try:
        record = await _claim_one(outbound, peer, layout)
        spool.threads.clear()
        audit.threads.clear()
        delay = await outbound.send_one(record, peer, client, random.Random(1))
        assert delay > 0
        assert ("mark_retry" in {w for w, _ in spool.threads}) and audit.threads
        assert _on_loop(spool.threads + audit.threads) == []
        again = spool.get(record.message_id)
        assert again is not None and again.state is OutboundState.QUEUED

        # The last attempt: the message becomes a dead letter, off the loop too.
        last = replace(config, runtime=replace(config.runtime, max_attempts=1))
        outbound.use(Settings(last, outbound.trust))
        later = SystemClock().now().timestamp() + 100_000
        [record], _ = await outbound.due_for_sending(peer, later, 1)
        spool.threads.clear()
        audit.threads.clear()
        await outbound.send_one(record, peer, client, random.Random(1))
        assert "mark_dead" in {w for w, _ in spool.threads}
        assert "message.dead" in {w for w, _ in audit.threads}
        assert _on_loop(spool.threads + audit.threads) == []
        dead = spool.get(record.message_id)
        assert dead is not None and dead.state is OutboundState.DEAD
    finally:
        await client.close()
        spool.close()
        audit.close()
    events = [r["event"] for r in read_audit(tmp_path / "audit.jsonl")]
    assert events.count("message.send_failed") == 1 and events.count("message.dead") == 1


async def test_a_send_interrupted_by_shutdown_is_parked_off_the_event_loop(
    layout: DemoLayout, tmp_path: Path, silent: SilentPeer
) -> None:
    config = silent.sent_to(load_config(layout.hospital.config_path))
    outbound, spool, audit, peer = await _sender(layout, tmp_path, config)
    client = _client(outbound, peer)
    try:
        record = await _claim_one(outbound, peer, layout)
        spool.threads.clear()
        send = asyncio.get_running_loop().create_task(
            outbound.send_one(record, peer, client, random.Random(1))
        )
        await asyncio.wait_for(silent.accepted.wait(), 30)
        send.cancel()
        await asyncio.gather(send, return_exceptions=True)
        assert [w for w, _ in spool.threads] == ["mark_retry"]
        assert _on_loop(spool.threads) == []
        parked = spool.get(record.message_id)
        assert parked is not None and parked.state is OutboundState.QUEUED
        assert parked.attempts == 0  # stopped in the TLS handshake: not an attempt
    finally:
        await client.close()
        spool.close()
        audit.close()


async def test_a_send_stopped_before_its_post_goes_back_to_the_queue_at_once(
    layout: DemoLayout, tmp_path: Path
) -> None:
    """The daemon stops while a claimed message's claim is being checked, before its
    POST: the message is queued again, due now, for any node (not left "sending" by
    this node until its lease runs out).  (Checked before the POST: claimed, by the
    monotonic clock, more than half a lease ago.)"""
    config = load_config(layout.hospital.config_path)
    clock = LaterClock()
    outbound, spool, _, peer = await _sender(layout, tmp_path, config, HeldSpool, clock)
    assert isinstance(spool, HeldSpool)
    client = _client(outbound, peer)
    try:
        record = await _claim_one(outbound, peer, layout)
        clock.monotonic_ahead = config.cluster.lease_seconds
        spool.asked, spool.go = threading.Event(), threading.Event()
        send = asyncio.create_task(outbound.send_one(record, peer, client, random.Random(1)))
        assert await asyncio.to_thread(spool.asked.wait, 60)
        send.cancel()  # SIGTERM, the stop's deadline past
        spool.go.set()
        with pytest.raises(asyncio.CancelledError):
            await send
        again = spool.get(record.message_id)
        assert again is not None and again.state is OutboundState.QUEUED
        assert (again.last_error, again.next_attempt_at) == (INTERRUPTED, 0)
        assert again.attempts == 0  # nothing went out: not an attempt
    finally:
        await client.close()
        spool.close()


async def test_messages_claimed_as_their_sender_stops_go_back_uncounted(
    layout: DemoLayout, tmp_path: Path
) -> None:
    """The peer's sender stops while its claim is being made: what the claim took goes
    back to the queue, due now, and the claim's attempt is given back (none was made)."""
    config = load_config(layout.hospital.config_path)
    outbound, spool, _, peer = await _sender(layout, tmp_path, config, HeldClaims)
    assert isinstance(spool, HeldClaims)
    try:
        folder = layout.hospital.outbox_for(peer.name)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "order.hl7").write_bytes(b"MSH|^~\\&|order\r")
        assert await outbound.intake_once() == 1
        spool.asked, spool.go = threading.Event(), threading.Event()
        now = SystemClock().now().timestamp()
        claim = asyncio.create_task(outbound.due_for_sending(peer, now, 1))
        assert await asyncio.to_thread(spool.asked.wait, 60)
        claim.cancel()  # SIGTERM, or the peer removed by a reload
        spool.go.set()
        with pytest.raises(asyncio.CancelledError):
            await claim
        [back] = spool.list_outbound()
        assert back.state is OutboundState.QUEUED
        assert (back.last_error, back.next_attempt_at, back.attempts) == (INTERRUPTED, 0, 0)
    finally:
        spool.close()


async def test_a_send_cancelled_before_it_began_holds_no_body_opened_for_it(
    layout: DemoLayout, tmp_path: Path
) -> None:
    """A small message's body is opened in the trip that claims it, for its send to
    take; a send cancelled before its first step (its peer's sender stopping) runs none
    of its code, and the body must not stay in memory until the message is claimed
    again (which may never be on this node)."""
    config = load_config(layout.hospital.config_path)
    outbound, spool, _, peer = await _sender(layout, tmp_path, config)
    client = _client(outbound, peer)
    try:
        record = await _claim_one(outbound, peer, layout)
        assert record.body is not None  # kept in its row: opened with the claim
        opened = outbound._sender._opened
        assert list(opened) == [record.message_id]
        send = asyncio.get_running_loop().create_task(
            outbound.send_one(record, peer, client, random.Random(1))
        )
        send.cancel()
        await asyncio.gather(send, return_exceptions=True)
        assert send.cancelled()
        assert opened == {}
    finally:
        await client.close()
        spool.close()


@pytest.mark.parametrize("claimed_ago", [0.0, 0.49, 0.51])
async def test_a_claim_older_than_half_a_lease_is_checked_again_before_its_post(
    layout: DemoLayout, tmp_path: Path, claimed_ago: float
) -> None:
    """A small message is sent with the body its claim's trip opened only while that
    claim has half a lease to spare; later, it is checked again before the POST, and
    one whose claim has run that low is not sent (queued again: the node that takes it
    over, or this one, sends it).  The lab is not running: a POST is refused."""
    config = load_config(layout.hospital.config_path)
    clock = LaterClock()
    outbound, spool, audit, peer = await _sender(layout, tmp_path, config, HeldSpool, clock)
    assert isinstance(spool, HeldSpool)
    client = _client(outbound, peer)
    checked = threading.Event()
    try:
        record = await _claim_one(outbound, peer, layout)
        clock.ahead = config.cluster.lease_seconds * claimed_ago
        spool.asked, spool.go = checked, threading.Event()
        spool.go.set()
        await outbound.send_one(record, peer, client, random.Random(1))
        after = spool.get(record.message_id)
    finally:
        await client.close()
        spool.close()
        audit.close()
    assert after is not None and after.state is OutboundState.QUEUED
    assert checked.is_set() is (claimed_ago > 0.5)
    if claimed_ago > 0.5:
        assert after.last_error == "this node's claim ran out before the send"
        assert after.attempts == 0  # not sent: not an attempt
    else:
        assert after.last_error != "this node's claim ran out before the send"  # POSTed
        assert after.attempts == 1


async def test_a_preparation_an_operator_retried_reads_the_spool_off_the_event_loop(
    layout: DemoLayout, tmp_path: Path
) -> None:
    """`medgw queue retry` of a document whose preparation stopped: its row is read in a
    worker thread (a spool database that does not answer never holds the event loop,
    and with it every other peer's sends and receipts)."""
    config = load_config(layout.hospital.config_path)
    outbound, spool, audit, peer = await _sender(layout, tmp_path, config, NotedReads)
    try:
        spool.add_intake(
            "<kept@hospital>", peer.name, "order.hl7", "application/hl7-v2",
            layout.hospital.outbox_dir / peer.name / "order.hl7", tmp_path / "payload",
            zone=peer.zone, payload=b"MSH|^~\\&|order\r",
        )  # fmt: skip
        spool.threads.clear()
        await outbound.prepare_again("<kept@hospital>")
        assert {"get", "submitter"} <= {w for w, _ in spool.threads}
        assert _on_loop(spool.threads) == []
        queued = spool.get("<kept@hospital>")
        assert queued is not None and queued.state is OutboundState.QUEUED
    finally:
        spool.close()
        audit.close()
