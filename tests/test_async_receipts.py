"""Asynchronous receipts (RFC 4130 7.3) between two real gateways."""

from __future__ import annotations

import secrets
from typing import Any

from gateway.clock import SystemClock
from gateway.demo_run import drop_file
from gateway.pki.demo import DemoLayout
from gateway.spool import OutboundState, SqliteSpool
from tests.helpers.audit import wait_for_events
from tests.helpers.demo import hospital_post, hospital_receipt


def ask_async(layout: DemoLayout, url: str) -> None:
    peer_file = layout.lab.root / "peers.d" / "hospital.toml"
    text = peer_file.read_text()
    assert 'async_receipt_url = ""' in text
    peer_file.write_text(text.replace('async_receipt_url = ""', f'async_receipt_url = "{url}"'))


def state_of(layout: DemoLayout, message_id: str) -> OutboundState:
    spool = SqliteSpool(layout.lab.root / "state" / "spool.sqlite3", SystemClock())
    try:
        record = spool.get(message_id)
    finally:
        spool.close()
    assert record is not None
    return record.state


def test_receipt_posted_back_later_settles_the_message(layout: DemoLayout, processes: Any) -> None:
    ask_async(layout, f"https://127.0.0.1:{layout.lab.port}/as2")
    processes.start(layout.hospital.config_path)
    processes.start(layout.lab.config_path)
    drop_file(layout.lab.outbox_dir / "hospital", "later.hl7", b"MSH|async receipt\r")
    [received] = wait_for_events(layout.lab.audit_log, "receipt.received")
    # The receipt may come back before the lab has recorded the message as sent.
    [sent] = wait_for_events(layout.lab.audit_log, "message.sent")
    assert sent["detail"]["receipt"] == "async"
    assert received["detail"]["mic_verified"] is True
    assert received["detail"]["disposition"] == "processed"
    assert state_of(layout, received["message_id"]) is OutboundState.DELIVERED
    assert (layout.hospital.inbox_dir / "lab" / "later.hl7").read_bytes() == b"MSH|async receipt\r"


def test_receipt_url_of_another_host_is_ignored_and_answered_synchronously(
    layout: DemoLayout, processes: Any
) -> None:
    # localhost is not the host the hospital has configured for the lab (127.0.0.1):
    # it must not send anything there, and answers in the HTTP response instead.
    ask_async(layout, f"https://localhost:{layout.lab.port}/as2")
    processes.start(layout.hospital.config_path)
    processes.start(layout.lab.config_path)
    drop_file(layout.lab.outbox_dir / "hospital", "sync.hl7", b"MSH|x\r")
    wait_for_events(layout.lab.audit_log, "receipt.received")
    [sent] = wait_for_events(layout.lab.audit_log, "message.sent")
    assert sent["detail"]["receipt"] == "sync"


def test_unsolicited_receipt_changes_nothing_and_is_audited(
    layout: DemoLayout, processes: Any
) -> None:
    processes.start(layout.lab.config_path)
    message_id = f"<{secrets.token_hex(8)}@KITA-LAB>"
    built = hospital_receipt(layout, message_id, "AAAA, sha-256")
    answer = hospital_post(layout, built.headers, built.body)
    assert answer.status == 200 and b"ignored" in answer.body
    [refused] = wait_for_events(layout.lab.audit_log, "receipt.invalid")
    assert refused["message_id"] == message_id
    assert "no message sent to this peer" in refused["reason"]
