"""The PostgreSQL spool's lookups by state stay index lookups under generic plans.

psycopg prepares a statement once it has run a few times on a connection, and
PostgreSQL may then plan it once for every value of its parameters (a generic
plan).  The queue's lookups by state are served by indexes of the rows in one
state (``outbound_queued``, ``outbound_expiring``, ``outbound_awaiting``): a
plan for any value of a bound state cannot use them, and reads every row in the
state through an index of all states, or the whole table (with a million rows,
mostly delivered messages kept for months).  So the spool writes those states
as text.  SQLite matches a bound state to a partial index, so only a real
PostgreSQL server, made to plan every statement generically
(``plan_cache_mode = force_generic_plan``), tells: these tests run the spool's
own methods and read the plans its statements were run with, as
``auto_explain`` logged them.  Besides the sender's lookups, the take-overs every node
runs after each renewal of its leases (of the outbound messages, the intake and the
hand-overs of a node whose claims ran out), the claims of a node's own unfinished
work at its start, and an operator's listings of the messages and hand-overs in one
state.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from gateway.spool import HandoverState, OutboundState, RetainedKind
from gateway.spool.postgres import PostgresSettings, PostgresSpool
from tests.clocks import TickingClock
from tests.helpers.postgres import PostgresServer

pytestmark = pytest.mark.usefixtures("postgres_server")

# Other peers' backlogs (after an outage) and delivered messages kept for months: most of
# a spool's rows are not the looked-up peer's waiting ones.
PEERS = ("pharmacy", "radiology", "clinic")
WAITING = 500
DELIVERED = 20_000
# A node that died: its claims (messages taken in and being sent, hand-overs) ran out.
DEAD = "node-dead"
HELD = 50
COLUMNS = (
    "message_id, peer, filename, content_type, source_path, payload_path, mic, size, state,"
    " attempts, expires_at, encrypted_for, created_at, updated_at, node, lease_until, payload"
)
HANDOVER_COLUMNS = (
    "peer, message_id, path, content_type, sha256, size, state, next_attempt_at,"
    " created_at, updated_at, node, lease_until, copy_purged_at"
)
INBOUND_COLUMNS = (
    "peer, message_id, sha256, target_path, state, receipt_body, received_at, updated_at"
)
STAMP = "2026-01-01T00:00:00+00:00"
# Those whose lookups by state, and retention's batches, these tests read.
TABLES = ("outbound", "handover", "inbound")


def others() -> Iterator[tuple[object, ...]]:
    """Rows of the other peers' backlogs (queued, half of them expiring, and awaiting
    their receipts), of the dead node's claims (taken in, being sent), of messages that
    failed (for an operator to retry), and of delivered messages."""
    kinds = [
        (peer, state, WAITING)
        for peer in PEERS
        for state in (OutboundState.QUEUED, OutboundState.AWAITING_RECEIPT)
    ]
    held = [
        (peer, state, HELD)
        for peer in PEERS
        for state in (OutboundState.INTAKE, OutboundState.SENDING)
    ]
    failed = [(peer, OutboundState.FAILED, HELD) for peer in PEERS]
    delivered = ("lab", OutboundState.DELIVERED, DELIVERED)
    for peer, state, count in [*kinds, *held, *failed, delivered]:
        node, lease_until = (DEAD, 1.0) if (peer, state, count) in held else (None, 0.0)
        payload = b"document" if state is OutboundState.INTAKE else None
        for i in range(count):
            expires_at = 2e9 + i if i % 2 else 0.0
            message_id = f"<{peer}-{state.value}-{i}@hospital>"
            text = ("d.hl7", "text/plain", "/s", "/p", "mic")
            yield (
                *(message_id, peer, *text, 3, state.value, 1, expires_at, "A", STAMP, STAMP),
                *(node, lease_until, payload),
            )


def handovers() -> Iterator[tuple[object, ...]]:
    """Hand-overs: done (kept for years, as the resend detection needs them; the inbox
    copies of the older half disposed of, `received_days` being shorter), some the dead
    node was making, some to make, and some that failed (for an operator)."""
    for state, count, node, lease_until in (
        (HandoverState.DONE, DELIVERED, None, 0.0),
        (HandoverState.PENDING, HELD, DEAD, 1.0),
        (HandoverState.PENDING, HELD, None, 0.0),
        (HandoverState.FAILED, HELD, None, 0.0),
    ):
        for i in range(count):
            message_id = f"<handover-{state.value}-{node}-{i}@hospital>"
            text = ("/inbox/d.hl7", "text/plain", "0" * 64, 3)
            purged = STAMP if state is HandoverState.DONE and i < count // 2 else None
            yield (
                *("lab", message_id, *text, state.value, 0.0, STAMP, STAMP, node),
                *(lease_until, purged),
            )


def received() -> Iterator[tuple[object, ...]]:
    """Received messages answered with their receipt, kept for years (the receipts sent,
    kept to answer a resend, gone from the older half), and some being written: of a peer
    none of whose messages sent were delivered, nor handed over."""
    for state, count in (("delivered", DELIVERED), ("delivering", HELD)):
        for i in range(count):
            receipt = None if state == "delivered" and i < count // 2 else b"receipt"
            message_id = f"<received-{state}-{i}@hospital>"
            text = ("0" * 64, "/inbox/d.hl7", state, receipt, STAMP, STAMP)
            yield ("radiology", message_id, *text)


@pytest.fixture
def generic(postgres_server: PostgresServer, postgres: PostgresSettings, tmp_path: Path) -> Path:
    """A spool with messages in every state the queue looks up, among other peers'
    backlogs and many delivered messages; every new session of its database plans each
    statement generically and logs the plan it ran.  Returns the server's log."""
    spool = PostgresSpool(postgres, TickingClock())
    for i in range(40):
        message_id = f"<{i}@hospital>"
        spool.add_intake(
            message_id, "lab", "a.hl7", "text/plain", tmp_path, tmp_path, expires_at=2e9 + i
        )
        spool.mark_queued(message_id, None, [], "mic", 3, "A", body=b"sealed")
    sent, _ = spool.claim_due("lab", 2e9, 20)
    for record in sent[:10]:
        assert spool.mark_awaiting_receipt(record.message_id)
    spool.close()
    name = postgres.dbname
    with postgres_server.admin(name) as db:
        with db.cursor().copy(f"COPY outbound ({COLUMNS}) FROM STDIN") as copy:
            for row in others():
                copy.write_row(row)
        with db.cursor().copy(f"COPY handover ({HANDOVER_COLUMNS}) FROM STDIN") as copy:
            for row in handovers():
                copy.write_row(row)
        with db.cursor().copy(f"COPY inbound ({INBOUND_COLUMNS}) FROM STDIN") as copy:
            for row in received():
                copy.write_row(row)
        for table in TABLES:
            db.execute(f"ANALYZE {table}")
        for setting, value in (
            ("plan_cache_mode", "force_generic_plan"),
            ("session_preload_libraries", "auto_explain"),
            ("auto_explain.log_min_duration", "0"),
            ("auto_explain.log_format", "json"),
        ):
            db.execute(f"ALTER DATABASE \"{name}\" SET {setting} = '{value}'")
    return postgres_server.log


