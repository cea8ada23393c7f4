"""Where a receipt received is kept: in its message's spool row (no file created per
message), or, larger than a row keeps, in a file as before.  Receipt files no message's
row names are removed: at the next start (in process), and after an operator's retry
clears a message's receipt; a file a row names never is, compared by name (a row may
keep the path of a moved state folder).  A daemon killed before recording a receipt
leaves nothing behind.  A receipt kept as a file has its SHA-256 recorded in its row at
settlement, as a row's has."""

from __future__ import annotations

import asyncio
import hashlib
import io
import json
from pathlib import Path
from typing import Any

import pytest

from gateway.atrest import KeyStore, Vault
from gateway.atrest.chunked import MAGIC
from gateway.audit.log import AuditLog
from gateway.channel.client import Response
from gateway.clock import SystemClock
from gateway.config import load_config
from gateway.errors import SpoolError
from gateway.logs import make_logger
from gateway.operations import Operations
from gateway.outbound.context import Context, Settings
from gateway.outbound.recover import Recovery
from gateway.outbound.seal import INLINE_BODY_BYTES, Sealer
from gateway.outbound.settle import Answer, Settler
from gateway.outbound.status import MAX_SEALED_RECEIPT
from gateway.pki.demo import DemoLayout
from gateway.spool import Claimant, OutboundState, Settled, Spool, SqliteSpool
from gateway.spool.records import receipt_item
from tests.cli import medgw
from tests.clocks import SetClock
from tests.conftest import MakeSpool
from tests.helpers.atrest import kept_receipt, stored_receipt
from tests.helpers.audit import events, wait_for_events
from tests.helpers.faults import killed_at, wait_killed
from tests.helpers.local_api import LIS_TOKEN, enable_api
from tests.helpers.recovery import lab_starting, logged_files

OPERATOR = "operator:root (uid 0)"
KEPT = hashlib.sha256(b"kept").hexdigest()
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


def _sending(spool: Spool, message_id: str, tmp_path: Path, mic: str = "mic") -> None:
    spool.add_intake(message_id, "hospital", "m.hl7", "text/plain", tmp_path, tmp_path)
    spool.mark_queued(message_id, None, [], mic, 3, body=b"sealed")
    spool.mark_sending(message_id)


def test_receipts_are_kept_in_their_rows_and_one_larger_than_a_row_keeps_is_a_file(
    layout: DemoLayout, tmp_path: Path
) -> None:
    """Settled in one group: the small receipt sealed in its row (no file, no path), the
    large one a sealed file as before; each row records the SHA-256 of its receipt as
    received, and each audit record names where its receipt is, and that SHA-256; both
    read back as received."""
    config = load_config(layout.lab.config_path)
    spool = SqliteSpool(tmp_path / "spool.sqlite3", SystemClock())
    vault = Vault(KeyStore(tmp_path / "keys"), spool)
    vault.open()
    trail = tmp_path / "audit.jsonl"
    audit = AuditLog(trail, SystemClock(), node="lab")
    context = Context(
        Settings(config, {}),
        spool,
        audit,
        make_logger(stream=io.StringIO()),
        SystemClock(),
        vault,
    )
    peer = config.require_peer("hospital")
    bodies = {"<small@lab>": b"a small receipt", "<large@lab>": b"L" * (INLINE_BODY_BYTES + 1)}
    answers = []
    for message_id, body in bodies.items():
        _sending(spool, message_id, tmp_path)
        record = spool.get(message_id)
        assert record is not None
        answers.append(Answer(record, peer, Response(200, "text/plain", (), body)))
    try:
        # Not signed by the peer: failed by their receipts, which are kept all the same.
        assert Settler(context).settle_all(answers) == [None, None]
        small, large = spool.get("<small@lab>"), spool.get("<large@lab>")
        assert small is not None and large is not None
        assert small.receipt_kept and small.receipt_path is None
        sealed = spool.stored_receipt("<small@lab>", MAX_SEALED_RECEIPT)
        assert sealed is not None and sealed.startswith(MAGIC)
        stored = b"Content-Type: text/plain\r\n\r\na small receipt"
        assert vault.open_bytes(receipt_item("<small@lab>"), sealed) == stored
        assert (
            not large.receipt_kept
            and spool.stored_receipt("<large@lab>", MAX_SEALED_RECEIPT) is None
        )
        assert large.receipt_path is not None and large.receipt_path.parent == context.receipts
        assert large.receipt_path.read_bytes().startswith(MAGIC)
        assert vault.read_file(receipt_item("<large@lab>"), large.receipt_path).endswith(
            bodies["<large@lab>"]
        )
        assert _files(context.receipts) == {large.receipt_path.name}
        alerts = {r["message_id"]: r["detail"] for r in events(trail, "receipt.invalid")}
        assert alerts["<small@lab>"]["receipt"] == "spool"
        assert alerts["<small@lab>"]["receipt_sha256"] == hashlib.sha256(stored).hexdigest()
        assert "receipt_file" not in alerts["<small@lab>"]
        assert alerts["<large@lab>"]["receipt_file"] == str(large.receipt_path)
        # The file's SHA-256 recorded in its row as the row's is, and named by its record.
        plain = vault.read_file(receipt_item("<large@lab>"), large.receipt_path)
        assert large.receipt_sha256 == hashlib.sha256(plain).hexdigest()
        assert alerts["<large@lab>"]["receipt_sha256"] == large.receipt_sha256
    finally:
        audit.close()
        spool.close()


