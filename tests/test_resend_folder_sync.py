"""A resend of a document already in the inbox is answered with its receipt only once the
inbox folder holding it is synced.

A document is linked into ``inbox/<peer>/``, its work name removed, then the folder
synced (gateway.delivery.inbox.finish).  If that sync fails the peer is answered 503,
and if a kill cuts it off the peer gets no answer; either way the peer resends, and
the resend (or the next start's recovery) settles the delivery already linked
(gateway.inbound.exactly_once ``settle``).  That settling syncs the folder before
``message.delivered``, the spool's record and the signed receipt: while the sync
fails the resend is answered 503 as the first attempt was, and once it succeeds the
peer gets one ``processed`` receipt for the one document in the inbox.  The folder's
sync is the real one, failing (tests/faultpoint.py ``--fail-until``) until the test
lets it succeed; the spool is each backend in turn.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

from gateway.demo_run import GatewayProcess, drop_file
from gateway.pki.demo import DemoLayout
from tests.helpers.audit import Record, events, wait_for_event, wait_for_events
from tests.helpers.faults import killed_at, wait_killed

FOLDER_SYNC = "gateway.delivery.inbox:sync_folder"  # the inbox folder's fsync after the link
SENT = ("message.send_failed", "receipt.received")  # what the peer makes of an attempt


def failing_until(synced: Path) -> tuple[str, ...]:
    """Every folder sync of the daemon fails (EIO) until ``synced`` exists."""
    return killed_at("--fail-until", FOLDER_SYNC, "--until-file", str(synced))


def of(message_id: str) -> Callable[[Record], bool]:
    return lambda record: record.get("message_id") == message_id


def assert_delivered_once(layout: DemoLayout, message_id: str, document: bytes) -> None:
    """The peer's one ``processed`` receipt, for the one document in the inbox."""
    [receipt] = wait_for_events(layout.lab.audit_log, "receipt.received", where=of(message_id))
    assert receipt["detail"]["disposition"] == "processed" and receipt["detail"]["mic_verified"]
    folder = layout.hospital.inbox_dir / "lab"
    assert sorted(p.name for p in folder.iterdir()) == ["order.hl7"]  # no work file, no copy
    assert (folder / "order.hl7").read_bytes() == document
    audit = layout.hospital.audit_log
    [sent] = wait_for_events(audit, "receipt.sent", where=of(message_id))
    assert sent["detail"]["disposition"] == "processed"
    [delivered] = events(audit, "message.delivered")
    assert delivered["message_id"] == message_id
    assert "before an interruption" in delivered["reason"]
    assert len(events(audit, "message.duplicate")) == 1


def refused_while_unsynced(
    layout: DemoLayout, hospital: GatewayProcess, message_id: str, attempts: int
) -> None:
    """The peer's first ``attempts`` attempts were each answered 503 (the last one a
    resend of the document already linked), and nothing says it was delivered."""
    answered = wait_for_events(layout.lab.audit_log, SENT, where=of(message_id), count=attempts)
    assert [r["event"] for r in answered[:attempts]] == ["message.send_failed"] * attempts
    assert "HTTP 503" in answered[attempts - 1]["reason"], answered
    # The resend's refusal, as the first one of an outage is followed: counted, not audited.
    hospital.wait_for(
        lambda line: (
            line.get("event") == "storage.unavailable"
            and line.get("message_id") == message_id
            and line.get("refused_during_outage", 0) >= 2
        ),
        60,
    )
    audit = layout.hospital.audit_log
    assert not events(audit, ("message.delivered", "message.duplicate", "receipt.sent"))
    [alert] = events(audit, "storage.unavailable")
    assert "Input/output error" in alert["reason"] and "answered 503" in alert["reason"]
    folder = layout.hospital.inbox_dir / "lab"
    assert sorted(p.name for p in folder.iterdir()) == ["order.hl7"]  # linked once


