"""A review misses no record of its window when the clock was stepped back (MNT-5).

Trails are written by AuditLog under a clock the test moves (ahead by 45 days and back
again; back by 2 days), in one file or rotated into several, then read by the real
``medgw audit query`` and ``audit patients``, from the log and through the index.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from gateway.audit import AuditEvent, AuditLog, EventType, PatientId
from gateway.audit.files import trail_files
from gateway.audit.order import CLOCK_MARGIN, clock_behind, order_path, ordered, read_notes
from gateway.audit.rotation import RotationSettings
from gateway.demo_run import read_audit
from gateway.pki.demo import DemoLayout
from tests.cli import medgw
from tests.clocks import SetClock
from tests.helpers.audit import wait_for_event

TODAY = datetime(2026, 12, 7, 9, 0, tzinfo=UTC)
PATIENT = PatientId("P0012345", "hl7v2", "1.2.392.200119.6.102", "MR")


def write(log: AuditLog, clock: SetClock, count: int, first: int) -> None:
    """``count`` documents received, one a minute, each naming the patient."""
    for n in range(first, first + count):
        clock.advance(60)
        log.emit(
            AuditEvent(
                EventType.MESSAGE_RECEIVED,
                peer="lab",
                actor="peer:lab",
                message_id=f"<{n}@lab>",
                patient_ids=(PATIENT,),
            )
        )


def trail(tmp_path: Path, rotate: bool, steps: list[tuple[timedelta, int]]) -> list[Path]:
    """A trail written from TODAY with the clock moved by each step's offset from the real
    time before that step's records; a daemon started again (a new AuditLog) each time."""
    path = tmp_path / "audit.jsonl"
    rotation = RotationSettings(max_bytes=20_000, daily=True) if rotate else None
    written = 0
    for offset, count in steps:
        clock = SetClock(TODAY + offset + timedelta(minutes=written))
        log = AuditLog(path, clock, node="HOSP", sync=lambda fd: None, rotation=rotation)
        write(log, clock, count, written)
        log.close()
        written += count
    return trail_files(path)


def day_of(paths: list[Path], day: str) -> list[int]:
    """The seq of every record stamped on ``day``, read from the files line by line."""
    found = []
    for path in paths:
        for line in path.read_text().splitlines():
            record = json.loads(line)
            if record["time"].startswith(day):
                found.append(record["seq"])
    return found


def query(paths: list[Path], *options: str) -> list[int]:
    files = [a for p in paths for a in ("--file", str(p))]
    result = medgw("audit", "query", *files, "--format", "json", *options)
    assert result.returncode == 0, result.stderr
    return [json.loads(line)["seq"] for line in result.stdout.splitlines()]


@pytest.mark.parametrize("rotate", [False, True], ids=["one-file", "rotated"])
def test_a_day_is_found_whole_after_the_clock_ran_45_days_ahead(
    tmp_path: Path, rotate: bool
) -> None:
    paths = trail(
        tmp_path, rotate, [(timedelta(0), 120), (timedelta(days=45), 150), (timedelta(0), 9)]
    )
    assert len(paths) > (3 if rotate else 0)
    day = TODAY.date().isoformat()
    expected = day_of(paths, day)
    assert len(expected) == 129
    window = ("--since", day, "--until", day)
    assert query(paths, *window) == expected
    assert query(paths, *window, "--no-index", "--event", "message.received") == expected
    assert query(paths, *window, "--event", "message.received") == expected  # the index
    assert query(paths, *window, "--patient", "P0012345") == expected
    assert query(paths, *window, "--patient", "P0012345", "--no-index") == expected
    ahead = (TODAY + timedelta(days=45)).date().isoformat()
    assert query(paths, "--since", ahead, "--until", ahead) == day_of(paths, ahead)
    for index in (["--no-index"], []):
        files = [a for p in paths for a in ("--file", str(p))]
        result = medgw(
            "audit", "patients", *files, "--since", day, "--until", day, "--format", "csv", *index
        )
        assert result.returncode == 0, result.stderr
        assert ",129" in result.stdout, result.stdout


@pytest.mark.parametrize("rotate", [False, True], ids=["one-file", "rotated"])
def test_the_days_of_a_clock_two_days_behind_are_found(tmp_path: Path, rotate: bool) -> None:
    paths = trail(
        tmp_path, rotate, [(timedelta(0), 150), (timedelta(days=-2), 7), (timedelta(0), 150)]
    )
    behind = (TODAY - timedelta(days=2)).date().isoformat()
    expected = day_of(paths, behind)
    assert len(expected) == 7
    assert query(paths, "--since", behind, "--until", behind) == expected
    assert (
        query(paths, "--since", behind, "--until", behind, "--event", "message.received")
        == expected
    )
    assert query(paths, "--since", behind, "--until", behind, "--patient", "P0012345") == expected


