"""A spool in PostgreSQL in a bundle, with PostgreSQL's own tools.

``pg_dump`` writes the spool's tables (those of :mod:`gateway.spool.schema` and
``spool_schema``, nothing else of the database) in its custom format: compressed,
restored by ``pg_restore`` into a database owned by another role (``--no-owner``,
``--no-privileges``), and readable by ``pg_restore`` without a server, which is how a
restore checks every file name in it before it writes anything (:func:`read_into`
turns its data into an SQLite copy, which the SQLite spool's checks read).

The dump is one snapshot: this module's transaction exports it
(``pg_export_snapshot``) and ``pg_dump --snapshot`` takes it, and the file names the
bundle must hold are read in that same transaction.  The connection settings reach the
tools through libpq's environment (``PGHOST``, ``PGPASSWORD`` read from
``password_file``...): never on a command line, where every user of the host can read
them.
"""

from __future__ import annotations

import base64
import contextlib
import os
import re
import secrets
import shutil
import signal
import sqlite3
import subprocess
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import psycopg
from psycopg.conninfo import make_conninfo
from psycopg.rows import dict_row

from gateway.errors import MedgwError
from gateway.spool.postgres import PostgresSettings, generation
from gateway.spool.postgres.database import (
    COMMAND_SESSION,
    NODE_SESSION,
    InTransaction,
    server_error,
)
from gateway.spool.postgres.schema import KEEP_DISPLACED, SCHEMA_LOCK
from gateway.spool.schema import SCHEMA

# The spool's tables, and the one that records its schema's version: what a dump holds.
TABLES = (*re.findall(r"CREATE TABLE IF NOT EXISTS (\w+)", SCHEMA), "spool_schema")
# libpq's environment variable of each connection parameter the tools need.  Not the
# spool's statement timeouts (``options``): a dump of a large spool runs longer.
_ENVIRONMENT = {
    "host": "PGHOST",
    "port": "PGPORT",
    "dbname": "PGDATABASE",
    "user": "PGUSER",
    "password": "PGPASSWORD",
    "sslmode": "PGSSLMODE",
    "sslrootcert": "PGSSLROOTCERT",
    "sslcert": "PGSSLCERT",
    "sslkey": "PGSSLKEY",
    "ssl_min_protocol_version": "PGSSLMINPROTOCOLVERSION",
    "connect_timeout": "PGCONNECT_TIMEOUT",
    "application_name": "PGAPPNAME",
}
_COPY = re.compile(r'^COPY (?:"?\w+"?\.)?"?(\w+)"? \(([^)]*)\) FROM stdin;$')
_ESCAPE = re.compile(r"\\(?:([0-7]{1,3})|x([0-9a-fA-F]{1,2})|(.))")
_ESCAPED = {"b": "\b", "f": "\f", "n": "\n", "r": "\r", "t": "\t", "v": "\v"}
_BATCH = 1000  # rows inserted at a time
APPLICATION = "medgw backup"  # the application_name of this module's sessions and tools
# The other sessions of the database that are a node's (gateway.spool.postgres.database
# names them; "medgw" alone: a node of an earlier release).  application_name is shown
# to every role, whoever the session's is.
_NODE_SESSIONS = (
    "SELECT application_name AS name, host(client_addr) AS addr, count(*) AS n"
    " FROM pg_stat_activity WHERE datname = current_database() AND pid <> pg_backend_pid()"
    " AND (application_name = 'medgw' OR starts_with(application_name, %s)"
    " OR starts_with(application_name, %s))"
    " GROUP BY application_name, client_addr ORDER BY application_name, host(client_addr)"
)


class ToolError(MedgwError):
    """``pg_dump`` or ``pg_restore`` is missing, or failed; the caller says in which step."""


def tool(name: str, bin_dir: Path | None) -> str:
    """The path of PostgreSQL's program ``name``: in ``bin_dir`` (``[backup] pg_bin_dir``),
    else on PATH."""
    found = shutil.which(name, path=str(bin_dir) if bin_dir is not None else None)
    if found is not None:
        return found
    where = f"{bin_dir} ([backup] pg_bin_dir)" if bin_dir is not None else "PATH"
    raise ToolError(
        f"{name}, PostgreSQL's tool for the spool database's copy in a bundle, is not in {where}",
        fix="install Debian's package postgresql-client (apt-get install postgresql-client), "
        "of the server's major version or newer, or set [backup] pg_bin_dir to the folder "
        "that holds it (e.g. /usr/lib/postgresql/16/bin)",
    )


