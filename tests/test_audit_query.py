"""``medgw audit query`` and ``medgw audit patients`` (MNT-5) on real audit logs, written
by AuditLog, with records that name patients and actors and older ones that do not."""

from __future__ import annotations

import csv
import io
import json
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from gateway.audit import AuditEvent, AuditLog, EventType, PatientId
from gateway.audit.query import Filters, accesses, records
from tests.cli import medgw
from tests.clocks import TickingClock

START = datetime(2026, 11, 1, 0, 0, tzinfo=UTC)


class SteppingClock(TickingClock):
    def __init__(self, step: timedelta) -> None:
        super().__init__(START)
        self.step = step

    def now(self) -> datetime:
        self.at += self.step
        return self.at


def patient(pid: str, authority: str | None = "1.2.392.200119.6.102") -> PatientId:
    return PatientId(pid, "hl7v2", authority, "MR")


@pytest.fixture()
def trail(tmp_path: Path) -> Path:
    """One record an hour from 2026-11-01 01:00 for 20 days, plus the shapes of old records."""
    path = tmp_path / "audit.jsonl"
    log = AuditLog(path, SteppingClock(timedelta(hours=1)), node="HOSP", sync=lambda fd: None)
    for n in range(480):
        kind = n % 4
        if kind == 0:  # an older record: no actor, no patients
            log.emit(AuditEvent(EventType.MESSAGE_SENT, peer="lab", message_id=f"<{n}@x>"))
        elif kind == 1:
            log.emit(
                AuditEvent(
                    EventType.MESSAGE_RECEIVED,
                    peer="lab",
                    actor="peer:lab",
                    message_id=f"<{n}@x>",
                    patient_ids=(patient("P001"), patient("P002")),
                )
            )
        elif kind == 2:
            log.emit(
                AuditEvent(
                    EventType.MESSAGE_ACCEPTED,
                    peer="pharmacy",
                    actor="api:ris",
                    message_id=f"<{n}@x>",
                    patient_ids=(patient("P001"),),
                )
            )
        else:  # the shape a record may have in detail, ids as plain strings
            log.emit(
                AuditEvent(
                    EventType.PEER_SUSPENDED,
                    peer="pharmacy",
                    detail={"actor": "operator:sato (uid 1001)", "patient_ids": ["P003"]},
                )
            )
    log.close()
    return path


def brute(path: Path, keep: object) -> list[int]:
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    return [r["seq"] for r in lines if keep(r)]  # type: ignore[operator]


def test_query_lists_a_window_in_time_order_as_a_table(trail: Path) -> None:
    result = medgw(
        "audit", "query", "--file", trail, "--since", "2026-11-03T00:00", "--until", "2026-11-03"
    )
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].split()[:4] == ["TIME", "SEQ", "EVENT", "OUTCOME"]
    assert len(lines) == 1 + 24  # the whole day of 2026-11-03, one record an hour
    assert lines[1].startswith("2026-11-03T00:00:00+00:00 48 ")
    assert lines[-1].startswith("2026-11-03T23:00:00+00:00 71 ")
    received = next(line for line in lines if "message.received" in line)
    assert "peer:lab" in received and "1.2.392.200119.6.102^P001" in received


def test_query_filters_by_patient_peer_actor_and_event_and_reads_old_records(
    trail: Path,
) -> None:
    def query(*args: str) -> list[int]:
        result = medgw("audit", "query", "--file", trail, "--format", "json", *args)
        assert result.returncode == 0, result.stderr
        return [json.loads(line)["seq"] for line in result.stdout.splitlines()]

    window = ("--since", "2026-11-02T05:00:00+00:00", "--until", "2026-11-05T10:00:00+00:00")
    low, high = START + timedelta(days=1, hours=5), START + timedelta(days=4, hours=10)

    def within(r: dict[str, object]) -> bool:
        return low <= datetime.fromisoformat(str(r["time"])) < high

    assert query(*window, "--patient", "P001") == brute(
        trail, lambda r: within(r) and r["event"] in ("message.received", "message.accepted")
    )
    assert query(*window, "--patient", "P003") == brute(
        trail, lambda r: within(r) and r["event"] == "peer.suspended"
    )
    assert query(*window, "--actor", "operator:sato (uid 1001)") == query(
        *window, "--patient", "P003"
    )
    assert query(*window, "--peer", "lab", "--event", "message.sent") == brute(
        trail, lambda r: within(r) and r["event"] == "message.sent"
    )
    assert query("--patient", "P00") == []  # whole identifiers, not parts
    assert len(query()) == 480


