"""What receiving one small document costs beyond its own steps: no spool read and no
file operation that tells nothing new.

A receiver's CPU per message is mostly system calls and thread switches (each call
that lets go of the GIL while another thread wants it is a switch): bench/README.md
"The receiver's per-message system calls".  These tests pin the ones removed.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from gateway.audit import AuditEvent, AuditLog, EventType, verify_chain
from gateway.clock import SystemClock
from gateway.spool import SqliteSpool
from tests.helpers.receiving import Receiver, receiver

RECORD_READ = "SELECT * FROM inbound WHERE peer="


@pytest.fixture
def hospital(tmp_path: Path) -> Iterator[Receiver]:
    with receiver(tmp_path) as opened:
        yield opened


def test_a_received_document_reads_its_spool_record_once_and_removes_no_unwritten_file(
    hospital: Receiver, monkeypatch: pytest.MonkeyPatch
) -> None:
    config, spool = hospital.config, hospital.spool
    assert isinstance(spool, SqliteSpool)  # its statements traced
    removed: list[Path] = []
    unlink = Path.unlink

    def watched(path: Path, missing_ok: bool = False) -> None:
        removed.append(path)
        unlink(path, missing_ok=missing_ok)

    [peer] = config.peers
    request = hospital.request(b"MSH|once\r")
    statements: list[str] = []
    spool.trace(statements.append)
    monkeypatch.setattr(Path, "unlink", watched)
    try:
        answer = hospital.inbound.process(request)
    finally:
        monkeypatch.undo()
        spool.trace(None)
    assert answer.status == 200 and b"processed" in answer.body
    [delivered] = [p for p in (config.storage.inbox_dir / peer.name).iterdir()]
    assert delivered.read_bytes() == b"MSH|once\r"
    # Whether message.received is due, and what the delivery finds: one read.
    assert sum(s.startswith(RECORD_READ) for s in statements) == 1, statements
    # The body was held in memory and its signed entity read in place: the work
    # folder's names for their files were never written, so never removed.
    incoming = config.storage.state_dir / "incoming"
    assert [p for p in removed if p.parent == incoming] == []
    assert list(incoming.iterdir()) == []


def test_an_audit_record_asks_nothing_of_the_file_but_to_write_and_sync_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Where the file ends is kept by the log (the only writer), not asked per record."""
    path = tmp_path / "audit" / "audit.jsonl"
    audit = AuditLog(path, SystemClock(), node="n1")
    asked: list[int] = []
    fstat = os.fstat

    def watched(fd: int) -> os.stat_result:
        asked.append(fd)
        return fstat(fd)

    try:
        monkeypatch.setattr(os, "fstat", watched)
        for n in range(5):
            audit.emit(AuditEvent(EventType.MESSAGE_RECEIVED, peer="lab", message_id=f"<{n}@x>"))
        monkeypatch.undo()
        assert asked == []
    finally:
        audit.close()
    verify_chain(path)  # each record whole, on its own line, chained
    records = [json.loads(line) for line in path.read_bytes().splitlines()]
    assert [r["message_id"] for r in records if r["event"] == "message.received"] == [
        f"<{n}@x>" for n in range(5)
    ]


def test_a_received_document_opens_its_work_file_once(
    hospital: Receiver, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The work file is made open and written through that one opening: not opened a
    second time to be filled (an open, a close and the buffered file's own calls)."""
    config = hospital.config
    [peer] = config.peers
    request = hospital.request(b"MSH|one opening\r")
    opened: list[str] = []
    os_open = os.open

    def watched(path: str | os.PathLike[str], flags: int, *args: int, **kw: int) -> int:
        opened.append(os.fspath(path))
        return os_open(path, flags, *args, **kw)

    monkeypatch.setattr(os, "open", watched)
    try:
        answer = hospital.inbound.process(request)
    finally:
        monkeypatch.undo()
    assert answer.status == 200 and b"processed" in answer.body
    inbox = config.storage.inbox_dir / peer.name
    [delivered] = list(inbox.iterdir())  # the work name removed
    assert delivered.read_bytes() == b"MSH|one opening\r"
    work = [p for p in opened if p.endswith(".delivering")]
    assert len(work) == 1, opened
    assert os.path.dirname(work[0]) == str(inbox)
