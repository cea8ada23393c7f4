"""A message's status verifies its stored receipt again: a receipt file grown past what
medgw ever stores (a full disk's worth, a tampered state folder) is refused after a
bounded read, never read whole into memory."""

from __future__ import annotations

import asyncio
import hashlib
import io
import tracemalloc
from pathlib import Path

from gateway.audit.log import AuditLog
from gateway.clock import SystemClock
from gateway.config import load_config
from gateway.logs import make_logger
from gateway.outbound.context import Context, Settings
from gateway.outbound.status import MAX_STORED_RECEIPT, MessageStatus
from gateway.pki.demo import DemoLayout
from gateway.spool import OutboundState, Settled, SqliteSpool
from tests.conftest import MakeSpool


def test_a_stored_receipt_past_the_bound_is_refused_without_reading_it_whole(
    layout: DemoLayout, tmp_path: Path
) -> None:
    config = load_config(layout.lab.config_path)
    spool = SqliteSpool(tmp_path / "spool.sqlite3", SystemClock())
    audit = AuditLog(tmp_path / "audit.jsonl", SystemClock(), node="lab")
    context = Context(
        Settings(config, {}), spool, audit, make_logger(stream=io.StringIO()), SystemClock()
    )
    receipt = context.receipts / "m.mdn"
    with receipt.open("wb") as handle:
        handle.write(b"Content-Type: multipart/signed\r\n\r\n")
        handle.truncate(64 * MAX_STORED_RECEIPT)  # sparse: costs no disk
    payload = tmp_path / "m.hl7"
    spool.add_intake("<m@lab>", "hospital", "m.hl7", "application/hl7-v2", payload, payload)
    spool.mark_queued("<m@lab>", None, [], "mic", 3, body=b"sealed")
    spool.mark_sending("<m@lab>")
    spool.mark_done("<m@lab>", OutboundState.DELIVERED, "processed", receipt)
    tracemalloc.start()
    try:
        view = asyncio.run(MessageStatus(context).status("<m@lab>"))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
        spool.close()
        audit.close()
    assert view is not None
    assert view["receipt"]["verified"] is False
    assert "larger than" in view["receipt"]["error"] and str(receipt) in view["receipt"]["error"]
    assert peak < 4 * MAX_STORED_RECEIPT


def test_a_receipt_kept_in_its_row_past_the_bound_is_refused_without_reading_it(
    layout: DemoLayout, tmp_path: Path, make_spool: MakeSpool
) -> None:
    """The same bound for a receipt kept in the spool row (both backends): one larger
    than any medgw stores (a tampered row) is refused as such, its size asked of the
    database, its bytes neither read nor opened nor parsed."""
    config = load_config(layout.lab.config_path)
    spool = make_spool(SystemClock())
    audit = AuditLog(tmp_path / "audit.jsonl", SystemClock(), node="lab")
    context = Context(
        Settings(config, {}), spool, audit, make_logger(stream=io.StringIO()), SystemClock()
    )
    payload = tmp_path / "m.hl7"
    spool.add_intake("<m@lab>", "hospital", "m.hl7", "application/hl7-v2", payload, payload)
    spool.mark_queued("<m@lab>", None, [], "mic", 3, body=b"sealed")
    spool.mark_sending("<m@lab>")
    grown = b"Content-Type: multipart/signed\r\n\r\n" + b"x" * (16 * MAX_STORED_RECEIPT)
    settled = Settled(
        "<m@lab>",
        OutboundState.DELIVERED,
        "processed",
        None,
        receipt=grown,
        receipt_sha256=hashlib.sha256(grown).hexdigest(),
    )
    assert spool.mark_settled([settled]) == ["<m@lab>"]
    del grown, settled
    tracemalloc.start()
    try:
        view = asyncio.run(MessageStatus(context).status("<m@lab>"))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
        audit.close()
    assert view is not None and view["receipt_kept"] == "spool"
    assert view["receipt"]["verified"] is False
    assert "larger than" in view["receipt"]["error"] and "in the spool" in view["receipt"]["error"]
    assert peak < 4 * MAX_STORED_RECEIPT
