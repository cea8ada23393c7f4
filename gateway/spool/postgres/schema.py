"""The spool's tables in PostgreSQL: the SQLite schema's, in PostgreSQL's types.

One description of the tables (:mod:`gateway.spool.schema`) serves both
backends: the same statements, with 64-bit integers, double precision and
``bytea`` for SQLite's INTEGER, REAL and BLOB, and the columns added since
the first release added the same way.  Several nodes may start at once: the
creation or upgrade runs under a transaction-wide advisory lock, and the
version it leaves (``spool_schema``) lets an older gateway refuse a spool a
newer one has upgraded instead of writing rows it does not understand.
"""

from __future__ import annotations

import re

from gateway.errors import SpoolError
from gateway.spool.schema import ADDED_COLUMNS, ADDED_INDEXES, SCHEMA
from gateway.spool.sql import Connection

# The schema's version: it grows with every table, index or column added.
VERSION = len(re.findall(r"\bCREATE\b", SCHEMA)) + len(ADDED_COLUMNS) + len(ADDED_INDEXES)
# pg_advisory_xact_lock key of the schema upgrade ("medgw" in ASCII, as a number).
_LOCK = 0x6D65646777

_TYPES = {"INTEGER": "BIGINT", "REAL": "DOUBLE PRECISION", "BLOB": "BYTEA"}


def postgres_types(ddl: str) -> str:
    """SQLite column types of ``ddl`` as PostgreSQL's (the same range of values)."""
    return re.sub(r"\b(INTEGER|REAL|BLOB)\b", lambda m: _TYPES[m.group(1)], ddl)


def create_or_upgrade(db: Connection) -> None:
    """Create the tables (a new spool) or add what an older one lacks, in the caller's
    transaction."""
    db.execute("SELECT pg_advisory_xact_lock(?)", (_LOCK,))
    db.execute("CREATE TABLE IF NOT EXISTS spool_schema (version BIGINT NOT NULL)")
    rows = db.execute("SELECT version FROM spool_schema", ()).fetchall()
    found = int(rows[0]["version"]) if rows else 0
    if found > VERSION:
        raise SpoolError(
            f"the spool database has schema version {found}, newer than this medgw knows "
            f"({VERSION}): a newer medgw has upgraded it",
            fix="run the same medgw version on every node that shares this spool database",
        )
    if found == VERSION:
        # Nothing to do: no DDL, whose table locks would conflict (even deadlock) with
        # the transactions of nodes already running.
        return
    for statement in postgres_types(SCHEMA).split(";"):
        if statement.strip():
            db.execute(statement, ())
    for table, column, kind in ADDED_COLUMNS:
        db.execute(f"ALTER TABLE {table} ADD COLUMN IF NOT EXISTS {column} {postgres_types(kind)}")
    for statement in ADDED_INDEXES:
        db.execute(statement, ())
    db.execute("DELETE FROM spool_schema", ())
    db.execute("INSERT INTO spool_schema (version) VALUES (?)", (VERSION,))
