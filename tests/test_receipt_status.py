"""A message's status verifies its stored receipt again: a receipt file grown past what
medgw ever stores (a full disk's worth, a tampered state folder) is refused after a
bounded read, never read whole into memory; so is a receipt kept in a spool row that is
too large, or not stored as bytes.  A receipt kept in a row is shown only if it is the
one recorded when it settled the message."""

from __future__ import annotations

import asyncio
import errno
import hashlib
import io
import json
import os
import secrets
import sqlite3
import threading
import tracemalloc
from pathlib import Path
from typing import Any, cast

import pytest

from gateway.atrest import KeyStore, Vault
from gateway.atrest.keys import kek_name
from gateway.audit.events import AuditEvent, EventType
from gateway.audit.log import AuditLog
from gateway.clock import SystemClock
from gateway.config import load_config
from gateway.errors import AtRestError, DataKeyAlteredError
from gateway.logs import make_logger
from gateway.outbound.context import Context, Settings
from gateway.outbound.status import ALTERED_FIX, MAX_STORED_RECEIPT, MessageStatus
from gateway.pki.demo import DemoLayout
from gateway.pki.peers import assess_peers
from gateway.spool import DataKey, OutboundState, Settled, Spool, SqliteSpool
from gateway.spool.records import receipt_item
from tests.conftest import MakeSpool
from tests.helpers.audit import events
from tests.helpers.demo import hospital_receipt

MESSAGE = "<m@lab>"
OTHER = "<other@lab>"
SERVICE = "results"


def _sent(spool: Spool, tmp_path: Path, message_id: str = MESSAGE, peer: str = "hospital") -> None:
    """``message_id`` taken in for ``peer``, queued and being sent: its receipt is the
    next thing to come."""
    payload = tmp_path / f"{hashlib.sha256(message_id.encode()).hexdigest()[:8]}.hl7"
    spool.add_intake(
        message_id, peer, "m.hl7", "application/hl7-v2", payload, payload, service=SERVICE
    )
    spool.mark_queued(message_id, None, [], "mic", 3, body=b"sealed")
    spool.mark_sending(message_id)


def _settled_with(
    spool: Spool,
    kept: bytes,
    message_id: str = MESSAGE,
    *,
    stored: bytes | None = None,
    data_key: DataKey | None = None,
    state: OutboundState = OutboundState.DELIVERED,
) -> None:
    """``message_id`` settled (delivered), ``kept`` its receipt in its row (as received,
    with its SHA-256; ``stored``: as sealed at rest under ``data_key``)."""
    settled = Settled(
        message_id,
        state,
        "processed" if state is OutboundState.DELIVERED else "failed",
        None,
        data_key=data_key,
        receipt=kept if stored is None else stored,
        receipt_sha256=hashlib.sha256(kept).hexdigest(),
    )
    assert spool.mark_settled([settled]) == [message_id]


def _settled_sealed(
    spool: Spool,
    vault: Vault,
    kept: bytes,
    state: OutboundState = OutboundState.DELIVERED,
    message_id: str = MESSAGE,
) -> None:
    """``message_id`` settled, ``kept`` its receipt in its row sealed at rest under a
    data key of its own (as settlement stores it when [at_rest] is enabled)."""
    with vault.storing(receipt_item(message_id)) as sealing:
        stored = sealing.seal(kept)
        assert stored != kept and sealing.key is not None  # sealed, under its own key
        _settled_with(spool, kept, message_id, stored=stored, data_key=sealing.key, state=state)


def _context(
    layout: DemoLayout,
    tmp_path: Path,
    spool: Spool,
    log: io.StringIO | None = None,
    vault: Vault | None = None,
) -> tuple[Context, AuditLog]:
    """The daemon's context for a status (the peers' certificates judged as the daemon
    judges them), its audit trail in tmp_path, its log to ``log``; and that trail, for
    the caller to close."""
    config = load_config(layout.lab.config_path)
    trust = asyncio.run(assess_peers(config.peers, config.zones, at=SystemClock().now()))
    audit = AuditLog(tmp_path / "audit.jsonl", SystemClock(), node="lab")
    logger = make_logger(stream=log or io.StringIO())
    return Context(Settings(config, trust), spool, audit, logger, SystemClock(), vault), audit


