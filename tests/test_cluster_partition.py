"""A node cut off from the PostgreSQL spool, still running, with a document in its outbox.

Node a takes a document in: its row (with the document's copy, a small one) is
committed, but the answer is lost with the database, which a cannot reach again
for longer than its lease, so a does not know the row exists and the file stays
in its outbox.  Node b, which reaches the database, takes the intake over and
prepares it (or holds it, about to).  When the database answers a again, a must
not take the file in a second time (two messages for one document): it leaves
the document to b and removes the file; a new document dropped under the same
name is sent.  Two spool handles on one real database act as the two nodes,
node a's through a proxy that cuts it off; the clock is injected, and the lease
runs out when the test moves it.
"""

from __future__ import annotations

import asyncio
import io
import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from pathlib import Path

import pytest

from gateway.atrest import KeyStore, Vault
from gateway.audit import AuditLog
from gateway.config import load_config
from gateway.config.spool import SpoolSettings
from gateway.demo_run import drop_file
from gateway.errors import SpoolOutcomeUnknownError, SpoolUnreachableError
from gateway.logs import make_logger
from gateway.outbound import Settings
from gateway.outbound.context import Context
from gateway.outbound.intake import OutboxIntake
from gateway.outbound.recover import Recovery
from gateway.outbound.seal import Sealer, ToSeal
from gateway.pki.demo import DemoLayout
from gateway.pki.peers import assess_peers
from gateway.spool import Claimant, OutboundState, Prepared
from gateway.spool.postgres import PostgresSettings, PostgresSpool
from tests.clocks import SetClock
from tests.helpers.audit import events
from tests.helpers.commit_cut import CommitCut

pytestmark = pytest.mark.usefixtures("postgres_server")

LEASE = 60.0


@dataclass
class Node:
    spool: PostgresSpool
    context: Context
    log: io.StringIO
    trail: Path
    audit: AuditLog

    def logged(self, event: str) -> list[dict[str, object]]:
        lines = [json.loads(line) for line in self.log.getvalue().splitlines()]
        return [line for line in lines if line.get("event") == event]


@dataclass
class Cluster:
    a: Node  # behind the cut
    b: Node
    cut: CommitCut
    clock: SetClock
    outbox: Path


@pytest.fixture
def cluster(layout: DemoLayout, postgres: PostgresSettings, tmp_path: Path) -> Iterator[Cluster]:
    assert postgres.socket_dir is not None
    cut = CommitCut(tmp_path / "cut", postgres.socket_dir, postgres.port)
    clock = SetClock(datetime.now(UTC))  # the demo's certificates are valid from now on
    config = load_config(layout.lab.config_path)
    trust = asyncio.run(assess_peers(config.peers, config.zones, at=clock.now()))
    keys = KeyStore(layout.lab.root / "shared-keys")
    nodes: list[Node] = []
    for name, settings in (
        # A lost commit's outcome is asked for this long (the proxy refusing: all of
        # it), and a new connection waits as long: ample on a loaded machine.
        ("a", replace(postgres, socket_dir=cut.socket_dir, connect_timeout=3)),
        ("b", postgres),
    ):
        spool = PostgresSpool(settings, clock, Claimant(name, LEASE), server_time=False)
        vault = Vault(keys, spool)
        vault.open()
        trail = tmp_path / f"audit-{name}.jsonl"
        log = io.StringIO()
        audit = AuditLog(trail, clock, node=name)
        context = Context(
            Settings(config, trust), spool, audit, make_logger(stream=log), clock, vault
        )
        nodes.append(Node(spool, context, log, trail, audit))
    yield Cluster(nodes[0], nodes[1], cut, clock, layout.lab.outbox_dir / "hospital")
    for node in nodes:
        node.audit.close()
        node.spool.close()
    cut.close()


def _taken_in_while_cut_off(cluster: Cluster, intake: OutboxIntake, *, in_row: bool = True) -> str:
    """Node a records the outbox's document and loses the database at that commit,
    before its answer; the Message-ID of the row recorded (``in_row``: with the
    document's copy)."""
    cluster.cut.cut("after")
    cluster.cut.refuse = True
    with pytest.raises(SpoolOutcomeUnknownError):
        asyncio.run(intake.intake_once())
    [row] = cluster.b.spool.all_outbound()
    assert (row.state, row.node) == (OutboundState.INTAKE, "a")
    # A small document's copy is kept in the row (any node can prepare it from there).
    assert (row.payload is not None) is in_row
    assert (cluster.outbox / "rx.hl7").exists()
    return row.message_id