def test_query_as_csv(trail: Path) -> None:
    result = medgw(
        "audit", "query", "--file", trail, "--format", "csv", "--patient", "P002",
        "--until", "2026-11-01T06:00Z",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    rows = list(csv.DictReader(io.StringIO(result.stdout)))
    assert [r["seq"] for r in rows] == ["2"]
    assert rows[0]["actor"] == "peer:lab" and rows[0]["event"] == "message.received"
    assert rows[0]["patients"] == "1.2.392.200119.6.102^P001 1.2.392.200119.6.102^P002"


def test_patients_counts_accesses_per_patient_and_actor(trail: Path) -> None:
    result = medgw(
        "audit", "patients", "--file", trail, "--since", "2026-11-02", "--until", "2026-11-02",
        "--format", "json",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    rows = [json.loads(line) for line in result.stdout.splitlines()]
    # 24 records on 2026-11-02: 6 of each kind
    assert rows == [
        {
            "patient": "P001",
            "authority": "1.2.392.200119.6.102",
            "accesses": 12,
            "actors": [{"actor": "api:ris", "accesses": 6}, {"actor": "peer:lab", "accesses": 6}],
        },
        {
            "patient": "P002",
            "authority": "1.2.392.200119.6.102",
            "accesses": 6,
            "actors": [{"actor": "peer:lab", "accesses": 6}],
        },
        {
            "patient": "P003",
            "authority": "",
            "accesses": 6,
            "actors": [{"actor": "operator:sato (uid 1001)", "accesses": 6}],
        },
    ]
    table = medgw("audit", "patients", "--file", trail, "--since", "2026-11-02", "--until",
                  "2026-11-02")  # fmt: skip
    assert table.stdout.splitlines()[1].split() == [
        "P001", "1.2.392.200119.6.102", "12", "api:ris", "6,", "peer:lab", "6",
    ]  # fmt: skip


def test_the_window_is_found_in_a_large_log_as_a_full_scan_finds_it(tmp_path: Path) -> None:
    """Bisection over a log much larger than its read blocks, with the clock set back
    once by five minutes (within the margin allowed): the same records as reading all."""
    path = tmp_path / "audit.jsonl"
    clock = SteppingClock(timedelta(seconds=7))
    log = AuditLog(path, clock, node="HOSP", sync=lambda fd: None)
    for n in range(6000):
        if n == 3000:
            clock.at -= timedelta(minutes=5)
        log.emit(AuditEvent(EventType.MESSAGE_SENT, peer="lab", message_id=f"<{n}@x>"))
    log.close()
    assert path.stat().st_size > 8 * 65536
    for low, high in ((2990, 3010), (100, 200), (5900, 6100), (0, 10)):
        since, until = START + timedelta(seconds=7 * low), START + timedelta(seconds=7 * high)
        found = [r["seq"] for r in records([path], Filters(since, until))]
        expected = brute(
            path,
            lambda r, a=since, b=until: a <= datetime.fromisoformat(str(r["time"])) < b,
        )
        assert found == expected and found, (low, high)


def test_a_bad_time_is_refused_naming_the_option(trail: Path) -> None:
    result = medgw("audit", "query", "--file", trail, "--since", "yesterday")
    assert result.returncode == 2
    assert "--since" in result.stderr and "'yesterday' is not an ISO 8601" in result.stderr


def test_a_patient_query_includes_every_record_about_the_patients_documents(
    tmp_path: Path,
) -> None:
    path = tmp_path / "audit.jsonl"
    log = AuditLog(path, SteppingClock(timedelta(hours=1)), node="HOSP", sync=lambda fd: None)
    tricky = 'a"b\\c@x'  # a message ID that needs escaping in JSON
    for message_id, patients in ((tricky, (patient("P9"),)), ("<other@x>", (patient("P8"),))):
        log.emit(
            AuditEvent(
                EventType.MESSAGE_ACCEPTED,
                peer="lab",
                actor="api:ris",
                message_id=message_id,
                patient_ids=patients,
            )
        )
    for message_id in (tricky, "<other@x>"):
        log.emit(AuditEvent(EventType.MESSAGE_SENT, peer="lab", message_id=message_id))
    # the same message ID from another peer is another document
    log.emit(AuditEvent(EventType.MESSAGE_RECEIVED, peer="clinic", message_id=tricky))
    log.emit(
        AuditEvent(
            EventType.MESSAGE_RETRIED,
            peer="lab",
            message_id=tricky,
            actor="operator:sato (uid 1001)",
        )
    )
    log.close()
    # 2026-11-01T03:00 onwards: the patient is named only before the window
    result = medgw(
        "audit", "query", "--file", path, "--patient", "P9", "--since", "2026-11-01T03:00",
        "--format", "json",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    found = [json.loads(line) for line in result.stdout.splitlines()]
    assert [(r["event"], r["message_id"]) for r in found] == [
        ("message.sent", tricky),
        ("message.retried", tricky),
    ]
    by_actor = medgw(
        "audit", "query", "--file", path, "--patient", "P9", "--actor",
        "operator:sato (uid 1001)", "--format", "json",
    )  # fmt: skip
    assert [json.loads(line)["seq"] for line in by_actor.stdout.splitlines()] == [6]

    counted = medgw("audit", "patients", "--file", path, "--format", "csv")
    assert counted.returncode == 0, counted.stderr
    assert counted.stdout.splitlines() == [
        "patient,authority,actor,accesses",
        "P9,1.2.392.200119.6.102,(none),1",  # message.sent: the gateway's own work
        "P9,1.2.392.200119.6.102,api:ris,1",
        "P9,1.2.392.200119.6.102,operator:sato (uid 1001),1",
        "P8,1.2.392.200119.6.102,(none),1",
        "P8,1.2.392.200119.6.102,api:ris,1",
    ]
    # the documents remembered are bounded: with room for one, the first is forgotten
    rows, forgot = accesses([path], Filters(), limit=1)
    assert forgot and [(r.patient, r.total) for r in rows] == [("P8", 2), ("P9", 1)]


def test_a_document_is_linked_to_its_patient_for_31_days_before_the_window(
    tmp_path: Path,
) -> None:
    path = tmp_path / "audit.jsonl"
    log = AuditLog(path, SteppingClock(timedelta(days=20)), node="HOSP", sync=lambda fd: None)
    for n in range(2):  # 2026-11-21 and 2026-12-11
        log.emit(
            AuditEvent(
                EventType.MESSAGE_ACCEPTED,
                peer="lab",
                message_id=f"<{n}@x>",
                patient_ids=(patient("P7"),),
            )
        )
    for n in range(2):  # both read on 2026-12-31 and 2027-01-20
        log.emit(AuditEvent(EventType.MESSAGE_VIEWED, peer="lab", message_id=f"<{n}@x>"))
    log.close()
    found = medgw(
        "audit", "query", "--file", path, "--patient", "P7", "--since", "2027-01-20",
        "--format", "json",
    )  # fmt: skip
    assert found.returncode == 0, found.stderr
    # <1@x> was named 40 days before the window: too long ago to be linked
    assert [json.loads(line)["message_id"] for line in found.stdout.splitlines()] == []
    found = medgw(
        "audit", "query", "--file", path, "--patient", "P7", "--since", "2026-12-20",
        "--format", "json",
    )  # fmt: skip
    assert [json.loads(line)["message_id"] for line in found.stdout.splitlines()] == [
        "<0@x>",
        "<1@x>",
    ]