def _status_bounded(
    layout: DemoLayout,
    tmp_path: Path,
    spool: Spool,
    log: io.StringIO | None = None,
    vault: Vault | None = None,
) -> tuple[Any, int]:
    """MESSAGE's status as the daemon's MessageStatus gives it, and the peak of the
    memory Python allocated meanwhile."""
    context, audit = _context(layout, tmp_path, spool, log, vault)
    tracemalloc.start()
    try:
        view = asyncio.run(MessageStatus(context).status(MESSAGE))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
        audit.close()
    assert view is not None
    return view, peak


def _logged(log: io.StringIO, event: str) -> list[dict[str, Any]]:
    """The lines of ``event`` the status wrote to ``log``."""
    lines = [json.loads(line) for line in log.getvalue().splitlines()]
    return [line for line in lines if line["event"] == event]


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
    log = io.StringIO()
    try:
        view, peak = _status_bounded(layout, tmp_path, spool, log)
    finally:
        spool.close()
    assert view["receipt"]["verified"] is False and view["receipt"]["altered"] is True
    error = view["receipt"]["error"]
    assert "larger than" in error and "in its receipt file" in error, error
    assert "restore them from a backup" in error, error
    # The local API answers with this view: where the gateway keeps its files is in the
    # admin's receipt_file field (which the local API leaves out), the log and the trail.
    assert str(tmp_path) not in error, error
    assert view["receipt_file"] == str(receipt)
    [alert] = events(tmp_path / "audit.jsonl", "atrest.integrity_failed")
    assert alert["message_id"] == MESSAGE and alert["detail"]["receipt_file"] == str(receipt), alert
    [line] = _logged(log, "receipt.stored_altered")
    assert line["receipt_file"] == str(receipt) and line["audited"] is True, line
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
    # Named as every alert about a message names it: its peer and its service.
    [alert] = events(tmp_path / "audit.jsonl", "atrest.integrity_failed")
    assert alert["message_id"] == MESSAGE and alert["peer"] == "hospital", alert
    assert alert["service"] == SERVICE, alert
    assert alert["detail"]["receipt"] == "spool", alert


def test_a_row_receipt_altered_is_reported_so_when_its_peer_is_no_longer_configured(
    layout: DemoLayout, tmp_path: Path, make_spool: MakeSpool
) -> None:
    """Both backends: whether its peer is still configured decides only whether its
    signature can be verified; a receipt not as medgw stored it is reported altered,
    and alerted, either way."""
    spool = make_spool(SystemClock())
    _sent(spool, tmp_path, peer="retired-lab")
    own = _signed(layout, MESSAGE)
    _settled_with(spool, own)
    spool._write("UPDATE outbound SET receipt=? WHERE message_id=?", (own + b" ", MESSAGE))  # type: ignore[attr-defined]
    view, _ = _status_bounded(layout, tmp_path, spool)
    receipt = view["receipt"]
    assert receipt["verified"] is False and receipt.get("altered") is True, receipt
    assert "does not match" in receipt["error"] and "no longer configured" not in receipt["error"]
    assert _alerts(tmp_path) == [MESSAGE]


class _RetriedBetweenReads:
    """The spool, where an operator's retry of MESSAGE, its resend and a new receipt all
    happen between the status's read of its row receipt and that of the receipt's data
    key (``meanwhile``, at the first read of that key)."""

    def __init__(self, spool: Spool, meanwhile: Any) -> None:
        self._spool = spool
        self._meanwhile = meanwhile
        self.interleaved = False

    def data_key(self, item: str) -> DataKey | None:
        if item == receipt_item(MESSAGE) and not self.interleaved:
            self.interleaved = True
            self._meanwhile()
        return self._spool.data_key(item)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._spool, name)


