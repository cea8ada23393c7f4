"""A new document's work file has a durable name before the spool records the claim
naming it.

A claim whose work file is gone reads as "in the inbox" (gateway.delivery.inbox
``landed``): if a power loss took away a work file whose name never reached the disk,
a resend would be answered ``processed`` for a document nobody has.  So the inbox
folder is synced after the work file is created and before the claim
(gateway.inbound.exactly_once).  While that sync fails (tests/faultpoint.py
``--fail-until``, the real fsync of the folder otherwise) the peer is answered 503 as
for any other storage failure, nothing is claimed and the work file is removed; once it
succeeds the resend is delivered once.  The spool is each backend in turn.  The
folders made for a work file (a peer's or service's first document) are synced in
their parents too.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from gateway.clock import SystemClock
from gateway.config import load_config
from gateway.delivery import inbox
from gateway.demo_run import drop_file
from gateway.fsutil import FolderSync, fsync_dir
from gateway.pki.demo import DemoLayout
from gateway.spool import open_spool
from tests.helpers.audit import events, wait_for_event, wait_for_events
from tests.helpers.faults import killed_at

FOLDER_SYNC = "gateway.fsutil:FolderSync.sync"  # every inbox folder sync of the daemon


def test_a_work_file_whose_name_cannot_be_synced_is_not_claimed(
    layout: DemoLayout, spool_backend: str, processes: Any, tmp_path: Path
) -> None:
    synced = tmp_path / "synced"
    processes.start(
        layout.hospital.config_path,
        prefix=killed_at("--fail-until", FOLDER_SYNC, "--until-file", str(synced)),
    )
    processes.start(layout.lab.config_path)
    document = os.urandom(20_000)
    drop_file(layout.lab.outbox_for("hospital"), "order.hl7", document)
    alert = wait_for_event(layout.hospital.audit_log, "storage.unavailable")
    message_id = alert["message_id"]
    assert "Input/output error" in alert["reason"] and "answered 503" in alert["reason"]

    refused = wait_for_events(
        layout.lab.audit_log,
        ("message.send_failed", "receipt.received"),
        where=lambda r: r.get("message_id") == message_id,
    )[0]
    assert refused["event"] == "message.send_failed" and "HTTP 503" in refused["reason"]
    folder = layout.hospital.inbox_dir / "lab"
    assert list(folder.iterdir()) == []  # neither linked nor a work file left
    audit = layout.hospital.audit_log
    assert not events(audit, ("message.delivered", "message.duplicate", "receipt.sent"))
    config = load_config(layout.hospital.config_path)
    spool = open_spool(config.storage.spool_path, SystemClock(), config.spool.postgres)
    try:
        assert spool.inbound_get("lab", message_id) is None  # nothing claimed
    finally:
        spool.close()
    assert synced.with_name("synced.failed").read_text().splitlines()

    synced.touch()  # the disk recovers: the resend is delivered
    [receipt] = wait_for_events(
        layout.lab.audit_log, "receipt.received", where=lambda r: r["message_id"] == message_id
    )
    assert receipt["detail"]["disposition"] == "processed" and receipt["detail"]["mic_verified"]
    assert sorted(p.name for p in folder.iterdir()) == ["order.hl7"]
    assert (folder / "order.hl7").read_bytes() == document
    [delivered] = events(audit, "message.delivered")
    assert delivered["message_id"] == message_id
    assert not events(audit, "message.duplicate")
    [sent] = wait_for_events(audit, "receipt.sent", where=lambda r: r["message_id"] == message_id)
    assert sent["detail"]["disposition"] == "processed"


def test_the_folders_made_for_a_work_file_are_synced_in_their_parents(tmp_path: Path) -> None:
    """The first document of a peer's service makes ``inbox/<peer>/<service>/``: the
    work file's name is durable only once those folders' names are too."""
    inbox_dir = tmp_path / "inbox"
    inbox_dir.mkdir()
    synced: list[Path] = []

    def recorded(folder: Path) -> None:
        synced.append(folder)
        fsync_dir(folder)

    folders = FolderSync(recorded)
    service = inbox_dir / "lab" / "orders"
    first = inbox.prepare(service / "a.hl7", "node-1")
    first.close()
    inbox.sync_work_name(first, folders)
    assert synced == [service, inbox_dir / "lab", inbox_dir]

    synced.clear()  # the folders exist now: only the work file's own is synced
    second = inbox.prepare(service / "b.hl7", "node-1")
    second.close()
    inbox.sync_work_name(second, folders)
    assert synced == [service]
