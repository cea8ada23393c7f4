"""Claims under leases: two spool handles on one database act as two nodes.

A node claims a message (to send it, or to write a received document to the
inbox) in its name for a lease; the other node leaves a live claim alone, takes
it over once the lease ran out, and the first node, when it wakes up, finds it
no longer holds the claim and stops.  The clock is injected: leases run out
when the test moves it.
"""

from __future__ import annotations

import asyncio
import hashlib
import io
import os
import random
import re
import socket
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from pathlib import Path

import pytest

from gateway.atrest import KeyStore, Vault, open_file, storing
from gateway.audit import AuditLog
from gateway.channel.client import Response
from gateway.clock import SystemClock
from gateway.config import GatewayConfig, Peer, load_config
from gateway.daemon.leases import INTAKE_TAKE_OVER_BATCH, LeaseKeeper
from gateway.delivery.http import HandOver, idempotency_key
from gateway.delivery.inbox import work_name
from gateway.egress import Network
from gateway.errors import ClaimHeldError, SpoolUnreachableError
from gateway.fsutil import file_identity
from gateway.inbound import InboundProcessor
from gateway.inbound.exactly_once import InboxDelivery
from gateway.inbound.locks import InboundLocks
from gateway.inbound.recovery import take_over
from gateway.logs import make_logger
from gateway.outbound import Outbound, Settings
from gateway.outbound.context import Context
from gateway.outbound.seal import Sealer, ToSeal
from gateway.outbound.settle import Answer, Settler
from gateway.outbound.status import MAX_SEALED_RECEIPT
from gateway.pki.demo import DemoLayout
from gateway.pki.peers import PeerTrust, assess_peers
from gateway.spool import (
    Claimant,
    DataKey,
    HandoverRecord,
    HandoverState,
    Intake,
    OutboundRecord,
    OutboundState,
    Settled,
    Spool,
)
from gateway.spool.records import body_item, payload_item
from gateway.spool.sql import SqlStore
from gateway.spool.sqlite import SqliteSpool
from tests.clocks import SetClock
from tests.conftest import MakeSpool
from tests.helpers.audit import events
from tests.helpers.internal_system import InternalSystem, enable_delivery
from tests.helpers.slow_proxy import edit_every

LEASE = 60.0


@pytest.fixture
def clock() -> SetClock:
    """One clock for both nodes; time moves when the test says."""
    return SetClock(datetime(2026, 12, 5, 9, 0, tzinfo=UTC))


@pytest.fixture
def nodes(make_spool: MakeSpool, clock: SetClock) -> tuple[Spool, Spool]:
    """Two nodes, a and b, on one spool (each test runs on SQLite and on PostgreSQL)."""
    return make_spool(clock, Claimant("a", LEASE)), make_spool(clock, Claimant("b", LEASE))


def queue(spool: Spool, tmp_path: Path, message_id: str, peer: str = "lab") -> None:
    spool.add_intake(
        message_id, peer, "f.txt", "text/plain", tmp_path / "src", tmp_path / message_id
    )
    spool.mark_queued(message_id, None, [("AS2-To", peer)], "mic", 3, body=b"abc")


def test_a_live_claim_to_send_is_left_alone_and_an_expired_one_is_taken_over(
    nodes: tuple[Spool, Spool], clock: SetClock, tmp_path: Path
) -> None:
    a, b = nodes
    queue(a, tmp_path, "<m1@x>")
    a.claim_due("lab", clock.now().timestamp(), 8)
    record = b.get("<m1@x>")
    assert record is not None and record.node == "a" and record.state is OutboundState.SENDING
    assert record.lease_until == clock.now().timestamp() + LEASE

    # Node b starts (or its sender restarts): a's live claim stays a's.
    assert b.requeue_interrupted() == []
    assert b.requeue_interrupted(peer="lab") == []
    assert b.claim_due("lab", clock.now().timestamp(), 8)[0] == []
    clock.advance(LEASE - 1)
    assert b.take_over_expired() == []
    assert a.holds_lease("<m1@x>") is False  # less than half a lease left: a must not POST

    clock.advance(2)  # a's lease has run out
    [taken] = b.take_over_expired()
    assert (taken.message_id, taken.node) == ("<m1@x>", "a")
    [again], _ = b.claim_due("lab", clock.now().timestamp(), 8)
    assert again.message_id == "<m1@x>"
    assert b.holds_lease("<m1@x>") and not a.holds_lease("<m1@x>")
    # Node a wakes up: whatever it would do with its send changes nothing of b's.
    assert a.mark_retry("<m1@x>", "late", 0) is False
    assert a.mark_awaiting_receipt("<m1@x>") is False
    assert a.mark_dead("<m1@x>", "its last attempt failed") is False
    assert a.requeue_interrupted() == []
    current = a.get("<m1@x>")
    assert current is not None and current.node == "b" and current.state is OutboundState.SENDING
    assert current.attempts == 2


def _taken_over(a: Spool, b: Spool, clock: SetClock, tmp_path: Path) -> OutboundRecord:
    """A message node a claimed to send, taken over by node b once a's lease ran out, and
    now being sent by b; returns it as a claimed it."""
    queue(a, tmp_path, "<m@x>")
    [claimed], _ = a.claim_due("lab", clock.now().timestamp(), 8)
    clock.advance(LEASE + 1)
    assert [r.message_id for r in b.take_over_expired()] == ["<m@x>"]
    assert b.claim_due("lab", clock.now().timestamp(), 8)[0]
    return claimed


def test_a_node_whose_send_was_taken_over_does_not_settle_it(
    nodes: tuple[Spool, Spool], clock: SetClock, tmp_path: Path
) -> None:
    """Node a gets the answer to its POST after b took the message over: a's receipt
    changes nothing of b's work (state, receipt, the receipt's data key), while b sends
    it and after b settled it."""
    a, b = nodes
    _taken_over(a, b, clock, tmp_path)
    sending = b.get("<m@x>")
    assert sending is not None and sending.node == "b"
    key_a = DataKey("outbound-receipt:<m@x>", 1, b"a's key")
    late = Settled("<m@x>", OutboundState.FAILED, "mic-mismatch", tmp_path / "a.mdn", "MIC", key_a)
    assert a.mark_settled([late]) == []
    assert a.mark_done("<m@x>", OutboundState.FAILED, "not-sent", None, error="x") is False
    assert b.get("<m@x>") == sending
    assert b.data_key(key_a.item) is None
    key_b = DataKey(key_a.item, 1, b"b's key")
    mine = Settled("<m@x>", OutboundState.DELIVERED, "processed", tmp_path / "b.mdn", None, key_b)
    assert b.mark_settled([mine]) == ["<m@x>"]
    assert a.mark_settled([late]) == []
    delivered = a.get("<m@x>")
    assert delivered is not None and delivered.state is OutboundState.DELIVERED
    assert delivered.receipt_path == tmp_path / "b.mdn" and delivered.last_error is None
    assert a.data_key(key_a.item) == key_b


def test_an_asynchronous_receipt_settles_the_message_only_as_it_found_it(
    nodes: tuple[Spool, Spool], clock: SetClock, tmp_path: Path
) -> None:
    """Any node may be POSTed a receipt: it settles a message awaiting one whichever node
    sent it; a second receipt that found it awaiting too, settled after the first,
    changes nothing."""
    a, b = nodes
    queue(a, tmp_path, "<m@x>")
    a.claim_due("lab", clock.now().timestamp(), 8)
    assert a.mark_awaiting_receipt("<m@x>")
    first = Settled(
        "<m@x>", OutboundState.DELIVERED, "processed", tmp_path / "1.mdn",
        found=OutboundState.AWAITING_RECEIPT, held=False,
    )  # fmt: skip
    second = replace(first, state=OutboundState.FAILED, receipt_path=tmp_path / "2.mdn")
    assert b.mark_settled([first]) == ["<m@x>"]
    assert a.mark_settled([second]) == []
    record = a.get("<m@x>")
    assert record is not None and record.state is OutboundState.DELIVERED
    assert record.receipt_path == tmp_path / "1.mdn"