def plans_of(
    log: Path, settings: PostgresSettings, call: Callable[[PostgresSpool], object]
) -> Iterator[tuple[str, dict[str, Any]]]:
    """The statements ``call`` runs on a new spool handle (new sessions), each with the
    plan it was run with.  auto_explain writes a plan when its statement ends, before
    the server answers: every plan is in the log once the call returns."""
    offset = log.stat().st_size
    spool = PostgresSpool(settings, TickingClock())
    try:
        call(spool)
    finally:
        spool.close()
    with log.open() as text:
        text.seek(offset)
        entries = text.read().split("LOG:  duration: ")[1:]
    for entry in entries:
        found, _ = json.JSONDecoder().raw_decode(entry[entry.index("{") :])
        yield found["Query Text"], found["Plan"]


def indexes(plan: dict[str, Any]) -> set[str]:
    """The indexes searched in ``plan`` and the plans under it."""
    found = {plan["Index Name"]} if "Index Name" in plan else set()
    for child in plan.get("Plans", ()):
        found |= indexes(child)
    return found


def scans(plan: dict[str, Any]) -> Iterator[tuple[str, set[str]]]:
    """Each read of the outbound or hand-over table's rows in ``plan``: how (the node
    type), and through which indexes (none: the whole table)."""
    for _, how, searched in reads_in(plan):
        yield how, searched