def test_a_resend_after_a_failed_folder_sync_is_answered_503_until_the_folder_is_synced(
    layout: DemoLayout, spool_backend: str, processes: Any, tmp_path: Path
) -> None:
    synced = tmp_path / "synced"
    hospital = processes.start(layout.hospital.config_path, prefix=failing_until(synced))
    processes.start(layout.lab.config_path)
    document = os.urandom(20_000)
    drop_file(layout.lab.outbox_for("hospital"), "order.hl7", document)
    alert = wait_for_event(layout.hospital.audit_log, "storage.unavailable")
    message_id = alert["message_id"]

    # The first attempt linked the document and failed at the folder's sync; the resend
    # finds it linked and fails there too.
    refused_while_unsynced(layout, hospital, message_id, attempts=2)
    assert len(synced.with_name("synced.failed").read_text().splitlines()) >= 2

    synced.touch()  # the disk recovers: the next resend syncs the folder
    assert_delivered_once(layout, message_id, document)


def test_a_start_after_a_kill_before_the_folder_sync_settles_only_a_synced_folder(
    layout: DemoLayout, spool_backend: str, processes: Any, tmp_path: Path
) -> None:
    """Killed between the work name's removal and the folder's sync: the recovery at the
    next start settles the linked document only once the folder is synced; until then
    it leaves it in the middle and the peer's resend is answered 503."""
    killed = processes.start(
        layout.hospital.config_path, prefix=killed_at("--kill-before", FOLDER_SYNC)
    )
    processes.start(layout.lab.config_path)
    document = os.urandom(20_000)
    drop_file(layout.lab.outbox_for("hospital"), "order.hl7", document)
    wait_killed(killed)
    folder = layout.hospital.inbox_dir / "lab"
    assert sorted(p.name for p in folder.iterdir()) == ["order.hl7"]
    [received] = events(layout.hospital.audit_log, "message.received")
    message_id = received["message_id"]

    synced = tmp_path / "synced"
    hospital = processes.start(layout.hospital.config_path, prefix=failing_until(synced))
    recovered = hospital.wait_for(
        lambda line: line.get("event") in ("recovery.inbound_failed", "recovery.inbound_settled"),
        60,
    )
    assert recovered["event"] == "recovery.inbound_failed", recovered
    assert "Input/output error" in recovered["error"] and str(folder) in recovered["fix"]
    assert not events(layout.hospital.audit_log, "message.delivered")

    # The attempt the kill cut off, then the resends to the restarted node (503).
    answered = wait_for_events(
        layout.lab.audit_log,
        SENT,
        where=lambda r: of(message_id)(r) and "HTTP 503" in (r.get("reason") or ""),
        count=1,
    )
    assert answered[0]["event"] == "message.send_failed"
    assert not events(layout.hospital.audit_log, ("message.delivered", "receipt.sent"))
    assert not events(layout.lab.audit_log, "receipt.received")

    synced.touch()
    assert_delivered_once(layout, message_id, document)


def test_a_folder_taken_away_with_its_document_before_the_start_is_settled(
    layout: DemoLayout, spool_backend: str, processes: Any
) -> None:
    """The internal system took the document and its folder while medgw was down:
    nothing is left to sync, and the resend is answered with the receipt."""
    killed = processes.start(
        layout.hospital.config_path, prefix=killed_at("--kill-before", FOLDER_SYNC)
    )
    processes.start(layout.lab.config_path)
    drop_file(layout.lab.outbox_for("hospital"), "order.hl7", b"MSH|order\r")
    wait_killed(killed)
    folder = layout.hospital.inbox_dir / "lab"
    shutil.rmtree(folder)

    hospital = processes.start(layout.hospital.config_path)
    recovered = hospital.wait_for(
        lambda line: line.get("event") in ("recovery.inbound_failed", "recovery.inbound_settled"),
        60,
    )
    assert recovered["event"] == "recovery.inbound_settled" and recovered["in_inbox"], recovered
    [receipt] = wait_for_events(layout.lab.audit_log, "receipt.received")
    assert receipt["detail"]["disposition"] == "processed" and receipt["detail"]["mic_verified"]
    assert not folder.exists() or list(folder.iterdir()) == []  # not delivered again
    assert len(events(layout.hospital.audit_log, "message.delivered")) == 1
    assert len(wait_for_events(layout.hospital.audit_log, "message.duplicate")) == 1