def test_an_asynchronous_receipt_that_came_before_the_posts_answer_was_recorded_settles_it(
    nodes: tuple[Spool, Spool], clock: SetClock, tmp_path: Path
) -> None:
    """The peer POSTs the receipt at once: it is read while the message is still
    ``sending``, and the sender records the empty answer to its POST (awaiting the
    receipt) before the receipt commits.  The receipt settles it all the same; a
    receipt that found it awaiting does not settle it once an operator queued it again."""
    a, b = nodes
    queue(a, tmp_path, "<m@x>")
    a.claim_due("lab", clock.now().timestamp(), 8)
    early = Settled(
        "<m@x>", OutboundState.DELIVERED, "processed", tmp_path / "1.mdn",
        found=OutboundState.SENDING, held=False,
    )  # fmt: skip
    assert a.mark_settled([], awaiting=["<m@x>"]) == ["<m@x>"]
    assert b.mark_settled([early]) == ["<m@x>"]
    record = a.get("<m@x>")
    assert record is not None and record.state is OutboundState.DELIVERED
    assert record.receipt_path == tmp_path / "1.mdn"

    queue(a, tmp_path, "<n@x>")
    a.claim_due("lab", clock.now().timestamp(), 8)
    assert a.mark_settled([], awaiting=["<n@x>"]) == ["<n@x>"]
    late = replace(early, message_id="<n@x>", found=OutboundState.AWAITING_RECEIPT)
    assert a.requeue_unanswered("lab", "2100-01-01T00:00:00") == ["<n@x>"]
    assert b.mark_settled([late]) == []
    record = a.get("<n@x>")
    assert record is not None and record.state is OutboundState.QUEUED


def test_a_node_whose_send_was_taken_over_records_nothing_of_its_answer(
    layout: DemoLayout, nodes: tuple[Spool, Spool], clock: SetClock, tmp_path: Path
) -> None:
    """The answer to node a's POST, judged after node b took the message over: not
    recorded in the audit trail (b records its own), logged, and a's receipt file goes;
    the same answer while a holds the message fails it with an alert."""
    a, b = nodes
    config = load_config(layout.hospital.config_path)
    stream = io.StringIO()
    audit = AuditLog(tmp_path / "audit-a.jsonl", clock, node="a")
    context = Context(Settings(config, {}), a, audit, make_logger(stream=stream), clock)
    settler = Settler(context)
    answer = Response(200, "text/plain", (), b"not a receipt")
    claimed = _taken_over(a, b, clock, tmp_path)
    sending = b.get("<m@x>")
    assert settler.settle_all([Answer(claimed, config.require_peer("lab"), answer)]) == [None]
    assert b.get("<m@x>") == sending
    assert events(tmp_path / "audit-a.jsonl", ("receipt.invalid", "message.failed")) == []
    assert '"event": "message.settled_elsewhere"' in stream.getvalue()
    assert list(context.receipts.iterdir()) == []
    # The control: the same answer to a message node a still holds.
    queue(a, tmp_path, "<held@x>")
    [held], _ = a.claim_due("lab", clock.now().timestamp(), 8)
    assert settler.settle_all([Answer(held, config.require_peer("lab"), answer)]) == [None]
    failed = a.get("<held@x>")
    assert failed is not None and failed.state is OutboundState.FAILED
    [alert] = events(tmp_path / "audit-a.jsonl", "receipt.invalid")
    assert alert["message_id"] == "<held@x>"
    audit.close()


def test_two_receipts_for_one_message_at_once_keep_the_recorded_one(
    layout: DemoLayout, nodes: tuple[Spool, Spool], clock: SetClock, tmp_path: Path
) -> None:
    """A peer POSTs a message's asynchronous receipt twice at once: both found it awaiting
    one.  The first settles it; the second changes nothing, is not audited, and its file
    is never stored: the row keeps the recorded receipt, and no file is left."""
    a, _ = nodes
    config = load_config(layout.hospital.config_path)
    trail = tmp_path / "audit-a.jsonl"
    audit = AuditLog(trail, clock, node="a")
    context = Context(Settings(config, {}), a, audit, make_logger(stream=io.StringIO()), clock)
    settler = Settler(context)
    queue(a, tmp_path, "<m@x>")
    a.claim_due("lab", clock.now().timestamp(), 8)
    assert a.mark_awaiting_receipt("<m@x>")
    found = a.get("<m@x>")  # as each receipt's request read it
    assert found is not None
    for body in (b"first receipt", b"second receipt"):
        settler.settle(found, config.require_peer("lab"), Response(200, "text/plain", (), body))
    settled = a.get("<m@x>")
    assert settled is not None and settled.receipt_kept and settled.receipt_path is None
    assert (a.stored_receipt("<m@x>", MAX_SEALED_RECEIPT) or b"").endswith(b"\r\n\r\nfirst receipt")
    assert list(context.receipts.iterdir()) == []
    assert [r["message_id"] for r in events(trail, "receipt.invalid")] == ["<m@x>"]
    audit.close()


def test_a_node_renewing_its_claims_keeps_them(
    nodes: tuple[Spool, Spool], clock: SetClock, tmp_path: Path
) -> None:
    a, b = nodes
    for number in range(3):
        queue(a, tmp_path, f"<m{number}@x>")
    claimed, _ = a.claim_due("lab", clock.now().timestamp(), 8)
    assert len(claimed) == 3
    for _ in range(10):  # ten leases long, renewed every third of one
        clock.advance(LEASE / 3)
        assert a.renew_leases() == 3
        assert b.take_over_expired() == []
        assert all(a.holds_lease(r.message_id) for r in claimed)
    assert b.renew_leases() == 0  # b renews only its own


def test_at_start_a_node_takes_back_its_own_interrupted_sends_only(
    nodes: tuple[Spool, Spool], clock: SetClock, tmp_path: Path, make_spool: MakeSpool
) -> None:
    a, b = nodes
    queue(a, tmp_path, "<a@x>")
    queue(a, tmp_path, "<b@x>")
    a.claim_due("lab", clock.now().timestamp(), 1)
    b.claim_due("lab", clock.now().timestamp(), 1)
    # Node a was killed and starts again (same name): its own send is queued again at
    # once, b's live one is not.
    restarted = make_spool(clock, Claimant("a", LEASE))
    assert restarted.requeue_interrupted() == ["<a@x>"]
    held = restarted.get("<b@x>")
    assert held is not None and held.state is OutboundState.SENDING and held.node == "b"


def test_a_node_starting_leaves_another_nodes_expired_sends_to_its_lease_keeper(
    layout: DemoLayout, nodes: tuple[Spool, Spool], clock: SetClock, tmp_path: Path
) -> None:
    """Node a died sending; node b starts after a's lease ran out.  Its start (and its
    sender's) queues again only its own sends: a's is taken over by b's lease keeper,
    which audits it as ``message.taken_over`` (in b's trail, naming node a)."""
    a, b = nodes
    queue(a, tmp_path, "<e@x>")
    a.claim_due("lab", clock.now().timestamp(), 8)
    clock.advance(LEASE + 1)
    assert b.requeue_interrupted() == [] and b.requeue_interrupted(peer="lab") == []
    config = load_config(layout.hospital.config_path)
    trail = layout.hospital.root / "audit-b.jsonl"
    assert _keeper(config, b, clock, trail, io.StringIO()).take_over() == {"lab"}
    [taken] = events(trail, "message.taken_over")
    assert (taken["message_id"], taken["detail"]["from_node"]) == ("<e@x>", "a")
    record = b.get("<e@x>")
    assert record is not None and record.state is OutboundState.QUEUED


def test_a_claim_made_before_nodes_were_recorded_is_taken_back_at_start(
    nodes: tuple[Spool, Spool], tmp_path: Path
) -> None:
    """An upgraded single-node spool: a message being sent by the old version has no
    node; the next start queues it again."""
    a, _ = nodes
    queue(a, tmp_path, "<old@x>")
    assert isinstance(a, SqlStore)
    # As the older version left it:
    a._write("UPDATE outbound SET state='sending', node=NULL, lease_until=0", ())
    assert a.requeue_interrupted() == ["<old@x>"]


def test_the_intake_a_node_left_is_its_own_to_finish_while_it_lives(
    nodes: tuple[Spool, Spool], clock: SetClock, tmp_path: Path
) -> None:
    """A document taken in but not yet signed is in its node's own state folder: only
    that node prepares it while it renews its claims (a node starting must not fail
    another's live intake); once they run out (a node renamed, or gone) another takes
    it up."""
    a, b = nodes
    a.add_intake("<i@x>", "lab", "f.txt", "text/plain", tmp_path / "s", tmp_path / "p")
    assert [r.message_id for r in a.intake_interrupted()] == ["<i@x>"]
    assert b.intake_interrupted() == []
    for _ in range(4):
        clock.advance(LEASE / 3)
        assert a.renew_leases() == 1
        assert b.intake_interrupted() == []
    clock.advance(LEASE + 1)  # node a renews no more
    [left] = b.intake_interrupted()
    assert (left.message_id, left.node) == ("<i@x>", "a")


