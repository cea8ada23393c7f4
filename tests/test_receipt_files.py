"""Where a receipt received is kept: in its message's spool row (no file created per
message), or, larger than a row keeps, in a file as before.  Receipt files no message's
row names are removed: at the next start (in process), and after an operator's retry
clears a message's receipt; a file a row names never is, compared by name (a row may
keep the path of a moved state folder).  A daemon killed before recording a receipt
leaves nothing behind.  A receipt kept as a file has its SHA-256 recorded in its row at
settlement, as a row's has: a file put in its place (another message's receipt,
validly signed by the same peer) is not shown as this message's."""

from __future__ import annotations

import asyncio
import hashlib
import io
import json
import secrets
import ssl
import threading
from collections.abc import Iterator, Sequence
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, cast

import pytest

from gateway.as2.mdn import BuiltReceipt
from gateway.atrest import KeyStore, Vault
from gateway.atrest.chunked import MAGIC, seal_bytes
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
from gateway.outbound.settle import INLINE_RECEIPT_BYTES, Answer, Settler
from gateway.outbound.status import ALTERED_FIX, MAX_SEALED_RECEIPT, MessageStatus
from gateway.pki.demo import DemoLayout
from gateway.pki.peers import assess_peers
from gateway.retention.purge import PurgeRequest, Retention
from gateway.spool import (
    Claimant,
    OutboundRecord,
    OutboundState,
    Settled,
    Spool,
    SqliteSpool,
    open_spool,
)
from gateway.spool.postgres import PostgresSettings
from gateway.spool.records import Disposable, RetainedKind, receipt_item
from tests.cli import medgw
from tests.clocks import SetClock
from tests.conftest import MakeSpool
from tests.helpers.atrest import kept_receipt, stored_receipt
from tests.helpers.audit import events, wait_for_events
from tests.helpers.cluster import add_node
from tests.helpers.demo import hospital_receipt
from tests.helpers.faults import killed_at, wait_killed
from tests.helpers.local_api import LIS_TOKEN, enable_api, two_delivered
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


VICTIM, DONOR = "<victim@lab>", "<donor@lab>"
MIC = "bWljIG9mIHRoZSBkb2N1bWVudCBzZW50IHRvIHRoZSBob3NwaXRhbA==, sha-256"
ALTERED = "does not match the receipt recorded when the message was settled"


