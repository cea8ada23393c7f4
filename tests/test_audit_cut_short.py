"""A record the process was writing when it died (``write`` stops at a page boundary on
SIGKILL; a power cut keeps part of what was not synced) is cut off the trail at the next
start and accounted for by an ``audit.record_cut_short`` record: the trail stays one
verifiable chain, every line of it a record, and no false alarm of tampering."""

from __future__ import annotations

import errno
import hashlib
import json
import os
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from gateway.audit import AuditEvent, AuditLog, EventType, verify_chain
from gateway.audit.files import closed_files
from gateway.audit.log import TORN_KEPT
from gateway.audit.rotation import RotationSettings
from gateway.audit.verify import AuditChainError, verify_trail
from gateway.demo_run import read_audit
from gateway.instance import InstanceLock, InstanceLockError
from gateway.pki.demo import DemoLayout
from tests.audit_writer import StepClock
from tests.cli import medgw
from tests.helpers.audit import wait_for_event


def write_trail(path: Path, count: int) -> list[bytes]:
    """``count`` records in a new trail at ``path``; their lines."""
    path.parent.mkdir(parents=True, exist_ok=True)
    log = AuditLog(path, StepClock(datetime(2026, 12, 6, tzinfo=UTC)), node="SAKURA-HOSPITAL")
    for n in range(count):
        log.emit(AuditEvent(EventType.MESSAGE_SENT, peer="lab", message_id=f"<{n}@x>"))
    log.close()
    return path.read_bytes().splitlines(keepends=True)


def unfinished(tmp_path: Path, length: int) -> bytes:
    """The first ``length`` bytes of a real record's line: what a killed write leaves."""
    line = write_trail(tmp_path / "other" / "audit.jsonl", 1)[0]
    assert length < len(line)
    return line[:length]


def test_an_unfinished_last_line_is_cut_off_and_recorded_at_the_next_open(
    tmp_path: Path,
) -> None:
    trail = tmp_path / "audit" / "audit.jsonl"
    lines = write_trail(trail, 5)
    torn = unfinished(tmp_path, 180)
    with trail.open("ab") as handle:
        handle.write(torn)
    size = trail.stat().st_size - len(torn)

    log = AuditLog(trail, StepClock(datetime(2026, 12, 7, tzinfo=UTC)), node="SAKURA-HOSPITAL")
    # Recorded at once, durably: a kill before the next record leaves it accounted for.
    assert [r["event"] for r in read_audit(trail)][5:] == ["audit.record_cut_short"]
    log.emit(AuditEvent(EventType.DAEMON_STARTED))
    log.close()

    assert verify_chain(trail) == 7
    records = read_audit(trail)  # every line a record
    assert [r["seq"] for r in records] == list(range(1, 8))
    assert trail.read_bytes().startswith(b"".join(lines))
    cut, started = records[5], records[6]
    assert cut["event"] == "audit.record_cut_short" and cut["severity"] == "warning"
    assert cut["detail"]["offset"] == size
    assert cut["detail"]["size"] == len(torn)
    assert cut["detail"]["sha256"] == hashlib.sha256(torn).hexdigest()
    assert cut["detail"]["text"] == torn.decode()
    assert cut["detail"]["file"] == str(trail)
    assert "unfinished" in cut["reason"]
    assert started["event"] == "daemon.started" and started["prev"] == cut["hash"]


def test_a_long_unfinished_line_is_kept_by_its_beginning_and_its_hash(tmp_path: Path) -> None:
    trail = tmp_path / "audit.jsonl"
    write_trail(trail, 2)
    # Longer than one block read backwards, with no newline in it; not UTF-8 at its end.
    torn = b'{"detail":{"text":"' + b"x" * 70_000 + b"\xe3\x81"
    with trail.open("ab") as handle:
        handle.write(torn)
    log = AuditLog(trail, StepClock(datetime(2026, 12, 7, tzinfo=UTC)), node="SAKURA-HOSPITAL")
    log.close()  # closing writes what is owed: the record of the cut

    assert verify_chain(trail) == 3
    cut = read_audit(trail)[2]
    assert cut["detail"]["size"] == len(torn)
    assert cut["detail"]["sha256"] == hashlib.sha256(torn).hexdigest()
    assert cut["detail"]["text"] == torn[:TORN_KEPT].decode()


def test_a_trail_that_is_only_an_unfinished_line_starts_again_from_its_first_record(
    tmp_path: Path,
) -> None:
    trail = tmp_path / "audit.jsonl"
    torn = unfinished(tmp_path, 90)
    trail.write_bytes(torn)
    log = AuditLog(trail, StepClock(datetime(2026, 12, 7, tzinfo=UTC)), node="SAKURA-HOSPITAL")
    log.emit(AuditEvent(EventType.DAEMON_STARTED))
    log.close()
    assert verify_chain(trail) == 2
    first, second = read_audit(trail)
    assert first["seq"] == 1 and first["event"] == "audit.record_cut_short"
    assert first["detail"] == {
        "file": str(trail),
        "offset": 0,
        "size": 90,
        "sha256": hashlib.sha256(torn).hexdigest(),
        "text": torn.decode(),
    }
    assert second["event"] == "daemon.started"