def reads_in(plan: dict[str, Any]) -> Iterator[tuple[dict[str, Any], str, set[str]]]:
    """Each read of the outbound or hand-over table's rows in ``plan``: its plan, how
    (the node type), and through which indexes (none: the whole table)."""
    if plan.get("Relation Name") in TABLES and plan["Node Type"] != "ModifyTable":
        yield plan, plan["Node Type"], indexes(plan)
        return
    for child in plan.get("Plans", ()):
        yield from reads_in(child)


@pytest.mark.parametrize(
    ("what", "call", "through"),
    [
        ("due messages", lambda s: s.claim_due("lab", 2e9, 4), {"outbound_queued"}),
        ("expired messages", lambda s: s.expire_due("lab", 2e9 + 3), {"outbound_expiring"}),
        (
            "unanswered messages",
            lambda s: s.requeue_unanswered("lab", "2999-01-01T00:00:00"),
            {"outbound_awaiting"},
        ),
        # Each state through an index: that state's, or the index by state and peer.
        (
            "messages not yet delivered, by certificate",
            lambda s: s.pending_by_recipient("lab"),
            set(),
        ),
    ],
)
def test_a_lookup_by_state_reads_its_state_s_index_under_a_generic_plan(
    generic: Path,
    postgres: PostgresSettings,
    what: str,
    call: Callable[[PostgresSpool], object],
    through: set[str],
) -> None:
    """Each lookup of waiting messages by state, planned for any value of its
    parameters, is a search of the index of that state: never a read of every row."""
    seen = [(query, list(scans(plan))) for query, plan in plans_of(generic, postgres, call)]
    reads = [(query, found) for query, found in seen if found]
    assert reads, f"{what}: no statement read the outbound table: {seen}"
    for query, found in reads:
        assert all(searched for _, searched in found), f"{what}: {query}\n  {found}"
    used = {index for _, found in reads for _, searched in found for index in searched}
    assert through <= used, f"{what}: {reads}"


def bound_states(plan: dict[str, Any]) -> Iterator[str]:
    """Each condition on a state given as a parameter in ``plan`` and the plans under it."""
    for key in ("Index Cond", "Filter", "Recheck Cond"):
        if re.search(r"\bstate = \$\d", plan.get(key, "")):
            yield f"{plan.get('Relation Name', plan.get('Index Name'))}: {plan[key]}"
    for child in plan.get("Plans", ()):
        yield from bound_states(child)


def test_the_lease_renewal_names_each_state_in_its_text(
    generic: Path, postgres: PostgresSettings
) -> None:
    """The lease renewal (every few seconds on every node) looks up this node's claims
    by state.  Planned for any state, PostgreSQL reckons with an average state's share
    of the table (mostly delivered messages kept for months) and reads a hub's whole
    table; the state written in the statement's text is planned for its own few rows."""
    seen = list(plans_of(generic, postgres, lambda s: s.renew_leases()))
    renewals = [(query, plan) for query, plan in seen if "lease_until" in query]
    assert len(renewals) >= 3, seen  # outbound (intake, sending), inbound and hand-overs
    bound = [(query, list(bound_states(plan))) for query, plan in renewals]
    assert not [entry for entry in bound if entry[1]], bound


# Indexes of a message's rows, one per peer that sent it: a row changed by its key (peer
# and message ID) may be found through them as through the key.
BY_MESSAGE = {"handover_message"}


def _reads_of(
    generic: Path,
    postgres: PostgresSettings,
    what: str,
    call: Callable[[PostgresSpool], list[object]],
) -> list[tuple[str, list[Any]]]:
    """The table reads of the statements ``call`` ran, each with its query, as their
    generic plans say; ``call`` must have found rows (the spool is as the test made it)."""
    found: list[list[object]] = []
    seen = [
        (query, list(reads_in(plan)))
        for query, plan in plans_of(generic, postgres, lambda s: found.append(call(s)))
    ]
    assert found[0], f"{what}: nothing found: the spool is not as the test made it"
    reads = [(query, read) for query, read in seen if read]
    assert reads, f"{what}: no statement read the table: {seen}"
    return reads


