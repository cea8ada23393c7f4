"""A defect while sending one message parks that message and keeps the peer's queue going.

The daemon's sender task meets an unexpected error from a send (here the first
look at its claim before the POST fails, by tests/faultpoint.py): the message is set
to be tried again after ``retry_max_seconds``, an alert names the error, and the next
document to the same peer is sent as usual.
"""

from __future__ import annotations

import time
from typing import Any

import pytest

from gateway.clock import SystemClock
from gateway.demo_run import drop_file
from gateway.pki.demo import DemoLayout
from gateway.spool import OutboundState, SqliteSpool
from tests.helpers.audit import wait_for_events
from tests.helpers.faults import killed_at

pytestmark = pytest.mark.daemon

RETRY_MAX_SECONDS = 600  # long enough that the test ends before the message is tried again


def test_a_send_that_fails_unexpectedly_is_parked_and_the_next_one_is_sent(
    layout: DemoLayout, processes: Any
) -> None:
    config = layout.lab.config_path
    text = config.read_text()
    assert "retry_max_seconds = 5\n" in text
    config.write_text(
        text.replace("retry_max_seconds = 5\n", f"retry_max_seconds = {RETRY_MAX_SECONDS}\n")
    )
    processes.start(layout.hospital.config_path)
    lab = processes.start(
        config,
        prefix=killed_at("--fail-once", "gateway.outbound.send:Sender._fresh"),
    )
    outbox = layout.lab.outbox_for("hospital")
    began = time.time()
    drop_file(outbox, "first.hl7", b"MSH|first\r")
    [failed] = wait_for_events(layout.lab.audit_log, "message.send_failed")
    assert failed["severity"] == "alert"
    assert "internal error while sending (OSError)" in failed["reason"]
    drop_file(outbox, "second.hl7", b"MSH|second\r")
    [receipt] = wait_for_events(layout.lab.audit_log, "receipt.received")
    assert receipt["message_id"] != failed["message_id"]
    assert lab.stop() == 0

    spool = SqliteSpool(layout.lab.root / "state" / "spool.sqlite3", SystemClock())
    try:
        parked = spool.get(failed["message_id"])
    finally:
        spool.close()
    assert parked is not None and parked.state is OutboundState.QUEUED
    assert parked.last_error == "internal error: OSError"
    assert began + RETRY_MAX_SECONDS <= parked.next_attempt_at <= time.time() + RETRY_MAX_SECONDS
