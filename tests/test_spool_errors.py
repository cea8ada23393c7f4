"""A spool write that fails for a reason outside medgw says which, on either backend.

A full disk (SQLite: the library's SQLITE_FULL on a real full file system;
PostgreSQL: the server's SQLSTATE 53100) and a SQLite database another process holds
for longer than medgw waits are :class:`SpoolUnavailableError`: every change fails
alike until it passes, so a caller with many does not try them one by one (see
gateway.inbound.settling).  They are not :class:`SpoolUnreachableError`: the daemon's
loops alert on them (only an unreachable PostgreSQL server has its own alert).  Each
names the spool, the cause and the fix, and never the failing row's values.  A damaged
SQLite spool (pages of its real file overwritten) fails its reads and writes as a
:class:`SpoolError` saying so and naming the restore from a backup: never the library's
own error, which a command would show as a traceback.
"""

from __future__ import annotations

import os
import sqlite3
from collections.abc import Iterator
from pathlib import Path

import pytest

from gateway.config.storage import SPOOL_FILE
from gateway.errors import (
    SpoolBusyError,
    SpoolError,
    SpoolFullError,
    SpoolUnavailableError,
    SpoolUnreachableError,
)
from gateway.fsutil import this_user
from gateway.pki.demo import DemoLayout
from gateway.spool import SqliteSpool
from gateway.spool.postgres import PostgresSettings, PostgresSpool
from tests.cli import medgw
from tests.clocks import TickingClock
from tests.helpers.spooldisk import (
    BACKENDS,
    SpoolDisk,
    damage,
    raise_on_inbound,
    run_sql,
    spool_disk,
)
from tests.helpers.storage import quota_used_up, writes_refused


