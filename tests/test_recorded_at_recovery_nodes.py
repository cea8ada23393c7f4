"""A record one node's change owes, cut off by a kill, and the row changed since by
another node: the first node's next start still writes it.

Two spool handles on one database act as nodes a and b (each test runs on SQLite and
on PostgreSQL), the clock injected; node a has a real audit trail.  Node a commits a
change and is "killed" before writing its record (the test writes none); node b then
changes the same row and names its own record, as a take-over, a send or an
operator's action on b does.  The row keeps only b's; the spool keeps a's, as the row
was, in the same transaction, for a's start."""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import pytest

from gateway.audit import AuditLog
from gateway.audit.events import EventType
from gateway.audit.owed import RECOVERED
from gateway.config import load_config
from gateway.demo_run import read_audit
from gateway.inbound.recovery import record_cut_off
from gateway.logs import make_logger
from gateway.pki.demo import DemoLayout
from gateway.spool import Claimant, OutboundState, RetainedKind, Settled, Spool
from gateway.spool.postgres import PostgresSpool
from gateway.spool.postgres.schema import VERSION
from gateway.spool.records import DisplacedOwed
from gateway.spool.schema import OWING_TABLES
from gateway.spool.sql import Connection, SqlStore
from tests.clocks import SetClock
from tests.conftest import MakeSpool
from tests.helpers.recovery import queued, start_outbound

LEASE = 60.0


@pytest.fixture
def clock() -> SetClock:
    return SetClock()


@pytest.fixture
def nodes(make_spool: MakeSpool, clock: SetClock) -> tuple[Spool, Spool]:
    return make_spool(clock, Claimant("a", LEASE)), make_spool(clock, Claimant("b", LEASE))


def _records(layout: DemoLayout, event: str) -> list[dict[str, Any]]:
    trail = load_config(layout.lab.config_path).storage.audit_log
    return [r for r in read_audit(trail) if r["event"] == event]


def test_a_failed_send_another_node_then_sent_gets_its_record_at_the_next_start(
    layout: DemoLayout, nodes: tuple[Spool, Spool], clock: SetClock, tmp_path: Path
) -> None:
    """Node a's send failed (queued again), a killed before its message.send_failed;
    node b sends it and its receipt settles it.  a's start writes message.send_failed,
    once, as a's change left the row; b's receipt.received is b's to write."""
    a, b = nodes
    queued(a, tmp_path, "<m@lab>")
    start_outbound(layout, a, clock)  # its message.accepted, as a running a writes it
    assert len(_records(layout, "message.accepted")) == 1
    a.claim_due("hospital", clock.now().timestamp(), 1)
    assert a.mark_retry("<m@lab>", "connection refused", 0, owed=EventType.MESSAGE_SEND_FAILED)
    # Killed here.  Node b sends it (a's retry is due) and settles it by its receipt.
    clock.advance(5)
    [claimed], _ = b.claim_due("hospital", clock.now().timestamp(), 1)
    assert claimed.audited_by == "a"
    assert b.mark_done("<m@lab>", OutboundState.DELIVERED, "processed", tmp_path / "r.mdn")
    row = b.get("<m@lab>")
    assert row is not None and (row.audited_by, row.audit_owed) == ("b", "receipt.received")

    clock.advance(5)
    for _ in range(2):  # a second start finds it recorded
        start_outbound(layout, a, clock)
    [failed] = _records(layout, "message.send_failed")
    assert failed["message_id"] == "<m@lab>" and failed["node"] == "a"
    assert failed["reason"] == f"connection refused; {RECOVERED}"
    assert failed["detail"] == {"attempts": 1, "recorded_at_recovery": True}
    assert _records(layout, "receipt.received") == []  # b's record, in b's trail
    assert len(_records(layout, "message.accepted")) == 1
    assert a.displaced_owed() == DisplacedOwed()  # written: forgotten


