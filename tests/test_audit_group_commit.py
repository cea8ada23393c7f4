"""The audit log syncs records in groups, and never returns before a record is on disk.

The gateway emits audit records from the event loop and from worker threads at
once.  Each ``emit`` must return only after its record is fsync'ed; but records
emitted at the same moment share one fsync instead of queueing for one each
(on a disk where an fsync takes milliseconds, one fsync per record would limit
the whole gateway).  The fsync is the real ``os.fsync``, wrapped to note what it
covered and, where a test needs it, to take as long as a slow disk's.
"""

from __future__ import annotations

import errno
import json
import os
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from cryptography.x509 import load_pem_x509_certificate

from gateway.alerts import AlertCalls
from gateway.audit import AuditEvent, EventType, Severity
from gateway.audit.log import AuditLog, verify_chain
from gateway.audit.seal import CHECKPOINT_EVENT, CheckpointKeys
from gateway.audit.verify import verify_trail
from gateway.clock import SystemClock
from gateway.config import Responsible
from gateway.config.emergency import EmergencySettings
from gateway.daemon.observe import Observer
from gateway.emergency.mode import EmergencyMode, MarkingSink
from gateway.logs import make_logger
from tests.audit_writer import sealer
from tests.clocks import TickingClock
from tests.helpers.audit import openssl_audit_key

THREADS = 8
EACH = 25


def _event(note: str) -> AuditEvent:
    return AuditEvent(EventType.MESSAGE_HANDED_OVER, peer="lab", detail={"note": note})


