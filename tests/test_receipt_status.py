"""A message's status verifies its stored receipt again: a receipt file grown past what
medgw ever stores (a full disk's worth, a tampered state folder) is refused after a
bounded read, never read whole into memory; so is a receipt kept in a spool row that is
too large, or not stored as bytes.  A receipt kept in a row is shown only if it is the
one recorded when it settled the message."""

from __future__ import annotations

import asyncio
import hashlib
import io
import sqlite3
import tracemalloc
from pathlib import Path
from typing import Any

import pytest

from gateway.audit.log import AuditLog
from gateway.clock import SystemClock
from gateway.config import load_config
from gateway.logs import make_logger
from gateway.outbound.context import Context, Settings
from gateway.outbound.status import MAX_STORED_RECEIPT, MessageStatus
from gateway.pki.demo import DemoLayout
from gateway.pki.peers import assess_peers
from gateway.spool import OutboundState, Settled, Spool, SqliteSpool
from tests.conftest import MakeSpool
from tests.helpers.audit import events
from tests.helpers.demo import hospital_receipt

MESSAGE = "<m@lab>"


def _sent(spool: Spool, tmp_path: Path) -> None:
    """MESSAGE taken in, queued and being sent: its receipt is the next thing to come."""
    payload = tmp_path / "m.hl7"
    spool.add_intake(MESSAGE, "hospital", "m.hl7", "application/hl7-v2", payload, payload)
    spool.mark_queued(MESSAGE, None, [], "mic", 3, body=b"sealed")
    spool.mark_sending(MESSAGE)


def _settled_with(spool: Spool, kept: bytes) -> None:
    """MESSAGE delivered, ``kept`` its receipt in its row (as received, with its SHA-256)."""
    settled = Settled(
        MESSAGE,
        OutboundState.DELIVERED,
        "processed",
        None,
        receipt=kept,
        receipt_sha256=hashlib.sha256(kept).hexdigest(),
    )
    assert spool.mark_settled([settled]) == [MESSAGE]


def _status_bounded(layout: DemoLayout, tmp_path: Path, spool: Spool) -> tuple[Any, int]:
    """MESSAGE's status as the daemon's MessageStatus gives it (the peers' certificates
    judged as the daemon judges them), and the peak of the memory
    Python allocated meanwhile."""
    config = load_config(layout.lab.config_path)
    trust = asyncio.run(assess_peers(config.peers, config.zones, at=SystemClock().now()))
    audit = AuditLog(tmp_path / "audit.jsonl", SystemClock(), node="lab")
    context = Context(
        Settings(config, trust), spool, audit, make_logger(stream=io.StringIO()), SystemClock()
    )
    tracemalloc.start()
    try:
        view = asyncio.run(MessageStatus(context).status(MESSAGE))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
        audit.close()
    assert view is not None
    return view, peak


def test_a_stored_receipt_past_the_bound_is_refused_without_reading_it_whole(
    layout: DemoLayout, tmp_path: Path
) -> None:
    spool = SqliteSpool(tmp_path / "spool.sqlite3", SystemClock())
    receipt = load_config(layout.lab.config_path).storage.receipts_dir / "m.mdn"
    receipt.parent.mkdir(parents=True, exist_ok=True)
    with receipt.open("wb") as handle:
        handle.write(b"Content-Type: multipart/signed\r\n\r\n")
        handle.truncate(64 * MAX_STORED_RECEIPT)  # sparse: costs no disk
    _sent(spool, tmp_path)
    spool.mark_done(MESSAGE, OutboundState.DELIVERED, "processed", receipt)
    try:
        view, peak = _status_bounded(layout, tmp_path, spool)
    finally:
        spool.close()
    assert view["receipt"]["verified"] is False and view["receipt"]["altered"] is True
    assert "larger than" in view["receipt"]["error"] and str(receipt) in view["receipt"]["error"]
    assert _alerts(tmp_path) == [MESSAGE]
    assert peak < 4 * MAX_STORED_RECEIPT


def test_a_receipt_kept_in_its_row_past_the_bound_is_refused_without_reading_it(
    layout: DemoLayout, tmp_path: Path, make_spool: MakeSpool
) -> None:
    """The same bound for a receipt kept in the spool row (both backends): one larger
    than any medgw stores (a tampered row) is refused as such, its size asked of the
    database, its bytes neither read nor opened nor parsed."""
    spool = make_spool(SystemClock())
    _sent(spool, tmp_path)
    _settled_with(
        spool, b"Content-Type: multipart/signed\r\n\r\n" + b"x" * (16 * MAX_STORED_RECEIPT)
    )
    view, peak = _status_bounded(layout, tmp_path, spool)
    assert view["receipt_kept"] == "spool"
    assert view["receipt"]["verified"] is False and view["receipt"]["altered"] is True
    assert "larger than" in view["receipt"]["error"] and "in the spool" in view["receipt"]["error"]
    assert _alerts(tmp_path) == [MESSAGE]
    assert peak < 4 * MAX_STORED_RECEIPT