def test_an_interrupted_intake_is_claimed_by_one_node_at_a_time(
    nodes: tuple[Spool, Spool], clock: SetClock, tmp_path: Path, make_spool: MakeSpool
) -> None:
    """Two nodes starting at the same moment (b, and c: node a renamed) both find the
    intake node a left: one claims it, under a lease it renews, and prepares it; the
    other leaves it alone.  A node that cannot reach the document gives it back to the
    node that took it in; a stalled one, whose claim was taken over, stores no key."""
    a, b = nodes
    c = make_spool(clock, Claimant("c", LEASE))
    a.add_intake("<i@x>", "lab", "f.txt", "text/plain", tmp_path / "s", tmp_path / "p")
    clock.advance(LEASE + 1)  # node a died
    [taken] = b.intake_interrupted()
    assert (taken.message_id, taken.node) == ("<i@x>", "a")
    assert c.intake_interrupted() == []
    for _ in range(4):
        clock.advance(LEASE / 3)
        assert b.renew_leases() == 1
        assert c.intake_interrupted() == []
    clock.advance(LEASE + 1)  # node b stalls
    [again] = c.intake_interrupted()
    assert (again.message_id, again.node) == ("<i@x>", "b")
    key = DataKey(payload_item("<i@x>"), 1, b"wrapped by b")
    assert b.intake_renew("<i@x>", key) is False
    assert b.intake_release("<i@x>", "a") is False
    assert c.data_key(payload_item("<i@x>")) is None
    mine = DataKey(payload_item("<i@x>"), 1, b"wrapped by c")
    assert c.intake_renew("<i@x>", mine) is True
    assert c.data_key(payload_item("<i@x>")) == mine
    # Node c cannot reach the document after all (it is in node a's state folder): it
    # gives it back to node a, which takes it up the moment it starts again.
    assert c.intake_release("<i@x>", "a") is True
    held = b.get("<i@x>")
    assert held is not None and held.node == "a" and held.state is OutboundState.INTAKE
    restarted = make_spool(clock, Claimant("a", LEASE))
    [own] = restarted.intake_interrupted()
    assert own.message_id == "<i@x>"
    assert b.intake_interrupted() == [] and c.intake_interrupted() == []


def test_a_failed_take_is_not_abandoned_while_another_node_holds_it(
    nodes: tuple[Spool, Spool], clock: SetClock, tmp_path: Path
) -> None:
    """Node a, cut off from the spool, could not learn that its take was recorded; b
    took it over meanwhile (its copy is in the row).  a's removal of the take changes
    nothing while b's claim is live (b may be reading the copy: its key stays), and
    removes it, with its key, once b's claim has run out too."""
    a, b = nodes
    key = DataKey(payload_item("<t@x>"), 1, b"wrapped")
    a.add_intake(
        "<t@x>", "lab", "f.txt", "text/plain", tmp_path / "s", tmp_path / "p",
        data_key=key, payload=b"copy",
    )  # fmt: skip
    clock.advance(LEASE + 1)  # a's claim ran out
    [taken] = b.intake_take_over(8)
    assert taken.node == "a"
    assert a.abandon_intake("<t@x>") is False
    held = a.get("<t@x>")
    assert held is not None and (held.state, held.node) == (OutboundState.INTAKE, "b")
    assert a.data_key(payload_item("<t@x>")) == key
    clock.advance(LEASE + 1)  # b's claim ran out too
    assert a.abandon_intake("<t@x>") is True
    assert a.get("<t@x>") is None and a.data_key(payload_item("<t@x>")) is None
    assert a.abandon_intake("<t@x>") is False  # nothing left to remove


def test_running_nodes_take_over_a_dead_nodes_intake_kept_in_the_spool_a_few_at_a_time(
    nodes: tuple[Spool, Spool], clock: SetClock, tmp_path: Path, make_spool: MakeSpool
) -> None:
    a, b = nodes
    c = make_spool(clock, Claimant("c", LEASE))
    for number in range(5):
        a.add_intake(
            f"<k{number}@x>", "lab", "f.txt", "text/plain", tmp_path / "s", tmp_path / "p",
            payload=b"doc",
        )  # fmt: skip
        clock.advance(1)
    a.add_intake("<file@x>", "lab", "f.txt", "text/plain", tmp_path / "s", tmp_path / "p")
    assert b.intake_take_over(2) == []  # a lives
    clock.advance(LEASE + 1)
    assert [r.message_id for r in b.intake_take_over(2)] == ["<k0@x>", "<k1@x>"]
    assert [(r.message_id, r.node) for r in c.intake_take_over(8)] == [
        ("<k2@x>", "a"), ("<k3@x>", "a"), ("<k4@x>", "a"),
    ]  # fmt: skip
    assert b.intake_take_over(8) == [] and b.renew_leases() == 2
    held = c.get("<file@x>")
    assert held is not None and held.node == "a"  # only node a reaches its document
    # Each take-over is a change of its own, its message.taken_over the taker's to write.
    taken = c.get("<k2@x>")
    assert taken is not None and taken.updated_at == taken.audit_owed_at
    assert (taken.audited_by, taken.audit_owed) == ("c", "message.taken_over")
    assert held.audit_owed is None


def test_a_dead_nodes_intake_copied_into_the_shared_folder_is_taken_over_once_complete(
    nodes: tuple[Spool, Spool], clock: SetClock, tmp_path: Path
) -> None:
    """A document's copy in the folder all nodes share is taken over once its file is
    complete; one still being copied (no file yet: its document is in the dead node's
    outbox), or kept in a node's state folder, is not, and however many of those come
    first, they hold back none of the others."""
    a, b = nodes
    shared = tmp_path / "bodies" / "payloads"
    (shared / "a").mkdir(parents=True)
    (tmp_path / "state-a").mkdir()
    for number in range(INTAKE_TAKE_OVER_BATCH + 2):  # copies not written yet, oldest
        a.add_intake(
            f"<copying{number}@x>", "lab", "f.txt", "text/plain", tmp_path / "outbox" / "f",
            shared / "a" / f"copying{number}",
        )  # fmt: skip
    a.add_intake(
        "<state@x>", "lab", "f.txt", "text/plain", tmp_path / "s", tmp_path / "state-a" / "p"
    )
    # A sibling folder whose name begins as the shared folder's does is not in it.
    (tmp_path / "bodies" / "payloads-old").mkdir()
    a.add_intake(
        "<beside@x>", "lab", "f.txt", "text/plain", tmp_path / "s",
        tmp_path / "bodies" / "payloads-old" / "beside",
    )  # fmt: skip
    for name in ("state-a/p", "bodies/payloads-old/beside"):
        (tmp_path / name).write_bytes(b"copy")
    a.add_intake("<done@x>", "lab", "f.txt", "text/plain", tmp_path / "s", shared / "a" / "done")
    (shared / "a" / "done").write_bytes(b"copy")
    a.add_intake("<row@x>", "lab", "f.txt", "text/plain", tmp_path / "s", shared / "a" / "row",
                 payload=b"doc")  # fmt: skip
    clock.advance(LEASE + 1)
    # Without the shared folder (each node's copies in its state folder): only the copy
    # kept in its row.
    assert [r.message_id for r in b.intake_take_over(8)] == ["<row@x>"]
    assert [r.message_id for r in b.intake_take_over(8, shared)] == ["<done@x>"]
    for number in range(INTAKE_TAKE_OVER_BATCH + 2):
        held = b.get(f"<copying{number}@x>")
        assert held is not None and held.node == "a"
    for message_id in ("<state@x>", "<beside@x>"):
        held = b.get(message_id)
        assert held is not None and held.node == "a"
    # The copy finished after all (the node was only slow): taken over next time.
    (shared / "a" / "copying3").write_bytes(b"copy")
    [late] = b.intake_take_over(8, shared)
    assert (late.message_id, late.node) == ("<copying3@x>", "a")
    claimed = b.get("<copying3@x>")
    assert claimed is not None and claimed.node == "b"


