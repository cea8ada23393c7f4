"""Audit records cut off from a change the spool committed, written later.

A message given up without a receipt (failed at its preparation, expired, dead,
cancelled by an operator) is committed in the spool before its record is written.  A
real daemon is killed right after the spool's change (tests/faultpoint.py), then
started again; or its record's write fails (as on a full disk) while it keeps running.
Either way the trail has the record exactly once, and ``medgw audit verify`` passes."""

from __future__ import annotations

import sqlite3
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from gateway.audit import AuditEvent, EventType
from gateway.audit.log import CLOCK_MARGIN, AuditLog
from gateway.config import load_config
from gateway.demo_run import drop_file, read_audit
from gateway.pki.demo import DemoLayout
from gateway.spool import Claimant, OutboundState, SqliteSpool
from tests.cli import medgw
from tests.clocks import SetClock
from tests.helpers.audit import events, wait_for_events
from tests.helpers.demo import EXPIRING_SOON, new_demo, set_runtime
from tests.helpers.faults import killed_at, wait_killed
from tests.helpers.internal_system import InternalSystem, enable_delivery

OUTBOUND = "gateway.spool.sqlite.outbound:OutboundQueue"
SPOOL = "gateway.spool.sqlite:SqliteSpool"


def _lab_killed_after(layout: DemoLayout, processes: Any, step: str | None) -> Any:
    """The lab started, to be killed right after its outbound queue's ``step`` (None:
    never)."""
    prefix = () if step is None else killed_at("--kill-after", f"{OUTBOUND}.{step}")
    return processes.start(layout.lab.config_path, prefix=prefix)


def _retry_in_an_hour(layout: DemoLayout) -> None:
    set_runtime(layout.lab.config_path, "retry_initial_seconds", "3600")
    set_runtime(layout.lab.config_path, "retry_max_seconds", "3600")


def _queued_and_tried(
    layout: DemoLayout, processes: Any, kill_after: str | None = None
) -> tuple[Any, str]:
    """The lab (to be killed after ``kill_after``), its peer down, with one document
    queued after a first failed attempt (the next one an hour away); returns the lab's
    process and the message's id."""
    _retry_in_an_hour(layout)
    lab = _lab_killed_after(layout, processes, kill_after)
    drop_file(layout.lab.outbox_dir / "hospital", "given-up.hl7", b"MSH|given up\r")
    [failed] = wait_for_events(layout.lab.audit_log, "message.send_failed")
    return lab, failed["message_id"]


def _tried_then_changed(
    layout: DemoLayout, processes: Any, kill_after: str, sql: str, *params: object
) -> tuple[Any, str]:
    """:func:`_queued_and_tried`, the lab stopped, ``sql`` run on its spool with
    ``params`` and the message's id; then the lab started again, to be killed after
    ``kill_after``."""
    lab, message_id = _queued_and_tried(layout, processes)
    assert lab.stop() == 0
    db = sqlite3.connect(layout.lab.root / "state" / "spool.sqlite3")
    with db:
        db.execute(sql, (*params, message_id))
    db.close()
    return _lab_killed_after(layout, processes, kill_after), message_id


def _cut_off_then_restarted(
    layout: DemoLayout, processes: Any, lab: Any, event: str, side: Any = None, before: int = 0
) -> Any:
    """``lab`` (or the process of ``side``) killed at its fault point, with ``event``
    not yet recorded (its trail has ``before`` records of it, of earlier steps); then
    started again and stopped (recovery is done before it is ready): the records of
    ``event``."""
    side = side or layout.lab
    wait_killed(lab)
    assert len(events(side.audit_log, event)) == before  # cut off by the kill
    assert processes.start(side.config_path).stop() == 0
    _verified(side.config_path)
    return events(side.audit_log, event)


def _received_then_cut_off(
    layout: DemoLayout, processes: Any, kill_after: str, name: str, event: str
) -> tuple[Any, dict[str, Any], dict[str, Any]]:
    """The hospital, to be killed after its spool's ``kill_after``, receives the lab's
    document ``name``; :func:`_cut_off_then_restarted` for its ``event``.  Returns the
    lab's process, that record and the document's ``message.delivered``."""
    hospital = processes.start(
        layout.hospital.config_path, prefix=killed_at("--kill-after", f"{SPOOL}.{kill_after}")
    )
    lab = processes.start(layout.lab.config_path)
    drop_file(layout.lab.outbox_dir / "hospital", name, b"MSH|%s\r" % name.split(".")[0].encode())
    [record] = _cut_off_then_restarted(layout, processes, hospital, event, layout.hospital)
    [delivered] = events(layout.hospital.audit_log, "message.delivered")
    return lab, record, delivered


def _verified(config: Path) -> None:
    verified = medgw("audit", "verify", "--config", str(config))
    assert verified.returncode == 0, verified.stdout + verified.stderr