def test_the_writer_notes_a_step_back_once_and_the_other_files_stay_bisected(
    tmp_path: Path,
) -> None:
    """A clock that stays behind is noted at its first record only; the files without a
    step back are still read by bisection, and a trail written before notes were kept
    (none beside it) is read whole."""
    paths = trail(
        tmp_path, True, [(timedelta(0), 150), (timedelta(days=-2), 150), (timedelta(0), 150)]
    )
    current = tmp_path / "audit.jsonl"
    notes = read_notes(current)
    assert {seq for seq, _ in notes.firsts} == {seqs(p)[0] for p in paths}
    assert notes.steps == (151,)  # not one note per record written while it stayed behind
    in_order = ordered(paths)
    holding = [151 in range(*seqs(p)) for p in paths]
    assert in_order == [not h for h in holding] and any(in_order)
    behind = (TODAY - timedelta(days=2)).date().isoformat()
    order_path(current).unlink()
    assert ordered(paths) == [False] * len(paths)
    assert query(paths, "--since", behind, "--until", behind) == day_of(paths, behind)


def test_notes_vouch_only_for_the_files_whose_first_record_they_name(tmp_path: Path) -> None:
    """A trail put in place of another (a restore) under the other's notes, and a file
    begun before notes were kept, are read whole: their records are all found."""
    old = trail(tmp_path / "old", True, [(timedelta(0), 150)])
    assert all(ordered(old))
    written = trail(
        tmp_path / "new",
        True,
        [(timedelta(seconds=1), 150), (timedelta(days=-2), 7), (timedelta(0), 9)],
    )  # its records are not the old trail's (a second later)
    for path in old:
        path.unlink()
    for path in written:  # the new trail's files in place, the old trail's notes kept
        path.rename(tmp_path / "old" / path.name)
    restored = trail_files(tmp_path / "old" / "audit.jsonl")
    assert ordered(restored) == [False] * len(restored)
    behind = (TODAY - timedelta(days=2)).date().isoformat()
    expected = day_of(restored, behind)
    assert len(expected) == 7
    assert query(restored, "--since", behind, "--until", behind) == expected

    begun = tmp_path / "begun" / "audit.jsonl"  # written by a version that kept no notes
    begun.parent.mkdir()
    restored[-1].rename(begun)  # (its notes left behind)
    log = AuditLog(begun, SetClock(TODAY + timedelta(days=1)), node="HOSP", sync=lambda fd: None)
    log.emit(AuditEvent(EventType.DAEMON_STARTED))
    log.close()
    assert ordered([begun]) == [False]


def seqs(path: Path) -> tuple[int, int]:
    lines = path.read_text().splitlines()
    return json.loads(lines[0])["seq"], json.loads(lines[-1])["seq"] + 1


def test_verify_names_the_records_whose_time_goes_back_and_keeps_the_chain_intact(
    tmp_path: Path,
) -> None:
    paths = trail(
        tmp_path,
        True,
        [(timedelta(0), 20), (timedelta(days=45), 20), (timedelta(0), 20), (timedelta(days=-2), 5)],
    )
    files = [a for p in paths for a in ("--file", str(p))]
    result = medgw("audit", "verify", *files)
    assert result.returncode == 0, result.stderr
    assert "65 records, hash chain intact" in result.stdout
    warning = next(line for line in result.stdout.splitlines() if "clock was set back" in line)
    assert "2 record(s) stamped more than 10 minutes before the latest record before them" in (
        warning
    )
    assert "record 41 (" in warning and "stamped 2026-12-07T09:41:00" in warning
    assert "after 2027-01-21T" in warning  # 45 days ahead
    assert "record 61 (" in warning and "stamped 2026-12-05T" in warning
    assert "fix: check the host's clock" in warning
    in_order = medgw("audit", "verify", "--file", str(paths[0]))
    assert in_order.returncode == 0 and "set back" not in in_order.stdout