def test_a_take_over_from_the_shared_folder_looks_only_at_the_copies_it_claims(
    nodes: tuple[Spool, Spool], clock: SetClock, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """However many of a dead node's copies wait in the shared folder, one take-over
    looks at the files of those it claims (and of the unfinished copies before them,
    more than it reads at a time here), not at all the others: it runs every third of a
    lease on every node, inside a transaction, and the folder may be on NFS."""
    a, b = nodes
    shared = tmp_path / "bodies" / "payloads"
    (shared / "a").mkdir(parents=True)
    names = [f"c{number:03}" for number in range(90)]
    for number, name in enumerate(names):
        if number >= 40:  # the oldest 40 are still being copied
            (shared / "a" / name).write_bytes(b"copy")
        a.add_intake(
            f"<{name}@x>", "lab", "f.txt", "text/plain", tmp_path / "s", shared / "a" / name
        )
    clock.advance(LEASE + 1)
    looked: list[str] = []
    is_file = Path.is_file

    def counted(path: Path) -> bool:
        if path.parent == shared / "a":
            looked.append(path.name)
        return is_file(path)

    monkeypatch.setattr(Path, "is_file", counted)
    taken = [r.message_id for r in b.intake_take_over(8, shared)]
    assert taken == [f"<{name}@x>" for name in names[40:48]]
    assert looked == names[:48]
    claimed = []
    while batch := b.intake_take_over(8, shared):
        claimed += [r.message_id for r in batch]
    assert claimed == [f"<{name}@x>" for name in names[48:]]
    for name in names[:40]:
        held = b.get(f"<{name}@x>")
        assert held is not None and held.node == "a"


def test_a_preparation_an_operator_retries_is_claimed_by_the_operators_node(
    nodes: tuple[Spool, Spool], clock: SetClock, tmp_path: Path, make_spool: MakeSpool
) -> None:
    """Node a took a document in and its preparation failed; long after, an operator
    retries it on node b, which prepares it: a node starting meanwhile leaves it to b."""
    a, b = nodes
    a.add_intake(
        "<f@x>", "lab", "f.txt", "text/plain", tmp_path / "s", tmp_path / "p", payload=b"doc"
    )
    assert a.fail_intake("<f@x>", "no certificate")
    clock.advance(10 * LEASE)
    retried = b.operator_retry("<f@x>", "operator alice", clock.now().timestamp() + 3600)
    assert retried.state is OutboundState.INTAKE
    held = a.get("<f@x>")
    assert held is not None and held.node == "b"
    starting = make_spool(clock, Claimant("c", LEASE))
    assert starting.intake_interrupted() == []
    assert b.renew_leases() == 1


@asynccontextmanager
async def _starting(
    config: GatewayConfig, make_spool: MakeSpool, clock: SetClock, trails: Mapping[str, Path]
) -> AsyncIterator[list[Outbound]]:
    """The sending side of each node of ``trails`` (its name: its audit trail), as it
    starts, the trust in the lab's peers judged now; their audit logs closed after."""
    trust = await assess_peers(config.peers, config.zones, at=clock.now())
    audits = [AuditLog(trail, clock, node=name) for name, trail in trails.items()]
    try:
        yield [
            Outbound(
                Settings(config, trust),
                make_spool(clock, Claimant(name, LEASE)),
                audit,
                make_logger(stream=io.StringIO()),
                clock,
            )
            for name, audit in zip(trails, audits, strict=True)
        ]
    finally:
        for audit in audits:
            audit.close()


def test_two_nodes_starting_at_once_prepare_an_interrupted_intake_once(
    layout: DemoLayout, make_spool: MakeSpool, clock: SetClock
) -> None:
    """Node a took a document in and died; two nodes start at the same moment, each
    recovering what the spool holds: the document is signed, encrypted and queued by
    one of them, accepted once."""
    clock.at = datetime.now(UTC)  # the demo's certificates are valid from now on
    config = load_config(layout.lab.config_path)
    [peer] = config.peers
    dead = make_spool(clock, Claimant("a", LEASE))
    document = b"MSH|^~\\&|LAB|interrupted\r"
    dead.add_intake(
        "<i@KITA-LAB>", peer.name, "i.hl7", "application/hl7-v2", layout.lab.outbox_dir / "i.hl7",
        config.storage.state_dir / "payloads" / "i", zone=peer.zone, payload=document,
    )  # fmt: skip
    clock.advance(LEASE + 1)
    trails = {name: layout.lab.root / f"audit-{name}.jsonl" for name in ("b", "c")}

    async def start_both() -> None:
        async with _starting(config, make_spool, clock, trails) as starting:
            await asyncio.gather(*(outbound.recover() for outbound in starting))

    asyncio.run(start_both())
    accepted = [e for trail in trails.values() for e in events(trail, "message.accepted")]
    assert [e["message_id"] for e in accepted] == ["<i@KITA-LAB>"]
    record = dead.get("<i@KITA-LAB>")
    assert record is not None and record.state is OutboundState.QUEUED
    assert record.node == accepted[0]["node"]


@dataclass
class TakenOver:
    """A large document node a took in (its copy in the folder the nodes share) and began
    to prepare; a lost the spool for longer than its lease, and node b took it over."""

    bodies: Path
    copy: Path
    document: bytes
    message_id: str
    peer: Peer
    as_a_had_it: OutboundRecord
    as_b_took_it: OutboundRecord
    vault: Vault
    trails: dict[str, Path]
    stream: io.StringIO
    sealer: Callable[[Spool, Mapping[str, PeerTrust] | None], Sealer]


def _large_intake_taken_over(
    layout: DemoLayout, nodes: tuple[Spool, Spool], clock: SetClock
) -> TakenOver:
    clock.at = datetime.now(UTC)  # the demo's certificates are valid from now on
    a, b = nodes
    bodies = layout.lab.root / "bodies"
    loaded = load_config(layout.lab.config_path)
    config = replace(loaded, cluster=replace(loaded.cluster, bodies_dir=bodies))
    [peer] = config.peers
    vaults = {node.node: Vault(KeyStore(layout.lab.root / "shared-keys"), node) for node in nodes}
    for vault in vaults.values():
        vault.open()
    copy = bodies / "payloads" / "a" / "large"
    copy.parent.mkdir(parents=True)
    document = b"MSH|^~\\&|LAB|large\r" + bytes(range(256)) * 400  # > 64 KiB: a body file
    message_id = "<large@KITA-LAB>"
    with storing(vaults["a"], payload_item(message_id)) as sealing:
        sealing.write(copy, [document])
        a.add_intake(
            message_id, peer.name, "l.hl7", "application/hl7-v2", layout.lab.outbox_dir / "l",
            copy, zone=peer.zone, data_key=sealing.key,
        )  # fmt: skip
    as_a_had_it = a.get(message_id)
    assert as_a_had_it is not None and as_a_had_it.node == "a"
    clock.advance(LEASE + 1)  # a lost the database for longer than its lease
    [as_b_took_it] = b.intake_take_over(8, bodies / "payloads")
    trust = asyncio.run(assess_peers(config.peers, config.zones, at=clock.now()))
    trails = {node.node: layout.lab.root / f"audit-{node.node}.jsonl" for node in nodes}
    stream = io.StringIO()

    def sealer(node: Spool, judged: Mapping[str, PeerTrust] | None = None) -> Sealer:
        audit = AuditLog(trails[node.node], clock, node=node.node)
        log = make_logger(stream=stream)
        settings = Settings(config, trust if judged is None else judged)
        return Sealer(Context(settings, node, audit, log, clock, vaults[node.node]))

    return TakenOver(
        bodies, copy, document, message_id, peer, as_a_had_it, as_b_took_it, vaults["b"],
        trails, stream, sealer,
    )  # fmt: skip


def _queued_by_b_alone(case: TakenOver, b: Spool) -> None:
    """Node b prepares and queues the document: the copy goes after its commit, the
    queued row's body opens with its data key, and only b accepted it."""
    done = case.sealer(b, None).seal_and_queue_all([ToSeal(case.as_b_took_it, case.peer, None)])
    assert [d.record.message_id for d in done] == [case.message_id]
    record = b.get(case.message_id)
    assert record is not None and record.state is OutboundState.QUEUED
    assert record.queued_by == "b" and record.body_path == case.bodies / "large.b.as2"
    with open_file(case.vault, body_item(case.message_id), record.body_path) as body:
        assert len(body.read()) > len(case.document)  # opens, whole, under the row's key
    assert [p.name for p in case.bodies.iterdir() if p.is_file()] == ["large.b.as2"]
    assert not case.copy.exists()
    accepted = {
        node: [e["message_id"] for e in events(trail, "message.accepted")]
        for node, trail in case.trails.items()
    }
    assert accepted == {"a": [], "b": [case.message_id]}


def test_a_node_whose_claim_ran_out_does_not_queue_the_document_another_node_holds(
    layout: DemoLayout, nodes: tuple[Spool, Spool], clock: SetClock
) -> None:
    """Node a, still signing and encrypting a large document when its claim ran out and
    node b took it over, finishes first: it does not queue it (b holds the intake), it
    removes the body it wrote and leaves the copy and its key, from which b prepares and
    queues it."""
    a, b = nodes
    case = _large_intake_taken_over(layout, nodes, clock)
    assert (
        case.sealer(a, None).seal_and_queue_all([ToSeal(case.as_a_had_it, case.peer, None)]) == []
    )
    assert "message.prepared_elsewhere" in case.stream.getvalue()
    assert [p.name for p in case.bodies.iterdir() if p.is_file()] == []  # a's body is gone
    assert case.copy.exists() and b.data_key(payload_item(case.message_id)) is not None
    held = b.get(case.message_id)
    assert held is not None and (held.state, held.node) == (OutboundState.INTAKE, "b")
    _queued_by_b_alone(case, b)


def test_a_node_whose_claim_ran_out_does_not_fail_the_document_another_node_holds(
    layout: DemoLayout, nodes: tuple[Spool, Spool], clock: SetClock
) -> None:
    """As above, but a's preparation fails (here: a no longer finds the peer's encryption
    certificate acceptable): that is not a's to decide any more.  a marks nothing failed
    and raises no alert; b prepares and queues the document."""
    a, b = nodes
    case = _large_intake_taken_over(layout, nodes, clock)
    stale = case.sealer(a, {})  # no acceptable certificate for any peer
    assert stale.seal_and_queue_all([ToSeal(case.as_a_had_it, case.peer, None)]) == []
    assert "message.prepared_elsewhere" in case.stream.getvalue()
    assert events(case.trails["a"], "message.failed") == []
    held = b.get(case.message_id)
    assert held is not None and (held.state, held.node) == (OutboundState.INTAKE, "b")
    assert held.last_error is None and case.copy.exists()
    _queued_by_b_alone(case, b)


@dataclass
class SteppingClock(SetClock):
    """Time moves by ``step`` seconds each time a node looks at its monotonic clock."""

    step: float = 0.0

    def monotonic(self) -> float:
        self.advance(self.step)
        return super().monotonic()


def test_a_recovery_longer_than_a_lease_keeps_the_intakes_it_claimed(
    layout: DemoLayout, make_spool: MakeSpool
) -> None:
    """Node b claims the three intakes dead node a left and prepares them one by one,
    so slowly that the whole takes longer than a lease: it renews its claims on the
    way, and node c, starting a lease after b's claim, finds none to take."""
    # The demo's certificates are valid from now on.
    clock = SteppingClock(datetime.now(UTC), step=0.4 * LEASE)
    config = load_config(layout.lab.config_path)
    [peer] = config.peers
    dead = make_spool(clock, Claimant("a", LEASE))
    ids = [f"<i{number}@KITA-LAB>" for number in range(3)]
    for number, message_id in enumerate(ids):
        dead.add_intake(
            message_id, peer.name, f"i{number}.hl7", "application/hl7-v2",
            layout.lab.outbox_dir / f"i{number}.hl7", config.storage.state_dir / f"p{number}",
            zone=peer.zone, payload=b"MSH|^~\\&|LAB|%d\r" % number,
        )  # fmt: skip
    clock.advance(LEASE + 1)
    trails = {name: layout.lab.root / f"audit-{name}.jsonl" for name in ("b", "c")}

    async def start_both() -> None:
        async with _starting(config, make_spool, clock, trails) as (b, c):
            claimed_at = clock.now().timestamp()
            first = asyncio.create_task(b.recover())
            while clock.now().timestamp() < claimed_at + LEASE + 1 and not first.done():
                await asyncio.sleep(0)
            assert not first.done()  # node c starts while node b's recovery goes on
            await c.recover()
            await first

    asyncio.run(start_both())
    accepted = [e for trail in trails.values() for e in events(trail, "message.accepted")]
    assert sorted((e["message_id"], e["node"]) for e in accepted) == [(m, "b") for m in ids]


def test_a_document_another_node_delivered_meanwhile_is_not_claimed_again(
    nodes: tuple[Spool, Spool], tmp_path: Path
) -> None:
    """Node b found no record of the document, then node a delivered it (the peer sent
    it to both): b's claim must not replace a's finished record, or b would write it
    into the inbox a second time.  b is told the claim is held (503: the peer resends
    and is answered with a's receipt)."""
    a, b = nodes
    assert b.inbound_get("lab", "<twice@x>") is None
    a.inbound_begin("lab", "<twice@x>", "00", tmp_path / "t", work_path=tmp_path / ".w", size=1)
    a.inbound_delivered("lab", "<twice@x>", [("MIC", "x")], b"receipt of a")
    with pytest.raises(ClaimHeldError, match="received by a"):
        b.inbound_begin("lab", "<twice@x>", "00", tmp_path / "t2", work_path=tmp_path / ".w2")
    held = b.inbound_get("lab", "<twice@x>")
    assert held is not None and (held.state, held.node) == ("delivered", "a")
    assert held.target_path == tmp_path / "t" and held.receipt_body == b"receipt of a"


def test_a_received_document_is_claimed_by_one_node_at_a_time(
    nodes: tuple[Spool, Spool], clock: SetClock, tmp_path: Path
) -> None:
    a, b = nodes
    a.inbound_begin("lab", "<r@x>", "00", tmp_path / "t", work_path=tmp_path / ".w", size=1)
    # The same document arriving at node b meanwhile (the peer resent it there).
    with pytest.raises(ClaimHeldError, match="being received by a"):
        b.inbound_begin("lab", "<r@x>", "00", tmp_path / "t2", work_path=tmp_path / ".w2")
    with pytest.raises(ClaimHeldError):
        b.inbound_take("lab", "<r@x>")
    assert b.inbound_unfinished() == []  # node b starting: a's live delivery is not its
    assert b.inbound_take_over() == []
    assert a.inbound_holds("lab", "<r@x>")

    clock.advance(LEASE + 1)
    assert not a.inbound_holds("lab", "<r@x>")
    [taken] = b.inbound_take_over()
    assert (taken.message_id, taken.node) == ("<r@x>", "a")
    assert b.inbound_holds("lab", "<r@x>")
    # Node a wakes up: it can neither forget the delivery nor record it written.
    assert a.inbound_release("lab", "<r@x>") is False
    a.inbound_written("lab", "<r@x>")
    held = b.inbound_get("lab", "<r@x>")
    assert held is not None and held.state == "delivering" and held.node == "b"
    assert b.inbound_release("lab", "<r@x>") is True


def test_renewal_keeps_a_long_delivery_and_start_up_takes_back_own_and_expired(
    nodes: tuple[Spool, Spool], clock: SetClock, tmp_path: Path, make_spool: MakeSpool
) -> None:
    a, b = nodes
    a.inbound_begin("lab", "<long@x>", "00", tmp_path / "t1", work_path=tmp_path / ".w1")
    b.inbound_begin("lab", "<dead@x>", "00", tmp_path / "t2", work_path=tmp_path / ".w2")
    for _ in range(6):
        clock.advance(LEASE / 3)
        a.renew_leases()  # node b has died: it renews nothing
    # Node a restarts now: its own interrupted delivery, and b's expired one.
    restarted = make_spool(clock, Claimant("a", LEASE))
    taken = {(r.message_id, r.node) for r in restarted.inbound_unfinished()}
    assert taken == {("<long@x>", "a"), ("<dead@x>", "b")}
    assert {r.node for r in restarted.inbound_in_progress()} == {"a"}


# -- across two nodes through the exactly-once delivery, one inbox ---------------------


def _delivery(layout: DemoLayout, spool: Spool, clock: SetClock) -> InboxDelivery:
    config = load_config(layout.hospital.config_path)
    audit = AuditLog(layout.hospital.root / f"audit-{spool.node}.jsonl", clock, node=spool.node)
    return InboxDelivery(config, spool, audit, make_logger(stream=io.StringIO()), InboundLocks())


def test_a_stalled_node_whose_delivery_was_taken_over_does_not_write_it(
    layout: DemoLayout, nodes: tuple[Spool, Spool], clock: SetClock
) -> None:
    """Node a stalls while writing a received document (longer than its lease); node
    b takes the delivery over and forgets it (not in the inbox); node a, resuming,
    must not link it into the inbox: the peer's resend to b is then the one copy."""
    a, b = nodes
    deliver_a, deliver_b = _delivery(layout, a, clock), _delivery(layout, b, clock)
    peer = load_config(layout.hospital.config_path).require_peer("lab")
    locks_b = InboundLocks()

    def stalling() -> Iterator[bytes]:
        yield b"MSH|"
        clock.advance(LEASE + 1)  # node a hangs here; node b's take-over runs
        assert take_over(deliver_b, b, make_logger(stream=io.StringIO()), locks_b) == 1
        yield b"doc\r"

    digest = "d" * 64
    with pytest.raises(ClaimHeldError, match="ran out"):
        deliver_a.deliver_once(peer, "<s@x>", "doc.hl7", stalling, 8, digest, None)
    inbox = layout.hospital.inbox_dir / "lab"
    assert [p.name for p in inbox.iterdir() if not p.name.startswith(".")] == []
    assert b.inbound_get("lab", "<s@x>") is None  # forgotten: a resend starts afresh

    target = deliver_b.deliver_once(
        peer, "<s@x>", "doc.hl7", lambda: [b"MSH|doc\r"], 8, digest, None
    )
    assert target.read_bytes() == b"MSH|doc\r"
    assert sorted(p.name for p in inbox.iterdir()) == ["doc.hl7"]


def test_a_delivery_a_dead_node_linked_is_recorded_by_the_node_taking_over(
    layout: DemoLayout, nodes: tuple[Spool, Spool], clock: SetClock
) -> None:
    """Node a linked the document into the inbox and died before recording it; node b
    takes the delivery over: the document is in the inbox once, audited by b, and a
    resend to b is answered as a duplicate, never written again."""
    a, b = nodes
    deliver_b = _delivery(layout, b, clock)
    peer = load_config(layout.hospital.config_path).require_peer("lab")
    inbox = layout.hospital.inbox_dir / "lab"
    inbox.mkdir(parents=True)
    target, work = inbox / "doc.hl7", inbox / ".doc.hl7.0123456789ab.delivering"
    work.write_bytes(b"MSH|doc\r")
    digest = "e" * 64
    a.inbound_begin("lab", "<k@x>", digest, target, work_path=work, size=8)
    target.hardlink_to(work)
    # ... and node a is killed here.
    clock.advance(LEASE + 1)
    assert take_over(deliver_b, b, make_logger(stream=io.StringIO()), InboundLocks()) == 1
    record = b.inbound_get("lab", "<k@x>")
    assert record is not None and record.state == "written"
    trail = layout.hospital.root / "audit-b.jsonl"
    [delivered] = events(trail, "message.delivered")
    assert delivered["message_id"] == "<k@x>" and delivered["node"] == "b"

    again = deliver_b.deliver_once(
        peer, "<k@x>", "doc.hl7", lambda: [b"MSH|doc\r"], 8, digest, None
    )
    assert again == target
    assert sorted(p.name for p in inbox.iterdir()) == ["doc.hl7"]
    assert len(events(trail, "message.duplicate")) == 1


def _keeper(
    config: GatewayConfig,
    spool: Spool,
    clock: SetClock,
    trail: Path,
    stream: io.StringIO,
    trust: Mapping[str, PeerTrust] | None = None,
    outbound: Outbound | None = None,
) -> LeaseKeeper:
    """The lease keeper of node ``spool.node``, with its inbound and outbound sides (the
    node's ``outbound``, if it has one already)."""
    log = make_logger(stream=stream)
    audit = AuditLog(trail, clock, node=spool.node)
    processor = InboundProcessor(config, spool, audit, log, clock)
    if outbound is None:
        outbound = Outbound(Settings(config, trust or {}), spool, audit, log, clock)
    return LeaseKeeper(
        spool, clock, lambda: config, lambda: processor, outbound, lambda: audit, log,
        lambda: None,
    )  # fmt: skip


def test_a_running_node_prepares_what_a_dead_node_took_in_and_kept_in_the_spool(
    layout: DemoLayout, nodes: tuple[Spool, Spool], clock: SetClock
) -> None:
    """Node a took documents in and died before preparing them: the small ones' copies
    are in their spool rows, a large one's in a's own state folder.  Live node b's
    lease keeper, once a's lease ran out, claims the small ones a batch at a time and
    prepares them (each audited as taken over), without waiting for any node to
    start; the large one waits for node a (its document is where only a reaches it)."""
    clock.at = datetime.now(UTC)  # the demo's certificates are valid from now on
    a, b = nodes
    config = load_config(layout.lab.config_path)
    [peer] = config.peers
    trail = layout.lab.root / "audit-b.jsonl"

    def took_in(message_id: str, payload: bytes | None) -> None:
        a.add_intake(
            message_id, peer.name, "d.hl7", "application/hl7-v2", layout.lab.outbox_dir / "d",
            layout.lab.root / "state-a" / message_id, zone=peer.zone, payload=payload,
        )  # fmt: skip

    rows = [f"<row{number}@KITA-LAB>" for number in range(INTAKE_TAKE_OVER_BATCH + 2)]
    for number, message_id in enumerate(rows):
        took_in(message_id, b"MSH|^~\\&|LAB|%d\r" % number)
    took_in("<file@KITA-LAB>", None)

    async def keep_leases() -> None:
        trust = await assess_peers(config.peers, config.zones, at=clock.now())
        keeper = _keeper(config, b, clock, trail, io.StringIO(), trust)
        assert await keeper.prepare_taken_over() == 0  # a's claims are live
        assert events(trail, "message.taken_over") == []
        clock.advance(LEASE + 1)
        assert await keeper.prepare_taken_over() == len(rows)

    asyncio.run(keep_leases())
    taken = events(trail, "message.taken_over")
    assert [(e["message_id"], e["detail"]["from_node"]) for e in taken] == [
        (message_id, "a") for message_id in rows
    ]
    accepted = events(trail, "message.accepted")
    assert sorted(e["message_id"] for e in accepted) == sorted(rows)
    assert {r.message_id for r in b.in_state(OutboundState.QUEUED)} == set(rows)
    waiting = b.get("<file@KITA-LAB>")
    assert waiting is not None and waiting.state is OutboundState.INTAKE
    assert waiting.node == "a"


def test_a_take_over_cut_short_by_the_spool_prepares_the_rest_at_the_next_round(
    layout: DemoLayout, nodes: tuple[Spool, Spool], clock: SetClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Node b's lease keeper claimed a batch of what dead node a took in, and the spool
    failed while it prepared the second: b holds (and renews) the rest of the batch, so
    no other node takes them; its next round prepares them, without a restart."""
    clock.at = datetime.now(UTC)  # the demo's certificates are valid from now on
    a, b = nodes
    config = load_config(layout.lab.config_path)
    [peer] = config.peers
    trail = layout.lab.root / "audit-b.jsonl"
    rows = [f"<cut{number}@KITA-LAB>" for number in range(3)]
    for number, message_id in enumerate(rows):
        a.add_intake(
            message_id, peer.name, "d.hl7", "application/hl7-v2", layout.lab.outbox_dir / "d",
            layout.lab.root / "state-a" / message_id, zone=peer.zone,
            payload=b"MSH|^~\\&|LAB|%d\r" % number,
        )  # fmt: skip
    submitter = b.submitter
    failed: list[str] = []

    def failing_once(message_id: str) -> str | None:
        if message_id == rows[1] and not failed:
            failed.append(message_id)
            raise SpoolUnreachableError("the spool's database does not answer", fix="wait")
        return submitter(message_id)

    monkeypatch.setattr(b, "submitter", failing_once)
    stream = io.StringIO()

    async def two_rounds() -> None:
        trust = await assess_peers(config.peers, config.zones, at=clock.now())
        keeper = _keeper(config, b, clock, trail, stream, trust)
        clock.advance(LEASE + 1)
        assert await keeper.prepare_taken_over() == 1  # the first; then the spool failed
        assert "lease.take_over_failed" in stream.getvalue()
        assert {r.message_id for r in b.in_state(OutboundState.QUEUED)} == {rows[0]}
        assert b.intake_take_over(8) == []  # b's claims: no one else takes them
        assert await keeper.prepare_taken_over() == 2

    asyncio.run(two_rounds())
    assert failed == [rows[1]]
    assert {r.message_id for r in b.in_state(OutboundState.QUEUED)} == set(rows)
    accepted = events(trail, "message.accepted")
    assert sorted(e["message_id"] for e in accepted) == sorted(rows)
    taken = events(trail, "message.taken_over")
    assert sorted(e["message_id"] for e in taken) == sorted(rows)


@pytest.mark.parametrize(
    "shared, copied, back",
    [
        (False, False, "given-back"),
        (True, False, "claim-ran-out"),
        (False, True, "given-back"),
        (True, False, "b-restarted"),
    ],
    ids=["state-folder-given-back", "bodies-folder-claim-ran-out", "copied-given-back",
         "bodies-folder-b-restarted"],
)  # fmt: skip
def test_a_document_under_another_nodes_claim_when_its_node_starts_keeps_its_message(
    layout: DemoLayout,
    make_spool: MakeSpool,
    clock: SetClock,
    shared: bool,
    copied: bool,
    back: str,
) -> None:
    """Node a recorded a large document it took from its outbox and was killed before
    its copy was written (in its state folder, or its folder of the shared bodies
    folder): the file is still in a's outbox, out of b's reach.  Node b, starting while
    a is down, claims the intake; node a starts again while b holds it.  a's intake
    leaves the file alone (no second message of it); b gives the intake back (or b dies
    and its claim runs out, or b is killed and started again first: its copy's folder
    names node a), and a's lease keeper, a running, takes it up: the document is sent
    under its first Message-ID, with no alert, and a's next start finds nothing of it
    left to do.  So too (``copied``) for one whose copy a finished in its state
    folder, out of b's reach, and removed from its outbox before it was killed."""
    clock.at = datetime.now(UTC)  # the demo's certificates are valid from now on
    loaded = load_config(layout.lab.config_path)
    root = layout.lab.root
    bodies = root / "bodies" if shared else None

    def node(name: str) -> GatewayConfig:
        storage = replace(loaded.storage, audit_log=root / f"audit-{name}.jsonl")
        if name == "b":  # another machine: its own state folder and outbox
            storage = replace(storage, state_dir=root / "state-b", outbox_dir=root / "outbox-b")
        cluster = replace(loaded.cluster, node_name=name, bodies_dir=bodies)
        return replace(loaded, storage=storage, cluster=cluster)

    config_a, config_b = node("a"), node("b")
    [peer] = config_a.peers
    trust = asyncio.run(assess_peers(config_a.peers, config_a.zones, at=clock.now()))
    trails = {name: config.storage.audit_log for name, config in (("a", config_a), ("b", config_b))}
    stream = io.StringIO()

    def outbound(config: GatewayConfig, spool: Spool) -> Outbound:
        audit = AuditLog(trails[spool.node], clock, node=spool.node)
        return Outbound(Settings(config, trust), spool, audit, make_logger(stream=stream), clock)

    document = b"MSH|^~\\&|LAB|study\r" + bytes(range(256)) * 400  # > 64 KiB: a file
    source = config_a.storage.outbox_dir / peer.name / "study.dcm"
    source.parent.mkdir(parents=True, exist_ok=True)
    source.write_bytes(document)
    copies = (
        bodies / "payloads" / "a" if bodies is not None else config_a.storage.state_dir / "payloads"
    )
    dead = make_spool(clock, Claimant("a", LEASE))
    message_id = "<study@KITA-LAB>"
    dead.add_intakes(
        [
            Intake(
                message_id, peer.name, "study.dcm", "application/dicom", source,
                copies / "study-copy", zone=peer.zone, source_file=file_identity(source.lstat()),
            )
        ]
    )  # fmt: skip
    if copied:
        copies.mkdir(parents=True, exist_ok=True)
        (copies / "study-copy").write_bytes(document)  # as it is: no encryption at rest here
        source.unlink()
    clock.advance(LEASE + 1)  # node a died
    b = make_spool(clock, Claimant("b", LEASE))
    [held] = b.intake_interrupted()  # node b starts: its recovery claims the intake
    assert (held.message_id, held.node) == (message_id, "a")

    async def a_starts_again() -> None:
        a = make_spool(clock, Claimant("a", LEASE))
        node_a = outbound(config_a, a)
        await node_a.recover()
        listed = 0 if copied else 1
        assert await node_a.intake_once() == listed  # listed, and left alone
        assert [r.message_id for r in a.all_outbound()] == [message_id]
        assert source.exists() is not copied
        keeper = _keeper(config_a, a, clock, trails["a"], stream, trust, node_a)
        assert await keeper.prepare_taken_over() == 0  # b's claim is live
        assert await node_a.intake_once() == listed and source.exists() is not copied
        if back == "claim-ran-out":  # node b died holding it
            clock.advance(LEASE + 1)
        else:  # node b's recovery comes to it (a new start's): it cannot reach a's folders
            machine_a = [config_a.storage.outbox_dir, copies]
            for number, folder in enumerate(machine_a):
                folder.rename(root / f"on-machine-a-{number}")
            if back == "given-back":
                await outbound(config_b, b).prepare_taken_over([held])
            else:
                await outbound(config_b, make_spool(clock, Claimant("b", LEASE))).recover()
            for number, folder in enumerate(machine_a):
                (root / f"on-machine-a-{number}").rename(folder)
            now = a.get(message_id)
            assert now is not None and (now.node, now.state) == ("a", OutboundState.INTAKE)
        assert await keeper.prepare_taken_over() == 1
        assert await keeper.prepare_taken_over() == 0
        assert await node_a.intake_once() == 0
        await outbound(config_a, make_spool(clock, Claimant("a", LEASE))).recover()

    asyncio.run(a_starts_again())
    [record] = dead.all_outbound()
    assert (record.message_id, record.state, record.queued_by) == (
        message_id, OutboundState.QUEUED, "a",
    )  # fmt: skip
    assert not source.exists()
    accepted = [e["message_id"] for e in events(trails["a"], "message.accepted")]
    assert accepted == [message_id]
    assert not [t for t in trails.values() if t.exists() and events(t, "message.failed")]
    assert "recovery.intake_held_elsewhere" in stream.getvalue()


def test_the_lease_keeper_removes_the_work_files_a_dead_node_left_once_a_lease_old(
    layout: DemoLayout, nodes: tuple[Spool, Spool], clock: SetClock
) -> None:
    """Node z died for good between creating a work file in the shared inbox and
    recording it (or between forgetting a delivery and removing its file): no start of
    z removes them, so live node b's lease keeper does, once a lease, those a lease
    old.  A delivery in progress keeps its file whatever its age, and so does a young
    unrecorded one (another node about to record it)."""
    a, b = nodes
    config = load_config(layout.hospital.config_path)
    lease = config.cluster.lease_seconds
    stream = io.StringIO()
    keeper = _keeper(config, b, clock, layout.hospital.root / "audit-b.jsonl", stream)
    folder = config.storage.inbox_dir / "lab"
    folder.mkdir(parents=True)

    def work_file(name: str, node: str, age: float) -> Path:
        path = work_name(folder / name, node)
        path.write_bytes(b"MSH|")
        at = clock.now().timestamp() - age
        os.utime(path, (at, at))
        return path

    dead = work_file("dead.hl7", "z", 2 * lease)
    recorded = work_file("long.hl7", "a", 10 * lease)
    a.inbound_begin("lab", "<long@x>", "00", folder / "long.hl7", work_path=recorded)
    delivered = folder / "doc.hl7"
    delivered.write_bytes(b"MSH|doc\r")
    keeper.take_over()  # less than a lease since the start's own removal: not yet
    assert dead.exists()

    clock.advance(lease / 2)
    a.renew_leases()  # node a lives
    clock.advance(lease / 2)
    a.renew_leases()
    young = work_file("young.hl7", "z", 1)
    keeper.take_over()
    assert not dead.exists()
    assert young.exists() and recorded.exists() and delivered.exists()
    assert '"event": "recovery.removed_work_file"' in stream.getvalue()
    os.utime(young, (0, 0))  # ... much later
    keeper.take_over()  # once a lease only
    assert young.exists()
    clock.advance(lease)
    a.renew_leases()
    keeper.take_over()
    assert not young.exists() and recorded.exists()


# -- hand-overs to the internal system -------------------------------------------------


def received(spool: Spool, tmp_path: Path, message_id: str) -> None:
    """A document delivered to the inbox, its hand-over pending."""
    spool.inbound_begin("lab", message_id, "00", tmp_path / message_id, work_path=tmp_path / ".w")
    spool.inbound_delivered("lab", message_id, [], b"mdn", ("text/plain", 3))


def test_a_hand_over_is_taken_by_one_node_and_taken_over_once_its_lease_runs_out(
    nodes: tuple[Spool, Spool], clock: SetClock, tmp_path: Path
) -> None:
    a, b = nodes
    received(a, tmp_path, "<h@x>")
    now = clock.now().timestamp()
    [taken] = a.handover_due(now)
    assert taken.message_id == "<h@x>"
    held = b.handover_get("lab", "<h@x>")
    assert held is not None and held.node == "a" and held.lease_until == now + LEASE
    # Node b leaves a's live claim alone: not due for it, nothing to wait for.
    assert b.handover_due(now) == [] and b.handover_next_at() is None
    assert a.handover_holds("lab", "<h@x>") and not b.handover_holds("lab", "<h@x>")
    for _ in range(6):  # two leases long, renewed every third of one
        clock.advance(LEASE / 3)
        assert a.renew_leases() == 1
        assert b.handover_take_over() == []
        assert a.handover_holds("lab", "<h@x>")

    clock.advance(LEASE - 1)  # node a renews no more
    assert b.handover_take_over() == []
    assert not a.handover_holds("lab", "<h@x>")  # less than half a lease left: no POST
    clock.advance(2)
    [left] = b.handover_take_over()
    assert (left.message_id, left.node) == ("<h@x>", "a")
    [again] = b.handover_due(clock.now().timestamp())
    assert again.message_id == "<h@x>" and b.handover_holds("lab", "<h@x>")
    # Node a wakes up: neither its failure nor its letting go changes b's claim.
    assert a.handover_retry("lab", "<h@x>", "late", 0) is False
    assert a.handover_failed("lab", "<h@x>", "late") is False
    assert a.handover_release("lab", "<h@x>") is False
    assert a.handover_due(clock.now().timestamp()) == []
    current = b.handover_get("lab", "<h@x>")
    assert current is not None and current.node == "b" and current.attempts == 0
    b.handover_done("lab", "<h@x>")
    done = a.handover_get("lab", "<h@x>")
    assert done is not None and done.state.value == "done" and done.node is None


def test_a_hand_over_let_go_or_retried_is_free_for_any_node_and_a_restart_takes_its_own(
    nodes: tuple[Spool, Spool], clock: SetClock, tmp_path: Path, make_spool: MakeSpool
) -> None:
    a, b = nodes
    for message_id in ("<r1@x>", "<r2@x>", "<r3@x>"):
        received(a, tmp_path, message_id)
    now = clock.now().timestamp()
    assert [h.message_id for h in a.handover_due(now, limit=2)] == ["<r1@x>", "<r2@x>"]
    assert a.handover_retry("lab", "<r1@x>", "HTTP 503", now + 30) is True
    assert a.handover_release("lab", "<r2@x>") is True
    # Node b takes what a let go (and the one nobody took), not what is not yet due.
    assert {h.message_id for h in b.handover_due(now)} == {"<r2@x>", "<r3@x>"}
    assert a.handover_next_at() == now + 30  # what b holds is not a's to wait for
    clock.advance(30)
    taken = b.handover_due(clock.now().timestamp())  # its own again, and the retried one
    assert {h.message_id: h.attempts for h in taken} == {"<r1@x>": 1, "<r2@x>": 0, "<r3@x>": 0}
    # Node b is killed and starts again under its name: its claims are its own at once.
    restarted = make_spool(clock, Claimant("b", LEASE))
    assert restarted.handover_next_at() == 0.0  # due since it arrived
    assert len(restarted.handover_due(clock.now().timestamp())) == 3
    assert a.handover_due(clock.now().timestamp()) == []


def _handing(layout: DemoLayout, spool: Spool, clock: SetClock | SystemClock) -> HandOver:
    config = load_config(layout.hospital.config_path)
    audit = AuditLog(layout.hospital.root / f"audit-{spool.node}.jsonl", clock, node=spool.node)
    return HandOver(
        spool, lambda: audit, make_logger(stream=io.StringIO()), clock, lambda: config,
        random.Random(1), Network.fixed(config.network_map).internal(),
    )  # fmt: skip


def _inbox_files(layout: DemoLayout, spool: Spool, count: int) -> list[str]:
    """``count`` documents in the inbox, their hand-overs pending; their Message-IDs."""
    inbox = layout.hospital.inbox_dir / "lab"
    inbox.mkdir(parents=True, exist_ok=True)
    ids = []
    for number in range(count):
        body = b"MSH|%d\r" % number
        path = inbox / f"doc-{number}.hl7"
        path.write_bytes(body)
        message_id = f"<doc-{number}@lab>"
        spool.inbound_begin("lab", message_id, hashlib.sha256(body).hexdigest(), path)
        spool.inbound_delivered("lab", message_id, [], b"mdn", ("x-application/hl7", len(body)))
        ids.append(message_id)
    return ids


def test_two_nodes_handing_over_at_once_post_each_document_once(
    layout: DemoLayout, make_spool: MakeSpool, internal_port: int
) -> None:
    """Both nodes' hand-over workers run on the same queue at the same time: each
    document reaches the internal system once, by one node or the other."""
    enable_delivery(layout, internal_port)
    clock = SystemClock()
    a, b = make_spool(clock, Claimant("a", LEASE)), make_spool(clock, Claimant("b", LEASE))
    ids = _inbox_files(layout, a, 40)
    system = InternalSystem(internal_port)

    async def both() -> None:
        workers = [asyncio.create_task(_handing(layout, s, clock).run()) for s in (a, b)]
        try:
            deadline = time.monotonic() + 60
            while len(a.handover_list(HandoverState.DONE)) < len(ids):
                assert time.monotonic() < deadline, a.handover_list(HandoverState.PENDING)
                await asyncio.sleep(0.05)
        finally:
            for worker in workers:
                worker.cancel()
            await asyncio.gather(*workers, return_exceptions=True)

    try:
        asyncio.run(both())
        keys = [r[1]["Idempotency-Key"] for r in system.requests]
        assert sorted(keys) == sorted(idempotency_key("lab", m) for m in ids)
        assert {r[1]["X-Medgw-Message-Id"] for r in system.requests} == set(ids)
    finally:
        system.close()


def test_a_node_whose_hand_over_was_taken_over_does_not_post_it(
    layout: DemoLayout, nodes: tuple[Spool, Spool], clock: SetClock, internal_port: int
) -> None:
    """Node a took a hand-over and stalled past its lease; node b took it over.  Node a,
    resuming, checks its claim before the POST and lets it be: b's POST is the one."""
    enable_delivery(layout, internal_port)
    a, b = nodes
    [message_id] = _inbox_files(layout, a, 1)
    [record] = a.handover_due(clock.now().timestamp())
    clock.advance(LEASE + 1)
    assert [r.node for r in b.handover_take_over()] == ["a"]
    [again] = b.handover_due(clock.now().timestamp())
    system = InternalSystem(internal_port)

    async def attempt(spool: Spool, taken: HandoverRecord) -> float:
        worker = _handing(layout, spool, clock)
        async with worker.session() as session:
            return await worker.hand_over(session, taken)

    try:
        assert asyncio.run(attempt(a, record)) == 0.0
        assert system.requests == []
        held = b.handover_get("lab", message_id)
        assert held is not None and held.node == "b" and held.state is HandoverState.PENDING
        assert asyncio.run(attempt(b, again)) == 0.0
        assert [r[1]["X-Medgw-Message-Id"] for r in system.requests] == [message_id]
        done = a.handover_get("lab", message_id)
        assert done is not None and done.state is HandoverState.DONE and done.attempts == 1
    finally:
        system.close()


def _posted_message_id(server: socket.socket) -> tuple[str, socket.socket]:
    """The Message-ID of the first POST made to ``server`` (the internal system), read
    from its headers, and its connection, left open, unanswered (the caller closes it:
    closed, the POST would fail)."""
    connection, _ = server.accept()
    connection.settimeout(60)
    head = b""
    while b"\r\n\r\n" not in head:
        chunk = connection.recv(4096)
        assert chunk, "the POST ended before its headers"
        head += chunk
    found = re.search(rb"(?im)^x-medgw-message-id: *(\S+)", head)
    assert found is not None, head
    return found.group(1).decode(), connection


def test_a_clean_stop_lets_go_of_the_hand_overs_taken_and_not_attempted(
    layout: DemoLayout, nodes: tuple[Spool, Spool], clock: SetClock, internal_port: int
) -> None:
    """Node a takes three hand-overs and is stopped while it POSTs one of them (the
    internal system has not answered): the two it did not attempt are free for node b
    at once, not after a's lease; the one in flight stays a's until the lease runs out
    (the internal system may have taken it)."""
    enable_delivery(layout, internal_port)
    edit_every(layout.hospital.config_path, "\ntimeout_seconds = 5\n", "\ntimeout_seconds = 300\n")
    a, b = nodes
    ids = _inbox_files(layout, a, 3)
    # The internal system reads the first POST's headers and never answers.
    with socket.create_server(("127.0.0.1", internal_port)) as server:

        async def stop_while_posting() -> str:
            worker = asyncio.create_task(_handing(layout, a, clock).run())
            posted, connection = await asyncio.to_thread(_posted_message_id, server)
            with connection:
                worker.cancel()  # SIGTERM: the daemon's tasks are cancelled
                await asyncio.gather(worker, return_exceptions=True)
            return posted

        first = asyncio.run(stop_while_posting())
    held = b.handover_get("lab", first)
    assert held is not None and held.node == "a"
    assert {h.message_id for h in b.handover_due(clock.now().timestamp())} == set(ids) - {first}
    clock.advance(LEASE + 1)
    assert [h.message_id for h in b.handover_take_over()] == [first]


class ClaimHeld(SqliteSpool):
    """The real spool; its claim of due hand-overs, once committed, is held back from
    its caller until ``go`` is set (``claimed`` says it was committed)."""

    claimed: threading.Event
    go: threading.Event

    def handover_due(self, now: float, limit: int = 16) -> list[HandoverRecord]:
        taken = super().handover_due(now, limit)
        if taken:
            self.claimed.set()
            self.go.wait(60)
        return taken


def test_a_stop_while_hand_overs_are_being_taken_lets_go_of_them_all(
    layout: DemoLayout, clock: SetClock, tmp_path: Path
) -> None:
    """Node a is stopped while its claim of due hand-overs is being made: once it is
    made, what it took goes back at once, none of it attempted."""
    a = ClaimHeld(tmp_path / "spool.db", clock, Claimant("a", LEASE))
    a.claimed, a.go = threading.Event(), threading.Event()
    b = SqliteSpool(tmp_path / "spool.db", clock, Claimant("b", LEASE))
    try:
        ids = _inbox_files(layout, a, 3)

        async def stop_while_claiming() -> None:
            worker = asyncio.create_task(_handing(layout, a, clock).run())
            assert await asyncio.to_thread(a.claimed.wait, 60)
            worker.cancel()  # SIGTERM while the claim is on its way back
            a.go.set()
            await asyncio.gather(worker, return_exceptions=True)

        asyncio.run(stop_while_claiming())
        assert {h.message_id for h in b.handover_due(clock.now().timestamp())} == set(ids)
    finally:
        a.close()
        b.close()