def test_a_receipt_replaced_by_a_retry_while_it_is_read_is_no_alarm(
    layout: DemoLayout, tmp_path: Path, make_spool: MakeSpool
) -> None:
    """Both backends: the row's receipt and its data key are read in statements of their
    own.  A retry in between (it clears the receipt and drops its key), then the new
    receipt of the resend under a key of its own, makes the receipt read first fail its
    at-rest check: not tampering.  The status reads the row again, and shows it as it
    is now, with no alert."""
    spool = make_spool(SystemClock())
    vault = Vault(KeyStore(tmp_path / "keys"), spool)
    vault.open()
    _sent(spool, tmp_path)
    _settled_sealed(spool, vault, _signed(layout, MESSAGE), OutboundState.FAILED)

    def retried_and_delivered() -> None:
        spool.operator_retry(MESSAGE, "operator", SystemClock().now().timestamp() + 3600)
        spool.mark_sending(MESSAGE)
        _settled_sealed(spool, vault, _signed(layout, MESSAGE))

    reads = _RetriedBetweenReads(spool, retried_and_delivered)
    between = cast(Spool, reads)
    log = io.StringIO()
    view, _ = _status_bounded(
        layout, tmp_path, between, log, Vault(KeyStore(tmp_path / "keys"), between)
    )
    assert reads.interleaved
    assert view["state"] == "delivered", view
    receipt = view["receipt"]
    assert receipt["verified"] is True and "altered" not in receipt, receipt
    assert receipt["original_message_id"] == MESSAGE
    assert _alerts(tmp_path) == []
    assert _logged(log, "receipt.stored_altered") == []


class _MeetingSet(set[str]):
    """A set whose first membership test, once answered, waits (up to a bound) for a
    second thread's to be answered too: two checks at once both answer before either
    thread goes on, unless something keeps them apart."""

    def __init__(self) -> None:
        super().__init__()
        self._guard = threading.Lock()
        self._checks = 0
        self._second = threading.Event()

    def __contains__(self, item: object) -> bool:
        found = super().__contains__(item)
        with self._guard:
            self._checks += 1
            first = self._checks == 1
        if first:
            self._second.wait(5)  # the second thread's check, if it can come meanwhile
        else:
            self._second.set()
        return found


def test_two_status_requests_at_once_alert_once(layout: DemoLayout, tmp_path: Path) -> None:
    """Status requests run in worker threads at once: a check that the message was not
    alerted yet and its adding are one step, or both requests alert."""
    spool = SqliteSpool(tmp_path / "spool.sqlite3", SystemClock())
    _sent(spool, tmp_path)
    _settled_with(spool, _signed(layout, MESSAGE))
    spool._write("UPDATE outbound SET receipt=NULL WHERE message_id=?", (MESSAGE,))
    context, audit = _context(layout, tmp_path, spool)
    status = MessageStatus(context)
    status._alerted = _MeetingSet()
    views: list[Any] = []

    def ask() -> None:
        views.append(asyncio.run(status.status(MESSAGE)))

    threads = [threading.Thread(target=ask) for _ in range(2)]
    try:
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    finally:
        audit.close()
        spool.close()
    assert [view["receipt"]["altered"] for view in views] == [True, True], views
    assert _alerts(tmp_path) == [MESSAGE]


class _SubmitterReadsRecorded(SqliteSpool):
    """A spool that records in which thread each submitter lookup runs."""

    def __init__(self, path: Path) -> None:
        super().__init__(path, SystemClock())
        self.threads: list[threading.Thread] = []

    def submitter(self, message_id: str) -> str | None:
        self.threads.append(threading.current_thread())
        return super().submitter(message_id)


@pytest.mark.parametrize("submitter", [None, "ehr"])
def test_the_status_reads_the_spool_off_the_event_loop(
    layout: DemoLayout, tmp_path: Path, submitter: str | None
) -> None:
    """Who submitted the message is read in a worker thread too: a slow spool must not stall
    the event loop, which serves every transfer."""
    spool = _SubmitterReadsRecorded(tmp_path / "spool.sqlite3")
    _sent(spool, tmp_path)
    _settled_with(spool, _signed(layout, MESSAGE))
    context, audit = _context(layout, tmp_path, spool)
    try:
        asyncio.run(MessageStatus(context).status(MESSAGE, submitter))
    finally:
        audit.close()
        spool.close()
    assert spool.threads and threading.main_thread() not in spool.threads, spool.threads