def test_a_failed_hand_over_another_nodes_operator_retried_gets_its_record_at_the_next_start(
    layout: DemoLayout, nodes: tuple[Spool, Spool], clock: SetClock, tmp_path: Path
) -> None:
    """Node a's hand-over failed for good, a killed before its message.handover_failed;
    an operator retries it on node b.  a's start writes message.handover_failed, once."""
    a, b = nodes
    config = load_config(layout.lab.config_path)
    trail = config.storage.audit_log
    audit = AuditLog(trail, clock, node="a")
    log = make_logger(stream=io.StringIO())
    a.inbound_begin("hospital", "<r@h>", "ab" * 32, tmp_path / "r.hl7")
    a.inbound_delivered("hospital", "<r@h>", [], b"receipt", handover=("text/plain", 3))
    record_cut_off(a, audit, trail, log)  # its receipt.sent, as a running a writes it
    assert a.handover_due(clock.now().timestamp())
    assert a.handover_failed("hospital", "<r@h>", "HTTP 410 from the internal system")
    # Killed here.  An operator on node b retries it.
    clock.advance(5)
    b.handover_operator_retry("hospital", "<r@h>", "operator:root (uid 0)", 0)
    clock.advance(5)
    for _ in range(2):  # a second start finds it recorded
        record_cut_off(a, audit, trail, log)
    audit.close()
    [failed] = _records(layout, "message.handover_failed")
    assert failed["message_id"] == "<r@h>" and failed["severity"] == "alert"
    assert failed["reason"] == f"HTTP 410 from the internal system; not retried; {RECOVERED}"
    assert failed["detail"]["final"] is True and failed["detail"]["attempt"] == 1
    assert len(_records(layout, "receipt.sent")) == 1
    assert _records(layout, "message.handover_retried") == []  # b's record
    assert a.displaced_owed() == DisplacedOwed()


def test_only_a_change_across_nodes_keeps_the_record_it_displaces(
    nodes: tuple[Spool, Spool], clock: SetClock, tmp_path: Path
) -> None:
    """A node's own steps, and a message queued on a and sent by b (a's message.accepted
    is found by queued_by), keep nothing; an operator's cancel on b of a message a gave
    up, and b's expiry of one whose last attempt a made, keep a's record as a left the
    row, the latest per row, until a forgets exactly those it read."""
    a, b = nodes
    assert isinstance(b, SqlStore)
    queued(a, tmp_path, "<sent@lab>")
    b.claim_due("hospital", clock.now().timestamp(), 1)
    assert b.mark_done("<sent@lab>", OutboundState.DELIVERED, "processed", tmp_path / "r")
    queued(a, tmp_path, "<own@lab>")
    a.claim_due("hospital", clock.now().timestamp(), 1)
    assert a.mark_retry("<own@lab>", "refused", 0, owed=EventType.MESSAGE_SEND_FAILED)
    a.claim_due("hospital", clock.now().timestamp(), 1)
    assert a.mark_dead("<own@lab>", "2 attempts failed")
    assert a.displaced_owed() == b.displaced_owed() == DisplacedOwed()

    clock.advance(1)
    b.operator_cancel("<own@lab>", "operator:root (uid 0)")
    queued(a, tmp_path, "<late@lab>")
    a.claim_due("hospital", clock.now().timestamp(), 1)
    assert a.mark_retry("<late@lab>", "refused", 1e12, owed=EventType.MESSAGE_SEND_FAILED)
    clock.advance(1)
    b._write("UPDATE outbound SET expires_at=1 WHERE message_id=?", ("<late@lab>",))
    assert b.expire_due("hospital", clock.now().timestamp()) == ["<late@lab>"]
    found = a.displaced_owed()
    assert b.displaced_owed() == DisplacedOwed()
    assert [(r.message_id, r.audit_owed, r.state) for r in found.outbound] == [
        ("<own@lab>", "message.dead", OutboundState.DEAD),
        ("<late@lab>", "message.send_failed", OutboundState.QUEUED),
    ]
    late = found.outbound[1]
    assert (late.last_error, late.attempts, late.audited_by) == ("refused", 1, "a")
    assert late.body is None  # binary data is not kept
    assert not found.inbound and not found.handover

    # After a's start read them, a retries <late@lab> and b gives it up again: a's
    # latest record displaced stays when a forgets what it read.
    clock.advance(1)
    a.operator_retry("<late@lab>", "operator:root (uid 0)", 0)
    b.claim_due("hospital", clock.now().timestamp(), 1)
    assert b.mark_dead("<late@lab>", "3 attempts failed")
    a.forget_displaced(found)
    [kept] = a.displaced_owed().outbound
    assert (kept.message_id, kept.audit_owed) == ("<late@lab>", "message.retried")


