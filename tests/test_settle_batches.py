"""The sender's path per message: no worker-thread trip of its own before the POST (a
small message's body is opened in the trip that claims it), and the messages the peer
has answered settled in groups: one trip, one spool transaction and one audit write
for a group.

A real ``medgw run`` lab answers with signed receipts over mutual TLS; the sending
side is the real pipeline with the real spool and audit log.  The spool holds the
groups' transactions until the test has seen every message answered, which a real
peer cannot be made to do at an exact moment: with SETTLE_GROUPS groups held, the
messages answered meanwhile must be settled together, in one more group.
"""

from __future__ import annotations

import asyncio
import functools
import io
import random
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

import pytest

from gateway.audit import AuditEvent
from gateway.audit.log import AuditLog
from gateway.channel.client import PeerClient
from gateway.clock import SystemClock
from gateway.config import Peer, load_config
from gateway.demo_run import read_audit
from gateway.egress import Network
from gateway.logs import make_logger
from gateway.outbound import Outbound, Settings
from gateway.outbound.send import SETTLE_GROUPS
from gateway.outbound.status import MAX_SEALED_RECEIPT
from gateway.pki.demo import DemoLayout
from gateway.pki.peers import assess_peers
from gateway.pki.tls import client_context
from gateway.spool import OutboundRecord, OutboundState, Settled, SqliteSpool
from tests.conftest import Processes

T = TypeVar("T")
DEADLINE = 60.0
OTHERS = 5


class HeldSpool(SqliteSpool):
    """The real spool; notes each settlement and holds the first until ``release``."""

    groups: list[list[str]]
    entered: threading.Event
    release: threading.Event
    fail: bool

    def mark_settled(self, settled: Sequence[Settled], awaiting: Sequence[str] = ()) -> list[str]:
        self.groups.append([s.message_id for s in settled] + list(awaiting))
        self.entered.set()
        if not self.release.wait(DEADLINE):
            raise AssertionError("the test never let the first settlement go")
        if self.fail:
            raise OSError("disk full")
        return super().mark_settled(settled, awaiting)


class NotedAudit(AuditLog):
    """The real audit log; notes the events of each write (emit is a write of one)."""

    noted: list[list[str]]

    def emit_all(self, events: Sequence[AuditEvent]) -> None:
        self.noted.append([str(event.event) for event in events])
        super().emit_all(events)


async def _sending_side(
    layout: DemoLayout, tmp_path: Path, *, fail: bool = False
) -> tuple[Outbound, HeldSpool, NotedAudit, Peer, PeerClient]:
    config = load_config(layout.hospital.config_path)
    clock = SystemClock()
    spool = HeldSpool(tmp_path / "spool.sqlite3", clock)
    spool.groups, spool.entered, spool.release, spool.fail = (
        [],
        threading.Event(),
        threading.Event(),
        fail,
    )
    audit = NotedAudit(tmp_path / "audit.jsonl", clock, node="hospital")
    audit.noted = []
    trust = await assess_peers(config.peers, config.zones, at=clock.now())
    outbound = Outbound(
        Settings(config, trust), spool, audit, make_logger(stream=io.StringIO()), clock
    )
    [peer] = config.peers
    [zone] = [z for z in config.zones if z.name == peer.zone]
    context = client_context(
        config.tls.identity, zone.trust_anchors, trust[peer.name].tls_certificates, zone.min_version
    )
    client = PeerClient(context, 10, 30, route=Network.fixed(config.network_map).zone(zone.name))
    return outbound, spool, audit, peer, client


async def _claim(
    outbound: Outbound, peer: Peer, layout: DemoLayout, count: int
) -> list[OutboundRecord]:
    folder = layout.hospital.outbox_dir / peer.name
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        (folder / f"order-{i}.hl7").write_bytes(b"MSH|^~\\&|order %d\r" % i)
    taken = 0
    while taken < count:
        taken += await outbound.intake_once()
    claimed, _ = await outbound.due_for_sending(peer, SystemClock().now().timestamp(), count)
    assert len(claimed) == count
    return claimed


async def _until(condition: Callable[[], bool], what: str) -> None:
    deadline = asyncio.get_running_loop().time() + DEADLINE
    while not condition():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.02)


