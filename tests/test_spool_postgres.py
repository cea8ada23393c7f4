"""The PostgreSQL spool on a real server: what only it has to prove.

The behaviour both backends share is proven on both by the spool tests that use
the ``make_spool`` fixture (test_spool_bodies, test_spool_queries, test_retention,
test_spool_backends).  Here: several nodes' handles claiming from one database
at once, the schema created once and refused when newer, and a server that
stops and comes back under a running spool.
"""

from __future__ import annotations

import contextlib
import subprocess
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from pathlib import Path

import psycopg
import pytest
from psycopg.rows import DictRow

from gateway import __version__
from gateway.demo_run import wait_until
from gateway.errors import NodeNameTakenError, SpoolError, SpoolReplacedError, SpoolUnreachableError
from gateway.outbound.status import MAX_SEALED_RECEIPT
from gateway.pki.issue import make_ca, write_pem
from gateway.spool import Claimant, Intake, OutboundState, Settled
from gateway.spool.postgres import PostgresSettings, PostgresSpool, database
from gateway.spool.postgres.database import name_lock, translate
from gateway.spool.postgres.schema import VERSION
from gateway.spool.schema import file_name
from gateway.spool.sql import Params
from tests.clocks import SetClock, TickingClock
from tests.helpers.netns import wire
from tests.helpers.postgres import (
    PASSWORD,
    SKIP_REASON,
    PostgresServer,
    holding_node,
    running_server,
    server_binaries,
)
from tests.helpers.spool_indexes import RETENTION_FIRST_FORMS

pytestmark = pytest.mark.usefixtures("postgres_server")
REPO = Path(__file__).resolve().parent.parent


def queue_messages(spool: PostgresSpool, tmp_path: Path, count: int) -> list[str]:
    ids = [f"<m{i}@hospital>" for i in range(count)]
    for message_id in ids:
        spool.add_intake(message_id, "lab", "a.hl7", "text/plain", tmp_path, tmp_path)
        spool.mark_queued(message_id, None, [], "mic", 3, body=b"sealed")
    return ids


def test_statements_are_translated_outside_string_literals() -> None:
    assert translate("SELECT * FROM t WHERE a=? AND b='x?:y' AND c=:name") == (
        "SELECT * FROM t WHERE a=%s AND b='x?:y' AND c=%(name)s"
    )
    assert translate("SELECT 5 % 2, x::text") == "SELECT 5 %% 2, x::text"


