"""Encryption at rest in real ``medgw run`` processes: the AS2 bodies waiting to be sent
and the receipts kept (received and sent) are encrypted under their own data keys; a
body changed on disk is never sent, its message fails with an alert and the file is
kept; bodies written before the upgrade (in the clear) are still sent."""

from __future__ import annotations

import os
import sqlite3
from pathlib import Path
from typing import Any

from gateway.atrest.chunked import MAGIC
from gateway.demo_run import drop_file, wait_until
from gateway.pki.demo import DemoLayout
from gateway.spool.records import body_item, receipt_item, sent_receipt_item
from tests.helpers.atrest import kept_receipt
from tests.helpers.audit import events, wait_for_event, wait_for_events
from tests.helpers.demo import set_runtime
from tests.helpers.memory import peak_rss_kib

LARGE = b"MSH|^~\\&|LAB|KITA|HIS|HOSP|LARGE-DOCUMENT-7Q2X\r" + os.urandom(200 << 10)
SMALL = b"MSH|^~\\&|LAB|KITA|HIS|HOSP|SMALL-DOCUMENT-9K4W\r"


def _rows(spool: Path, sql: str, *params: object) -> list[tuple[Any, ...]]:
    with sqlite3.connect(f"file:{spool}?mode=ro", uri=True) as db:
        return db.execute(sql, params).fetchall()


def _queue_while_hospital_is_down(layout: DemoLayout, processes: Any) -> Any:
    """The lab, alone, takes both documents; its sends fail (the hospital is down)."""
    set_runtime(layout.lab.config_path, "retry_initial_seconds", "0.2")
    lab = processes.start(layout.lab.config_path)
    drop_file(layout.lab.outbox_for("hospital"), "large.hl7", LARGE)
    drop_file(layout.lab.outbox_for("hospital"), "small.hl7", SMALL)
    wait_for_events(layout.lab.audit_log, "message.accepted", count=2)
    return lab


def _queued(layout: DemoLayout) -> dict[str, tuple[Any, ...]]:
    spool = layout.lab.root / "state" / "spool.sqlite3"
    return {
        r[0]: r
        for r in _rows(spool, "SELECT filename, message_id, body_path, body, state FROM outbound")
    }


def test_bodies_and_receipts_are_kept_encrypted_and_still_delivered(
    layout: DemoLayout, processes: Any
) -> None:
    _queue_while_hospital_is_down(layout, processes)
    queued = _queued(layout)
    large_id, large_path = queued["large.hl7"][1], Path(queued["large.hl7"][2])
    small_id, small_body = queued["small.hl7"][1], queued["small.hl7"][3]
    # The large body is a file, the small one in the spool row: both encrypted at rest.
    assert large_path.read_bytes().startswith(MAGIC)
    assert small_body.startswith(MAGIC)
    lab_spool = layout.lab.root / "state" / "spool.sqlite3"
    keys = dict(_rows(lab_spool, "SELECT item, kek FROM data_keys"))
    assert keys == {body_item(large_id): 1, body_item(small_id): 1}
    keys_dir = layout.lab.root / "state-keys"
    assert sorted(p.name for p in keys_dir.iterdir()) == ["kek-1"]
    assert keys_dir.stat().st_mode & 0o777 == 0o700

    processes.start(layout.hospital.config_path)
    receipts = wait_for_events(layout.lab.audit_log, "receipt.received", count=2, timeout=120)
    assert (layout.hospital.inbox_dir / "lab" / "large.hl7").read_bytes() == LARGE
    assert (layout.hospital.inbox_dir / "lab" / "small.hl7").read_bytes() == SMALL
    for receipt in receipts:
        # Kept in the row, sealed as a file's bytes would be.
        [(sealed,)] = _rows(
            lab_spool, "SELECT receipt FROM outbound WHERE message_id=?", receipt["message_id"]
        )
        assert sealed.startswith(MAGIC)
        assert b"Content-Type: " in kept_receipt(layout.lab.config_path, receipt["message_id"])
    assert {receipt_item(large_id), receipt_item(small_id)} <= dict(
        _rows(lab_spool, "SELECT item, kek FROM data_keys")
    ).keys()
    # The hospital keeps the receipts it sent (to answer a resend), encrypted too.
    hospital_spool = layout.hospital.root / "state" / "spool.sqlite3"
    wait_until(
        lambda: len(_rows(hospital_spool, "SELECT 1 FROM inbound WHERE state='delivered'")) == 2,
        60,
        "both receipts stored by the hospital",
    )
    sent = _rows(hospital_spool, "SELECT peer, message_id, receipt_body FROM inbound")
    assert all(body.startswith(MAGIC) for _, _, body in sent)
    hospital_keys = dict(_rows(hospital_spool, "SELECT item, kek FROM data_keys"))
    assert {sent_receipt_item(p, m) for p, m, _ in sent} <= hospital_keys.keys()