def test_an_alert_the_trail_could_not_take_at_once_is_written_once(
    layout: DemoLayout, tmp_path: Path
) -> None:
    """An altered receipt is alerted once per message, also when that write fails (the
    trail's disk full): the daemon's audit log keeps the outbound record it could not write
    and writes it with its next record; a later status request does not alert again."""
    spool = SqliteSpool(tmp_path / "spool.sqlite3", SystemClock())
    _sent(spool, tmp_path)
    _settled_with(spool, _signed(layout, MESSAGE))
    spool._write("UPDATE outbound SET receipt=NULL WHERE message_id=?", (MESSAGE,))
    context, audit = _context(layout, tmp_path, spool)
    audit.close()
    full = threading.Event()

    def sync(fd: int) -> None:
        if full.is_set():
            full.clear()
            raise OSError(errno.ENOSPC, "No space left on device")
        os.fsync(fd)

    # As the daemon opens it (gateway/daemon/lifecycle.py): outbound records are owed.
    trail = AuditLog(
        tmp_path / "audit.jsonl",
        SystemClock(),
        node="lab",
        sync=sync,
        owed=lambda event: event.direction == "outbound",
    )
    context.audit = trail
    status = MessageStatus(context)
    try:
        full.set()
        with pytest.raises(OSError, match="No space left"):
            asyncio.run(status.status(MESSAGE))
        views = [asyncio.run(status.status(MESSAGE)) for _ in range(2)]
        trail.emit(AuditEvent(EventType.DAEMON_STOPPED))  # the trail's next record
    finally:
        trail.close()
        spool.close()
    assert [cast(dict[str, Any], view)["receipt"]["altered"] for view in views] == [True, True]
    assert _alerts(tmp_path) == [MESSAGE]


def test_past_the_alerts_cap_an_altered_receipt_is_still_logged(
    layout: DemoLayout, tmp_path: Path
) -> None:
    """The audit trail takes one alert per message up to a cap (a spool altered wholesale
    does not grow it without bound); past it, the administrator still gets an error line
    in the log for each altered receipt asked for."""
    spool = SqliteSpool(tmp_path / "spool.sqlite3", SystemClock())
    other = "<other@lab>"
    for message_id in (MESSAGE, other):
        _sent(spool, tmp_path, message_id)
        _settled_with(spool, _signed(layout, message_id), message_id)
    spool._write("UPDATE outbound SET receipt=NULL", ())
    log = io.StringIO()
    context, audit = _context(layout, tmp_path, spool, log)
    status = MessageStatus(context, max_alerted=1)
    try:
        for message_id in (MESSAGE, other, other):
            view = asyncio.run(status.status(message_id))
            assert view is not None and view["receipt"]["altered"] is True, view
    finally:
        audit.close()
        spool.close()
    assert _alerts(tmp_path) == [MESSAGE]
    lines = [
        (line["message_id"], line["audited"]) for line in _logged(log, "receipt.stored_altered")
    ]
    assert lines == [(MESSAGE, True), (other, False), (other, False)], lines


def test_a_receipt_whose_key_encryption_key_is_gone_is_not_reported_altered(
    layout: DemoLayout, tmp_path: Path, make_spool: MakeSpool
) -> None:
    """Both backends: a receipt sealed at rest whose key-encryption key is gone from the
    key folder (a key folder not put back) cannot be opened now; that is not tampering:
    no alert, and the status says it cannot be verified now, naming none of the
    gateway's files (the local API answers with it); the log names the cause."""
    spool = make_spool(SystemClock())
    vault = Vault(KeyStore(tmp_path / "keys"), spool)
    vault.open()
    _sent(spool, tmp_path)
    _settled_sealed(spool, vault, _signed(layout, MESSAGE))
    for kek in (tmp_path / "keys").iterdir():
        kek.unlink()
    log = io.StringIO()
    view, _ = _status_bounded(
        layout, tmp_path, spool, log, Vault(KeyStore(tmp_path / "keys"), spool)
    )
    receipt = view["receipt"]
    assert receipt["verified"] is False and "altered" not in receipt, receipt
    assert "cannot be opened now" in receipt["error"], receipt
    assert str(tmp_path) not in receipt["error"], receipt
    assert view["disposition"] == "processed", view  # the row, not said altered
    assert _alerts(tmp_path) == []
    [line] = _logged(log, "receipt.unopenable")
    assert line["message_id"] == MESSAGE and "key" in line["error"], line