def test_nodes_claiming_at_once_never_take_the_same_message(
    postgres: PostgresSettings, tmp_path: Path
) -> None:
    """Two nodes' spools, four senders each, claim from one queue at the same moment:
    every message is claimed by exactly one of them (FOR UPDATE SKIP LOCKED)."""
    nodes = [PostgresSpool(postgres, TickingClock()) for _ in range(2)]
    ids = queue_messages(nodes[0], tmp_path, 300)
    claimed: list[str] = []
    lock = threading.Lock()
    start = threading.Barrier(8)

    def sender(spool: PostgresSpool) -> None:
        start.wait()
        while True:
            batch, _ = spool.claim_due("lab", 2e9, 3)
            if not batch:
                return
            with lock:
                claimed.extend(r.message_id for r in batch)

    threads = [threading.Thread(target=sender, args=(n,)) for n in nodes for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    twice = [m for m, n in Counter(claimed).items() if n > 1]
    assert not twice, f"claimed by more than one sender: {twice[:5]}"
    assert sorted(claimed) == sorted(ids)
    assert {r.attempts for r in nodes[1].all_outbound()} == {1}
    assert nodes[1].counts() == {("lab", OutboundState.SENDING.value): 300}
    for node in nodes:
        node.close()


def test_the_schema_is_created_once_and_a_newer_one_is_refused(
    postgres: PostgresSettings, tmp_path: Path
) -> None:
    first = PostgresSpool(postgres, TickingClock())
    queue_messages(first, tmp_path, 1)
    again = PostgresSpool(postgres, TickingClock())  # opening it again changes nothing
    assert [r.message_id for r in again.all_outbound()] == ["<m0@hospital>"]
    first._transact(lambda db: db.execute("UPDATE spool_schema SET version=?", (VERSION + 1,)))
    with pytest.raises(SpoolError, match="newer than this medgw knows") as refused:
        PostgresSpool(postgres, TickingClock())
    assert "same medgw version on every node" in (refused.value.fix or "")
    for spool in (first, again):
        spool.close()


def node_spool(
    postgres: PostgresSettings,
    name: str,
    on_replaced: Callable[[SpoolReplacedError], None] | None = None,
) -> PostgresSpool:
    """A running node's spool: it holds its name."""
    claimant = Claimant(name, 60)
    return PostgresSpool(
        postgres, TickingClock(), claimant, on_replaced=on_replaced, hold_name=True
    )


def cut_sessions(server: PostgresServer, postgres: PostgresSettings, node: str) -> None:
    """Every session of ``node`` ended by the server (a network cut, a server restart),
    returning once they are gone; the node notices when it next uses them."""
    with server.admin(postgres.dbname) as db:
        db.execute(
            "SELECT pg_terminate_backend(pid, 10000) FROM pg_stat_activity"
            " WHERE application_name = %s",
            (f"medgw node {node}",),
        )


def test_a_node_name_is_held_by_one_running_node_at_a_time(
    postgres_server: PostgresServer, postgres: PostgresSettings
) -> None:
    """A second node under a running node's name refuses to start, naming the holder;
    a node whose sessions were cut takes its name again at its next renewal; one that
    finds its name taken meanwhile stops for good."""
    lost: list[SpoolReplacedError] = []
    first = node_spool(postgres, "gw-a", lost.append)
    with pytest.raises(NodeNameTakenError, match="node name 'gw-a'") as refused:
        node_spool(postgres, "gw-a")
    said = refused.value.message
    assert "'medgw node gw-a' over the database server's local socket" in said
    assert "server process" in said
    assert "node_name of its own" in (refused.value.fix or "")
    other = node_spool(postgres, "gw-b")  # another name: no conflict
    # Commands that read the spool (no name held) open it alongside.
    PostgresSpool(postgres, TickingClock(), Claimant("gw-a", 60)).close()

    cut_sessions(postgres_server, postgres, "gw-a")
    first.renew_leases()  # its name taken again, with new sessions
    with pytest.raises(NodeNameTakenError):
        node_spool(postgres, "gw-a")
    assert lost == []

    cut_sessions(postgres_server, postgres, "gw-a")
    second = node_spool(postgres, "gw-a")  # the name was free: it starts
    with pytest.raises(NodeNameTakenError, match="is in use by another running node"):
        first.renew_leases()
    assert len(lost) == 1 and isinstance(lost[0], NodeNameTakenError)
    with pytest.raises(NodeNameTakenError):  # for good: nothing more on any connection
        first.get("<m0@hospital>")
    first.close()
    # A node's lock goes with its session: closed, the name is free again.
    second.close()
    node_spool(postgres, "gw-a").close()
    other.close()


def test_a_name_held_by_a_session_of_another_role_is_named_without_its_start(
    postgres_server: PostgresServer, postgres: PostgresSettings
) -> None:
    """pg_stat_activity hides another role's session start from a role that may not read
    all statistics (the spool's): the refusal names the holder without it."""
    with postgres_server.admin(postgres.dbname) as holder:
        holder.execute("SET application_name = 'medgw node gw-a'")
        holder.execute("SELECT pg_advisory_lock(%s)", (name_lock("gw-a"),))
        with pytest.raises(NodeNameTakenError, match="is in use by another running node") as taken:
            node_spool(postgres, "gw-a")
    said = taken.value.message
    assert "the session 'medgw node gw-a'" in said and "server process" in said
    assert "connected since" not in said


class HolderLeaves:
    """A node's new session, on which ``leave`` ends the holder of the node's name right
    after the node's first try for the lock and before it looks who holds it."""

    def __init__(self, session: psycopg.Connection[DictRow], leave: Callable[[], None]) -> None:
        self._session = session
        self._leave: Callable[[], None] | None = leave

    def execute(
        self, query: str, params: Params | None = None, *, prepare: bool | None = None
    ) -> psycopg.Cursor[DictRow]:
        cursor = self._session.execute(query, params, prepare=prepare)
        if "pg_try_advisory_lock" in query and self._leave is not None:
            leave, self._leave = self._leave, None
            leave()
        return cursor

    def __getattr__(self, name: str) -> object:
        return getattr(self._session, name)


def test_a_node_takes_its_name_again_when_its_holder_leaves_between_the_try_and_the_look(
    postgres_server: PostgresServer, postgres: PostgresSettings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A node whose name's session was cut finds its name held by another session,
    which ends before the node looks who holds it: the node tries again and takes its
    name, instead of stopping for good on a holder that is gone."""
    lost: list[SpoolReplacedError] = []
    node = node_spool(postgres, "gw-a", lost.append)
    cut_sessions(postgres_server, postgres, "gw-a")
    holder = postgres_server.admin(postgres.dbname)
    holder.execute("SELECT pg_advisory_lock(%s)", (name_lock("gw-a"),))
    holder_pid = holder.info.backend_pid

    def leave() -> None:  # returns once the holder's session, and its lock, are gone
        with postgres_server.admin(postgres.dbname) as admin:
            admin.execute("SELECT pg_terminate_backend(%s, 10000)", (holder_pid,))

    opened, wrapped = node._open, list[object]()

    def open_session() -> object:
        session = opened()
        if wrapped:
            return session
        wrapped.append(session)  # the first: the session that takes the name again
        return HolderLeaves(session, leave)

    monkeypatch.setattr(node, "_open", open_session)
    node.renew_leases()
    assert lost == []
    with pytest.raises(NodeNameTakenError):  # node holds its name again
        node_spool(postgres, "gw-a")
    node.close()
    holder.close()


class HoldersComeAndGo:
    """A node's new session, around each of whose tries for the node's name another
    session takes the name before the try and ends right after it."""

    def __init__(
        self,
        session: psycopg.Connection[DictRow],
        come_and_go: Callable[[], contextlib.AbstractContextManager[None]],
    ) -> None:
        self._session = session
        self._come_and_go = come_and_go

    def execute(
        self, query: str, params: Params | None = None, *, prepare: bool | None = None
    ) -> psycopg.Cursor[DictRow]:
        if "pg_try_advisory_lock" not in query:
            return self._session.execute(query, params, prepare=prepare)
        with self._come_and_go():
            return self._session.execute(query, params, prepare=prepare)

    def __getattr__(self, name: str) -> object:
        return getattr(self._session, name)


def test_a_node_whose_name_holders_keep_leaving_says_so(
    postgres_server: PostgresServer, postgres: PostgresSettings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A node that finds its name held at each of its tries, by a session gone before it
    looks who holds it, stops saying that sessions kept coming and going under its name
    (not that another running node holds it), and how to find them."""
    lost: list[SpoolReplacedError] = []
    node = node_spool(postgres, "gw-a", lost.append)
    cut_sessions(postgres_server, postgres, "gw-a")

    @contextlib.contextmanager
    def come_and_go() -> Iterator[None]:  # leaves once its session, and lock, are gone
        with postgres_server.admin(postgres.dbname) as holder:
            holder.execute("SELECT pg_advisory_lock(%s)", (name_lock("gw-a"),))
            yield
            with postgres_server.admin(postgres.dbname) as admin:
                pid = holder.info.backend_pid
                admin.execute("SELECT pg_terminate_backend(%s, 10000)", (pid,))

    opened = node._open
    monkeypatch.setattr(node, "_open", lambda: HoldersComeAndGo(opened(), come_and_go))
    with pytest.raises(NodeNameTakenError, match="could not be taken") as stopped:
        node.renew_leases()
    said = stopped.value.message
    assert "after 4 tries" in said and "kept coming and going" in said
    assert "in use by another running node" not in said
    assert "'medgw node gw-a' in pg_stat_activity" in (stopped.value.fix or "")
    assert lost == [stopped.value]
    node.close()


def test_a_node_ends_no_session_with_its_old_sessions_process_id_started_later(
    postgres_server: PostgresServer, postgres: PostgresSettings
) -> None:
    """A node whose name's session was cut finds its name held by a session with the
    process id its own had (a server restart can give it to another): started at
    another time, that session is another node's, which the node does not end; it
    stops, naming it."""
    lost: list[SpoolReplacedError] = []
    node = node_spool(postgres, "gw-a", lost.append)
    cut_sessions(postgres_server, postgres, "gw-a")
    duplicate = node_spool(postgres, "gw-a")  # started meanwhile under the same name
    with postgres_server.admin(postgres.dbname) as admin:
        [(pid,)] = admin.execute(
            "SELECT pid FROM pg_locks WHERE locktype = 'advisory' AND granted"
        ).fetchall()
    assert node._name_held is not None
    node._name_held = (int(str(pid)), node._name_held[1])  # the id its own session had
    with pytest.raises(NodeNameTakenError, match="is in use by another running node"):
        node.renew_leases()
    assert len(lost) == 1
    duplicate.renew_leases()  # its session not ended: it holds its name still
    node.close()
    duplicate.close()


def test_a_newer_schema_is_refused_naming_both_releases_and_the_node_that_upgraded_it(
    postgres: PostgresSettings, monkeypatch: pytest.MonkeyPatch
) -> None:
    PostgresSpool(postgres, TickingClock(), Claimant("gw-a", 60)).close()
    # A newer release, started on node gw-new, upgrades the spool.
    monkeypatch.setattr("gateway.spool.postgres.schema.VERSION", VERSION + 1)
    monkeypatch.setattr("gateway.spool.postgres.schema.__version__", "9.9.9")
    PostgresSpool(postgres, TickingClock(), Claimant("gw-new", 60)).close()
    monkeypatch.undo()
    with pytest.raises(SpoolError) as refused:
        PostgresSpool(postgres, TickingClock(), Claimant("gw-a", 60))
    said = refused.value.message
    assert (
        f"schema version {VERSION + 1}, newer than this medgw knows ({VERSION}; medgw "
        f"{__version__} on node gw-a): medgw 9.9.9 on node gw-new has upgraded it"
    ) in said
    assert "upgrade medgw on node gw-a" in (refused.value.fix or "")
    assert "same medgw version on every node" in (refused.value.fix or "")


@dataclass
class StoppedClock:
    """Monotonic (and boot) time that moves only when the test says (for the back-off)."""

    at: float = 1000.0
    wall: TickingClock = field(default_factory=TickingClock)

    def now(self) -> datetime:
        return self.wall.now()

    def monotonic(self) -> float:
        return self.at

    def boottime(self) -> float:
        return self.at


def test_a_stopped_server_fails_calls_at_once_and_is_reconnected_after_a_back_off(
    postgres_server: PostgresServer, postgres: PostgresSettings, tmp_path: Path
) -> None:
    changes: list[str | None] = []
    clock = StoppedClock()
    spool = PostgresSpool(postgres, clock, on_change=changes.append)
    queue_messages(spool, tmp_path, 2)
    postgres_server.stop("immediate")  # as if it crashed
    try:
        with pytest.raises(SpoolError, match="is unreachable") as lost:
            spool.claim_due("lab", 2e9, 1)
        assert "medgw tries again by itself" in (lost.value.fix or "")
        assert len(changes) == 1 and changes[0]  # told once, with the cause
        # Every call fails: the back-off grows, and within it no connection is tried.
        for _ in range(3):
            with pytest.raises(SpoolError, match="is unreachable"):
                spool.get("<m0@hospital>")
            clock.at += 0.01
        with pytest.raises(SpoolError, match=r"next in \d+ s"):
            spool.get("<m0@hospital>")
    finally:
        postgres_server.start()
    with pytest.raises(SpoolError, match="is unreachable"):  # still within the back-off
        spool.get("<m0@hospital>")
    clock.at += 60
    record = spool.get("<m0@hospital>")  # back: nothing lost, nothing half-done
    assert record is not None and record.state is OutboundState.QUEUED
    assert changes[1:] == [None]
    (claimed,), _ = spool.claim_due("lab", 2e9, 1)
    assert claimed.message_id == "<m0@hospital>"
    assert spool.counts() == {("lab", "sending"): 1, ("lab", "queued"): 1}
    spool.close()


def test_a_step_of_a_nodes_wall_clock_between_renewals_moves_no_lease(
    postgres: PostgresSettings, tmp_path: Path
) -> None:
    """Leases are reckoned from the server's time at the last reading plus the node's
    monotonic time since: a node whose wall clock steps ten minutes ahead between two
    renewals takes over no live claim, nor does one stepped back claim for a lease
    already run out; once a lease has passed on the monotonic clock, a claim is over."""
    clock_a, clock_b = StoppedClock(), StoppedClock()
    gw_a = PostgresSpool(postgres, clock_a, Claimant("gw-a", 60))
    gw_b = PostgresSpool(postgres, clock_b, Claimant("gw-b", 60))
    first, second = queue_messages(gw_a, tmp_path, 2)
    (claimed,), _ = gw_a.claim_due("lab", 2e9, 1)
    assert claimed.message_id == first
    clock_b.wall.at += timedelta(minutes=10)  # gw-b's clock set ahead
    assert gw_b.take_over_expired() == []  # gw-a's claim is live
    clock_a.wall.at -= timedelta(minutes=10)  # gw-a's clock set back
    (claimed,), _ = gw_a.claim_due("lab", 2e9, 1)
    assert claimed.message_id == second
    assert gw_b.take_over_expired() == []  # a whole lease ahead of it still
    clock_b.at += 61  # a lease on, on both of gw-b's clocks
    clock_b.wall.at += timedelta(seconds=61)
    assert sorted(r.message_id for r in gw_b.take_over_expired()) == [first, second]
    for spool in (gw_a, gw_b):
        spool.close()


def test_reach_tries_one_connection_within_the_back_off(
    postgres_server: PostgresServer, postgres: PostgresSettings, tmp_path: Path
) -> None:
    """The daemon's watch (gateway.daemon.spoolwatch) reaches for the database every
    second, whatever the back-off of the spool's other calls: a database that answers
    again is heard at once, not when the back-off (up to half a minute) has run out."""
    changes: list[str | None] = []
    clock = StoppedClock()  # the back-off never runs out by itself
    spool = PostgresSpool(postgres, clock, on_change=changes.append)
    queue_messages(spool, tmp_path, 1)
    spool.reach()  # it answers: nothing to do
    postgres_server.stop("immediate")
    try:
        for _ in range(3):  # the back-off grows
            with pytest.raises(SpoolError, match="is unreachable"):
                spool.get("<m0@hospital>")
            clock.at += 0.01
        with pytest.raises(SpoolUnreachableError, match="is unreachable"):
            spool.reach()  # tried, still down
        assert len(changes) == 1 and changes[0]
    finally:
        postgres_server.start()
    with pytest.raises(SpoolError, match="is unreachable"):  # within the back-off
        spool.get("<m0@hospital>")
    spool.reach()
    assert changes[1:] == [None]
    record = spool.get("<m0@hospital>")  # the clock has not moved
    assert record is not None and record.state is OutboundState.QUEUED
    spool.close()
    spool.reach()  # closed: nothing


def test_a_node_paused_reads_the_servers_time_again_before_its_leases(
    postgres: PostgresSettings, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A node whose VM was paused five minutes (its monotonic and boot clocks stood still,
    its wall clock was set right on resume) reads the server's time again before it
    writes or judges a lease: it claims for a whole lease, which the other node does not
    take over, and no longer holds the claim whose lease ran out meanwhile, which the
    other node takes over (else it would send that message a second time)."""
    clock_a, clock_b = StoppedClock(), StoppedClock()
    gw_a = PostgresSpool(postgres, clock_a, Claimant("gw-a", 60))
    gw_b = PostgresSpool(postgres, clock_b, Claimant("gw-b", 60))
    first, second = queue_messages(gw_a, tmp_path, 2)
    (claimed,), _ = gw_a.claim_due("lab", 2e9, 1)
    assert claimed.message_id == first
    # Five minutes pass: on the server's clock (which the test cannot move: it is read
    # five minutes ahead) and on both of gw-b's clocks; of gw-a's, on its wall clock only.
    later = database._SERVER_TIME.replace("clock_timestamp()", "clock_timestamp() + '5 min'")
    monkeypatch.setattr(database, "_SERVER_TIME", later)
    clock_b.at += 300
    clock_b.wall.at += timedelta(minutes=5)
    clock_a.wall.at += timedelta(minutes=5)
    (claimed,), _ = gw_a.claim_due("lab", 2e9, 1)  # read again within its transaction
    assert claimed.message_id == second
    assert not gw_a.holds_lease(first)  # run out: gw-a sends it no more
    assert gw_a.holds_lease(second)
    assert [r.message_id for r in gw_b.take_over_expired()] == [first]
    for spool in (gw_a, gw_b):
        spool.close()


def over_tls(
    server: PostgresServer, database: PostgresSettings, tmp_path: Path, **changes: object
) -> PostgresSettings:
    """``database`` reached over TCP on 127.0.0.1 as "localhost", with TLS and a password
    file (mode 600); ``changes`` replace any of these."""
    password = tmp_path / "db.password"
    password.write_text(PASSWORD + "\n")
    password.chmod(0o600)
    settings = replace(
        database, socket_dir=None, host="localhost", ca_file=server.ca_file, password_file=password
    )
    return replace(settings, **changes)  # type: ignore[arg-type]


def test_over_the_network_the_server_is_verified_and_the_password_read_from_a_file(
    postgres_server: PostgresServer, postgres: PostgresSettings, tmp_path: Path
) -> None:
    spool = PostgresSpool(over_tls(postgres_server, postgres, tmp_path), TickingClock())
    (row,) = spool._read("SELECT ssl, version FROM pg_stat_ssl WHERE pid = pg_backend_pid()", ())
    assert row["ssl"] is True and row["version"] in ("TLSv1.2", "TLSv1.3")
    spool.close()


# The server's host and a node's on a wire of their own (tests/helpers/netns.py).
SERVER_HOST, NODE_HOST = "10.77.9.1", "10.77.9.2"
# Seconds to wait for the server to drop a vanished node's sessions: generous (its
# settings say about half a minute), below the suite's 300 s per test, and far below
# the server host's default keepalive of two hours.
VANISHED_WAIT = 180.0


@pytest.mark.long
def test_the_server_drops_a_vanished_nodes_session_within_half_a_minute(tmp_path: Path) -> None:
    """The server's own keepalives for the node's sessions: a node's host that crashed
    (no reset sent) loses its sessions, and its name's lock, within about half a
    minute, not the server host's default two hours, so the node restarted takes its
    name back.  A server of the test's own in one network namespace, a running node's
    spool over TLS from another; the node's end of the wire goes down."""
    bin_dir = server_binaries()
    if bin_dir is None:
        pytest.skip(SKIP_REASON)
    with (
        wire(SERVER_HOST, NODE_HOST) as link,
        running_server(
            bin_dir,
            address=SERVER_HOST,
            clients=f"{NODE_HOST}/32",
            prefix=link.exec(link.near),
        ) as server,
    ):
        database = server.new_database()
        node = subprocess.Popen(
            [
                *link.exec(link.far),
                *holding_node(over_tls(server, database, tmp_path, host=SERVER_HOST), "gw-a"),
            ],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            cwd=REPO,
        )
        try:
            assert node.stdout is not None and node.stdout.readline() == "holding\n", (
                node.communicate()[1]
            )
            with server.admin(database.dbname) as db:
                assert node_sessions(db, "gw-a") == [NODE_HOST, NODE_HOST]
                with pytest.raises(NodeNameTakenError, match=f"'medgw node gw-a' from {NODE_HOST}"):
                    node_spool(database, "gw-a")  # the node's host runs: the name is its

                link.cut()  # the node's host vanishes, without a word to the server
                cut = time.monotonic()
                wait_until(
                    lambda: not node_sessions(db, "gw-a"),
                    VANISHED_WAIT,
                    "the server to end the sessions of the vanished node gw-a",
                )
                print(f"the server ended the node's sessions {time.monotonic() - cut:.1f} s after")
                assert name_locks(db) == []
            node_spool(database, "gw-a").close()  # the node restarted takes its name back
        finally:
            node.kill()
            node.communicate()


def node_sessions(db: psycopg.Connection[tuple[object, ...]], node: str) -> list[object]:
    """The client address of each session of ``node`` the server still has."""
    rows = db.execute(
        "SELECT host(client_addr) FROM pg_stat_activity WHERE application_name = %s ORDER BY pid",
        (f"medgw node {node}",),
    ).fetchall()
    return [address for (address,) in rows]


def name_locks(db: psycopg.Connection[tuple[object, ...]]) -> list[tuple[object, ...]]:
    """The advisory locks (node names') sessions hold in the database of ``db``."""
    return db.execute(
        "SELECT pid, classid, objid FROM pg_locks WHERE locktype = 'advisory' AND granted"
        " AND database = (SELECT oid FROM pg_database WHERE datname = current_database())"
    ).fetchall()


def test_a_server_whose_certificate_or_name_does_not_verify_is_never_used(
    postgres_server: PostgresServer, postgres: PostgresSettings, tmp_path: Path
) -> None:
    other = make_ca("Some other CA", now=datetime.now(UTC))
    other_ca = tmp_path / "other-ca.pem"
    write_pem(other_ca, other.certificate)
    for changes, words in (
        ({"ca_file": other_ca}, "certificate verify failed"),
        # The certificate names "localhost": 127.0.0.1 is not its name (verify-full).
        ({"host": "127.0.0.1"}, "does not match host name"),
    ):
        settings = over_tls(postgres_server, postgres, tmp_path, **changes)
        with pytest.raises(SpoolUnreachableError, match=words):
            PostgresSpool(settings, TickingClock())


def test_a_password_file_others_can_read_is_not_used(
    postgres_server: PostgresServer, postgres: PostgresSettings, tmp_path: Path
) -> None:
    settings = over_tls(postgres_server, postgres, tmp_path)
    assert settings.password_file is not None
    settings.password_file.chmod(0o640)
    with pytest.raises(SpoolError, match="password file is not private") as refused:
        PostgresSpool(settings, TickingClock())
    assert "chmod 600" in (refused.value.fix or "")


def test_a_failed_statement_is_reported_without_the_rows_values(
    postgres: PostgresSettings,
) -> None:
    """The server's DETAIL line ("Failing row contains (...)") names the row's values (file
    names, message IDs): a spool error carries the server's primary message and SQLSTATE
    only, and does not chain the server's exception whose text has it."""
    spool = PostgresSpool(postgres, TickingClock())
    with pytest.raises(SpoolError) as raised:
        spool._transact(
            lambda db: db.execute(
                "INSERT INTO data_keys (item, kek, wrapped) VALUES (?, ?, NULL)",
                ("outbound-body:<patient-4711@hospital>", 1),
            )
        )
    text = str(raised.value)
    assert "violates not-null constraint" in text and "SQLSTATE 23502" in text
    assert "patient-4711" not in text and "Failing row" not in text
    assert raised.value.__cause__ is None and raised.value.__suppress_context__
    spool.close()


def test_opening_a_current_spool_takes_no_table_lock_from_running_nodes(
    postgres_server: PostgresServer, postgres: PostgresSettings, tmp_path: Path
) -> None:
    """A node starting (or a command opening the spool) while another node is in a
    transaction neither waits for it nor ends it: the tables are created or upgraded
    only when the schema's version says so."""
    running = PostgresSpool(postgres, TickingClock())
    queue_messages(running, tmp_path, 1)
    with postgres_server.admin(postgres.dbname) as other_node:
        other_node.execute("BEGIN")
        other_node.execute("SELECT * FROM outbound FOR UPDATE")  # a claim in progress
        opened: list[PostgresSpool] = []
        starting = threading.Thread(
            target=lambda: opened.append(PostgresSpool(postgres, TickingClock()))
        )
        starting.start()
        starting.join(timeout=20)
        assert opened, "opening the spool waited for another node's transaction"
        other_node.execute("COMMIT")
    for spool in (running, *opened):
        spool.close()


def test_times_are_ordered_as_times_in_a_database_of_another_collation(
    postgres_server: PostgresServer, tmp_path: Path
) -> None:
    """A database created with an ICU collation (which puts a time with microseconds
    before the whole second it follows); one created before the times were collated is
    upgraded in place."""
    with postgres_server.admin() as admin:
        admin.execute(
            'CREATE DATABASE "spool_icu" OWNER "medgw" LOCALE_PROVIDER icu'
            " ICU_LOCALE 'und' LOCALE 'C.UTF-8' TEMPLATE template0"
        )
    settings = replace(postgres_server.new_database(), dbname="spool_icu")
    whole = datetime(2026, 12, 5, 12, 0, 0, tzinfo=UTC)
    clock = SetClock(whole)
    spool = PostgresSpool(settings, clock)

    def times_in_order() -> None:
        for at, name in ((whole, "whole"), (whole + timedelta(microseconds=1), "after")):
            clock.at = at
            spool.add_intake(f"<{name}@lab>", "lab", "a.hl7", "text/plain", tmp_path, tmp_path)
        assert [r.message_id for r in spool.all_outbound()] == ["<whole@lab>", "<after@lab>"]

    times_in_order()
    # As a database of the version before: times in the database's own collation.
    spool._transact(
        lambda db: [
            db.execute("DELETE FROM outbound", ()),
            db.execute('ALTER TABLE outbound ALTER COLUMN created_at TYPE TEXT COLLATE "default"'),
            db.execute("UPDATE spool_schema SET version=?", (VERSION - 1,)),
        ]
    )
    spool.close()
    spool = PostgresSpool(settings, clock)
    times_in_order()
    spool.close()


def test_a_spool_upgraded_with_many_rows_answers_the_sweeps_by_its_file_name_indexes(
    postgres_server: PostgresServer, postgres: PostgresSettings, tmp_path: Path
) -> None:
    """The indexes a start's sweeps search are built at the first start after the
    upgrade, with the statistics the planner needs to use them for a batch of names
    (else, until autovacuum's next ANALYZE, it reads the whole table per batch)."""
    spool = PostgresSpool(postgres, TickingClock())
    spool.add_intakes(
        [
            Intake(f"<m{i}@h>", "lab", "a.hl7", "text/plain", tmp_path, tmp_path / f"p{i:06d}")
            for i in range(5000)
        ]
    )
    # As a database of the version before: no file-name indexes.
    spool._transact(
        lambda db: [
            db.execute("DROP INDEX outbound_payload_name", ()),
            db.execute("DROP INDEX outbound_receipt_file", ()),
            db.execute("UPDATE spool_schema SET version=?", (VERSION - 2,)),
        ]
    )
    spool.close()
    spool = PostgresSpool(postgres, TickingClock())
    names = [f"p{i:06d}" for i in range(0, 5000, 10)]
    assert set(spool.payloads_recorded(names)) == set(names)
    spool.close()
    name = file_name("payload_path")
    marks = ",".join(f"'{n}'" for n in names)
    with postgres_server.admin(postgres.dbname) as db:
        plan = [
            str(row[0])
            for row in db.execute(f"EXPLAIN SELECT {name} FROM outbound WHERE {name} IN ({marks})")
        ]
    assert "outbound_payload_name" in plan[0] + plan[-1], plan
    assert not any("Seq Scan" in step for step in plan), plan


def upgraded_indexes(
    server: PostgresServer, database: PostgresSettings, *tables: str
) -> dict[str, str]:
    """The definitions of the indexes of ``tables`` in ``database``, by name, once its
    schema is checked to be of this version (upgraded by the spool's start)."""
    with server.admin(database.dbname) as db:
        indexes = {
            str(row[0]): str(row[1])
            for row in db.execute(
                "SELECT indexname, indexdef FROM pg_indexes WHERE tablename = ANY(%s)",
                (list(tables),),
            )
        }
        version = [tuple(r) for r in db.execute("SELECT version FROM spool_schema")]
    assert version == [(VERSION,)]
    return indexes


def test_a_spool_of_the_version_before_gets_the_indexes_of_one_state(
    postgres_server: PostgresServer, postgres: PostgresSettings, tmp_path: Path
) -> None:
    """The sender's lookups had indexes of every row by state, whose entry each change of
    state moved: the first start after the upgrade drops them for those of the one state
    each looks up, and the queue is read through them."""
    spool = PostgresSpool(postgres, TickingClock())
    queue_messages(spool, tmp_path, 3)
    # As a database of the version before: those indexes, not the new ones.
    spool._transact(
        lambda db: [
            db.execute("DROP INDEX outbound_queued", ()),
            db.execute("DROP INDEX outbound_expiring", ()),
            db.execute("DROP INDEX outbound_awaiting", ()),
            db.execute(
                "CREATE INDEX outbound_next ON outbound (peer, state, next_attempt_at, created_at)",
                (),
            ),
            db.execute("CREATE INDEX outbound_expiry ON outbound (peer, state, expires_at)", ()),
            db.execute(
                "CREATE INDEX outbound_unanswered ON outbound (peer, state, updated_at)", ()
            ),
            db.execute("UPDATE spool_schema SET version=?", (VERSION - 3,)),
        ]
    )
    spool.close()
    spool = PostgresSpool(postgres, TickingClock())
    indexes = upgraded_indexes(postgres_server, postgres, "outbound")
    assert not {"outbound_next", "outbound_expiry", "outbound_unanswered"} & set(indexes)
    assert "WHERE (state = 'queued'::text)" in indexes["outbound_queued"], indexes
    assert "WHERE (state = 'awaiting-receipt'::text)" in indexes["outbound_awaiting"], indexes
    claimed, _ = spool.claim_due("lab", 2e9, 2)
    assert [r.message_id for r in claimed] == ["<m0@hospital>", "<m1@hospital>"]
    spool.close()


# The indexes of retention's batches of hand-overs and received messages, as they are.
RETENTION_INDEXES = {
    "handover_copy_kept_at": "ON public.handover USING btree (state, updated_at)"
    " WHERE ((state = 'done'::text) AND (copy_purged_at IS NULL))",
    "handover_copy_gone_at": "ON public.handover USING btree (state, updated_at)"
    " WHERE ((state = 'done'::text) AND (copy_purged_at IS NOT NULL))",
    "inbound_receipt_kept_at": "ON public.inbound USING btree (state, updated_at)"
    " WHERE ((state = 'delivered'::text) AND (receipt_body IS NOT NULL))",
    "inbound_receipt_gone_at": "ON public.inbound USING btree (state, updated_at)"
    " WHERE ((state = 'delivered'::text) AND (receipt_body IS NULL))",
}


def test_a_spool_of_the_version_before_gets_the_indexes_by_peer_and_by_message(
    postgres_server: PostgresServer, postgres: PostgresSettings, tmp_path: Path
) -> None:
    """An operator's listing of a peer's messages, the lookup of a message's hand-overs
    and retention's batches of hand-overs and received messages read through indexes a
    spool of the versions before lacks: the first start after the upgrade builds them."""
    spool = PostgresSpool(postgres, TickingClock())
    queue_messages(spool, tmp_path, 3)
    # As a database of the versions before: none of these indexes.
    dropped = ["outbound_peer", "handover_message", *RETENTION_INDEXES]
    spool._transact(
        lambda db: [
            *(db.execute(f"DROP INDEX IF EXISTS {name}", ()) for name in dropped),
            db.execute("UPDATE spool_schema SET version=?", (VERSION - len(dropped),)),
        ]
    )
    spool.close()
    spool = PostgresSpool(postgres, TickingClock())
    indexes = upgraded_indexes(postgres_server, postgres, "outbound", "handover", "inbound")
    assert "ON public.outbound USING btree (peer, created_at)" in indexes["outbound_peer"]
    assert "ON public.handover USING btree (message_id)" in indexes["handover_message"]
    for name, definition in RETENTION_INDEXES.items():
        assert definition in indexes[name], indexes[name]
    listed = spool.list_outbound(peer="lab")
    assert [r.message_id for r in listed] == ["<m2@hospital>", "<m1@hospital>", "<m0@hospital>"]
    spool.close()


def test_a_spool_with_retention_s_first_indexes_gets_their_new_forms(
    postgres_server: PostgresServer, postgres: PostgresSettings
) -> None:
    """A spool of the version before has retention's indexes of the time alone (those of
    the records of every row done or answered): the first start after the upgrade
    replaces them with the new ones."""
    spool = PostgresSpool(postgres, TickingClock())
    spool._transact(
        lambda db: [
            *(db.execute(f"DROP INDEX IF EXISTS {name}", ()) for name in RETENTION_INDEXES),
            *(db.execute(statement, ()) for statement in RETENTION_FIRST_FORMS.values()),
            # Four statements fewer: those that drop the first forms.
            db.execute("UPDATE spool_schema SET version=?", (VERSION - 4,)),
        ]
    )
    spool.close()
    spool = PostgresSpool(postgres, TickingClock())
    spool.close()
    indexes = upgraded_indexes(postgres_server, postgres, "handover", "inbound")
    assert not set(RETENTION_FIRST_FORMS) & set(indexes), indexes
    for name, definition in RETENTION_INDEXES.items():
        assert definition in indexes[name], indexes[name]


def test_a_spool_of_the_version_before_gets_the_receipt_columns_and_older_nodes_refuse_it(
    postgres_server: PostgresServer,
    postgres: PostgresSettings,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Receipts kept in rows: the first start after the upgrade adds the columns (the
    receipt, bytea, left out of the snapshots of displaced records; its SHA-256, text,
    kept in them) to a spool with rows; a node of the release before then refuses the
    spool, whose rows it would not understand."""
    spool = PostgresSpool(postgres, TickingClock())
    [message_id] = queue_messages(spool, tmp_path, 1)
    spool._transact(
        lambda db: [
            db.execute("ALTER TABLE outbound DROP COLUMN receipt", ()),
            db.execute("ALTER TABLE outbound DROP COLUMN receipt_sha256", ()),
            db.execute("UPDATE spool_schema SET version=?", (VERSION - 2,)),
        ]
    )
    spool.close()
    spool = PostgresSpool(postgres, TickingClock())
    spool.mark_sending(message_id)
    done = Settled(
        message_id,
        OutboundState.DELIVERED,
        "processed",
        None,
        receipt=b"\x89kept",
        receipt_sha256="6b" * 32,
    )
    assert spool.mark_settled([done]) == [message_id]
    assert spool.stored_receipt(message_id, MAX_SEALED_RECEIPT) == b"\x89kept"
    record = spool.get(message_id)
    assert record is not None and record.receipt_kept and record.receipt_path is None
    assert record.receipt_sha256 == "6b" * 32
    spool.close()
    with postgres_server.admin(postgres.dbname) as db:
        kinds = {
            str(name): str(kind)
            for name, kind in db.execute(
                "SELECT column_name, data_type FROM information_schema.columns"
                " WHERE table_name = 'outbound' AND column_name LIKE 'receipt%'"
            ).fetchall()
        }
        [(function,)] = db.execute(
            "SELECT prosrc FROM pg_proc WHERE proname = 'keep_displaced_owed'"
        ).fetchall()
        version = [tuple(r) for r in db.execute("SELECT version FROM spool_schema")]
    assert kinds == {"receipt_path": "text", "receipt": "bytea", "receipt_sha256": "text"}
    assert "'receipt'" in str(function) and "'receipt_sha256'" not in str(function)
    assert version == [(VERSION,)]
    monkeypatch.setattr("gateway.spool.postgres.schema.VERSION", VERSION - 1)
    with pytest.raises(SpoolError, match="newer than this medgw knows"):
        PostgresSpool(postgres, TickingClock())
