"""Rotation of the audit trail: by size and by day, the chain going on across files,
a checkpoint closing each file, and nothing lost or written twice when the writer or
a real daemon is killed between two steps of a rotation."""

from __future__ import annotations

import itertools
import json
import os
import signal
import subprocess
import sys
import threading
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509

from gateway.audit import AuditEvent, AuditLog, EventType
from gateway.audit import rotation as steps
from gateway.audit.files import closed_name, trail_files
from gateway.audit.log import Pending, recorded_since
from gateway.audit.rotation import RETRY_SECONDS, RotationSettings
from gateway.audit.seal import CheckpointKeys
from gateway.audit.verify import verify_trail
from gateway.config import load_config
from gateway.demo_run import read_audit
from gateway.pki.demo import DemoLayout
from tests.audit_writer import StepClock, sealer
from tests.cli import medgw
from tests.helpers.audit import openssl_audit_key
from tests.helpers.faults import killed_at, wait_killed

START = datetime(2026, 12, 4, 23, 50, tzinfo=UTC)
ROOT = Path(__file__).resolve().parents[1]
KILL_AFTER_RENAME = "gateway.audit.rotation:close_file"


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return openssl_audit_key(tmp_path_factory.mktemp("keys"))


def checkpoint_keys(cert: Path) -> CheckpointKeys:
    return CheckpointKeys([x509.load_pem_x509_certificate(cert.read_bytes())])


def emit(log: AuditLog, numbers: range) -> None:
    for n in numbers:
        log.emit(AuditEvent(EventType.MESSAGE_SENT, peer="lab", message_id=f"<{n}@writer>"))


