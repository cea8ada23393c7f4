"""The file of approved maintenance windows after a kill: an approval given later is
read whatever the kill left at the file's end."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from pathlib import Path

from gateway.clock import SystemClock
from gateway.maintenance.approvals import FILE_NAME, Approvals


def test_an_approval_after_a_line_a_kill_left_unfinished_is_still_read(tmp_path: Path) -> None:
    clock = SystemClock()
    approvals = Approvals(tmp_path, clock)
    until = (datetime.now(UTC) + timedelta(hours=2)).isoformat()
    approvals.approve("bob", until, "CRL update", "admin")
    # What a kill during the next approval's write leaves: part of its line.
    unfinished = json.dumps({"person": "mallory", "from": 0, "until": 4e9}).encode()[:30]
    with (tmp_path / FILE_NAME).open("ab") as handle:
        handle.write(unfinished)

    approvals.approve("alice", until, "certificate renewal", "admin")

    now = datetime.now(UTC).timestamp()
    assert approvals.approved("alice", now)
    assert approvals.approved("bob", now)
    assert not approvals.approved("mallory", now)
    lines = (tmp_path / FILE_NAME).read_bytes().split(b"\n")
    assert lines[1] == unfinished  # kept, ended: never read as an approval
    assert json.loads(lines[2])["person"] == "alice"
