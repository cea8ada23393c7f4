"""The PostgreSQL spool's generation, on a real server: a node that could not reach
the database while a restore replaced it stops when it reaches it again, and writes
nothing more; a node reconnecting while a restore runs waits for it; a refused restore
stops nobody; a spool from before the generation gets one at its first start.

The restore's database steps are the real ones (``pg_dump``, the lock a restore holds,
the new generation, ``pg_restore``): tests/test_restore_under_node.py runs the whole
``medgw restore`` against a running ``medgw run`` node.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest

from gateway.backup import pgspool
from gateway.clock import SystemClock
from gateway.demo_run import wait_until
from gateway.errors import SpoolReplacedError, SpoolUnreachableError
from gateway.spool import Claimant
from gateway.spool.postgres import PostgresSettings, PostgresSpool
from gateway.spool.postgres.schema import VERSION
from tests.helpers.commit_cut import CommitCut, commit_cut
from tests.helpers.postgres import PostgresServer

pytestmark = pytest.mark.usefixtures("postgres_server")


cut = commit_cut()


class Node:
    """A node's spool handle through ``cut``, and what its ``on_replaced`` heard."""

    def __init__(self, postgres: PostgresSettings, cut: CommitCut, name: str) -> None:
        self.heard: list[SpoolReplacedError] = []
        settings = replace(postgres, socket_dir=cut.socket_dir, connect_timeout=1)
        self.spool = PostgresSpool(
            settings, SystemClock(), Claimant(name), on_replaced=self.heard.append
        )

    def take_in(self, message_id: str, tmp_path: Path) -> None:
        self.spool.add_intake(message_id, "lab", "a.hl7", "text/plain", tmp_path, tmp_path)

    def error(self) -> SpoolUnreachableError | None:
        """What a call on the spool fails with now (None: it answered)."""
        try:
            self.spool.all_outbound()
        except SpoolUnreachableError as exc:
            return exc
        return None

    def outcome(self) -> type[Exception] | None:
        """What a call on the spool gives now: None (it answered), or the error's type."""
        error = self.error()
        return None if error is None else type(error)


@pytest.fixture
def node(postgres: PostgresSettings, cut: CommitCut) -> Iterator[Node]:
    handle = Node(postgres, cut, "lab-a")
    yield handle
    handle.spool.close()


def cut_off(cut: CommitCut, node: Node) -> None:
    """The node's connections lost, and no new one let through."""
    cut.refuse = True
    cut.drop()
    assert node.outcome() is SpoolUnreachableError


def sessions(server: PostgresServer, postgres: PostgresSettings, name: str) -> int:
    with server.admin(postgres.dbname) as admin:
        row = admin.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE application_name = %s",
            (f"medgw node {name}",),
        ).fetchone()
    assert row is not None
    return int(str(row[0]))


def restore_database(
    postgres_server: PostgresServer, postgres: PostgresSettings, dump: Path
) -> None:
    """What ``medgw restore`` does to the database, in its order: while holding the lock
    of the nodes' starts, no node connected, a new generation, then ``pg_restore``."""
    with pgspool.held(postgres) as conn:
        # A cut-off node's sessions end on the server once it notices its client gone.
        wait_until(lambda: pgspool.nodes_connected(conn) == [], 30, "no node's session left")
        pgspool.replace_spool(postgres, pgspool.tool("pg_restore", postgres_server.bin), dump)


def dumped(postgres_server: PostgresServer, postgres: PostgresSettings, tmp_path: Path) -> Path:
    dump = tmp_path / "spool.pgdump"
    with pgspool.snapshot(postgres, pgspool.tool("pg_dump", postgres_server.bin), dump):
        pass
    return dump


def test_a_node_cut_off_while_its_spool_was_restored_stops_when_it_reaches_it_again(
    node: Node,
    cut: CommitCut,
    postgres_server: PostgresServer,
    postgres: PostgresSettings,
    tmp_path: Path,
) -> None:
    node.take_in("<before-backup@lab>", tmp_path)
    dump = dumped(postgres_server, postgres, tmp_path)
    node.take_in("<after-backup@lab>", tmp_path)  # what the node holds goes beyond the backup
    cut_off(cut, node)

    restore_database(postgres_server, postgres, dump)
    cut.refuse = False

    # It tries again after its back-off: the first connection it gets is checked.
    wait_until(lambda: node.outcome() is SpoolReplacedError, 30, "the node told it was replaced")
    [heard] = node.heard
    assert "was restored (replaced) while this node (lab-a) was running" in heard.message
    assert postgres.dbname in heard.message
    assert heard.fix is not None and "start node lab-a again" in heard.fix
    # For good: every later call fails at once, on no connection, and writes nothing.
    with pytest.raises(SpoolReplacedError):
        node.take_in("<after-restore@lab>", tmp_path)
    assert node.outcome() is SpoolReplacedError
    assert len(node.heard) == 1  # told once
    wait_until(
        lambda: sessions(postgres_server, postgres, "lab-a") == 0,
        30,
        "the replaced node's sessions ended (its last one closed by the check)",
    )
    # A start after the restore reads the restored spool, and runs.
    again = Node(postgres, cut, "lab-a")
    try:
        assert [r.message_id for r in again.spool.all_outbound()] == ["<before-backup@lab>"]
        again.take_in("<after-restart@lab>", tmp_path)
        assert again.outcome() is None and again.heard == []
    finally:
        again.spool.close()