def _recovered(record: dict[str, Any]) -> None:
    assert record["detail"]["recorded_at_recovery"] is True
    assert "recorded at recovery" in record["reason"]


def test_a_kill_after_the_last_attempt_writes_message_dead_at_the_next_start(
    layout: DemoLayout, processes: Any
) -> None:
    set_runtime(layout.lab.config_path, "max_attempts", "1")
    lab = _lab_killed_after(layout, processes, "mark_dead")
    drop_file(layout.lab.outbox_dir / "hospital", "dead.hl7", b"MSH|dead\r")
    [accepted] = wait_for_events(layout.lab.audit_log, "message.accepted")
    [dead] = _cut_off_then_restarted(layout, processes, lab, "message.dead")
    assert dead["message_id"] == accepted["message_id"]
    assert dead["severity"] == "alert" and "1 attempts failed" in dead["reason"]
    _recovered(dead)


def test_a_kill_after_expiry_writes_message_expired_at_the_next_start(
    layout: DemoLayout, processes: Any
) -> None:
    # Time passes for the spool: its expiry moved into the past, as an hour later would.
    lab, message_id = _tried_then_changed(
        layout, processes, "expire_due", "UPDATE outbound SET expires_at=1 WHERE message_id=?"
    )
    [expired] = _cut_off_then_restarted(layout, processes, lab, "message.expired")
    assert expired["message_id"] == message_id and expired["severity"] == "alert"
    assert "not delivered before its expiry" in expired["reason"]
    _recovered(expired)


def test_a_kill_after_an_operator_cancel_writes_message_cancelled_at_the_next_start(
    layout: DemoLayout, processes: Any
) -> None:
    lab, message_id = _queued_and_tried(layout, processes, "operator_cancel")
    cancel = medgw("queue", "cancel", message_id, "--config", str(layout.lab.config_path))
    assert cancel.returncode != 0  # the daemon died before it answered
    [cancelled] = _cut_off_then_restarted(layout, processes, lab, "message.cancelled")
    assert cancelled["message_id"] == message_id and cancelled["severity"] == "warning"
    assert "uid" in cancelled["actor"]  # the operator, as the spool kept it
    _recovered(cancelled)


def test_a_kill_after_an_operator_retry_writes_message_retried_not_another_accepted(
    layout: DemoLayout, processes: Any
) -> None:
    """Back in the queue with no attempt yet, as after its intake: its last record is the
    operator's ``message.retried``, and its ``message.accepted`` is not written again."""
    set_runtime(layout.lab.config_path, "max_attempts", "1")
    lab = _lab_killed_after(layout, processes, "operator_retry")
    drop_file(layout.lab.outbox_dir / "hospital", "again.hl7", b"MSH|again\r")
    [dead] = wait_for_events(layout.lab.audit_log, "message.dead")
    retry = medgw("queue", "retry", dead["message_id"], "--config", str(layout.lab.config_path))
    assert retry.returncode != 0  # the daemon died before it answered
    [retried] = _cut_off_then_restarted(layout, processes, lab, "message.retried")
    assert retried["message_id"] == dead["message_id"] and "uid" in retried["actor"]
    _recovered(retried)
    assert len(events(layout.lab.audit_log, "message.accepted")) == 1


def test_a_kill_after_a_failed_preparation_writes_message_failed_at_the_next_start(
    layout: DemoLayout, processes: Any
) -> None:
    lab = processes.start(
        layout.lab.config_path,
        prefix=killed_at(
            "--fail-once",
            "gateway.outbound.seal:Sealer._build",
            "--kill-after",
            f"{OUTBOUND}.fail_intake",
        ),
    )
    drop_file(layout.lab.outbox_dir / "hospital", "unsealed.hl7", b"MSH|unsealed\r")
    [failed] = _cut_off_then_restarted(layout, processes, lab, "message.failed")
    assert failed["severity"] == "alert" and "Input/output error" in failed["reason"]
    assert failed["detail"]["disposition"] == "not-sent"
    _recovered(failed)
    shown = medgw("queue", "show", failed["message_id"], "--config", str(layout.lab.config_path))
    assert shown.returncode == 0 and "failed" in shown.stdout


def test_a_kill_after_a_failed_send_is_queued_again_writes_message_send_failed_once(
    layout: DemoLayout, processes: Any
) -> None:
    """The peer down: the send's failure committed (queued again, the next attempt an
    hour away), the daemon killed before its ``message.send_failed`` is written."""
    _retry_in_an_hour(layout)
    lab = _lab_killed_after(layout, processes, "mark_retry")
    drop_file(layout.lab.outbox_dir / "hospital", "refused.hl7", b"MSH|refused\r")
    [accepted] = wait_for_events(layout.lab.audit_log, "message.accepted")
    [failed] = _cut_off_then_restarted(layout, processes, lab, "message.send_failed")
    assert failed["message_id"] == accepted["message_id"]
    assert failed["severity"] == "warning" and failed["detail"]["attempts"] == 1
    _recovered(failed)
    assert processes.start(layout.lab.config_path).stop() == 0  # once, whatever follows
    assert len(events(layout.lab.audit_log, "message.send_failed")) == 1