def test_the_daemon_started_after_a_kill_mid_record_keeps_a_verifiable_trail(
    layout: DemoLayout, processes: Any, tmp_path: Path
) -> None:
    """The daemon checks its trail at start: an unfinished record is no tampering."""
    trail = layout.hospital.audit_log
    write_trail(trail, 4)
    torn = unfinished(tmp_path, 200)
    with trail.open("ab") as handle:
        handle.write(torn)

    processes.start(layout.hospital.config_path)
    started = wait_for_event(trail, "daemon.started")
    verified = medgw("audit", "verify", "--config", layout.hospital.config_path)
    assert verified.returncode == 0, verified.stderr
    events = [r["event"] for r in read_audit(trail)]
    assert events[4] == "audit.record_cut_short"
    assert "audit.verification_failed" not in events
    assert started["seq"] > 5
    assert all(json.loads(line) for line in trail.read_bytes().splitlines())


def test_audit_verify_reads_an_unfinished_last_line_as_no_record_yet(
    layout: DemoLayout, tmp_path: Path
) -> None:
    """Before the next start (or while a record is being written as the trail is read),
    the unfinished line is at the end of the file: not a record, not a fault."""
    trail = layout.hospital.audit_log
    write_trail(trail, 3)
    torn = unfinished(tmp_path, 150)
    with trail.open("ab") as handle:
        handle.write(torn)
    before = trail.read_bytes()

    verified = medgw("audit", "verify", "--config", layout.hospital.config_path)
    assert verified.returncode == 0, verified.stderr
    assert "3 records, hash chain intact" in verified.stdout
    assert "the last line (150 bytes) is unfinished, not a record" in verified.stdout
    assert trail.read_bytes() == before  # a check changes nothing


def test_an_unfinished_line_in_a_closed_file_is_still_a_fault(tmp_path: Path) -> None:
    """Only the newest file's end can be a record being written: a closed file is whole."""
    closed = tmp_path / "audit-1.jsonl"
    newest = tmp_path / "audit-2.jsonl"
    lines = write_trail(tmp_path / "whole.jsonl", 4)
    closed.write_bytes(b"".join(lines[:2]) + lines[2][:100])
    newest.write_bytes(b"".join(lines[2:]))
    with pytest.raises(AuditChainError, match=f"{closed}:3: not an audit record"):
        verify_trail([closed, newest])


def test_a_record_that_lacks_only_its_newline_is_cut_too_and_the_chain_goes_on(
    tmp_path: Path,
) -> None:
    """A kill can stop the write just before the newline: the record is whole but was
    never acknowledged.  It is cut (kept in the record of the cut) and the chain goes on
    from the record before it, never from it."""
    trail = tmp_path / "audit.jsonl"
    lines = write_trail(trail, 4)
    trail.write_bytes(b"".join(lines)[:-1])
    log = AuditLog(trail, StepClock(datetime(2026, 12, 7, tzinfo=UTC)), node="SAKURA-HOSPITAL")
    log.emit(AuditEvent(EventType.DAEMON_STARTED))
    log.close()
    assert verify_chain(trail) == 5
    records = read_audit(trail)
    assert [r["event"] for r in records[3:]] == ["audit.record_cut_short", "daemon.started"]
    assert records[3]["seq"] == 4 and records[3]["detail"]["text"] == lines[3][:-1].decode()


def test_the_record_of_a_cut_stays_in_the_file_it_was_cut_from_when_a_rotation_is_due(
    tmp_path: Path,
) -> None:
    trail = tmp_path / "audit.jsonl"
    write_trail(trail, 3)  # records of 2026-12-06
    with trail.open("ab") as handle:
        handle.write(unfinished(tmp_path, 120))
    size = trail.stat().st_size - 120
    next_day = StepClock(datetime(2026, 12, 8, tzinfo=UTC))
    log = AuditLog(trail, next_day, node="SAKURA-HOSPITAL", rotation=RotationSettings(None, True))
    log.emit(AuditEvent(EventType.DAEMON_STARTED))  # the day's first record: a new file
    log.close()
    [closed] = closed_files(trail)
    assert verify_trail([closed, trail]).records == 5
    cut = read_audit(closed)[-1]
    assert cut["event"] == "audit.record_cut_short" and cut["detail"]["offset"] == size
    assert [json.loads(line)["event"] for line in trail.read_bytes().splitlines()] == [
        "daemon.started"
    ]