@pytest.mark.parametrize(
    "b_did", ["sent", "holds"], ids=["taken-over-and-queued", "taken-over-not-yet-prepared"]
)
def test_a_node_cut_off_from_the_spool_does_not_take_again_what_another_node_took_over(
    cluster: Cluster, b_did: str
) -> None:
    """b took the document over while a could not reach the database: a, reaching it
    again, removes its outbox file (logged ``recovery.removed_sent_elsewhere``, naming
    b) instead of taking it in again; b's message is the only one, and it is sent (or
    prepared by b, which still holds it)."""
    a, b = cluster.a, cluster.b
    intake = OutboxIntake(a.context, Sealer(a.context))
    drop_file(cluster.outbox, "rx.hl7", b"MSH|^~\\&|LAB|prescription\r")
    message_id = _taken_in_while_cut_off(cluster, intake)

    cluster.clock.advance(LEASE + 1)  # a's claim ran out; b takes the intake over
    [taken] = b.spool.intake_take_over(8)
    peer = b.context.config.require_peer("hospital")
    if b_did == "sent":
        [queued] = Sealer(b.context).seal_and_queue_all([ToSeal(taken, peer, None)])
        assert queued.record.message_id == message_id

    cluster.cut.refuse = False  # a reaches the database again, still running
    assert asyncio.run(intake.intake_once()) == 0
    assert not (cluster.outbox / "rx.hl7").exists()
    [removed] = a.logged("recovery.removed_sent_elsewhere")
    assert (removed["message_id"], removed["node"], removed["peer"]) == (
        message_id,
        "b",
        "hospital",
    )
    if b_did == "holds":
        held = b.spool.get(message_id)
        assert held is not None and (held.state, held.node) == (OutboundState.INTAKE, "b")
        Sealer(b.context).seal_and_queue_all([ToSeal(taken, peer, None)])
    [row] = b.spool.all_outbound()
    assert (row.message_id, row.state, row.queued_by) == (message_id, OutboundState.QUEUED, "b")
    assert events(a.trail, "message.accepted") == []
    assert [e["message_id"] for e in events(b.trail, "message.accepted")] == [message_id]


def test_a_new_document_under_the_same_name_is_taken_in_by_the_node_that_was_cut_off(
    cluster: Cluster,
) -> None:
    """As above, b sent the document; meanwhile a new document was dropped under the
    same name in a's outbox.  It is another file: a takes it in, and nothing is
    removed."""
    a, b = cluster.a, cluster.b
    intake = OutboxIntake(a.context, Sealer(a.context))
    drop_file(cluster.outbox, "rx.hl7", b"MSH|^~\\&|LAB|prescription\r")
    message_id = _taken_in_while_cut_off(cluster, intake)
    cluster.clock.advance(LEASE + 1)
    [taken] = b.spool.intake_take_over(8)
    peer = b.context.config.require_peer("hospital")
    assert Sealer(b.context).seal_and_queue_all([ToSeal(taken, peer, None)])
    (cluster.outbox / "rx.hl7").unlink()
    drop_file(cluster.outbox, "rx.hl7", b"MSH|^~\\&|LAB|prescription, a new one\r")

    cluster.cut.refuse = False
    assert asyncio.run(intake.intake_once()) == 1
    assert not (cluster.outbox / "rx.hl7").exists()
    assert a.logged("recovery.removed_sent_elsewhere") == []
    rows = {r.message_id: r for r in b.spool.all_outbound()}
    assert len(rows) == 2 and rows[message_id].queued_by == "b"
    [new] = [r for r in rows.values() if r.message_id != message_id]
    assert (new.state, new.queued_by) == (OutboundState.QUEUED, "a")