def test_a_node_reconnecting_during_a_restore_waits_for_it_then_stops(
    node: Node,
    cut: CommitCut,
    postgres_server: PostgresServer,
    postgres: PostgresSettings,
    tmp_path: Path,
) -> None:
    node.take_in("<one@lab>", tmp_path)
    dump = dumped(postgres_server, postgres, tmp_path)
    cut_off(cut, node)
    with pgspool.held(postgres):
        cut.refuse = False
        # It gets a connection, but not past the check while the restore holds the spool:
        # unreachable for now, never served by the spool being replaced.
        held = "a restore (medgw restore) or another node's schema upgrade holds it"
        wait_until(lambda: held in str(node.error()), 30, "a reconnect held by the restore")
        with pytest.raises(SpoolUnreachableError) as waiting:
            node.take_in("<during@lab>", tmp_path)
        assert not isinstance(waiting.value, SpoolReplacedError)
        assert node.heard == []
        pgspool.replace_spool(postgres, pgspool.tool("pg_restore", postgres_server.bin), dump)
    wait_until(lambda: node.outcome() is SpoolReplacedError, 30, "the node told it was replaced")
    assert len(node.heard) == 1


def test_a_restore_refused_before_it_changed_anything_stops_no_node(
    node: Node, cut: CommitCut, postgres: PostgresSettings, tmp_path: Path
) -> None:
    node.take_in("<one@lab>", tmp_path)
    cut_off(cut, node)
    with pgspool.held(postgres):  # a restore that refuses (a bundle that does not open ...)
        pass
    cut.refuse = False
    wait_until(lambda: node.outcome() is None, 30, "the node served again")
    node.take_in("<two@lab>", tmp_path)
    assert node.heard == []


def test_a_restore_whose_dump_could_not_be_loaded_stops_no_node(
    node: Node,
    cut: CommitCut,
    postgres_server: PostgresServer,
    postgres: PostgresSettings,
    tmp_path: Path,
) -> None:
    """pg_restore runs in one transaction: when it fails, the spool is as the nodes left
    it, and a node cut off meanwhile goes on with it when it is back."""
    node.take_in("<one@lab>", tmp_path)
    cut_off(cut, node)
    broken = tmp_path / "broken.pgdump"
    broken.write_bytes(b"PGDMP" + bytes(range(256)) * 4)
    with pytest.raises(pgspool.ToolError):
        restore_database(postgres_server, postgres, broken)
    cut.refuse = False
    wait_until(lambda: node.outcome() is None, 30, "the node served again")
    node.take_in("<two@lab>", tmp_path)
    assert node.heard == []
    assert [r.message_id for r in node.spool.all_outbound()] == ["<one@lab>", "<two@lab>"]


def wrapped_pg_restore(postgres_server: PostgresServer, folder: Path, after: str) -> str:
    """A ``pg_restore`` in ``folder`` (where a restore finds it: ``[backup] pg_bin_dir``,
    else PATH) that runs the real one, then, if that succeeded, runs ``after`` (a shell
    command: how it ends)."""
    folder.mkdir()
    wrapper = folder / "pg_restore"
    real = postgres_server.bin / "pg_restore"
    wrapper.write_text(f'#!/bin/sh\n"{real}" "$@" || exit $?\n{after}\n')
    wrapper.chmod(0o755)
    return pgspool.tool("pg_restore", folder)


