"""The index beside each audit log file (gateway.audit.index): the same answers as reading
the log, rebuilt when missing, stale or corrupt, and unable to make a review show a record
that is not in the log or that does not match.  Trails are written by the real AuditLog."""

from __future__ import annotations

import random
import sqlite3
import tempfile
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gateway.audit import AuditEvent, AuditLog, EventType, PatientId
from gateway.audit import index as audit_index
from gateway.audit.files import trail_files
from gateway.audit.query import Filters, PatientAccesses, accesses, records
from gateway.audit.rotation import RotationSettings
from gateway.retention.audit_files import AuditFiles
from tests.audit_writer import StepClock
from tests.cli import medgw
from tests.clocks import TickingClock

START = datetime(2026, 1, 1, tzinfo=UTC)
PEERS = ("lab", "clinic", "pharmacy")
ACTORS = ("api:ris", "peer:lab", "operator:sato (uid 1001)", "medgw")
EVENTS = (
    EventType.MESSAGE_ACCEPTED,
    EventType.MESSAGE_SENT,
    EventType.MESSAGE_RECEIVED,
    EventType.MESSAGE_VIEWED,
    EventType.PEER_SUSPENDED,
)
PATIENTS = ("P1", "P2", "P3", "P4")


class SteppingClock(TickingClock):
    """A clock that moves on by a random step per record, sometimes back a little (as a
    clock corrected by NTP: within the 10 minutes a review allows for)."""

    def __init__(self, rng: random.Random) -> None:
        super().__init__(START)
        self.rng = rng

    def now(self) -> datetime:
        if self.rng.random() < 0.05:
            self.at -= timedelta(minutes=self.rng.randrange(1, 9))
        else:
            self.at += timedelta(hours=self.rng.choice((1, 3, 12, 30, 100)))
        return self.at


def write_trail(folder: Path, seed: int, count: int, files: int) -> list[Path]:
    """``count`` random records (documents named by their first record or later, reads,
    old-shaped records with actor and patients in ``detail``), cut into ``files`` files
    as rotation would."""
    rng = random.Random(seed)
    whole = folder / "whole.jsonl"
    log = AuditLog(whole, SteppingClock(rng), node="HOSP", sync=lambda fd: None)
    for _ in range(count):
        patients = tuple(
            PatientId(p, "hl7v2", rng.choice(("1.2.392.1", None)), "MR")
            for p in rng.sample(PATIENTS, rng.choice((0, 0, 1, 2)))
        )
        message = rng.choice((None, *(f"<{n}@x>" for n in range(12)), 'a"b\\c'))
        if rng.random() < 0.1:  # the shape of older records
            detail = {"actor": rng.choice(ACTORS), "patient_ids": [p.id for p in patients]}
            log.emit(AuditEvent(EventType.PEER_SUSPENDED, peer=rng.choice(PEERS), detail=detail))
            continue
        log.emit(
            AuditEvent(
                rng.choice(EVENTS),
                peer=rng.choice((*PEERS, None)),
                actor=rng.choice((*ACTORS, None)),
                message_id=message,
                patient_ids=patients,
            )
        )
    log.close()
    lines = whole.read_bytes().splitlines(keepends=True)
    cuts = sorted(rng.sample(range(1, len(lines)), files - 1)) if files > 1 else []
    paths = []
    for number, (low, high) in enumerate(zip([0, *cuts], [*cuts, len(lines)], strict=True)):
        path = folder / f"audit-{number}.jsonl"
        path.write_bytes(b"".join(lines[low:high]))
        paths.append(path)
    whole.unlink()
    return paths


def random_filters(rng: random.Random) -> Filters:
    def maybe(values: tuple[str, ...]) -> str | None:
        return rng.choice(values) if rng.random() < 0.4 else None

    since = START + timedelta(days=rng.uniform(0, 200)) if rng.random() < 0.8 else None
    until = since + timedelta(days=rng.uniform(0, 90)) if since and rng.random() < 0.8 else None
    return Filters(
        since,
        until,
        maybe((*PATIENTS, "P")),
        maybe((*PEERS, "nobody")),
        maybe(ACTORS),
        maybe(tuple(e.value for e in EVENTS)),
        with_patients=rng.random() < 0.1,
    )


def indexed_accesses(paths: list[Path], window: Filters) -> tuple[list[PatientAccesses], bool]:
    rows, forgot = audit_index.accesses(paths, window)
    return list(rows), forgot


