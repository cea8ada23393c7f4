"""A record written now and waited for later (AuditLog.emit_later): written at once, in
chain order; durable when its wait returns, through an fsync that began after it was
written (its own, or another record's); cut off, its wait raising, if that fsync fails.

The fsync is the real ``os.fsync``, wrapped to count the calls and the file size each
made durable, or to fail one call as a failing disk does.
"""

from __future__ import annotations

import errno
import json
import os
from pathlib import Path

import pytest

from gateway.alerts import AlertCalls
from gateway.audit import AuditEvent, EventType, Severity
from gateway.audit.export.cursor import Broken, Position, read_forward
from gateway.audit.log import AuditLog, verify_chain
from gateway.clock import SystemClock
from gateway.config import Responsible
from gateway.daemon.observe import Observer
from gateway.emergency.mode import MarkingSink
from gateway.logs import make_logger
from tests.clocks import TickingClock


def _event(note: str) -> AuditEvent:
    return AuditEvent(EventType.MESSAGE_HANDED_OVER, peer="lab", detail={"note": note})


def _notes(path: Path) -> list[str]:
    return [json.loads(line)["detail"]["note"] for line in path.read_bytes().splitlines()]


class Disk:
    """os.fsync, noting the file size each call made durable; ``fail_at``: the call
    (counting from 1, the one at opening included) that fails instead."""

    def __init__(self, fail_at: int = 0) -> None:
        self.fail_at = fail_at
        self.synced: list[int] = []
        self.calls = 0

    def __call__(self, fd: int) -> None:
        self.calls += 1
        if self.calls == self.fail_at:
            raise OSError(errno.EIO, "Input/output error")
        size = os.fstat(fd).st_size
        os.fsync(fd)
        self.synced.append(size)


