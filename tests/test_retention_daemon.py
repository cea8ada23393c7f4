"""Retention on real daemons: ``medgw purge`` through the control socket, the sweep of
the ``[retention]`` rules, and their configuration checks."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from gateway.config import load_config
from gateway.demo_run import drop_file, free_port, wait_until
from gateway.errors import ConfigError
from gateway.pki.demo import DemoLayout
from tests.cli import medgw
from tests.helpers.atrest import stored_receipt
from tests.helpers.audit import wait_for_events
from tests.helpers.internal_system import InternalSystem, enable_delivery


def _settled(lab: Path, hospital: Path, message_id: str) -> str:
    """Once the sender's record is delivered and the receiver's hand-over done (as the
    spools say): a --before later than both."""

    def state(*args: str | Path) -> Any:
        return json.loads(medgw(*args, "--json").stdout)

    wait_until(
        lambda: (
            state("queue", "show", message_id, "--config", lab)["state"] == "delivered"
            and state("handover", "list", "--config", hospital)[0]["state"] == "done"
        ),
        60,
        "the message settled on both sides",
    )
    return datetime.now(UTC).isoformat()


def test_an_operator_purge_disposes_of_what_is_finished_audited_with_who(
    layout: DemoLayout, processes: Any
) -> None:
    port = free_port()
    enable_delivery(layout, port)
    system = InternalSystem(port)
    try:
        processes.start(layout.hospital.config_path)
        lab = processes.start(layout.lab.config_path)
        drop_file(layout.lab.outbox_for("hospital"), "doc.hl7", b"MSH|to dispose of\r")
        [handed] = wait_for_events(layout.hospital.audit_log, "message.handed_over")
        [sent] = wait_for_events(layout.lab.audit_log, "receipt.received")
        message_id = handed["message_id"]
        copy = layout.hospital.inbox_dir / "lab" / "doc.hl7"
        shown = medgw("queue", "show", message_id, "--json", "--config", lab.config)
        assert json.loads(shown.stdout)["receipt_kept"] == "spool"
        assert copy.read_bytes() == b"MSH|to dispose of\r"
        assert stored_receipt(Path(lab.config), message_id) is not None
        before = _settled(lab.config, layout.hospital.config_path, message_id)

        dry = medgw(
            "purge", "--before", before, "--dry-run", "--config", layout.hospital.config_path
        )
        assert dry.returncode == 0, dry.stderr
        assert (
            dry.stdout.strip() == "would dispose of: received 1, receipts 1, handover 1, spool 1"
        )  # closed audit files only when named
        assert copy.exists()
        done = medgw("purge", "--before", before, "--json", "--config", layout.hospital.config_path)
        assert done.returncode == 0, done.stderr
        assert json.loads(done.stdout)["counts"] == {
            "received": 1,
            "receipts": 1,
            "handover": 1,
            "spool": 1,
        }
        assert not copy.exists()
        # Audit files younger than they are kept (5 years: audit_days is not set) never go.
        audit = medgw(
            *("purge", "--before", before, "--kind", "audit"),
            *("--config", layout.hospital.config_path),
        )
        assert audit.returncode != 0
        assert "would dispose of audit files closed less than 1825 days ago" in audit.stderr
        assert "give a --before of " in audit.stderr
        [_, purged] = wait_for_events(layout.hospital.audit_log, "retention.purged", count=2)
        assert purged["detail"]["trigger"] == "operator" and "(uid " in purged["actor"]
        assert purged["detail"]["counts"]["received"] == 1
        disposed = wait_for_events(layout.hospital.audit_log, "retention.disposed", count=4)
        assert {d["detail"]["messages"][0]["message_id"] for d in disposed} == {message_id}
        handovers = medgw("handover", "list", "--json", "--config", layout.hospital.config_path)
        assert json.loads(handovers.stdout) == []

        # The sender: only the receipts, of one peer; its record stays.
        kept = medgw(
            "purge",
            "--before",
            before,
            "--kind",
            "receipts",
            "--peer",
            "hospital",
            "--config",
            lab.config,
        )
        assert kept.returncode == 0, kept.stderr
        assert "disposed of: receipts 1" in kept.stdout
        assert stored_receipt(Path(lab.config), message_id) is None
        shown = medgw("queue", "show", message_id, "--json", "--config", lab.config)
        assert json.loads(shown.stdout)["state"] == "delivered"
        assert json.loads(shown.stdout)["receipt_kept"] is None
        assert sent["message_id"] == message_id

        future = medgw("purge", "--before", "2999-01-01", "--config", lab.config)
        assert future.returncode == 1 and "in the future" in future.stderr
        bad = medgw("purge", "--before", "2020-01-01", "--kind", "all", "--config", lab.config)
        assert bad.returncode == 2
    finally:
        system.close()


def test_the_daemon_sweeps_by_its_retention_rules(layout: DemoLayout, processes: Any) -> None:
    processes.start(layout.hospital.config_path)
    lab = processes.start(layout.lab.config_path)
    drop_file(layout.lab.outbox_for("hospital"), "doc.hl7", b"MSH|swept\r")
    [received] = wait_for_events(layout.lab.audit_log, "receipt.received")
    lab.stop()
    config = layout.lab.config_path
    keep_none = "\n".join(f"{kind}_days = 0" for kind in ("received", "receipts", "handover"))
    config.write_text(config.read_text() + f"\n[retention]\nspool_days = 0\n{keep_none}\n")
    lab = processes.start(config)
    [swept] = wait_for_events(layout.lab.audit_log, "retention.purged")
    assert swept["detail"] == {
        "trigger": "sweep",
        "dry_run": False,
        "counts": {"receipts": 1, "spool": 1},
        "spool_log_emptied": True,
    }
    shown = medgw("queue", "show", received["message_id"], "--config", config)
    assert shown.returncode == 1 and "no such message" in shown.stderr


def _problems(layout: DemoLayout, text: str) -> str:
    config = layout.hospital.config_path
    config.write_text(config.read_text() + text)
    with pytest.raises(ConfigError) as caught:
        load_config(config)
    return str(caught.value)


def test_retention_configuration_is_checked(layout: DemoLayout) -> None:
    problems = _problems(
        layout,
        """
[retention]
spool_days = 30
receipts_days = 90
recieved_days = 5

[[retention.rule]]
peer = "nobody"
spool_days = 10
""",
    )
    assert "retention.recieved_days: unknown key" in problems
    assert "retention.rule[0].peer: no peer named 'nobody'" in problems
    assert "records of finished messages are kept 30 days, receipts 90 days" in problems
    assert "set receipts_days to at most 30 (or spool_days to at least 90)" in problems
    assert "inbox copies of handed-over documents for ever" in problems


def test_a_short_audit_retention_is_a_warning(layout: DemoLayout) -> None:
    config = layout.hospital.config_path
    config.write_text(config.read_text() + "\n[retention]\naudit_days = 365\n")
    loaded = load_config(config)
    assert loaded.retention.audit_days == 365
    [warning] = [w for w in loaded.warnings if "audit_days" in str(w)]
    assert "5 years" in str(warning)
    check = medgw("check-config", "--config", config)
    assert check.returncode == 0 and "audit_days" in check.stdout + check.stderr
