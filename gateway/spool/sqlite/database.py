"""One SQLite database with a writer and a reader connection; every change one transaction."""

from __future__ import annotations

import contextlib
import errno
import os
import sqlite3
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Literal, TypeVar

from gateway.clock import Clock
from gateway.errors import SpoolBusyError, SpoolError, SpoolFullError
from gateway.fsutil import no_room, private_file, shared_folder, storage_fix, this_user
from gateway.spool.groupcommit import GroupCommit
from gateway.spool.records import Claimant
from gateway.spool.schema import create_or_upgrade
from gateway.spool.sql import Connection, Params, Row, SqlStore

T = TypeVar("T")

SHRED_TRIES = 3  # tries of emptying the write-ahead log, each waiting 1 s for readers
BUSY_TIMEOUT_MS = 5000  # how long a statement waits for another process's lock


class Database(SqlStore):
    """The SQLite spool's connections: a writer (with group commit) and a reader."""

    receipt_is_bytes = "typeof(receipt)='blob'"
    reads_states_apart = True

    def __init__(self, path: Path, clock: Clock, claimant: Claimant | None = None) -> None:
        self._clock = clock
        self._path = path
        # By default this host's name, as the daemon's node has unless configured.
        self._claimant = claimant if claimant is not None else Claimant()
        try:
            shared_folder(path.parent)  # the state folder: the inbox and outbox may be in it
            # Mode 0600 whatever the umask; SQLite gives its -wal and -shm files the mode
            # of the database (those of an older version are corrected here too).
            for file in (
                path,
                path.with_name(path.name + "-wal"),
                path.with_name(path.name + "-shm"),
            ):
                if file is path or file.exists():
                    private_file(file)
        except OSError as exc:
            raise SpoolError(
                f"cannot create the spool database {path}: {exc.strerror or exc}",
                fix=storage_fix(exc, path.parent),
            ) from exc
        try:
            # Two connections shared by the event loop and worker threads: one writes
            # (transactions of several threads share a commit: see groupcommit), one
            # reads, so a read never waits for a commit's fsync.  WAL mode lets the
            # reader see every committed transaction without blocking the writer.
            self._db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
            self._db.row_factory = sqlite3.Row
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=FULL")
            self._db.execute(f"PRAGMA busy_timeout={BUSY_TIMEOUT_MS}")
            # What is deleted (a purged item's data key, a receipt) is overwritten in the
            # file, not only unlinked from the b-tree (see gateway.spool.sqlite.datakeys).
            self._db.execute("PRAGMA secure_delete=ON")
            # The statement journal, the copy of each page a transaction's savepoint
            # changes (every transaction of a group commit has one), kept in memory: by
            # default SQLite writes it to an unlinked file in the system's temporary
            # folder once it passes 64 KiB, a write per page (more than the log's own)
            # and copies of the spool's pages outside the state folder.  It only undoes
            # a failed transaction of a group; the log makes the commit durable.
            self._db.execute("PRAGMA temp_store=MEMORY")
            create_or_upgrade(self._db)
            self._reader = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
            self._reader.row_factory = sqlite3.Row
            self._reader.execute(f"PRAGMA busy_timeout={BUSY_TIMEOUT_MS}")
            self._reader.execute("PRAGMA query_only=1")
        except sqlite3.Error as exc:
            damage = _damage(path, exc)
            raise SpoolError(
                f"cannot open the spool database {path}: {exc}"
                + (f": {damage[0]}" if damage else ""),
                fix=damage[1]
                if damage
                else "check that the state directory is writable and the disk is not full",
            ) from exc
        self._writer = GroupCommit(self._db)
        self._read_lock = threading.Lock()

    def reach(self) -> None:
        """A file: nothing to reach (see :meth:`gateway.spool.Spool.reach`)."""

    def close(self) -> None:
        """Close both connections once a read or a write another thread has in progress
        is done (closing a connection under a running statement can crash the process);
        a later call raises."""
        with self._read_lock:
            self._reader.close()
        with self._writer.exclusive():
            self._db.close()

    def trace(self, statement: Callable[[str], object] | None) -> None:
        """Hand each SQL statement run on either connection (parameters filled in) to
        ``statement``, or no longer (None): to see which queries a call makes."""
        for db in (self._db, self._reader):
            db.set_trace_callback(statement)

    def _read(self, sql: str, params: Params, *, each_run: bool = False) -> list[Row]:
        # SQLite plans no statement for other values than those it runs with: each_run
        # is PostgreSQL's.
        with self._read_lock:
            try:
                rows: list[Row] = self._reader.execute(sql, params).fetchall()
            except sqlite3.ProgrammingError:
                raise  # a bug in medgw (a closed spool, a wrong statement): not the disk's
            except sqlite3.Error as exc:
                raise database_error(self._path, exc, "read") from exc
            return rows

    def _transact(self, work: Callable[[Connection], T]) -> T:
        """Run ``work`` as one transaction; returns once it is committed (and fsync'ed)."""
        try:
            return self._writer.run(work)
        except sqlite3.Error as exc:
            raise database_error(self._path, exc, "write") from exc

    def size_bytes(self) -> int:
        """The database file and its write-ahead log."""
        size = 0
        for suffix in ("", "-wal"):
            with contextlib.suppress(OSError):
                size += self._path.with_name(self._path.name + suffix).stat().st_size
        return size

    def shred(self) -> bool:
        """Write every committed change into the database file and empty the write-ahead
        log: what was deleted is then overwritten (secure_delete), not kept in the log.
        A reader in the middle of a read (another process: ``medgw queue``, a backup)
        keeps the log busy: tried again, for up to :data:`SHRED_TRIES` seconds; False if
        the log could not be emptied (its old pages are overwritten by later writes)."""
        for _ in range(SHRED_TRIES):
            with self._writer.exclusive() as db:
                db.execute("PRAGMA busy_timeout=1000")  # each try waits for readers this long
                try:
                    busy = db.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()[0]
                except sqlite3.Error as exc:
                    raise database_error(self._path, exc, "write") from exc
                finally:
                    db.execute(f"PRAGMA busy_timeout={BUSY_TIMEOUT_MS}")
            if not busy:
                return True
        return False