@pytest.mark.parametrize(
    ("what", "call", "through"),
    [
        # After every renewal of this node's leases (every few seconds, on every node).
        (
            "messages a dead node was sending",
            lambda s: s.take_over_expired(),
            "outbound_state",
        ),
        (
            "documents a dead node had taken in",
            lambda s: s.intake_take_over(8),
            "outbound_state",
        ),
        (
            "documents a dead node had taken in, copied to the shared folder",
            lambda s: s.intake_take_over(8, Path("/var/lib/medgw/shared")),
            "outbound_state",
        ),
        (
            "hand-overs a dead node was making",
            lambda s: s.handover_take_over(),
            "handover_lease",
        ),
        # The hand-over worker's claims, and when its next is due.
        ("hand-overs due", lambda s: s.handover_due(2e9), "handover_next"),
        ("the next hand-over's time", lambda s: [s.handover_next_at()], "handover_next"),
        # At a node's start (and a take-over).
        (
            "documents in intake, at the start",
            lambda s: s.intake_interrupted(),
            "outbound_state",
        ),
        (
            "messages being sent, at the start",
            lambda s: s.requeue_interrupted(),
            "outbound_state",
        ),
        (
            "a peer's messages being sent",
            lambda s: s.requeue_interrupted("lab"),
            "outbound_state",
        ),
        # One state, chosen by the caller: any index that holds that state's rows alone
        # or first.
        *(
            (f"messages {state.value}", lambda s, state=state: s.in_state(state), None)
            for state in (
                OutboundState.INTAKE,
                OutboundState.QUEUED,
                OutboundState.SENDING,
                OutboundState.AWAITING_RECEIPT,
            )
        ),
    ],
)
def test_a_claim_or_a_take_over_names_its_state_and_reads_its_index(
    generic: Path,
    postgres: PostgresSettings,
    what: str,
    call: Callable[[PostgresSpool], list[object]],
    through: str | None,
) -> None:
    """The take-overs after each lease renewal, the hand-over worker's claims, the
    claims of a node's unfinished work at its start and the lookup of one state's
    messages find their rows by state: with the state bound, the generic plan reckons
    with an average state's share of the table (mostly delivered messages and
    hand-overs kept for months), and reads it whole (or in the order of an index of
    every row) on a hub's spool.  Each names
    its state in its text, and reads through an index that holds it; a row then
    changed by its key may check its state as a parameter."""
    reads = _reads_of(generic, postgres, what, call)
    used: set[str] = set()
    for query, read in reads:
        for plan, how, searched in read:
            assert searched, f"{what}: {how} of every row: {query}"
            used |= searched
            if all(index.endswith("_pkey") or index in BY_MESSAGE for index in searched):
                continue  # a row found by its key (or its message's few)
            bound = list(bound_states(plan))
            assert not bound, f"{what}: the state bound: {query}\n  {bound}"
    assert through is None or through in used, f"{what}: {reads}"


# The indexes that hold the rows of one state alone, or first: each table's others hold
# every row in another order (outbound_created: the newest first, whatever its state).
BY_STATE = {
    "outbound": {"outbound_state", "outbound_queued", "outbound_expiring", "outbound_awaiting"},
    "handover": {"handover_next", "handover_lease"},
}


