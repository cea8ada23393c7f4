"""A lab's document the hospital's inbox cannot store (a full inbox, one medgw may not
write): what every such refusal shows, whatever its cause.

The lab sends it; the hospital alerts (``storage.unavailable``), answers 503 without a
receipt, and the lab keeps the message for a resend; once the inbox is mended, the
resend is delivered, once, with a verified receipt.
"""

from __future__ import annotations

import os
from typing import Any

from gateway.demo_run import drop_file
from gateway.pki.demo import DemoLayout
from tests.helpers.audit import Record, events, wait_for_event, wait_for_events


def send_to_a_refusing_inbox(layout: DemoLayout, processes: Any) -> tuple[bytes, Record]:
    """Start both gateways and send the hospital a document (``scan.bin``) its inbox cannot
    store: the document, and the hospital's alert, checked for what every refusal says."""
    processes.start(layout.hospital.config_path)
    processes.start(layout.lab.config_path)
    document = os.urandom(20_000)
    drop_file(layout.lab.outbox_dir / "hospital", "scan.bin", document)
    alert = wait_for_event(layout.hospital.audit_log, "storage.unavailable")
    assert alert["severity"] == "alert" and alert["outcome"] == "failure"
    assert alert["peer"] == "lab" and alert["message_id"]
    return document, alert


def assert_kept_for_a_resend(layout: DemoLayout, alert: Record) -> None:
    """The lab was answered 503 for the message ``alert`` names: nothing acknowledged,
    nothing refused for good."""
    retry = wait_for_event(layout.lab.audit_log, "message.send_failed")
    assert "HTTP 503" in retry["reason"] and retry["message_id"] == alert["message_id"]
    assert not events(layout.lab.audit_log, "receipt.received")
    assert not events(layout.lab.audit_log, "message.failed")
    assert not events(layout.hospital.audit_log, "receipt.sent")


def assert_delivered_once(layout: DemoLayout, alert: Record) -> None:
    """Once the inbox is mended: the message ``alert`` names is delivered, once, and the
    lab has its verified receipt."""
    [receipt] = wait_for_events(layout.lab.audit_log, "receipt.received")
    assert receipt["message_id"] == alert["message_id"]
    assert receipt["detail"]["disposition"] == "processed" and receipt["detail"]["mic_verified"]
    assert len(wait_for_events(layout.hospital.audit_log, "message.delivered")) == 1
