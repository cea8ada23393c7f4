"""The audit export follows a rotated trail: its cursor names a file by its first record,
so reading goes on to the end of a renamed file and into the next one; nothing is
skipped or sent twice, also across a daemon restart, checked at a real rsyslog collector."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path

from gateway.audit import AuditEvent, AuditLog, EventType
from gateway.audit.export.cursor import (
    Broken,
    Position,
    end_position,
    load_position,
    read_forward,
    save_position,
    skip_to,
    waiting_bytes,
)
from gateway.audit.files import trail_files
from gateway.audit.rotation import RotationSettings
from gateway.demo_run import drop_file, read_audit, wait_until
from gateway.pki.demo import DemoLayout
from tests.audit_writer import StepClock
from tests.helpers.audit_export import export_to, first_seen
from tests.rsyslog import Collector

START = datetime(2026, 12, 5, 1, 0, tzinfo=UTC)


def write(path: Path, numbers: range, rotate_bytes: int = 1200) -> None:
    log = AuditLog(
        path,
        StepClock(START.replace(minute=numbers.start % 60)),
        node="HOSP",
        rotation=RotationSettings(rotate_bytes, daily=False),
    )
    for n in numbers:
        log.emit(AuditEvent(EventType.MESSAGE_SENT, peer="lab", message_id=f"<{n}@x>"))
    log.close()


def read_all(path: Path, start: Position, batch: int = 4) -> tuple[list[int], Position]:
    """Every record after ``start``, ``batch`` at a time, as the exporter reads them."""
    broken: list[Broken] = []
    seqs: list[int] = []
    position = start
    while reads := read_forward(path, position, batch, broken.append):
        seqs += [r.record["seq"] for r in reads]
        position = reads[-1].after
    assert broken == []
    return seqs, position


def test_the_cursor_goes_on_from_a_renamed_file_into_the_next(tmp_path: Path) -> None:
    current = tmp_path / "audit.jsonl"
    write(current, range(3))
    seqs, position = read_all(current, Position())
    assert seqs == [1, 2, 3] and position.file == 1
    write(current, range(3, 30))  # the file the cursor is in is renamed, others follow
    assert len(trail_files(current)) >= 4
    assert waiting_bytes(current, position) == sum(
        f.stat().st_size for f in trail_files(current)
    ) - (position.offset)
    saved = tmp_path / "cursor.json"
    save_position(saved, position)
    reloaded = load_position(saved)
    assert reloaded == position
    seqs, position = read_all(current, reloaded)
    assert seqs == list(range(4, 31))
    assert position == end_position(current)
    assert waiting_bytes(current, position) == 0
    assert read_forward(current, position, 10, lambda b: None) == []


def test_a_cursor_written_before_rotation_existed_reads_on_in_the_current_file(
    tmp_path: Path,
) -> None:
    current = tmp_path / "audit.jsonl"
    write(current, range(5), rotate_bytes=1 << 30)
    after_two = read_forward(current, Position(), 2, lambda b: None)[-1].after
    saved = tmp_path / "cursor.json"
    saved.write_text(json.dumps({"seq": 2, "offset": after_two.offset, "hash": after_two.hash}))
    legacy = load_position(saved)
    assert legacy is not None and legacy.file == 0
    assert read_all(current, legacy)[0] == [3, 4, 5]


def test_skipping_to_the_last_bytes_of_the_trail_crosses_files(tmp_path: Path) -> None:
    current = tmp_path / "audit.jsonl"
    write(current, range(30))
    files = trail_files(current)
    keep = current.stat().st_size + files[-2].stat().st_size // 2
    found = skip_to(current, keep)
    assert found is not None
    position, record = found
    first_of_closed = json.loads(files[-2].read_text().splitlines()[0])["seq"]
    assert position.file == first_of_closed and record["seq"] > first_of_closed
    assert read_all(current, position)[0] == list(range(record["seq"], 31))


def test_a_file_missing_from_the_middle_is_reported_while_exporting(tmp_path: Path) -> None:
    current = tmp_path / "audit.jsonl"
    write(current, range(30))
    files = trail_files(current)
    files[1].unlink()
    broken: list[Broken] = []
    position = Position()
    while reads := read_forward(current, position, 50, broken.append):
        position = reads[-1].after
    assert [b.path for b in broken] == [files[2]]
    assert "chain broken before record" in broken[0].why


def test_every_record_reaches_the_collector_once_across_rotations_and_a_restart(
    layout: DemoLayout, processes, collector: Collector
) -> None:
    export_to(layout, collector)
    with layout.hospital.config_path.open("a") as handle:
        handle.write("\n[audit]\nrotate_mib = 0.01\n")  # a file every ~25 records
    collector.start()
    hospital = processes.start(layout.hospital.config_path)
    processes.start(layout.lab.config_path)
    outbox = layout.lab.outbox_for(layout.hospital)
    trail = layout.hospital.audit_log

    def delivered() -> int:
        return sum(r["event"] == "message.delivered" for r in read_audit(trail))

    def send(names: range) -> None:
        for number in names:
            drop_file(outbox, f"doc-{number}.txt", f"document {number}\n".encode())

    send(range(0, 8))
    wait_until(lambda: delivered() >= 8, 120, "8 deliveries")
    assert hospital.stop() == 0
    send(range(8, 12))  # wait at the lab while the hospital is down
    hospital = processes.start(layout.hospital.config_path)
    wait_until(lambda: delivered() >= 12, 120, "12 deliveries")
    assert hospital.stop() == 0

    records = read_audit(trail)
    assert len(trail_files(trail)) >= 3  # two rotations at least (one a second at most)
    started = next(r["seq"] for r in records if r["event"] == "daemon.started")
    expected = [r["seq"] for r in records if r["seq"] >= started]
    assert expected == list(range(started, records[-1]["seq"] + 1))

    def complete() -> list[int] | None:
        got = [r.seq for r in collector.received()]
        return got if set(expected) <= set(got) else None

    received = wait_until(complete, 60, "every record at the collector")
    assert first_seen(collector.received()) == expected  # in order, nothing skipped
    assert len(received) == len(expected)  # nothing sent twice: no break, clean restart
    events = {r["event"] for r in records}
    assert "audit.verification_failed" not in events
