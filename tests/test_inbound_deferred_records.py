"""The receiver writes a document's audit records early and waits for them late, and
they keep their guarantees (bench/README.md, "The receiver's per-message system calls").

``message.received`` is written before the claim and made durable just before the
document is linked into the inbox, after the work file's sync; ``message.delivered``
is written once the document is in the inbox and made durable just before the spool
calls it delivered, after the receipt is signed.  An audit fsync that fails during
such a wait stops the step the record must precede, and the resend delivers the
document once.  The audit log's fsync is the real one, failing at one call as a
failing disk does; the spool is each backend in turn.
"""

from __future__ import annotations

import errno
import io
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from gateway.audit import AuditLog, verify_chain
from gateway.channel.answers import Answer
from gateway.clock import SystemClock
from gateway.config import GatewayConfig, load_config
from gateway.inbound import InboundProcessor, InboundRequest
from gateway.logs import make_logger
from gateway.spool import InboundRecord, Spool
from tests.conftest import MakeSpool
from tests.helpers.audit import events
from tests.helpers.zones import Site, as2_message, new_ca

DOCUMENT = b"MSH|^~\\&|LAB|deferred\r"


class Disk:
    """The audit log's os.fsync; call ``fail_at`` (the one at opening is the 1st) raises
    EIO instead, after ``seen()`` notes how things stand at that moment."""

    def __init__(self, fail_at: int, seen: Callable[[], None]) -> None:
        self.fail_at = fail_at
        self.seen = seen
        self.calls = 0

    def __call__(self, fd: int) -> None:
        self.calls += 1
        if self.calls == self.fail_at:
            self.seen()
            raise OSError(errno.EIO, "Input/output error")
        os.fsync(fd)


@dataclass
class Hospital:
    config: GatewayConfig
    spool: Spool
    audit: AuditLog
    inbound: InboundProcessor
    request: InboundRequest

    @property
    def message_id(self) -> str:
        return self.request.headers["message-id"]

    @property
    def folder(self) -> Path:
        return self.config.storage.inbox_dir / "lab"

    def files(self) -> dict[str, bytes]:
        """Everything in the peer's inbox folder, hidden work files too."""
        if not self.folder.exists():
            return {}
        return {p.name: p.read_bytes() for p in sorted(self.folder.iterdir())}

    def record(self) -> InboundRecord | None:
        return self.spool.inbound_get("lab", self.message_id)

    def trail(self, name: str) -> list[str]:
        found = events(self.config.storage.audit_log, name)
        return [r["message_id"] for r in found if r["message_id"] == self.message_id]


@pytest.fixture
def opened(tmp_path: Path, make_spool: MakeSpool) -> Iterator[Callable[[Disk], Hospital]]:
    """Opens the hospital's pipeline with the audit log syncing through a Disk."""
    ca = new_ca("Net")
    hospital = Site.make(tmp_path, "hospital", "SAKURA-HOSPITAL", ca, ["127.0.0.1"])
    lab = Site.make(tmp_path, "lab", "LAB-1", ca, ["127.0.0.1"])
    hospital.zone("z0", ["127.0.0.0/8"], [hospital, lab])
    hospital.listen("z0", "127.0.0.1", 4080, "z0")
    hospital.peer(lab, "z0", "https://127.0.0.1:4180/as2")
    config = load_config(hospital.write())
    clock = SystemClock()
    logs: list[AuditLog] = []

    def open_with(disk: Disk) -> Hospital:
        spool = make_spool(clock)
        audit = AuditLog(config.storage.audit_log, clock, node=config.as2_id, sync=disk)
        logs.append(audit)
        inbound = InboundProcessor(config, spool, audit, make_logger("error", io.StringIO()), clock)
        [peer] = config.peers
        built = as2_message(lab, hospital, hospital.as2_id, DOCUMENT)
        headers = {k.lower(): v for k, v in built.headers}
        return Hospital(
            config, spool, audit, inbound, InboundRequest(peer, "127.0.0.1", headers, built.body)
        )

    yield open_with
    for audit in logs:
        audit.close()