def test_a_row_receipt_stored_as_text_is_refused_without_reading_it(
    layout: DemoLayout, tmp_path: Path
) -> None:
    """SQLite keeps any type in any column, and counts a TEXT value's length in characters
    up to its first NUL: a tampered row whose receipt is several MB of text beginning
    with a NUL has a length of 0.  Its type is asked with its size, and it is refused
    like a receipt too large, unread."""
    spool = SqliteSpool(tmp_path / "spool.sqlite3", SystemClock())
    try:
        _sent(spool, tmp_path)
        _settled_with(spool, b"Content-Type: multipart/signed\r\n\r\nsigned")
        db = sqlite3.connect(tmp_path / "spool.sqlite3")
        try:
            with db:  # several MB of text, a NUL first
                db.execute(
                    "UPDATE outbound SET receipt=? WHERE message_id=?",
                    ("\0" + "x" * (64 * MAX_STORED_RECEIPT), MESSAGE),
                )
            found = db.execute(
                "SELECT typeof(receipt), length(receipt) FROM outbound WHERE message_id=?",
                (MESSAGE,),
            ).fetchone()
        finally:
            db.close()
        assert found == ("text", 0)  # what a check of its size alone let through
        view, peak = _status_bounded(layout, tmp_path, spool)
    finally:
        spool.close()
    assert view["receipt_kept"] == "spool"
    assert view["receipt"]["verified"] is False and view["receipt"]["altered"] is True
    error = view["receipt"]["error"]
    assert MESSAGE in error and "not stored as bytes" in error, error
    assert _alerts(tmp_path) == [MESSAGE]
    assert "restore it from a backup" in error, error
    assert peak < 4 * MAX_STORED_RECEIPT


def _alerts(tmp_path: Path) -> list[str]:
    """The messages the integrity alerts in the status's audit trail name."""
    return [r["message_id"] for r in events(tmp_path / "audit.jsonl", "atrest.integrity_failed")]


def _signed(layout: DemoLayout, message_id: str) -> bytes:
    """A receipt the hospital signs for ``message_id``, as a row keeps it."""
    built = hospital_receipt(layout, message_id, "mic, sha-256")
    [content_type] = [value for name, value in built.headers if name.lower() == "content-type"]
    return f"Content-Type: {content_type}\r\n\r\n".encode() + built.body


@pytest.mark.parametrize("tampered", ["another message's receipt", "its own receipt edited"])
def test_a_row_receipt_not_the_one_recorded_at_settlement_is_not_shown(
    layout: DemoLayout, tmp_path: Path, make_spool: MakeSpool, tampered: str
) -> None:
    """Both backends: a row's receipt replaced by another that the same peer validly
    signed (another message's), or its own with bytes edited outside the signed part,
    still verifies; its SHA-256 is not the one recorded when it settled the message,
    and the status says the spool was altered instead of showing it."""
    spool = make_spool(SystemClock())
    _sent(spool, tmp_path)
    own = _signed(layout, MESSAGE)
    _settled_with(spool, own)
    view, _ = _status_bounded(layout, tmp_path, spool)
    assert view["receipt"]["verified"] is True, view["receipt"]
    assert view["receipt"]["original_message_id"] == MESSAGE
    assert _alerts(tmp_path) == []
    if tampered == "another message's receipt":
        swapped = _signed(layout, "<other@lab>")
    else:  # its Content-Type line is outside what the peer signed
        swapped = own.replace(b"Content-Type: ", b"Content-Type:  ", 1)
    assert swapped != own
    spool._write("UPDATE outbound SET receipt=? WHERE message_id=?", (swapped, MESSAGE))  # type: ignore[attr-defined]

    view, _ = _status_bounded(layout, tmp_path, spool)
    receipt = view["receipt"]
    assert receipt["verified"] is False and receipt["altered"] is True, receipt
    assert MESSAGE in receipt["error"] and "does not match" in receipt["error"]
    assert "restore the spool from a backup" in receipt["error"]
    assert "medgw audit verify" in receipt["error"]
    assert not {"disposition", "signer", "original_message_id", "mic"} & set(receipt)
    assert _alerts(tmp_path) == [MESSAGE]


def test_a_row_receipt_removed_with_its_sha256_left_is_reported_altered(
    layout: DemoLayout, tmp_path: Path, make_spool: MakeSpool
) -> None:
    """Both backends: settlement, a retry and retention set or clear a row's receipt and
    its SHA-256 together; a receipt removed by itself was removed outside medgw, and the
    status says so (not that the message has no receipt)."""
    spool = make_spool(SystemClock())
    _sent(spool, tmp_path)
    _settled_with(spool, _signed(layout, MESSAGE))
    spool._write("UPDATE outbound SET receipt=NULL WHERE message_id=?", (MESSAGE,))  # type: ignore[attr-defined]
    view, _ = _status_bounded(layout, tmp_path, spool)
    receipt = view["receipt"]
    assert receipt is not None, view
    assert receipt["verified"] is False and receipt["altered"] is True, receipt
    assert MESSAGE in receipt["error"] and "was removed from its spool row" in receipt["error"]
    assert _alerts(tmp_path) == [MESSAGE]