@pytest.fixture(params=BACKENDS)
def disk(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[SpoolDisk]:
    with spool_disk(request, tmp_path) as opened:
        yield opened


def test_a_full_disk_is_named_with_its_fix_and_fails_every_change_alike(
    disk: SpoolDisk, tmp_path: Path
) -> None:
    spool = disk.open(TickingClock())
    try:
        spool.inbound_begin("lab", "<before@lab>", "ab" * 32, tmp_path / "before.hl7")
        disk.fill()
        with pytest.raises(SpoolFullError) as caught:
            spool.inbound_begin("lab", "<full@lab>", "ab" * 32, tmp_path / "full.hl7")
        error = caught.value
        assert isinstance(error, SpoolUnavailableError)
        assert not isinstance(error, SpoolUnreachableError)  # the daemon's loops alert on it
        assert "spool write failed" in error.message and disk.where in error.message
        assert "no disk space is left for the spool" in error.message
        assert error.fix and error.fix.startswith("free disk space on the")
        assert "<full@lab>" not in str(error)  # the server's DETAIL names the row
        assert spool.inbound_get("lab", "<full@lab>") is None
        disk.free()
        spool.inbound_begin("lab", "<full@lab>", "ab" * 32, tmp_path / "full.hl7")
        assert spool.inbound_get("lab", "<full@lab>") is not None
    finally:
        spool.close()


def test_a_sqlite_spool_held_by_another_process_is_named_with_its_fix(tmp_path: Path) -> None:
    path = tmp_path / "spool.sqlite3"
    spool = SqliteSpool(path, TickingClock())
    other = sqlite3.connect(path, isolation_level=None)
    try:
        other.execute("BEGIN IMMEDIATE")  # a sqlite3 shell left in a transaction
        with pytest.raises(SpoolBusyError) as caught:  # after medgw's wait for it
            spool.inbound_begin("lab", "<held@lab>", "ab" * 32, tmp_path / "held.hl7")
        error = caught.value
        assert isinstance(error, SpoolUnavailableError)
        assert not isinstance(error, SpoolUnreachableError)
        assert "database is locked" in error.message and str(path) in error.message
        assert "another process held" in error.message
        assert error.fix and f"fuser -v {path}" in error.fix
        other.execute("ROLLBACK")
        spool.inbound_begin("lab", "<held@lab>", "ab" * 32, tmp_path / "held.hl7")
        assert spool.inbound_get("lab", "<held@lab>") is not None
    finally:
        other.close()
        spool.close()


def test_a_postgresql_server_out_of_memory_is_named_and_tried_again_alone(
    postgres: PostgresSettings, tmp_path: Path
) -> None:
    """Out of memory (SQLSTATE 53200) is not for every change alike: a smaller one may
    pass, so it is a plain SpoolError (a group of changes is tried one by one)."""
    spool = PostgresSpool(postgres, TickingClock())
    try:
        raise_on_inbound(postgres, "out_of_memory", "out of memory")
        with pytest.raises(SpoolError) as caught:
            spool.inbound_begin("lab", "<big@lab>", "ab" * 32, tmp_path / "big.hl7")
        error = caught.value
        assert not isinstance(error, SpoolUnavailableError)
        assert "out of memory (SQLSTATE 53200)" in error.message
        assert postgres.where in error.message and "ran out of memory" in error.message
        assert error.fix and "work_mem" in error.fix
        assert "<big@lab>" not in str(error)
    finally:
        spool.close()


def assert_damaged(error: SpoolError, path: Path) -> None:
    assert not isinstance(error, SpoolUnavailableError)  # not fixed by waiting
    assert "database disk image is malformed" in error.message
    assert f"the spool database {path} is damaged" in error.message
    assert error.fix and "restore the last backup (medgw restore --from BUNDLE" in error.fix
    assert f"copy {path} and its -wal file aside" in error.fix


def test_a_damaged_sqlite_spool_fails_its_reads_and_writes_naming_the_restore(
    tmp_path: Path,
) -> None:
    path = tmp_path / "spool.sqlite3"
    spool = SqliteSpool(path, TickingClock())
    for n in range(200):  # the table spans pages, its root one of several
        spool.inbound_begin("lab", f"<m{n}@lab>", "ab" * 32, tmp_path / f"{n}.hl7")
    spool.close()
    damage(path, "inbound")
    spool = SqliteSpool(path, TickingClock())  # its other tables are intact: it opens
    try:
        with pytest.raises(SpoolError) as read:
            spool.inbound_get("lab", "<m7@lab>")
        assert read.value.message.startswith("spool read failed: ")
        assert_damaged(read.value, path)
        assert "<m7@lab>" not in str(read.value)
        assert isinstance(read.value.__cause__, sqlite3.DatabaseError)
        with pytest.raises(SpoolError) as write:
            spool.inbound_begin("lab", "<new@lab>", "ab" * 32, tmp_path / "new.hl7")
        assert write.value.message.startswith("spool write failed: ")
        assert_damaged(write.value, path)
    finally:
        spool.close()


def test_a_sqlite_spool_whose_first_page_is_damaged_names_the_restore_at_the_open(
    tmp_path: Path,
) -> None:
    path = tmp_path / "spool.sqlite3"
    SqliteSpool(path, TickingClock()).close()
    with path.open("r+b") as handle:
        handle.write(b"\xa5" * 100)  # the database header
    with pytest.raises(SpoolError) as caught:
        SqliteSpool(path, TickingClock())
    error = caught.value
    assert error.message.startswith(f"cannot open the spool database {path}: ")
    assert "file is not a database" in error.message
    assert f"the spool database {path} is damaged" in error.message
    assert error.fix and "restore the last backup (medgw restore --from BUNDLE" in error.fix


def test_a_command_reading_a_damaged_spool_says_so_without_a_traceback(
    layout: DemoLayout,
) -> None:
    path = layout.hospital.root / "state" / SPOOL_FILE
    SqliteSpool(path, TickingClock()).close()
    damage(path, "outbound")
    listed = medgw("queue", "list", "--config", layout.hospital.config_path)
    assert listed.returncode == 1, listed
    assert "Traceback" not in listed.stderr, listed.stderr
    assert "medgw: spool read failed: database disk image is malformed" in listed.stderr
    assert f"the spool database {path} is damaged" in listed.stderr
    assert "medgw restore --from BUNDLE --force" in listed.stderr


def test_a_sqlite_spool_write_refused_by_the_disk_quota_is_a_full_spool(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """SQLite says "disk I/O error" (SQLITE_IOERR_WRITE) of a write the user's disk quota
    refused (EDQUOT; only ENOSPC is its SQLITE_FULL): the spool finds the folder without
    room for the user, and it is a full spool (503 and resend, nothing refused for good),
    said to be the quota, until there is room again."""
    path = tmp_path / "spool.sqlite3"
    spool = SqliteSpool(path, TickingClock())
    try:
        monkeypatch.setattr(os, "posix_fallocate", quota_used_up)
        with writes_refused(), pytest.raises(SpoolFullError) as caught:
            spool.inbound_begin("lab", "<quota@lab>", "ab" * 32, tmp_path / "quota.hl7")
        monkeypatch.undo()
        error = caught.value
        assert error.message.startswith("spool write failed: disk I/O error: ")
        assert f"the disk quota of user {this_user()} is used up" in error.message
        assert str(path) in error.message
        assert error.fix and error.fix.startswith(
            f"free space in the disk quota of user {this_user()} on the file system of "
            f"{tmp_path}, or have the quota raised (quota -u {this_user()} shows it)"
        )
        assert not list(tmp_path.glob(".room*"))  # the folder's probe left nothing
        spool.inbound_begin("lab", "<quota@lab>", "ab" * 32, tmp_path / "quota.hl7")
        assert spool.inbound_get("lab", "<quota@lab>") is not None
    finally:
        spool.close()


def test_a_sqlite_spool_write_the_disk_fails_with_room_left_names_the_disk(
    tmp_path: Path,
) -> None:
    """An I/O error on a folder with room left is no full spool: the disk failed."""
    path = tmp_path / "spool.sqlite3"
    spool = SqliteSpool(path, TickingClock())
    try:
        with writes_refused(), pytest.raises(SpoolError) as caught:
            spool.inbound_begin("lab", "<eio@lab>", "ab" * 32, tmp_path / "eio.hl7")
        error = caught.value
        assert not isinstance(error, SpoolUnavailableError)
        assert error.message == (
            "spool write failed: disk I/O error: the disk under the spool database "
            f"{path} refused a read or write"
        )
        assert error.fix and error.fix.startswith(
            f"check the free space and the user's quota there (df -h {tmp_path}; quota -u "
        ), error.fix
        check = f'sudo -u {this_user()} sqlite3 -readonly {path} "PRAGMA quick_check"'
        assert f"only if a read-only check as the service user ({check})" in error.fix
        assert "restore the last backup" in error.fix
    finally:
        spool.close()


def test_a_damaged_postgresql_spool_fails_its_reads_saying_so_with_its_fix(
    postgres: PostgresSettings, tmp_path: Path
) -> None:
    """The server's own error for a damaged page (SQLSTATE XX001), raised on each read of
    ``inbound`` (by a row security policy: the session's server cannot have its files
    damaged for one test): a read, said to be one, naming the damage and the fix."""
    spool = PostgresSpool(postgres, TickingClock())
    try:
        spool.inbound_begin("lab", "<m1@lab>", "ab" * 32, tmp_path / "m1.hl7")
        run_sql(
            postgres,
            "CREATE FUNCTION damaged() RETURNS boolean LANGUAGE plpgsql AS $$ BEGIN"
            " RAISE EXCEPTION USING ERRCODE = 'data_corrupted',"
            " MESSAGE = 'invalid page in block 0 of relation base/16384/16402'; END $$",
        )
        run_sql(postgres, "CREATE POLICY damaged ON inbound USING (damaged())")
        run_sql(postgres, "ALTER TABLE inbound ENABLE ROW LEVEL SECURITY")
        run_sql(postgres, "ALTER TABLE inbound FORCE ROW LEVEL SECURITY")
        with pytest.raises(SpoolError) as caught:
            spool.inbound_get("lab", "<m1@lab>")
        error = caught.value
        assert not isinstance(error, SpoolUnavailableError)
        assert error.message == (
            "spool read failed: invalid page in block 0 of relation base/16384/16402 "
            f"(SQLSTATE XX001): the spool {postgres.where} is damaged"
        )
        assert error.fix and "REINDEX" in error.fix
        assert "restore the last backup (medgw restore --from BUNDLE" in error.fix
        assert "<m1@lab>" not in str(error)
    finally:
        spool.close()