def test_audit_verify_checks_an_unfinished_last_line_that_is_a_record_as_a_record(
    layout: DemoLayout,
) -> None:
    """Only a line that is not yet a record is passed over: an edited last record whose
    newline was taken away is still found."""
    trail = layout.hospital.audit_log
    lines = write_trail(trail, 3)
    edited = lines[2][:-1].replace(b'"outcome":"success"', b'"outcome":"failure"')
    trail.write_bytes(b"".join(lines[:2]) + edited)
    verified = medgw("audit", "verify", "--config", layout.hospital.config_path)
    assert verified.returncode != 0
    assert "record 3 was altered after it was written" in verified.stderr


def test_a_read_with_the_daemon_starting_or_stopping_is_refused_not_written_beside_it(
    layout: DemoLayout,
) -> None:
    """A daemon starting or stopping writes its trail without answering on its socket:
    a command reading the spool itself must not write the trail beside it."""
    trail = layout.hospital.audit_log
    write_trail(trail, 2)
    before = trail.read_bytes()
    lock = InstanceLock(layout.hospital.root / "state")
    lock.acquire()  # as a daemon holds it from its first step to its last
    try:
        listed = medgw("queue", "list", "--config", layout.hospital.config_path)
    finally:
        lock.release()
    assert listed.returncode == 1
    assert "medgw is starting or stopping" in listed.stderr
    assert "nothing is shown" in listed.stderr and "run the command again" in listed.stderr
    assert trail.read_bytes() == before
    # Once it is free, the read is recorded and shown.
    listed = medgw("queue", "list", "--config", layout.hospital.config_path)
    assert listed.returncode == 0, listed.stderr
    assert read_audit(trail)[-1]["event"] == "messages.listed"


def test_an_unfinished_line_whose_record_cannot_be_written_is_put_back(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A full disk at the open: the record of the cut fails, so the bytes go back and the
    next open cuts and records them; they never vanish without a trace."""
    trail = tmp_path / "audit.jsonl"
    write_trail(trail, 3)
    torn = unfinished(tmp_path, 180)
    with trail.open("ab") as handle:
        handle.write(torn)
    before = trail.read_bytes()
    real_write = os.write
    full = True

    def write(fd: int, data: bytes | memoryview) -> int:
        if full and bytes(data[:30]).startswith(b'{"detail"'):  # the record of the cut
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_write(fd, data)

    monkeypatch.setattr(os, "write", write)
    with pytest.raises(OSError, match="No space left"):
        AuditLog(trail, StepClock(datetime(2026, 12, 7, tzinfo=UTC)), node="SAKURA-HOSPITAL")
    assert trail.read_bytes() == before
    full = False
    log = AuditLog(trail, StepClock(datetime(2026, 12, 7, tzinfo=UTC)), node="SAKURA-HOSPITAL")
    log.close()
    cut = read_audit(trail)[3]
    assert cut["event"] == "audit.record_cut_short"
    assert cut["detail"]["sha256"] == hashlib.sha256(torn).hexdigest()


def test_a_command_run_as_root_leaves_the_lock_to_the_state_folders_owner(
    tmp_path: Path,
) -> None:
    """``sudo medgw queue list`` before the daemon's first start creates the lock file:
    it stays the medgw account's, or that daemon could never take it."""
    state = tmp_path / "state"
    state.mkdir()
    os.chown(state, 65534, 65534)  # the service account's folder (here: nobody)
    lock = InstanceLock(state)
    lock.acquire()
    lock.release()
    made = (state / "medgw.lock").stat()
    assert (made.st_uid, made.st_gid) == (65534, 65534)


def test_the_lock_is_never_taken_through_a_link_the_folders_owner_made(tmp_path: Path) -> None:
    """The medgw account owns the state folder: a symbolic or hard link it puts in the
    lock's place must not make a command run as root write, or give away, another file."""
    state = tmp_path / "state"
    state.mkdir()
    os.chown(state, 65534, 65534)
    victim = tmp_path / "victim"
    victim.write_bytes(b"root's own file\n")
    os.chmod(victim, 0o600)
    lock = state / "medgw.lock"
    for hard in (False, True):
        if hard:
            os.link(victim, lock)
        else:
            lock.symlink_to(victim)
        with pytest.raises(InstanceLockError, match="nothing was done"):
            InstanceLock(state).acquire()
        lock.unlink()
        assert victim.read_bytes() == b"root's own file\n"
        assert (victim.stat().st_uid, victim.stat().st_mode & 0o777) == (0, 0o600)
    lock.symlink_to(tmp_path / "made-by-root")  # dangling: root would create the target
    with pytest.raises(InstanceLockError):
        InstanceLock(state).acquire()
    assert not (tmp_path / "made-by-root").exists()
