"""``medgw send`` against real daemons: exit codes a script can trust."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

from gateway.demo_run import read_audit, wait_until
from gateway.pki.demo import DemoLayout


def medgw(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "gateway", *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def events(path: Path, name: str) -> list[dict[str, Any]]:
    return [r for r in read_audit(path) if r["event"] == name]


def test_lost_contact_while_waiting_exits_3_and_the_message_is_delivered_once(
    layout: DemoLayout, processes: Any, tmp_path: Path
) -> None:
    config = str(layout.lab.config_path)
    lab = processes.start(layout.lab.config_path)  # the hospital is down: it stays queued
    document = tmp_path / "once.hl7"
    document.write_bytes(b"MSH|exactly once\r")
    command = ["send", str(document), "--to", "hospital", "--config", config]
    send = subprocess.Popen(
        [sys.executable, "-m", "gateway", *command],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert send.stderr is not None
        spooled = send.stderr.readline()
        assert "spooled as <" in spooled, spooled
        message_id = spooled.split("spooled as ")[1].strip()
        assert lab.stop() == 0  # e.g. systemctl restart medgw while the admin waits
        out, err = send.communicate(timeout=60)
    finally:
        if send.poll() is None:
            send.kill()
            send.wait()
    assert send.returncode == 3, out + err
    assert "lost contact with the daemon" in err and "Traceback" not in err
    assert f"{message_id} is still in the queue - do NOT send it again" in err
    assert f"medgw queue show '{message_id}'" in err

    processes.start(layout.lab.config_path)
    processes.start(layout.hospital.config_path)
    wait_until(lambda: events(layout.lab.audit_log, "receipt.received"), 60, "the receipt")
    shown = json.loads(medgw("queue", "show", message_id, "--config", config, "--json").stdout)
    assert shown["state"] == "delivered"
    listed = json.loads(medgw("queue", "list", "--config", config, "--json").stdout)
    assert [r["message_id"] for r in listed] == [message_id]
    assert (layout.hospital.inbox_dir / "lab" / "once.hl7").read_bytes() == b"MSH|exactly once\r"
    assert len(events(layout.hospital.audit_log, "message.delivered")) == 1


def test_send_help_documents_the_exit_codes() -> None:
    result = medgw("send", "--help")
    assert result.returncode == 0
    text = " ".join(result.stdout.split())
    assert "0 delivered" in text and "2 usage error" in text and "3 outcome unknown" in text