def _large_receipt(layout: DemoLayout, message_id: str, mic: str) -> BuiltReceipt:
    """A processed receipt the hospital signs for ``message_id``, larger than a spool row
    keeps (a long explanation in its human-readable part): kept as a file."""
    built = hospital_receipt(
        layout, message_id, mic, details="checked " * (INLINE_RECEIPT_BYTES // 8 + 1)
    )
    assert len(built.body) > INLINE_RECEIPT_BYTES
    return built


def _content_type(built: BuiltReceipt) -> str:
    [value] = [v for name, v in built.headers if name.lower() == "content-type"]
    return value


def _judging_context(
    layout: DemoLayout,
    spool: Spool,
    trail: Path,
    vault: Vault | None,
    log: io.StringIO | None = None,
) -> tuple[Context, AuditLog]:
    """A context that judges the hospital's receipts as the daemon does (its certificates
    assessed), with an audit trail of its own (and its log to ``log``)."""
    config = load_config(layout.lab.config_path)
    trust = asyncio.run(assess_peers(config.peers, config.zones, at=SystemClock().now()))
    audit = AuditLog(trail, SystemClock(), node="lab")
    context = Context(
        Settings(config, trust),
        spool,
        audit,
        make_logger(stream=log or io.StringIO()),
        SystemClock(),
        vault,
    )
    return context, audit


@pytest.mark.parametrize("at_rest", ["sealed", "in the clear"])
def test_a_receipt_file_swapped_for_another_messages_receipt_is_reported_altered(
    layout: DemoLayout, tmp_path: Path, make_spool: MakeSpool, at_rest: str
) -> None:
    """Both backends, receipts encrypted at rest or not: two messages settled by receipts
    too large for their rows, each a file whose SHA-256 its row records (and the audit
    record of the settlement names).  One's file replaced by the other's receipt (sealed
    under the victim's own data key, as one who can read the key folder would; or copied
    as it is, at-rest encryption off) still verifies as the peer's signature; its SHA-256
    is not the one recorded, and the status says it was altered instead of showing it,
    with one alert however often it is read."""
    spool = make_spool(SystemClock())
    vault = None
    if at_rest == "sealed":
        vault = Vault(KeyStore(tmp_path / "keys"), spool)
        vault.open()
    trail = tmp_path / "audit.jsonl"
    context, audit = _judging_context(layout, spool, trail, vault)
    peer = context.config.require_peer("hospital")
    answers = []
    for message_id in (VICTIM, DONOR):
        _sending(spool, message_id, tmp_path, MIC)
        record = spool.get(message_id)
        assert record is not None
        built = _large_receipt(layout, message_id, MIC)
        answers.append(Answer(record, peer, Response(200, _content_type(built), (), built.body)))
    status = MessageStatus(context)
    try:
        assert Settler(context).settle_all(answers) == [None, None]
        received = {r["message_id"]: r["detail"] for r in events(trail, "receipt.received")}
        kept: dict[str, tuple[Path, bytes]] = {}
        for message_id in (VICTIM, DONOR):
            record = spool.get(message_id)
            assert record is not None and record.state is OutboundState.DELIVERED
            assert not record.receipt_kept and record.receipt_path is not None
            path = record.receipt_path
            assert path.read_bytes().startswith(MAGIC) == (vault is not None)
            plain = vault.read_file(receipt_item(message_id), path) if vault else path.read_bytes()
            assert record.receipt_sha256 == hashlib.sha256(plain).hexdigest()
            assert received[message_id]["receipt_file"] == str(path)
            assert received[message_id]["receipt_sha256"] == record.receipt_sha256
            kept[message_id] = (path, plain)
        view = asyncio.run(status.status(VICTIM))
        assert view is not None and view["receipt"]["verified"] is True, view
        assert view["receipt"]["original_message_id"] == VICTIM

        path, donor = kept[VICTIM][0], kept[DONOR][1]
        item = receipt_item(VICTIM)
        path.write_bytes(seal_bytes(vault._key(item), item, donor) if vault else donor)
        for _ in range(2):
            view = asyncio.run(status.status(VICTIM))
            assert view is not None
            receipt = view["receipt"]
            assert receipt["verified"] is False and receipt["altered"] is True, receipt
            assert VICTIM in receipt["error"] and ALTERED in receipt["error"], receipt
            assert "restore the spool and the state folder from a backup" in receipt["error"]
            assert not {"disposition", "signer", "original_message_id", "mic"} & set(receipt)
        view = asyncio.run(status.status(DONOR))
        assert view is not None and view["receipt"]["verified"] is True, view  # untouched
    finally:
        audit.close()
    [alert] = events(trail, "atrest.integrity_failed")
    assert alert["message_id"] == VICTIM and ALTERED in alert["reason"], alert


@pytest.mark.parametrize("settled", ["with its SHA-256", "before its SHA-256 was recorded"])
def test_a_sealed_receipt_file_whose_data_key_is_gone(
    layout: DemoLayout, tmp_path: Path, make_spool: MakeSpool, settled: str
) -> None:
    """Both backends: a sealed receipt file still named by an unchanged row whose data key
    was deleted from the spool.  Settled with its SHA-256 (every settlement since), it
    was altered outside medgw (settlement stores the key with it, a retry or retention
    deletes both): reported so, alerted once, naming the file in the trail only.
    Settled before (no SHA-256), a PostgreSQL backup of then could carry the file
    without its key: it cannot be opened now, no alarm."""
    spool = make_spool(SystemClock())
    vault = Vault(KeyStore(tmp_path / "keys"), spool)
    vault.open()
    trail = tmp_path / "audit.jsonl"
    context, audit = _judging_context(layout, spool, trail, vault)
    peer = context.config.require_peer("hospital")
    _sending(spool, VICTIM, tmp_path, MIC)
    record = spool.get(VICTIM)
    assert record is not None
    built = _large_receipt(layout, VICTIM, MIC)
    answer = Answer(record, peer, Response(200, _content_type(built), (), built.body))
    status = MessageStatus(context)
    try:
        assert Settler(context).settle_all([answer]) == [None]
        record = spool.get(VICTIM)
        assert record is not None and record.receipt_path is not None
        assert record.receipt_path.read_bytes().startswith(MAGIC)
        if settled != "with its SHA-256":
            spool._write(  # type: ignore[attr-defined]
                "UPDATE outbound SET receipt_sha256=NULL WHERE message_id=?", (VICTIM,)
            )
        spool._write("DELETE FROM data_keys WHERE item=?", (receipt_item(VICTIM),))  # type: ignore[attr-defined]
        for _ in range(2):
            view = asyncio.run(status.status(VICTIM))
            assert view is not None
            receipt = view["receipt"]
            assert receipt["verified"] is False, receipt
            assert str(tmp_path) not in receipt["error"], receipt
            if settled == "with its SHA-256":
                assert receipt["altered"] is True, receipt
                assert "data key was removed from the spool" in receipt["error"], receipt
                assert view["disposition"] is None, view
            else:
                assert "altered" not in receipt, receipt
                assert "cannot be opened now" in receipt["error"], receipt
                assert view["disposition"] == "processed", view
    finally:
        audit.close()
    alerts = events(trail, "atrest.integrity_failed")
    if settled == "with its SHA-256":
        [alert] = alerts
        assert alert["message_id"] == VICTIM, alert
        assert alert["detail"]["receipt_file"] == str(record.receipt_path), alert
    else:
        assert alerts == []


@pytest.mark.parametrize("settled", ["with its SHA-256", "before its SHA-256 was recorded"])
def test_a_sealed_receipt_file_whose_data_key_was_overwritten(
    layout: DemoLayout, tmp_path: Path, make_spool: MakeSpool, settled: str
) -> None:
    """Both backends: two sealed receipt files, and one's data key overwritten in the
    spool.  It no longer unwraps while the other's, under the same key-encryption key,
    does (the key folder is the right one): as a data key deleted, altered outside medgw
    if settled with its SHA-256 (reported so, alerted once, naming the file in the trail
    only); otherwise it cannot be opened now, no alarm."""
    spool = make_spool(SystemClock())
    vault = Vault(KeyStore(tmp_path / "keys"), spool)
    vault.open()
    trail = tmp_path / "audit.jsonl"
    context, audit = _judging_context(layout, spool, trail, vault)
    peer = context.config.require_peer("hospital")
    answers = []
    for message_id in (VICTIM, DONOR):
        _sending(spool, message_id, tmp_path, MIC)
        record = spool.get(message_id)
        assert record is not None
        built = _large_receipt(layout, message_id, MIC)
        answers.append(Answer(record, peer, Response(200, _content_type(built), (), built.body)))
    status = MessageStatus(context)
    try:
        assert Settler(context).settle_all(answers) == [None, None]
        record = spool.get(VICTIM)
        assert record is not None and record.receipt_path is not None
        assert record.receipt_path.read_bytes().startswith(MAGIC)
        if settled != "with its SHA-256":
            spool._write(  # type: ignore[attr-defined]
                "UPDATE outbound SET receipt_sha256=NULL WHERE message_id=?", (VICTIM,)
            )
        key = spool.data_key(receipt_item(VICTIM))
        assert key is not None
        spool._write(  # type: ignore[attr-defined]
            "UPDATE data_keys SET wrapped=? WHERE item=?",
            (secrets.token_bytes(len(key.wrapped)), key.item),
        )
        for _ in range(2):
            view = asyncio.run(status.status(VICTIM))
            assert view is not None
            receipt = view["receipt"]
            assert receipt["verified"] is False, receipt
            assert str(tmp_path) not in receipt["error"], receipt
            if settled == "with its SHA-256":
                assert receipt["altered"] is True, receipt
                assert "data key was changed in the spool" in receipt["error"], receipt
                assert view["disposition"] is None, view
            else:
                assert "altered" not in receipt, receipt
                assert "cannot be opened now" in receipt["error"], receipt
                assert view["disposition"] == "processed", view
        view = asyncio.run(status.status(DONOR))
        assert view is not None and view["receipt"]["verified"] is True, view  # untouched
    finally:
        audit.close()
    alerts = events(trail, "atrest.integrity_failed")
    if settled == "with its SHA-256":
        [alert] = alerts
        assert alert["message_id"] == VICTIM, alert
        assert alert["detail"]["receipt_file"] == str(record.receipt_path), alert
    else:
        assert alerts == []


def test_a_receipt_file_settled_before_its_sha256_was_recorded_is_still_shown(
    layout: DemoLayout, tmp_path: Path, make_spool: MakeSpool
) -> None:
    """Both backends: a receipt file settled by a medgw from before (no SHA-256 in its
    row) is verified and shown as it was then; it cannot be checked for a swap."""
    spool = make_spool(SystemClock())
    trail = tmp_path / "audit.jsonl"
    context, audit = _judging_context(layout, spool, trail, None)
    _sending(spool, VICTIM, tmp_path, MIC)
    built = _large_receipt(layout, VICTIM, MIC)
    path = context.receipts / "old.hl7.0123456789ab.mdn"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(f"Content-Type: {_content_type(built)}\r\n\r\n".encode() + built.body)
    assert spool.mark_done(VICTIM, OutboundState.DELIVERED, "processed", path)
    record = spool.get(VICTIM)
    assert record is not None and record.receipt_sha256 is None and record.receipt_form == "file"
    try:
        view = asyncio.run(MessageStatus(context).status(VICTIM))
    finally:
        audit.close()
    assert view is not None
    assert view["receipt"]["verified"] is True and view["receipt"]["mic_matches"] is True, view
    assert view["receipt"]["original_message_id"] == VICTIM
    assert events(trail, "atrest.integrity_failed") == []


def _settled_in_file(
    layout: DemoLayout,
    spool: Spool,
    path: Path,
    *,
    sha256: bool = True,
    state: OutboundState = OutboundState.DELIVERED,
) -> None:
    """VICTIM sent by ``spool``'s node and settled by it with a receipt the hospital
    signed, too large for its row, kept in the clear as the file ``path`` (written), its
    SHA-256 recorded (``sha256``) or not (settled by a medgw from before)."""
    _sending(spool, VICTIM, path.parent, MIC)
    built = _large_receipt(layout, VICTIM, MIC)
    stored = f"Content-Type: {_content_type(built)}\r\n\r\n".encode() + built.body
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(stored)
    disposition = "processed" if state is OutboundState.DELIVERED else "failed"
    recorded = hashlib.sha256(stored).hexdigest() if sha256 else None
    settled = Settled(VICTIM, state, disposition, path, receipt_sha256=recorded)
    assert spool.mark_settled([settled]) == [VICTIM]


def _status(context: Context, message_id: str = VICTIM) -> dict[str, Any]:
    view = asyncio.run(MessageStatus(context).status(message_id))
    assert view is not None
    return view


def _log_lines(log: io.StringIO, event: str) -> list[dict[str, Any]]:
    """The lines of ``event`` written to ``log``."""
    lines = [json.loads(line) for line in log.getvalue().splitlines()]
    return [line for line in lines if line["event"] == event]


def test_a_receipt_file_removed_while_its_row_names_it_is_reported_altered(
    layout: DemoLayout, tmp_path: Path, make_spool: MakeSpool
) -> None:
    """Both backends: a receipt file this node stored, its SHA-256 recorded when it
    settled the message, removed while the row still names it (retention and a retry
    clear the row once they remove the file) was removed outside medgw: reported as
    the other altered receipts are, the row's disposition not shown, one alert however
    often it is asked; not "no receipt" beside the row's "processed"."""
    spool = make_spool(SystemClock())
    trail = tmp_path / "audit.jsonl"
    log = io.StringIO()
    context, audit = _judging_context(layout, spool, trail, None, log)
    path = context.receipts / "v.hl7.0123456789ab.mdn"
    try:
        _settled_in_file(layout, spool, path)
        status = MessageStatus(context)
        view = asyncio.run(status.status(VICTIM))
        assert view is not None and view["receipt"]["verified"] is True, view
        path.unlink()
        for _ in range(2):
            view = asyncio.run(status.status(VICTIM))
            assert view is not None
            receipt = view["receipt"]
            assert receipt is not None, view
            assert receipt["verified"] is False and receipt["altered"] is True, receipt
            assert VICTIM in receipt["error"] and "was removed" in receipt["error"], receipt
            assert ALTERED_FIX in receipt["error"], receipt
            assert str(tmp_path) not in receipt["error"], receipt
            assert view["disposition"] is None and view["state"] == "delivered", view
    finally:
        audit.close()
    [alert] = events(trail, "atrest.integrity_failed")
    assert alert["message_id"] == VICTIM and alert["detail"]["receipt_file"] == str(path), alert
    [line] = _log_lines(log, "receipt.stored_altered")
    assert line["receipt_file"] == str(path), line


def test_a_receipt_file_settled_before_its_sha256_was_recorded_and_gone_cannot_be_read(
    layout: DemoLayout, tmp_path: Path, make_spool: MakeSpool
) -> None:
    """Both backends: a receipt file from before files had their SHA-256 recorded, gone
    while its row names it, "cannot be read now" (nothing tells its removal from a
    file never checked): not altered, no alert, the row's disposition stands, and a
    warning in the log names the file, once."""
    spool = make_spool(SystemClock())
    trail = tmp_path / "audit.jsonl"
    log = io.StringIO()
    context, audit = _judging_context(layout, spool, trail, None, log)
    path = context.receipts / "old.hl7.0123456789ab.mdn"
    try:
        _settled_in_file(layout, spool, path, sha256=False)
        path.unlink()
        status = MessageStatus(context)  # one daemon's, asked twice
        views = [asyncio.run(status.status(VICTIM)) for _ in range(2)]
    finally:
        audit.close()
    for view in views:
        assert view is not None
        receipt = view["receipt"]
        assert receipt is not None, view
        assert receipt["verified"] is False and "altered" not in receipt, receipt
        assert "cannot be read now" in receipt["error"], receipt
        assert str(tmp_path) not in receipt["error"], receipt
        assert view["disposition"] == "processed", view
    assert events(trail, "atrest.integrity_failed") == []
    [line] = _log_lines(log, "receipt.unopenable")
    assert line["receipt_file"] == str(path), line


def test_a_receipt_file_named_outside_this_nodes_receipts_folder_is_not_called_altered(
    layout: DemoLayout, tmp_path: Path, make_spool: MakeSpool
) -> None:
    """Both backends: a row settled by this node naming a receipt file in another folder
    (a state folder moved by hand since), the file not there: it "cannot be read now",
    no alert, the row's disposition stands."""
    spool = make_spool(SystemClock())
    trail = tmp_path / "audit.jsonl"
    context, audit = _judging_context(layout, spool, trail, None)
    path = tmp_path / "old-state" / "receipts" / "v.hl7.0123456789ab.mdn"
    assert path.parent != context.receipts
    try:
        _settled_in_file(layout, spool, path)
        path.unlink()
        view = _status(context)
    finally:
        audit.close()
    receipt = view["receipt"]
    assert receipt is not None and "altered" not in receipt, view
    assert "cannot be read now" in receipt["error"] and "moved" in receipt["error"], receipt
    assert str(tmp_path) not in receipt["error"], receipt
    assert view["disposition"] == "processed", view
    assert events(trail, "atrest.integrity_failed") == []


class _DisposedAfterTheRowIsRead:
    """The spool, where retention disposes of VICTIM's receipt (its row cleared, then its
    file removed) just after the status's first read of the row."""

    def __init__(self, spool: Spool, path: Path) -> None:
        self._spool = spool
        self._path = path
        self.interleaved = False

    def get(self, message_id: str) -> OutboundRecord | None:
        record = self._spool.get(message_id)
        if message_id == VICTIM and not self.interleaved:
            self.interleaved = True
            batch = self._spool.disposable(RetainedKind.RECEIPTS, "9999-12-31T00:00:00+00:00")
            assert [item.message_id for item in self._spool.dispose(batch)] == [VICTIM]
            self._path.unlink()
        return record

    def __getattr__(self, name: str) -> Any:
        return getattr(self._spool, name)


def test_a_receipt_file_retention_disposes_of_while_it_is_read_is_no_alarm(
    layout: DemoLayout, tmp_path: Path, make_spool: MakeSpool
) -> None:
    """Both backends: retention clears the row, then removes the receipt file; a status
    that read the row before and finds the file gone reads the row again and shows it
    as it is now (no receipt kept), with no alert."""
    spool = make_spool(SystemClock())
    trail = tmp_path / "audit.jsonl"
    path = load_config(layout.lab.config_path).storage.receipts_dir / "v.hl7.0123456789ab.mdn"
    reads = _DisposedAfterTheRowIsRead(spool, path)
    log = io.StringIO()
    context, audit = _judging_context(layout, cast(Spool, reads), trail, None, log)
    try:
        _settled_in_file(layout, spool, path)
        view = _status(context)
    finally:
        audit.close()
    assert reads.interleaved
    assert view["receipt"] is None and view["receipt_kept"] is None, view
    assert view["state"] == "delivered", view
    assert events(trail, "atrest.integrity_failed") == []
    assert _log_lines(log, "receipt.stored_altered") == []


class _ReadAroundTheDisposal:
    """The spool retention disposes of VICTIM's receipt through: its status read just
    before the disposal's commit and just after it, before retention goes on (whichever
    of retention's two steps, clearing the row and removing the file, comes first, one
    of the reads falls between them)."""

    def __init__(self, spool: Spool, context: Context) -> None:
        self._spool = spool
        self._context = context
        self.views: list[dict[str, Any]] = []

    def dispose(self, items: Sequence[Disposable]) -> list[Disposable]:
        self.views.append(_status(self._context))
        done = self._spool.dispose(items)
        self.views.append(_status(self._context))
        return done

    def __getattr__(self, name: str) -> Any:
        return getattr(self._spool, name)


def test_a_status_read_while_retention_disposes_of_a_receipt_file_is_no_alarm(
    layout: DemoLayout, tmp_path: Path, make_spool: MakeSpool
) -> None:
    """Both backends: a status read between the two steps of retention's disposal of a
    receipt file (the row cleared first, then the file removed) shows the row as it
    is, never "altered"; the file is gone once the purge returns."""
    spool = make_spool(SystemClock())
    trail = tmp_path / "audit.jsonl"
    log = io.StringIO()
    context, audit = _judging_context(layout, spool, trail, None, log)
    path = context.receipts / "v.hl7.0123456789ab.mdn"
    around = _ReadAroundTheDisposal(spool, context)
    try:
        _settled_in_file(layout, spool, path)
        retention = Retention(cast(Spool, around), audit, SystemClock())
        request = PurgeRequest(SystemClock().now(), (RetainedKind.RECEIPTS,))
        assert retention.purge(request, OPERATOR) == {"receipts": 1}
    finally:
        audit.close()
    before, after = around.views
    assert before["receipt"] is not None and before["receipt"]["verified"] is True, before
    assert after["receipt"] is None and after["receipt_kept"] is None, after
    assert after["state"] == "delivered", after
    assert not path.exists()
    assert events(trail, "atrest.integrity_failed") == []
    assert _log_lines(log, "receipt.stored_altered") == []
    [disposed] = events(trail, "retention.disposed")
    assert [m["message_id"] for m in disposed["detail"]["messages"]] == [VICTIM], disposed


@pytest.mark.parametrize("then", ["settled there", "cancelled here"])
def test_a_receipt_file_of_another_node_is_not_reported_altered_on_this_one(
    layout: DemoLayout, tmp_path: Path, make_spool: MakeSpool, then: str
) -> None:
    """Both backends, two nodes sharing the spool, with the same state folder path each
    on its own machine: node a settles a message with a receipt file in its own state
    folder.  Asked on node b, where that file is not, the status says it cannot be read
    on this node, naming a when the row still says a settled it (and not after b
    cancelled the failed message: then no node is named), never that it was altered."""
    a = make_spool(SystemClock(), Claimant("a", 60.0))
    b = make_spool(SystemClock(), Claimant("b", 60.0))
    trail = tmp_path / "audit.jsonl"
    log = io.StringIO()
    context, audit = _judging_context(layout, b, trail, None, log)
    path = context.receipts / "v.hl7.0123456789ab.mdn"
    state = OutboundState.DELIVERED if then == "settled there" else OutboundState.FAILED
    try:
        _settled_in_file(layout, a, path, state=state)
        path.unlink()  # on a's machine, not on b's
        if then == "cancelled here":
            b.operator_cancel(VICTIM, OPERATOR)
        view = _status(context)
    finally:
        audit.close()
    receipt = view["receipt"]
    assert receipt is not None, view
    assert receipt["verified"] is False and "altered" not in receipt, receipt
    assert "cannot be read on this node" in receipt["error"], receipt
    assert ("node 'a'" in receipt["error"]) == (then == "settled there"), receipt
    assert str(tmp_path) not in receipt["error"], receipt
    assert view["disposition"] is not None, view
    assert events(trail, "atrest.integrity_failed") == []
    [line] = _log_lines(log, "receipt.unopenable")
    assert line["receipt_file"] == str(path), line


@pytest.fixture(params=["sqlite", "postgresql"])
def lab_spool(request: pytest.FixtureRequest) -> PostgresSettings | None:
    """The lab's spool: SQLite (None), or a database of its own on the session's
    PostgreSQL server (its [cluster] and [spool] after its [api], if any)."""
    if request.param == "sqlite":
        return None
    settings: PostgresSettings = request.getfixturevalue("postgres")
    return settings


@pytest.fixture
def large_receipts(layout: DemoLayout, lab_spool: PostgresSettings | None) -> Iterator[list[str]]:
    """A stand-in for the hospital on its port (its TLS certificate, the clients'
    required) that takes each message and answers with a processed receipt it signs,
    larger than a spool row keeps, with the MIC the lab recorded (read from the lab's
    spool).  Yields the Message-IDs answered."""
    answered: list[str] = []
    spool_path = load_config(layout.lab.config_path).storage.spool_path

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.0"

        def do_POST(self) -> None:
            self.rfile.read(int(self.headers["Content-Length"]))
            message_id = self.headers["Message-ID"]
            spool = open_spool(spool_path, SystemClock(), lab_spool)
            try:
                record = spool.get(message_id)
            finally:
                spool.close()
            assert record is not None and record.mic is not None
            built = _large_receipt(layout, message_id, record.mic)
            answered.append(message_id)  # before the answer: the client may have it first
            self.send_response(200)
            for name, value in built.headers:
                self.send_header(name, value)
            self.send_header("Content-Length", str(len(built.body)))
            self.end_headers()
            self.wfile.write(built.body)

        def log_message(self, format: str, *args: Any) -> None:
            pass

    certs = layout.hospital.root / "certs"
    tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    tls.load_cert_chain(certs / "tls.crt", certs / "tls.key")
    tls.load_verify_locations(layout.ca_certificate)
    tls.verify_mode = ssl.CERT_REQUIRED
    server = ThreadingHTTPServer(("127.0.0.1", layout.hospital.port), Handler)
    server.socket = tls.wrap_socket(server.socket, server_side=True)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield answered
    finally:
        server.shutdown()
        server.server_close()


def _configure(layout: DemoLayout, postgres: PostgresSettings | None) -> None:
    """The lab's spool in PostgreSQL, if given."""
    if postgres is not None:
        add_node(layout.lab, "lab-a", postgres)


def _kept_file(
    layout: DemoLayout, postgres: PostgresSettings | None, message_id: str
) -> tuple[Path, bytes, str | None]:
    """Where the lab keeps the receipt file of ``message_id``, its plaintext, and the
    SHA-256 its row records."""
    config = load_config(layout.lab.config_path)
    assert config.at_rest is not None and config.at_rest.enabled
    spool = open_spool(config.storage.spool_path, SystemClock(), postgres)
    try:
        record = spool.get(message_id)
        assert record is not None and record.receipt_path is not None, record
        vault = Vault(KeyStore(config.at_rest.key_dir), spool)
        plain = vault.read_file(receipt_item(message_id), record.receipt_path)
        return record.receipt_path, plain, record.receipt_sha256
    finally:
        spool.close()


def _replace_file(
    layout: DemoLayout, postgres: PostgresSettings | None, victim: str, donor: str
) -> None:
    """``victim``'s receipt file replaced by ``donor``'s receipt, sealed at rest under the
    victim's own data key (as one who can write the state folder and read the key
    folder would): it opens and verifies as the victim's receipt would."""
    config = load_config(layout.lab.config_path)
    assert config.at_rest is not None
    path, _, _ = _kept_file(layout, postgres, victim)
    _, plain, _ = _kept_file(layout, postgres, donor)
    spool = open_spool(config.storage.spool_path, SystemClock(), postgres)
    try:
        vault = Vault(KeyStore(config.at_rest.key_dir), spool)
        item = receipt_item(victim)
        path.write_bytes(seal_bytes(vault._key(item), item, plain))
        assert vault.read_file(item, path) == plain
    finally:
        spool.close()


def test_the_local_api_does_not_show_a_receipt_file_replaced_by_another(
    layout: DemoLayout,
    processes: Any,
    lab_spool: PostgresSettings | None,
    large_receipts: list[str],
) -> None:
    """A real lab daemon on each backend, its peer answering with receipts too large for
    a spool row: each kept as a sealed file, its SHA-256 recorded in the row and named
    by the audit record of the settlement.  One file replaced by the other message's
    receipt is not shown; an alert, once."""
    api = enable_api(layout)
    _configure(layout, lab_spool)
    config = str(layout.lab.config_path)
    lab = processes.start(layout.lab.config_path)
    victim, donor = two_delivered(api)
    assert sorted(large_receipts) == sorted([victim, donor])
    shown = medgw("queue", "show", victim, "--json", "--config", config)
    assert shown.returncode == 0, shown.stderr
    assert json.loads(shown.stdout)["receipt_kept"] == "file"
    path, plain, sha256 = _kept_file(layout, lab_spool, victim)
    assert sha256 == hashlib.sha256(plain).hexdigest()
    [record] = wait_for_events(
        layout.lab.audit_log, "receipt.received", where=lambda r: r["message_id"] == victim
    )
    assert record["detail"]["receipt_file"] == str(path)
    assert record["detail"]["receipt_sha256"] == sha256
    _replace_file(layout, lab_spool, victim, donor)

    status, view = api.request("GET", f"/v1/messages/{victim}", token=LIS_TOKEN)
    assert status == 200, view
    receipt = view["receipt"]
    assert receipt["verified"] is False and receipt["altered"] is True, receipt
    assert victim in receipt["error"] and ALTERED in receipt["error"], receipt
    assert not {"disposition", "signer", "original_message_id"} & set(receipt)
    [alert] = wait_for_events(layout.lab.audit_log, "atrest.integrity_failed")
    assert alert["message_id"] == victim and alert["severity"] == "alert", alert
    assert ALTERED in alert["reason"], alert
    status, view = api.request("GET", f"/v1/messages/{victim}", token=LIS_TOKEN)
    assert status == 200 and view["receipt"]["altered"] is True, view
    assert len(events(layout.lab.audit_log, "atrest.integrity_failed")) == 1
    status, view = api.request("GET", f"/v1/messages/{donor}", token=LIS_TOKEN)
    assert status == 200 and view["receipt"]["verified"] is True, view  # its own, untouched
    assert lab.stop() == 0


def test_medgw_send_does_not_show_a_receipt_file_replaced_by_another(
    layout: DemoLayout,
    processes: Any,
    lab_spool: PostgresSettings | None,
    large_receipts: list[str],
    tmp_path: Path,
) -> None:
    """``medgw send`` (the control socket's status, followed until final): a resend
    under the same idempotency key reports the message it has, and exits 1 when its
    receipt file was replaced by another message's."""
    _configure(layout, lab_spool)
    config = str(layout.lab.config_path)
    lab = processes.start(layout.lab.config_path)
    documents = [tmp_path / "a.hl7", tmp_path / "b.hl7"]
    sent = []
    for document in documents:
        document.write_bytes(b"MSH|" + document.name.encode() + b"\r")
        done = medgw(
            "send",
            document,
            "--to",
            "hospital",
            "--idempotency-key",
            document.stem,
            "--config",
            config,
        )
        assert done.returncode == 0, done.stderr
        assert "signed by" in done.stdout and "receipt file" in done.stdout, done.stdout
        first = done.stdout.splitlines()[0].split()
        assert first[0] == "delivered", done.stdout
        sent.append(first[1])
    victim, donor = sent
    assert sorted(large_receipts) == sorted(sent)
    _replace_file(layout, lab_spool, victim, donor)

    again = medgw(
        "send", documents[0], "--to", "hospital", "--idempotency-key", "a", "--config", config
    )
    assert again.returncode == 1, again.stderr  # not "delivered and verified"
    assert "already spooled as" in again.stderr, again.stderr
    assert "the spool was altered outside medgw" in again.stderr, again.stderr
    assert again.stdout.splitlines()[0].split() == ["delivered", victim], again.stdout
    assert "NOT SHOWN, altered" in again.stdout and ALTERED in again.stdout, again.stdout
    assert "signed by" not in again.stdout and "disposition" not in again.stdout
    assert lab.stop() == 0


@pytest.mark.parametrize("kill", ["--kill-before", "--kill-after"])
def test_a_purge_killed_as_it_removes_receipt_files_leaves_no_alarm_and_no_file(
    layout: DemoLayout,
    processes: Any,
    lab_spool: PostgresSettings | None,
    large_receipts: list[str],
    kill: str,
) -> None:
    """A real lab daemon on each backend, its receipts kept as files, killed by SIGKILL
    in ``medgw purge`` just before or just after it removes the files of the receipts
    it disposed of.  Started again: the disposal stands (audited), no status calls a
    receipt altered (no alert), and no receipt file is left (a file no row names any
    more is removed by the start's sweep)."""
    api = enable_api(layout)
    _configure(layout, lab_spool)
    config = str(layout.lab.config_path)
    receipts = load_config(layout.lab.config_path).storage.receipts_dir
    lab = processes.start(
        layout.lab.config_path, prefix=killed_at(kill, "gateway.retention.purge:_remove_files")
    )
    sent = two_delivered(api)
    assert sorted(large_receipts) == sorted(sent)
    assert len(list(receipts.iterdir())) == 2
    before = datetime.now(UTC).isoformat()
    purged = medgw("purge", "--before", before, "--kind", "receipts", "--config", config)
    assert purged.returncode != 0, purged.stdout  # killed before it answered
    wait_killed(lab)

    lab = processes.start(layout.lab.config_path)
    for message_id in sent:
        status, view = api.request("GET", f"/v1/messages/{message_id}", token=LIS_TOKEN)
        assert status == 200, view
        assert view["receipt"] is None and view["state"] == "delivered", view
    assert list(receipts.iterdir()) == []
    assert events(layout.lab.audit_log, "atrest.integrity_failed") == []
    [disposed] = events(layout.lab.audit_log, "retention.disposed")
    assert sorted(m["message_id"] for m in disposed["detail"]["messages"]) == sorted(sent)
    assert lab.stop() == 0
