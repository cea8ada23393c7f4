"""What receiving one small document costs beyond its own steps: no spool read and no
file operation that tells nothing new.

A receiver's CPU per message is mostly system calls and thread switches (each call
that lets go of the GIL while another thread wants it is a switch): bench/README.md
"The receiver's per-message system calls".  These tests pin the ones removed.
"""

from __future__ import annotations

import io
import json
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from gateway.audit import AuditEvent, AuditLog, EventType, verify_chain
from gateway.clock import SystemClock
from gateway.config import GatewayConfig, load_config
from gateway.inbound import InboundProcessor, InboundRequest
from gateway.logs import make_logger
from gateway.spool import SqliteSpool
from tests.helpers.zones import Site, as2_message, new_ca

RECORD_READ = "SELECT * FROM inbound WHERE peer="


@pytest.fixture
def receiving(tmp_path: Path) -> Iterator[tuple[GatewayConfig, Site, Site, SqliteSpool]]:
    ca = new_ca("Net")
    hospital = Site.make(tmp_path, "hospital", "SAKURA-HOSPITAL", ca, ["127.0.0.1"])
    lab = Site.make(tmp_path, "lab", "LAB-1", ca, ["127.0.0.1"])
    hospital.zone("z0", ["127.0.0.0/8"], [hospital, lab])
    hospital.listen("z0", "127.0.0.1", 4080, "z0")
    hospital.peer(lab, "z0", "https://127.0.0.1:4180/as2")
    config = load_config(hospital.write())
    spool = SqliteSpool(config.storage.state_dir / "spool.sqlite3", SystemClock())
    try:
        yield config, hospital, lab, spool
    finally:
        spool.close()


def test_a_received_document_reads_its_spool_record_once_and_removes_no_unwritten_file(
    receiving: tuple[GatewayConfig, Site, Site, SqliteSpool], monkeypatch: pytest.MonkeyPatch
) -> None:
    config, hospital, lab, spool = receiving
    clock = SystemClock()
    audit = AuditLog(config.storage.audit_log, clock, node=config.as2_id)
    removed: list[Path] = []
    unlink = Path.unlink

    def watched(path: Path, missing_ok: bool = False) -> None:
        removed.append(path)
        unlink(path, missing_ok=missing_ok)

    try:
        inbound = InboundProcessor(config, spool, audit, make_logger("error", io.StringIO()), clock)
        [peer] = config.peers
        built = as2_message(lab, hospital, hospital.as2_id, b"MSH|once\r")
        request = InboundRequest(
            peer, "127.0.0.1", {k.lower(): v for k, v in built.headers}, built.body
        )
        statements: list[str] = []
        spool.trace(statements.append)
        monkeypatch.setattr(Path, "unlink", watched)
        try:
            answer = inbound.process(request)
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
    finally:
        audit.close()


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
