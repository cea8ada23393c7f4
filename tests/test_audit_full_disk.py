"""A full disk under the audit log: a record that did not fit leaves no trace, and the
next one after space is freed continues the chain, so ``medgw audit verify`` passes.

The audit log lives on a real, small file system (tmpfs) filled to the last byte.
Needs root to mount; skipped, saying why, where that is impossible.
"""

from __future__ import annotations

import errno
import json
from pathlib import Path

import pytest

from gateway.audit import AuditEvent, EventType
from gateway.audit.log import AuditLog, verify_chain
from gateway.clock import SystemClock
from gateway.textbounds import MAX_ITEMS
from tests.helpers.storage import fill_file_system, small_file_system

PAGE = 4096


def _event(note: str, size: int = 0) -> AuditEvent:
    # A record of about ``size`` bytes made of strings each under the audit trail's bound
    # on one string (gateway.textbounds), which would cut a single long one short.
    pad = {f"pad{i}": "x" * 1000 for i in range(size // 1000)}
    assert len(pad) < MAX_ITEMS
    return AuditEvent(EventType.MESSAGE_HANDED_OVER, peer="lab", detail={"note": note, **pad})


def test_a_record_that_does_not_fit_leaves_nothing_and_the_chain_goes_on(tmp_path: Path) -> None:
    with small_file_system(tmp_path / "audit", "256k") as folder:
        path = folder / "audit.jsonl"
        audit = AuditLog(path, SystemClock(), node="hospital")
        try:
            audit.emit(_event("first"))
            audit.emit(_event("second"))
            # The file's last page is part-used: the next record fills its free part,
            # then the file system has nothing more (a short write, then ENOSPC).
            assert path.stat().st_size % PAGE != 0
            filler = fill_file_system(folder)
            before = path.read_bytes()

            with pytest.raises(OSError) as raised:
                audit.emit(_event("too big", 3 * PAGE))
            assert raised.value.errno == errno.ENOSPC
            assert path.read_bytes() == before  # nothing of it is left
            with pytest.raises(OSError):
                audit.emit(_event("still full", 3 * PAGE))
            assert path.read_bytes() == before

            filler.unlink()  # space is freed
            audit.emit(_event("after", 3 * PAGE))
            audit.emit(_event("last"))
        finally:
            audit.close()

        assert verify_chain(path) == 4
        records = [json.loads(line) for line in path.read_bytes().splitlines()]
        assert [r["detail"]["note"] for r in records] == ["first", "second", "after", "last"]
        assert [r["seq"] for r in records] == [1, 2, 3, 4]

        # A restart chains on from the same place.
        again = AuditLog(path, SystemClock(), node="hospital")
        try:
            again.emit(_event("restarted"))
        finally:
            again.close()
        assert verify_chain(path) == 5


def test_records_emitted_together_that_do_not_fit_leave_nothing_and_raise(tmp_path: Path) -> None:
    with small_file_system(tmp_path / "audit", "256k") as folder:
        path = folder / "audit.jsonl"
        audit = AuditLog(path, SystemClock(), node="hospital")
        try:
            audit.emit(_event("first"))
            filler = fill_file_system(folder)
            before = path.read_bytes()
            # The first of them fits in the file's last page; the others do not.
            with pytest.raises(OSError) as raised:
                audit.emit_all([_event("small"), _event("big", 3 * PAGE), _event("small too")])
            assert raised.value.errno == errno.ENOSPC
            assert path.read_bytes() == before  # none of them, not even the first
            filler.unlink()
            audit.emit_all([_event("a"), _event("b", 3 * PAGE)])
        finally:
            audit.close()
        assert verify_chain(path) == 3
        records = [json.loads(line) for line in path.read_bytes().splitlines()]
        assert [r["detail"]["note"] for r in records] == ["first", "a", "b"]


def test_an_owed_record_that_did_not_fit_is_written_before_the_next_one(tmp_path: Path) -> None:
    """A record about a change already committed (owed) is kept when the disk is full, and
    written first, marked, with the next record once there is space: exactly once, in
    one valid chain.  A record not owed is dropped, as before."""
    with small_file_system(tmp_path / "audit", "256k") as folder:
        path = folder / "audit.jsonl"
        audit = AuditLog(
            path,
            SystemClock(),
            node="hospital",
            owed=lambda event: event.detail.get("note", "").startswith("owed"),
        )
        try:
            audit.emit(_event("first"))
            filler = fill_file_system(folder)
            before = path.read_bytes()
            for note in ("owed 1", "not owed", "owed 2"):
                with pytest.raises(OSError):
                    audit.emit(_event(note, 3 * PAGE))
            with pytest.raises(OSError):  # still full: the owed ones fail with it, kept
                audit.emit(_event("next"))
            assert path.read_bytes() == before
            filler.unlink()
            audit.emit(_event("after"))
            audit.emit(_event("last"))
        finally:
            audit.close()
        assert verify_chain(path) == 5
        records = [json.loads(line) for line in path.read_bytes().splitlines()]
        notes = [r["detail"]["note"] for r in records]
        assert notes == ["first", "owed 1", "owed 2", "after", "last"]
        late = [r for r in records if "first_tried_at" in r["detail"]]
        assert [r["detail"]["note"] for r in late] == ["owed 1", "owed 2"]
        assert all(r["detail"]["first_tried_at"] < r["time"] for r in late)


def test_owed_records_are_written_at_close(tmp_path: Path) -> None:
    with small_file_system(tmp_path / "audit", "256k") as folder:
        path = folder / "audit.jsonl"
        audit = AuditLog(path, SystemClock(), node="hospital", owed=lambda event: True)
        try:
            audit.emit(_event("first"))
            filler = fill_file_system(folder)
            with pytest.raises(OSError):
                audit.emit(_event("owed", 3 * PAGE))
            filler.unlink()
        finally:
            audit.close()
        assert verify_chain(path) == 2
        records = [json.loads(line) for line in path.read_bytes().splitlines()]
        assert [r["detail"]["note"] for r in records] == ["first", "owed"]