def test_a_retry_clears_a_receipt_kept_in_its_row_and_its_key(
    layout: DemoLayout, tmp_path: Path
) -> None:
    """Nothing of the cleared receipt stays readable: its bytes and its data key go in the
    retry's transaction; a retry the spool refuses changes neither."""
    config = load_config(layout.lab.config_path)
    spool = SqliteSpool(tmp_path / "spool.sqlite3", SystemClock())
    vault = Vault(KeyStore(tmp_path / "keys"), spool)
    vault.open()
    audit = AuditLog(config.storage.audit_log, SystemClock(), node="lab")
    for message_id, state in (
        ("<ok@lab>", OutboundState.DELIVERED),
        ("<bad@lab>", OutboundState.FAILED),
    ):
        _sending(spool, message_id, tmp_path)
        item = receipt_item(message_id)
        _, key = vault.new_key(item)
        disposition = "processed" if state is OutboundState.DELIVERED else "mic-mismatch"
        settled = Settled(
            message_id, state, disposition, None, None, key, receipt=b"kept", receipt_sha256=KEPT
        )
        assert spool.mark_settled([settled]) == [message_id]
    operations = Operations(config, spool, audit, SystemClock())
    try:
        with pytest.raises(SpoolError, match="is delivered"):
            operations.retry("<ok@lab>", OPERATOR)
        assert spool.stored_receipt("<ok@lab>", MAX_SEALED_RECEIPT) == b"kept"
        assert spool.data_key(receipt_item("<ok@lab>")) is not None
        retried = operations.retry("<bad@lab>", OPERATOR)
        assert retried.state is OutboundState.QUEUED and not retried.receipt_kept
        assert spool.stored_receipt("<bad@lab>", MAX_SEALED_RECEIPT) is None
        assert spool.data_key(receipt_item("<bad@lab>")) is None
    finally:
        audit.close()
        spool.close()


def test_a_receipt_verified_end_to_end_is_kept_in_its_row_and_no_file_is_created(
    layout: DemoLayout, processes: Any
) -> None:
    """Two real daemons: the lab keeps the receipt sealed in the message's row, creates
    no receipt file and names the row and the receipt's SHA-256 in its audit record; the
    local API verifies it again from the row, and ``queue show`` says where it is."""
    api = enable_api(layout)
    config = str(layout.lab.config_path)
    receipts = load_config(layout.lab.config_path).storage.receipts_dir
    processes.start(layout.hospital.config_path)
    lab = processes.start(layout.lab.config_path)
    status, view = api.request(
        "POST", "/v1/messages?to=hospital&filename=row.hl7", token=LIS_TOKEN, body=b"MSH|row\r"
    )
    assert status == 202, view
    message_id = view["message_id"]
    final = api.wait_final(message_id, LIS_TOKEN)
    assert final["state"] == "delivered", final
    assert final["receipt"]["verified"] is True and final["receipt"]["mic_matches"] is True
    [record] = wait_for_events(
        layout.lab.audit_log, "receipt.received", where=lambda r: r["message_id"] == message_id
    )
    sealed = stored_receipt(layout.lab.config_path, message_id)
    assert sealed is not None and sealed.startswith(MAGIC)
    plain = kept_receipt(layout.lab.config_path, message_id)
    assert record["detail"]["receipt"] == "spool"
    assert record["detail"]["receipt_sha256"] == hashlib.sha256(plain).hexdigest()
    shown = medgw("queue", "show", message_id, "--json", "--config", config)
    assert shown.returncode == 0, shown.stderr
    view = json.loads(shown.stdout)
    assert view["receipt_kept"] == "spool" and view["receipt_file"] is None
    assert list(receipts.iterdir()) == []
    assert lab.stop() == 0


