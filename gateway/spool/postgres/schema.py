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

from gateway import __version__
from gateway.errors import SpoolError
from gateway.spool.schema import (
    ADDED_COLUMNS,
    ADDED_INDEXES,
    BINARY_COLUMNS,
    DISPLACES,
    DISPLACING_COLUMNS,
    OWING_TABLES,
    SCHEMA,
    keep_displaced,
)
from gateway.spool.sql import Connection

# Steps of PostgreSQL's tables alone, after the shared schema's (see create_or_upgrade):
# 1. the times stored as text (columns named ``*_at``) compared in the "C" collation;
# 2. the triggers that keep a record a change displaces (gateway.spool.schema.DISPLACES);
# 3. the spool's generation, which a restore replaces (gateway.spool.postgres.generation):
#    a node of an earlier release, which does not check it, refuses the upgraded spool.
POSTGRES_STEPS = 3
# The schema's version: it grows with every table, index or column added, and step.
VERSION = (
    len(re.findall(r"\bCREATE\b", SCHEMA))
    + len(ADDED_COLUMNS)
    + len(ADDED_INDEXES)
    + POSTGRES_STEPS
)
# pg_advisory_xact_lock key of the schema upgrade ("medgw" in ASCII, as a number): every
# node's start takes it, and a restore holds it so that no node starts meanwhile.
SCHEMA_LOCK = 0x6D65646777
# The table of the spool's generation: not one of the spool's tables (no backup holds it).
GENERATION_TABLE = "CREATE TABLE IF NOT EXISTS spool_generation (token TEXT NOT NULL)"

_TYPES = {"INTEGER": "BIGINT", "REAL": "DOUBLE PRECISION", "BLOB": "BYTEA"}
# The function the triggers of displaced records run: the row before the change as JSON
# (its binary columns left out), whatever columns the table has.  Not part of a table:
# a restore of the tables (their triggers with them) creates it first.
_BINARY = ", ".join(f"'{column}'" for column in sorted(BINARY_COLUMNS))
KEEP_DISPLACED = (
    "CREATE OR REPLACE FUNCTION keep_displaced_owed() RETURNS trigger LANGUAGE plpgsql AS $$"
    f" BEGIN {keep_displaced('TG_TABLE_NAME', f'CAST(to_jsonb(OLD) - ARRAY[{_BINARY}] AS TEXT)')};"
    " RETURN NULL; END $$"
)


# Times are stored as ISO 8601 text (gateway.spool.sql: SqlStore._now), compared and
# ordered as text: in the "C" collation that is the order of time, whatever the
# database's default (an ICU or a language's collation puts "12:00:00.000001+00:00"
# before "12:00:00+00:00", and may ignore punctuation).
_TIME_TEXT = re.compile(r"\b(\w+_at)(\s+)TEXT\b")
_TIME_COLUMNS_NOT_C = (
    "SELECT table_name, column_name FROM information_schema.columns"
    " WHERE table_schema = current_schema() AND data_type = 'text'"
    " AND right(column_name, 3) = '_at' AND collation_name IS DISTINCT FROM 'C'"
)


def postgres_types(ddl: str) -> str:
    """SQLite column types of ``ddl`` as PostgreSQL's (the same range of values), times
    kept as text in the "C" collation."""
    ddl = _TIME_TEXT.sub(lambda m: f'{m.group(1)}{m.group(2)}TEXT COLLATE "C"', ddl)
    return re.sub(r"\b(INTEGER|REAL|BLOB)\b", lambda m: _TYPES[m.group(1)], ddl)


def upgraded_by(node: str) -> str:
    """What the spool records of the medgw that last created or upgraded its tables (the
    comment of the table ``spool_schema``): its release and the node it ran as."""
    return f"medgw {__version__} on node {node}"


def create_or_upgrade(db: Connection, node: str) -> None:
    """Create the tables (a new spool) or add what an older one lacks, in the caller's
    transaction; ``node``: the name of the node doing it (recorded, for the message of
    an older node that refuses the spool then)."""
    db.execute("SELECT pg_advisory_xact_lock(?)", (SCHEMA_LOCK,))
    db.execute("CREATE TABLE IF NOT EXISTS spool_schema (version BIGINT NOT NULL)")
    rows = db.execute("SELECT version FROM spool_schema", ()).fetchall()
    found = int(rows[0]["version"]) if rows else 0
    if found > VERSION:
        rows = db.execute(
            "SELECT obj_description(CAST('spool_schema' AS regclass), 'pg_class') AS who", ()
        ).fetchall()
        who = rows[0]["who"] if rows and rows[0]["who"] else "a newer medgw"
        raise SpoolError(
            f"the spool database has schema version {found}, newer than this medgw knows "
            f"({VERSION}; medgw {__version__} on node {node}): {who} has upgraded it",
            fix=f"upgrade medgw on node {node} to the release the other nodes run: run the "
            "same medgw version on every node that shares this spool database",
        )
    if found == VERSION:
        # Nothing to do: no DDL, whose table locks would conflict (even deadlock) with
        # the transactions of nodes already running.
        return
    for statement in postgres_types(SCHEMA).split(";"):
        if statement.strip():
            db.execute(statement, ())
    for table, column, kind in ADDED_COLUMNS:
        db.execute(
            f"ALTER TABLE {table} ADD COLUMN IF NOT EXISTS {postgres_types(f'{column} {kind}')}"
        )
    for statement in ADDED_INDEXES:
        db.execute(statement, ())
    # The statistics of the indexes on expressions (the file names of the start's sweeps)
    # are gathered only by an ANALYZE: until autovacuum's next one, the planner would
    # guess, and read the whole table for a batch of names.
    db.execute("ANALYZE outbound", ())
    # Times in a database created before they were collated (their indexes rebuilt).
    for row in db.execute(_TIME_COLUMNS_NOT_C, ()).fetchall():
        table, column = row["table_name"], row["column_name"]
        db.execute(f'ALTER TABLE {table} ALTER COLUMN {column} TYPE TEXT COLLATE "C"')
    db.execute(KEEP_DISPLACED, ())
    for table in OWING_TABLES:
        db.execute(f"DROP TRIGGER IF EXISTS {table}_displaced_owed ON {table}", ())
        db.execute(
            f"CREATE TRIGGER {table}_displaced_owed AFTER UPDATE OF {DISPLACING_COLUMNS}"
            f" ON {table}"
            f" FOR EACH ROW WHEN ({DISPLACES}) EXECUTE FUNCTION keep_displaced_owed()",
            (),
        )
    db.execute(GENERATION_TABLE, ())  # its token: gateway.spool.postgres.generation
    db.execute("DELETE FROM spool_schema", ())
    db.execute("INSERT INTO spool_schema (version) VALUES (?)", (VERSION,))
    # COMMENT takes no parameters: a literal, its quotes doubled.
    said = upgraded_by(node).replace("'", "''")
    db.execute(f"COMMENT ON TABLE spool_schema IS '{said}'", ())