def test_a_receipt_whose_data_key_was_deleted_from_the_spool_is_reported_altered(
    layout: DemoLayout, tmp_path: Path, make_spool: MakeSpool
) -> None:
    """Both backends: settlement stores a receipt's data key with it, and a retry or
    retention deletes both at once; a sealed receipt whose row is unchanged and whose
    data key is gone was altered outside medgw (a negative receipt hidden so would
    otherwise leave the row's "processed" standing, unverified and unalarmed)."""
    spool = make_spool(SystemClock())
    vault = Vault(KeyStore(tmp_path / "keys"), spool)
    vault.open()
    _sent(spool, tmp_path)
    _settled_sealed(spool, vault, _signed(layout, MESSAGE))
    spool._write("DELETE FROM data_keys WHERE item=?", (receipt_item(MESSAGE),))  # type: ignore[attr-defined]
    log = io.StringIO()
    view, _ = _status_bounded(
        layout, tmp_path, spool, log, Vault(KeyStore(tmp_path / "keys"), spool)
    )
    receipt = view["receipt"]
    assert receipt["verified"] is False and receipt["altered"] is True, receipt
    assert "data key was removed from the spool" in receipt["error"], receipt
    assert ALTERED_FIX in receipt["error"], receipt
    assert view["disposition"] is None, view
    assert _alerts(tmp_path) == [MESSAGE]
    [line] = _logged(log, "receipt.stored_altered")
    assert line["message_id"] == MESSAGE and line["receipt"] == "spool", line


class _RetriedBeforeItsReceiptIsRead:
    """The spool, where an operator's retry of MESSAGE, its resend and a new receipt all
    happen between the status's read of its row and that of its row receipt
    (``meanwhile``, at the first read of that receipt)."""

    def __init__(self, spool: Spool, meanwhile: Any) -> None:
        self._spool = spool
        self._meanwhile = meanwhile
        self.interleaved = False

    def row_receipt(self, message_id: str, at_most: int) -> Any:
        if message_id == MESSAGE and not self.interleaved:
            self.interleaved = True
            self._meanwhile()
        return self._spool.row_receipt(message_id, at_most)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._spool, name)


@pytest.mark.parametrize("at_rest", ["sealed", "in the clear"])
def test_a_new_receipt_recorded_while_the_row_is_read_is_not_shown_beside_the_old_row(
    layout: DemoLayout, tmp_path: Path, make_spool: MakeSpool, at_rest: str
) -> None:
    """Both backends: the row and its receipt are read in statements of their own.  A
    retry of a failed message, its resend and its new receipt recorded in between leave
    the new receipt (verified) beside the old row's state and disposition, unless the
    row is read again once the receipt is verified: the status is one version of the
    message, as it is now."""
    spool = make_spool(SystemClock())
    vault = None
    if at_rest == "sealed":
        vault = Vault(KeyStore(tmp_path / "keys"), spool)
        vault.open()
    _sent(spool, tmp_path)
    if vault is not None:
        _settled_sealed(spool, vault, _signed(layout, MESSAGE), OutboundState.FAILED)
    else:
        _settled_with(spool, _signed(layout, MESSAGE), state=OutboundState.FAILED)

    def retried_and_delivered() -> None:
        spool.operator_retry(MESSAGE, "operator", SystemClock().now().timestamp() + 3600)
        spool.mark_sending(MESSAGE)
        if vault is not None:
            _settled_sealed(spool, vault, _signed(layout, MESSAGE))
        else:
            _settled_with(spool, _signed(layout, MESSAGE))

    reads = _RetriedBeforeItsReceiptIsRead(spool, retried_and_delivered)
    between = cast(Spool, reads)
    log = io.StringIO()
    view, _ = _status_bounded(
        layout,
        tmp_path,
        between,
        log,
        None if vault is None else Vault(KeyStore(tmp_path / "keys"), between),
    )
    assert reads.interleaved
    receipt = view["receipt"]
    assert receipt["verified"] is True and receipt["disposition"] == "processed", receipt
    assert (view["state"], view["disposition"]) == ("delivered", "processed"), view
    assert view["final"] is True, view
    assert _alerts(tmp_path) == []
    assert _logged(log, "receipt.stored_altered") == []


