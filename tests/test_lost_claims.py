"""A claim lost before its POST: the message waits longer each time, and is let go at
once to a node that took it over.

A node whose claims are lost at every try (leases shorter than the work, a clock
that jumps, a database that keeps cutting connections) must not claim, lose and log
the same message in a tight loop: each loss in a row queues it again after a longer
delay (the retry schedule's: the demo's 1, 2, 4, then 5 s), one warning per step and
one error when the losses persist; once a claim holds, it is sent, counted as one
attempt.  A message another node took over is not delayed: that node sends it.

Real daemons on a real spool of each backend, whose claims a trigger in the database
cuts to less than half a lease (the check before each POST finds them lost); and two
spool handles of one database as two nodes, their clock set by the test.
"""

from __future__ import annotations

import asyncio
import hashlib
import io
import random
import sqlite3
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import psycopg
import pytest

from gateway.audit import AuditLog
from gateway.channel.client import PeerClient
from gateway.config import Peer, load_config
from gateway.delivery.http import HandOver
from gateway.demo_run import GatewayProcess, drop_file, wait_until
from gateway.egress import Network
from gateway.errors import MedgwError
from gateway.logs import make_logger
from gateway.lostclaims import CEILING_SECONDS, Loss, LostClaims
from gateway.outbound import INLINE_BODY_BYTES, Outbound, Settings
from gateway.pki.demo import DemoLayout
from gateway.pki.peers import assess_peers
from gateway.pki.tls import client_context
from gateway.spool import Claimant, OutboundState, Spool, SqliteSpool
from gateway.spool.postgres import PostgresSettings, PostgresSpool
from tests.clocks import SetClock, TickingClock
from tests.conftest import MakeSpool, Processes
from tests.helpers.cluster import add_node
from tests.helpers.internal_system import InternalSystem, enable_delivery
from tests.helpers.postgres import PostgresServer

# The demo's retry schedule: retry_initial_seconds = 1, retry_max_seconds = 5.
DELAYS = [1.0, 2.0, 4.0, 5.0, 5.0]
LEASE = 60.0


class ShortLeases:
    """A trigger in a spool's database that cuts every claim made or renewed on
    ``table`` to a quarter of a lease: the check before a POST (half a lease to spare)
    finds it lost, every time, until :meth:`lift`."""

    def __init__(self, spool: Path | PostgresSettings, table: str, lease: float) -> None:
        self._spool, self._table = spool, table
        cut = lease * 0.75
        if isinstance(spool, Path):
            self._run(
                f"CREATE TRIGGER short_leases AFTER UPDATE OF lease_until ON {table}"
                " WHEN NEW.lease_until > 0 BEGIN"
                f" UPDATE {table} SET lease_until = NEW.lease_until - {cut}"
                " WHERE peer = NEW.peer AND message_id = NEW.message_id; END"
            )
        else:
            self._run(
                "CREATE FUNCTION short_leases() RETURNS trigger LANGUAGE plpgsql AS $$"
                f" BEGIN IF NEW.lease_until > 0 THEN NEW.lease_until := NEW.lease_until - {cut};"
                " END IF; RETURN NEW; END $$"
            )
            self._run(
                f"CREATE TRIGGER short_leases BEFORE UPDATE OF lease_until ON {table}"
                " FOR EACH ROW EXECUTE FUNCTION short_leases()"
            )

    def lift(self) -> None:
        if isinstance(self._spool, Path):
            self._run("DROP TRIGGER short_leases")
        else:
            self._run(f"DROP TRIGGER short_leases ON {self._table}")

    def _run(self, sql: str) -> None:
        if isinstance(self._spool, Path):
            with sqlite3.connect(self._spool, timeout=60) as db:
                db.execute(sql)
            return
        settings = self._spool
        with psycopg.connect(
            host=str(settings.socket_dir), port=settings.port, user=settings.user,
            dbname=settings.dbname, autocommit=True,
        ) as db:  # fmt: skip
            db.execute(sql)


def _spool_of(config: Path, backend: str, server: PostgresServer | None) -> Any:
    """The spool ``config``'s node uses: its SQLite file, or a new PostgreSQL database
    (the configuration made a node of a cluster, lease 5 s)."""
    if backend == "sqlite":
        return load_config(config).storage.spool_path
    assert server is not None
    return server.new_database()