def test_a_body_changed_on_disk_is_never_sent_and_is_kept(
    layout: DemoLayout, processes: Any
) -> None:
    lab = _queue_while_hospital_is_down(layout, processes)
    wait_for_event(
        layout.lab.audit_log,
        "message.send_failed",
        where=lambda r: r["message_id"] == _queued(layout)["large.hl7"][1],
    )
    lab.stop()
    large_id, large_path = _queued(layout)["large.hl7"][1:3]
    tampered = bytearray(Path(large_path).read_bytes())
    tampered[len(tampered) // 2] ^= 0x01
    Path(large_path).write_bytes(bytes(tampered))

    processes.start(layout.hospital.config_path)
    processes.start(layout.lab.config_path)
    alert = wait_for_event(layout.lab.audit_log, "atrest.integrity_failed", timeout=120)
    assert alert["message_id"] == large_id and alert["severity"] == "alert"
    assert "fails its integrity check" in alert["reason"]
    assert "restore the file from a backup" in alert["detail"]["fix"]
    # The small one still goes; the changed one is kept as it is, failed, not sent.
    wait_for_event(layout.lab.audit_log, "receipt.received", timeout=120)
    assert Path(large_path).read_bytes() == bytes(tampered)
    assert _queued(layout)["large.hl7"][4] == "failed"
    assert not (layout.hospital.inbox_dir / "lab" / "large.hl7").exists()
    assert not [
        r
        for r in events(layout.hospital.audit_log, "message.received")
        if r["message_id"] == large_id
    ]


def test_bodies_kept_in_the_clear_before_the_upgrade_are_still_sent(
    layout: DemoLayout, processes: Any
) -> None:
    config = layout.lab.config_path
    config.write_text(config.read_text() + "\n[at_rest]\nenabled = false\n")
    lab = _queue_while_hospital_is_down(layout, processes)
    lab.stop()
    queued = _queued(layout)
    assert Path(queued["large.hl7"][2]).read_bytes()[:1] == b"0"  # DER, as before
    assert queued["small.hl7"][3][:1] == b"0"
    config.write_text(config.read_text().replace("\n[at_rest]\nenabled = false\n", "\n"))

    processes.start(layout.hospital.config_path)
    processes.start(config)
    wait_for_events(layout.lab.audit_log, "receipt.received", count=2, timeout=120)
    assert (layout.hospital.inbox_dir / "lab" / "large.hl7").read_bytes() == LARGE
    assert (layout.hospital.inbox_dir / "lab" / "small.hl7").read_bytes() == SMALL


def test_a_large_outbox_document_is_taken_in_encrypted_without_growing_the_daemon(
    layout: DemoLayout, processes: Any
) -> None:
    """Taken from the outbox, a document is encrypted into state/payloads as it is read,
    then signed and encrypted for the peer from that copy, read as a stream: memory does
    not grow with its size (20 MiB here; the bench takes 1 GiB)."""
    processes.start(layout.hospital.config_path)
    lab = processes.start(layout.lab.config_path)
    # Warm up the paths (imports, TLS, thread pool) with a small document first.
    drop_file(layout.lab.outbox_for("hospital"), "warm.hl7", b"MSH|warm\r")
    wait_for_event(layout.lab.audit_log, "receipt.received")
    before = peak_rss_kib(lab.proc.pid)
    block = os.urandom(1 << 20)
    document = b"".join(block[i:] + block[:i] for i in range(20))
    drop_file(layout.lab.outbox_for("hospital"), "study.dcm", document)
    wait_for_events(layout.lab.audit_log, "receipt.received", count=2, timeout=120)
    after = peak_rss_kib(lab.proc.pid)
    assert (layout.hospital.inbox_dir / "lab" / "study.dcm").read_bytes() == document
    # Held in memory, the document alone would raise the peak by 20 MiB.
    assert after - before < 12 * 1024, f"peak RSS grew by {(after - before) / 1024:.1f} MiB"