@settings(max_examples=30, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 2**32), count=st.integers(1, 400), files=st.integers(1, 3))
def test_the_index_finds_and_counts_what_reading_the_log_does(
    seed: int, count: int, files: int
) -> None:
    with tempfile.TemporaryDirectory() as folder:
        paths = write_trail(Path(folder), seed, min(count, 400), files if count > 3 else 1)
        rng = random.Random(seed)
        for _ in range(12):
            filters = random_filters(rng)
            assert list(audit_index.records(paths, filters)) == list(records(paths, filters)), (
                filters
            )
            window = Filters(filters.since, filters.until)
            assert indexed_accesses(paths, window) == accesses(paths, window), window


@pytest.fixture()
def trail(tmp_path: Path) -> Path:
    return write_trail(tmp_path, 7, 600, 1)[0]


def review(trail: Path, *args: str) -> list[str]:
    result = medgw("audit", "query", "--file", trail, "--format", "json", *args)
    assert result.returncode == 0, result.stderr
    return result.stdout.splitlines()


def patients_report(trail: Path) -> list[str]:
    result = medgw("audit", "patients", "--file", trail, "--format", "csv")
    assert result.returncode == 0, result.stderr
    return result.stdout.splitlines()


def test_the_command_builds_the_index_and_answers_as_without_it(trail: Path) -> None:
    index = audit_index.index_path(trail)
    assert not index.exists()
    found = review(trail, "--patient", "P1")
    assert index.exists() and found
    assert found == review(trail, "--patient", "P1", "--no-index")
    assert (
        patients_report(trail)
        == medgw(
            "audit", "patients", "--file", trail, "--format", "csv", "--no-index"
        ).stdout.splitlines()
    )
    assert index.stat().st_mode & 0o007 == 0  # it names patients: no other user reads it


