"""``medgw audit verify`` on a real daemon's audit trail, intact and tampered."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

from gateway.demo_run import drop_file
from gateway.pki.demo import DemoLayout
from tests.helpers.audit import wait_for_events


def verify(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "gateway", "audit", "verify", *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_intact_trail_verifies_and_each_kind_of_tampering_is_found(
    layout: DemoLayout, processes: Any
) -> None:
    processes.start(layout.hospital.config_path)
    lab = processes.start(layout.lab.config_path)
    drop_file(layout.lab.outbox_dir / "hospital", "doc.hl7", b"MSH|x\r")
    wait_for_events(layout.lab.audit_log, "receipt.received")

    assert lab.stop() == 0
    ok = verify("--config", str(layout.lab.config_path))
    assert ok.returncode == 0, ok.stderr
    assert "hash chain intact" in ok.stdout

    path = layout.lab.audit_log
    original = path.read_text().splitlines()
    assert len(original) >= 4

    record = json.loads(original[2])
    record["peer"] = "someone-else"  # an edited field
    path.write_text("\n".join([*original[:2], json.dumps(record), *original[3:]]) + "\n")
    edited = verify("--file", str(path))
    assert edited.returncode == 1 and f"{path}:3" in edited.stderr and "altered" in edited.stderr

    path.write_text("\n".join([*original[:1], *original[2:]]) + "\n")  # a removed record
    removed = verify("--file", str(path))
    assert removed.returncode == 1 and "chain broken" in removed.stderr

    path.write_text("\n".join([original[1], original[0], *original[2:]]) + "\n")  # reordered
    assert verify("--file", str(path)).returncode == 1

    for foreign in ("1", '"text"', "[1, 2]", "null"):  # valid JSON, but not a record
        path.write_text("\n".join([original[0], foreign, *original[1:]]) + "\n")
        replaced = verify("--file", str(path))
        assert replaced.returncode == 1, foreign
        assert f"{path}:2: not an audit record" in replaced.stderr, replaced.stderr
        assert "Traceback" not in replaced.stderr


def test_a_folder_given_as_the_audit_log_is_reported_without_a_traceback(tmp_path: Path) -> None:
    result = verify("--file", str(tmp_path))
    assert result.returncode == 1
    assert f"cannot read audit log {tmp_path}: Is a directory" in result.stderr
    assert "fix:" in result.stderr and "Traceback" not in result.stderr
