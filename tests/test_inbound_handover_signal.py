"""What a received message tells the daemon about the hand-over worker: it has work
only when the delivered document's hand-over to an internal system was queued.

Waking it for every document (as before) cost the event loop a spool transaction
per received message, behind the workers' commits, with no hand-over configured.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.helpers.receiving import receiver

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
    with receiver(tmp_path, gateway_extra=extra) as hospital:
        request = hospital.request(b"MSH|first\r")

        first = hospital.inbound.process(request)
        assert first.status == 200 and b"processed" in first.body
        assert first.handover is queued
        due = hospital.spool.handover_due(hospital.clock.now().timestamp() + 1)
        assert len(due) == (1 if queued else 0)

        resend = hospital.inbound.process(request)  # answered with the original receipt
        assert resend.status == 200 and resend.body == first.body
        assert resend.handover is False  # queued once, with the first
