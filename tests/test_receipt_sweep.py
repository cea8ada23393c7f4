"""While running, a node removes the receipts in its own folder that no row names and
that are old enough that no settlement can still be recording them: an operator's
retry on another node of the cluster clears a receipt this node stored, and only this
node can remove its file.  A receipt being stored (its settlement's commit in flight)
is never removed.

Two nodes, a and b, on one spool (each test runs on SQLite and on PostgreSQL), each
with its own state folder; node a's lease keeper, on an injected clock.  And a real
node of a cluster on PostgreSQL, sweeping while it runs.
"""

from __future__ import annotations

import asyncio
import io
import json
import os
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path

import pytest

from gateway.audit import AuditLog
from gateway.channel.client import Response
from gateway.config import GatewayConfig, load_config
from gateway.daemon.leases import RECEIPT_SWEEP_LEASES, LeaseKeeper
from gateway.inbound import InboundProcessor
from gateway.logs import make_logger
from gateway.operations import Operations
from gateway.outbound import Outbound, Settings
from gateway.outbound.context import Context
from gateway.outbound.settle import INLINE_RECEIPT_BYTES, Answer, Settler
from gateway.outbound.sweep import SETTLING_SECONDS
from gateway.pki.demo import DemoLayout
from gateway.spool import Claimant, OutboundState, Settled, Spool
from tests.clocks import SetClock
from tests.conftest import MakeSpool, Processes
from tests.helpers.cluster import LEASE_SECONDS, add_node
from tests.helpers.postgres import PostgresServer

LEASE = 60.0
OPERATOR = "operator:root (uid 0)"


class Node:
    """One node's config (its own state folder), spool handle, log and lease keeper."""

    def __init__(self, config: GatewayConfig, spool: Spool, clock: SetClock, root: Path) -> None:
        self.config = config
        self.spool = spool
        self.stream = io.StringIO()
        log = make_logger(stream=self.stream)
        self.audit = AuditLog(root / f"audit-{spool.node}.jsonl", clock, node=spool.node)
        processor = InboundProcessor(config, spool, self.audit, log, clock)
        self.outbound = Outbound(Settings(config, {}), spool, self.audit, log, clock)
        self.keeper = LeaseKeeper(
            spool, clock, lambda: config, lambda: processor, self.outbound,
            lambda: self.audit, log, lambda: None,
        )  # fmt: skip
        self.receipts = config.storage.receipts_dir

    def removed(self) -> list[str]:
        return [
            line["file"]
            for line in map(json.loads, self.stream.getvalue().splitlines())
            if line["event"] == "recovery.removed_unrecorded_receipt"
        ]


@pytest.fixture
def two(
    layout: DemoLayout, make_spool: MakeSpool, tmp_path: Path
) -> Iterator[tuple[Node, Node, SetClock]]:
    # One clock for both nodes; the demo's certificates are valid from now on.
    clock = SetClock(datetime.now(UTC))
    config = load_config(layout.hospital.config_path)
    config = replace(config, cluster=replace(config.cluster, lease_seconds=LEASE))
    nodes = []
    for name in ("a", "b"):
        own = replace(config, storage=replace(config.storage, state_dir=tmp_path / f"state-{name}"))
        nodes.append(Node(own, make_spool(clock, Claimant(name, LEASE)), clock, tmp_path))
    yield nodes[0], nodes[1], clock
    for node in nodes:
        node.audit.close()


def _sweeps_due(a: Node, b: Node, clock: SetClock) -> None:
    """Time enough for node a's lease keeper to read its receipts folder again (both
    nodes renewing their claims meanwhile)."""
    for _ in range(RECEIPT_SWEEP_LEASES):
        clock.advance(LEASE)
        a.spool.renew_leases()
        b.spool.renew_leases()


def _aged(path: Path, clock: SetClock, seconds: float) -> None:
    at = clock.now().timestamp() - seconds
    os.utime(path, (at, at))


def _settled_by(node: Node, message_id: str, disposition: str, tmp_path: Path) -> Path:
    """A message of ``lab`` sent by ``node`` and settled by a receipt stored in its
    folder; the receipt's file."""
    spool = node.spool
    spool.add_intake(message_id, "lab", "f.hl7", "text/plain", tmp_path / "src", tmp_path / "p")
    spool.mark_queued(message_id, None, [], "mic", 3, body=b"sealed")
    [claimed], _ = spool.claim_due("lab", 2e9, 8)
    assert claimed.message_id == message_id
    receipt = node.receipts / f"p.{os.urandom(6).hex()}.mdn"
    node.receipts.mkdir(parents=True, exist_ok=True)
    receipt.write_bytes(b"Content-Type: text/plain\r\n\r\nreceipt")
    state = OutboundState.DELIVERED if disposition == "processed" else OutboundState.FAILED
    assert spool.mark_settled([Settled(message_id, state, disposition, receipt)])
    return receipt