@pytest.mark.parametrize(
    ("what", "call", "by_state"),
    [
        # An operator's listing by state (`medgw queue list --state`, the local API's
        # /v1/queue?state=, the maintenance shell's queue list), newest first.  A state
        # of few rows (those failed, a dead node's claims) among months of delivered
        # messages: through an index by state, not every row newest first until enough
        # are found (all of them, when there are fewer than the listing's limit).
        *(
            (
                f"messages {state.value}, listed",
                lambda s, state=state: s.list_outbound(state=state),
                True,
            )
            for state in (OutboundState.FAILED, OutboundState.INTAKE, OutboundState.SENDING)
        ),
        # A backlog of more rows than the listing shows: its share of the table is known
        # once the state is in the text, and the newest first may be as quick to read.
        *(
            (
                f"messages {state.value}, listed",
                lambda s, state=state: s.list_outbound(state=state),
                False,
            )
            for state in (OutboundState.QUEUED, OutboundState.AWAITING_RECEIPT)
        ),
        (
            "a peer's failed messages, listed",
            lambda s: s.list_outbound(state=OutboundState.FAILED, peer="clinic"),
            True,
        ),
        # `medgw handover list --state`, the local API's /v1/handover?state=.
        *(
            (
                f"hand-overs {state.value}, listed",
                lambda s, state=state: s.handover_list(state=state),
                True,
            )
            for state in (HandoverState.PENDING, HandoverState.FAILED)
        ),
    ],
)
def test_a_listing_by_state_names_its_state_in_its_text(
    generic: Path,
    postgres: PostgresSettings,
    what: str,
    call: Callable[[PostgresSpool], list[object]],
    by_state: bool,
) -> None:
    """An operator's listing of the messages or hand-overs in one state, planned for
    any state, reckons with an average state's share of the table (mostly delivered
    messages and hand-overs done, kept for months), and with a tenth of it for its
    limit: it reads every row newest first until it has found enough (a state of few
    rows: the whole table, on a hub's spool), or the whole table.  Each names its state
    and its limit in its text, and reads through an index: for a state of few rows, one
    that holds that state's rows alone or first."""
    reads = _reads_of(generic, postgres, what, call)
    for query, read in reads:
        for plan, how, searched in read:
            assert searched, f"{what}: {how} of every row: {query}"
            index = BY_STATE[plan["Relation Name"]]
            assert searched <= index or not by_state, f"{what}: {how} of {searched}: {query}"
            bound = list(bound_states(plan))
            assert not bound, f"{what}: the state bound: {query}\n  {bound}"


@pytest.mark.parametrize(
    ("what", "call", "through"),
    [
        # An operator's retry of a hand-over (`medgw handover retry`, the local API):
        # the message's hand-overs (one per peer that sent it), among months of done ones.
        (
            "a message's hand-overs",
            lambda s: s.handover_list(message_id="<handover-failed-None-7@hospital>"),
            "handover_message",
        ),
        # Retention's batches: the records finished longest ago, oldest first.
        (
            "finished messages to dispose of",
            lambda s: s.disposable(RetainedKind.SPOOL, "2026-06-01T00:00:00+00:00"),
            "outbound_updated",
        ),
        # And those of the received messages and their hand-overs: inbox copies still
        # kept among hand-overs done whose copy went, hand-over records, receipts sent
        # still kept among messages whose receipt went, and the received messages' records.
        *(
            (
                f"{kind.value} to dispose of",
                lambda s, kind=kind: s.disposable(kind, "2026-06-01T00:00:00+00:00"),
                index,
            )
            for kind, index in (
                (RetainedKind.RECEIVED, "handover_copy_kept_at"),
                (RetainedKind.HANDOVER, "handover_copy_gone_at"),
                (RetainedKind.RECEIPTS, "inbound_receipt_kept_at"),
            )
        ),
    ],
)
def test_a_lookup_by_message_or_of_the_oldest_reads_its_index_under_a_generic_plan(
    generic: Path,
    postgres: PostgresSettings,
    what: str,
    call: Callable[[PostgresSpool], list[object]],
    through: str,
) -> None:
    """A lookup of one message's hand-overs, or of the records finished longest ago,
    planned for any value of its parameters, reads the index that holds its rows first:
    never the whole table, nor every row newest first.  A limit bound as a parameter is
    planned as a tenth of the table, whatever it is: the limit is written as a number."""
    reads = _reads_of(generic, postgres, what, call)
    used: set[str] = set()
    for query, read in reads:
        assert not re.search(r"\bLIMIT \$\d", query), f"{what}: the limit bound: {query}"
        for _, how, searched in read:
            assert searched, f"{what}: {how} of every row: {query}"
            assert "outbound_created" not in searched, f"{what}: every row newest first: {query}"
            used |= searched
    assert through in used, f"{what}: {reads}"


@pytest.fixture
def as_planned(generic: Path, postgres_server: PostgresServer, postgres: PostgresSettings) -> Path:
    """The spool of ``generic``, its statements planned as a server plans them unless told
    otherwise: a prepared statement for its parameters' values its first five runs, then
    generically if that plan seems as cheap."""
    with postgres_server.admin(postgres.dbname) as db:
        db.execute(f"ALTER DATABASE \"{postgres.dbname}\" SET plan_cache_mode = 'auto'")
    return generic


# Enough runs on one connection for psycopg to prepare the statement (after five) and for
# the server to try its generic plan (after five more).
RUNS = 12


