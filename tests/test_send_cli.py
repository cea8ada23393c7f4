"""``medgw send`` against real daemons: exit codes a script can trust."""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from gateway.pki.demo import DemoLayout
from tests.cli import medgw
from tests.helpers.audit import wait_for_events


def test_lost_contact_while_waiting_exits_3_and_the_message_is_delivered_once(
    layout: DemoLayout, processes: Any, tmp_path: Path
) -> None:
    config = str(layout.lab.config_path)
    lab = processes.start(layout.lab.config_path)  # the hospital is down: it stays queued
    document = tmp_path / "once.hl7"
    document.write_bytes(b"MSH|exactly once\r")
    command = ["send", str(document), "--to", "hospital", "--config", config]
    no_sudo = {k: v for k, v in os.environ.items() if k != "SUDO_USER"}
    send = subprocess.Popen(
        [sys.executable, "-m", "gateway", *command],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=no_sudo,
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
    assert f"{message_id} is still in the queue and goes out once medgw runs again" in err
    assert f"medgw queue show '{message_id}'" in err
    # The command it prints follows that message: the same key, not a second document.
    [line] = [line for line in err.splitlines() if line.startswith("    medgw send ")]
    resend = shlex.split(line)[1:]
    assert resend[:4] == ["send", str(document), "--to", "hospital"], line
    assert resend[-1].startswith("--idempotency-key="), line

    processes.start(layout.lab.config_path)
    processes.start(layout.hospital.config_path)
    followed = medgw(*resend, timeout=180, env=no_sudo)
    assert followed.returncode == 0, followed.stderr
    assert f"already spooled as {message_id}" in followed.stderr
    assert followed.stdout.split()[:2] == ["delivered", message_id], followed.stdout
    wait_for_events(layout.lab.audit_log, "receipt.received")
    shown = json.loads(medgw("queue", "show", message_id, "--config", config, "--json").stdout)
    assert shown["state"] == "delivered"
    listed = json.loads(medgw("queue", "list", "--config", config, "--json").stdout)
    assert [r["message_id"] for r in listed] == [message_id]
    assert (layout.hospital.inbox_dir / "lab" / "once.hl7").read_bytes() == b"MSH|exactly once\r"
    assert len(wait_for_events(layout.hospital.audit_log, "message.delivered")) == 1


def test_send_help_documents_the_exit_codes() -> None:
    result = medgw("send", "--help")
    assert result.returncode == 0
    text = " ".join(result.stdout.split())
    assert "0 delivered" in text and "2 usage error" in text and "3 outcome unknown" in text
    assert "--idempotency-key K" in text and "with the same --idempotency-key" in text


@pytest.mark.parametrize(
    ("content_type", "shown"),
    [
        ("テキスト/plain", "'テキスト/plain'"),  # not ASCII: cannot be an HTTP header
        ("text/plain\r\nX: 1", r"'text/plain\r\nX: 1'"),  # a header injection
        ("bad", "'bad'"),  # the gateway would refuse it: a usage error, not a failure
    ],
)
def test_an_invalid_content_type_is_a_usage_error(
    layout: DemoLayout, tmp_path: Path, content_type: str, shown: str
) -> None:
    document = tmp_path / "a.hl7"
    document.write_bytes(b"MSH|a\r")
    config = str(layout.lab.config_path)
    result = medgw(
        "send", str(document), "--to", "hospital", "--content-type", content_type,
        "--config", config,
    )  # fmt: skip
    assert result.returncode == 2, result.stderr
    assert f"--content-type {shown} is not a media type" in result.stderr
    assert "fix: give e.g. application/hl7-v2" in result.stderr
    assert "Traceback" not in result.stderr


def test_a_file_name_that_is_not_utf8_is_a_usage_error(layout: DemoLayout, tmp_path: Path) -> None:
    document = tmp_path / os.fsdecode(b"\xff\xfe-result.hl7")  # e.g. a Shift_JIS name
    document.write_bytes(b"MSH|a\r")
    result = medgw(
        "send", str(document), "--to", "hospital", "--config", str(layout.lab.config_path)
    )
    assert result.returncode == 2, result.stderr
    assert r"the file name '\xff\xfe-result.hl7' is not valid UTF-8" in result.stderr
    assert "fix: copy or rename the file" in result.stderr and "Traceback" not in result.stderr