def test_a_kill_after_an_unanswered_send_is_queued_again_writes_message_send_failed_once(
    layout: DemoLayout, processes: Any
) -> None:
    """Its asynchronous receipt overdue: queued again to be resent, the daemon killed
    before that ``message.send_failed`` is written; the earlier attempt's one stays
    the only other."""
    # Sent long ago, its receipt never come (as request_timeout_seconds later would be).
    lab, message_id = _tried_then_changed(
        layout,
        processes,
        "requeue_unanswered",
        "UPDATE outbound SET state='awaiting-receipt', updated_at=? WHERE message_id=?",
        "2000-01-01T00:00:00+00:00",
    )
    send_failed = _cut_off_then_restarted(layout, processes, lab, "message.send_failed", before=1)
    first, overdue = send_failed  # the first attempt's, and the one cut off
    assert first["message_id"] == overdue["message_id"] == message_id
    assert "no asynchronous receipt in time" in overdue["reason"]
    _recovered(overdue)


def test_a_kill_after_a_received_documents_receipt_is_stored_writes_receipt_sent_once(
    layout: DemoLayout, processes: Any
) -> None:
    """The hospital's receipt stored (the message delivered, answered "processed"),
    killed before its ``receipt.sent`` is written; the resend is answered with the
    stored receipt as a duplicate, and writes none."""
    lab, sent, delivered = _received_then_cut_off(
        layout, processes, "inbound_delivered_all", "answered.hl7", "receipt.sent"
    )
    assert sent["message_id"] == delivered["message_id"] and sent["outcome"] == "success"
    assert sent["detail"]["disposition"] == "processed"
    assert sent["detail"]["inbox_file"] == delivered["detail"]["inbox_file"]
    _recovered(sent)
    lab.stop()
    processes.start(layout.hospital.config_path)
    processes.start(layout.lab.config_path)  # resends: answered with the stored receipt
    wait_for_events(layout.lab.audit_log, "receipt.received")
    assert len(events(layout.hospital.audit_log, "receipt.sent")) == 1


def test_a_kill_after_a_hand_over_writes_message_handed_over_once_at_the_next_start(
    layout: DemoLayout, processes: Any, internal_port: int
) -> None:
    """The internal system took the document and the spool marked it handed over;
    killed before ``message.handed_over`` is written.  Not handed over again."""
    enable_delivery(layout, internal_port)
    system = InternalSystem(internal_port)
    try:
        _, handed, delivered = _received_then_cut_off(
            layout, processes, "handover_done", "handed.hl7", "message.handed_over"
        )
        assert handed["message_id"] == delivered["message_id"]
        assert handed["detail"]["sha256"] == delivered["detail"]["sha256"]
        assert handed["detail"]["attempt"] == 1
        _recovered(handed)
        assert len(system.ok()) == 1  # not handed over again
    finally:
        system.close()


def test_a_kill_after_a_hand_over_is_given_up_writes_its_final_alert_once_at_the_next_start(
    layout: DemoLayout, processes: Any, internal_port: int
) -> None:
    """The internal system unreachable and one attempt allowed: the hand-over failed for
    good in the spool, killed before its final ``message.handover_failed`` alert."""
    enable_delivery(layout, internal_port)  # nothing listens there
    set_runtime(layout.hospital.config_path, "max_attempts", "1")
    _, failed, delivered = _received_then_cut_off(
        layout, processes, "handover_failed", "unhanded.hl7", "message.handover_failed"
    )
    assert failed["message_id"] == delivered["message_id"] and failed["severity"] == "alert"
    assert failed["detail"]["final"] is True and "gave up after 1 attempt" in failed["reason"]
    assert failed["detail"]["inbox_file"] == delivered["detail"]["inbox_file"]
    _recovered(failed)


def test_a_record_written_at_recovery_is_not_written_again_at_later_starts(
    layout: DemoLayout, processes: Any
) -> None:
    """Once written, the record counts as the trail's: later starts add none."""
    lab, message_id = _queued_and_tried(layout, processes, "operator_cancel")
    medgw("queue", "cancel", message_id, "--config", str(layout.lab.config_path))
    assert len(_cut_off_then_restarted(layout, processes, lab, "message.cancelled")) == 1
    for _ in range(2):
        assert processes.start(layout.lab.config_path).stop() == 0
    assert len(events(layout.lab.audit_log, "message.cancelled")) == 1


