"""NET-6 operator controls on real daemons: queue states, retry/cancel, suspend/resume."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path
from typing import Any

import pytest

from gateway.demo_run import drop_file, wait_until
from gateway.pki.demo import DemoLayout
from tests.cli import medgw
from tests.helpers.audit import wait_for_events
from tests.helpers.demo import set_runtime


def queue(config: Path, *args: str) -> Any:
    result = medgw("queue", *args, "--config", str(config), "--json")
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def test_dead_letter_after_max_attempts_then_operator_retry_delivers(
    layout: DemoLayout, processes: Any
) -> None:
    set_runtime(layout.lab.config_path, "max_attempts", "2")
    lab = processes.start(layout.lab.config_path)  # the hospital is down
    drop_file(layout.lab.outbox_dir / "hospital", "dead.hl7", b"MSH|dead letter\r")
    dead = wait_for_events(layout.lab.audit_log, "message.dead")
    assert dead[0]["severity"] == "alert" and "2 attempts" in dead[0]["reason"]
    [record] = queue(layout.lab.config_path, "list", "--state", "dead")
    assert record["filename"] == "dead.hl7" and record["attempts"] == 2
    processes.start(layout.hospital.config_path)
    retried = queue(layout.lab.config_path, "retry", record["message_id"])
    assert retried["state"] == "queued"
    wait_for_events(layout.lab.audit_log, "receipt.received")
    shown = queue(layout.lab.config_path, "show", record["message_id"])
    assert shown["state"] == "delivered" and shown["disposition"] == "processed"
    audit = wait_for_events(layout.lab.audit_log, "message.retried")
    assert "uid" in audit[0]["actor"]
    assert audit[0]["detail"]["previous_state"] == "dead"
    assert lab.proc.poll() is None


@pytest.mark.long
def test_expired_message_is_visible_and_can_be_cancelled(
    layout: DemoLayout, processes: Any
) -> None:
    set_runtime(layout.lab.config_path, "message_expiry_seconds", "60")
    set_runtime(layout.lab.config_path, "retry_initial_seconds", "30")
    set_runtime(layout.lab.config_path, "retry_max_seconds", "30")
    processes.start(layout.lab.config_path)
    drop_file(layout.lab.outbox_dir / "hospital", "late.hl7", b"MSH|late\r")
    [record] = wait_until(
        lambda: queue(layout.lab.config_path, "list", "--state", "queued"), 30, "queued"
    )
    # Time passes for the spool: move its expiry into the past, as 60 s later would.
    import sqlite3

    db = sqlite3.connect(layout.lab.root / "state" / "spool.sqlite3")
    with db:
        db.execute("UPDATE outbound SET expires_at=1 WHERE message_id=?", (record["message_id"],))
    db.close()
    expired = wait_for_events(layout.lab.audit_log, "message.expired")
    assert expired[0]["message_id"] == record["message_id"]
    assert queue(layout.lab.config_path, "show", record["message_id"])["state"] == "expired"
    cancelled = medgw(
        "queue", "cancel", record["message_id"], "--config", str(layout.lab.config_path)
    )
    assert cancelled.returncode == 0, cancelled.stderr
    assert queue(layout.lab.config_path, "show", record["message_id"])["state"] == "cancelled"
    again = medgw("queue", "cancel", record["message_id"], "--config", str(layout.lab.config_path))
    assert again.returncode == 1
    assert "is cancelled; this needs it to be" in again.stderr and "fix:" in again.stderr


def test_suspend_holds_both_directions_and_resume_delivers(
    layout: DemoLayout, processes: Any
) -> None:
    processes.start(layout.hospital.config_path)
    processes.start(layout.lab.config_path)
    hospital_cfg, lab_cfg = str(layout.hospital.config_path), str(layout.lab.config_path)
    out = medgw(
        "peers", "suspend", "hospital", "--reason", "planned maintenance", "--config", lab_cfg
    )
    assert out.returncode == 0, out.stderr
    drop_file(layout.lab.outbox_dir / "hospital", "held.hl7", b"MSH|held\r")
    wait_until(lambda: queue(layout.lab.config_path, "list", "--state", "queued"), 30, "queued")
    listing = json.loads(medgw("peers", "list", "--config", lab_cfg, "--json").stdout)
    assert listing[0]["suspended"] and listing[0]["suspended_reason"] == "planned maintenance"
    # The hospital suspends the lab too: the lab's sends are refused with 503, not lost.
    assert (
        medgw(
            "peers", "suspend", "lab", "--reason", "incident", "--config", hospital_cfg
        ).returncode
        == 0
    )
    assert medgw("peers", "resume", "hospital", "--config", lab_cfg).returncode == 0
    wait_for_events(layout.hospital.audit_log, "peer.suspended_refusal")
    assert not (layout.hospital.inbox_dir / "lab" / "held.hl7").exists()
    assert medgw("peers", "resume", "lab", "--config", hospital_cfg).returncode == 0
    wait_until(
        lambda: (layout.hospital.inbox_dir / "lab" / "held.hl7").exists(),
        60,
        "delivery after resume",
    )
    for name in ("peer.suspended", "peer.resumed"):
        wait_for_events(layout.lab.audit_log, name)
        wait_for_events(layout.hospital.audit_log, name)


def test_queue_list_works_when_the_daemon_is_stopped(layout: DemoLayout, processes: Any) -> None:
    lab = processes.start(layout.lab.config_path)
    drop_file(layout.lab.outbox_dir / "hospital", "offline.hl7", b"MSH|x\r")
    wait_for_events(layout.lab.audit_log, "message.accepted")
    assert lab.stop() == 0
    result = medgw("queue", "list", "--config", str(layout.lab.config_path))
    assert result.returncode == 0
    assert "offline.hl7" in result.stdout and "not running" in result.stderr
    retry = medgw("queue", "retry", "<x@y>", "--config", str(layout.lab.config_path))
    assert retry.returncode == 1 and "medgw is not running" in retry.stderr
    # Times carry their zone, in the table and in JSON (ISO 8601 with offset).
    [record] = queue(layout.lab.config_path, "list")
    for key in ("created_at", "expires_at"):
        assert record[key].endswith("+00:00"), (key, record[key])
    assert "+00:00" in result.stdout
    # `peers list` reads the spool directly too, like `queue list`.
    peers = medgw("peers", "list", "--config", str(layout.lab.config_path), "--json")
    assert peers.returncode == 0, peers.stderr
    [hospital] = json.loads(peers.stdout)
    assert hospital["name"] == "hospital" and sum(hospital["messages"].values()) == 1
    assert "not running" in peers.stderr


def test_queue_list_and_show_name_the_node_holding_a_message_and_the_one_that_queued_it(
    layout: DemoLayout, processes: Any
) -> None:
    """Where nodes share the spool, the operator learns from the queue which node holds
    a message now (and until when) and whose audit trail holds its records; a row that
    keeps its last holder's name once no node holds it says nothing of one."""
    lab = processes.start(layout.lab.config_path)
    drop_file(layout.lab.outbox_dir / "hospital", "held.hl7", b"MSH|x\r")
    [accepted] = wait_for_events(layout.lab.audit_log, "message.accepted")
    assert lab.stop() == 0
    message_id = accepted["message_id"]
    until = 4102444800  # 2100-01-01T00:00:00+00:00
    with sqlite3.connect(layout.lab.root / "state" / "spool.sqlite3") as db:
        db.execute(
            "UPDATE outbound SET state='sending', node='lab-b', lease_until=?, "
            "queued_by='lab-a' WHERE message_id=?",
            (until, message_id),
        )
    listed = medgw("queue", "list", "--config", str(layout.lab.config_path))
    assert listed.returncode == 0, listed.stderr
    assert "held by node lab-b (claim until 2100-01-01T00:00:00+00:00)" in listed.stdout
    shown = queue(layout.lab.config_path, "show", message_id)
    assert shown["node"] == "lab-b" and shown["queued_by"] == "lab-a", shown
    assert shown["lease_until"] == "2100-01-01T00:00:00+00:00", shown
    text = medgw("queue", "show", message_id, "--config", str(layout.lab.config_path))
    assert "node             lab-b" in text.stdout and "queued_by        lab-a" in text.stdout

    with sqlite3.connect(layout.lab.root / "state" / "spool.sqlite3") as db:
        db.execute("UPDATE outbound SET state='queued' WHERE message_id=?", (message_id,))
    listed = medgw("queue", "list", "--config", str(layout.lab.config_path))
    assert "held by" not in listed.stdout, listed.stdout
    shown = queue(layout.lab.config_path, "show", message_id)
    assert shown["node"] is None and shown["lease_until"] is None, shown
    assert shown["queued_by"] == "lab-a", shown