def database_error(path: Path, exc: sqlite3.Error, doing: Literal["read", "write"]) -> SpoolError:
    """``exc``, raised by a ``doing`` ("read" or "write") of the spool database at ``path``,
    for the operator (the message and fix) and for the callers (its class: see
    gateway.errors)."""
    code = getattr(exc, "sqlite_errorcode", 0) & 0xFF  # the primary result code
    if code == sqlite3.SQLITE_FULL:
        return _full(path, exc, doing, OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)))
    # SQLite says "disk I/O error" of a write the user's disk quota refused (EDQUOT; only
    # ENOSPC is SQLITE_FULL): a full disk all the same, if the folder has no room.
    full = no_room(path.parent) if code == sqlite3.SQLITE_IOERR else None
    if full is not None:
        return _full(path, exc, doing, full)
    if code == sqlite3.SQLITE_BUSY:
        return SpoolBusyError(
            f"spool {doing} failed: {exc}: another process held the spool database {path} "
            f"for more than {BUSY_TIMEOUT_MS // 1000} s",
            fix=f"find it (fuser -v {path}): a medgw command still running, or a sqlite3 "
            "shell left in a transaction, and end it; medgw tries again by itself",
        )
    damage = _damage(path, exc)
    if damage is not None:
        return SpoolError(f"spool {doing} failed: {exc}: {damage[0]}", fix=damage[1])
    return SpoolError(
        f"spool {doing} failed: {exc}",
        fix="check free disk space and permissions of the state directory",
    )


def _full(
    path: Path, exc: sqlite3.Error, doing: Literal["read", "write"], full: OSError
) -> SpoolFullError:
    """``exc``: the file system of the spool database at ``path`` had no room (``full``:
    ENOSPC, or EDQUOT for the user's quota)."""
    what = (
        f"the disk quota of user {this_user()} is used up"
        if full.errno == errno.EDQUOT
        else "no disk space is left"
    )
    return SpoolFullError(
        f"spool {doing} failed: {exc}: {what} for the spool database {path}",
        fix=f"{storage_fix(full, path.parent)}; medgw tries again by itself",
    )


def _damage(path: Path, exc: sqlite3.Error) -> tuple[str, str] | None:
    """What ``exc`` says of the spool database at ``path``, and what an administrator does
    about it, if it is damaged (or the disk under it failed); None otherwise."""
    code = getattr(exc, "sqlite_errorcode", 0) & 0xFF  # the primary result code
    restore = (
        f"stop medgw, copy {path} and its -wal file aside (for the investigation), and "
        "restore the last backup (medgw restore --from BUNDLE --force; see Backups in the "
        "admin guide)"
    )
    if code in (sqlite3.SQLITE_CORRUPT, sqlite3.SQLITE_NOTADB):
        return f"the spool database {path} is damaged", restore
    if code == sqlite3.SQLITE_IOERR:
        # Also what a write the user's quota refused looks like when a little room is
        # left (less than the write needed): restoring is the last resort, not the first.
        return (
            f"the disk under the spool database {path} refused a read or write",
            f"check the free space and the user's quota there (df -h {path.parent}; quota "
            f"-u {this_user()}) and the disk (dmesg shows its I/O errors); only if "
            f"a read-only check as the service user (sudo -u {this_user()} sqlite3 "
            f'-readonly {path} "PRAGMA quick_check"), which changes nothing, reports '
            f"damage: {restore}",
        )
    return None
