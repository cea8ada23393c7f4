"""A spool whose disk fills up, on either backend.

SQLite: the spool's database on a small file system of its own (a tmpfs, as root),
filled to the last byte: the real library meets the real full disk.  PostgreSQL: the
session's server's disk cannot be filled for one test, so the server raises its own
disk-full error (SQLSTATE 53100, with its own text) from a trigger on a spool table:
the real server's error through the spool's real connection.
"""

from __future__ import annotations

import contextlib
import sqlite3
from collections.abc import Iterator
from pathlib import Path
from typing import Protocol

import psycopg
import pytest
from psycopg.conninfo import make_conninfo

from gateway.clock import Clock
from gateway.spool import Spool, SqliteSpool
from gateway.spool.postgres import PostgresSettings, PostgresSpool
from tests.helpers.storage import fill_file_system, small_file_system

BACKENDS = ["sqlite", "postgresql"]
# What PostgreSQL says when a table's file cannot grow.
DISK_FULL = 'could not extend file "base/16384/16402": No space left on device'


class SpoolDisk(Protocol):
    where: str  # the spool, as its errors name it

    def open(self, clock: Clock) -> Spool: ...

    def fill(self) -> None:
        """No more room for the spool's writes (on PostgreSQL: those of ``inbound``)."""

    def free(self) -> None:
        """Room again."""


class SqliteDisk:
    def __init__(self, folder: Path) -> None:
        self.path = folder / "spool.sqlite3"
        self.where = str(self.path)
        self._filler: Path | None = None

    def open(self, clock: Clock) -> Spool:
        return SqliteSpool(self.path, clock)

    def fill(self) -> None:
        self._filler = fill_file_system(self.path.parent)

    def free(self) -> None:
        assert self._filler is not None
        self._filler.unlink()


class PostgresDisk:
    def __init__(self, settings: PostgresSettings) -> None:
        self._settings = settings
        self.where = settings.where

    def open(self, clock: Clock) -> Spool:
        return PostgresSpool(self._settings, clock)

    def fill(self) -> None:
        raise_on_inbound(self._settings, "disk_full", DISK_FULL)

    def free(self) -> None:
        run_sql(self._settings, "DROP TRIGGER server_error ON inbound")


def run_sql(settings: PostgresSettings, sql: str) -> None:
    """``sql`` run on the spool's database as the gateway's role, outside medgw."""
    conninfo = make_conninfo("", **settings.connect_args(application="medgw tests"))
    with psycopg.connect(conninfo, autocommit=True) as db:
        db.execute(sql)


def raise_on_inbound(settings: PostgresSettings, condition: str, message: str) -> None:
    """From now on the server fails each write of ``inbound`` with its error
    ``condition`` (a PL/pgSQL condition name) saying ``message``."""
    run_sql(
        settings,
        "CREATE OR REPLACE FUNCTION server_error() RETURNS trigger LANGUAGE plpgsql AS $$"
        f" BEGIN RAISE EXCEPTION USING ERRCODE = '{condition}', MESSAGE = '{message}',"
        " DETAIL = 'Failing row contains ' || NEW.message_id; END $$",
    )
    run_sql(
        settings,
        "CREATE TRIGGER server_error BEFORE INSERT OR UPDATE ON inbound"
        " FOR EACH ROW EXECUTE FUNCTION server_error()",
    )


@contextlib.contextmanager
def spool_disk(request: pytest.FixtureRequest, root: Path) -> Iterator[SpoolDisk]:
    """For a fixture with ``params=BACKENDS``: a spool of that backend whose disk the test
    fills (SQLite: on a small file system in ``root``; PostgreSQL: in a database of its
    own on the session's server)."""
    if request.param == "sqlite":
        with small_file_system(root / "spool-disk", "2m") as folder:
            yield SqliteDisk(folder)
        return
    yield PostgresDisk(request.getfixturevalue("postgres"))


def damage(path: Path, table: str) -> None:
    """Overwrite the root pages of ``table`` and of its indexes in the SQLite file at
    ``path`` (closed, its log emptied into it), as a failing disk or a stray write does."""
    db = sqlite3.connect(path)
    try:
        size = db.execute("PRAGMA page_size").fetchone()[0]
        roots = [
            root
            for (root,) in db.execute(
                "SELECT rootpage FROM sqlite_master WHERE tbl_name=? AND rootpage>0", (table,)
            )
        ]
    finally:
        db.close()
    assert roots, table
    with path.open("r+b") as handle:
        for root in roots:
            handle.seek((root - 1) * size)
            handle.write(b"\xa5" * size)
