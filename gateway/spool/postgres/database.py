"""Connections to the PostgreSQL spool: a few, reused; every change one transaction.

Each transaction runs on a connection of its own (READ COMMITTED, as every
statement of the spool's parts names the state it moves a row from: a row
another node moved meanwhile is left alone).  A transaction the server ended
for a deadlock or a serialization failure is run again: it changed nothing.

A connection lost during a COMMIT leaves its outcome unknown: the server may
have recorded the change before the connection went.  Each transaction
learns its transaction id with its BEGIN; after such a loss, that id's
status (``txid_status``) is asked on a new connection, for up to
``connect_timeout`` seconds (the old session ended first if it still runs):
committed, the call returns as if nothing happened; not, it fails as any call
that did not get through.  Only when the database cannot be asked in that time
does the call fail with :class:`~gateway.errors.SpoolOutcomeUnknownError`, and
the caller keeps what either outcome needs (see gateway.inbound.exactly_once).

When the database cannot be reached (the server stopped, the network down),
every call fails at once with a :class:`~gateway.errors.SpoolError` that says
so, and the connection is tried again after a back-off that doubles up to
:data:`MAX_BACKOFF` seconds: the callers answer as they do when a SQLite spool
cannot be written (a peer gets a retryable answer, a document stays in the
outbox), and nothing is committed half.  ``on_change`` hears when the database
becomes unreachable (with the cause) and when it answers again (None).  The back-off
spares the server the calls of a node's many loops; :meth:`PostgresDatabase.reach`
tries one connection regardless (the daemon's watch, every second while it is down:
gateway.daemon.spoolwatch), so that a node finds the database back at once.

A node reads the spool's generation at start, and every connection it opens later
is checked against it before it is used (gateway.spool.postgres.generation): a
spool restored while the node ran (unreachable meanwhile, so that the restore did not
see it) makes that call, and every later one, fail with
:class:`~gateway.errors.SpoolReplacedError`, and ``on_replaced`` hears it, once.

Leases are judged by the database server's clock, the one clock all nodes share: a
node's clock set ahead would otherwise find the live claims of the others run out
and take them over, and one set behind would hold its own past their end.  The
server's time is read at start and at each renewal of the leases (every third of a
lease) (:meth:`PostgresDatabase.clock_offset`); each lease written or judged is the
server's time at the last reading plus the time elapsed since on the node's boot clock
(:meth:`~gateway.clock.Clock.boottime`: monotonic, and going on while the host is
suspended), which no step of its wall clock (an operator, a time sync) moves.  A node
whose wall clock and boot clock disagree by more than :data:`PAUSE_SECONDS` on the time
elapsed since the last reading (its VM was paused or moved, which some hypervisors hide
from the boot clock too, or its wall clock was stepped) reads the server's time again
before it writes or judges a lease: else, just resumed, it would write leases already
run out and hold claims the other nodes have taken over.  The node's wall clock's
difference to the server's is kept only to be told (``on_clock``).
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import queue
import re
import threading
import time
from collections.abc import Callable, Iterable
from datetime import datetime
from typing import Literal, NoReturn, TypeVar

import psycopg
from psycopg.conninfo import make_conninfo
from psycopg.rows import DictRow, dict_row

from gateway.clock import Clock
from gateway.errors import (
    NodeNameTakenError,
    SpoolError,
    SpoolFullError,
    SpoolOutcomeUnknownError,
    SpoolReplacedError,
    SpoolUnreachableError,
)
from gateway.spool.postgres import generation
from gateway.spool.postgres.schema import create_or_upgrade
from gateway.spool.postgres.settings import PostgresSettings
from gateway.spool.records import Claimant
from gateway.spool.sql import Connection, Cursor, Params, Row, SqlStore

T = TypeVar("T")

FIRST_BACKOFF = 0.5
MAX_BACKOFF = 30.0
# The advisory lock of the data keys' wrapping (SqlStore.key_lock): "medgwkek" as a number.
KEY_LOCK = int.from_bytes(b"medgwkek", "big") - (1 << 63)
_RERUNS = 3  # a transaction ended by a deadlock or serialization failure is run again
OUTCOME_POLL = 0.2  # seconds between tries to learn a lost COMMIT's outcome
# The start of a node's sessions' application_name (``pg_stat_activity``); the node's name
# follows.  "medgw" alone: a node of a release before they were named.
NODE_SESSION = "medgw node "
# The start of the application_name of a command's sessions (``medgw queue ...`` with the
# daemon stopped, ``medgw diagnose``), which open the spool as a node without running as
# it; the node's name follows.
COMMAND_SESSION = "medgw command "
# The session that holds a node's name (see PostgresDatabase.hold_name) and the one that
# holds it now, found by the lock's key (pg_locks shows a bigint key as two halves).
_NAME_HOLDER = (
    "SELECT a.pid, a.application_name AS name, host(a.client_addr) AS addr,"
    " a.client_hostname AS hostname, a.backend_start AS since"
    " FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid"
    " WHERE l.locktype = 'advisory' AND l.granted AND l.objsubid = 1"
    " AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database())"
    " AND CAST(l.classid AS BIGINT) = %s AND CAST(l.objid AS BIGINT) = %s"
)
# The database server's time (epoch seconds) as the leases take it.
_SERVER_TIME = "SELECT CAST(extract(epoch FROM clock_timestamp()) AS DOUBLE PRECISION) AS now"
# A node's wall clock and boot clock that disagree by more than this (seconds) on the time
# elapsed since the server's time was read: the server's time is read again (see module doc).
PAUSE_SECONDS = 2.0
# How long a start waits for its own earlier session, which still holds its name, to end.
_OWN_SESSION_WAIT_MS = 5000
# A try for a node's name's lock, with the trying session's server process id and start.
_TAKE_NAME = (
    "SELECT pg_try_advisory_lock(%s) AS took, a.pid, a.backend_start AS since"
    " FROM pg_stat_activity a WHERE a.pid = pg_backend_pid()"
)
_SESSION_GONE = "SELECT NOT EXISTS (SELECT 1 FROM pg_stat_activity WHERE pid = %s) AS gone"
# How many times a node tries to take its name's lock: a holder can leave between a try
# and the look for it (each leaving is another try), and its own session from before a
# lost connection is ended once.
_NAME_TRIES = 4


def name_lock(node: str) -> int:
    """The key of the session-level advisory lock a running node holds on its name: the
    first 8 bytes of the SHA-256 of its sessions' application_name, as a signed bigint."""
    digest = hashlib.sha256(f"{NODE_SESSION}{node}".encode()).digest()
    return int.from_bytes(digest[:8], "big", signed=True)