def lines(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def sent(path: Path) -> list[str]:
    return [r["message_id"] for r in read_audit(path) if r["event"] == "message.sent"]


def test_closed_files_are_named_by_their_closing_time_and_ls_lists_the_trail_in_order(
    tmp_path: Path,
) -> None:
    current = tmp_path / "audit.jsonl"
    log = AuditLog(current, StepClock(START), node="HOSP", rotation=RotationSettings(1500, False))
    emit(log, range(30))
    log.close()
    files = trail_files(current)
    assert len(files) >= 3
    assert files[-1] == current
    for closed in files[:-1]:
        first = lines(closed)[0]
        assert closed.name.startswith("audit-2026120") and closed.name.endswith("Z.jsonl")
        assert closed_name(current, datetime.fromisoformat(first["time"])).name <= closed.name
    listed = subprocess.run(["ls", tmp_path], capture_output=True, text=True, check=True)
    # The trail in order, then the writer's notes for reviews (gateway.audit.order).
    assert listed.stdout.split() == [f.name for f in files] + ["audit.jsonl.order"]
    seqs = [r["seq"] for f in files for r in lines(f)]
    assert seqs == list(range(1, 31))


def test_size_rotation_goes_on_with_the_chain_and_seals_each_file_with_a_checkpoint(
    tmp_path: Path, keys: tuple[Path, Path]
) -> None:
    current = tmp_path / "audit.jsonl"
    rotation = RotationSettings(3000, daily=False)
    log = AuditLog(current, StepClock(START), node="HOSP", sealer=sealer(*keys), rotation=rotation)
    emit(log, range(40))
    log.close()
    files = trail_files(current)
    assert len(files) >= 3
    for before, after in itertools.pairwise(files):
        last, first = lines(before)[-1], lines(after)[0]
        assert last["event"] == "audit.checkpoint" and last["detail"]["trigger"] == "rotation"
        assert first["prev"] == last["hash"] and first["seq"] == last["seq"] + 1
        assert before.stat().st_size < 3000 + 2000  # closed at the first record over the size
    report = verify_trail(files, checkpoint_keys(keys[1]))
    assert report.first_seq == 1 and report.checkpoints == len(files)  # + the shutdown one
    assert sent(current) == [f"<{n}@writer>" for n in range(40)]
    # Started again, the writer chains on from the current file's last record.
    log = AuditLog(current, StepClock(START.replace(hour=23, minute=59)), node="HOSP")
    emit(log, range(40, 41))
    log.close()
    assert verify_trail(trail_files(current)).records == report.records + 1


def test_the_first_record_of_a_new_utc_day_starts_a_new_file(tmp_path: Path) -> None:
    current = tmp_path / "audit.jsonl"
    clock = StepClock(datetime(2026, 12, 4, 23, 59, 57, tzinfo=UTC))
    log = AuditLog(current, clock, node="HOSP", rotation=RotationSettings(None, daily=True))
    emit(log, range(5))  # the clock passes midnight at the second record
    log.close()
    closed, now = trail_files(current)
    assert closed.name == "audit-20261205T000000Z.jsonl"
    assert {r["time"][:10] for r in lines(closed)} == {"2026-12-04"}
    assert {r["time"][:10] for r in lines(now)} == {"2026-12-05"}
    assert verify_trail([closed, now]).records == 5
    # A restart the same day goes on in the same file.
    log = AuditLog(current, clock, node="HOSP", rotation=RotationSettings(None, daily=True))
    emit(log, range(5, 6))
    log.close()
    assert trail_files(current) == [closed, now]


def test_a_rotation_that_cannot_rename_keeps_every_record_and_is_tried_again_later(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    current = tmp_path / "audit.jsonl"
    clock = StepClock(START)
    log = AuditLog(current, clock, node="HOSP", rotation=RotationSettings(500, daily=False))
    refused: list[Path] = []

    def refuse(current: Path, closed: Path) -> None:  # as on a folder made read-only
        refused.append(closed)
        raise PermissionError(13, "Permission denied", str(current))

    monkeypatch.setattr(steps, "close_file", refuse)
    emit(log, range(20))
    assert len(refused) == 1  # tried once, then not again for a while
    assert trail_files(current) == [current]
    assert sent(current) == [f"<{n}@writer>" for n in range(20)]
    monkeypatch.undo()
    clock.at += timedelta(seconds=RETRY_SECONDS)
    emit(log, range(20, 21))
    log.close()
    files = trail_files(current)
    assert len(files) == 2
    assert verify_trail(files).records == 21
    assert sent(current) == [f"<{n}@writer>" for n in range(21)]


@pytest.mark.timeout(60)  # before the fix, the record below waited for the fsync: forever
def test_a_record_written_while_a_failed_rotation_waits_does_not_wait_for_an_fsync(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Until a failed rotation is tried again, the file stays due: a record written
    meanwhile goes on without the lock an fsync holds, so it does not queue behind
    another thread's fsync (a slow disk).  Here the fsync under way waits for that
    record to be written.  The rotation is tried again after the window."""
    current = tmp_path / "audit.jsonl"
    clock = StepClock(START)
    during: list[threading.Thread] = []
    pending: list[Pending] = []

    def sync(fd: int) -> None:  # an fsync under way while another thread writes a record
        if during:
            writer = during.pop()
            writer.start()
            writer.join()
        os.fsync(fd)

    rotation = RotationSettings(500, daily=False)
    log = AuditLog(current, clock, node="HOSP", sync=sync, rotation=rotation)

    def refuse(current: Path, closed: Path) -> None:
        raise PermissionError(13, "Permission denied", str(current))

    monkeypatch.setattr(steps, "close_file", refuse)
    emit(log, range(10))  # due, refused: tried again in RETRY_SECONDS
    event = AuditEvent(EventType.MESSAGE_SENT, peer="lab", message_id="<in-window@writer>")
    during.append(threading.Thread(target=lambda: pending.append(log.emit_later([event]))))
    emit(log, range(10, 11))  # its fsync waits for that record
    [written] = pending
    written.wait()
    assert trail_files(current) == [current]
    monkeypatch.undo()
    clock.at += timedelta(seconds=RETRY_SECONDS)
    emit(log, range(11, 12))
    log.close()
    files = trail_files(current)
    assert len(files) == 2  # tried again after the window: closed
    assert verify_trail(files).records == 13
    ids = [f"<{n}@writer>" for n in range(11)]
    assert sent(current) == [*ids, "<in-window@writer>", "<11@writer>"]


def test_recorded_since_finds_a_record_in_a_closed_file(tmp_path: Path) -> None:
    current = tmp_path / "audit.jsonl"
    log = AuditLog(current, StepClock(START), node="HOSP", rotation=RotationSettings(600, False))
    emit(log, range(6))
    log.close()
    assert len(trail_files(current)) >= 3
    assert recorded_since(current, START, lambda r: r.get("message_id") == "<0@writer>")
    assert not recorded_since(current, START, lambda r: r.get("message_id") == "<9@writer>")


def writer(path: Path, first: int, count: int, keys: tuple[Path, Path], *fault: str) -> int:
    command = [
        *(killed_at(*fault) if fault else ()),
        sys.executable,
        "-m",
        "tests.audit_writer",
        str(path),
        f"--first={first}",
        f"--count={count}",
        "--rotate-bytes=2500",
        f"--start={START.isoformat()}",
        f"--key={keys[0]}",
        f"--cert={keys[1]}",
    ]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run(command, cwd=ROOT, env=env, timeout=120, check=False).returncode


@pytest.mark.parametrize(
    "fault",
    [
        # Sealed and synced, not renamed: the file is still the current one.
        ("--kill-before", "gateway.audit.rotation:close_file"),
        # Renamed, no current file: the trail ends with the closed file.
        ("--kill-after", "gateway.audit.rotation:close_file"),
        # The new file exists, empty, its name not yet synced in the folder.
        ("--kill-before", "gateway.audit.rotation:sync_folder"),
        ("--kill-after", "gateway.audit.rotation:sync_folder"),
    ],
    ids=["before-rename", "after-rename", "before-folder-sync", "after-folder-sync"],
)
def test_a_writer_killed_at_each_step_of_a_rotation_loses_and_repeats_nothing(
    tmp_path: Path, keys: tuple[Path, Path], fault: tuple[str, str]
) -> None:
    current = tmp_path / "audit.jsonl"
    assert writer(current, 0, 100, keys, *fault) == -signal.SIGKILL
    written = sent(current)
    assert written == [f"<{n}@writer>" for n in range(len(written))]  # in order, no repeat
    stopped_at = len(written)  # the record whose emit began the rotation was not written
    assert 0 < stopped_at < 100
    assert writer(current, stopped_at, 30, keys) == 0
    files = trail_files(current)
    assert sent(current) == [f"<{n}@writer>" for n in range(stopped_at + 30)]
    report = verify_trail(files, checkpoint_keys(keys[1]))
    assert report.first_seq == 1 and report.unsealed == 0
    assert all(lines(f) for f in files)  # no empty file is left in the trail


def test_a_daemon_killed_in_the_middle_of_a_rotation_goes_on_with_the_chain(
    layout: DemoLayout, processes: Any, tmp_path: Path, keys: tuple[Path, Path]
) -> None:
    key, cert = openssl_audit_key(tmp_path)
    key.chmod(0o600)
    config = layout.lab.config_path
    config.write_text(
        config.read_text()
        + f'\n[audit]\nsigning_key = "{key}"\ncertificate = "{cert}"\nrotate_mib = 0.01\n'
    )
    trail = layout.lab.audit_log
    # A trail just over the size: the daemon's first record rotates it.
    trail.parent.mkdir(parents=True, exist_ok=True)
    log = AuditLog(trail, StepClock(datetime.now(UTC).replace(microsecond=0)), node="LAB")
    emit(log, range(60))
    log.close()
    assert trail.stat().st_size > 10 * 1024
    killed = processes.start(
        config,
        wait=False,
        prefix=killed_at("--kill-after", KILL_AFTER_RENAME),
    )
    wait_killed(killed)
    assert not trail.exists()  # renamed: killed before the new file was made
    lab = processes.start(config)
    assert lab.stop() == 0
    records = read_audit(trail)
    assert [r["seq"] for r in records] == list(range(1, len(records) + 1))
    assert sent(trail) == [f"<{n}@writer>" for n in range(60)]
    assert [r["event"] for r in records].count("daemon.started") == 1
    ok = medgw("audit", "verify", "--config", config)
    assert ok.returncode == 0, ok.stderr
    assert f"{len(records)} records, hash chain intact" in ok.stdout
    assert "signatures valid" in ok.stdout and "not yet sealed" not in ok.stdout
    closed, _ = trail_files(trail)
    assert ok.stdout.startswith(f"{closed}, {trail}: ")


def test_rotation_keys_alone_need_no_audit_key_and_bad_values_are_named(
    layout: DemoLayout,
) -> None:
    config = layout.lab.config_path
    shipped = config.read_text()
    config.write_text(shipped + "\n[audit]\nrotate_daily = true\nrotate_mib = 64\n")
    loaded = load_config(config)
    assert loaded.audit is None
    assert loaded.audit_rotation == RotationSettings(64 * 1024 * 1024, daily=True)
    for bad, expected in [
        ("rotate_mib = 0.001", "audit.rotate_mib: 0.001 MiB is too small"),
        ("rotate_mib = -1", "audit.rotate_mib: -1 is out of range"),
        ('rotate_daily = "yes"', "audit.rotate_daily"),
        ("rotate_bytes = 1000", "audit.rotate_bytes: unknown key"),
    ]:
        config.write_text(shipped + f"\n[audit]\n{bad}\n")
        result = medgw("check-config", "--config", config)
        assert result.returncode != 0
        assert expected in result.stdout + result.stderr, result.stdout + result.stderr


def test_verify_reads_the_whole_set_and_names_a_missing_or_cut_file_by_the_record_after(
    layout: DemoLayout, keys: tuple[Path, Path]
) -> None:
    config = layout.lab.config_path
    trail = layout.lab.audit_log
    trail.parent.mkdir(parents=True, exist_ok=True)
    log = AuditLog(
        trail,
        StepClock(START),
        node="LAB",
        sealer=sealer(*keys),
        rotation=RotationSettings(2500, daily=False),
    )
    emit(log, range(60))
    log.close()
    files = trail_files(trail)
    assert len(files) >= 4
    total = sum(len(lines(f)) for f in files)
    firsts = [lines(f)[0]["seq"] for f in files]

    def verify() -> subprocess.CompletedProcess[str]:
        return medgw("audit", "verify", "--config", config, "--certificate", keys[1])

    ok = verify()
    assert ok.returncode == 0, ok.stderr
    assert f"{total} records, hash chain intact" in ok.stdout
    assert f"{len(files)} checkpoints, signatures valid" in ok.stdout

    # Records cut off the end of a closed file (its checkpoint with them).
    kept = files[1].read_text().splitlines(keepends=True)
    files[1].write_text("".join(kept[:-2]))
    cut = verify()
    assert cut.returncode == 1
    first = lines(files[2])[0]["seq"]
    assert f"{files[2]}:1: record {first}: chain broken: record {first - 2} expected here" in (
        cut.stderr
    )
    assert f"does not go on from the last of {files[1]}" in cut.stderr
    assert "records were cut off the end of that one" in cut.stderr

    # A whole file removed from the middle.
    files[1].write_text("".join(kept))
    assert verify().returncode == 0
    files[2].unlink()
    gap = verify()
    assert gap.returncode == 1
    after = lines(files[3])[0]["seq"]
    assert f"{files[3]}:1: record {after}: chain broken" in gap.stderr
    assert "a file between them is missing" in gap.stderr

    # The oldest files removed by hand, no record of their disposal: the trail's notes
    # say this gateway wrote them.
    for old in files[:3]:
        old.unlink(missing_ok=True)
    removed = verify()
    assert removed.returncode == 1, removed.stdout
    assert f"BROKEN: {trail}: the trail starts at record {after}, but its notes" in removed.stderr
    begun = firsts[2]  # the newest of the files removed
    assert f"say this gateway wrote a file beginning at record {begun}" in removed.stderr
    assert "a closed audit file was removed outside medgw" in removed.stderr
    assert "recorded in the audit trail as an alert (audit.verification_failed)" in (removed.stderr)
    # Given as files (copies, without their notes), what is left verifies and says where
    # it starts.
    given = medgw(
        "audit",
        "verify",
        *(arg for path in trail_files(trail) for arg in ("--file", path)),
        *("--certificate", keys[1]),
    )
    assert given.returncode == 0, given.stderr
    assert f"starts at record {after}: the files before it were not given" in given.stdout


@pytest.mark.parametrize("rule", ["daily", "size"])
def test_a_command_run_while_the_daemon_is_stopped_rotates_by_the_same_rules(
    layout: DemoLayout, rule: str
) -> None:
    """``medgw queue list`` with the daemon stopped records the read (MNT-1) through a
    writer that closes the current file under the ``[audit]`` rules the daemon's follows:
    at the first record of a new UTC day, and at ``rotate_mib``."""
    config_path = layout.lab.config_path
    now = datetime.now(UTC)
    if rule == "daily":
        start, before = now - timedelta(days=1), 3
    else:
        with config_path.open("a") as handle:
            handle.write("\n[audit]\nrotate_mib = 0.01\nrotate_daily = false\n")
        start, before = now - timedelta(hours=1), 60  # more than 10 KiB of records
    config = load_config(config_path)
    trail = config.storage.audit_log
    log = AuditLog(trail, StepClock(start), node=config.as2_id)  # rotating by neither rule
    emit(log, range(before))
    log.close()
    assert trail_files(trail) == [trail]

    listed = medgw("queue", "list", "--config", config_path)
    assert listed.returncode == 0, listed.stderr
    files = trail_files(trail)
    assert len(files) == 2 and files[-1] == trail, files
    assert [r["message_id"] for r in lines(files[0])] == [f"<{n}@writer>" for n in range(before)]
    [read] = lines(trail)  # the read's record begins the new file, chained on
    assert read["actor"].startswith("operator:") and read["seq"] == before + 1
    assert verify_trail(files, None, None).records == before + 1