def test_a_peer_s_messages_are_listed_through_the_index_by_peer_at_every_run(
    as_planned: Path, postgres: PostgresSettings
) -> None:
    """An operator's listing of one peer's messages, newest first (`medgw queue list
    --peer`, the local API's /v1/queue?peer=), run again and again.  A generic plan
    reckons with an average peer's share of the table (a quarter, with four peers): it
    reads every row newest first until it has found enough, nearly the whole table for a
    peer of few rows among other peers' backlogs and months of delivered messages.
    Planned for the peer given at every run, it reads that peer's rows through the
    index by peer and time."""
    found: list[list[object]] = []

    def listings(spool: PostgresSpool) -> None:
        for _ in range(RUNS):
            found.append(list(spool.list_outbound(peer="clinic")))

    seen = [
        (query, list(reads_in(plan))) for query, plan in plans_of(as_planned, postgres, listings)
    ]
    assert [len(rows) for rows in found] == [1000] * RUNS
    reads = [(query, read) for query, read in seen if read]
    assert len(reads) == RUNS, seen
    for query, read in reads:
        for _, how, searched in read:
            assert searched == {"outbound_peer"}, f"{how} of {searched or 'every row'}: {query}"


def data_key_reads(plan: dict[str, Any]) -> Iterator[tuple[str, set[str]]]:
    """Each read of the data_keys table's rows in ``plan``: how (the node type), and
    through which indexes (none: the whole table)."""
    if plan.get("Relation Name") == "data_keys":
        yield plan["Node Type"], indexes(plan)
        return
    for child in plan.get("Plans", ()):
        yield from data_key_reads(child)


def test_the_data_keys_beside_one_that_fails_are_read_through_the_index_by_version(
    generic: Path, postgres_server: PostgresServer, postgres: PostgresSettings
) -> None:
    """The data keys wrapped under one version nearest an item whose data key does not
    unwrap (read at every status request of such a receipt), planned for any value of
    its parameters: a version given as a parameter is planned as an average version's
    share of the table, and read every data key of the other versions for a version no
    other data key has.  Written as a number, it reads that version's index."""
    with postgres_server.admin(postgres.dbname) as db:
        db.execute(
            "INSERT INTO data_keys SELECT 'item-' || g, 2, decode(md5(g::text), 'hex')"
            " FROM generate_series(1, 20000) AS g"
        )
        db.execute("INSERT INTO data_keys VALUES ('lonely', 1, decode(md5('x'), 'hex'))")
        db.execute("ANALYZE data_keys")
    found: list[int] = []

    def samples(spool: PostgresSpool) -> None:
        for _ in range(RUNS):
            found.append(len(spool.sample_data_keys(1, around="lonely")))

    seen = [
        (query, list(data_key_reads(plan))) for query, plan in plans_of(generic, postgres, samples)
    ]
    assert found == [0] * RUNS
    reads = [(query, read) for query, read in seen if read]
    assert len(reads) == RUNS, seen
    for query, read in reads:
        for how, searched in read:
            assert "data_keys_kek_item" in searched, f"{how} of {searched or 'every row'}: {query}"


def node_types(plan: dict[str, Any]) -> Iterator[str]:
    """The node type of ``plan`` and of every plan under it."""
    yield plan["Node Type"]
    for child in plan.get("Plans", ()):
        yield from node_types(child)


def test_the_data_keys_nearest_an_item_of_a_version_of_many_are_found_in_order_by_index(
    generic: Path, postgres_server: PostgresServer, postgres: PostgresSettings
) -> None:
    """The data keys nearest an item within a version that wraps many (every data key is
    wrapped under the newest version once rotated): each side found in the index by
    version and item, the nearest first, not every data key of the version read and
    sorted for the one nearest."""
    with postgres_server.admin(postgres.dbname) as db:
        db.execute(
            "INSERT INTO data_keys SELECT 'item-' || g, 2, decode(md5(g::text), 'hex')"
            " FROM generate_series(1, 20000) AS g"
        )
        db.execute("ANALYZE data_keys")
    found: list[list[str]] = []

    def samples(spool: PostgresSpool) -> None:
        for _ in range(RUNS):
            found.append([key.item for key in spool.sample_data_keys(2, around="item-5000")])

    seen = [(query, plan) for query, plan in plans_of(generic, postgres, samples)]
    assert found == [["item-500", "item-5001"]] * RUNS
    reads = [(query, plan, list(data_key_reads(plan))) for query, plan in seen]
    reads = [(query, plan, read) for query, plan, read in reads if read]
    assert len(reads) == RUNS, seen
    for query, plan, read in reads:
        assert [searched for _, searched in read] == [{"data_keys_kek_item"}] * 2, query
        assert "Sort" not in set(node_types(plan)), query


