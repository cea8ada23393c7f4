"""``medgw restore`` onto a PostgreSQL spool while a ``medgw run`` node is running but
cut off from the database (so that the restore cannot see it): when the node reaches
the database again it stops, with ``spool.replaced`` in its audit trail and log and a
failure status, and sends nothing more; started again, it runs on the restored spool.
"""

from __future__ import annotations

import shutil
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from gateway.demo_run import drop_file, wait_until
from gateway.pki.demo import DemoLayout
from gateway.spool import OutboundState
from gateway.spool.postgres import PostgresSettings
from tests.cli import medgw
from tests.helpers.audit import events, wait_for_events
from tests.helpers.backup import add_backup, recipient
from tests.helpers.cluster import add_node, inbox, outbound
from tests.helpers.commit_cut import CommitCut, commit_cut

pytestmark = pytest.mark.daemon

RECEIVED = ("message.received", "message.duplicate")  # what the hospital got, resends too


cut = commit_cut()


def restoring_host(layout: DemoLayout, behind: PostgresSettings, spool: PostgresSettings) -> Path:
    """Another host of the cluster, with no state of its own yet, reaching the spool's
    database directly (not through the cut): where the restore runs."""
    root = layout.lab.root.with_name("lab-restorer")
    shutil.copytree(
        layout.lab.root,
        root,
        ignore=shutil.ignore_patterns("state", "audit", "inbox", "outbox", "shared-bodies"),
    )
    config = root / "gateway.toml"
    text = config.read_text()
    old, new = f'socket_dir = "{behind.socket_dir}"', f'socket_dir = "{spool.socket_dir}"'
    assert old in text
    config.write_text(text.replace(old, new))
    return config


def test_a_node_cut_off_during_a_restore_stops_when_back_and_sends_nothing_more(
    layout: DemoLayout,
    processes: Any,
    postgres: PostgresSettings,
    cut: CommitCut,
    tmp_path: Path,
) -> None:
    behind = replace(postgres, socket_dir=cut.socket_dir)  # the node's path to the database
    key, cert = recipient(tmp_path / "offline")
    config = add_node(layout.lab, "lab-a", behind)
    add_backup(config, cert)
    node = processes.start(config)
    drop_file(layout.lab.outbox_for("hospital"), "result.hl7", b"MSH|the result\r")

    # The hospital is down: the document waits, and the backup holds it waiting.
    def queued() -> bool:
        records = outbound(postgres)
        return len(records) == 1 and records[0].state == OutboundState.QUEUED

    wait_until(queued, 120, "the document queued, its first attempt failed")
    bundle = tmp_path / "lab.p7m"
    made = medgw("backup", "--to", bundle, "--config", config)
    assert made.returncode == 0, made.stderr

    # Then it is delivered (the receipt settles it), and the node loses its database.
    processes.start(layout.hospital.config_path)
    wait_for_events(layout.lab.audit_log, "receipt.received", timeout=120)
    wait_until(lambda: outbound(postgres)[0].state == OutboundState.DELIVERED, 60, "delivered")
    assert set(inbox(layout)) == {"result.hl7"}
    cut.refuse = True
    cut.drop()
    wait_for_events(layout.lab.audit_log, "spool.unreachable", timeout=60)

    # The restore, from another host: no node connected, so it goes ahead.
    host = restoring_host(layout, behind, postgres)
    done = medgw(
        "restore", "--from", bundle, "--cert", cert, "--key", key, "--config", host, "--force"
    )
    assert done.returncode == 0, done.stderr
    [restored] = outbound(postgres)
    assert restored.state == OutboundState.QUEUED  # as the backup had it
    received = len(events(layout.hospital.audit_log, RECEIVED))
    assert received == 1

    cut.refuse = False  # the database is back for the node
    assert node.wait_exit(120) != 0
    [event] = events(layout.lab.audit_log, "spool.replaced")
    assert event["severity"] == "alert" and event["outcome"] == "failure"
    assert "was restored (replaced) while this node (lab-a) was running" in event["reason"]
    assert "start node lab-a again" in event["detail"]["fix"]
    assert any(
        line["event"] == "spool.replaced" and line["level"] == "critical" for line in node.lines
    )
    # It sent nothing more (it has exited: nothing can come later), and left the restored
    # spool as the restore made it.
    assert len(events(layout.hospital.audit_log, RECEIVED)) == received
    [after] = outbound(postgres)
    assert after.state == OutboundState.QUEUED and after.attempts == restored.attempts

    # Started again, it reads the restored spool and runs: the waiting document is sent
    # (the hospital knows it already: a duplicate, answered with its receipt) ...
    again = processes.start(config)
    wait_until(
        lambda: outbound(postgres)[0].state == OutboundState.DELIVERED,
        120,
        "the restored document settled by the restarted node",
    )
    # ... and a new one is delivered.
    drop_file(layout.lab.outbox_for("hospital"), "next.hl7", b"MSH|the next one\r")
    wait_until(lambda: "next.hl7" in inbox(layout), 120, "the next document delivered")
    assert len(events(layout.lab.audit_log, "spool.replaced")) == 1
    assert again.stop() == 0
