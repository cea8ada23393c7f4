"""The spool's per-message queries stay index lookups however long the queue is.

After a peer's outage thousands of messages wait for it.  The sender's loop asks
for the due messages and for expired ones after every send; if SQLite had
to scan and sort the whole queue for that, each message would cost time in
proportion to the backlog and the queue would drain ever more slowly.  These
tests read SQLite's own query plan (``EXPLAIN QUERY PLAN``) of the statements
the spool really runs, on a spool with a backlog.
"""

from __future__ import annotations

import contextlib
import sqlite3
from collections.abc import Callable
from pathlib import Path

import pytest

from gateway.errors import InvalidTypeError
from gateway.spool import (
    HandoverState,
    OutboundState,
    RetainedKind,
    Settled,
    Spool,
    SqliteSpool,
)
from gateway.spool.sql import state_is
from tests.clocks import TickingClock
from tests.conftest import MakeSpool
from tests.helpers.spool_indexes import RETENTION_FIRST_FORMS

BACKLOG = 500
# Retention's indexes of the hand-overs and received messages (gateway.spool.schema).
RETENTION_INDEXES = (
    "handover_copy_kept_at",
    "handover_copy_gone_at",
    "inbound_receipt_kept_at",
    "inbound_receipt_gone_at",
)
# And those of the messages sent whose receipts went, SQLite's alone.
SENT_RETENTION_INDEXES = ("outbound_receipt_gone_at", "outbound_peer_receipt_gone_at")


def with_backlog(spool: Spool, tmp_path: Path) -> None:
    for peer in ("lab", "pharmacy"):
        for i in range(BACKLOG):
            message_id = f"<{peer}-{i}@hospital>"
            spool.add_intake(
                message_id,
                peer,
                f"doc-{i}.hl7",
                "application/hl7-v2",
                tmp_path / f"{peer}-{i}",
                tmp_path / f"payload-{peer}-{i}",
                expires_at=2e9 + i,
            )
            spool.mark_queued(message_id, tmp_path / f"body-{peer}-{i}", [], "mic", 10)


@pytest.fixture
def spool(tmp_path: Path) -> SqliteSpool:
    spool = SqliteSpool(tmp_path / "spool.db", TickingClock())
    with_backlog(spool, tmp_path)
    return spool


@pytest.fixture
def any_spool(tmp_path: Path, make_spool: MakeSpool) -> Spool:
    """A spool of each backend in turn, with the backlog."""
    spool = make_spool(TickingClock())
    with_backlog(spool, tmp_path)
    return spool


def statements_of(spool: SqliteSpool, call: Callable[[], object]) -> list[str]:
    """The SQL statements (parameters filled in) that ``call`` runs on the spool."""
    seen: list[str] = []
    spool.trace(seen.append)
    try:
        call()
    finally:
        spool.trace(None)
    return [s for s in seen if s.lstrip().upper().startswith("SELECT")]


def plan(database: Path, statement: str) -> list[str]:
    """How SQLite answers ``statement`` on the spool database file at ``database``."""
    with contextlib.closing(sqlite3.connect(f"file:{database}?mode=ro", uri=True)) as db:
        return [row[3] for row in db.execute(f"EXPLAIN QUERY PLAN {statement}")]