def test_a_daemon_started_with_its_clock_behind_the_trail_alerts_and_serves(
    layout: DemoLayout, processes: Any
) -> None:
    """The trail's last records were written with the clock 45 days ahead; the daemon,
    started on the real clock, records clock.behind_trail (an alert naming both times and
    the fix), starts, and today's records are found by a query for today."""
    trail = layout.hospital.audit_log
    ahead = datetime.now(UTC) + timedelta(days=45)
    log = AuditLog(trail, SetClock(ahead), node="SAKURA-HOSPITAL", sync=lambda fd: None)
    log.emit(AuditEvent(EventType.DAEMON_STARTED))
    log.emit(AuditEvent(EventType.DAEMON_STOPPED))
    log.close()

    processes.start(layout.hospital.config_path)
    started = wait_for_event(trail, "daemon.started", where=lambda r: r["seq"] > 2)
    records = read_audit(trail)
    alert = next(r for r in records if r["event"] == "clock.behind_trail")
    assert alert["severity"] == "alert" and alert["seq"] < started["seq"]
    assert alert["detail"]["last_record"] == ahead.isoformat(timespec="microseconds")
    assert alert["detail"]["behind_seconds"] > 44 * 86400
    reason = alert["reason"]
    assert reason.startswith("this host's clock (") and "is 44 days behind" in reason
    assert f"last record ({ahead.isoformat(timespec='seconds')})" in reason
    assert "fix: check the host's clock and its time source" in reason
    assert alert["call"]  # whom to call, as for every alert

    today = started["time"][:10]
    found = medgw(
        "audit", "query", "--config", layout.hospital.config_path, "--format", "json",
        "--since", today, "--until", today,
    )  # fmt: skip
    assert found.returncode == 0, found.stderr
    seqs = [json.loads(line)["seq"] for line in found.stdout.splitlines()]
    assert alert["seq"] in seqs and started["seq"] in seqs


def test_a_clock_behind_by_the_margin_or_less_is_no_alert() -> None:
    last = datetime(2026, 12, 7, 9, 0, tzinfo=UTC)
    assert clock_behind(None, last) is None
    assert clock_behind(last, last - CLOCK_MARGIN) is None
    assert clock_behind(last, last + timedelta(days=1)) is None
    behind = clock_behind(last, last - CLOCK_MARGIN - timedelta(seconds=1))
    assert behind is not None and behind.detail["behind_seconds"] == 601
    assert "10 minutes behind" in str(behind.reason)


def test_rotation_goes_on_with_the_clock_behind_the_last_closed_file(tmp_path: Path) -> None:
    """The clock set back 2 days after a file was closed at midnight: the files closed
    while it stays behind are named one second after the last one closed (unique, and
    listed in the trail's order), none grows past its size, and the chain verifies."""
    current = tmp_path / "audit.jsonl"
    clock = SetClock(datetime(2026, 12, 6, 23, 30, tzinfo=UTC))
    rotation = RotationSettings(max_bytes=20_000, daily=True)
    log = AuditLog(current, clock, node="HOSP", sync=lambda fd: None, rotation=rotation)
    write(log, clock, 40, 0)  # past midnight: the first file is closed then
    [midnight] = trail_files(current)[:-1]
    assert midnight.name == "audit-20261207T000000Z.jsonl"
    clock.at -= timedelta(days=2)
    write(log, clock, 300, 40)
    log.close()
    files = trail_files(current)
    behind = [p.name for p in files[1:-1]]
    assert behind == [f"audit-20261207T0000{n:02}Z.jsonl" for n in range(1, len(behind) + 1)]
    assert len(behind) >= 5
    assert all(p.stat().st_size < 20_000 + 1000 for p in files)  # closed at the first record over
    chain = [json.loads(line)["seq"] for p in files for line in p.read_text().splitlines()]
    assert chain == list(range(1, 341))  # the names list the files in the chain's order
    result = medgw("audit", "verify", *[a for p in files for a in ("--file", str(p))])
    assert result.returncode == 0, result.stderr
    assert "340 records, hash chain intact" in result.stdout
    assert ordered(files) == [41 not in range(*seqs(p)) for p in files]  # 41: stepped back


def test_a_note_torn_by_a_crash_does_not_swallow_the_next_one(tmp_path: Path) -> None:
    """A crash while a note was written leaves part of a line (its record was never
    written); the next writer begins on a line of its own, so the step back it notes is
    kept and the day behind is found whole."""
    current = tmp_path / "audit.jsonl"
    trail(tmp_path, True, [(timedelta(0), 150)])
    notes = order_path(current)
    with notes.open("ab") as handle:
        handle.write(b'{"seq":151,"time":"2026-12-')  # torn
    clock = SetClock(TODAY - timedelta(days=2))
    rotation = RotationSettings(max_bytes=20_000, daily=True)
    log = AuditLog(current, clock, node="HOSP", sync=lambda fd: None, rotation=rotation)
    write(log, clock, 7, 150)
    log.close()
    assert read_notes(current).steps == (151,)
    paths = trail_files(current)
    behind = (TODAY - timedelta(days=2)).date().isoformat()
    expected = day_of(paths, behind)
    assert len(expected) == 7
    assert query(paths, "--since", behind, "--until", behind) == expected
