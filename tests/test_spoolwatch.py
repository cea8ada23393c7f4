"""The spool database going away and coming back while the audit log cannot be
written: the node still hears it (readiness, log lines), and says which record was lost.

A real audit log whose writes this process's file size limit refuses (as a disk that
refuses writes), the daemon's real readiness and log.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

from gateway.audit import AuditLog
from gateway.clock import SystemClock
from gateway.daemon.observe import Readiness
from gateway.daemon.spoolwatch import SpoolReachability
from gateway.inbound.outages import StorageOutages
from gateway.logs import make_logger
from tests.helpers.storage import writes_refused


def test_a_change_the_audit_log_cannot_take_is_logged_as_a_lost_record(tmp_path: Path) -> None:
    clock = SystemClock()
    audit = AuditLog(tmp_path / "audit.jsonl", clock, node="hospital")
    stream = io.StringIO()
    readiness = Readiness(clock, StorageOutages(clock))
    watch = SpoolReachability(
        lambda: audit,
        make_logger("info", stream),
        "database 'spool'",
        StorageOutages(clock),
        readiness,
    )
    try:
        with writes_refused():
            watch.changed("connection refused")
            assert readiness.spool_unreachable is not None
            watch.changed(None)
            assert readiness.spool_unreachable is None
    finally:
        audit.close()
    lines = [json.loads(line) for line in stream.getvalue().splitlines()]
    lost = [line for line in lines if line["event"] == "audit.write_failed"]
    assert [line["audit_event"] for line in lost] == ["spool.unreachable", "spool.reachable"]
    assert all(line["level"] == "critical" and "File too large" in line["error"] for line in lost)
