"""The helper tests read a running gateway's audit trail with: it waits for what it is
asked for, says what there was when it gives up, and never reads half a record."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import pytest

from gateway.demo_run import read_audit
from tests.helpers.audit import wait_for_event, wait_for_events


def _line(seq: int, event: str, peer: str = "lab") -> bytes:
    return json.dumps({"seq": seq, "event": event, "peer": peer, "outcome": "success"}).encode()


def test_waits_for_a_record_written_after_it_began_to_wait(tmp_path: Path) -> None:
    log = tmp_path / "audit.jsonl"
    log.write_bytes(_line(1, "message.accepted") + b"\n")
    late = threading.Timer(0.5, lambda: log.write_bytes(log.read_bytes() + _line(2, "x") + b"\n"))
    late.start()
    try:
        assert wait_for_event(log, "x", timeout=30)["seq"] == 2
    finally:
        late.cancel()


def test_counts_and_filters(tmp_path: Path) -> None:
    log = tmp_path / "audit.jsonl"
    log.write_bytes(b"".join(_line(i, "a", peer=f"p{i % 2}") + b"\n" for i in range(1, 6)))
    assert [r["seq"] for r in wait_for_events(log, "a", where=lambda r: r["peer"] == "p1")] == [
        1,
        3,
        5,
    ]
    assert len(wait_for_events(log, ("a", "b"), count=5)) == 5


def test_gives_up_saying_what_the_log_held(tmp_path: Path) -> None:
    log = tmp_path / "audit.jsonl"
    log.write_bytes(_line(1, "message.send_failed", peer="hospital") + b"\n")
    with pytest.raises(AssertionError) as failed:
        wait_for_events(log, "receipt.received", count=1, timeout=0.2)
    text = str(failed.value)
    assert "'receipt.received'" in text and str(log) in text and "0 matched" in text
    assert "1 message.send_failed peer=hospital" in text


def test_a_record_still_being_written_is_not_read(tmp_path: Path) -> None:
    log = tmp_path / "audit.jsonl"
    whole = _line(1, "message.accepted") + b"\n"
    log.write_bytes(whole + _line(2, "receipt.received")[:20])  # its newline not written yet
    assert [r["seq"] for r in read_audit(log)] == [1]
    log.write_bytes(whole + _line(2, "receipt.received") + b"\n")
    assert [r["seq"] for r in read_audit(log)] == [1, 2]
