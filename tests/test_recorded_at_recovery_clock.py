"""The records a kill cut off are written at the next start, once, when the host's clock
was set back across the trail's last record (MNT-5): a change made after the step is
stamped before that record, and records before the step are stamped after those behind
it.  Each test runs on SQLite and on PostgreSQL, with the clock injected."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from gateway.audit import AuditEvent, AuditLog, EventType
from gateway.audit.owed import RECOVERED
from gateway.config import load_config
from gateway.demo_run import read_audit
from gateway.pki.demo import DemoLayout
from tests.clocks import SetClock
from tests.conftest import MakeSpool
from tests.helpers.recovery import queued, start_outbound

TODAY = datetime(2026, 12, 7, 9, 0, tzinfo=UTC)
AHEAD = TODAY + timedelta(days=45)


def _records(layout: DemoLayout, event: str) -> list[dict[str, Any]]:
    trail = load_config(layout.lab.config_path).storage.audit_log
    return [r for r in read_audit(trail) if r["event"] == event]


def _emit(layout: DemoLayout, clock: SetClock, event: EventType) -> None:
    """A record of the lab's at the clock's time (a start, say)."""
    log = AuditLog(load_config(layout.lab.config_path).storage.audit_log, clock, node="a")
    log.emit(AuditEvent(event))
    log.close()


def test_a_change_made_after_the_clock_was_set_back_gets_its_record(
    layout: DemoLayout, make_spool: MakeSpool, tmp_path: Path
) -> None:
    """The trail's last records were written with the clock 45 days ahead; it was set
    right, a send failed, and the process was killed before its message.send_failed.
    An hour later the start writes it, once: the change is stamped 45 days before the
    trail's last record."""
    clock = SetClock(TODAY - timedelta(hours=1))
    spool = make_spool(clock)
    _emit(layout, clock, EventType.DAEMON_STARTED)  # a record at the right time
    clock.at = AHEAD
    queued(spool, tmp_path, "<m@lab>")
    start_outbound(layout, spool, clock)  # its message.accepted, 45 days ahead
    clock.at = TODAY  # set right
    spool.claim_due("hospital", AHEAD.timestamp(), 1)
    assert spool.mark_retry("<m@lab>", "connection refused", 0, owed=EventType.MESSAGE_SEND_FAILED)
    # Killed here.
    clock.advance(3600)
    for _ in range(2):  # a second start finds it recorded
        start_outbound(layout, spool, clock)
    [failed] = _records(layout, "message.send_failed")
    assert failed["message_id"] == "<m@lab>"
    assert failed["reason"] == f"connection refused; {RECOVERED}"
    assert len(_records(layout, "message.accepted")) == 1


def test_a_record_written_before_the_clock_was_set_back_is_not_written_again(
    layout: DemoLayout, make_spool: MakeSpool, tmp_path: Path
) -> None:
    """A send failed and was recorded with the clock 45 days ahead; the clock was set
    right and a record written (stamped before them), then the process was killed.  The
    start reads the trail back past that step and writes nothing again."""
    clock = SetClock(AHEAD)
    spool = make_spool(clock)
    queued(spool, tmp_path, "<m@lab>")
    start_outbound(layout, spool, clock)  # its message.accepted
    spool.claim_due("hospital", clock.now().timestamp(), 1)
    assert spool.mark_retry("<m@lab>", "connection refused", 0, owed=EventType.MESSAGE_SEND_FAILED)
    clock.advance(5)
    start_outbound(layout, spool, clock)  # its message.send_failed
    assert len(_records(layout, "message.send_failed")) == 1
    clock.at = TODAY  # set right
    _emit(layout, clock, EventType.DAEMON_STARTED)  # stamped 45 days before the ones above
    # Killed here.
    clock.advance(300)
    start_outbound(layout, spool, clock)
    assert len(_records(layout, "message.send_failed")) == 1
    assert len(_records(layout, "message.accepted")) == 1