def test_records_written_after_the_index_was_built_are_found(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    clock = TickingClock(START)
    log = AuditLog(path, clock, node="HOSP", sync=lambda fd: None)
    viewed = AuditEvent(EventType.MESSAGE_VIEWED, peer="lab", actor="operator:sato (uid 1001)")
    log.emit(viewed)
    assert len(review(path, "--event", "message.viewed")) == 1
    log.emit(viewed)
    log.emit(AuditEvent(EventType.MESSAGE_SENT, peer="lab"))
    with path.open("ab") as handle:
        handle.write(b'{"event":"message.viewed","time":"2026-01-01')  # being written: not yet
    assert len(review(path, "--event", "message.viewed")) == 2
    log.close()


@pytest.mark.parametrize(
    "damage",
    [
        "delete",  # removed: built again
        "garbage",  # not a database
        "truncate",  # cut short by a crash
        "version",  # written by another version
    ],
)
def test_a_missing_or_corrupt_index_is_built_again(trail: Path, damage: str) -> None:
    expected = review(trail, "--patient", "P2", "--no-index")
    counted = patients_report(trail)
    index = audit_index.index_path(trail)
    if damage == "delete":
        index.unlink()
    elif damage == "garbage":
        index.write_bytes(b"not an index " * 1000)
    elif damage == "truncate":
        index.write_bytes(index.read_bytes()[:5000])
    else:
        with sqlite3.connect(index) as db:
            db.execute("UPDATE meta SET value = '0' WHERE key = 'version'")
    assert review(trail, "--patient", "P2") == expected
    assert patients_report(trail) == counted
    with sqlite3.connect(index) as db:
        assert db.execute("SELECT value FROM meta WHERE key='version'").fetchone() == ("1",)


def test_a_log_replaced_or_cut_short_gets_its_index_built_again(tmp_path: Path) -> None:
    first, second = write_trail(tmp_path, 1, 300, 1)[0], write_trail(tmp_path / "b", 2, 300, 1)
    review(first, "--actor", "api:ris")  # indexed
    first.write_bytes(second[0].read_bytes())  # restored from another copy: same name
    assert review(first, "--actor", "api:ris") == review(first, "--actor", "api:ris", "--no-index")
    lines = first.read_bytes().splitlines(keepends=True)
    first.write_bytes(b"".join(lines[:100]))  # cut short
    assert review(first, "--actor", "api:ris") == review(first, "--actor", "api:ris", "--no-index")


def _tamper(index: Path, sql: str, *args: object) -> None:
    with sqlite3.connect(index) as db:
        assert db.execute(sql, args).rowcount >= 1


def test_a_tampered_index_shows_no_record_that_is_not_in_the_log_or_does_not_match(
    trail: Path,
) -> None:
    lines = trail.read_bytes().splitlines(keepends=True)
    expected = review(trail, "--patient", "P3", "--no-index")
    viewed = review(trail, "--event", "message.viewed", "--no-index")
    index = audit_index.index_path(trail)
    review(trail, "--patient", "P3")
    other = next(
        n for n, line in enumerate(lines) if b'"P3"' not in line and b"message.viewed" not in line
    )
    offset = sum(len(line) for line in lines[:other])
    with sqlite3.connect(index) as db:
        named = db.execute(
            "SELECT offset FROM records WHERE pset IN "
            "(SELECT pset FROM members WHERE patient = 'P3') LIMIT 1"
        ).fetchone()[0]
        viewed_id = db.execute("SELECT id FROM names WHERE value = 'message.viewed'").fetchone()[0]
    # a record of another patient given P3's patients: read from the log, it does not match
    _tamper(index, "UPDATE records SET pset = (SELECT pset FROM records WHERE offset = ?) "
            "WHERE offset = ?", named, offset)  # fmt: skip
    # a record said to be another event
    _tamper(index, "UPDATE records SET event = ? WHERE offset = ?", viewed_id, offset)
    assert review(trail, "--patient", "P3") == expected
    assert review(trail, "--event", "message.viewed") == viewed
    # a row pointing into the middle of a line, at a piece that is valid JSON
    _tamper(
        index,
        "INSERT INTO records SELECT offset + 1, length - 1, hash, time, ?, actor, peer, "
        "document, pset FROM records WHERE offset = ?",
        viewed_id,
        offset,
    )
    assert review(trail, "--event", "message.viewed") == viewed
    # rows moved: checked against the log before anything is shown, the index is rebuilt
    _tamper(index, "UPDATE records SET offset = ? WHERE offset = ?", offset + 10**9, named)
    _tamper(index, "UPDATE records SET offset = ? WHERE offset = ?", named, offset)
    assert review(trail, "--patient", "P3") == expected
    # a hash changed: the line no longer carries it; the index is built again
    _tamper(index, "UPDATE records SET hash = X'0000000000000000' WHERE pset IS NOT NULL")
    assert review(trail, "--patient", "P3") == expected
    with sqlite3.connect(index) as db:  # built again from the log
        zeros = "SELECT count(*) FROM records WHERE hash = X'0000000000000000'"
        assert db.execute(zeros).fetchone() == (0,)


def test_an_index_that_cannot_be_written_is_done_without(trail: Path) -> None:
    audit_index.index_path(trail).mkdir()  # in its place, something it cannot replace
    result = medgw("audit", "query", "--file", trail, "--patient", "P1", "--format", "json")
    assert result.returncode == 0, result.stderr
    assert "reading the log without it" in result.stderr and "--no-index" in result.stderr
    assert result.stdout.splitlines() == review(trail, "--patient", "P1", "--no-index")


def test_patient_identifiers_stay_out_of_what_the_review_says_besides_its_answer(
    trail: Path,
) -> None:
    """Building, updating and rebuilding the index say nothing on stderr, and an error about
    the index names the file, never a patient."""
    for attempt in range(2):
        result = medgw("audit", "query", "--file", trail, "--patient", "P4", "--format", "csv")
        assert result.returncode == 0 and result.stderr == "", (attempt, result.stderr)
        audit_index.index_path(trail).write_bytes(b"garbage")
    error = audit_index._unwritable(audit_index.index_path(trail), OSError("read-only"))
    assert "P4" not in str(error) and str(trail) in str(error)


def test_a_rotated_trail_links_across_files_and_a_disposed_file_takes_its_index(
    tmp_path: Path,
) -> None:
    """Daily files from the real writer: a document named on one day and read on a later
    day is counted for its patient through the indexes as by reading the logs; retention
    removing a closed file removes its index (it names patients) with it."""
    current = tmp_path / "audit" / "audit.jsonl"
    clock = StepClock(START)
    log = AuditLog(current, clock, node="HOSP", rotation=RotationSettings(None, daily=True))
    for day in range(6):
        log.emit(
            AuditEvent(
                EventType.MESSAGE_ACCEPTED,
                peer="lab",
                actor="api:ris",
                message_id=f"<{day}@x>",
                patient_ids=(PatientId(f"P{day}", "hl7v2", None, None),),
            )
        )
        if day:  # yesterday's document read today
            operator = "operator:sato (uid 1001)"
            log.emit(AuditEvent(EventType.MESSAGE_VIEWED, peer="lab", message_id=f"<{day - 1}@x>",
                                actor=operator))  # fmt: skip
        clock.at += timedelta(days=1)
    log.close()
    paths = trail_files(current)
    assert len(paths) == 6
    for since in (None, START + timedelta(days=2)):
        window = Filters(since, None)
        assert indexed_accesses(paths, window) == accesses(paths, window)
        patient = Filters(since, None, "P2")
        assert [r["seq"] for r in audit_index.records(paths, patient)] == [
            r["seq"] for r in records(paths, patient)
        ]
    rows, _ = indexed_accesses(paths, Filters(START + timedelta(days=3), None))
    assert ("P2", 1) in [(r.patient, r.total) for r in rows]  # named on day 2, read on day 3
    assert all(audit_index.index_path(p).exists() for p in paths)

    audit = AuditLog(current, clock, node="HOSP")
    AuditFiles(current, audit.checkpoint).dispose(START + timedelta(days=3), "operator:x", audit)
    audit.close()
    gone = [p for p in paths if not p.exists()]
    assert gone and not any(audit_index.index_path(p).exists() for p in gone)


@pytest.mark.parametrize(
    "edit",
    [
        "DELETE FROM records WHERE offset = (SELECT max(offset) FROM records WHERE pset IN "
        "(SELECT pset FROM members WHERE patient = 'P1') AND offset > 0)",  # a record hidden
        "DELETE FROM members WHERE patient = 'P1'",  # a patient hidden
        "UPDATE records SET actor = NULL WHERE actor IS NOT NULL",  # actors hidden
        "UPDATE names SET value = 'api:other' WHERE value = 'api:ris'",
        "INSERT INTO members SELECT 'P9', pset FROM members LIMIT 1",  # a patient invented
    ],
)
def test_audit_verify_finds_an_index_edited_to_hide_records(trail: Path, edit: str) -> None:
    """What a review cannot see for itself (a record or a patient left out of the index),
    `medgw audit verify` finds by comparing the index with the log; it removes the index,
    and the next review is answered from one built again."""
    expected = review(trail, "--patient", "P1", "--no-index")
    counted = medgw("audit", "patients", "--file", trail, "--format", "csv", "--no-index")
    index = audit_index.index_path(trail)
    clean = medgw("audit", "verify", "--file", trail)
    assert clean.returncode == 0 and "WARNING" not in clean.stderr
    review(trail, "--patient", "P1")
    assert (
        f"{index}: review index matches the log" in medgw("audit", "verify", "--file", trail).stdout
    )
    _tamper(index, edit)
    checked = medgw("audit", "verify", "--file", trail)
    assert checked.returncode == 0, checked.stderr  # the log itself is intact
    assert f"WARNING: the review index {index} did not match the log" in checked.stderr
    assert not index.exists()
    assert review(trail, "--patient", "P1") == expected
    assert patients_report(trail) == counted.stdout.splitlines()


def test_the_current_files_index_left_by_a_rotation_is_no_tamper_warning(tmp_path: Path) -> None:
    """A review indexes the current file; the writer then rotates it (its index stays under
    the current file's name): ``audit verify`` removes that index without calling it
    edited, while an index edited after the rotation is still reported."""
    current = tmp_path / "audit" / "audit.jsonl"
    clock = StepClock(START)
    log = AuditLog(current, clock, node="HOSP", rotation=RotationSettings(None, daily=True))
    log.emit(AuditEvent(EventType.MESSAGE_ACCEPTED, peer="lab", message_id="<0@x>"))
    review(current, "--event", "message.accepted")
    index = audit_index.index_path(current)
    assert index.exists()
    clock.at += timedelta(days=1)
    log.emit(AuditEvent(EventType.MESSAGE_ACCEPTED, peer="lab", message_id="<1@x>"))  # rotates
    log.close()
    assert len(trail_files(current)) == 2
    files = [arg for path in trail_files(current) for arg in ("--file", str(path))]
    checked = medgw("audit", "verify", *files)
    assert checked.returncode == 0, checked.stderr
    assert "WARNING" not in checked.stderr, checked.stderr
    assert not index.exists()  # the next review builds the current file's own

    review(current, "--event", "message.accepted")
    _tamper(index, "UPDATE meta SET value = x'00' WHERE key = 'first_hash'")  # edited
    edited = medgw("audit", "verify", *files)
    assert f"WARNING: the review index {index} did not match the log" in edited.stderr