def environment(settings: PostgresSettings) -> dict[str, str]:
    """This process's environment with libpq's of ``settings`` (and no other ``PG*``)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
    for key, value in settings.connect_args(APPLICATION).items():
        if key in _ENVIRONMENT:
            env[_ENVIRONMENT[key]] = str(value)
    return env


def _run(argv: list[str], settings: PostgresSettings, what: str, name: str | None = None) -> None:
    """Run a PostgreSQL tool; ``name``: its sessions' ``application_name``."""
    env = environment(settings)
    if name is not None:
        env["PGAPPNAME"] = name
    try:
        done = subprocess.run(argv, env=env, capture_output=True, text=True, check=False)
    except OSError as exc:
        raise ToolError(
            f"cannot run {argv[0]}: {exc.strerror or exc}",
            fix="check that the medgw user may run it (see [backup] pg_bin_dir)",
        ) from exc
    if done.returncode != 0:
        said = [line for line in done.stderr.splitlines() if line.strip()]
        raise ToolError(
            f"{Path(argv[0]).name} could not {what} ({settings.where}): "
            f"{said[-1] if said else _ended(done.returncode)}",
            fix="check that the database answers and the spool's role may read and "
            "create its tables ([spool] settings), and that the tool's major version is "
            "the server's or newer",
        )


def _ended(returncode: int) -> str:
    """How a tool that said nothing ended: its exit status, or the signal that ended it."""
    if returncode >= 0:
        return f"exit status {returncode}"
    try:
        name = signal.Signals(-returncode).name
    except ValueError:
        name = f"signal {-returncode}"
    return f"ended by {name} (interrupted or killed)"


def connect(settings: PostgresSettings) -> psycopg.Connection[dict[str, Any]]:
    return psycopg.connect(**settings.connect_args(APPLICATION), row_factory=dict_row)  # type: ignore[arg-type]


@contextlib.contextmanager
def held(settings: PostgresSettings) -> Iterator[psycopg.Connection[dict[str, Any]]]:
    """A session holding the lock every node's start takes (the schema's creation or
    upgrade): no node gets past its start while it is held.  Outside any transaction,
    so that the spool's idle limit does not end it while a restore runs."""
    conn = psycopg.connect(
        **settings.connect_args(APPLICATION),  # type: ignore[arg-type]
        autocommit=True,
        row_factory=dict_row,
    )
    try:
        conn.execute("SELECT pg_advisory_lock(%s)", (SCHEMA_LOCK,))
        yield conn
    finally:
        conn.close()  # the session's lock goes with it


def nodes_connected(conn: psycopg.Connection[dict[str, Any]]) -> list[str]:
    """The nodes, and the commands (``medgw queue ...`` with the daemon stopped), with a
    session on ``conn``'s database, other than ``conn``, each as its sessions name it
    ("medgw node gw-b (3 sessions from 10.0.0.7)", "medgw command gw-a (1 session ...)")."""
    found = []
    for row in conn.execute(_NODE_SESSIONS, (NODE_SESSION, COMMAND_SESSION)).fetchall():
        sessions = f"{row['n']} session" + ("s" if row["n"] != 1 else "")
        where = f" from {row['addr']}" if row["addr"] else " over the server's local socket"
        name = row["name"] if row["name"] != "medgw" else "medgw (a node of an earlier release)"
        found.append(f"{name} ({sessions}{where})")
    return found


@contextlib.contextmanager
def snapshot(
    settings: PostgresSettings, pg_dump: str, dst: Path
) -> Iterator[psycopg.Connection[dict[str, Any]]]:
    """Dump the spool's tables to ``dst``; yields a connection whose transaction sees
    exactly what the dump holds (the same snapshot), to read the file names it names."""
    conn = connect(settings)
    try:
        conn.isolation_level = psycopg.IsolationLevel.REPEATABLE_READ
        conn.read_only = True
        exported = conn.execute("SELECT pg_export_snapshot() AS id").fetchone()
        assert exported is not None
        # pg_dump runs while this transaction waits: the spool's idle limit would end it.
        conn.execute("SET LOCAL idle_in_transaction_session_timeout = 0")
        tables = [f"--table={name}" for name in TABLES]
        argv = [pg_dump, "--format=custom", "--no-owner", "--no-privileges"]
        _run([*argv, f"--snapshot={exported['id']}", *tables, f"--file={dst}"], settings, "dump")
        yield conn
    finally:
        with contextlib.suppress(psycopg.Error):
            conn.rollback()
        conn.close()