class SlowDisk:
    """os.fsync that takes ``seconds`` and notes the file size each call made durable."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.synced_sizes: list[int] = []
        self.lock = threading.Lock()

    def __call__(self, fd: int) -> None:
        size = os.fstat(fd).st_size  # everything written before the fsync began
        time.sleep(self.seconds)
        os.fsync(fd)
        with self.lock:
            self.synced_sizes.append(size)


def _end_of(path: Path, note: str) -> int:
    """Offset just past the line of the record with this note."""
    offset = 0
    for line in path.read_bytes().splitlines(keepends=True):
        offset += len(line)
        if line.endswith(b"\n") and json.loads(line)["detail"]["note"] == note:
            return offset  # (a line without its end is another thread's, being written)
    raise AssertionError(f"no record {note!r}")


def test_records_emitted_together_share_fsyncs_and_each_is_on_disk_when_emit_returns(
    tmp_path: Path,
) -> None:
    path = tmp_path / "audit.jsonl"
    disk = SlowDisk(0.005)
    audit = AuditLog(path, SystemClock(), node="hospital", sync=disk)
    not_covered: list[str] = []
    start = threading.Barrier(THREADS)

    def emitter(n: int) -> None:
        start.wait()
        for i in range(EACH):
            note = f"t{n}-{i}"
            audit.emit(_event(note))
            durable = max(disk.synced_sizes)
            if _end_of(path, note) > durable:
                not_covered.append(note)

    threads = [threading.Thread(target=emitter, args=(n,)) for n in range(THREADS)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    audit.close()

    assert not_covered == []  # emit never returned before its record was synced
    assert verify_chain(path) == THREADS * EACH
    records = THREADS * EACH
    syncs = len(disk.synced_sizes) - 1  # the first one is at opening
    # One fsync per record would be 200: threads waiting together share them.  (How many
    # they share depends on the scheduler; that some are shared does not.)
    assert syncs < records, f"{syncs} fsyncs for {records} records"


def test_a_single_emitter_still_syncs_every_record(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    disk = SlowDisk(0)
    audit = AuditLog(path, SystemClock(), node="hospital", sync=disk)
    for i in range(5):
        audit.emit(_event(f"r{i}"))
        assert disk.synced_sizes[-1] == path.stat().st_size
    audit.close()
    assert len(disk.synced_sizes) == 1 + 5


class FailingDisk(SlowDisk):
    """Fails the fsync that begins once ``records`` records are in the file."""

    def __init__(self, path: Path, records: int) -> None:
        super().__init__(0)
        self.path = path
        self.records = records
        self.failed = False

    def __call__(self, fd: int) -> None:
        if not self.failed and self.path.read_bytes().count(b"\n") >= self.records:
            self.failed = True
            raise OSError(errno.EIO, "Input/output error")
        super().__call__(fd)


def test_a_failed_fsync_cuts_off_the_record_and_the_chain_goes_on(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    audit = AuditLog(path, SystemClock(), node="hospital", sync=FailingDisk(path, 3))
    audit.emit(_event("first"))
    audit.emit(_event("second"))
    before = path.read_bytes()
    with pytest.raises(OSError) as raised:
        audit.emit(_event("not durable"))
    assert raised.value.errno == errno.EIO
    assert path.read_bytes() == before  # nothing of it is left
    audit.emit(_event("after"))
    audit.close()
    assert verify_chain(path) == 3
    notes = [json.loads(line)["detail"]["note"] for line in path.read_bytes().splitlines()]
    assert notes == ["first", "second", "after"]


def test_a_failed_fsync_fails_every_record_it_was_to_cover(tmp_path: Path) -> None:
    """Two threads' records wait for one fsync; it fails: both emits raise, neither
    record stays in the file, and the next record chains on from the last durable one."""
    path = tmp_path / "audit.jsonl"
    both_written = threading.Event()

    class Disk(SlowDisk):
        calls = 0

        def __call__(self, fd: int) -> None:
            self.calls += 1
            if self.calls == 2:  # the first fsync after opening: wait for the second record
                assert both_written.wait(10)
                raise OSError(errno.EIO, "Input/output error")
            super().__call__(fd)

    audit = AuditLog(path, SystemClock(), node="hospital", sync=Disk(0))
    outcomes: dict[str, str] = {}

    def emit(note: str) -> None:
        try:
            audit.emit(_event(note))
            outcomes[note] = "returned"
        except OSError as exc:
            outcomes[note] = errno.errorcode[exc.errno or 0]

    first = threading.Thread(target=emit, args=("a",))
    first.start()
    deadline = time.monotonic() + 10
    while not (path.stat().st_size and path.read_bytes().count(b"\n") >= 1):
        assert time.monotonic() < deadline
        time.sleep(0.001)
    second = threading.Thread(target=emit, args=("b",))
    second.start()
    while path.read_bytes().count(b"\n") < 2:  # b is written, and waits for the fsync
        assert time.monotonic() < deadline
        time.sleep(0.001)
    both_written.set()
    first.join()
    second.join()

    assert outcomes == {"a": "EIO", "b": "EIO"}
    assert path.read_bytes() == b""
    audit.emit(_event("after"))
    audit.close()
    assert verify_chain(path) == 1


def test_a_record_written_while_the_log_closes_is_synced_before_the_file_is_closed(
    tmp_path: Path,
) -> None:
    # A stopping daemon closes the log while worker threads may still emit.  A record
    # written before close() took the file must be made durable by it (and its emit
    # return), never left in the file unsynced while its emit raises.
    path = tmp_path / "audit.jsonl"
    disk = SlowDisk(0.0)
    in_fsync, release = threading.Event(), threading.Event()

    def sync(fd: int) -> None:
        if not in_fsync.is_set() and os.fstat(fd).st_size:
            in_fsync.set()
            release.wait(10)
        disk(fd)

    audit = AuditLog(path, SystemClock(), node="hospital", sync=sync)
    outcome: dict[str, str] = {}

    def emitter(note: str) -> None:
        try:
            audit.emit(_event(note))
            outcome[note] = "returned"
        except OSError as exc:
            outcome[note] = f"raised {exc}"

    first = threading.Thread(target=emitter, args=("first",))
    first.start()
    assert in_fsync.wait(10)  # the first record's fsync is in progress
    closing = threading.Thread(target=audit.close)
    closing.start()
    time.sleep(0.1)  # close() waits for that fsync
    second = threading.Thread(target=emitter, args=("second",))
    second.start()
    deadline = time.monotonic() + 10
    while path.read_bytes().count(b"\n") < 2:  # the second record is written; its emit waits
        assert time.monotonic() < deadline
        time.sleep(0.001)
    release.set()
    for thread in (first, closing, second):
        thread.join(10)

    assert outcome == {"first": "returned", "second": "returned"}
    assert verify_chain(path) == 2
    assert max(disk.synced_sizes) == path.stat().st_size  # both records are on disk


def test_a_disk_that_keeps_failing_does_not_make_the_log_grow_in_memory(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"

    class BrokenDisk(SlowDisk):
        def __call__(self, fd: int) -> None:
            if self.synced_sizes:  # the first one, at opening, succeeds
                raise OSError(errno.EIO, "Input/output error")
            super().__call__(fd)

    audit = AuditLog(path, SystemClock(), node="hospital", sync=BrokenDisk(0))
    for i in range(200):
        with pytest.raises(OSError):
            audit.emit(_event(f"r{i}"))
    assert len(audit._lost) <= 1  # what no emit waits for any more is forgotten
    assert path.read_bytes() == b""
    audit.close()


class WriteCount:
    """os.write, noting how many calls each file descriptor had."""

    def __init__(self) -> None:
        self.calls: dict[int, int] = {}
        self._write = os.write

    def __call__(self, fd: int, data: Any) -> int:
        self.calls[fd] = self.calls.get(fd, 0) + 1
        return self._write(fd, data)


def test_records_emitted_together_take_one_write_and_one_fsync_each_its_own_link(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "audit.jsonl"
    disk = SlowDisk(0)
    audit = AuditLog(path, SystemClock(), node="hospital", sync=disk)
    audit.emit(_event("alone"))
    writes = WriteCount()
    monkeypatch.setattr(os, "write", writes)
    audit.emit_all([_event(f"b{i}") for i in range(32)])
    monkeypatch.undo()

    assert list(writes.calls.values()) == [1]  # the 32 records: one write
    assert len(disk.synced_sizes) == 1 + 2  # at opening, "alone", the 32 together
    assert disk.synced_sizes[-1] == path.stat().st_size  # all durable when it returned
    audit.emit(_event("after"))
    audit.emit_all([])  # nothing to record: no write, no fsync
    audit.close()
    assert len(disk.synced_sizes) == 1 + 3
    assert verify_chain(path) == 34
    records = [json.loads(line) for line in path.read_bytes().splitlines()]
    assert [r["detail"]["note"] for r in records] == [
        "alone",
        *(f"b{i}" for i in range(32)),
        "after",
    ]
    assert [r["seq"] for r in records] == list(range(1, 35))


def test_a_failed_fsync_cuts_off_every_record_emitted_together_and_the_chain_goes_on(
    tmp_path: Path,
) -> None:
    path = tmp_path / "audit.jsonl"
    audit = AuditLog(path, SystemClock(), node="hospital", sync=FailingDisk(path, 3))
    audit.emit(_event("first"))
    before = path.read_bytes()
    with pytest.raises(OSError) as raised:
        audit.emit_all([_event("a"), _event("b"), _event("c")])  # the fsync at 3+ fails
    assert raised.value.errno == errno.EIO
    assert path.read_bytes() == before  # none of them is left
    audit.emit_all([_event("d"), _event("e")])
    audit.close()
    assert verify_chain(path) == 3
    notes = [json.loads(line)["detail"]["note"] for line in path.read_bytes().splitlines()]
    assert notes == ["first", "d", "e"]


def test_records_emitted_together_while_another_thread_emits_stay_together_in_order(
    tmp_path: Path,
) -> None:
    path = tmp_path / "audit.jsonl"
    audit = AuditLog(path, SystemClock(), node="hospital", sync=SlowDisk(0.002))
    start = threading.Barrier(2)

    def singles() -> None:
        start.wait()
        for i in range(EACH):
            audit.emit(_event(f"s{i}"))

    def batches() -> None:
        start.wait()
        for n in range(EACH):
            audit.emit_all([_event(f"b{n}-{i}") for i in range(4)])

    threads = [threading.Thread(target=singles), threading.Thread(target=batches)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    audit.close()

    assert verify_chain(path) == EACH * 5
    notes = [json.loads(line)["detail"]["note"] for line in path.read_bytes().splitlines()]
    batched = [note for note in notes if note.startswith("b")]
    assert batched == [f"b{n}-{i}" for n in range(EACH) for i in range(4)]
    for n in range(EACH):  # no other record between the records of one batch
        first = notes.index(f"b{n}-0")
        assert notes[first : first + 4] == [f"b{n}-{i}" for i in range(4)]


def test_the_daemons_sinks_pass_records_emitted_together_on_together(tmp_path: Path) -> None:
    """The sinks the daemon wraps around the log (counted by the metrics, each alert with
    whom to call, marked with the emergency window) hand the records on as one write."""
    path = tmp_path / "audit.jsonl"
    disk = SlowDisk(0)
    clock = TickingClock()
    log = AuditLog(path, clock, node="hospital", sync=disk)
    mode = EmergencyMode(tmp_path, clock, lambda: log, lambda: EmergencySettings())
    mode.enter("power failure", clock.now().timestamp() + 3600, "operator:root (uid 0)")
    observer = Observer(
        clock, make_logger(), config=lambda: None, spool=lambda: None, export_backlog=lambda: None
    )
    admin = Responsible("Sato", "network administrator", "ext. 1234", ("communication",))
    sink = observer.sink(AlertCalls(MarkingSink(log, lambda: mode), [admin], make_logger()))
    synced = len(disk.synced_sizes)

    sink.emit_all(
        [
            AuditEvent(EventType.MESSAGE_ACCEPTED, peer="lab", message_id="<m1@x>"),
            AuditEvent(EventType.STORAGE_UNAVAILABLE, severity=Severity.ALERT, reason="disk"),
            AuditEvent(EventType.MESSAGE_ACCEPTED, peer="lab", message_id="<m2@x>"),
        ]
    )
    log.close()

    assert len(disk.synced_sizes) == synced + 1  # one for the three
    records = [json.loads(line) for line in path.read_bytes().splitlines()]
    entered, first, storage, second = records
    window = entered["detail"]["emergency"]
    assert [r["event"] for r in (first, storage, second)] == [
        "message.accepted",
        "storage.unavailable",
        "message.accepted",
    ]
    assert first["detail"]["emergency"] == second["detail"]["emergency"] == window
    assert "emergency" not in storage.get("detail", {})  # not about a message
    assert storage["call"] == [admin.describe()]
    assert "call" not in first
    accepted = [
        s.value
        for metric in observer.metrics.registry.collect()
        if metric.name == "medgw_messages"
        for s in metric.samples
        if s.name == "medgw_messages_total" and s.labels["event"] == "accepted"
    ]
    assert sum(accepted) == 2
    assert verify_chain(path) == 4


class FailingWithCheckpoint:
    """os.write, failing (as a full disk) the next ``failures`` writes that carry a
    checkpoint line (with ``any_write``: the next writes); every write's data noted."""

    def __init__(self, failures: int) -> None:
        self.failures = failures
        self.any_write = False
        self.written: list[bytes] = []
        self._write = os.write

    def __call__(self, fd: int, data: Any) -> int:
        self.written.append(bytes(data))
        checkpoint = CHECKPOINT_EVENT.encode() in self.written[-1]
        if self.failures and (checkpoint or self.any_write):
            self.failures -= 1
            raise OSError(errno.ENOSPC, "No space left on device")
        return self._write(fd, data)


