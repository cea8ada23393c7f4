"""A full disk at the receiver loses nothing and delivers nothing twice.

The hospital's inbox is a real, small file system (tmpfs) filled to the last
byte.  A document from the lab cannot be stored: the hospital acknowledges
nothing (HTTP 503, no receipt), raises an alert that names the cause and the
fix, and leaves no partial file; the lab keeps the message and retries.  Once
space is freed the document arrives, once, with a verified receipt.

Needs root to mount; skipped, saying why, where that is impossible.
"""

from __future__ import annotations

import errno
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from gateway.demo_run import drop_file, read_audit, wait_until
from gateway.pki.demo import DemoLayout


def events(path: Path, name: str) -> list[dict[str, Any]]:
    return [r for r in read_audit(path) if r["event"] == name]


@pytest.fixture
def small_inbox(layout: DemoLayout) -> Iterator[Path]:
    if os.geteuid() != 0:
        pytest.skip("mounting a small file system for the inbox needs root (CI runs as root)")
    inbox = layout.hospital.inbox_dir
    inbox.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=256k,mode=0750", "tmpfs", str(inbox)],
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")
    try:
        yield inbox
    finally:
        subprocess.run(["umount", "-l", str(inbox)], check=False)


def _fill(folder: Path) -> Path:
    """Write a file into ``folder`` until its file system has no byte left."""
    filler = folder / "filler.bin"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        while True:
            os.write(fd, b"\0" * 4096)
    except OSError as exc:
        assert exc.errno == errno.ENOSPC, exc
    finally:
        os.close(fd)
    return filler


def test_full_inbox_answers_503_keeps_nothing_then_delivers_once(
    layout: DemoLayout, small_inbox: Path, processes: Any
) -> None:
    filler = _fill(small_inbox)
    processes.start(layout.hospital.config_path)
    processes.start(layout.lab.config_path)
    document = os.urandom(20_000)
    drop_file(layout.lab.outbox_dir / "hospital", "scan.bin", document)

    [alert, *_] = wait_until(
        lambda: events(layout.hospital.audit_log, "storage.unavailable"), 60, "the alert"
    )
    assert alert["severity"] == "alert" and alert["outcome"] == "failure"
    assert alert["peer"] == "lab" and alert["message_id"]
    assert "No space left on device" in alert["reason"], alert
    assert "answered 503" in alert["reason"]
    assert alert["detail"]["fix"].startswith(f"free disk space on the file system of {small_inbox}")
    [retry, *_] = wait_until(
        lambda: events(layout.lab.audit_log, "message.send_failed"), 60, "the lab's retry"
    )
    assert "HTTP 503" in retry["reason"] and retry["message_id"] == alert["message_id"]
    # Nothing acknowledged, nothing half-written, nothing refused for good.
    assert not events(layout.lab.audit_log, "receipt.received")
    assert not events(layout.lab.audit_log, "message.failed")
    assert not events(layout.hospital.audit_log, "receipt.sent")
    assert sorted(p.name for p in small_inbox.rglob("*") if p.is_file()) == ["filler.bin"]

    filler.unlink()  # the administrator frees space
    [receipt] = wait_until(
        lambda: events(layout.lab.audit_log, "receipt.received"), 60, "delivery after the retry"
    )
    assert receipt["message_id"] == alert["message_id"]
    assert receipt["detail"]["disposition"] == "processed" and receipt["detail"]["mic_verified"]
    delivered = [p for p in small_inbox.rglob("*") if p.is_file()]
    assert [p.name for p in delivered] == ["scan.bin"]
    assert delivered[0].read_bytes() == document
    assert len(events(layout.hospital.audit_log, "message.delivered")) == 1
