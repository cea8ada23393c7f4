"""A tampered audit trail is an alert that reaches the monitoring (EMG-4): found by the
daemon itself at start and after each checkpoint, and by ``medgw audit verify`` run by an
administrator; checked in the trail and at a real rsyslog collector (syslog severity
alert)."""

from __future__ import annotations

import json
import os
from dataclasses import asdict
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from gateway.audit import AuditEvent, AuditLog, EventType
from gateway.audit.export.cursor import Position
from gateway.demo_run import read_audit, wait_until
from gateway.pki.demo import DemoLayout
from tests.audit_writer import StepClock
from tests.cli import medgw
from tests.helpers.audit import openssl_audit_key, wait_for_event, wait_for_events
from tests.helpers.audit_export import export_to
from tests.rsyslog import Collector, Received


def tamper(path: Path, seq: int) -> None:
    """Change one character of record ``seq`` in place (same length, as an editor would
    leave it), while the daemon may be appending to the file."""
    offset = 0
    with path.open("rb") as handle:
        for line in handle:
            if json.loads(line)["seq"] == seq:
                at = line.index(b'"outcome":"success"') + len(b'"outcome":"')
                fd = os.open(path, os.O_WRONLY)
                try:
                    os.pwrite(fd, b"S", offset + at)
                finally:
                    os.close(fd)
                return
            offset += len(line)
    raise AssertionError(f"no record {seq} in {path}")


def alerts_at(collector: Collector) -> list[Received]:
    return [r for r in collector.received() if r.event == "audit.verification_failed"]


def test_the_daemon_alerts_on_a_record_edited_before_it_started(
    layout: DemoLayout, processes: Any, collector: Collector
) -> None:
    export_to(layout, collector)
    collector.start()
    trail = layout.hospital.audit_log
    trail.parent.mkdir(parents=True, exist_ok=True)
    log = AuditLog(trail, StepClock(datetime.now(UTC)), node="SAKURA-HOSPITAL")
    for n in range(5):
        log.emit(AuditEvent(EventType.MESSAGE_SENT, peer="lab", message_id=f"<{n}@x>"))
    log.close()
    tamper(trail, 3)
    # The export has sent nothing yet: it reads record 3 too.
    state = layout.hospital.root / "state"
    state.mkdir(parents=True, exist_ok=True)
    (state / "audit-export.json").write_text(json.dumps(asdict(Position())))
    processes.start(layout.hospital.config_path)
    [alert] = wait_for_events(trail, "audit.verification_failed")
    assert alert["severity"] == "alert" and alert["detail"]["seq"] == 3
    assert f"{trail}: record 3 was altered after it was written" in alert["reason"]
    assert alert["call"]  # whom to call, as every alert
    [item] = wait_until(lambda: alerts_at(collector), 30, "the alert at the collector")
    assert item.severity == 1  # syslog Alert
    # Both the daemon's check and the export read record 3: one alert, not two.
    wait_until(
        lambda: {5, item.seq} <= {r.seq for r in collector.received()}, 30, "records exported"
    )
    recorded = [r for r in read_audit(trail) if r["event"] == "audit.verification_failed"]
    assert recorded == [alert]


def test_an_edit_while_running_is_found_at_the_next_checkpoint_and_by_audit_verify(
    layout: DemoLayout, processes: Any, collector: Collector, tmp_path: Path
) -> None:
    key, cert = openssl_audit_key(tmp_path)
    key.chmod(0o600)
    export_to(layout, collector)
    config = layout.hospital.config_path
    with config.open("a") as handle:
        handle.write(
            f'\n[audit]\nsigning_key = "{key}"\ncertificate = "{cert}"\n'
            "checkpoint_every_seconds = 1\n"
        )
    collector.start()
    hospital = processes.start(config)
    trail = layout.hospital.audit_log
    started = wait_for_event(trail, "daemon.started")
    assert not [r for r in read_audit(trail) if r["event"] == "audit.verification_failed"]
    tamper(trail, started["seq"])
    # Found by the daemon's check after the next checkpoint, or by the export reading
    # the record again (it re-reads what it sent last): one alert either way.
    [found] = wait_for_events(
        trail,
        "audit.verification_failed",
        where=lambda r: r.get("detail", {}).get("checked_by") in ("daemon", "export"),
    )
    assert found["detail"]["seq"] == started["seq"]

    verified = medgw("audit", "verify", "--config", config)
    assert verified.returncode == 1
    assert f"record {started['seq']} was altered after it was written" in verified.stderr
    assert "recorded as an alert by the running daemon" in verified.stderr
    [by_admin] = wait_for_events(
        trail,
        "audit.verification_failed",
        where=lambda r: r.get("detail", {}).get("checked_by") == "medgw audit verify",
    )
    assert by_admin["severity"] == "alert" and by_admin["actor"].startswith("operator:")
    assert f"record {started['seq']} was altered" in by_admin["reason"]

    def both() -> list[Received] | None:
        got = alerts_at(collector)
        seqs = {r.seq for r in got}
        return got if {found["seq"], by_admin["seq"]} <= seqs else None

    received = wait_until(both, 30, "both alerts at the collector")
    assert {r.severity for r in received} == {1}
    assert hospital.stop() == 0

    # With the daemon stopped, verify records the alert itself; the next start exports it.
    offline = medgw("audit", "verify", "--config", config)
    assert offline.returncode == 1
    assert "the daemon is stopped: it is exported when the daemon starts" in offline.stderr
    last = read_audit(trail)[-1]
    assert last["event"] == "audit.verification_failed" and last["severity"] == "alert"
    assert last["detail"]["checked_by"] == "medgw audit verify"


def test_without_export_the_daemon_finds_an_edit_after_its_next_checkpoint(
    layout: DemoLayout, processes: Any, tmp_path: Path
) -> None:
    key, cert = openssl_audit_key(tmp_path)
    key.chmod(0o600)
    config = layout.hospital.config_path
    with config.open("a") as handle:
        handle.write(
            f'\n[audit]\nsigning_key = "{key}"\ncertificate = "{cert}"\n'
            "checkpoint_every_seconds = 1\n"
        )
    processes.start(config)
    trail = layout.hospital.audit_log
    # Once the timer has sealed, the check at start is over: what follows is found by the
    # check after each timed checkpoint.
    wait_for_event(trail, "audit.checkpoint")
    listed = medgw("queue", "list", "--config", config)  # an operator's read: one record
    assert listed.returncode == 0, listed.stderr
    [read] = wait_for_events(trail, "messages.listed")
    tamper(trail, read["seq"])
    [found] = wait_for_events(trail, "audit.verification_failed")
    assert found["detail"] == {"seq": read["seq"], "file": str(trail), "checked_by": "daemon"}
    assert found["seq"] > read["seq"] + 1  # sealed by a checkpoint, then checked