def test_a_record_is_written_at_once_and_durable_when_its_wait_returns(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    disk = Disk()
    audit = AuditLog(path, SystemClock(), node="hospital", sync=disk)
    pending = audit.emit_later([_event("a")])
    assert _notes(path) == ["a"]  # in the file, in chain order, before any wait
    assert len(disk.synced) == 1  # only the one at opening: no fsync yet
    pending.wait()
    assert disk.synced[-1] == path.stat().st_size
    pending.wait()  # waited again: it is durable, nothing more is done
    assert len(disk.synced) == 2
    audit.close()
    assert verify_chain(path) == 1


def test_a_record_waited_for_later_shares_the_fsync_of_a_record_written_after_it(
    tmp_path: Path,
) -> None:
    """The point of waiting later: another record's fsync, begun after this one was
    written, covers it; its own wait needs no fsync of its own."""
    path = tmp_path / "audit.jsonl"
    disk = Disk()
    audit = AuditLog(path, SystemClock(), node="hospital", sync=disk)
    first = audit.emit_later([_event("first")])
    audit.emit(_event("second"))  # its fsync covers both records
    first.wait()
    audit.close()
    assert len(disk.synced) == 1 + 1
    assert _notes(path) == ["first", "second"]
    assert verify_chain(path) == 2


def test_a_failed_fsync_of_a_later_record_cuts_off_one_written_before_and_its_wait_raises(
    tmp_path: Path,
) -> None:
    """The fsync that was to cover both fails: the emit raises, the record written before
    it is cut off too, and its wait raises: the step it must precede is not taken."""
    path = tmp_path / "audit.jsonl"
    audit = AuditLog(path, SystemClock(), node="hospital", sync=Disk(fail_at=3))
    audit.emit(_event("durable"))
    pending = audit.emit_later([_event("pending")])
    with pytest.raises(OSError):
        audit.emit(_event("failed"))
    assert _notes(path) == ["durable"]
    with pytest.raises(OSError) as raised:
        pending.wait()
    assert raised.value.errno == errno.EIO
    assert "not made durable" in str(raised.value) and str(path) in str(raised.value)
    with pytest.raises(OSError):
        pending.wait()  # as often as it is asked
    audit.emit(_event("after"))
    audit.close()
    assert _notes(path) == ["durable", "after"]
    assert verify_chain(path) == 2


def test_a_failed_fsync_of_its_own_wait_cuts_off_the_record_and_the_chain_goes_on(
    tmp_path: Path,
) -> None:
    path = tmp_path / "audit.jsonl"
    audit = AuditLog(path, SystemClock(), node="hospital", sync=Disk(fail_at=2))
    pending = audit.emit_later([_event("a"), _event("b")])
    later = audit.emit_later([_event("c")])  # written while the first waits: cut off too
    with pytest.raises(OSError):
        pending.wait()
    with pytest.raises(OSError):
        later.wait()
    assert path.read_bytes() == b""
    audit.emit(_event("after"))
    audit.close()
    assert _notes(path) == ["after"]
    assert verify_chain(path) == 1


def test_a_record_still_pending_at_close_is_synced_and_its_wait_returns(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    disk = Disk()
    audit = AuditLog(path, SystemClock(), node="hospital", sync=disk)
    pending = audit.emit_later([_event("a")])
    audit.close()
    pending.wait()
    assert disk.synced[-1] == path.stat().st_size
    assert _notes(path) == ["a"]


def test_the_daemons_sinks_note_a_pending_record_once_it_is_durable(tmp_path: Path) -> None:
    """Counted by the metrics, its alert logged with whom to call: once its wait returns,
    never for a record cut off; marked like any other."""
    path = tmp_path / "audit.jsonl"
    clock = TickingClock()
    log = AuditLog(path, clock, node="hospital", sync=Disk(fail_at=3))
    observer = Observer(
        clock, make_logger(), config=lambda: None, spool=lambda: None, export_backlog=lambda: None
    )
    admin = Responsible("Sato", "network administrator", "ext. 1234", ("communication",))
    sink = observer.sink(AlertCalls(MarkingSink(log, lambda: None), [admin], make_logger()))

    def accepted() -> float:
        return sum(
            s.value
            for metric in observer.metrics.registry.collect()
            if metric.name == "medgw_messages"
            for s in metric.samples
            if s.name == "medgw_messages_total" and s.labels["event"] == "accepted"
        )

    pending = sink.emit_later(
        [
            AuditEvent(EventType.MESSAGE_ACCEPTED, peer="lab", message_id="<m1@x>"),
            AuditEvent(EventType.STORAGE_UNAVAILABLE, severity=Severity.ALERT, reason="disk"),
        ]
    )
    assert accepted() == 0  # written, not yet recorded
    pending.wait()
    assert accepted() == 1
    pending.wait()
    assert accepted() == 1  # noted once
    cut = sink.emit_later([AuditEvent(EventType.MESSAGE_ACCEPTED, peer="lab", message_id="<2>")])
    with pytest.raises(OSError):
        cut.wait()  # the 3rd fsync fails
    assert accepted() == 1
    log.close()
    storage = [json.loads(line) for line in path.read_bytes().splitlines()][1]
    assert storage["call"] == [admin.describe()]
    assert verify_chain(path) == 2


def test_a_reader_of_the_trail_in_this_process_reads_no_record_that_may_yet_be_cut_off(
    tmp_path: Path,
) -> None:
    """The export and the trail's own check read the file while records are written and
    not yet durable.  Read up to the log's durable mark, they never take a record a failed
    fsync then cuts off (its seq then given to the next record, which they would skip)."""
    path = tmp_path / "audit.jsonl"
    disk = Disk(fail_at=3)  # opening, "before", then the wait of "cut"
    audit = AuditLog(path, SystemClock(), node="hospital", sync=disk)
    audit.emit(_event("before"))
    pending = audit.emit_later([_event("cut")])
    broken: list[Broken] = []
    seen = read_forward(path, Position(), 100, broken.append, audit.durable_seq())
    assert [read.record["detail"]["note"] for read in seen] == ["before"]
    with pytest.raises(OSError):
        pending.wait()
    audit.emit(_event("after"))
    again = read_forward(path, seen[-1].after, 100, broken.append, audit.durable_seq())
    assert [(r.record["seq"], r.record["detail"]["note"]) for r in again] == [(2, "after")]
    assert broken == []
    audit.close()


def test_a_wait_interrupted_by_anything_is_not_taken_for_durable_when_asked_again(
    tmp_path: Path,
) -> None:
    """A wait that raised (an OSError, or anything else in the middle of its fsync) has
    not made the record durable: waited for again, it raises again."""
    path = tmp_path / "audit.jsonl"

    def interrupted(fd: int) -> None:
        if os.fstat(fd).st_size:
            raise KeyboardInterrupt

    audit = AuditLog(path, SystemClock(), node="hospital", sync=interrupted)
    pending = audit.emit_later([_event("a")])
    with pytest.raises(KeyboardInterrupt):
        pending.wait()
    with pytest.raises(KeyboardInterrupt):
        pending.wait()


def test_a_record_whose_seq_was_edited_is_checked_not_held_back_as_not_yet_durable(
    tmp_path: Path,
) -> None:
    """Reading up to the durable mark goes by where the chain is: a record whose seq was
    edited to a number beyond the mark is read, and reported, as any edit is; the
    records after it are read too."""
    path = tmp_path / "audit.jsonl"
    audit = AuditLog(path, SystemClock(), node="hospital")
    for note in "abcdef":
        audit.emit(_event(note))
    lines = path.read_bytes().splitlines(keepends=True)
    lines[3] = lines[3].replace(b'"seq":4,', b'"seq":1000000000,', 1)
    path.write_bytes(b"".join(lines))
    broken: list[Broken] = []
    seen = read_forward(path, Position(), 100, broken.append, audit.durable_seq())
    assert [read.record["detail"]["note"] for read in seen] == list("abcdef")
    assert [b.seq for b in broken][:1] == [1000000000]
    audit.close()