_PLACEHOLDERS = re.compile(r"'[^']*'|\?|(?<![:\w]):([A-Za-z_]\w*)|%")


@functools.lru_cache(maxsize=512)
def translate(sql: str) -> str:
    """The spool's statement (``?`` and ``:name`` parameters) in psycopg's form."""

    def one(match: re.Match[str]) -> str:
        text = match.group(0)
        if text == "?":
            return "%s"
        if text == "%":
            return "%%"
        if match.group(1):
            return f"%({match.group(1)})s"
        return text  # a string literal, as it is

    return _PLACEHOLDERS.sub(one, sql)


def server_error(exc: psycopg.Error) -> str:
    """What the server said of a failed statement: its primary message and SQLSTATE, never
    its DETAIL (a failing row's values: file names, message IDs) nor the statement."""
    primary = exc.diag.message_primary
    code = exc.sqlstate
    if not primary:
        return type(exc).__name__ + (f" (SQLSTATE {code})" if code else "")
    return f"{primary.strip().splitlines()[0]}" + (f" (SQLSTATE {code})" if code else "")


def statement_error(
    exc: psycopg.Error, where: str, doing: Literal["read", "write"] = "write"
) -> SpoolError:
    """A statement's failure ``exc`` on the spool ``where``, the connection intact, in a
    ``doing`` ("read" or "write"), for the operator (the message and fix) and for the
    callers (its class: see gateway.errors)."""
    said = server_error(exc)
    if isinstance(exc, psycopg.errors.DataCorrupted | psycopg.errors.IndexCorrupted):
        return SpoolError(
            f"spool {doing} failed: {said}: the spool {where} is damaged",
            fix="the PostgreSQL server's log names the table or index: rebuild a damaged "
            "index (REINDEX INDEX name); for a damaged table, stop medgw and restore the last "
            "backup (medgw restore --from BUNDLE --force; see Backups in the admin guide)",
        )
    if isinstance(exc, psycopg.errors.DiskFull):
        return SpoolFullError(
            f"spool {doing} failed: {said}: no disk space is left for the spool {where}",
            fix="free disk space on the PostgreSQL server's data and WAL file systems (its log "
            "names the file); medgw tries again by itself",
        )
    if isinstance(exc, psycopg.errors.OutOfMemory):
        # Not for every change alike: a smaller transaction may pass.
        return SpoolError(
            f"spool {doing} failed: {said}: the PostgreSQL server of the spool {where} ran out "
            "of memory",
            fix="see the PostgreSQL server's log, and its memory settings (work_mem) and the "
            "memory of its host",
        )
    return SpoolError(
        f"spool {doing} failed: {said}",
        fix="see the PostgreSQL server's log for this statement",
    )