def test_the_received_messages_records_to_dispose_of_are_read_oldest_first_by_index(
    generic: Path, postgres: PostgresSettings
) -> None:
    """Retention's batches of received messages' records (a peer none of whose messages
    sent were delivered: the rule of the records sent finds nothing), planned for any
    value of their parameters, read the received messages answered through the index of
    those alone, oldest first: not every received message read and sorted for each
    batch; and whether each one's hand-over record is gone is asked of the hand-overs by
    the message's key, not answered by reading every hand-over of the peer (an
    anti-join the planner chose, reckoning that few received messages had none)."""
    what = "a peer's received messages' records to dispose of"
    reads = _reads_of(
        generic,
        postgres,
        what,
        lambda s: list[object](
            s.disposable(RetainedKind.SPOOL, "2026-06-01T00:00:00+00:00", peer="radiology")
        ),
    )
    received = [
        (query, how, searched)
        for query, read in reads
        for plan, how, searched in read
        if plan["Relation Name"] == "inbound"
    ]
    assert received, f"{what}: {reads}"
    for query, how, searched in received:
        assert "inbound_receipt_gone_at" in searched, f"{what}: {how} of {searched}: {query}"
        # And the message's hand-overs looked up, not read whole beside the batch.
        assert searched <= {"inbound_receipt_gone_at", *BY_MESSAGE, "handover_pkey"}, searched
    for query, read in reads:
        for _, how, searched in read:
            assert searched, f"{what}: {how} of every row: {query}"


def sorts_in(plan: dict[str, Any]) -> Iterator[str]:
    """Each sort in ``plan`` and the plans under it (its keys)."""
    if plan["Node Type"] == "Sort":
        yield ", ".join(plan.get("Sort Key", ()))
    for child in plan.get("Plans", ()):
        yield from sorts_in(child)


@pytest.mark.parametrize(
    ("kind", "peer", "table", "through"),
    [
        (RetainedKind.SPOOL, "lab", "outbound", "outbound_updated"),
        (RetainedKind.RECEIVED, "lab", "handover", "handover_copy_kept_at"),
        (RetainedKind.HANDOVER, "lab", "handover", "handover_copy_gone_at"),
        # A peer none of whose messages sent are finished: its received messages are read.
        (RetainedKind.RECEIPTS, "radiology", "inbound", "inbound_receipt_kept_at"),
        (RetainedKind.SPOOL, "radiology", "inbound", "inbound_receipt_gone_at"),
    ],
)
def test_the_sweep_s_batches_of_one_peer_and_service_read_their_index_in_its_order(
    generic: Path,
    postgres: PostgresSettings,
    kind: RetainedKind,
    peer: str,
    table: str,
    through: str,
) -> None:
    """The daemon's sweep disposes of each peer's and service's things apart (a service
    of its own retention, or none).  Planned for any value of its parameters, a service
    compared with "IS NOT DISTINCT FROM" a parameter was reckoned to match one row: the
    batch read every row of its rule finished before the cutoff, then sorted them, at
    every batch.  Each batch reads its rule's index oldest first, and sorts nothing."""
    what = f"{kind.value} of {peer}, swept"
    found: list[list[object]] = []
    seen = list(
        plans_of(
            generic,
            postgres,
            lambda s: found.append(
                list(
                    s.disposable(
                        kind,
                        "2026-06-01T00:00:00+00:00",
                        peer=peer,
                        service=None,
                        any_service=False,
                    )
                )
            ),
        )
    )
    assert found[0], f"{what}: nothing found: the spool is not as the test made it"
    [(query, plan)] = [(q, p) for q, p in seen if f"FROM {table} WHERE" in q]
    read = list(reads_in(plan))
    assert read and all(searched for _, _, searched in read), f"{what}: {query}\n  {read}"
    assert through in {index for _, _, searched in read for index in searched}, read
    assert not list(sorts_in(plan)), f"{what}: sorted: {query}\n  {plan}"