@pytest.mark.parametrize(
    ("what", "call", "searched_by"),
    [
        ("due messages", lambda s: s.claim_due("lab", 2e9, 4), "outbound_queued (peer=?)"),
        (
            "expired messages",
            lambda s: s.expire_due("lab", 2e9 + 10),
            "expires_at>? AND expires_at<?",
        ),
        (
            "unanswered messages",
            lambda s: s.requeue_unanswered("lab", "2026-11-26T03:00:00"),
            "updated_at<?",
        ),
        # The messages being sent (no more than the sends under way), whichever peer.
        (
            "interrupted messages",
            lambda s: s.requeue_interrupted("lab"),
            "outbound_state (state=? AND peer=?)",
        ),
        (
            "rows changed since the audit trail's last record",
            lambda s: s.outbound_changed_since("2026-11-26T03:00:00"),
            "updated_at>?",
        ),
        ("due hand-overs", lambda s: s.handover_due(2e9), "next_attempt_at<?"),
        ("next hand-over time", lambda s: s.handover_next_at(), "state=?"),
        ("operator's latest messages", lambda s: s.list_outbound(limit=20), "outbound_created"),
        ("a peer's messages", lambda s: s.list_outbound(peer="lab"), "outbound_peer (peer=?)"),
        (
            "payload files found at start",
            lambda s: s.payloads_recorded(["payload-lab-1", "payload-lab-2", "gone"]),
            "USING INDEX outbound_payload_name",
        ),
        (
            "copies of documents in intake found at start",
            lambda s: s.intakes_by_payload(["payload-lab-1", "payload-lab-2", "gone"]),
            "USING INDEX outbound_payload_name",
        ),
        (
            "receipt files found at start",
            lambda s: s.receipts_recorded(["a.0123456789ab.mdn", "b.mdn"]),
            "USING COVERING INDEX outbound_receipt_file",
        ),
        (
            "outbox files found at start",
            lambda s: s.outbound_by_source(["/outbox/lab/a.hl7", "/outbox/lab/b.hl7"]),
            "USING INDEX outbound_source",
        ),
    ],
)
def test_a_per_message_query_neither_scans_nor_sorts_the_queue(
    spool: SqliteSpool,
    tmp_path: Path,
    what: str,
    call: Callable[[SqliteSpool], object],
    searched_by: str,
) -> None:
    """Each condition is answered by an index (SEARCH ... (cond)), the order comes from
    the index (no temporary B-tree), and no table is read whole."""
    statements = statements_of(spool, lambda: call(spool))
    assert statements, f"{what}: no SELECT seen"
    plans = {statement: plan(tmp_path / "spool.db", statement) for statement in statements}
    for statement, steps in plans.items():
        whole = [s for s in steps if s.startswith("SCAN ") and " USING " not in s]
        sorts = [s for s in steps if "TEMP B-TREE" in s]
        assert not whole and not sorts, f"{what}: {statement}\n  plan: {steps}"
    assert any(searched_by in s for steps in plans.values() for s in steps), f"{what}: {plans}"


def test_due_messages_are_claimed_earliest_due_then_oldest(any_spool: Spool) -> None:
    spool = any_spool
    claimed, next_at = spool.claim_due("lab", 1.0, 1)
    assert [r.message_id for r in claimed] == ["<lab-0@hospital>"]
    assert claimed[0].attempts == 0  # as it was before this attempt
    assert spool.get("<lab-0@hospital>").state is OutboundState.SENDING  # type: ignore[union-attr]
    assert spool.get("<lab-0@hospital>").attempts == 1  # type: ignore[union-attr]
    assert next_at == 0  # the next one is due already
    spool.mark_retry("<lab-0@hospital>", "connection refused", 2e9)  # later than the rest
    claimed, _ = spool.claim_due("lab", 1.0, 3)
    assert [r.message_id for r in claimed] == [f"<lab-{i}@hospital>" for i in (1, 2, 3)]
    assert spool.get("<pharmacy-1@hospital>").state is OutboundState.QUEUED  # type: ignore[union-attr]


def test_a_message_not_yet_due_is_not_claimed_and_says_when_it_is(
    tmp_path: Path, make_spool: MakeSpool
) -> None:
    spool = make_spool(TickingClock())
    spool.add_intake(
        "<m@lab>", "lab", "a.hl7", "application/hl7-v2", tmp_path / "a", tmp_path / "p"
    )
    spool.mark_queued("<m@lab>", tmp_path / "b", [], "mic", 10)
    spool.mark_sending("<m@lab>")
    spool.mark_retry("<m@lab>", "connection refused", 500.0)
    assert spool.claim_due("lab", 100.0, 4) == ([], 500.0)
    assert spool.get("<m@lab>").state is OutboundState.QUEUED  # type: ignore[union-attr]
    assert spool.claim_due("pharmacy", 100.0, 4) == ([], None)  # nothing queued at all
    claimed, next_at = spool.claim_due("lab", 500.0, 4)
    assert [r.message_id for r in claimed] == ["<m@lab>"] and next_at is None


def test_expiry_takes_exactly_the_messages_past_their_time(any_spool: Spool) -> None:
    spool = any_spool
    expired = spool.expire_due("lab", 2e9 + 3)
    assert expired == [f"<lab-{i}@hospital>" for i in range(3)]
    assert {spool.get(m).state for m in expired} == {OutboundState.EXPIRED}  # type: ignore[union-attr]
    assert spool.get("<pharmacy-0@hospital>").state is OutboundState.QUEUED  # type: ignore[union-attr]


