"""Receipt files no message's row names are removed: at the next start (a real daemon
killed between storing a receipt and recording it; and in process), and after an
operator's retry clears a message's receipt; a file a row names never is, compared by
name (a row may keep the path of a moved state folder)."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import pytest

from gateway.audit.log import AuditLog
from gateway.clock import SystemClock
from gateway.config import load_config
from gateway.errors import SpoolError
from gateway.operations import Operations
from gateway.outbound.recover import Recovery
from gateway.outbound.seal import Sealer
from gateway.pki.demo import DemoLayout
from gateway.spool import OutboundState, Settled, SqliteSpool
from tests.cli import medgw
from tests.helpers.faults import killed_at, wait_killed
from tests.helpers.local_api import LIS_TOKEN, enable_api
from tests.helpers.recovery import lab_starting, logged_files

OPERATOR = "operator:root (uid 0)"
OUTBOUND = "gateway.spool.sqlite.outbound:OutboundQueue"


def _settled(
    spool: SqliteSpool, message_id: str, state: OutboundState, receipt: Path, tmp_path: Path
) -> None:
    spool.add_intake(message_id, "hospital", "m.hl7", "text/plain", tmp_path, tmp_path)
    spool.mark_queued(message_id, None, [], "mic", 3, body=b"sealed")
    spool.mark_sending(message_id)
    disposition = "processed" if state is OutboundState.DELIVERED else "mic-mismatch"
    assert spool.mark_settled([Settled(message_id, state, disposition, receipt)])


def _files(folder: Path) -> set[str]:
    return {p.name for p in folder.iterdir()}


def test_a_start_removes_the_receipt_files_no_row_names_and_keeps_those_named(
    layout: DemoLayout, tmp_path: Path
) -> None:
    spool, audit, context, log = lab_starting(layout, tmp_path)
    receipts = context.receipts
    named = receipts / "ok.hl7.0123456789ab.mdn"
    # Stored before the state folder was moved: the row keeps the old path, the file is
    # here under its name.
    moved = Path("/var/lib/medgw-old/state/receipts/bad.hl7.abcdefabcdef.mdn")
    _settled(spool, "<ok@lab>", OutboundState.DELIVERED, named, tmp_path)
    _settled(spool, "<bad@lab>", OutboundState.FAILED, moved, tmp_path)
    for name in (
        named.name,
        moved.name,
        "cut-off.hl7.fedcba987654.mdn",  # stored, then killed before its commit
        "older.hl7.mdn",  # a name from before receipts had names of their own
        ".hidden.mdn",  # not one settling writes: left alone
        "notes.txt",
    ):
        (receipts / name).write_bytes(b"Content-Type: text/plain\r\n\r\nreceipt")
    (receipts / "folder.mdn").mkdir()

    for _ in range(2):  # a second start finds nothing more to remove
        asyncio.run(Recovery(context, Sealer(context)).recover())
    audit.close()

    assert _files(receipts) == {named.name, moved.name, ".hidden.mdn", "notes.txt", "folder.mdn"}
    removed = logged_files(log, "recovery.removed_unrecorded_receipt")
    assert removed == ["cut-off.hl7.fedcba987654.mdn", "older.hl7.mdn"]
    spool.close()


def test_a_retry_removes_the_receipt_it_cleared_once_committed_and_no_other(
    layout: DemoLayout, tmp_path: Path
) -> None:
    """Its name in this node's receipts folder (the row's path is of a moved folder);
    a retry the spool refuses removes nothing."""
    config = load_config(layout.lab.config_path)
    spool = SqliteSpool(tmp_path / "spool.sqlite3", SystemClock())
    audit = AuditLog(config.storage.audit_log, SystemClock(), node="lab")
    receipts = config.storage.receipts_dir
    receipts.mkdir(parents=True, exist_ok=True)
    delivered = receipts / "ok.hl7.0123456789ab.mdn"
    failed = receipts / "bad.hl7.abcdefabcdef.mdn"
    _settled(spool, "<ok@lab>", OutboundState.DELIVERED, delivered, tmp_path)
    _settled(spool, "<bad@lab>", OutboundState.FAILED, Path("/moved") / failed.name, tmp_path)
    for path in (delivered, failed):
        path.write_bytes(b"receipt")
    operations = Operations(config, spool, audit, SystemClock())

    with pytest.raises(SpoolError, match="is delivered"):
        operations.retry("<ok@lab>", OPERATOR)
    assert _files(receipts) == {delivered.name, failed.name}

    retried = operations.retry("<bad@lab>", OPERATOR)
    assert retried.state is OutboundState.QUEUED and retried.receipt_path is None
    assert _files(receipts) == {delivered.name}
    assert spool.receipts_recorded([delivered.name, failed.name]) == {delivered.name}
    audit.close()
    spool.close()


def test_a_kill_between_storing_a_receipt_and_recording_it_leaves_no_file_behind(
    layout: DemoLayout, processes: Any
) -> None:
    """The receipt is stored (encrypted at rest under a key never recorded), the daemon is
    killed before the spool records it; started again, it removes that file, sends the
    message again and keeps the receipt that answers: the one its row names."""
    api = enable_api(layout)
    config = str(layout.lab.config_path)
    receipts = load_config(layout.lab.config_path).storage.receipts_dir
    processes.start(layout.hospital.config_path)
    lab = processes.start(
        layout.lab.config_path, prefix=killed_at("--kill-before", f"{OUTBOUND}.mark_settled")
    )
    # Held until the local API has answered: the kill comes after that.
    held = medgw("peers", "suspend", "hospital", "--reason", "held", "--config", config)
    assert held.returncode == 0, held.stderr
    status, view = api.request(
        "POST", "/v1/messages?to=hospital&filename=kept.hl7", token=LIS_TOKEN, body=b"MSH|kept\r"
    )
    assert status == 202, view
    message_id = view["message_id"]
    assert medgw("peers", "resume", "hospital", "--config", config).returncode == 0
    wait_killed(lab)
    [cut_off] = [p.name for p in receipts.iterdir() if p.suffix == ".mdn"]  # not recorded

    lab = processes.start(layout.lab.config_path)
    removed = lab.wait_for(
        lambda line: line.get("event") == "recovery.removed_unrecorded_receipt", 60
    )
    assert removed["file"] == cut_off
    final = api.wait_final(message_id, LIS_TOKEN)  # its receipt opened and verified again
    assert final["state"] == "delivered", final
    assert final["receipt"]["verified"] is True and final["receipt"]["mic_matches"] is True
    shown = medgw("queue", "show", message_id, "--json", "--config", config)
    assert shown.returncode == 0, shown.stderr
    kept = Path(json.loads(shown.stdout)["receipt_file"])
    assert kept.name != cut_off
    assert [p for p in receipts.iterdir()] == [kept]
    assert lab.stop() == 0
