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
``auto_explain`` logged them.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from gateway.spool import OutboundState
from gateway.spool.postgres import PostgresSettings, PostgresSpool
from tests.clocks import TickingClock
from tests.helpers.postgres import PostgresServer

pytestmark = pytest.mark.usefixtures("postgres_server")

# Other peers' backlogs (after an outage) and delivered messages kept for months: most of
# a spool's rows are not the looked-up peer's waiting ones.
PEERS = ("pharmacy", "radiology", "clinic")
WAITING = 500
DELIVERED = 20_000
COLUMNS = (
    "message_id, peer, filename, content_type, source_path, payload_path, mic, size, state,"
    " attempts, expires_at, encrypted_for, created_at, updated_at"
)


def others() -> Iterator[tuple[object, ...]]:
    """Rows of the other peers' backlogs (queued, half of them expiring, and awaiting
    their receipts) and of delivered messages."""
    stamp = "2026-01-01T00:00:00+00:00"
    kinds = [
        (peer, state, WAITING)
        for peer in PEERS
        for state in (OutboundState.QUEUED, OutboundState.AWAITING_RECEIPT)
    ]
    for peer, state, count in [*kinds, ("lab", OutboundState.DELIVERED, DELIVERED)]:
        for i in range(count):
            expires_at = 2e9 + i if i % 2 else 0.0
            message_id = f"<{peer}-{state.value}-{i}@hospital>"
            text = ("d.hl7", "text/plain", "/s", "/p", "mic")
            yield (message_id, peer, *text, 3, state.value, 1, expires_at, "A", stamp, stamp)


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
        db.execute("ANALYZE outbound")
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
    """Each read of the outbound table's rows in ``plan``: how (the node type), and
    through which indexes (none: the whole table)."""
    if plan.get("Relation Name") == "outbound" and plan["Node Type"] != "ModifyTable":
        yield plan["Node Type"], indexes(plan)
        return
    for child in plan.get("Plans", ()):
        yield from scans(child)


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
