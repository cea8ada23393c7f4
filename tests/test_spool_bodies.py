"""Where a sealed AS2 body is kept: small ones in the spool row, large ones in a file.

A small document's body is committed with the row that says "queued" (one
transaction, one fsync, nothing to go missing between a file and its row); a
large one streams to ``state/outgoing``.  Either is dropped once delivered or
cancelled, and kept while the message can still be sent or retried.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from gateway.demo_run import GatewayProcess, drop_file, wait_until
from gateway.errors import SpoolError
from gateway.outbound import INLINE_BODY_BYTES
from gateway.pki.demo import DemoLayout
from gateway.spool import OutboundState, Spool, SqliteSpool
from tests.clocks import TickingClock
from tests.conftest import MakeSpool
from tests.helpers.audit import wait_for_events


def queued(spool: Spool, tmp_path: Path, message_id: str, body: bytes) -> None:
    spool.add_intake(
        message_id, "lab", "a.hl7", "application/hl7-v2", tmp_path / "a", tmp_path / "p"
    )
    spool.mark_queued(message_id, None, [], "mic", 10, body=body)


def test_a_body_in_the_row_is_kept_until_delivered(tmp_path: Path, make_spool: MakeSpool) -> None:
    spool = make_spool(TickingClock())
    queued(spool, tmp_path, "<m@lab>", b"\x30\x80sealed")
    record = spool.get("<m@lab>")
    assert record is not None and record.sealed and record.body == b"\x30\x80sealed"
    assert record.body_path is None
    (claimed,), _ = spool.claim_due("lab", 2e9, 8)
    assert claimed.body == b"\x30\x80sealed"  # what the sender posts
    spool.mark_done("<m@lab>", OutboundState.FAILED, "failed", None, error="negative receipt")
    assert spool.get("<m@lab>").body == b"\x30\x80sealed"  # type: ignore[union-attr]
    spool.operator_retry("<m@lab>", "alice", 2e9)  # a failed message can be sent again
    spool.mark_sending("<m@lab>")
    spool.mark_done("<m@lab>", OutboundState.DELIVERED, "processed", tmp_path / "r.mdn")
    after = spool.get("<m@lab>")
    assert after is not None and after.body is None and after.state is OutboundState.DELIVERED


def test_a_cancelled_message_keeps_no_body(tmp_path: Path, make_spool: MakeSpool) -> None:
    spool = make_spool(TickingClock())
    queued(spool, tmp_path, "<m@lab>", b"sealed")
    spool.operator_cancel("<m@lab>", "alice")
    assert spool.get("<m@lab>").body is None  # type: ignore[union-attr]


def test_a_queued_message_has_its_body_in_exactly_one_place(
    tmp_path: Path, make_spool: MakeSpool
) -> None:
    spool = make_spool(TickingClock())
    spool.add_intake(
        "<m@lab>", "lab", "a.hl7", "application/hl7-v2", tmp_path / "a", tmp_path / "p"
    )
    with pytest.raises(ValueError, match="in a file or in the spool"):
        spool.mark_queued("<m@lab>", None, [], "mic", 10)
    with pytest.raises(ValueError, match="in a file or in the spool"):
        spool.mark_queued("<m@lab>", tmp_path / "b", [], "mic", 10, body=b"x")


def test_small_bodies_stay_in_the_spool_and_large_ones_in_a_file_until_delivered(
    layout: DemoLayout, processes
) -> None:
    """With the hospital down, both wait: the small one's body in its row (no file),
    the large one's in state/outgoing.  Once the hospital is up, both are delivered
    and neither body is kept."""
    outgoing = layout.lab.root / "state" / "outgoing"
    processes.start(layout.lab.config_path)
    small, large = b"MSH|^~\\&|small\r", b"\x00" * (INLINE_BODY_BYTES + 1)
    drop_file(layout.lab.outbox_dir / "hospital", "small.hl7", small)
    drop_file(layout.lab.outbox_dir / "hospital", "large.bin", large)

    accepted = wait_for_events(layout.lab.audit_log, "message.accepted", count=2)
    ids = {r["detail"]["filename"]: r["message_id"] for r in accepted}

    spool = SqliteSpool(layout.lab.root / "state" / "spool.sqlite3", TickingClock())
    waiting = {name: spool.get(ids[name]) for name in ids}
    assert waiting["small.hl7"].body is not None and waiting["small.hl7"].body_path is None  # type: ignore[union-attr]
    assert waiting["large.bin"].body is None and waiting["large.bin"].body_path.is_file()  # type: ignore[union-attr]
    assert [p.name for p in outgoing.iterdir()] == [waiting["large.bin"].body_path.name]  # type: ignore[union-attr]

    hospital: GatewayProcess = processes.start(layout.hospital.config_path)
    assert hospital.proc.poll() is None

    def delivered() -> bool:
        return all(spool.get(m).state is OutboundState.DELIVERED for m in ids.values())  # type: ignore[union-attr]

    wait_until(delivered, 120, "both delivered once the hospital is up")
    assert (layout.hospital.inbox_dir / "lab" / "small.hl7").read_bytes() == small
    assert (layout.hospital.inbox_dir / "lab" / "large.bin").read_bytes() == large
    assert all(spool.get(m).body is None for m in ids.values())  # type: ignore[union-attr]
    # The body file goes after the record says delivered: wait for the file itself.
    wait_until(lambda: not list(outgoing.iterdir()), 60, "the large body's file removed")


def test_retrying_a_delivered_message_says_it_was_delivered(
    tmp_path: Path, make_spool: MakeSpool
) -> None:
    """Its body is dropped once delivered; that does not make it 'never signed'."""
    spool = make_spool(TickingClock())
    queued(spool, tmp_path, "<m@lab>", b"sealed")
    spool.mark_sending("<m@lab>")
    spool.mark_done("<m@lab>", OutboundState.DELIVERED, "processed", tmp_path / "r.mdn")
    with pytest.raises(SpoolError, match="is delivered; this needs it to be failed"):
        spool.operator_retry("<m@lab>", "alice", 2e9)


def test_a_plaintext_copy_left_by_a_kill_is_removed_at_start_whatever_came_after(
    layout: DemoLayout, processes: Any
) -> None:
    """Killed between recording a message as queued and deleting its plaintext copy,
    then (after a restart) the message was delivered: the copy must still go.  The
    document of a message whose sealing failed is kept (it is what `queue retry` seals)."""
    state = layout.lab.root / "state"
    payloads = state / "payloads"
    payloads.mkdir(parents=True, exist_ok=True)
    spool = SqliteSpool(state / "spool.sqlite3", TickingClock())
    left, kept = payloads / ("a" * 24), payloads / ("b" * 24)
    spool.add_intake("<sent@lab>", "hospital", "a.hl7", "application/hl7-v2", left, left)
    spool.mark_queued("<sent@lab>", None, [], "mic, sha-256", 10, body=b"sealed")
    spool.mark_sending("<sent@lab>")
    spool.mark_done("<sent@lab>", OutboundState.DELIVERED, "processed", None)
    spool.add_intake("<kept@lab>", "hospital", "b.hl7", "application/hl7-v2", kept, kept)
    assert spool.fail_intake("<kept@lab>", "no certificate")
    spool.close()
    left.write_bytes(b"MSH|plaintext")
    kept.write_bytes(b"MSH|kept until retried or cancelled")
    processes.start(layout.lab.config_path)
    assert not left.exists()
    assert kept.read_bytes() == b"MSH|kept until retried or cancelled"
