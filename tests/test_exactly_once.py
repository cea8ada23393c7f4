"""Exactly once into the inbox, across a crash at the worst moment.

The receiving daemon is stopped (SIGKILL) at an exact point of a delivery by
tests/faultpoint.py: after the document took its name in the inbox and before
anything recorded that.  The sender resends; the document must not be written
again (same inode and modification time, watched all along), the audit trail
must show one ``message.delivered`` and a ``message.duplicate`` for the resend,
and the sender must get a verified ``processed`` receipt.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from gateway.audit import AuditEvent, AuditLog, EventType
from gateway.audit.log import CLOCK_MARGIN, recorded_since
from gateway.clock import SystemClock
from gateway.delivery.http import idempotency_key
from gateway.demo_run import drop_file
from gateway.pki.demo import DemoLayout
from gateway.spool import SqliteSpool
from tests.clocks import TickingClock
from tests.helpers.audit import events, wait_for_events
from tests.helpers.faults import killed_at, wait_killed
from tests.helpers.internal_system import InternalSystem, enable_delivery
from tests.inboxwatch import InboxWatch


@pytest.mark.parametrize(
    "point",
    [
        # Named in the inbox, the work name not yet removed.
        ("--kill-after", "gateway.delivery.inbox:link"),
        # In the inbox and on disk; nothing recorded: not the audit, not the spool.
        ("--kill-after", "gateway.delivery.inbox:finish"),
        # Audited as delivered; the spool does not know it yet.
        ("--kill-after-event", "message.delivered"),
    ],
    ids=["after-link", "after-rename", "after-audit"],
)
def test_a_resend_after_a_kill_between_rename_and_record_is_not_written_again(
    layout: DemoLayout, processes: Any, point: tuple[str, str]
) -> None:
    hospital = processes.start(layout.hospital.config_path, prefix=killed_at(*point))
    processes.start(layout.lab.config_path)
    document = os.urandom(50_000)
    drop_file(layout.lab.outbox_for("hospital"), "order.hl7", document)
    wait_killed(hospital)

    inbox = layout.hospital.inbox_dir / "lab"
    target = inbox / "order.hl7"
    assert target.read_bytes() == document
    before = os.stat(target)
    [received] = events(layout.hospital.audit_log, "message.received")
    message_id = received["message_id"]
    delivered_before = len(events(layout.hospital.audit_log, "message.delivered"))
    assert delivered_before == (1 if point[0] == "--kill-after-event" else 0)
    assert not events(layout.hospital.audit_log, "receipt.sent")

    with InboxWatch(layout.hospital.inbox_dir) as watch:
        processes.start(layout.hospital.config_path)
        [receipt] = wait_for_events(
            layout.lab.audit_log, "receipt.received", where=lambda r: r["message_id"] == message_id
        )
    assert receipt["detail"]["disposition"] == "processed" and receipt["detail"]["mic_verified"]
    assert watch.rewritten == [] and watch.looks > 10
    after = os.stat(target)
    assert (after.st_ino, after.st_mtime_ns, after.st_size) == (
        before.st_ino,
        before.st_mtime_ns,
        before.st_size,
    )
    assert target.read_bytes() == document
    assert sorted(p.name for p in inbox.iterdir()) == ["order.hl7"]  # no work file, no copy
    audit = layout.hospital.audit_log

    def this_one(record: dict[str, Any]) -> bool:
        return bool(record["message_id"] == message_id)

    [delivered] = wait_for_events(audit, "message.delivered", where=this_one)
    assert delivered["detail"]["inbox_file"] == str(target)
    assert delivered["detail"]["sha256"] == received["detail"]["sha256"]
    [duplicate] = wait_for_events(audit, "message.duplicate", where=this_one)
    assert "not written again" in duplicate["reason"]
    [sent] = wait_for_events(audit, "receipt.sent", where=this_one)
    assert sent["detail"]["disposition"] == "processed"


def test_a_document_taken_from_the_inbox_before_the_restart_is_not_written_again(
    layout: DemoLayout, processes: Any
) -> None:
    """The internal system took the document away while medgw was down: its work
    file being gone is what tells that it was delivered."""
    hospital = processes.start(
        layout.hospital.config_path,
        prefix=killed_at("--kill-after", "gateway.delivery.inbox:finish"),
    )
    processes.start(layout.lab.config_path)
    drop_file(layout.lab.outbox_for("hospital"), "order.hl7", b"MSH|order\r")
    wait_killed(hospital)
    inbox = layout.hospital.inbox_dir / "lab"
    (inbox / "order.hl7").rename(layout.root / "taken.hl7")  # the internal system's move

    processes.start(layout.hospital.config_path)
    [receipt] = wait_for_events(layout.lab.audit_log, "receipt.received")
    assert receipt["detail"]["disposition"] == "processed" and receipt["detail"]["mic_verified"]
    assert list(inbox.iterdir()) == []  # not delivered a second time
    assert len(events(layout.hospital.audit_log, "message.delivered")) == 1
    assert len(wait_for_events(layout.hospital.audit_log, "message.duplicate")) == 1


@pytest.mark.parametrize(
    "kill_point",
    [
        # written, not recorded yet: the node that made it removes it at its next start,
        # however young (well within a lease)
        "gateway.spool.sqlite:SqliteSpool.inbound_begin",
        # recorded, written, not named: nothing reached the inbox; recovery settles it
        "gateway.delivery.inbox:link",
    ],
    ids=["before-the-record", "before-the-rename"],
)
def test_a_kill_with_a_work_file_in_the_inbox_delivers_the_resend_once(
    layout: DemoLayout, processes: Any, kill_point: str
) -> None:
    """Killed with the document in its work file, before it was named into the inbox:
    after the restart the work file is gone and the resend is delivered once."""
    hospital = processes.start(
        layout.hospital.config_path, prefix=killed_at("--kill-before", kill_point)
    )
    processes.start(layout.lab.config_path)
    drop_file(layout.lab.outbox_for("hospital"), "order.hl7", b"MSH|order\r")
    wait_killed(hospital)
    inbox = layout.hospital.inbox_dir / "lab"
    [work] = list(inbox.iterdir())
    assert work.name.startswith(".order.hl7.") and work.name.endswith(".delivering")

    processes.start(layout.hospital.config_path)
    wait_for_events(layout.lab.audit_log, "receipt.received")
    assert not work.exists()
    assert sorted(p.name for p in inbox.iterdir()) == ["order.hl7"]
    assert (inbox / "order.hl7").read_bytes() == b"MSH|order\r"
    assert len(wait_for_events(layout.hospital.audit_log, "message.delivered")) == 1
    assert not events(layout.hospital.audit_log, "message.duplicate")


def test_a_kill_between_the_internal_systems_answer_and_the_record_hands_over_with_one_key(
    layout: DemoLayout,
    processes: Any,
    internal_port: int,
) -> None:
    """The hand-over is at least once: the repeat carries the same Idempotency-Key."""
    enable_delivery(layout, internal_port)
    system = InternalSystem(internal_port)
    try:
        hospital = processes.start(
            layout.hospital.config_path,
            prefix=killed_at("--kill-before", "gateway.spool.sqlite:SqliteSpool.handover_done"),
        )
        processes.start(layout.lab.config_path)
        drop_file(layout.lab.outbox_for("hospital"), "doc.hl7", b"MSH|doc\r")
        wait_killed(hospital)
        [first] = system.ok()
        processes.start(layout.hospital.config_path)
        wait_for_events(layout.hospital.audit_log, "message.handed_over")
        first_path, first_headers, first_body, _ = first
        [_, (path, headers, body, _)] = system.ok()
        assert (path, body) == (first_path, first_body) == ("/inbound", b"MSH|doc\r")
        for name in ("Idempotency-Key", "X-Medgw-Peer", "X-Medgw-Sha256", "X-Medgw-Filename"):
            assert headers[name] == first_headers[name], name
        [receipt] = wait_for_events(layout.lab.audit_log, "receipt.received")
        assert headers["Idempotency-Key"] == idempotency_key("lab", receipt["message_id"])
        assert headers["X-Medgw-Message-Id"] == receipt["message_id"]
        assert len(events(layout.hospital.audit_log, "message.handed_over")) == 1
        assert len(events(layout.hospital.audit_log, "message.delivered")) == 1
    finally:
        system.close()


def test_recovery_reads_only_the_audit_written_since_the_delivery_began(tmp_path: Path) -> None:
    clock = TickingClock()
    log = AuditLog(tmp_path / "audit.jsonl", clock, node="n")
    for number in range(600):
        log.emit(AuditEvent(EventType.MESSAGE_RECEIVED, peer="lab", message_id=f"<{number}@x>"))
    began = clock.now()
    log.emit(AuditEvent(EventType.MESSAGE_DELIVERED, peer="lab", message_id="<late@x>"))
    for number in range(500):  # other documents, after it
        log.emit(AuditEvent(EventType.MESSAGE_RECEIVED, peer="lab", message_id=f"<o{number}@x>"))
    log.close()

    def of(message_id: str) -> Callable[[dict[str, Any]], bool]:
        return lambda record: record.get("message_id") == message_id

    looked: list[str] = []

    def watching(record: dict[str, Any]) -> bool:
        looked.append(record["message_id"])
        return False

    for block in (97, 4096, 1 << 16):  # records cut across reads
        assert recorded_since(tmp_path / "audit.jsonl", began, of("<late@x>"), block=block)
        assert not recorded_since(tmp_path / "audit.jsonl", began, of("<early@x>"), block=block)
    # An earlier record is not looked for further back than the clock margin.
    assert not recorded_since(tmp_path / "audit.jsonl", began + CLOCK_MARGIN, of("<0@x>"))
    looked.clear()
    recorded_since(tmp_path / "audit.jsonl", began + CLOCK_MARGIN, watching)
    assert len(looked) == 501


@pytest.mark.parametrize(
    ("point", "cause"),
    [
        (("--fail-once-at-event", "message.delivered"), "No space left"),
        (("--fail-once", "gateway.delivery.inbox:finish"), "Input/output error"),
    ],
    ids=["audit-record", "work-name-removal"],
)
def test_a_resend_after_a_failure_between_rename_and_record_is_not_written_again(
    layout: DemoLayout, processes: Any, point: tuple[str, str], cause: str
) -> None:
    """No crash: after the document took its name, the audit record of the delivery
    could not be written, or the work name removed (503); the resend to the same
    process settles the delivery without writing it again."""
    processes.start(layout.hospital.config_path, prefix=killed_at(*point))
    processes.start(layout.lab.config_path)
    with InboxWatch(layout.hospital.inbox_dir) as watch:
        drop_file(layout.lab.outbox_for("hospital"), "order.hl7", b"MSH|order\r")
        [receipt] = wait_for_events(layout.lab.audit_log, "receipt.received")
    assert receipt["detail"]["disposition"] == "processed" and receipt["detail"]["mic_verified"]
    assert watch.rewritten == []
    message_id = receipt["message_id"]
    audit = layout.hospital.audit_log

    def this_one(record: dict[str, Any]) -> bool:
        return bool(record["message_id"] == message_id)

    [unavailable] = wait_for_events(audit, "storage.unavailable", where=this_one)
    assert cause in unavailable["reason"] and "answered 503" in unavailable["reason"]
    [delivered] = wait_for_events(audit, "message.delivered", where=this_one)
    assert "before an interruption" in delivered["reason"]
    assert len(wait_for_events(audit, "message.duplicate", where=this_one)) == 1

    inbox = layout.hospital.inbox_dir / "lab"
    assert sorted(p.name for p in inbox.iterdir()) == ["order.hl7"]


def test_deliveries_recorded_by_an_older_version_are_settled_at_start(
    layout: DemoLayout, processes: Any
) -> None:
    """A spool row without a work file: in the inbox if its target is there."""
    spool = SqliteSpool(layout.hospital.root / "state" / "spool.sqlite3", SystemClock())
    inbox = layout.hospital.inbox_dir / "lab"
    inbox.mkdir(parents=True)
    (inbox / "there.hl7").write_bytes(b"MSH|there\r")
    try:
        spool.inbound_begin("lab", "<there@x>", "ab" * 32, inbox / "there.hl7")
        spool.inbound_begin("lab", "<gone@x>", "cd" * 32, inbox / "gone.hl7")
    finally:
        spool.close()
    processes.start(layout.hospital.config_path).stop()
    processes.start(layout.hospital.config_path).stop()  # settled once, not at every start

    spool = SqliteSpool(layout.hospital.root / "state" / "spool.sqlite3", SystemClock())
    try:
        there = spool.inbound_get("lab", "<there@x>")
        assert there is not None and there.state == "written"
        assert spool.inbound_get("lab", "<gone@x>") is None
    finally:
        spool.close()
    [delivered] = events(layout.hospital.audit_log, "message.delivered")
    assert delivered["message_id"] == "<there@x>"
    assert delivered["detail"]["inbox_file"] == str(inbox / "there.hl7")
    assert (inbox / "there.hl7").read_bytes() == b"MSH|there\r"


def test_the_idempotency_key_names_the_document_not_only_its_message_id() -> None:
    """A peer chooses its Message-IDs: one it reuses from another peer is another key."""
    key = idempotency_key("lab", "<m@x>")
    assert key == idempotency_key("lab", "<m@x>") and len(key) == 64
    others = {
        idempotency_key("pharmacy", "<m@x>"),
        idempotency_key("lab", "<n@x>"),
        idempotency_key("la", "b\0<m@x>"),
        idempotency_key("lab:", "<m@x>"),
    }
    assert key not in others and len(others) == 4


def test_a_failed_hand_over_attempt_is_audited_before_it_is_counted(
    layout: DemoLayout,
    processes: Any,
    internal_port: int,
) -> None:
    """A crash between the two leaves an audited attempt, never a counted one the
    audit trail does not show."""
    enable_delivery(layout, internal_port)  # nothing listens there yet
    point = "gateway.spool.sqlite.handover:HandoverQueue.handover_retry"
    hospital = processes.start(
        layout.hospital.config_path,
        prefix=killed_at("--kill-before", point),
    )
    processes.start(layout.lab.config_path)
    drop_file(layout.lab.outbox_for("hospital"), "doc.hl7", b"MSH|doc\r")
    wait_killed(hospital)
    [failed] = events(layout.hospital.audit_log, "message.handover_failed")
    assert failed["detail"]["attempt"] == 1
    system = InternalSystem(internal_port)
    try:
        processes.start(layout.hospital.config_path)
        [handed] = wait_for_events(layout.hospital.audit_log, "message.handed_over")
        assert handed["detail"]["attempt"] == 1  # the uncounted attempt's number again
        assert len(system.ok()) == 1
    finally:
        system.close()