def _two_settled_sealed(
    layout: DemoLayout, tmp_path: Path, spool: Spool, messages: tuple[str, ...] = (MESSAGE, OTHER)
) -> None:
    """MESSAGE and another message (or ``messages``, in this order) settled, each
    receipt sealed in its row under a data key of its own, all wrapped under the key
    folder's one key-encryption key."""
    vault = Vault(KeyStore(tmp_path / "keys"), spool)
    vault.open()
    for message_id in messages:
        _sent(spool, tmp_path, message_id)
        _settled_sealed(spool, vault, _signed(layout, message_id), message_id=message_id)


@pytest.mark.parametrize("changed", ["overwritten", "another item's copied in"])
def test_a_receipt_whose_data_key_was_changed_in_the_spool_is_reported_altered(
    layout: DemoLayout, tmp_path: Path, make_spool: MakeSpool, changed: str
) -> None:
    """Both backends: a sealed receipt whose data key row was overwritten (it no longer
    unwraps, while another data key wrapped under the same key-encryption key does: the
    key folder is the right one), or holds another item's wrapped key (it unwraps, and
    the receipt then fails its at-rest check), was altered outside medgw: reported so,
    its row's disposition not shown, alerted once."""
    spool = make_spool(SystemClock())
    _two_settled_sealed(layout, tmp_path, spool)
    mine, other = spool.data_key(receipt_item(MESSAGE)), spool.data_key(receipt_item(OTHER))
    assert mine is not None and other is not None and mine.kek == other.kek
    wrapped = secrets.token_bytes(len(mine.wrapped)) if changed == "overwritten" else other.wrapped
    spool._write(  # type: ignore[attr-defined]
        "UPDATE data_keys SET wrapped=? WHERE item=?", (wrapped, receipt_item(MESSAGE))
    )
    log = io.StringIO()
    view, _ = _status_bounded(
        layout, tmp_path, spool, log, Vault(KeyStore(tmp_path / "keys"), spool)
    )
    receipt = view["receipt"]
    assert receipt["verified"] is False and receipt["altered"] is True, receipt
    if changed == "overwritten":
        assert "data key was changed in the spool" in receipt["error"], receipt
    assert ALTERED_FIX in receipt["error"], receipt
    assert str(tmp_path) not in receipt["error"], receipt
    assert view["disposition"] is None, view
    assert _alerts(tmp_path) == [MESSAGE]
    [line] = _logged(log, "receipt.stored_altered")
    assert line["message_id"] == MESSAGE and line["receipt"] == "spool", line


def test_a_receipt_under_another_states_key_encryption_key_is_not_reported_altered(
    layout: DemoLayout, tmp_path: Path, make_spool: MakeSpool
) -> None:
    """Both backends: the key folder holds another state's key-encryption key of the same
    version (every data key fails to unwrap, not just this one): the key folder is an
    operator's matter, not tampering.  The receipt cannot be verified now, no alert."""
    spool = make_spool(SystemClock())
    _two_settled_sealed(layout, tmp_path, spool)
    keys = KeyStore(tmp_path / "keys")
    [version] = keys.versions()
    (tmp_path / "keys" / kek_name(version)).unlink()
    keys.create(version)  # same name, other bytes
    log = io.StringIO()
    view, _ = _status_bounded(layout, tmp_path, spool, log, Vault(keys, spool))
    receipt = view["receipt"]
    assert receipt["verified"] is False and "altered" not in receipt, receipt
    assert "cannot be opened now" in receipt["error"], receipt
    assert view["disposition"] == "processed", view
    assert _alerts(tmp_path) == []
    [line] = _logged(log, "receipt.unopenable")
    assert line["message_id"] == MESSAGE and "does not unwrap" in line["error"], line


