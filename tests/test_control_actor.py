"""Who did it: an operator action is recorded under the account the kernel reports
for the control socket, and a name passed by sudo only as a claim."""

from __future__ import annotations

import os
import pwd
import stat
import subprocess
import sys
from typing import Any

from gateway.demo_run import read_audit
from gateway.pki.demo import DemoLayout


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
    records = {r["event"]: r for r in read_audit(layout.lab.audit_log)}
    uid = os.getuid()
    assert records["peer.suspended"]["detail"]["actor"] == (
        f"{account} (uid {uid}, claims to be dr.satoforged: yes)"
    )
    assert records["peer.resumed"]["detail"]["actor"] == f"{account} (uid {uid})"
