"""The spool's dump goes back into exactly the database ``[spool] dbname`` names: the
name is a name, never read by ``pg_restore`` as connection settings (which would put
the spool into another database, or connect elsewhere, than the one the nodes use)."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from gateway.backup import pgspool
from gateway.spool.postgres import PostgresSettings, PostgresSpool
from tests.clocks import TickingClock
from tests.helpers.postgres import USER, PostgresServer


def _tables(server: PostgresServer, dbname: str) -> set[str]:
    with server.admin(dbname) as admin:
        rows = admin.execute(
            "SELECT tablename FROM pg_tables WHERE schemaname = 'public'"
        ).fetchall()
    return {str(row[0]) for row in rows}


def test_a_dump_is_restored_into_the_database_named_even_if_the_name_reads_as_settings(
    postgres_server: PostgresServer, postgres: PostgresSettings, tmp_path: Path
) -> None:
    PostgresSpool(postgres, TickingClock()).close()  # a node's start: the spool's tables
    bin_dir = postgres_server.bin
    dump = tmp_path / "spool.pgdump"
    with pgspool.snapshot(postgres, pgspool.tool("pg_dump", bin_dir), dump):
        pass
    # A database whose name is also a connection setting naming another database.
    decoy = postgres_server.new_database()
    named = f"dbname={decoy.dbname}"
    with postgres_server.admin() as admin:
        admin.execute(f'CREATE DATABASE "{named}" OWNER "{USER}"')
    target = replace(decoy, dbname=named)

    pgspool.load(target, pgspool.tool("pg_restore", bin_dir), dump)

    assert "outbound" in _tables(postgres_server, named)
    assert _tables(postgres_server, decoy.dbname) == set()
    assert pgspool.rows_in(decoy) == []
