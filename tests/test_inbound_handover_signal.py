"""What a received message tells the daemon about the hand-over worker: it has work
only when the delivered document's hand-over to an internal system was queued.

Waking it for every document (as before) cost the event loop a spool transaction
per received message, behind the workers' commits, with no hand-over configured.
"""

from __future__ import annotations

import io
from pathlib import Path

import pytest

from gateway.audit import AuditLog
from gateway.clock import SystemClock
from gateway.config import load_config
from gateway.inbound import InboundProcessor, InboundRequest
from gateway.logs import make_logger
from gateway.spool import SqliteSpool
from tests.helpers.zones import Site, as2_message, new_ca

DELIVERY = """
[delivery]
http_url = "http://127.0.0.1:9/inbound"
timeout_seconds = 5
"""


@pytest.mark.parametrize(
    ("extra", "queued"), [("", False), (DELIVERY, True)], ids=["inbox-only", "hand-over"]
)
def test_a_delivered_document_says_whether_its_hand_over_was_queued(
    tmp_path: Path, extra: str, queued: bool
) -> None:
    ca = new_ca("Net")
    hospital = Site.make(tmp_path, "hospital", "SAKURA-HOSPITAL", ca, ["127.0.0.1"])
    lab = Site.make(tmp_path, "lab", "LAB-1", ca, ["127.0.0.1"])
    hospital.zone("z0", ["127.0.0.0/8"], [hospital, lab])
    hospital.listen("z0", "127.0.0.1", 4080, "z0")
    hospital.peer(lab, "z0", "https://127.0.0.1:4180/as2")
    config = load_config(hospital.write(gateway_extra=extra))
    clock = SystemClock()
    spool = SqliteSpool(config.storage.state_dir / "spool.sqlite3", clock)
    audit = AuditLog(config.storage.audit_log, clock, node=config.as2_id)
    try:
        inbound = InboundProcessor(config, spool, audit, make_logger("error", io.StringIO()), clock)
        [peer] = config.peers
        built = as2_message(lab, hospital, hospital.as2_id, b"MSH|first\r")
        request = InboundRequest(
            peer, "127.0.0.1", {k.lower(): v for k, v in built.headers}, built.body
        )

        first = inbound.process(request)
        assert first.status == 200 and b"processed" in first.body
        assert first.handover is queued
        assert len(spool.handover_due(clock.now().timestamp() + 1)) == (1 if queued else 0)

        resend = inbound.process(request)  # answered with the original receipt
        assert resend.status == 200 and resend.body == first.body
        assert resend.handover is False  # queued once, with the first
    finally:
        audit.close()
        spool.close()