def test_operator_commands_work_while_the_config_on_disk_has_a_mistake(
    layout: DemoLayout, processes: Any, tmp_path: Path
) -> None:
    processes.start(layout.lab.config_path)  # running on its (valid) configuration
    peer_file = layout.lab.root / "peers.d" / "hospital.toml"
    peer_file.write_text(peer_file.read_text() + "\ncolour = 'blue'\n")  # an edit in progress
    lab_cfg = str(layout.lab.config_path)
    assert medgw("check-config", "--config", lab_cfg).returncode == 1
    out = medgw("peers", "suspend", "hospital", "--reason", "compromised", "--config", lab_cfg)
    assert out.returncode == 0, out.stderr
    wait_for_events(layout.lab.audit_log, "peer.suspended")

    [peer] = json.loads(medgw("peers", "list", "--config", lab_cfg, "--json").stdout)
    assert peer["suspended"] and peer["suspended_reason"] == "compromised"
    document = tmp_path / "urgent.hl7"
    document.write_bytes(b"MSH|urgent\r")
    sent = medgw("send", str(document), "--to", "hospital", "--no-wait", "--config", lab_cfg)
    assert sent.returncode == 0, sent.stderr
    assert "check-config lists them" in sent.stderr
    [record] = queue(layout.lab.config_path, "list")
    assert record["filename"] == "urgent.hl7" and record["message_id"] == sent.stdout.strip()
    assert medgw("handover", "list", "--config", lab_cfg).returncode == 0
    unknown = medgw("send", str(document), "--to", "pharmacy", "--config", lab_cfg)
    assert unknown.returncode == 1 and "no peer named 'pharmacy'" in unknown.stderr
    assert medgw("peers", "resume", "hospital", "--config", lab_cfg).returncode == 0


def test_state_dir_is_resolved_as_the_full_loader_resolves_it(
    layout: DemoLayout, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from gateway.commands.queue import state_dir
    from gateway.config import load_config

    config = layout.lab.config_path
    text = config.read_text()
    assert 'state_dir = "state"' in text
    for value in ("state", "./sub/../state", str(tmp_path / "abs-state"), "~/medgw-state"):
        config.write_text(text.replace('state_dir = "state"', f"state_dir = {value!r}"))
        assert state_dir(config) == load_config(config).storage.state_dir, value
    # A relative --config, from another working directory.
    config.write_text(text)
    monkeypatch.chdir(config.parents[1])
    relative = Path(config.parent.name, config.name)
    assert state_dir(relative) == load_config(relative).storage.state_dir == config.parent / "state"