def test_a_receipt_another_nodes_retry_cleared_is_removed_while_the_node_runs(
    two: tuple[Node, Node, SetClock], tmp_path: Path
) -> None:
    """Node a stored the receipt that failed a message; an operator retries it on node b
    (b's retry cannot reach a's folder), b sends it again and stores the receipt that
    delivers it.  Node a's lease keeper removes a's old receipt at its next sweep of
    the receipts folder, and nothing a row names, on either node."""
    a, b, clock = two
    old = _settled_by(a, "<m@hospital>", "processed/error: decryption-failed", tmp_path)
    kept = _settled_by(a, "<kept@hospital>", "processed", tmp_path)
    _aged(old, clock, 2 * SETTLING_SECONDS)  # stored long ago
    _aged(kept, clock, 2 * SETTLING_SECONDS)
    Operations(b.config, b.spool, b.audit, clock).retry("<m@hospital>", OPERATOR)
    assert old.exists()  # on a's disk: b's retry removed nothing
    [again], _ = b.spool.claim_due("lab", 2e9, 8)
    b.receipts.mkdir(parents=True, exist_ok=True)
    new = b.receipts / f"p.{os.urandom(6).hex()}.mdn"
    new.write_bytes(b"Content-Type: text/plain\r\n\r\nreceipt")
    assert b.spool.mark_settled(
        [Settled(again.message_id, OutboundState.DELIVERED, "processed", new)]
    )

    assert asyncio.run(a.keeper.sweep_receipts()) is None  # its start swept the folder
    assert old.exists()
    _sweeps_due(a, b, clock)
    assert asyncio.run(a.keeper.sweep_receipts()) == 1
    assert not old.exists()
    assert kept.exists() and new.exists()
    assert a.removed() == [old.name]
    assert asyncio.run(b.keeper.sweep_receipts()) == 0
    assert asyncio.run(a.keeper.sweep_receipts()) is None  # once in a few leases only


def test_a_receipt_being_stored_is_not_removed_while_its_settlement_commits(
    two: tuple[Node, Node, SetClock], tmp_path: Path
) -> None:
    """Node a's settler has stored a receipt (one larger than a spool row keeps: a file)
    and waits for its commit while the lease keeper sweeps: the file no row names yet
    stays, and the settlement records it.  An unrecorded receipt left from long ago goes
    in the same sweep."""
    a, b, clock = two
    spool = a.spool
    spool.add_intake("<m@hospital>", "lab", "f.hl7", "text/plain", tmp_path / "s", tmp_path / "p")
    spool.mark_queued("<m@hospital>", None, [], "mic", 3, body=b"sealed")
    [claimed], _ = spool.claim_due("lab", 2e9, 8)
    a.receipts.mkdir(parents=True, exist_ok=True)
    left = a.receipts / "left.0123456789ab.mdn"
    left.write_bytes(b"receipt")
    _aged(left, clock, SETTLING_SECONDS + 1)
    _sweeps_due(a, b, clock)

    storing, release = threading.Event(), threading.Event()
    settle = spool.mark_settled

    def held(settled: Sequence[Settled], awaiting: Sequence[str] = ()) -> list[str]:
        storing.set()  # the receipt's file is written: its commit waits for the sweep
        assert release.wait(60)
        return settle(settled, awaiting)

    spool.mark_settled = held  # type: ignore[method-assign]
    large = b"not a receipt: the message fails" + b"." * INLINE_RECEIPT_BYTES
    answer = Response(200, "text/plain", (), large)
    peer = a.config.require_peer("lab")
    context = Context(Settings(a.config, {}), spool, a.audit, make_logger(stream=a.stream), clock)
    settling = threading.Thread(
        target=lambda: Settler(context).settle_all([Answer(claimed, peer, answer)])
    )
    settling.start()
    try:
        assert storing.wait(60)
        [being_stored] = [p for p in a.receipts.iterdir() if p != left]
        assert asyncio.run(a.keeper.sweep_receipts()) == 1
        assert being_stored.exists()
        assert not left.exists() and a.removed() == [left.name]
    finally:
        release.set()
        settling.join(60)
    record = spool.get("<m@hospital>")
    assert record is not None and record.state is OutboundState.FAILED
    assert record.receipt_path == being_stored and being_stored.exists()


@pytest.mark.daemon
def test_a_running_node_sweeps_its_receipts_folder_every_few_leases(
    layout: DemoLayout, processes: Processes, postgres_server: PostgresServer
) -> None:
    """A real node of a cluster (leases of 5 s): a receipt file no row names, written an
    hour ago, is removed while it runs, without a restart; one written just now (its
    settlement may be committing) stays."""
    config = add_node(layout.lab, "lab-a", postgres_server.new_database())
    node = processes.start(config)
    receipts = load_config(config).storage.receipts_dir
    receipts.mkdir(parents=True, exist_ok=True)
    old, young = receipts / "old.0123456789ab.mdn", receipts / "young.0123456789ab.mdn"
    for path in (old, young):
        path.write_bytes(b"Content-Type: text/plain\r\n\r\nreceipt")
    at = time.time() - SETTLING_SECONDS - 60
    os.utime(old, (at, at))
    every = LEASE_SECONDS * RECEIPT_SWEEP_LEASES
    removed = node.wait_for(
        lambda line: line.get("event") == "recovery.removed_unrecorded_receipt", 6 * every
    )
    assert removed["file"] == old.name
    assert not old.exists() and young.exists()
    assert node.stop() == 0