@pytest.fixture(params=["sqlite", "postgresql"])
def backend(request: pytest.FixtureRequest) -> Iterator[tuple[str, PostgresServer | None]]:
    server = request.getfixturevalue("postgres_server") if request.param == "postgresql" else None
    yield request.param, server


def _lines(node: GatewayProcess, event: str) -> list[dict[str, Any]]:
    return [line for line in list(node.lines) if line.get("event") == event]


def _at(line: dict[str, Any]) -> float:
    return datetime.fromisoformat(line["timestamp"]).timestamp()


def _assert_backed_off(losses: list[dict[str, Any]]) -> None:
    """Each loss in a row waited for the one before it's delay, which grew up to the
    ceiling: the tries are as few as the schedule allows."""
    assert [line["losses"] for line in losses] == list(range(1, len(losses) + 1))
    assert [line["retry_in_seconds"] for line in losses] == DELAYS[: len(losses)]
    for before, after, delay in zip(losses, losses[1:], DELAYS, strict=False):
        assert _at(after) - _at(before) >= delay - 0.05, (before, after)


@pytest.mark.daemon
def test_a_send_whose_claim_is_lost_at_every_try_backs_off_then_goes_once_it_holds(
    layout: DemoLayout,
    processes: Processes,
    backend: tuple[str, PostgresServer | None],
) -> None:
    """The lab's claims on its sends are lost at every try: it tries five times in 12 s
    or more (1 + 2 + 4 + 5), not in a loop, says once that its claims keep being lost,
    and sends the document once a claim holds, as its one attempt."""
    kind, server = backend
    config = layout.lab.config_path
    spool = _spool_of(config, kind, server)
    lease = LEASE
    if isinstance(spool, PostgresSettings):
        config, lease = add_node(layout.lab, "lab-a", spool), 5.0
    processes.start(layout.hospital.config_path)
    lab = processes.start(config)
    short = ShortLeases(spool, "outbound", lease)
    document = b"MSH|^~\\&|LAB|large\r" + b"OBX|" * (INLINE_BODY_BYTES // 4 + 1)
    drop_file(layout.lab.outbox_for("hospital"), "large.hl7", document)  # its body: a file

    lab.wait_for(lambda line: line.get("event") == "message.claims_keep_failing", 120)
    losses = _lines(lab, "message.claim_lost")
    assert len(losses) == len(DELAYS)  # in the 12 s or more since the first
    _assert_backed_off(losses)
    [persisting] = _lines(lab, "message.claims_keep_failing")
    assert persisting["losses"] == len(DELAYS) and persisting["level"] == "error"
    short.lift()

    lab.wait_for(lambda line: line.get("event") == "message.claims_holding", 60)
    inbox = layout.hospital.inbox_dir / "lab" / "large.hl7"
    wait_until(inbox.exists, 60, "the document in the hospital's inbox")
    assert hashlib.sha256(inbox.read_bytes()).digest() == hashlib.sha256(document).digest()

    def delivered() -> bool:
        return [r.state for r in _records(spool, config)] == [OutboundState.DELIVERED]

    wait_until(delivered, 60, "the message delivered")
    [record] = _records(spool, config)
    assert record.attempts == 1  # the lost claims were no attempts
    assert len(_lines(lab, "message.claim_lost")) in (len(DELAYS), len(DELAYS) + 1)
    assert len(_lines(lab, "message.claims_keep_failing")) == 1


def _records(spool: Path | PostgresSettings, config: Path) -> list[Any]:
    clock = TickingClock()
    handle: Spool = (
        SqliteSpool(spool, clock) if isinstance(spool, Path) else PostgresSpool(spool, clock)
    )
    try:
        return handle.all_outbound()
    finally:
        handle.close()


@pytest.mark.daemon
def test_a_hand_over_whose_claim_is_lost_at_every_try_backs_off_then_is_made_once(
    layout: DemoLayout,
    processes: Processes,
    backend: tuple[str, PostgresServer | None],
    internal_port: int,
) -> None:
    """The hospital's claims on its hand-overs are lost at every try: five tries in
    12 s or more, one error, then one POST to the internal system once a claim holds."""
    kind, server = backend
    enable_delivery(layout, internal_port)
    config = layout.hospital.config_path
    spool = _spool_of(config, kind, server)
    lease = LEASE
    if isinstance(spool, PostgresSettings):
        config, lease = add_node(layout.hospital, "hospital-a", spool), 5.0
    system = InternalSystem(internal_port)
    try:
        hospital = processes.start(config)
        short = ShortLeases(spool, "handover", lease)
        processes.start(layout.lab.config_path)
        drop_file(layout.lab.outbox_for("hospital"), "doc.hl7", b"MSH|^~\\&|LAB|doc\r")

        hospital.wait_for(
            lambda line: line.get("event") == "message.handover_claims_keep_failing", 120
        )
        losses = _lines(hospital, "message.handover_claim_lost")
        assert len(losses) == len(DELAYS)
        _assert_backed_off(losses)
        assert system.requests == []
        short.lift()

        hospital.wait_for(lambda line: line.get("event") == "message.handed_over", 60)
        assert [r[1]["X-Medgw-Message-Id"] for r in system.requests] == [losses[0]["message_id"]]
        assert len(_lines(hospital, "message.handover_claims_keep_failing")) == 1
        assert len(_lines(hospital, "message.handover_claims_holding")) == 1
    finally:
        system.close()


# -- two nodes on one spool, their clock set by the test ------------------------------


@pytest.fixture
def clock() -> SetClock:
    return SetClock(datetime(2026, 12, 6, 3, 0, tzinfo=UTC))


@pytest.fixture
def nodes(make_spool: MakeSpool, clock: SetClock) -> tuple[Spool, Spool]:
    """Nodes a and b on one spool (each test runs on SQLite and on PostgreSQL)."""
    return make_spool(clock, Claimant("a", LEASE)), make_spool(clock, Claimant("b", LEASE))


async def _sender(layout: DemoLayout, spool: Spool, clock: SetClock, log: io.StringIO) -> Outbound:
    config = load_config(layout.hospital.config_path)
    trust = await assess_peers(config.peers, config.zones, at=clock.now())
    audit = AuditLog(layout.hospital.root / f"audit-{spool.node}.jsonl", clock, node=spool.node)
    return Outbound(Settings(config, trust), spool, audit, make_logger(stream=log), clock)


async def _one_queued_message(
    layout: DemoLayout, spool: Spool, clock: SetClock, tmp_path: Path
) -> tuple[Outbound, Peer, PeerClient, io.StringIO]:
    """Message <m@x> queued for the lab on ``spool``, and a sender of that node whose
    log is the StringIO returned."""
    spool.add_intake("<m@x>", "lab", "f.hl7", "x-application/hl7", tmp_path / "s", tmp_path / "p")
    spool.mark_queued("<m@x>", None, [("AS2-To", "lab")], "mic", 3, body=b"abc")
    log = io.StringIO()
    outbound = await _sender(layout, spool, clock, log)
    [peer] = outbound.config.peers
    return outbound, peer, _client(outbound), log


def _client(outbound: Outbound) -> PeerClient:
    config = outbound.config
    [peer] = config.peers
    [zone] = [z for z in config.zones if z.name == peer.zone]
    context = client_context(
        config.tls.identity,
        zone.trust_anchors,
        outbound.trust[peer.name].tls_certificates,
        zone.min_version,
    )
    return PeerClient(context, 5, 10, route=Network.fixed(config.network_map).zone(zone.name))


def _logged(log: io.StringIO, event: str) -> list[str]:
    return [line for line in log.getvalue().splitlines() if f'"event": "{event}"' in line]


async def test_a_send_another_node_took_over_is_let_go_without_delay(
    layout: DemoLayout, nodes: tuple[Spool, Spool], clock: SetClock, tmp_path: Path
) -> None:
    """Node a lost its claim on a message three times (each loss a longer wait, the
    message never counted as attempted); then, stalled past its lease, b took it over.
    a finds its claim gone and lets go: b claims it at once, not after a's back-off."""
    a, b = nodes
    outbound, peer, client, log = await _one_queued_message(layout, a, clock, tmp_path)

    async def send(spool: Spool, lost_after: float) -> None:
        [record], _ = spool.claim_due("lab", clock.now().timestamp(), 1)
        clock.advance(lost_after)  # stalled: less than half a lease left, or none
        await outbound.send_one(record, peer, client, random.Random(1))

    try:
        for delay in DELAYS[:3]:
            await send(a, LEASE / 2 + 1)
            row = a.get("<m@x>")
            assert row is not None and row.state is OutboundState.QUEUED and row.attempts == 0
            assert row.next_attempt_at == clock.now().timestamp() + delay
            assert a.claim_due("lab", clock.now().timestamp() + delay - 0.5, 1)[0] == []
            clock.advance(delay)
        assert len(_logged(log, "message.claim_lost")) == 3

        [record], _ = a.claim_due("lab", clock.now().timestamp(), 1)
        clock.advance(LEASE + 1)
        assert [r.node for r in b.take_over_expired()] == ["a"]
        await outbound.send_one(record, peer, client, random.Random(1))
        row = b.get("<m@x>")
        assert row is not None and row.state is OutboundState.QUEUED and row.node is None
        assert row.next_attempt_at <= clock.now().timestamp()  # due now, for any node
        assert [r.message_id for r in b.claim_due("lab", clock.now().timestamp(), 1)[0]] == [
            "<m@x>"
        ]
        assert len(_logged(log, "message.claim_lost")) == 3  # a let go, no warning
        assert len(_logged(log, "message.claim_taken_over")) == 1
    finally:
        await client.close()


def _handing(layout: DemoLayout, spool: Spool, clock: SetClock, log: io.StringIO) -> HandOver:
    config = load_config(layout.hospital.config_path)
    audit = AuditLog(layout.hospital.root / f"audit-{spool.node}.jsonl", clock, node=spool.node)
    return HandOver(
        spool, lambda: audit, make_logger(stream=log), clock, lambda: config,
        random.Random(1), Network.fixed(config.network_map).internal(),
    )  # fmt: skip


def test_a_hand_over_another_node_took_over_is_let_go_without_delay(
    layout: DemoLayout, nodes: tuple[Spool, Spool], clock: SetClock, internal_port: int
) -> None:
    """As for a send: a's lost claims on a hand-over each wait longer and count as no
    attempt; once b took it over, a lets go and b takes it at once."""
    enable_delivery(layout, internal_port)
    a, b = nodes
    inbox = layout.hospital.inbox_dir / "lab"
    inbox.mkdir(parents=True, exist_ok=True)
    (inbox / "doc.hl7").write_bytes(b"MSH|doc\r")
    a.inbound_begin("lab", "<h@x>", hashlib.sha256(b"MSH|doc\r").hexdigest(), inbox / "doc.hl7")
    a.inbound_delivered("lab", "<h@x>", [], b"mdn", ("x-application/hl7", 8))
    log = io.StringIO()
    worker = _handing(layout, a, clock, log)
    system = InternalSystem(internal_port)

    def attempt(stall: float) -> None:
        [record] = a.handover_due(clock.now().timestamp())
        clock.advance(stall)

        async def once() -> float:
            async with worker.session() as session:
                return await worker.hand_over(session, record)

        assert asyncio.run(once()) == 0.0

    try:
        for delay in DELAYS[:3]:
            attempt(LEASE / 2 + 1)
            row = a.handover_get("lab", "<h@x>")
            assert row is not None and row.node is None and row.attempts == 0
            assert row.next_attempt_at == clock.now().timestamp() + delay
            assert a.handover_due(clock.now().timestamp() + delay - 0.5) == []
            clock.advance(delay)
        assert len(_logged(log, "message.handover_claim_lost")) == 3

        [record] = a.handover_due(clock.now().timestamp())
        clock.advance(LEASE + 1)
        assert [r.node for r in b.handover_take_over()] == ["a"]
        due = b.handover_get("lab", "<h@x>")
        assert due is not None

        async def late() -> float:
            async with worker.session() as session:
                return await worker.hand_over(session, record)

        assert asyncio.run(late()) == 0.0
        row = b.handover_get("lab", "<h@x>")
        assert row == due  # a changed nothing: due as it was
        assert [r.message_id for r in b.handover_due(clock.now().timestamp())] == ["<h@x>"]
        assert system.requests == []
        assert len(_logged(log, "message.handover_claim_lost")) == 3
        assert len(_logged(log, "message.handover_claim_taken_over")) == 1
    finally:
        system.close()


# -- the count itself ------------------------------------------------------------------


def test_the_wait_doubles_to_its_ceiling_starts_again_once_held_and_old_counts_go(
    clock: SetClock,
) -> None:
    """Losses in a row wait 10, 20, 40 ... s up to the shorter of the schedule's ceiling
    and 5 minutes; the error is said once until a claim holds; a message not lost again
    for twice the ceiling is forgotten (it was sent, by this node or another)."""
    claims = LostClaims(clock)
    waits, said = [], []
    for _ in range(8):
        loss = claims.next("<m@x>", 10, 900)
        waits.append(loss.delay)
        said.append(claims.record("<m@x>", loss))
    assert waits == [10, 20, 40, 80, 160, 300, 300, 300]
    assert said == [False] * 4 + [True] + [False] * 3
    assert claims.next("<m@x>", 10, 60).delay == 60  # a shorter retry_max_seconds
    assert claims.held("<m@x>") is True  # the node says its claims hold again
    assert claims.next("<m@x>", 10, 900) == Loss(1, 10)
    assert claims.held("<m@x>") is False

    claims.record("<old@x>", claims.next("<old@x>", 10, 900))
    clock.advance(2 * CEILING_SECONDS + 1)
    claims.record("<new@x>", claims.next("<new@x>", 10, 900))
    assert (claims.losses("<old@x>"), claims.losses("<new@x>")) == (0, 1)


def test_a_message_that_keeps_losing_is_said_once_whatever_other_messages_claims_do(
    clock: SetClock,
) -> None:
    """A large message always losing while small ones go through (leases shorter than
    its work): one error for it, and 'holding again' only once its own claim holds."""
    claims = LostClaims(clock)
    said, holding = [], []
    for _ in range(12):
        said.append(claims.record("<big@x>", claims.next("<big@x>", 1, 5)))
        holding.append(claims.held("<small@x>"))  # another message's claim held
    assert said == [False] * 4 + [True] + [False] * 7
    assert holding == [False] * 12
    # Another message reaching the count is said too, though the first still fails.
    for _ in range(5):
        reported = claims.record("<other@x>", claims.next("<other@x>", 1, 5))
    assert reported is True
    assert claims.held("<big@x>") is True and claims.held("<big@x>") is False
    claims.forget("<other@x>")  # taken over: nothing more to say of it
    assert claims.held("<other@x>") is False


def test_a_message_lost_again_after_a_long_while_is_still_said_once(clock: SetClock) -> None:
    """Losses of one message half a long lease apart (more than twice the ceiling): the
    count goes on and the message is reported once, not at every loss from the fifth."""
    claims = LostClaims(clock)
    said = []
    for _ in range(8):
        said.append(claims.record("<slow@x>", claims.next("<slow@x>", 1, 5)))
        clock.advance(2 * CEILING_SECONDS + 100)
    assert said == [False] * 4 + [True] + [False] * 3


@pytest.mark.parametrize(("gap", "unreachable"), [(10.0, True), (700.0, False)])
async def test_a_message_that_keeps_losing_is_reported_once_and_named_when_it_holds(
    layout: DemoLayout,
    nodes: tuple[Spool, Spool],
    clock: SetClock,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    gap: float,
    unreachable: bool,
) -> None:
    """Eight losses in a row of one message: one 'keeps failing' line, whether its fifth
    loss came while the spool was out of reach (the lease keeper requeues it then) or its
    losses are far apart; the line that says its claim holds again names it."""
    a, _ = nodes
    outbound, peer, client, log = await _one_queued_message(layout, a, clock, tmp_path)
    mark_retry = a.mark_retry

    def out_of_reach(*args: Any, **kwargs: Any) -> bool:
        raise MedgwError("the spool database cannot be reached", fix="-")

    try:
        for loss in range(1, 9):
            clock.advance(gap)  # past the wait (here at most 5 s)
            [record], _ = a.claim_due("lab", clock.now().timestamp(), 1)
            clock.advance(LEASE / 2 + 1)  # the claim as good as lost before the POST
            down = unreachable and loss == 5
            if down:
                monkeypatch.setattr(a, "mark_retry", out_of_reach)
            await outbound.send_one(record, peer, client, random.Random(1))
            if down:
                monkeypatch.setattr(a, "mark_retry", mark_retry)
                mark_retry("<m@x>", "claim lost", clock.now().timestamp(), unsent=True)
        assert len(_logged(log, "message.claim_lost")) == 8
        [failing] = _logged(log, "message.claims_keep_failing")
        assert '"losses": 5' in failing and '"message_id": "<m@x>"' in failing
        outbound._sender._claim_held(record)
        [holding] = _logged(log, "message.claims_holding")
        assert '"message_id": "<m@x>"' in holding and '"peer": "lab"' in holding
    finally:
        await client.close()