def _count_trips(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Every trip to a worker thread (asyncio.to_thread), by the function's name."""
    trips: list[str] = []
    real = asyncio.to_thread

    async def counted(function: Callable[..., T], /, *args: Any, **kwargs: Any) -> T:
        trips.append(getattr(function, "__name__", repr(function)))
        return await real(function, *args, **kwargs)

    monkeypatch.setattr(asyncio, "to_thread", counted)
    return trips


async def _send_held(
    outbound: Outbound,
    spool: HeldSpool,
    peer: Peer,
    client: PeerClient,
    records: list[OutboundRecord],
) -> list[BaseException | float]:
    """The first record sent and held in its settlement while the others are sent and
    answered; then all let go."""
    loop = asyncio.get_running_loop()
    first, *others = records
    sends = [loop.create_task(outbound.send_one(first, peer, client, random.Random(1)))]
    await _until(spool.entered.is_set, "the first settlement")
    answered: list[str] = []
    sends += [
        loop.create_task(
            outbound.send_one(
                r, peer, client, random.Random(1), functools.partial(answered.append, r.message_id)
            )
        )
        for r in others
    ]
    # ``posted`` is called right before a message joins the settling queue, with no
    # await between: once all have been, they all wait for the next group.
    await _until(lambda: len(answered) == len(others), "the other messages answered")
    spool.release.set()
    return await asyncio.wait_for(asyncio.gather(*sends, return_exceptions=True), DEADLINE)


async def test_messages_answered_together_are_settled_together(
    layout: DemoLayout, tmp_path: Path, processes: Processes, monkeypatch: pytest.MonkeyPatch
) -> None:
    processes.start(layout.lab.config_path)
    outbound, spool, audit, peer, client = await _sending_side(layout, tmp_path)
    try:
        records = await _claim(outbound, peer, layout, 1 + OTHERS)
        trips = _count_trips(monkeypatch)
        audit.noted.clear()
        results = await _send_held(outbound, spool, peer, client, records)
    finally:
        await client.close()
        spool.close()
        audit.close()
    assert results == [0.0] * (1 + OTHERS)
    first, *others = [r.message_id for r in records]
    # The others in ONE transaction (in the order their answers came).
    # The first group held; the others in at most SETTLE_GROUPS more (one held beside
    # the first, then the rest together), each message in one.
    assert spool.groups[0] == [first] and len(spool.groups) <= 1 + SETTLE_GROUPS
    assert sorted(m for group in spool.groups[1:] for m in group) == sorted(others)
    # No trip before a POST (the claim's trip, moments before, opened each body kept
    # in the spool row), one per group after.
    assert trips.count("_ready") == 0
    assert trips.count("_sent_all") == len(spool.groups)
    assert len(trips) == len(spool.groups), trips
    check = SqliteSpool(tmp_path / "spool.sqlite3", SystemClock())
    try:
        for message_id in (first, *others):
            settled = check.get(message_id)
            assert settled is not None and settled.state is OutboundState.DELIVERED
            assert settled.receipt_kept and check.stored_receipt(message_id, MAX_SEALED_RECEIPT)
    finally:
        check.close()
    verified = [r for r in read_audit(tmp_path / "audit.jsonl") if r["event"] == "receipt.received"]
    assert sorted(r["message_id"] for r in verified) == sorted((first, *others))
    assert all(r["detail"]["mic_verified"] for r in verified)
    # Each group's records in two writes: sent, then settled by their receipts.
    sizes = [len(group) for group in spool.groups]
    assert sorted(audit.noted) == sorted(
        [["message.sent"] * n for n in sizes] + [["receipt.received"] * n for n in sizes]
    )


async def test_answers_to_requests_out_together_are_settled_in_one_group(
    layout: DemoLayout, tmp_path: Path, processes: Processes, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The first answer waits for the answers to the requests still out (up to the
    linger, made longer than the test here so that the peer's pace cannot split the
    group): one trip, one transaction, one audit write per kind for them all.  A lone
    request's answer waits for nothing: with nothing else out, it is settled at once,
    long before that linger."""
    monkeypatch.setattr("gateway.outbound.send.SETTLE_LINGER_SECONDS", DEADLINE * 10)
    processes.start(layout.lab.config_path)
    outbound, spool, audit, peer, client = await _sending_side(layout, tmp_path)
    spool.release.set()  # nothing held
    loop = asyncio.get_running_loop()
    try:
        lone, *together = await _claim(outbound, peer, layout, 1 + OTHERS)
        alone = outbound.send_one(lone, peer, client, random.Random(1))
        assert await asyncio.wait_for(alone, DEADLINE) == 0.0
        assert spool.groups == [[lone.message_id]]
        trips = _count_trips(monkeypatch)
        audit.noted.clear()
        sends = [
            loop.create_task(outbound.send_one(r, peer, client, random.Random(1))) for r in together
        ]
        results = await asyncio.wait_for(asyncio.gather(*sends), DEADLINE)
    finally:
        await client.close()
        spool.close()
        audit.close()
    assert results == [0.0] * OTHERS
    assert len(spool.groups) == 2
    assert sorted(spool.groups[1]) == sorted(r.message_id for r in together)
    assert trips == ["_sent_all"]
    assert sorted(audit.noted) == [["message.sent"] * OTHERS, ["receipt.received"] * OTHERS]


async def test_a_group_whose_transaction_fails_leaves_every_message_to_be_sent_again(
    layout: DemoLayout, tmp_path: Path, processes: Processes
) -> None:
    """All or nothing: none is recorded delivered, none is audited as such; each is still
    ``sending`` (what the daemon's sender parks, or a restart queues again: the peer
    answers a resend with its original receipt)."""
    processes.start(layout.lab.config_path)
    outbound, spool, audit, peer, client = await _sending_side(layout, tmp_path, fail=True)
    try:
        records = await _claim(outbound, peer, layout, 1 + OTHERS)
        results = await _send_held(outbound, spool, peer, client, records)
    finally:
        await client.close()
        spool.close()
        audit.close()
    assert all(isinstance(r, OSError) and "disk full" in str(r) for r in results), results
    assert 2 <= len(spool.groups) <= 1 + SETTLE_GROUPS
    check = SqliteSpool(tmp_path / "spool.sqlite3", SystemClock())
    try:
        for record in records:
            after = check.get(record.message_id)
            assert after is not None and after.state is OutboundState.SENDING
    finally:
        check.close()
    recorded = [event for write in audit.noted for event in write]
    assert recorded.count("message.sent") == 1 + OTHERS
    assert "receipt.received" not in recorded
