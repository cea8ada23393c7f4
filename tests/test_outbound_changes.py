"""Outbound messages when the configuration changes under them, or operators act on them."""

from __future__ import annotations

import json
import signal
from pathlib import Path
from typing import Any

from gateway.demo_run import drop_file, read_audit, wait_until
from gateway.pki.demo import DemoLayout
from tests.cli import medgw


def events(path: Path, name: str) -> list[dict[str, Any]]:
    return [r for r in read_audit(path) if r["event"] == name]


def queue(config: Path, *args: str) -> Any:
    result = medgw("queue", *args, "--config", str(config), "--json")
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def peers(config: Path, *args: str) -> None:
    result = medgw("peers", *args, "--config", str(config))
    assert result.returncode == 0, result.stderr


def set_async_receipt_url(layout: DemoLayout, url: str) -> None:
    peer_file = layout.lab.root / "peers.d" / "hospital.toml"
    lines = peer_file.read_text().splitlines()
    out = [
        f"async_receipt_url = {url!r}" if line.startswith("async_receipt_url =") else line
        for line in lines
    ]
    assert out != lines
    peer_file.write_text("\n".join(out) + "\n")


def reload(proc: Any, audit_log: Path) -> None:
    before = len(events(audit_log, "config.reloaded"))
    proc.signal(signal.SIGHUP)
    wait_until(lambda: len(events(audit_log, "config.reloaded")) > before, 15, "the reload")


def test_a_message_that_asked_for_an_async_receipt_waits_for_it_after_the_peer_is_made_sync(
    layout: DemoLayout, processes: Any
) -> None:
    # Signed and encrypted while the lab asked the hospital for asynchronous receipts;
    # the lab's administrator switches to synchronous ones before it is sent.
    set_async_receipt_url(layout, f"https://127.0.0.1:{layout.lab.port}/as2")
    processes.start(layout.hospital.config_path)
    lab = processes.start(layout.lab.config_path)
    peers(layout.lab.config_path, "suspend", "hospital", "--reason", "switching receipts")
    drop_file(layout.lab.outbox_dir / "hospital", "switch.hl7", b"MSH|switch\r")
    [record] = wait_until(
        lambda: queue(layout.lab.config_path, "list", "--state", "queued"), 30, "queued"
    )
    set_async_receipt_url(layout, "")
    reload(lab, layout.lab.audit_log)
    peers(layout.lab.config_path, "resume", "hospital")
    wait_until(
        lambda: (
            events(layout.lab.audit_log, "receipt.received")
            or events(layout.lab.audit_log, "receipt.invalid")
        ),
        60,
        "the receipt",
    )
    # The message asked for its receipt later: the empty 200 is not an invalid receipt.
    assert not events(layout.lab.audit_log, "receipt.invalid")
    [sent] = events(layout.lab.audit_log, "message.sent")
    assert sent["detail"]["receipt"] == "async"
    shown = queue(layout.lab.config_path, "show", record["message_id"])
    assert shown["state"] == "delivered" and shown["disposition"] == "processed"


def set_runtime(config: Path, key: str, value: str) -> None:
    lines = config.read_text().splitlines()
    out = [f"{key} = {value}" if line.startswith(f"{key} =") else line for line in lines]
    assert out != lines, f"{key} not in {config}"
    config.write_text("\n".join(out) + "\n")


def test_retry_of_a_message_to_a_peer_no_longer_configured_is_refused_and_says_why(
    layout: DemoLayout, processes: Any
) -> None:
    set_runtime(layout.lab.config_path, "max_attempts", "1")
    lab = processes.start(layout.lab.config_path)  # the hospital is down
    drop_file(layout.lab.outbox_dir / "hospital", "gone.hl7", b"MSH|gone\r")
    wait_until(lambda: events(layout.lab.audit_log, "message.dead"), 60, "a dead letter")
    [record] = queue(layout.lab.config_path, "list", "--state", "dead")
    (layout.lab.root / "peers.d" / "hospital.toml").unlink()  # the exchange has ended
    reload(lab, layout.lab.audit_log)
    retried = medgw("queue", "retry", record["message_id"], "--config", str(layout.lab.config_path))
    # Nobody would ever send it: not "retry done, now queued".
    assert retried.returncode == 1
    assert "hospital" in retried.stderr and "no longer configured" in retried.stderr
    assert "fix:" in retried.stderr
    assert queue(layout.lab.config_path, "show", record["message_id"])["state"] == "dead"
    assert not events(layout.lab.audit_log, "message.retried")
    # It can still be withdrawn.
    cancelled = medgw(
        "queue", "cancel", record["message_id"], "--config", str(layout.lab.config_path)
    )
    assert cancelled.returncode == 0, cancelled.stderr