def test_a_kill_between_storing_a_receipt_and_recording_it_leaves_nothing_behind(
    layout: DemoLayout, processes: Any
) -> None:
    """The daemon is killed before the spool records the receipt; nothing of it was
    stored (no file: it goes in the row, by that commit).  Started again, it sends the
    message again and keeps the receipt that answers in its row."""
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
    assert list(receipts.iterdir()) == []
    assert stored_receipt(layout.lab.config_path, message_id) is None

    lab = processes.start(layout.lab.config_path)
    final = api.wait_final(message_id, LIS_TOKEN)  # its receipt opened and verified again
    assert final["state"] == "delivered", final
    assert final["receipt"]["verified"] is True and final["receipt"]["mic_matches"] is True
    shown = medgw("queue", "show", message_id, "--json", "--config", config)
    assert shown.returncode == 0, shown.stderr
    assert json.loads(shown.stdout)["receipt_kept"] == "spool"
    assert list(receipts.iterdir()) == []
    assert lab.stop() == 0


def test_a_settlement_says_where_its_receipt_is_kept_one_way_only() -> None:
    """A receipt's SHA-256 goes with the receipt kept in the row or in a file, never alone;
    a receipt for the row always has one; no receipt is both in the row and a file."""
    sha256 = hashlib.sha256(b"kept").hexdigest()
    delivered = OutboundState.DELIVERED
    file = Path("/state/receipts/m.hl7.0123456789ab.mdn")
    Settled("<m@lab>", delivered, "processed", file, receipt_sha256=sha256)
    Settled("<m@lab>", delivered, "processed", None, receipt=b"kept", receipt_sha256=sha256)
    with pytest.raises(SpoolError, match="without its SHA-256"):
        Settled("<m@lab>", delivered, "processed", None, receipt=b"kept")
    with pytest.raises(SpoolError, match="SHA-256 without the receipt"):
        Settled("<m@lab>", delivered, "processed", None, receipt_sha256=sha256)
    with pytest.raises(SpoolError, match="both in its row and in the file"):
        Settled("<m@lab>", delivered, "processed", file, receipt=b"kept", receipt_sha256=sha256)


def test_the_record_a_start_writes_after_another_node_retried_names_the_files_sha256(
    layout: DemoLayout, make_spool: MakeSpool, tmp_path: Path
) -> None:
    """Both backends.  Node a settles a message as failed by a receipt kept as a file, its
    SHA-256 recorded, and is killed before its message.failed; an operator retries it
    on node b.  The copy of the row kept for a reads as a file receipt (not one kept in
    the row), and a's start writes message.failed naming the file and its SHA-256."""
    clock = SetClock()
    a = make_spool(clock, Claimant("a", 60.0))
    b = make_spool(clock, Claimant("b", 60.0))
    config = load_config(layout.lab.config_path)
    a.add_intake("<m@lab>", "hospital", "m.hl7", "text/plain", tmp_path / "src", tmp_path / "m")
    assert a.mark_queued("<m@lab>", None, [], "mic", 3, body=b"sealed")
    a.claim_due("hospital", clock.now().timestamp(), 1)
    path = tmp_path / "m.hl7.0123456789ab.mdn"
    sha256 = "5e" * 32
    failed = Settled(
        "<m@lab>",
        OutboundState.FAILED,
        "processed/error: decryption-failed",
        path,
        "decryption failed at the peer",
        receipt_sha256=sha256,
    )
    assert a.mark_settled([failed]) == ["<m@lab>"]
    settled = a.get("<m@lab>")
    assert settled is not None and settled.receipt_sha256 == sha256
    assert settled.receipt_form == "file"
    # Killed here.  An operator on node b retries it: the receipt is cleared.
    clock.advance(5)
    retried = b.operator_retry("<m@lab>", OPERATOR, 0)
    assert not retried.has_receipt and retried.receipt_sha256 is None
    [copy] = a.displaced_owed().outbound
    assert copy.receipt_form == "file" and not copy.receipt_kept
    assert (copy.receipt_path, copy.receipt_sha256) == (path, sha256)

    clock.advance(5)
    for _ in range(2):  # a second start finds it recorded
        audit = AuditLog(config.storage.audit_log, clock, node="a")
        context = Context(Settings(config, {}), a, audit, make_logger(stream=io.StringIO()), clock)
        asyncio.run(Recovery(context, Sealer(context)).recover())
        audit.close()
    [record] = events(config.storage.audit_log, "message.failed")
    assert record["message_id"] == "<m@lab>" and record["node"] == "a"
    assert record["detail"] == {
        "disposition": "processed/error: decryption-failed",
        "receipt_file": str(path),
        "receipt_sha256": sha256,
        "attempts": 1,
        "recorded_at_recovery": True,
    }