def test_records_whose_checkpoint_fails_are_written_without_it_and_it_comes_later(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A batch with a due checkpoint among its lines whose write fails is written once
    more without it: the records are kept, and the next record writes the checkpoint.
    If that write fails too, nothing of the batch is in the file and emit_all raises."""
    key, cert = openssl_audit_key(tmp_path)
    path = tmp_path / "audit.jsonl"
    audit = AuditLog(path, SystemClock(), node="hospital", sealer=sealer(key, cert, every=4))
    audit.emit_all([_event(f"a{i}") for i in range(2)])
    disk = FailingWithCheckpoint(failures=1)
    monkeypatch.setattr(os, "write", disk)
    audit.emit_all([_event(f"b{i}") for i in range(3)])  # the 4th record makes one due
    assert len(disk.written) == 2  # with the checkpoint (failed), then without it
    assert CHECKPOINT_EVENT.encode() not in disk.written[1]
    audit.emit(_event("c"))  # the checkpoint is due still: written after this one

    disk.failures, disk.any_write = 2, True  # the write with a checkpoint, and the retry
    disk.written.clear()
    before = path.read_bytes()
    with pytest.raises(OSError) as raised:
        audit.emit_all([_event(f"d{i}") for i in range(4)])
    assert raised.value.errno == errno.ENOSPC
    assert [CHECKPOINT_EVENT.encode() in data for data in disk.written] == [True, False]
    assert path.read_bytes() == before  # neither write left anything
    disk.failures = 0
    audit.emit_all([_event(f"e{i}") for i in range(4)])
    monkeypatch.undo()
    audit.close()

    records = [json.loads(line) for line in path.read_bytes().splitlines()]
    notes = [r["detail"].get("note", r["event"]) for r in records]
    assert notes == [
        *(f"a{i}" for i in range(2)),
        *(f"b{i}" for i in range(3)),
        "c",
        CHECKPOINT_EVENT,
        *(f"e{i}" for i in range(4)),
        CHECKPOINT_EVENT,
    ]
    assert [r["seq"] for r in records] == list(range(1, 13))
    report = verify_trail([path], CheckpointKeys([load_pem_x509_certificate(cert.read_bytes())]))
    assert report.unsealed == 0
