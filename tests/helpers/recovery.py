"""The lab's sending side as it starts, in the test's own process: its spool and audit
trail opened, its context with the log kept, and the files the start's recovery logged;
a message queued, and the outbound recovery of a start run on a spool and clock given."""

from __future__ import annotations

import asyncio
import io
import json
from pathlib import Path

from gateway.audit.log import AuditLog
from gateway.clock import Clock, SystemClock
from gateway.config import load_config
from gateway.logs import make_logger
from gateway.outbound.context import Context, Settings
from gateway.outbound.recover import Recovery
from gateway.outbound.seal import Sealer
from gateway.pki.demo import DemoLayout
from gateway.spool import Spool, SqliteSpool


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


def queued(spool: Spool, tmp_path: Path, message_id: str) -> None:
    """``message_id`` taken in and queued for the hospital."""
    spool.add_intake(
        message_id, "hospital", "m.hl7", "text/plain", tmp_path / "src", tmp_path / message_id
    )
    assert spool.mark_queued(message_id, None, [], "mic", 3, body=b"sealed")


def start_outbound(layout: DemoLayout, spool: Spool, clock: Clock, node: str = "a") -> None:
    """The lab's start as ``node``: its outbound recovery, with its own audit trail."""
    config = load_config(layout.lab.config_path)
    audit = AuditLog(config.storage.audit_log, clock, node=node)
    context = Context(Settings(config, {}), spool, audit, make_logger(stream=io.StringIO()), clock)
    asyncio.run(Recovery(context, Sealer(context)).recover())
    audit.close()