def _assert_altered_once(view: dict[str, Any], tmp_path: Path, log: io.StringIO) -> None:
    """``view`` reports MESSAGE's kept receipt altered, its disposition not shown, and
    MESSAGE was alerted and logged once."""
    receipt = view["receipt"]
    assert receipt["verified"] is False and receipt["altered"] is True, receipt
    assert "data key was changed in the spool" in receipt["error"], receipt
    assert "do not share one key folder" in receipt["error"], receipt
    assert str(tmp_path) not in receipt["error"], receipt
    assert view["disposition"] is None, view
    assert _alerts(tmp_path) == [MESSAGE]
    [line] = _logged(log, "receipt.stored_altered")
    assert line["message_id"] == MESSAGE and line["receipt"] == "spool", line


@pytest.mark.parametrize("version", [99, 0])
def test_a_receipt_whose_data_key_names_a_version_never_made_is_reported_altered(
    layout: DemoLayout, tmp_path: Path, make_spool: MakeSpool, version: int
) -> None:
    """Both backends: a sealed receipt whose data key row names a key-encryption key
    version medgw never made (above the key folder's newest, no other data key under it;
    or below 1) was altered outside medgw, not "cannot be verified now": reported so,
    alerted once; and the next start refuses naming the spool's change, not a key file
    to put back that never existed."""
    spool = make_spool(SystemClock())
    _two_settled_sealed(layout, tmp_path, spool)
    spool._write(  # type: ignore[attr-defined]
        "UPDATE data_keys SET kek=? WHERE item=?", (version, receipt_item(MESSAGE))
    )
    log = io.StringIO()
    view, _ = _status_bounded(
        layout, tmp_path, spool, log, Vault(KeyStore(tmp_path / "keys"), spool)
    )
    _assert_altered_once(view, tmp_path, log)
    with pytest.raises(DataKeyAlteredError) as refused:
        Vault(KeyStore(tmp_path / "keys"), spool).open()
    assert receipt_item(MESSAGE) in refused.value.message
    assert f"version {version}" in refused.value.message
    assert "put back" not in str(refused.value)


def test_a_receipt_under_a_key_folder_not_put_back_is_not_reported_altered(
    layout: DemoLayout, tmp_path: Path, make_spool: MakeSpool
) -> None:
    """Both backends: the key folder lacks the key every data key is wrapped under (not
    put back after a restore; a new one made in its place): an operator's matter, not
    tampering.  The receipt cannot be verified now, no alert; a start names the key."""
    spool = make_spool(SystemClock())
    _two_settled_sealed(layout, tmp_path, spool)
    keys = KeyStore(tmp_path / "keys")
    [version] = keys.versions()
    (tmp_path / "keys" / kek_name(version)).unlink()
    keys.create(version + 1)
    log = io.StringIO()
    view, _ = _status_bounded(layout, tmp_path, spool, log, Vault(keys, spool))
    receipt = view["receipt"]
    assert receipt["verified"] is False and "altered" not in receipt, receipt
    assert view["disposition"] == "processed", view
    assert _alerts(tmp_path) == []
    [line] = _logged(log, "receipt.unopenable")
    assert f"put back the {kek_name(version)} file" in line["error"], line
    with pytest.raises(AtRestError, match=f"put back the {kek_name(version)} file") as refused:
        Vault(keys, spool).open()
    assert not isinstance(refused.value, DataKeyAlteredError)


def test_a_receipt_whose_data_key_and_the_first_other_were_overwritten_is_reported_altered(
    layout: DemoLayout, tmp_path: Path, make_spool: MakeSpool
) -> None:
    """Both backends: the data keys compared with one that does not unwrap are its
    nearest on both sides, not the table's first: overwriting the receipt's data key and
    the first one stored (and first by item) still leaves the one after it unwrapping."""
    spool = make_spool(SystemClock())
    first, last = "<a@lab>", "<z@lab>"
    _two_settled_sealed(layout, tmp_path, spool, (first, MESSAGE, last))
    for message_id in (MESSAGE, first):
        key = spool.data_key(receipt_item(message_id))
        assert key is not None
        spool._write(  # type: ignore[attr-defined]
            "UPDATE data_keys SET wrapped=? WHERE item=?",
            (secrets.token_bytes(len(key.wrapped)), receipt_item(message_id)),
        )
    log = io.StringIO()
    view, _ = _status_bounded(
        layout, tmp_path, spool, log, Vault(KeyStore(tmp_path / "keys"), spool)
    )
    _assert_altered_once(view, tmp_path, log)