def live_row(
    settings: PostgresSettings, table: str, key: Mapping[str, str]
) -> dict[str, Any] | None:
    """The row of ``table`` with primary key ``key`` as it is now (None: gone)."""
    [row] = live_rows(settings, [(table, key)])
    return row


def live_rows(
    settings: PostgresSettings, wanted: Sequence[tuple[str, Mapping[str, str]]]
) -> list[dict[str, Any] | None]:
    """The rows (table, primary key) of ``wanted`` as they are now, all as of one moment
    (one repeatable-read transaction); None: gone."""
    found = []
    with connect(settings) as conn:
        conn.isolation_level = psycopg.IsolationLevel.REPEATABLE_READ
        with conn.transaction():
            for table, key in wanted:
                where = " AND ".join(f"{column} = %s" for column in key)
                found.append(
                    conn.execute(
                        f"SELECT * FROM {table} WHERE {where}",  # noqa: S608 (our names)
                        tuple(key.values()),
                    ).fetchone()
                )
    return found


def to_json(row: Mapping[str, Any] | None) -> dict[str, Any] | None:
    """A row as JSON (bytes as ``{"base64": ...}``)."""
    if row is None:
        return None
    return {
        k: {"base64": base64.b64encode(bytes(v)).decode()}
        if isinstance(v, bytes | memoryview)
        else v
        for k, v in row.items()
    }


def from_json(row: Mapping[str, Any]) -> dict[str, Any]:
    return {k: base64.b64decode(v["base64"]) if isinstance(v, dict) else v for k, v in row.items()}


def _field(text: str) -> str | None:
    if text == "\\N":
        return None

    def one(match: re.Match[str]) -> str:
        if match.group(1):
            return chr(int(match.group(1), 8))
        if match.group(2):
            return chr(int(match.group(2), 16))
        return _ESCAPED.get(match.group(3), match.group(3))

    return _ESCAPE.sub(one, text)


def read_into(pg_restore: str, dump: Path, db: sqlite3.Connection) -> None:
    """Put the rows of ``dump`` (pg_dump's custom format, read by ``pg_restore`` without a
    server) into the spool tables of the SQLite database ``db``; a table it has no
    place for is skipped.  Raises :class:`ToolError` if ``pg_restore`` cannot read it,
    ``sqlite3.Error`` or ValueError for data that is not a spool's."""
    tables = {r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type='table'")}
    argv = [pg_restore, "--data-only", "--file=-", str(dump)]
    env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
    with subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env) as process:
        assert process.stdout is not None and process.stderr is not None
        try:
            _copy_rows(process.stdout, db, tables)
        except BaseException:
            process.kill()
            raise
        error = process.stderr.read().decode("utf-8", "replace")
    db.commit()
    if process.returncode != 0:
        said = [line for line in error.splitlines() if line.strip()]
        raise ToolError(
            f"pg_restore cannot read the spool's dump: {said[-1] if said else process.returncode}",
            fix="the bundle was damaged, or written by a newer PostgreSQL: use a pg_restore "
            "of its major version or newer ([backup] pg_bin_dir)",
        )


def _copy_rows(lines: Iterable[bytes], db: sqlite3.Connection, tables: set[str]) -> None:
    """The COPY blocks of pg_restore's script ``lines`` into ``db``'s ``tables``."""
    insert: str | None = None
    blobs: list[bool] = []
    batch: list[list[object]] = []
    for raw in lines:
        line = raw.decode("utf-8").rstrip("\n")
        if insert is None:
            found = _COPY.match(line)
            if found and found.group(1) in tables:
                table = found.group(1)
                columns = [c.strip().strip('"') for c in found.group(2).split(",")]
                kinds = {r[1]: r[2] for r in db.execute(f"PRAGMA table_info({table})")}
                if any(c not in kinds for c in columns):
                    raise ValueError(f"the dump's {table} has columns no spool has")
                blobs = [kinds[c] == "BLOB" for c in columns]
                marks = ", ".join("?" * len(columns))
                insert = f"INSERT INTO {table} ({', '.join(columns)}) VALUES ({marks})"  # noqa: S608
            continue
        if line == "\\.":
            db.executemany(insert, batch)
            insert, batch = None, []
            continue
        values: list[object] = [_field(f) for f in line.split("\t")]
        for i, blob in enumerate(blobs):
            value = values[i]
            if blob and isinstance(value, str):
                values[i] = bytes.fromhex(value.removeprefix("\\x"))
        batch.append(values)
        if len(batch) >= _BATCH:
            db.executemany(insert, batch)
            batch = []


