"""A receipt that could not be built is no receipt: nothing is stored as one.

A real ``medgw run`` daemon whose signing fails (tests/faultpoint.py ``--refuse-until``
on the function that signs receipts, as a signing key the policy no longer takes)
until the test lets it work again.  The document is delivered once; the peer is
answered 500 with the text of any internal failure, the error answer is kept
nowhere, no ``receipt.sent`` is written, and the peer's resend is answered with a
receipt built then.  On both spool backends.
"""

from __future__ import annotations

from pathlib import Path

from gateway.channel.answers import ANSWERS, Answer
from gateway.pki.demo import DemoLayout
from tests.conftest import Processes
from tests.helpers.audit import events
from tests.helpers.demo import lab_message, lab_post, receipt_of
from tests.helpers.faults import killed_at

SIGNING = "gateway.as2.mdn:sign_entity"  # signs every receipt the gateway builds


def test_a_receipt_not_built_is_not_stored_and_the_resend_gets_one(
    layout: DemoLayout, spool_backend: str, processes: Processes, tmp_path: Path
) -> None:
    works = tmp_path / "signing-works"
    hospital = processes.start(
        layout.hospital.config_path,
        prefix=killed_at("--refuse-until", SIGNING, "--until-file", str(works)),
    )
    audit = layout.hospital.audit_log
    message = lab_message(layout, b"MSH|scan\r", filename="scan.hl7")

    answer = lab_post(layout, *message)
    internal = ANSWERS[Answer.RECEIPT_NOT_BUILT]
    assert (answer.status, answer.body) == (internal.status, internal.text.encode()), answer
    # Each record is written before its answer is sent.
    [delivered] = events(audit, "message.delivered")
    assert events(audit, "receipt.sent") == []
    failed = hospital.wait_for(lambda line: line.get("event") == "receipt.build_failed", 60)
    assert "the signing key is refused" in failed["error"], failed
    inbox = layout.hospital.inbox_dir / "lab"
    assert [p.name for p in inbox.iterdir()] == ["scan.hl7"]

    works.touch()  # the signing key works again
    resent = receipt_of(layout, lab_post(layout, *message))
    assert resent.processed, resent
    [sent] = events(audit, "receipt.sent")
    assert sent["message_id"] == delivered["message_id"]
    assert len(events(audit, "message.delivered")) == 1
    assert [p.name for p in inbox.iterdir()] == ["scan.hl7"]
    assert (inbox / "scan.hl7").read_bytes() == b"MSH|scan\r"