def test_a_record_whose_write_failed_is_written_with_the_next_one(
    layout: DemoLayout, processes: Any
) -> None:
    """The settlement committed, its ``receipt.received`` not written (the disk full for
    that write): the daemon keeps running and writes it, marked, first in its next
    write; once, whatever follows."""
    processes.start(layout.hospital.config_path)
    lab = processes.start(
        layout.lab.config_path, prefix=killed_at("--fail-once-at-event", "receipt.received")
    )
    outbox = layout.lab.outbox_dir / "hospital"
    drop_file(outbox, "first.hl7", b"MSH|first\r")
    failed = lab.wait_for(lambda line: line.get("event") == "audit.write_failed", 60)
    assert failed["events"] == ["receipt.received"] and failed["level"] == "critical"
    assert events(layout.lab.audit_log, "receipt.received") == []  # not written yet

    drop_file(outbox, "second.hl7", b"MSH|second\r")
    wait_for_events(layout.lab.audit_log, "receipt.received", count=2)
    [late] = [
        r
        for r in events(layout.lab.audit_log, "receipt.received")
        if r["detail"].get("first_tried_at")
    ]
    assert late["detail"]["first_tried_at"] < late["time"]
    assert late["detail"]["disposition"] == "processed" and late["detail"]["mic_verified"]
    assert lab.stop() == 0
    _verified(layout.lab.config_path)
    accepted = [r["message_id"] for r in events(layout.lab.audit_log, "message.accepted")]
    receipts = events(layout.lab.audit_log, "receipt.received")
    assert sorted(r["message_id"] for r in receipts) == sorted(accepted)  # once each
    assert [r for r in receipts if "first_tried_at" in r["detail"]] == [late]
    # Delivered all along: the failed write is said as what it is, not as a failed send.
    assert events(layout.lab.audit_log, "message.send_failed") == []


@pytest.mark.parametrize("expiring", [False, True], ids=["inbound-record", "expiry-alerts"])
def test_records_a_start_writes_hide_no_outbound_record_owed(
    layout: DemoLayout, processes: Any, tmp_path: Path, expiring: bool
) -> None:
    """A node killed with a sent message's ``receipt.received`` cut off, and started
    again long after (more than the clock's margin).  The start writes records of its
    own before it looks for those of the outbound side: a received document's
    ``receipt.sent`` cut off by the same kill (inbound recovery comes first), or
    alerts for certificates about to expire.  The outbound check must look from where
    the trail ended before any of them, or it would take the message's change for
    older than the trail and leave its record out."""
    if expiring:  # every certificate expires in 5 days
        layout = new_demo(tmp_path / "expiring", issued_ago=EXPIRING_SOON)
    config = load_config(layout.lab.config_path)
    node = config.cluster.node_name
    killed = SetClock(datetime.now(UTC) - 3 * CLOCK_MARGIN)  # the run that was killed
    audit = AuditLog(config.storage.audit_log, killed, node=node)
    spool = SqliteSpool(
        config.storage.spool_path, killed, Claimant(node, config.cluster.lease_seconds)
    )
    sent, received = "<sent@lab>", "<received@hospital>"
    try:
        payload = config.storage.state_dir / "sent.hl7"
        spool.add_intake(sent, "hospital", "sent.hl7", "text/plain", payload, payload)
        spool.mark_queued(sent, None, [], "mic", 3, body=b"sealed")
        audit.emit(AuditEvent(EventType.MESSAGE_ACCEPTED, peer="hospital", message_id=sent))
        spool.mark_sending(sent)
        killed.advance(1)
        target = config.storage.inbox_dir / "received.hl7"
        spool.inbound_begin("hospital", received, "0" * 64, target)
        audit.emit(
            AuditEvent(
                EventType.MESSAGE_DELIVERED,
                peer="hospital",
                message_id=received,
                direction="inbound",
            )
        )
        killed.advance(1)  # the kill cuts off both records of the changes committed now
        receipt = config.storage.state_dir / "sent.mdn"
        spool.mark_done(sent, OutboundState.DELIVERED, "processed", receipt)
        spool.inbound_delivered("hospital", received, [], b"receipt")
    finally:
        spool.close()
        audit.close()

    assert processes.start(layout.lab.config_path).stop() == 0
    _verified(layout.lab.config_path)
    written = read_audit(layout.lab.audit_log)
    if expiring:  # written by the start, before its recovery, now
        assert "pki.certificate_expiring" in [r["event"] for r in written]
    [inbound] = events(layout.lab.audit_log, "receipt.sent")
    assert inbound["message_id"] == received
    _recovered(inbound)
    [outbound] = events(layout.lab.audit_log, "receipt.received")
    assert outbound["message_id"] == sent
    _recovered(outbound)
