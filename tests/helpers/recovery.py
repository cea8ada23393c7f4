"""The lab's sending side as it starts, in the test's own process: its spool and audit
trail opened, its context with the log kept, and the files the start's recovery logged."""

from __future__ import annotations

import io
import json
from pathlib import Path

from gateway.audit.log import AuditLog
from gateway.clock import SystemClock
from gateway.config import load_config
from gateway.logs import make_logger
from gateway.outbound.context import Context, Settings
from gateway.pki.demo import DemoLayout
from gateway.spool import SqliteSpool


def lab_starting(
    layout: DemoLayout, tmp_path: Path
) -> tuple[SqliteSpool, AuditLog, Context, io.StringIO]:
    """The lab's spool (in ``tmp_path``), audit trail, outbound context (no trust in its
    peers judged) and the log it writes to."""
    config = load_config(layout.lab.config_path)
    spool = SqliteSpool(tmp_path / "spool.sqlite3", SystemClock())
    audit = AuditLog(config.storage.audit_log, SystemClock(), node="lab")
    log = io.StringIO()
    context = Context(Settings(config, {}), spool, audit, make_logger(stream=log), SystemClock())
    return spool, audit, context, log


def logged_files(log: io.StringIO, event: str) -> list[str]:
    """The files the log lines of ``event`` name, sorted."""
    return sorted(
        line["file"]
        for line in map(json.loads, log.getvalue().splitlines())
        if line["event"] == event
    )
