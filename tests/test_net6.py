"""NET-6 failure cases, end to end with real daemons: each visible in state and audit."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

from gateway.demo_run import drop_file, wait_until
from gateway.pki.demo import DemoLayout
from tests.helpers.audit import wait_for_events
from tests.helpers.slow_proxy import SlowProxy, edit_every


def queue_show_all(config: Path) -> list[dict[str, Any]]:
    result = subprocess.run(
        [sys.executable, "-m", "gateway", "queue", "list", "--config", str(config), "--json"],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    records: list[dict[str, Any]] = json.loads(result.stdout)
    return records


def final_state(layout: DemoLayout) -> dict[str, Any]:
    def done() -> dict[str, Any] | None:
        records = queue_show_all(layout.lab.config_path)
        final = [r for r in records if r["state"] in ("delivered", "failed")]
        return final[0] if final else None

    result: dict[str, Any] = wait_until(done, 60, "a final state at the sender")
    return result


def test_receiver_fails_to_store_negative_receipt_reaches_sender_state(
    layout: DemoLayout, processes: Any
) -> None:
    blocker = layout.hospital.inbox_dir / "lab"
    blocker.parent.mkdir(parents=True, exist_ok=True)
    blocker.write_text("a file where the lab's inbox folder should be")
    processes.start(layout.hospital.config_path)
    processes.start(layout.lab.config_path)
    drop_file(layout.lab.outbox_dir / "hospital", "undeliverable.hl7", b"MSH|x\r")
    record = final_state(layout)
    assert record["state"] == "failed"
    assert record["disposition"] == "processed/error: unexpected-processing-error"
    # The spool says "failed" before the audit trail does: wait for what is read.
    failed = wait_for_events(layout.lab.audit_log, "message.failed")
    assert failed[0]["severity"] == "alert"
    wait_for_events(layout.hospital.audit_log, "message.rejected")


def test_encryption_failure_is_reported_back_to_the_sender(
    layout: DemoLayout, processes: Any
) -> None:
    # The lab encrypts for a certificate the hospital has no key for (its own).
    edit_every(
        layout.lab.root / "peers.d" / "hospital.toml",
        "certs/peers/hospital/encrypt.crt",
        "certs/encrypt.crt",
    )
    processes.start(layout.hospital.config_path)
    processes.start(layout.lab.config_path)
    drop_file(layout.lab.outbox_dir / "hospital", "secret.hl7", b"MSH|x\r")
    record = final_state(layout)
    assert record["state"] == "failed"
    assert record["disposition"] == "processed/error: decryption-failed"
    wait_for_events(layout.hospital.audit_log, "decryption.failed")
    wait_for_events(layout.lab.audit_log, "message.failed")


def test_authentication_failure_is_reported_back_to_the_sender(
    layout: DemoLayout, processes: Any
) -> None:
    # The hospital no longer accepts the lab's signing certificate.
    edit_every(
        layout.hospital.root / "peers.d" / "lab.toml", "certs/peers/lab/sign.crt", "certs/sign.crt"
    )
    processes.start(layout.hospital.config_path)
    processes.start(layout.lab.config_path)
    drop_file(layout.lab.outbox_dir / "hospital", "unsigned-by-known.hl7", b"MSH|x\r")
    record = final_state(layout)
    assert record["state"] == "failed"
    assert record["disposition"] == "processed/error: authentication-failed"
    wait_for_events(layout.hospital.audit_log, "signature.failed")


def test_very_slow_path_times_out_retries_and_delivers_once(
    layout: DemoLayout, processes: Any
) -> None:
    proxy = SlowProxy(layout.hospital.port)
    try:
        proxy.delay = 8.0  # answers take longer than the lab's request timeout
        edit_every(
            layout.lab.root / "peers.d" / "hospital.toml",
            f":{layout.hospital.port}/",
            f":{proxy.port}/",
        )
        edit_every(
            layout.lab.config_path, "request_timeout_seconds = 60", "request_timeout_seconds = 3"
        )
        processes.start(layout.hospital.config_path)
        processes.start(layout.lab.config_path)
        drop_file(layout.lab.outbox_dir / "hospital", "slow.hl7", b"MSH|slow path\r")
        failure = wait_for_events(layout.lab.audit_log, "message.send_failed")
        assert "Timeout" in failure[0]["reason"]
        [queued] = [r for r in queue_show_all(layout.lab.config_path) if r["state"] != "delivered"]
        assert queued["attempts"] >= 1 and "Timeout" in (queued["last_error"] or "")
        proxy.delay = 0.0  # the path recovers
        wait_for_events(layout.lab.audit_log, "receipt.received")
    finally:
        proxy.close()
    # Delivered once, after at least one timed-out attempt over the slow path.
    assert [p.name for p in (layout.hospital.inbox_dir / "lab").iterdir()] == ["slow.hl7"]
    assert len(wait_for_events(layout.hospital.audit_log, "message.delivered")) == 1

    assert proxy.connections >= 2