def test_a_spool_from_before_displaced_records_were_kept_keeps_them_once_upgraded(
    make_spool: MakeSpool, clock: SetClock, tmp_path: Path
) -> None:
    """Opened again after its table and triggers were dropped (PostgreSQL: its version
    the one before): both are made again, and a change across nodes is kept."""
    a = make_spool(clock, Claimant("a", LEASE))
    assert isinstance(a, SqlStore)
    postgres = isinstance(a, PostgresSpool)

    def as_before(db: Connection) -> None:
        for table in OWING_TABLES:
            on = f" ON {table}" if postgres else ""
            db.execute(f"DROP TRIGGER {table}_displaced_owed{on}", ())
        db.execute("DROP TABLE displaced_owed", ())
        if postgres:
            db.execute("DROP FUNCTION keep_displaced_owed()", ())
            db.execute("UPDATE spool_schema SET version=?", (VERSION - 1,))

    a._transact(as_before)
    a.close()
    a, b = make_spool(clock, Claimant("a", LEASE)), make_spool(clock, Claimant("b", LEASE))
    queued(a, tmp_path, "<m@lab>")
    a.claim_due("hospital", clock.now().timestamp(), 1)
    assert a.mark_retry("<m@lab>", "refused", 0, owed=EventType.MESSAGE_SEND_FAILED)
    b.claim_due("hospital", clock.now().timestamp(), 1)
    [kept] = a.displaced_owed().outbound
    assert (kept.message_id, kept.audit_owed, kept.state) == (
        "<m@lab>",
        "message.send_failed",
        OutboundState.QUEUED,
    )


def test_a_message_disposed_of_takes_the_row_kept_of_it_with_it(
    nodes: tuple[Spool, Spool], clock: SetClock, tmp_path: Path
) -> None:
    """Retention deletes a delivered message's row (DSP-1): the copy of that row kept
    for a node's owed record goes in the same transaction; another message's stays."""
    a, b = nodes
    for message_id in ("<gone@lab>", "<kept@lab>"):
        queued(a, tmp_path, message_id)
        a.claim_due("hospital", clock.now().timestamp(), 1)
        assert a.mark_retry(message_id, "refused", 0, owed=EventType.MESSAGE_SEND_FAILED)
        b.claim_due("hospital", clock.now().timestamp(), 1)
    assert len(a.displaced_owed().outbound) == 2
    assert b.mark_done("<gone@lab>", OutboundState.DELIVERED, "processed", None)
    clock.advance(1)
    [item] = b.disposable(RetainedKind.SPOOL, clock.now().isoformat())
    assert b.dispose([item]) == [item] and b.get("<gone@lab>") is None
    [kept] = a.displaced_owed().outbound
    assert kept.message_id == "<kept@lab>"


def test_a_delivery_released_takes_the_row_kept_of_it_with_it(
    nodes: tuple[Spool, Spool], clock: SetClock, tmp_path: Path
) -> None:
    """A delivery that did not reach the inbox is forgotten (its row deleted, for a
    resend to start afresh), which retention never sees: the copies of that row kept
    for a node's owed record go in the same transaction; another message's stay.  (A
    row being delivered names no owed record in today's steps: its columns are set
    here, and b's take-over keeps a's copy through the spool's own trigger.)"""
    a, b = nodes
    for message_id in ("<gone@hospital>", "<kept@hospital>"):
        a.inbound_begin("hospital", message_id, "00" * 32, tmp_path / message_id)
    assert isinstance(a, SqlStore)
    a._transact(
        lambda db: db.execute(
            "UPDATE inbound SET audited_by='a', audit_owed=?, audit_owed_at=?",
            (EventType.RECEIPT_SENT.value, clock.now().isoformat()),
        )
    )
    clock.advance(LEASE + 1)
    assert len(b.inbound_take_over()) == 2
    assert len(a.displaced_owed().inbound) == 2
    assert b.inbound_release("hospital", "<gone@hospital>")
    assert b.inbound_get("hospital", "<gone@hospital>") is None
    [kept] = a.displaced_owed().inbound
    assert kept.message_id == "<kept@hospital>"


