"""Who did it: an operator action is recorded under the account the kernel reports
for the control socket, and a name passed by sudo only as a claim."""

from __future__ import annotations

import json
import os
import pwd
import socket
import stat
import subprocess
import sys
from typing import Any

from gateway.pki.demo import DemoLayout
from tests.helpers.audit import events, wait_for_event


def test_the_kernels_account_comes_first_and_a_passed_name_is_only_claimed(
    layout: DemoLayout, processes: Any
) -> None:
    processes.start(layout.lab.config_path)
    control = (layout.lab.root / "state" / "control.sock").stat()
    assert stat.S_ISSOCK(control.st_mode) and stat.S_IMODE(control.st_mode) == 0o600
    account = pwd.getpwuid(os.getuid()).pw_name
    for peer_action, env_name in (("suspend", "dr.sato\r\nforged: yes"), ("resume", account)):
        done = subprocess.run(
            [sys.executable, "-m", "gateway", "peers", peer_action, "hospital"]
            + (["--reason", "maintenance"] if peer_action == "suspend" else [])
            + ["--config", str(layout.lab.config_path)],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
            env={**os.environ, "SUDO_USER": env_name},
        )
        assert done.returncode == 0, done.stderr
    uid = os.getuid()
    suspended = wait_for_event(layout.lab.audit_log, "peer.suspended")
    assert suspended["actor"] == (
        f"operator:{account} (uid {uid}, claims to be dr.satoforged: yes)"
    )
    resumed = wait_for_event(layout.lab.audit_log, "peer.resumed")
    assert resumed["actor"] == f"operator:{account} (uid {uid})"


def test_a_body_that_is_not_a_json_object_is_answered_400_and_changes_nothing(
    layout: DemoLayout, processes: Any
) -> None:
    processes.start(layout.lab.config_path)
    for url in ("/v1/peers/hospital/suspend", "/v1/handover/x/retry"):
        for body in (b"not json", b"[1]", b'"text"'):
            control = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            control.connect(str(layout.lab.root / "state" / "control.sock"))
            control.sendall(
                f"POST {url} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                f"Connection: close\r\nContent-Length: {len(body)}\r\n\r\n".encode()
                + body
            )
            answer = b""
            while chunk := control.recv(65536):
                answer += chunk
            control.close()
            head, _, text = answer.partition(b"\r\n\r\n")
            assert head.startswith(b"HTTP/1.1 400"), (url, body, answer)
            refused = json.loads(text)
            assert "JSON object" in refused["error"] and refused["fix"]
    assert not events(layout.lab.audit_log, "peer.suspended")