class InTransaction:
    """A connection inside a transaction, as the spool's parts use one."""

    def __init__(self, conn: psycopg.Connection[DictRow]) -> None:
        self._conn = conn

    def execute(self, sql: str, parameters: Params = (), /) -> Cursor:
        return self._conn.execute(translate(sql), parameters)

    def executemany(self, sql: str, parameters: Iterable[Params], /) -> Cursor:
        cursor = self._conn.cursor()
        cursor.executemany(translate(sql), list(parameters))
        return cursor


class PostgresDatabase(SqlStore):
    """The PostgreSQL spool's connections and transactions (see module doc)."""

    claim_lock = " FOR UPDATE SKIP LOCKED"
    key_lock_shared = f"SELECT pg_advisory_xact_lock_shared({KEY_LOCK})"
    key_lock = f"SELECT pg_advisory_xact_lock({KEY_LOCK})"
    receipt_is_bytes = "receipt IS NOT NULL"  # bytea: always bytes

    def __init__(
        self,
        settings: PostgresSettings,
        clock: Clock,
        claimant: Claimant | None = None,
        *,
        on_change: Callable[[str | None], None] | None = None,
        on_replaced: Callable[[SpoolReplacedError], None] | None = None,
        hold_name: bool = False,
        server_time: bool = True,
        on_clock: Callable[[float], None] | None = None,
        command: bool = False,
    ) -> None:
        """``hold_name``: a running node's spool, which holds its name (see
        :meth:`hold_name`) from here on; :class:`NodeNameTakenError` if another holds it.
        ``command``: a command's, its sessions named ``medgw command <node>``, not as the
        running node's (``medgw node <node>``: a restore tells them apart).
        ``server_time``: leases judged by the database server's clock (see module doc);
        False: by ``clock`` alone (a test's, that moves it to make leases run out).
        ``on_clock`` hears each difference read (see :meth:`clock_offset`)."""
        self._settings = settings
        self._clock = clock
        self._claimant = claimant if claimant is not None else Claimant()
        self._on_change = on_change
        self._on_replaced = on_replaced
        # Connections not in use; None: one not opened yet (or closed after a failure).
        self._idle: queue.LifoQueue[psycopg.Connection[DictRow] | None] = queue.LifoQueue()
        for _ in range(max(1, settings.connections)):
            self._idle.put(None)
        self._state = threading.Lock()
        self._retry_at = 0.0  # clock.monotonic() before which no connection is tried
        self._backoff = 0.0
        self._down: str | None = None  # why the database is unreachable; None: it answers
        self._closed = False
        self._session_name = COMMAND_SESSION if command else NODE_SESSION
        # The spool's generation this node started on (None until read: the start's own
        # connection is not checked, its transaction reads it); why not any more.
        self._generation: str | None = None
        self._replaced: SpoolReplacedError | None = None
        # The session holding this node's name (hold_name), its server process's id and
        # start (a process id alone can be another session's after a server restart).
        self._holds_name = hold_name
        self._name_session: psycopg.Connection[DictRow] | None = None
        self._name_held: tuple[int, datetime] | None = None
        self._name_guard = threading.Lock()
        # The database server's clock minus this node's wall clock, in seconds, and the
        # server's time at the last reading with this node's boot and wall clocks' times
        # then (see clock_offset): one tuple, replaced whole, as worker threads read it
        # meanwhile.
        self._offset = 0.0
        self._reading = (0.0, 0.0, 0.0)
        # The connection this thread uses now, if any (see _run): the server's time is
        # read again on it, not on another the pool may not have to spare.
        self._using = threading.local()
        self._server_time = server_time
        self._on_clock = on_clock
        self._generation = self._transact(functools.partial(_start, node=self._claimant.node))
        self.clock_offset()
        if hold_name:
            try:
                self.hold_name()
            except BaseException:
                self.close()
                raise

    def close(self) -> None:
        self._closed = True
        with self._name_guard:
            if self._name_session is not None:
                self._name_session.close()  # the name's lock goes with its session
                self._name_session = None
        while True:
            try:
                conn = self._idle.get_nowait()
            except queue.Empty:
                return
            if conn is not None:
                conn.close()

    def hold_name(self) -> None:
        """Hold this node's name on the spool for as long as it runs: a session-level
        advisory lock keyed by the name (:func:`name_lock`) on a connection of its own, so
        that a second node started under the same name refuses to start instead of taking
        up the first one's interrupted work and owed records as its own.  A node that dies
        loses the lock with its session.  Called again at each renewal of the leases and
        with each new connection: a session found gone (the server restarted, the network
        cut) is replaced and the lock taken again; if another node holds the name by then,
        the node stops (every call fails with :class:`NodeNameTakenError`, ``on_replaced``
        hears it).  Unreachable: :class:`SpoolUnreachableError`, tried again later."""
        with self._name_guard:
            session = self._name_session
            if session is not None and not (session.closed or session.broken):
                try:
                    session.execute("SELECT 1")
                    return
                except psycopg.Error:
                    session.close()
            self._name_session = None
            try:
                session = self._open()
            except psycopg.Error as exc:
                raise self._unreachable(exc) from exc
            try:
                taken = self._take_name(session)
            except psycopg.Error as exc:
                session.close()
                if session.broken or session.closed:
                    raise self._unreachable(exc) from exc
                raise statement_error(exc, self._settings.where) from None
            if isinstance(taken, NodeNameTakenError):
                session.close()
                if self._name_held is None:  # at start
                    raise taken
                self._give_up(taken)
            self._name_session, self._name_held = session, taken

    def _take_name(
        self, session: psycopg.Connection[DictRow]
    ) -> tuple[int, datetime] | NodeNameTakenError:
        """Take this node's name's lock on ``session``: its server process's id and start;
        else why not (another holds it, or holders kept leaving)."""
        key = name_lock(self._claimant.node)
        halves = ((key >> 32) & 0xFFFFFFFF, key & 0xFFFFFFFF)
        own_ended = False
        for _ in range(_NAME_TRIES):
            row = session.execute(_TAKE_NAME, (key,)).fetchone()
            if row is not None and row["took"]:
                return int(row["pid"]), row["since"]
            holder = session.execute(_NAME_HOLDER, halves).fetchone()
            if holder is None:
                continue  # the holder left between the try and the look: tried again
            if self._name_held is None or own_ended:
                break
            pid, since = self._name_held
            if (holder["pid"], holder["since"]) != (pid, since):
                break
            own_ended = True
            # This node's own session from before a lost connection, which the server
            # has not yet noticed is gone: ended, its lock goes with it.
            # (The one-argument form: PostgreSQL 12 and 13 have no wait; waited for here.)
            session.execute("SELECT pg_terminate_backend(%s)", (pid,))
            for _ in range(_OWN_SESSION_WAIT_MS // 100):
                gone = session.execute(_SESSION_GONE, (pid,)).fetchone()
                if gone is not None and gone["gone"]:
                    break
                session.execute("SELECT pg_sleep(0.1)")
        node = self._claimant.node
        if holder is None:
            return NodeNameTakenError(
                f"node name {node!r} ([cluster] node_name) could not be taken on the spool "
                f"{self._settings.where} after {_NAME_TRIES} tries: each time, the session "
                "holding it had left before it could be looked up (sessions under this name "
                "kept coming and going)",
                fix=f"look for what keeps connecting as {node!r} (another node configured with "
                "this name, restarted over and over, or a command run in a loop: medgw's "
                f"sessions are named '{NODE_SESSION}{node}' in pg_stat_activity) and stop it; "
                "then start this node again (systemctl restart medgw)",
            )
        client = holder["hostname"] or holder["addr"]
        where = f"from {client}" if client else "over the database server's local socket"
        # A session of another role is shown without its start (or address) unless the
        # spool's role may read all statistics (pg_read_all_stats).
        since = holder["since"]
        started = f", connected since {since:%Y-%m-%d %H:%M:%S %Z}" if since else ""
        return NodeNameTakenError(
            f"node name {node!r} ([cluster] node_name) is in use by another running node on "
            f"the spool {self._settings.where}: the session {holder['name']!r} {where} "
            f"(server process {holder['pid']}{started}) holds it; two nodes under one name "
            "would take up each other's interrupted work and audit records as their own",
            fix=f"give this node a [cluster] node_name of its own, unique among the nodes "
            f"sharing the spool; if {node!r} is this very node started twice, stop the "
            "other process first",
        )

    def _give_up(self, error: SpoolReplacedError) -> NoReturn:
        """Nothing more on any connection, for good (``on_replaced`` hears ``error``,
        once): raises."""
        with self._state:
            first, self._replaced = self._replaced is None, self._replaced or error
        self._drop_idle()
        if first and self._on_replaced is not None:
            self._on_replaced(error)
        raise self._replaced

    def clock_offset(self) -> float:
        """Read the database server's time, from which every lease is reckoned until the
        next reading (see module doc), and how far it is from this node's wall clock
        (seconds; positive: the node's clock is behind; ``on_clock`` hears it); returns
        that difference."""
        wall, ticks = self._clock.now().timestamp(), self._clock.boottime()
        conn: psycopg.Connection[DictRow] | None = getattr(self._using, "conn", None)
        if conn is None:
            read = self._read(_SERVER_TIME, (), each_run=True)[0]["now"]
        else:  # within a call on ``conn``
            read = conn.execute(_SERVER_TIME, prepare=False).fetchall()[0]["now"]
        wall_after, ticks_after = self._clock.now().timestamp(), self._clock.boottime()
        server = float(read)
        # Read halfway through the round trip, on either clock of the node.
        wall_then = (wall + wall_after) / 2
        self._reading = (server, (ticks + ticks_after) / 2, wall_then)
        self._offset = server - wall_then
        if self._on_clock is not None:
            self._on_clock(self._offset)
        return self._offset

    def _lease(self) -> tuple[float, float]:
        """Now and the end of a lease made now, on the database server's clock: its time
        at the last reading plus the node's boot clock's time elapsed since, read again
        first if the node's wall clock says otherwise (see module doc)."""
        if not self._server_time:
            now = self._clock.now().timestamp()
            return now, now + self._claimant.lease_seconds
        server, read_at, wall_then = self._reading
        elapsed = self._clock.boottime() - read_at
        if abs(self._clock.now().timestamp() - wall_then - elapsed) > PAUSE_SECONDS:
            self.clock_offset()  # a pause or a step since the last reading
            server, read_at, _ = self._reading
            elapsed = self._clock.boottime() - read_at
        now = server + elapsed
        return now, now + self._claimant.lease_seconds

    def size_bytes(self) -> int:
        """``pg_database_size`` of the spool's database: its files on the server's disk
        (the server sums their sizes: no row is read), without the server's WAL."""
        [row] = self._read("SELECT pg_database_size(current_database()) AS size", ())
        return int(row["size"])

    def shred(self) -> bool:
        """Reclaim the space of deleted rows (``VACUUM``): PostgreSQL has no secure
        delete, so a purged item is unreadable by its data key being gone, whatever
        copy of the row's bytes the server's files and WAL still hold (gateway.atrest
        rotates the key-encryption keys for that)."""
        self._run(lambda conn: conn.execute("VACUUM data_keys"), lambda: True)
        return True

    def _read(self, sql: str, params: Params, *, each_run: bool = False) -> list[Row]:
        # Not prepared (psycopg prepares a statement after a few runs), the server plans
        # it for the values it is run with every time, never generically.
        prepare = False if each_run else None

        def query(conn: psycopg.Connection[DictRow]) -> list[Row]:
            return list(conn.execute(translate(sql), params, prepare=prepare).fetchall())

        return self._run(query, lambda: True, doing="read")

    def _transact(self, work: Callable[[Connection], T]) -> T:
        began: list[bool] = []
        # Once the work is done, before the COMMIT: its result, the transaction's id and the
        # server process running it.
        ending: list[tuple[T, int | None, int]] = []

        def in_transaction(conn: psycopg.Connection[DictRow]) -> T:
            began.clear()
            ending.clear()
            # The transaction's id with its BEGIN, in one round trip (a new id: a COMMIT
            # that changed nothing is then recorded too, and can be asked about alike).
            cursor = conn.execute("BEGIN; SELECT txid_current() AS xid")
            began.append(True)
            cursor.nextset()
            row = cursor.fetchone()
            try:
                result = work(InTransaction(conn))
            except BaseException:
                if not (conn.broken or conn.closed):
                    with contextlib.suppress(psycopg.Error):
                        conn.execute("ROLLBACK")
                raise
            ending.append((result, None if row is None else int(row["xid"]), conn.info.backend_pid))
            conn.execute("COMMIT")
            return result

        # Run again on a new connection only if the old one failed before the
        # transaction began: one that failed later may have been committed.
        try:
            return self._run(in_transaction, lambda: not began)
        except SpoolUnreachableError as exc:
            if not ending:
                raise  # lost before its COMMIT: nothing of it was recorded
            result, xid, pid = ending[0]
            if xid is None or self._committed(xid, pid, exc):
                return result
            raise

    def _committed(self, xid: int, pid: int, lost: SpoolUnreachableError) -> bool:
        """Whether transaction ``xid`` (of server process ``pid``), whose connection was
        lost during its COMMIT, was committed: asked on new connections for up to
        ``connect_timeout`` seconds (:class:`SpoolOutcomeUnknownError` if none answers)."""
        # Bounded by the clock and by a count of tries (each short while the server
        # refuses; a try that hangs ends at connect_timeout).
        deadline = self._clock.monotonic() + self._settings.connect_timeout
        for _ in range(int(self._settings.connect_timeout / OUTCOME_POLL) + 1):
            try:
                with self._open() as conn:
                    self._reached()
                    row = conn.execute("SELECT txid_status(%s) AS status", (xid,)).fetchone()
                    status = None if row is None else row["status"]
                    if status != "in progress":
                        return status == "committed"
                    # Its session has not noticed that the connection is gone: ended
                    # now, its transaction is then committed or not, for good.
                    conn.execute("SELECT pg_terminate_backend(%s)", (pid,))
            except (psycopg.Error, SpoolError):
                pass  # no answer yet
            if self._clock.monotonic() >= deadline:
                break
            time.sleep(OUTCOME_POLL)
        raise SpoolOutcomeUnknownError(
            f"{lost.message}; the connection was lost while a change was being committed, "
            "and whether it was recorded is not known",
            fix=lost.fix,
        ) from lost

    def _run(
        self,
        use: Callable[[psycopg.Connection[DictRow]], T],
        again: Callable[[], bool],
        *,
        doing: Literal["read", "write"] = "write",
    ) -> T:
        """``use`` a connection (to ``doing``: read or write); a deadlock or serialization
        failure runs it again, and so does a connection found dead when ``again()`` says
        that is safe."""
        for rerun in range(_RERUNS + 1):
            last = rerun == _RERUNS
            conn = self._take()
            try:
                result = self._use(conn, use)
            except (psycopg.errors.DeadlockDetected, psycopg.errors.SerializationFailure):
                self._idle.put(conn)
                if last:
                    raise SpoolError(
                        "spool write failed: the database kept ending it for conflicts with "
                        "other transactions",
                        fix="none needed if it passes; if it persists, see the PostgreSQL log",
                    ) from None
                continue
            except psycopg.Error as exc:
                if conn.broken or conn.closed:  # the server went away (and the others with it)
                    conn.close()
                    self._idle.put(None)
                    self._drop_idle()
                    if again() and not last:
                        continue
                    raise self._unreachable(exc) from exc
                self._idle.put(conn)
                # The server's error text names the failing row's values: not chained.
                raise statement_error(exc, self._settings.where, doing) from None
            except BaseException:
                self._idle.put(None if conn.broken else conn)
                raise
            self._idle.put(conn)
            return result
        raise AssertionError("not reached")  # pragma: no cover

    def _use(
        self, conn: psycopg.Connection[DictRow], use: Callable[[psycopg.Connection[DictRow]], T]
    ) -> T:
        """``use(conn)``, ``conn`` known meanwhile as this thread's connection in use."""
        outer = getattr(self._using, "conn", None)
        self._using.conn = conn
        try:
            return use(conn)
        finally:
            self._using.conn = outer

    def _drop_idle(self) -> None:
        """Close the idle connections: after one was found dead, they are too."""
        found: list[psycopg.Connection[DictRow] | None] = []
        while True:
            try:
                found.append(self._idle.get_nowait())
            except queue.Empty:
                break
        for conn in found:
            if conn is not None:
                conn.close()
            self._idle.put(None)

    def _take(self) -> psycopg.Connection[DictRow]:
        """A connection to use: an idle one, or a new one (SpoolError if none can be made)."""
        if self._replaced is not None:  # nothing more, on any connection
            raise self._replaced
        conn = self._idle.get()
        if conn is not None and not conn.closed:
            return conn
        try:
            return self._connect()
        except BaseException:
            self._idle.put(None)
            raise

    def reach(self) -> None:
        """See :meth:`gateway.spool.Spool.reach`: one connection, opened and closed (the
        calls that follow open theirs: within the back-off no more)."""
        with self._state:
            if self._down is None or self._closed or self._replaced is not None:
                return
        self._connect(now=True).close()

    def _connect(self, *, now: bool = False) -> psycopg.Connection[DictRow]:
        """A new connection (``now``: tried within the back-off too)."""
        if self._closed:
            raise SpoolError("the spool is closed", fix="this is a bug in medgw; report it")
        with self._state:
            waiting = self._down is not None and self._clock.monotonic() < self._retry_at
            waiting = waiting and not now
        if waiting:  # within the back-off: no connection is tried
            raise self._unreachable(None)
        try:
            conn = self._open()
        except psycopg.Error as exc:
            raise self._unreachable(exc) from exc
        if self._generation is not None:
            self._check_generation(conn)
            if self._holds_name:
                try:
                    self.hold_name()
                except BaseException:
                    conn.close()
                    raise
        self._reached()
        return conn

    def _check_generation(self, conn: psycopg.Connection[DictRow]) -> None:
        """``conn`` (new) is to the spool this node started on, or it is closed and the
        call fails: unreachable while a restore holds the spool (tried again after the
        back-off), :class:`SpoolReplacedError` for good once it has replaced it."""
        try:
            with conn.transaction():
                # Waits for a restore no longer than for a connection.
                timeout = f"{max(1, self._settings.connect_timeout)}s"
                conn.execute("SELECT set_config('lock_timeout', %s, true)", (timeout,))
                conn.execute(generation.SHARED)
                rows = conn.execute(generation.READ).fetchall()
        except psycopg.errors.UndefinedTable:
            rows = []  # not the database this node started on (its generation is gone)
        except psycopg.Error as exc:
            conn.close()
            if isinstance(exc, psycopg.errors.LockNotAvailable):
                held = "a restore (medgw restore) or another node's schema upgrade holds it"
                raise self._unreachable(exc, held) from None
            raise self._unreachable(exc) from exc
        found = [str(row["token"]) for row in rows]
        if found == [self._generation]:
            return
        conn.close()
        node = self._claimant.node
        replaced = SpoolReplacedError(
            f"the spool {self._settings.where} was restored (replaced) while this node "
            f"({node}) was running: what it holds in memory belongs to the spool it "
            "started on, so it stops and writes nothing more",
            fix=f"start node {node} again (systemd does, Restart=on-failure; else systemctl "
            "restart medgw): a start reads the restored spool",
        )
        self._give_up(replaced)

    def _open(self) -> psycopg.Connection[DictRow]:
        """A new connection (psycopg.Error if the server does not answer)."""
        # Named after the node, so that a restore can tell which node still uses the spool.
        named = self._settings.connect_args(
            application=f"{self._session_name}{self._claimant.node}"
        )
        conninfo = make_conninfo("", **named)
        return psycopg.connect(conninfo, autocommit=True, row_factory=dict_row)

    def _reached(self) -> None:
        """The server answered: no longer unreachable (``on_change`` hears it, once)."""
        with self._state:
            was, self._down, self._backoff = self._down, None, 0.0
        if was is not None and self._on_change is not None:
            self._on_change(None)

    def _unreachable(
        self, exc: psycopg.Error | None, why: str | None = None
    ) -> SpoolUnreachableError:
        """Record that the database does not answer (``exc``: just now, ``why`` said in
        its place); the error to raise."""
        with self._state:
            now = self._clock.monotonic()
            first = self._down is None
            if exc is not None:
                cause = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
                cause = why or cause
                self._down = cause
                if first:
                    self._backoff = 0.0  # a connection lost: try again at once, once
                else:
                    self._backoff = min(max(self._backoff * 2, FIRST_BACKOFF), MAX_BACKOFF)
                self._retry_at = now + self._backoff
            cause = self._down or "no answer"
            wait = max(0.0, self._retry_at - now)
        if first and exc is not None and self._on_change is not None:
            self._on_change(cause)
        return SpoolUnreachableError(
            f"the spool {self._settings.where} is unreachable: {cause}",
            fix="check that PostgreSQL is running and that this host can reach it; medgw "
            f"tries again by itself (next in {wait:.0f} s)",
        )


def _start(db: Connection, node: str) -> str:
    """A node's start (``node``: its name): the tables made or upgraded, and the generation
    it starts on, read in the same transaction (under the lock a restore holds)."""
    create_or_upgrade(db, node)
    return generation.current(db)