def test_a_failure_settled_with_its_receipt_in_the_row_names_that_receipt_after_a_retry_on_b(
    layout: DemoLayout, nodes: tuple[Spool, Spool], clock: SetClock, tmp_path: Path
) -> None:
    """Node a settles a message as failed by a receipt kept in its row, and is killed
    before its message.failed; an operator retries it on node b, which clears the
    receipt.  a's start writes message.failed naming the receipt a kept, by its SHA-256,
    as a running a would have: the copy of the row kept for it holds that much of it."""
    a, b = nodes
    queued(a, tmp_path, "<m@lab>")
    start_outbound(layout, a, clock)
    a.claim_due("hospital", clock.now().timestamp(), 1)
    sha256 = "5e" * 32
    failed = Settled(
        "<m@lab>",
        OutboundState.FAILED,
        "processed/error: decryption-failed",
        None,
        "decryption failed at the peer",
        receipt=b"sealed receipt",
        receipt_sha256=sha256,
    )
    assert a.mark_settled([failed]) == ["<m@lab>"]
    # Killed here.  An operator on node b retries it: the receipt is cleared.
    clock.advance(5)
    retried = b.operator_retry("<m@lab>", "operator:root (uid 0)", 0)
    assert retried.state is OutboundState.QUEUED and not retried.has_receipt
    [kept] = a.displaced_owed().outbound
    assert kept.receipt_kept and kept.receipt_sha256 == sha256

    clock.advance(5)
    for _ in range(2):  # a second start finds it recorded
        start_outbound(layout, a, clock)
    [record] = _records(layout, "message.failed")
    assert record["message_id"] == "<m@lab>" and record["node"] == "a"
    assert record["detail"] == {
        "disposition": "processed/error: decryption-failed",
        "receipt": "spool",
        "receipt_sha256": sha256,
        "attempts": 1,
        "recorded_at_recovery": True,
    }
    assert a.displaced_owed() == DisplacedOwed()


def test_a_copy_kept_before_the_upgrade_without_the_receipts_sha256_is_still_recorded(
    layout: DemoLayout, nodes: tuple[Spool, Spool], clock: SetClock, tmp_path: Path
) -> None:
    """A copy of a row kept by the release before (no receipt_sha256 column then, so
    none in the copy) is read as a copy without a receipt: a's start writes its record
    rather than failing on the column the copy lacks, at every start."""
    a, b = nodes
    queued(a, tmp_path, "<m@lab>")
    start_outbound(layout, a, clock)
    a.claim_due("hospital", clock.now().timestamp(), 1)
    failed = Settled("<m@lab>", OutboundState.FAILED, "processed/error: x", None, "refused")
    assert a.mark_settled([failed]) == ["<m@lab>"]
    clock.advance(5)
    b.operator_retry("<m@lab>", "operator:root (uid 0)", 0)
    assert isinstance(a, SqlStore)

    def as_before(db: Connection) -> None:  # the copy as the release before kept it
        [row] = db.execute("SELECT snapshot FROM displaced_owed", ()).fetchall()
        older = json.loads(row["snapshot"])
        del older["receipt_sha256"]
        db.execute("UPDATE displaced_owed SET snapshot=?", (json.dumps(older),))

    a._transact(as_before)
    [kept] = a.displaced_owed().outbound
    assert kept.receipt_sha256 is None and not kept.has_receipt

    clock.advance(5)
    start_outbound(layout, a, clock)
    [record] = _records(layout, "message.failed")
    assert record["message_id"] == "<m@lab>" and record["detail"]["recorded_at_recovery"]
    assert "receipt" not in record["detail"]
    assert a.displaced_owed() == DisplacedOwed()