def rows_in(settings: PostgresSettings) -> list[str]:
    """The spool's tables of the database that hold rows ("outbound (12 rows)")."""
    found = []
    with connect(settings) as conn:
        for table in TABLES:
            if table == "spool_schema":  # a node's start writes it: not a history
                continue
            there = conn.execute("SELECT to_regclass(%s) AS t", (table,)).fetchone()
            if there is None or there["t"] is None:
                continue
            count = conn.execute(f"SELECT count(*) AS n FROM {table}").fetchone()  # noqa: S608
            if count is not None and count["n"]:
                found.append(f"{table} ({count['n']} rows)")
    return found


def load(settings: PostgresSettings, pg_restore: str, dump: Path, name: str | None = None) -> None:
    """Restore ``dump`` into the database of ``settings``, in one transaction, replacing
    the spool's tables there (a node's start may have created them empty).  ``name``:
    the ``application_name`` of its session, to find it on the server."""
    argv = [pg_restore, "--no-owner", "--no-privileges", "--single-transaction"]
    # pg_restore reads a --dbname with "=" in it as connection settings: a connection
    # string naming only the database keeps the name a name (the other settings: libpq's
    # environment, as the spool's own connections have them).
    where = make_conninfo(dbname=settings.dbname)
    argv += ["--exit-on-error", "--clean", "--if-exists", f"--dbname={where}"]
    with connect(settings) as conn:
        conn.execute(KEEP_DISPLACED)  # the function the dumped tables' triggers run
    _run([*argv, str(dump)], settings, "restore the spool", name)


def replace_spool(settings: PostgresSettings, pg_restore: str, dump: Path) -> str | None:
    """While :func:`held`: give the spool a new generation (gateway.spool.postgres.
    generation), so that a node that ran before, unreachable meanwhile, stops once it
    reaches the database again instead of carrying on with what it held of the old
    spool; then :func:`load` the dump.

    Whether the dump was loaded is read from the database, not from how ``pg_restore``
    ended: killed (or failing) after its transaction committed, it leaves the spool
    replaced, and that is a restore done.  A load that committed nothing (one
    transaction) puts the generation back, and those nodes go on with the spool they
    had; if it cannot be told which (the database does not answer), the new generation
    stays and they stop: the safe side.

    Returns None when ``pg_restore`` ended well, else how the load ended after its commit
    (failing, killed, or this process interrupted by Ctrl-C while it ran, which reaches
    both): the spool is replaced all the same, and the restore must finish (move the file
    names), not stop half done.  Raises what ended the load if it did not commit."""
    name = f"medgw-restore-{secrets.token_hex(8)}"  # the load's session, by its name
    with connect(settings) as conn, conn.transaction():
        db = InTransaction(conn)
        before = generation.read(db)
        tables = _relations(conn)
        generation.renew(db)
    try:
        load(settings, pg_restore, dump, name)
    except (Exception, KeyboardInterrupt) as exc:
        loaded = _loaded(settings, tables, name)
        if loaded is False and before is not None:
            with (
                contextlib.suppress(psycopg.Error),
                connect(settings) as conn,
                conn.transaction(),
            ):
                generation.put(InTransaction(conn), before)
        if not loaded:
            raise
        # What happened after the commit changes nothing of the spool: it is the dump's.
        if isinstance(exc, KeyboardInterrupt):
            return "interrupted (Ctrl-C) after the spool was loaded"
        return exc.message if isinstance(exc, ToolError) else f"{type(exc).__name__}: {exc}"
    return None


def _relations(conn: psycopg.Connection[dict[str, Any]]) -> dict[str, int]:
    """The spool's tables there now, and the identifier (oid) of each."""
    found = {}
    for table in TABLES:
        row = conn.execute("SELECT to_regclass(%s)::oid AS oid", (table,)).fetchone()
        if row is not None and row["oid"] is not None:
            found[table] = int(row["oid"])
    return found


def _loaded(settings: PostgresSettings, before: Mapping[str, int], name: str) -> bool | None:
    """Whether the transaction of a ``pg_restore`` that did not end well committed: it
    drops the spool's tables and creates them again (``--clean``), so a table that is
    not the one of ``before`` (its tables before the load) is the dump's.  None: it
    cannot be told (the database does not answer, or a session of another still works
    in it after a while).

    The tables are locked first: a ``pg_restore`` killed while its COMMIT was on the way
    leaves a server process that may still be committing, and it holds them until it
    is done, either way.  With no table before (a database no node has run on), there
    is nothing to lock: any table there once the load's session (``name``) is gone is
    the dump's."""
    if not before:
        return _created(settings, name)
    try:
        with connect(settings) as conn, conn.transaction():
            names = ", ".join(before)
            conn.execute(f"LOCK TABLE {names} IN ACCESS SHARE MODE")
            return _relations(conn) != before
    except psycopg.Error:
        return None