def test_the_data_keys_nearest_an_item_are_found_in_order_by_version_and_item(
    spool: SqliteSpool, tmp_path: Path
) -> None:
    """The data keys of one version nearest an item: each side searched in the index by
    version and item, the nearest first, not every data key of the version read and
    sorted (a temporary B-tree)."""
    [statement] = statements_of(spool, lambda: spool.sample_data_keys(2, around="item"))
    steps = plan(tmp_path / "spool.db", statement)
    searched = [s for s in steps if s.startswith("SEARCH data_keys")]
    assert searched == [
        "SEARCH data_keys USING INDEX data_keys_kek_item (kek=? AND item<?)",
        "SEARCH data_keys USING INDEX data_keys_kek_item (kek=? AND item>?)",
    ], steps
    assert not [s for s in steps if "TEMP B-TREE" in s], steps


def test_an_existing_spool_gets_the_new_indexes_when_opened(tmp_path: Path) -> None:
    path = tmp_path / "spool.db"
    db = sqlite3.connect(path)
    db.execute(
        "CREATE TABLE outbound (message_id TEXT PRIMARY KEY, peer TEXT NOT NULL,"
        " filename TEXT NOT NULL, content_type TEXT NOT NULL, source_path TEXT NOT NULL,"
        " payload_path TEXT NOT NULL, body_path TEXT, headers TEXT, mic TEXT, size INTEGER,"
        " state TEXT NOT NULL, attempts INTEGER NOT NULL DEFAULT 0,"
        " next_attempt_at REAL NOT NULL DEFAULT 0, last_error TEXT, disposition TEXT,"
        " receipt_path TEXT, expires_at REAL NOT NULL DEFAULT 0, created_at TEXT NOT NULL,"
        " updated_at TEXT NOT NULL)"
    )
    db.execute("CREATE INDEX outbound_due ON outbound (peer, state, next_attempt_at)")
    db.commit()
    db.close()
    spool = SqliteSpool(path, TickingClock())
    with contextlib.closing(sqlite3.connect(path)) as db:
        names = {r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type='index'")}
    assert {
        "outbound_queued",
        "outbound_expiring",
        "outbound_awaiting",
        "outbound_created",
        "outbound_peer",
        "handover_message",
        *RETENTION_INDEXES,
        *SENT_RETENTION_INDEXES,
    } <= names
    assert "outbound_due" not in names  # a prefix of outbound_next: only slows writes
    # Their first forms, of every row by state: each change of state wrote their pages.
    assert not {"outbound_next", "outbound_expiry", "outbound_unanswered"} & names
    # The index by state has the peer beside it now (the queue is counted from it).
    assert "outbound_state" in names and "outbound_lease" not in names
    statement = statements_of(spool, lambda: spool.claim_due("lab", 0.0, 4))[0]
    assert not [s for s in plan(path, statement) if "TEMP B-TREE" in s]


def with_received(spool: Spool, tmp_path: Path) -> None:
    """Received messages of a peer none of whose messages sent are finished, in each state
    retention tells apart: being written; answered, their hand-over to make, failed, or
    done; of those done, the inbox copies of a few disposed of; and, older, received
    messages whose copies, hand-over records and receipts sent were all disposed of."""
    later = "2999-01-01T00:00:00+00:00"

    def receive(name: str, count: int, states: int) -> None:
        for i in range(count):
            message_id = f"<{name}-{i}@radiology>"
            spool.inbound_begin("radiology", message_id, "aa", tmp_path / f"{name}-{i}.hl7")
            if i % states == 3:
                continue  # being written
            spool.inbound_delivered("radiology", message_id, [], b"r", ("text/plain", 3))
            if i % states == 4:
                assert spool.handover_failed("radiology", message_id, "refused")
            elif i % states != 5:  # 5: to make
                spool.handover_done("radiology", message_id)

    def dispose(kind: RetainedKind, limit: int) -> None:
        disposed = spool.dispose(spool.disposable(kind, later, limit=limit))
        assert len(disposed) == limit, kind
        spool.files_removed(disposed)

    receive("finished", 3, 6)
    for kind in (RetainedKind.RECEIVED, RetainedKind.HANDOVER, RetainedKind.RECEIPTS):
        dispose(kind, 3)
    receive("received", 24, 6)
    dispose(RetainedKind.RECEIVED, 4)


@pytest.mark.parametrize(
    ("kind", "table", "index"),
    [
        (RetainedKind.RECEIVED, "handover", "handover_copy_kept_at"),
        (RetainedKind.HANDOVER, "handover", "handover_copy_gone_at"),
        (RetainedKind.RECEIPTS, "inbound", "inbound_receipt_kept_at"),
        (RetainedKind.SPOOL, "inbound", "inbound_receipt_gone_at"),
    ],
)
@pytest.mark.parametrize("sweep", [False, True], ids=["purge", "sweep"])
def test_retention_s_batches_of_received_messages_read_their_own_index_in_its_order(
    spool: SqliteSpool,
    tmp_path: Path,
    kind: RetainedKind,
    table: str,
    index: str,
    sweep: bool,
) -> None:
    """Each retention batch of inbox copies, hand-over records, receipts sent and
    received messages' records, on a spool without statistics (SQLite gathers none by
    itself), reads the index of that rule's own rows by state and time, oldest first:
    not every hand-over done or received message answered read through the leases'
    indexes by state and sorted, for each batch of 64 (5-15 ms against 0.2-0.6 ms per
    batch on 20,000 of each, bench/retention_batch_bench.py)."""
    with_received(spool, tmp_path)
    found: list[object] = []

    def batch() -> None:
        if sweep:  # the daemon's: one peer's and service's (none here) at a time
            found.extend(
                spool.disposable(kind, "2999", peer="radiology", service=None, any_service=False)
            )
        else:  # a purge's (`medgw purge`): every peer and service
            found.extend(spool.disposable(kind, "2999"))

    statements = statements_of(spool, batch)
    assert found, f"{kind.value}: nothing found: the spool is not as the test made it"
    plans = {statement: plan(tmp_path / "spool.db", statement) for statement in statements}
    [steps] = [steps for statement, steps in plans.items() if f"FROM {table} WHERE" in statement]
    assert steps[0] == f"SEARCH {table} USING INDEX {index} (state=? AND updated_at<?)", steps
    assert not [s for s in steps if "TEMP B-TREE" in s], steps


def with_sent(spool: Spool, tmp_path: Path) -> list[str]:
    """Messages sent to a peer that sent none (clinic), one after the other: delivered
    with their receipts, one in five cancelled instead (before it was sent, so without
    one), and the receipts of the ten oldest delivered disposed of.  Returns the
    messages whose records retention may dispose of (those without a receipt), oldest
    first."""
    finished: list[str] = []
    for i in range(24):
        message_id = f"<sent-{i}@hospital>"
        spool.add_intake(
            message_id, "clinic", "d.hl7", "text/plain", tmp_path / "s", tmp_path / "p"
        )
        spool.mark_queued(message_id, None, [], "mic", 3, body=b"sealed")
        if i % 5 == 2:
            spool.operator_cancel(message_id, "operator:test")
        else:
            spool.mark_sending(message_id)
            spool.mark_done(message_id, OutboundState.DELIVERED, "processed", tmp_path / "r")
        finished.append(message_id)
    receipts = spool.disposable(
        RetainedKind.RECEIPTS, "2999", peer="clinic", service=None, any_service=False, limit=10
    )
    assert len(spool.dispose(receipts)) == 10
    gone = {item.message_id for item in receipts}
    return [m for i, m in enumerate(finished) if i % 5 == 2 or m in gone]


@pytest.mark.parametrize("sweep", [False, True], ids=["purge", "sweep"])
def test_retention_s_batches_of_messages_sent_records_read_their_own_index_in_its_order(
    spool: SqliteSpool, tmp_path: Path, sweep: bool
) -> None:
    """Each retention batch of the records of messages sent, on a spool without
    statistics, reads the index of the messages delivered or cancelled whose receipts
    went, each state apart by state and time (by peer too in the sweep's form), oldest
    first, and merges the two: not every message delivered or cancelled read through the
    index by state and sorted, for each batch of 64 (5.7 ms against 0.2 ms per batch on
    20,000, bench/retention_batch_bench.py)."""
    with_sent(spool, tmp_path)
    found: list[object] = []

    def batch() -> None:
        if sweep:  # the daemon's: one peer's and service's (none here) at a time
            found.extend(
                spool.disposable(
                    RetainedKind.SPOOL, "2999", peer="clinic", service=None, any_service=False
                )
            )
        else:  # a purge's (`medgw purge`): every peer and service
            found.extend(spool.disposable(RetainedKind.SPOOL, "2999"))

    statements = statements_of(spool, batch)
    assert found, "nothing found: the spool is not as the test made it"
    [steps] = [
        plan(tmp_path / "spool.db", statement)
        for statement in statements
        if "FROM outbound WHERE" in statement
    ]
    index = (
        "outbound_peer_receipt_gone_at (state=? AND peer=? AND updated_at<?)"
        if sweep
        else "outbound_receipt_gone_at (state=? AND updated_at<?)"
    )
    reads = [s for s in steps if s.startswith(("SEARCH ", "SCAN "))]
    assert reads == [f"SEARCH outbound USING INDEX {index}"] * 2, steps
    assert not [s for s in steps if "TEMP B-TREE" in s], steps


@pytest.mark.parametrize("limit", [5, 64])
def test_a_batch_of_messages_sent_records_is_the_oldest_whichever_their_state(
    tmp_path: Path, make_spool: MakeSpool, limit: int
) -> None:
    """A batch of the records of messages sent holds those delivered and cancelled alike,
    oldest first, in the purge's form and the sweep's, and only those whose receipts
    went: the states read apart (SQLite) or together (PostgreSQL), the same rows."""
    spool = make_spool(TickingClock())
    expected = with_sent(spool, tmp_path)
    purge = spool.disposable(RetainedKind.SPOOL, "2999", limit=limit)
    sweep = spool.disposable(
        RetainedKind.SPOOL, "2999", peer="clinic", service=None, any_service=False, limit=limit
    )
    assert [item.message_id for item in purge] == expected[:limit]
    assert [item.message_id for item in sweep] == expected[:limit]
    assert spool.disposable(RetainedKind.SPOOL, "2999", peer="lab", any_service=True) == []


def test_a_spool_with_retention_s_first_indexes_gets_their_new_forms_when_opened(
    tmp_path: Path,
) -> None:
    """A spool of the version before has retention's indexes of the time alone: the
    first start after the upgrade replaces them, and the batches read the new ones."""
    path = tmp_path / "spool.db"
    SqliteSpool(path, TickingClock()).close()
    with contextlib.closing(sqlite3.connect(path)) as db:
        for name in RETENTION_INDEXES:
            db.execute(f"DROP INDEX {name}")
        for statement in RETENTION_FIRST_FORMS.values():
            db.execute(statement)
        db.commit()
    spool = SqliteSpool(path, TickingClock())
    with_received(spool, tmp_path)
    with contextlib.closing(sqlite3.connect(path)) as db:
        names = {r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type='index'")}
    assert not set(RETENTION_FIRST_FORMS) & names
    assert set(RETENTION_INDEXES) <= names
    statements = statements_of(spool, lambda: spool.disposable(RetainedKind.HANDOVER, "2999"))
    steps = [s for statement in statements for s in plan(path, statement)]
    assert any("USING INDEX handover_copy_gone_at" in s for s in steps), steps


def test_renewing_leases_looks_up_the_claims_even_with_the_planner_s_statistics(
    spool: SqliteSpool, tmp_path: Path
) -> None:
    """A node renews its claims every few seconds while the queue may hold a million
    messages.  Once SQLite has statistics (``ANALYZE``, or ``PRAGMA optimize``), it
    judges each state's share of the queue by them: the renewal must still be an index
    lookup by state, never a read of every waiting message (bench/spool_scale_bench.py:
    250 ms per renewal at a million waiting when it was)."""
    claimed, _ = spool.claim_due("lab", 2e9, 4)
    assert len(claimed) == 4
    with contextlib.closing(sqlite3.connect(tmp_path / "spool.db")) as db:
        db.execute("ANALYZE")
    seen: list[str] = []
    spool.trace(seen.append)
    try:
        assert spool.renew_leases() == 4
    finally:
        spool.trace(None)
    updates = [s for s in seen if s.lstrip().upper().startswith("UPDATE OUTBOUND")]
    assert updates
    for statement in updates:
        steps = plan(tmp_path / "spool.db", statement)
        assert not [s for s in steps if s.startswith("SCAN ")], f"{statement}\n  plan: {steps}"
        assert any("USING INDEX outbound_state" in s for s in steps), steps


def test_a_peers_pending_messages_by_recipient_are_read_through_the_state_indexes(
    spool: SqliteSpool, tmp_path: Path
) -> None:
    """A start and every reload count each peer's messages not yet delivered by the
    certificate they are encrypted to: each state read through an index by state, never
    the whole table (mostly delivered messages, kept for months)."""
    statements = statements_of(spool, lambda: spool.pending_by_recipient("lab"))
    assert statements
    for statement in statements:
        steps = plan(tmp_path / "spool.db", statement)
        whole = [s for s in steps if s.startswith("SCAN outbound") and " USING " not in s]
        assert not whole, f"{statement}\n  plan: {steps}"
        searched = [s for s in steps if s.startswith("SEARCH outbound USING ")]
        assert len(searched) == 3, steps  # queued, being sent, awaiting a receipt


def test_pending_by_recipient_counts_each_state_not_yet_delivered(
    make_spool: MakeSpool, tmp_path: Path
) -> None:
    """Queued, being sent and awaiting a receipt count; delivered messages, another
    peer's and those prepared before the certificate was recorded do not (both
    backends)."""
    spool = make_spool(TickingClock())
    messages = [
        ("queued", "lab", "A"),
        ("queued", "lab", "B"),
        ("sending", "lab", "A"),
        ("awaiting", "lab", "A"),
        ("delivered", "lab", "A"),
        ("queued", "pharmacy", "A"),
        ("queued", "lab", None),
    ]
    for i, (state, peer, encrypted_for) in enumerate(messages):
        message_id = f"<{i}@hospital>"
        spool.add_intake(
            message_id,
            peer,
            f"d{i}.hl7",
            "x-application/hl7",
            tmp_path / f"s{i}",
            tmp_path / f"p{i}",
        )
        spool.mark_queued(message_id, None, [], "mic", 3, encrypted_for, body=b"abc")
        if state != "queued":
            spool.mark_sending(message_id)
        if state in ("awaiting", "delivered"):
            assert spool.mark_awaiting_receipt(message_id)
        if state == "delivered":
            settled = Settled(
                message_id,
                OutboundState.DELIVERED,
                "processed",
                None,
                found=OutboundState.AWAITING_RECEIPT,
            )
            assert spool.mark_settled([settled]) == [message_id]
    assert spool.pending_by_recipient("lab") == {"A": 3, "B": 1}
    assert spool.pending_by_recipient("pharmacy") == {"A": 1}
    assert spool.pending_by_recipient("clinic") == {}


def test_the_queue_is_counted_from_an_index_its_changes_of_state_move_anyway(
    spool: SqliteSpool, tmp_path: Path
) -> None:
    """The count of messages by peer and state (the status page, the metrics, the daily
    report) reads the index by state and peer alone, in its order: never the table's
    rows, most of them delivered messages kept for months (0.09 s against 1.0 s on 1.3
    million, bench/README.md).  That index is the one a change of state moves a
    message's entry in for its lease anyway: counting costs no page written per change
    (tests/test_spool_pages.py)."""
    claimed, _ = spool.claim_due("lab", 2e9, 4)
    assert len(claimed) == 4
    statements = statements_of(spool, spool.counts)
    assert len(statements) == 1
    steps = plan(tmp_path / "spool.db", statements[0])
    assert steps == ["SCAN outbound USING COVERING INDEX outbound_state"], steps
    assert spool.counts() == {
        ("lab", "queued"): BACKLOG - 4,
        ("lab", "sending"): 4,
        ("pharmacy", "queued"): BACKLOG,
    }


def test_a_state_is_written_into_a_statement_only_from_the_spool_s_own_states() -> None:
    """Lookups by state name their state in the statement's text (PostgreSQL's generic
    plans, tests/test_spool_generic_plans.py): only a state of the spool's own is
    written so, never a string, whatever it holds."""
    assert state_is(OutboundState.AWAITING_RECEIPT) == "state='awaiting-receipt'"
    assert state_is(HandoverState.PENDING) == "state='pending'"
    for given in ("queued", "queued' OR '1'='1"):
        with pytest.raises(InvalidTypeError, match="one of the spool's states"):
            state_is(given)  # type: ignore[arg-type]


def test_a_listing_by_state_finds_that_state_s_rows_newest_first(
    any_spool: Spool, tmp_path: Path
) -> None:
    """An operator's listings by state (`medgw queue list --state`, `medgw handover list
    --state`, the local API), their state written in the statement's text on either
    backend: exactly that state's messages and hand-overs, newest first, up to the
    limit.  A string given for a state is refused, never written into a statement."""
    spool = any_spool
    claimed, _ = spool.claim_due("lab", 2e9, 3)
    sending = spool.list_outbound(state=OutboundState.SENDING)
    assert [r.message_id for r in sending] == [r.message_id for r in reversed(claimed)]
    queued = spool.list_outbound(state=OutboundState.QUEUED, peer="lab", limit=5)
    assert [r.message_id for r in queued] == [f"<lab-{i}@hospital>" for i in range(499, 494, -1)]
    assert {r.state for r in queued} == {OutboundState.QUEUED}
    assert len(spool.list_outbound(state=OutboundState.QUEUED)) == 2 * BACKLOG - 3
    assert spool.list_outbound(state=OutboundState.FAILED) == []
    for i in range(3):
        spool.inbound_begin("lab", f"<in-{i}@lab>", "aa", tmp_path / f"in-{i}.hl7")
        spool.inbound_delivered("lab", f"<in-{i}@lab>", [], b"r", ("text/plain", 3))
    spool.handover_failed("lab", "<in-1@lab>", "gone")
    pending = spool.handover_list(state=HandoverState.PENDING)
    assert [h.message_id for h in pending] == ["<in-2@lab>", "<in-0@lab>"]
    [failed] = spool.handover_list(state=HandoverState.FAILED, message_id="<in-1@lab>")
    assert failed.state is HandoverState.FAILED
    assert spool.handover_list(state=HandoverState.DONE) == []
    for given in ("queued", "pending' OR '1'='1"):
        with pytest.raises(InvalidTypeError, match="one of the spool's states"):
            spool.list_outbound(state=given)  # type: ignore[arg-type]
        with pytest.raises(InvalidTypeError, match="one of the spool's states"):
            spool.handover_list(state=given)  # type: ignore[arg-type]


def test_a_peer_s_messages_a_message_s_hand_overs_and_finished_records_are_found(
    any_spool: Spool, tmp_path: Path
) -> None:
    """A peer's messages in every state, newest first, up to the limit (`medgw queue list
    --peer`); a message's hand-overs, whichever peer sent it, newest first (`medgw
    handover retry`); and retention's batches of finished records, oldest first, up to
    its limit: the same rows on either backend, whatever indexes and plans serve them."""
    spool = any_spool
    claimed, _ = spool.claim_due("lab", 2e9, 3)
    for record in claimed[:2]:
        assert spool.mark_awaiting_receipt(record.message_id)
        found = OutboundState.AWAITING_RECEIPT
        settled = Settled(
            record.message_id, OutboundState.DELIVERED, "processed", None, found=found
        )
        assert spool.mark_settled([settled]) == [record.message_id]
    listed = spool.list_outbound(peer="lab", limit=BACKLOG)
    assert [r.message_id for r in listed] == [
        f"<lab-{i}@hospital>" for i in reversed(range(BACKLOG))
    ]
    assert {r.state for r in listed} == {
        OutboundState.QUEUED,
        OutboundState.SENDING,
        OutboundState.DELIVERED,
    }
    newest = spool.list_outbound(peer="pharmacy", limit=2)
    assert [r.message_id for r in newest] == ["<pharmacy-499@hospital>", "<pharmacy-498@hospital>"]
    assert spool.list_outbound(peer="clinic") == []
    for peer, message_id in (("lab", "<in-1@x>"), ("lab", "<in-2@x>"), ("pharmacy", "<in-1@x>")):
        spool.inbound_begin(peer, message_id, "aa", tmp_path / f"{peer}-{message_id}.hl7")
        spool.inbound_delivered(peer, message_id, [], b"r", ("text/plain", 3))
    handovers = spool.handover_list(message_id="<in-1@x>")
    assert [(h.peer, h.message_id) for h in handovers] == [
        ("pharmacy", "<in-1@x>"),
        ("lab", "<in-1@x>"),
    ]
    assert spool.handover_list(message_id="<in-3@x>") == []
    later = "2999-01-01T00:00:00+00:00"
    [oldest] = spool.disposable(RetainedKind.SPOOL, later, limit=1)
    assert (oldest.table, oldest.message_id) == ("outbound", claimed[0].message_id)
    batch = spool.disposable(RetainedKind.SPOOL, later, peer="lab")
    assert [(d.table, d.message_id) for d in batch] == [
        ("outbound", r.message_id) for r in claimed[:2]
    ]