def test_a_take_no_node_took_over_is_removed_and_taken_again(cluster: Cluster) -> None:
    """a reaches the database again after its lease ran out, before any other node
    took the intake over: its row is a's own failed take, removed, and the document
    is taken in once, as a new message."""
    a, b = cluster.a, cluster.b
    intake = OutboxIntake(a.context, Sealer(a.context))
    drop_file(cluster.outbox, "rx.hl7", b"MSH|^~\\&|LAB|prescription\r")
    message_id = _taken_in_while_cut_off(cluster, intake)
    cluster.clock.advance(LEASE + 1)
    cluster.cut.refuse = False
    assert asyncio.run(intake.intake_once()) == 1
    assert not (cluster.outbox / "rx.hl7").exists()
    [row] = b.spool.all_outbound()
    assert row.message_id != message_id
    assert (row.state, row.queued_by) == (OutboundState.QUEUED, "a")
    assert b.spool.intake_take_over(8) == []


@pytest.mark.parametrize("when", ["before", "after"])
def test_a_document_whose_queueing_was_cut_off_is_recorded_once_by_the_node_that_queued_it(
    cluster: Cluster, when: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Node a took the document in (its file gone from the outbox) and lost the database
    at the commit that queues it.  ``after`` the server committed it: a, reaching the
    database again, writes the ``message.accepted`` record its lost answer cut off, once.
    ``before``: a stayed cut off for longer than its lease and b took the document over
    and queued it; a leaves it to b (``message.prepared_elsewhere``) and records
    nothing of it."""
    a, b = cluster.a, cluster.b
    intake = OutboxIntake(a.context, Sealer(a.context))
    drop_file(cluster.outbox, "rx.hl7", b"MSH|^~\\&|LAB|prescription\r")
    queue = a.spool.mark_queued_all

    def cut_off(prepared: Sequence[Prepared]) -> list[str]:
        cluster.cut.cut(when)
        cluster.cut.refuse = True
        return queue(prepared)

    monkeypatch.setattr(a.spool, "mark_queued_all", cut_off)
    with pytest.raises(SpoolUnreachableError):
        asyncio.run(intake.intake_once())
    monkeypatch.setattr(a.spool, "mark_queued_all", queue)
    assert not (cluster.outbox / "rx.hl7").exists()
    [row] = b.spool.all_outbound()
    peer = b.context.config.require_peer("hospital")
    cluster.clock.advance(LEASE + 1)
    if when == "before":
        assert (row.state, row.node) == (OutboundState.INTAKE, "a")
        [taken] = b.spool.intake_take_over(8)
        assert Sealer(b.context).seal_and_queue_all([ToSeal(taken, peer, None)])
    else:
        assert (row.state, row.queued_by) == (OutboundState.QUEUED, "a")

    cluster.cut.refuse = False
    assert asyncio.run(intake.intake_once()) == 0
    assert asyncio.run(intake.intake_once()) == 0  # once: nothing more is written
    [queued] = b.spool.all_outbound()
    by = "b" if when == "before" else "a"
    assert (queued.message_id, queued.state, queued.queued_by) == (
        row.message_id,
        OutboundState.QUEUED,
        by,
    )
    accepted = {name: events(node.trail, "message.accepted") for name, node in (("a", a), ("b", b))}
    assert [e["message_id"] for e in accepted[by]] == [row.message_id]
    assert accepted["b" if by == "a" else "a"] == []
    if when == "after":
        assert accepted["a"][0]["detail"]["recorded_at_recovery"] is True
        assert a.logged("message.prepared_elsewhere") == []
    else:
        [elsewhere] = a.logged("message.prepared_elsewhere")
        assert elsewhere["message_id"] == row.message_id


def _large_claimed_by_b(cluster: Cluster, intake: OutboxIntake) -> tuple[str, bytes]:
    """A document larger than a row keeps, taken in by a while it lost the database at
    its row's commit (its copy never written); then b, starting once a's lease ran out,
    claims the intake without a copy: its Message-ID and the document."""
    document = b"MSH|^~\\&|LAB|large\r" + bytes(range(256)) * 400  # > 64 KiB: not in the row
    drop_file(cluster.outbox, "rx.hl7", document)
    message_id = _taken_in_while_cut_off(cluster, intake, in_row=False)
    cluster.clock.advance(LEASE + 1)
    [claimed] = cluster.b.spool.intake_interrupted()  # b starts
    assert claimed.message_id == message_id and not claimed.has_document
    return message_id, document


def test_a_take_another_node_holds_without_its_copy_is_taken_back_under_its_own_id(
    cluster: Cluster,
) -> None:
    """The document is larger than a row keeps: its copy was never written (a lost the
    database at the commit of its row, before copying it).  b, starting while a was cut
    off, claimed the intake a left and gives it back (it cannot reach a's outbox).  a,
    reaching the database again while b still holds it, leaves the file alone (logged
    ``recovery.intake_held_elsewhere``) instead of taking it as a new document; once
    given back, a's lease keeper takes it up under its first Message-ID."""
    a, b = cluster.a, cluster.b
    intake = OutboxIntake(a.context, Sealer(a.context))
    message_id, _ = _large_claimed_by_b(cluster, intake)

    cluster.cut.refuse = False
    for _ in range(2):  # listed, and left alone
        asyncio.run(intake.intake_once())
        assert (cluster.outbox / "rx.hl7").exists()
        assert [r.message_id for r in b.spool.all_outbound()] == [message_id]
    [held] = a.logged("recovery.intake_held_elsewhere")
    assert (held["message_id"], held["node"]) == (message_id, "b")
    assert list(a.context.waiting_intakes) == [message_id]

    assert b.spool.intake_release(message_id, "a")  # b cannot reach it: given back
    recovery = Recovery(a.context, Sealer(a.context))
    assert asyncio.run(recovery.take_back()) == 1
    assert not (cluster.outbox / "rx.hl7").exists()
    [row] = b.spool.all_outbound()
    assert (row.message_id, row.state, row.queued_by) == (message_id, OutboundState.QUEUED, "a")
    assert [e["message_id"] for e in events(a.trail, "message.accepted")] == [message_id]


@pytest.mark.parametrize("a_was", ["running", "restarted"])
def test_a_take_another_node_failed_before_preparing_it_keeps_its_file_and_is_sent(
    cluster: Cluster, a_was: str
) -> None:
    """As above, its copy never written; b claimed the intake a left and, killed before
    giving it back and started again, holds it under its own name and cannot tell the
    document is out of its reach: it fails it (its alert: the test below).  The file in
    a's outbox is then the document's only copy: a, reaching the database again (still
    ``running``, or ``restarted`` after a kill), keeps it and takes it in as a new
    message (the failed one was never prepared, and a retry cannot send it): the
    document is sent once."""
    a, b = cluster.a, cluster.b
    intake = OutboxIntake(a.context, Sealer(a.context))
    message_id, document = _large_claimed_by_b(cluster, intake)
    assert b.spool.fail_intake(message_id, "the document vanished between outbox and spool")

    cluster.cut.refuse = False
    if a_was == "restarted":
        intake = OutboxIntake(a.context, Sealer(a.context))
        asyncio.run(Recovery(a.context, Sealer(a.context)).recover())
        assert (cluster.outbox / "rx.hl7").read_bytes() == document
        assert a.context.waiting_intakes == {}
    assert asyncio.run(intake.intake_once()) == 1
    assert not (cluster.outbox / "rx.hl7").exists()
    assert a.logged("recovery.removed_sent_elsewhere") == []
    rows = {r.message_id: r for r in b.spool.all_outbound()}
    assert rows.pop(message_id).state is OutboundState.FAILED
    [sent] = rows.values()
    assert (sent.state, sent.queued_by) == (OutboundState.QUEUED, "a")
    assert [e["message_id"] for e in events(a.trail, "message.accepted")] == [sent.message_id]
    assert asyncio.run(intake.intake_once()) == 0
    assert len(b.spool.all_outbound()) == 2


def test_a_take_another_node_held_without_bodies_dir_is_failed_saying_where_it_is(
    cluster: Cluster, postgres: PostgresSettings, tmp_path: Path
) -> None:
    """Without ``[cluster] bodies_dir`` each node keeps its copies in its own state
    folder.  b, on a host of its own, claimed at its start the intake a left and was
    killed before giving it back; started again, its recovery holds it under b's name
    and cannot reach the document.  Its alert says so (and where the document is, and
    what brings it out), not that the document vanished: it did not, a takes the file
    still in its outbox in again when it reaches the database, and it is sent."""
    a, b = cluster.a, cluster.b
    intake = OutboxIntake(a.context, Sealer(a.context))
    message_id, _ = _large_claimed_by_b(cluster, intake)

    host = tmp_path / "b-host"
    storage = replace(
        b.context.config.storage,
        state_dir=host / "state",
        outbox_dir=host / "outbox",
        inbox_dir=host / "inbox",
        audit_log=host / "audit" / "audit.jsonl",
    )
    for folder in (storage.state_dir, storage.outbox_dir, storage.inbox_dir):
        folder.mkdir(parents=True)
    config = replace(b.context.config, storage=storage, spool=SpoolSettings("postgresql", postgres))
    assert config.cluster.bodies_dir is None
    trust = asyncio.run(assess_peers(config.peers, config.zones, at=cluster.clock.now()))
    trail = host / "audit" / "audit.jsonl"
    audit = AuditLog(trail, cluster.clock, node="b")
    # b's start again, on its host, where a's outbox is not (its path here is a's).
    away = tmp_path / "on-a-host-only"
    (cluster.outbox / "rx.hl7").rename(away)
    try:
        context = Context(
            Settings(config, trust),
            b.spool,
            audit,
            make_logger(stream=io.StringIO()),
            cluster.clock,
            b.context.vault,
        )
        asyncio.run(Recovery(context, Sealer(context)).recover())
    finally:
        audit.close()
        away.rename(cluster.outbox / "rx.hl7")  # the same file (its identity kept)
    [failed] = events(trail, "message.failed")
    assert failed["message_id"] == message_id and failed["severity"] == "alert"
    assert "vanished" not in failed["reason"]
    assert "neither in this node's (b) state folder nor in its outbox" in failed["reason"]
    assert "without [cluster] bodies_dir" in failed["reason"]
    assert "another node took it in" in failed["reason"]
    fix = failed["detail"]["fix"]
    assert "nothing is lost" not in fix
    assert f"medgw queue retry {message_id}" in fix and "set [cluster] bodies_dir" in fix
    assert "taken in again as a new message" in fix

    # As the fix says: a, reaching the database again, takes its outbox file in again.
    cluster.cut.refuse = False
    assert asyncio.run(intake.intake_once()) == 1
    rows = {r.message_id: r for r in b.spool.all_outbound()}
    assert rows.pop(message_id).state is OutboundState.FAILED
    [sent] = rows.values()
    assert (sent.state, sent.queued_by) == (OutboundState.QUEUED, "a")
    assert not (cluster.outbox / "rx.hl7").exists()


def test_an_own_intake_whose_file_is_gone_is_failed_saying_it_may_be_lost(
    cluster: Cluster, postgres: PostgresSettings
) -> None:
    """Only a ever ran on the spool (no bodies_dir): it took in a document larger than a
    row keeps and lost the database at its row's commit (its copy never written); the
    file was removed from its outbox meanwhile.  At a's next start its recovery holds
    its own intake and cannot reach the document, which no other node has: the alert
    must not say the document is most likely on another node and that nothing is lost;
    it names both cases and that the document may be lost, and keeps its severity."""
    a = cluster.a
    intake = OutboxIntake(a.context, Sealer(a.context))
    drop_file(cluster.outbox, "rx.hl7", b"MSH|^~\\&|LAB|large\r" + bytes(range(256)) * 400)
    message_id = _taken_in_while_cut_off(cluster, intake, in_row=False)
    (cluster.outbox / "rx.hl7").unlink()  # removed while a was cut off
    cluster.cut.refuse = False

    config = replace(a.context.config, spool=SpoolSettings("postgresql", postgres))
    assert config.cluster.bodies_dir is None
    trust = asyncio.run(assess_peers(config.peers, config.zones, at=cluster.clock.now()))
    log = make_logger(stream=io.StringIO())
    context = Context(
        Settings(config, trust), a.spool, a.audit, log, cluster.clock, a.context.vault
    )
    asyncio.run(Recovery(context, Sealer(context)).recover())

    [row] = a.spool.all_outbound()
    assert (row.message_id, row.state) == (message_id, OutboundState.FAILED)
    [failed] = events(a.trail, "message.failed")
    assert failed["message_id"] == message_id and failed["severity"] == "alert"
    reason, fix = failed["reason"], failed["detail"]["fix"]
    assert "most likely another node" not in reason
    assert "nothing is lost" not in fix
    assert "Either this node took it in" in reason and "the document is lost here" in reason
    assert "or another node took it in" in reason
    assert "if no node has it, the document is lost" in fix
