"""Taking over another node's claim on PostgreSQL, against that node renewing it at the
same moment: the take-over reads the claim and changes it as one, so a renewal that
commits in between keeps the claim with its node (READ COMMITTED would otherwise let
the take-over change a row it judged by its state before the renewal).

Node a's renewal is held open on a connection of the test's own, so that node b's
take-over meets it: b finds it running (it waits for it, or passes the row by), a
commits, and the claim must still be a's.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import psycopg
import pytest

from gateway.spool import Claimant, OutboundState
from gateway.spool.postgres import PostgresSettings, PostgresSpool
from tests.clocks import SetClock

LEASE = 60.0


@pytest.fixture
def nodes(postgres: PostgresSettings) -> Iterator[tuple[PostgresSpool, PostgresSpool, SetClock]]:
    clock = SetClock(datetime(2026, 12, 5, 9, 0, tzinfo=UTC))
    a = PostgresSpool(postgres, clock, Claimant("a", LEASE), server_time=False)
    b = PostgresSpool(postgres, clock, Claimant("b", LEASE), server_time=False)
    try:
        yield a, b, clock
    finally:
        a.close()
        b.close()


def _connect(settings: PostgresSettings, *, autocommit: bool = False) -> Any:
    return psycopg.connect(
        host=str(settings.socket_dir), port=settings.port, user=settings.user,
        dbname=settings.dbname, autocommit=autocommit,
    )  # fmt: skip


def _take_over_during_renewal(
    settings: PostgresSettings, table: str, lease_until: float, take: Callable[[], list[Any]]
) -> list[Any]:
    """What ``take`` (node b's take-over) returns when it meets node a's renewal of its
    claims in ``table``: begun first, committed once b has either finished or waits for
    the renewal's row lock (seen in pg_stat_activity)."""
    renewal = _connect(settings)
    result: list[list[Any]] = []
    worker = threading.Thread(target=lambda: result.append(take()))
    try:
        renewal.execute(
            f"UPDATE {table} SET lease_until=%s WHERE node='a'",
            (lease_until,),
        )
        with _connect(settings, autocommit=True) as watch:
            worker.start()
            deadline = time.monotonic() + 60
            while worker.is_alive() and time.monotonic() < deadline:
                row = watch.execute(
                    "SELECT count(*) FROM pg_stat_activity WHERE datname=%s"
                    " AND wait_event_type='Lock'",
                    (settings.dbname,),
                ).fetchone()
                if row is not None and row[0]:
                    break  # b waits for a's renewal
                worker.join(0.05)
        renewal.commit()
    finally:
        renewal.close()
    worker.join(60)
    assert not worker.is_alive() and len(result) == 1
    return result[0]


@pytest.mark.parametrize("claim", ["send", "intake", "inbound"])
def test_a_claim_renewed_while_another_node_takes_it_over_stays_with_its_node(
    nodes: tuple[PostgresSpool, PostgresSpool, SetClock],
    postgres: PostgresSettings,
    tmp_path: Path,
    claim: str,
) -> None:
    a, b, clock = nodes
    table = "inbound" if claim == "inbound" else "outbound"
    take: Callable[[], list[Any]] = b.inbound_take_over
    if table == "outbound":
        a.add_intake("<m@x>", "lab", "f.txt", "text/plain", tmp_path / "src", tmp_path / "p")
        take = b.intake_interrupted  # node b starting
    if claim == "send":
        a.mark_queued("<m@x>", None, [("AS2-To", "lab")], "mic", 3, body=b"abc")
        a.claim_due("lab", clock.now().timestamp(), 8)
        take = b.take_over_expired
    elif claim == "inbound":
        a.inbound_begin("lab", "<m@x>", "00", tmp_path / "t", work_path=tmp_path / ".w", size=1)
    clock.at += timedelta(seconds=LEASE + 1)  # a's lease ran out; a renews it right now
    taken = _take_over_during_renewal(postgres, table, clock.now().timestamp() + LEASE, take)
    assert taken == [], "node b took over a claim node a had just renewed"
    if claim == "intake":
        record = a.get("<m@x>")
        assert record is not None and record.node == "a"
        assert a.intake_renew("<m@x>") and not b.intake_renew("<m@x>")
    elif table == "outbound":
        record = a.get("<m@x>")
        assert record is not None and record.node == "a"
        assert record.state is OutboundState.SENDING
        assert a.holds_lease("<m@x>")
    else:
        assert a.inbound_holds("lab", "<m@x>")