@pytest.mark.parametrize("end", ["kill -KILL $$", "exit 1"], ids=["killed", "failed"])
def test_a_restore_whose_pg_restore_ends_badly_after_its_commit_replaced_the_spool(
    node: Node,
    cut: CommitCut,
    postgres_server: PostgresServer,
    postgres: PostgresSettings,
    tmp_path: Path,
    end: str,
) -> None:
    """pg_restore's transaction committed, then it was killed (or failed) before it
    exited: the spool is the dump's, and the restore is done.  A node cut off meanwhile
    stops when it is back: its claims and leases are of the spool that is gone."""
    node.take_in("<one@lab>", tmp_path)
    dump = dumped(postgres_server, postgres, tmp_path)
    node.take_in("<two@lab>", tmp_path)  # beyond the dump
    cut_off(cut, node)
    pg_restore = wrapped_pg_restore(postgres_server, tmp_path / "bin", end)
    wait_until(lambda: sessions(postgres_server, postgres, "lab-a") == 0, 30, "sessions ended")
    with pgspool.held(postgres) as conn:
        assert pgspool.nodes_connected(conn) == []
        pgspool.replace_spool(postgres, pg_restore, dump)
    cut.refuse = False
    wait_until(lambda: node.outcome() is SpoolReplacedError, 30, "the node told it was replaced")
    assert len(node.heard) == 1
    again = Node(postgres, cut, "lab-a")
    try:
        assert [r.message_id for r in again.spool.all_outbound()] == ["<one@lab>"]
    finally:
        again.spool.close()


def test_a_load_that_failed_in_its_transaction_puts_the_generation_back(
    node: Node,
    cut: CommitCut,
    postgres_server: PostgresServer,
    postgres: PostgresSettings,
    tmp_path: Path,
) -> None:
    """pg_restore started its transaction and failed in it (a table it must replace is
    held by another object of the database): nothing of it committed, and a node cut
    off meanwhile goes on with its spool."""
    node.take_in("<one@lab>", tmp_path)
    dump = dumped(postgres_server, postgres, tmp_path)
    node.take_in("<two@lab>", tmp_path)
    cut_off(cut, node)
    with postgres_server.admin(postgres.dbname) as admin:
        admin.execute("CREATE VIEW waiting AS SELECT message_id FROM outbound")
    pg_restore = wrapped_pg_restore(postgres_server, tmp_path / "bin", "exit 0")
    with (
        pytest.raises(pgspool.ToolError, match=r"DROP TABLE IF EXISTS public\.outbound"),
        pgspool.held(postgres),
    ):
        pgspool.replace_spool(postgres, pg_restore, dump)
    cut.refuse = False
    wait_until(lambda: node.outcome() is None, 30, "the node served again")
    node.take_in("<three@lab>", tmp_path)
    assert node.heard == []
    assert [r.message_id for r in node.spool.all_outbound()] == [
        "<one@lab>",
        "<two@lab>",
        "<three@lab>",
    ]


def test_a_pg_restore_killed_before_its_load_is_named_and_stops_no_node(
    node: Node, cut: CommitCut, postgres: PostgresSettings, tmp_path: Path
) -> None:
    """A pg_restore killed before it loaded anything (it says nothing): the error names
    how it ended, and a node cut off meanwhile goes on with its spool."""
    node.take_in("<one@lab>", tmp_path)
    cut_off(cut, node)
    folder = tmp_path / "bin"
    folder.mkdir()
    (folder / "pg_restore").write_text("#!/bin/sh\nkill -KILL $$\n")
    (folder / "pg_restore").chmod(0o755)
    broken = tmp_path / "unread.pgdump"
    broken.write_bytes(b"PGDMP")
    with (
        pytest.raises(pgspool.ToolError, match=r": ended by SIGKILL \(interrupted or killed\)"),
        pgspool.held(postgres),
    ):
        pgspool.replace_spool(postgres, pgspool.tool("pg_restore", folder), broken)
    cut.refuse = False
    wait_until(lambda: node.outcome() is None, 30, "the node served again")
    node.take_in("<two@lab>", tmp_path)
    assert node.heard == []


def test_a_spool_from_before_the_generation_gets_one_at_its_first_start(
    postgres_server: PostgresServer, postgres: PostgresSettings, cut: CommitCut, tmp_path: Path
) -> None:
    PostgresSpool(postgres, SystemClock()).close()
    with postgres_server.admin(postgres.dbname) as admin:  # as an earlier release left it
        admin.execute("DROP TABLE spool_generation")
        admin.execute("UPDATE spool_schema SET version = %s", (VERSION - 1,))
    first = Node(postgres, cut, "lab-a")
    try:
        with postgres_server.admin(postgres.dbname) as admin:
            rows = admin.execute("SELECT token FROM spool_generation").fetchall()
            version = admin.execute("SELECT version FROM spool_schema").fetchall()
        assert len(rows) == 1 and len(str(rows[0][0])) == 32
        assert version == [(VERSION,)]
        second = Node(postgres, cut, "lab-b")  # another node's start keeps it
        try:
            cut.drop()  # both reconnect, and find the spool they started on
            first.take_in("<one@lab>", tmp_path)
            second.take_in("<two@lab>", tmp_path)
            assert first.heard == [] and second.heard == []
        finally:
            second.spool.close()
        with postgres_server.admin(postgres.dbname) as admin:
            assert admin.execute("SELECT token FROM spool_generation").fetchall() == rows
    finally:
        first.spool.close()