SESSIONS_GONE_SECONDS = 30.0  # how long a load's server process may take to end


def _created(settings: PostgresSettings, name: str) -> bool | None:
    """Whether a load into a database that had no spool table committed (see _loaded):
    once the load's session (``application_name`` ``name``) has left the server, which
    it does only once its transaction is committed or rolled back (a killed
    ``pg_restore``'s server process may still be reading its COMMIT), whether the
    spool's tables are there.  None: that session is still there after a while, or
    the database does not answer."""
    deadline = time.monotonic() + SESSIONS_GONE_SECONDS
    try:
        with connect(settings) as conn:
            while True:
                row = conn.execute(
                    "SELECT count(*) AS left_over FROM pg_stat_activity"
                    " WHERE application_name = %s",
                    (name,),
                ).fetchone()
                if row is None or not row["left_over"]:
                    return bool(_relations(conn))
                if time.monotonic() > deadline:
                    return None
                time.sleep(0.1)
    except psycopg.Error:
        return None


def drop(settings: PostgresSettings) -> None:
    """Remove the spool's tables again (a restore onto an empty database that failed)."""
    with connect(settings) as conn:
        for table in TABLES:
            conn.execute(f"DROP TABLE IF EXISTS {table}")


def database_error(settings: PostgresSettings, exc: psycopg.Error) -> str:
    return f"the spool {settings.where} cannot be reached or read: {server_error(exc)}"


# The primary key of each table whose rows name files.
KEYS = {
    "outbound": ("message_id",),
    # A refreshed outbound row's data keys come with it (see bundle.row_keys).
    "data_keys": ("item",),
    "inbound": ("peer", "message_id"),
    "handover": ("peer", "message_id"),
}


def _columns(conn: psycopg.Connection[dict[str, Any]], table: str) -> set[str]:
    """The columns ``table`` has in the spool's schema (none if it has no such table)."""
    return {
        r["column_name"]
        for r in conn.execute(
            "SELECT column_name FROM information_schema.columns"
            " WHERE table_schema = current_schema() AND table_name = %s",
            (table,),
        ).fetchall()
    }


def rewrite(
    settings: PostgresSettings,
    refreshed: list[dict[str, Any]],
    columns: Mapping[str, tuple[str, ...]],
    moved: Callable[[str | None], str | None],
) -> None:
    """In one transaction: put the rows a backup took again from the live spool
    (``refreshed``: table, key, row or None) in place of the dump's, then move every
    file name of ``columns`` (per table) with ``moved``."""
    with connect(settings) as conn, conn.transaction():
        for item in refreshed:
            table, key, row = item["table"], item["key"], item["row"]
            known = _columns(conn, table)
            names = [*key, *(row or {})]
            if table not in KEYS or set(key) != set(KEYS[table]) or not set(names) <= known:
                raise ValueError(f"a refreshed row of {table!r} that is not the spool's")
            where = " AND ".join(f"{c} = %s" for c in key)
            conn.execute(f"DELETE FROM {table} WHERE {where}", tuple(key.values()))  # noqa: S608
            if row is not None:
                values = from_json(row)
                marks = ", ".join(["%s"] * len(values))
                conn.execute(
                    f"INSERT INTO {table} ({', '.join(values)}) VALUES ({marks})",  # noqa: S608
                    tuple(values.values()),
                )
        for table, paths in columns.items():
            key = KEYS[table]
            present = _columns(conn, table)
            wanted = [c for c in paths if c in present]
            rows = conn.execute(
                f"SELECT {', '.join((*key, *wanted))} FROM {table}"  # noqa: S608
            ).fetchall()
            sets = ", ".join(f"{c} = %s" for c in wanted)
            where = " AND ".join(f"{c} = %s" for c in key)
            changed = []
            for row in rows:
                old = [row[c] for c in wanted]
                new = [moved(v) for v in old]
                if new != old:
                    changed.append((*new, *(row[c] for c in key)))
            if changed:
                with conn.cursor() as cursor:
                    cursor.executemany(
                        f"UPDATE {table} SET {sets} WHERE {where}",  # noqa: S608
                        changed,
                    )
