"""The records a start writes for settlements by receipt that a kill cut off from the
audit trail (in process; the daemon kill tests are in test_recorded_at_recovery.py and
test_intake.py): receipt.received, or message.failed as an alert, marked as written at
recovery, once each."""

from __future__ import annotations

import asyncio
import hashlib
import io
from pathlib import Path

import pytest

from gateway.audit.log import AuditLog
from gateway.audit.owed import RECOVERED
from gateway.clock import SystemClock
from gateway.config import load_config
from gateway.demo_run import read_audit
from gateway.logs import make_logger
from gateway.outbound.context import Context, Settings
from gateway.outbound.recover import Recovery
from gateway.outbound.seal import Sealer
from gateway.pki.demo import DemoLayout
from gateway.spool import OutboundState, Settled, SqliteSpool

REFUSED = "processed/error: decryption-failed"
KEPT = hashlib.sha256(b"kept").hexdigest()


@pytest.mark.parametrize("form", ["row", "file"], ids=["receipt-in-row", "receipt-file"])
@pytest.mark.parametrize("kept", [True, False], ids=["owed-record-kept", "settled-before-kept"])
def test_settlements_without_their_records_get_them_at_the_next_start(
    layout: DemoLayout, tmp_path: Path, kept: bool, form: str
) -> None:
    """Whether the spool names the record each change owes, or the changes were made by
    a medgw from before it did (the start judges by their state): the same records,
    naming where the receipt is kept (its row, or its file)."""
    config = load_config(layout.lab.config_path)
    spool = SqliteSpool(tmp_path / "spool.sqlite3", SystemClock())
    for message_id, state, disposition, error in [
        ("<ok@lab>", OutboundState.DELIVERED, "processed", None),
        ("<no@lab>", OutboundState.FAILED, REFUSED, "refused"),
    ]:
        payload = tmp_path / message_id
        spool.add_intake(message_id, "hospital", "m.hl7", "text/plain", payload, payload)
        spool.mark_queued(message_id, None, [], "mic", 3, body=b"sealed")
        spool.mark_sending(message_id)
        if form == "file":
            spool.mark_done(message_id, state, disposition, tmp_path / "r.mdn", error=error)
        else:
            settled = Settled(
                message_id, state, disposition, None, error, receipt=b"kept", receipt_sha256=KEPT
            )
            assert spool.mark_settled([settled]) == [message_id]
    if not kept:
        spool._write("UPDATE outbound SET audit_owed=NULL, audit_owed_at=NULL", ())
    audit = AuditLog(config.storage.audit_log, SystemClock(), node="lab")
    context = Context(
        Settings(config, {}), spool, audit, make_logger(stream=io.StringIO()), SystemClock()
    )
    for _ in range(2):  # a second start finds them recorded
        asyncio.run(Recovery(context, Sealer(context)).recover())
    audit.close()
    records = read_audit(config.storage.audit_log)
    # Queued here with no record either: their message.accepted, once each.
    accepted = [r["message_id"] for r in records if r["event"] == "message.accepted"]
    assert sorted(accepted) == ["<no@lab>", "<ok@lab>"]
    records = [r for r in records if r["event"] != "message.accepted"]
    assert len(records) == 2
    expected = {
        "<ok@lab>": ("receipt.received", "success", "info", "settled by its receipt", "processed"),
        "<no@lab>": ("message.failed", "failure", "alert", "refused", REFUSED),
    }
    for record in records:
        event, outcome, severity, reason, disposition = expected[record["message_id"]]
        want = {
            "event": event,
            "direction": "outbound",
            "peer": "hospital",
            "node": "lab",
            "outcome": outcome,
            "severity": severity,
            "reason": f"{reason}; {RECOVERED}",
            "detail": {
                "disposition": disposition,
                **(
                    {"receipt_file": str(tmp_path / "r.mdn")}
                    if form == "file"
                    else {"receipt": "spool", "receipt_sha256": KEPT}
                ),
                **({"attempts": 1} if outcome == "failure" else {}),
                "recorded_at_recovery": True,
            },
        }
        assert record.items() >= want.items()