def test_a_failed_fsync_of_message_received_keeps_the_document_out_of_the_inbox(
    opened: Callable[[Disk], Hospital],
) -> None:
    at_fsync: dict[str, object] = {}
    hospital: Hospital | None = None

    def seen() -> None:
        assert hospital is not None
        record = hospital.record()
        at_fsync["claim"] = record.state if record is not None else None
        at_fsync["files"] = list(hospital.files().values())

    # The 2nd fsync, the first after opening: message.received's.
    hospital = opened(Disk(2, seen))
    answer = hospital.inbound.process(hospital.request)

    # Its fsync came after the claim and the work file's sync: waited for late...
    assert at_fsync == {"claim": "delivering", "files": [DOCUMENT]}
    # ...and its failure stopped the link: nothing in the inbox, the claim given back,
    # the record cut off; the peer is told to resend.
    assert answer.answer is Answer.UNAVAILABLE
    assert hospital.files() == {}
    assert hospital.record() is None
    assert hospital.trail("message.received") == []

    answer = hospital.inbound.process(hospital.request)  # the resend
    assert answer.answer is Answer.RECEIPT and b"processed" in answer.body
    assert list(hospital.files().values()) == [DOCUMENT]
    assert not any(name.startswith(".") for name in hospital.files())
    for name in ("message.received", "message.delivered", "receipt.sent"):
        assert len(hospital.trail(name)) == 1, name
    record = hospital.record()
    assert record is not None and record.state == "delivered"
    hospital.audit.close()
    assert verify_chain(hospital.config.storage.audit_log) > 0


def test_a_failed_fsync_of_message_delivered_keeps_the_spool_from_calling_it_delivered(
    opened: Callable[[Disk], Hospital],
) -> None:
    at_fsync: dict[str, object] = {}
    hospital: Hospital | None = None

    def seen() -> None:
        assert hospital is not None
        record = hospital.record()
        at_fsync["claim"] = record.state if record is not None else None
        at_fsync["files"] = list(hospital.files().values())

    # The 3rd fsync: message.delivered's (message.received's was the 2nd).
    hospital = opened(Disk(3, seen))
    answer = hospital.inbound.process(hospital.request)

    # The document was in the inbox, the spool not yet told; the failure keeps it so.
    assert at_fsync == {"claim": "delivering", "files": [DOCUMENT]}
    assert answer.answer is Answer.UNAVAILABLE
    [(name, body)] = hospital.files().items()
    assert body == DOCUMENT and not name.startswith(".")
    record = hospital.record()
    assert record is not None and record.state == "delivering"
    assert hospital.trail("message.delivered") == []
    assert hospital.trail("receipt.sent") == []
    inode = os.stat(hospital.folder / name).st_ino

    answer = hospital.inbound.process(hospital.request)  # the resend: settled, not rewritten
    assert answer.answer is Answer.RECEIPT and b"processed" in answer.body
    assert hospital.files() == {name: DOCUMENT}
    assert os.stat(hospital.folder / name).st_ino == inode
    for event in ("message.received", "message.delivered", "message.duplicate", "receipt.sent"):
        assert len(hospital.trail(event)) == 1, event
    record = hospital.record()
    assert record is not None and record.state == "delivered"
    hospital.audit.close()
    assert verify_chain(hospital.config.storage.audit_log) > 0


def test_a_work_file_that_cannot_be_removed_does_not_undo_a_delivery(
    opened: Callable[[Disk], Hospital], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The request's work file is removed after the document is in the inbox and its
    message.delivered written.  A removal that fails then (the disk's error) must not
    turn the delivery into a 503 with that record never waited for: the document is
    answered with its receipt and the file left for the next start."""
    hospital = opened(Disk(0, lambda: None))
    spooled = tmp_path / "body.as2"
    assert isinstance(hospital.request.body, bytes)
    spooled.write_bytes(hospital.request.body)
    request = InboundRequest(
        hospital.request.peer, hospital.request.remote, hospital.request.headers, spooled
    )
    unlink = Path.unlink

    def failing(path: Path, missing_ok: bool = False) -> None:
        if path.suffix == ".signed":
            raise OSError(errno.EIO, "Input/output error")
        unlink(path, missing_ok=missing_ok)

    monkeypatch.setattr(Path, "unlink", failing)
    response = hospital.inbound.process(request)
    monkeypatch.undo()
    assert response.answer is Answer.RECEIPT
    record = hospital.record()
    assert record is not None and record.state == "delivered", record
    assert hospital.trail("message.delivered") == [hospital.message_id]
    assert hospital.trail("receipt.sent") == [hospital.message_id]
    assert list(hospital.files().values()) == [DOCUMENT]
