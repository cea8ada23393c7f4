"""An inbox on a file system that refuses hard links, said before documents arrive, and
a refused link answered 503 with that cause and its fix, not with a chown.

medgw gives a received document its name in the inbox with a hard link (see
gateway.delivery.inbox): where link() fails (vfat, some CIFS and FUSE mounts, an
immutable file: EPERM or EOPNOTSUPP) every document would be answered 503 and resent.

* An inbox folder without hard links (a real mount: tests.helpers.linkless): the start,
  ``check-config`` and ``/health/ready`` name the folder, the rule and the fix; ready
  again once the folder is on a file system with hard links; the check leaves nothing.
* A link refused during a delivery (the work file made immutable, ``chattr +i``, as the
  delivery waits to link it): answered 503 with the rule and the fix, and the resend is
  delivered once.  On both spool backends.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path
from typing import Any

from gateway.demo_run import drop_file, wait_until
from gateway.pki.demo import DemoLayout
from tests.helpers.audit import events, wait_for_event, wait_for_events
from tests.helpers.check_config import check_config, reported
from tests.helpers.faults import killed_at
from tests.helpers.linkless import linkless_folder
from tests.helpers.metrics import get, with_metrics

RULE = "medgw delivers a document with a hard link, so that it appears whole and once"


def fix_for(folder: Path) -> str:
    return (
        f"put the inbox on a file system with hard links, such as ext4 or xfs (findmnt -T "
        f"{folder} shows the one it is on; vfat and some CIFS or FUSE mounts have none); on "
        f"one that has them, look for files made immutable there (lsattr -a {folder}; "
        "chattr -i)"
    )


def test_an_inbox_folder_without_hard_links_is_said_at_start_check_and_readiness(
    layout: DemoLayout, processes: Any
) -> None:
    port = with_metrics(layout.hospital)
    config = layout.hospital.config_path
    folder = layout.hospital.inbox_dir / "lab"
    words = (
        f"the inbox's folder {folder} is on a file system that refuses hard links (link: "
        f"Operation not permitted): {RULE}; until it can, the peers' documents are "
        "answered 503"
    )
    with linkless_folder(folder) as inbox:
        checked = check_config(config)
        assert checked.returncode == 0, checked
        assert reported(checked, config, "storage.inbox_dir", words, fix_for(folder)), checked
        assert "configuration is valid (1 warning(s))" in checked.stdout

        hospital = processes.start(config)
        said = hospital.wait_for(lambda line: line.get("event") == "storage.not_writable", 5)
        assert words in said["problem"] and fix_for(folder) in said["problem"], said
        status, text = get(port, "/health/ready")
        assert status == 503 and words in text and fix_for(folder) in text, text
        assert list(folder.iterdir()) == []  # the checks left nothing behind

        inbox.release()  # the administrator's fix: no restart
        wait_until(lambda: get(port, "/health/ready") == (200, "ready\n"), 30, "ready")
    assert list(folder.iterdir()) == []


def test_a_link_refused_during_a_delivery_is_answered_503_then_delivered_once(
    layout: DemoLayout, spool_backend: str, processes: Any, tmp_path: Path
) -> None:
    go = tmp_path / "go"
    folder = layout.hospital.inbox_dir / "lab"
    processes.start(
        layout.hospital.config_path,
        prefix=killed_at("--hold-before", "gateway.delivery.inbox:link", "--until-file", str(go)),
    )
    processes.start(layout.lab.config_path)
    document = os.urandom(20_000)
    drop_file(layout.lab.outbox_dir / "hospital", "scan.bin", document)
    wait_until(go.with_name("go.reached").exists, 60, "the delivery waiting to link")
    [work] = folder.glob(".scan.bin.*.delivering")
    subprocess.run(["chattr", "+i", str(work)], check=True)
    try:
        go.touch()
        alert = wait_for_event(layout.hospital.audit_log, "storage.unavailable")
        assert (
            f"cannot link the received document into {folder}: Operation not permitted; "
            f"{RULE}: the file system refuses hard links, or the document's work file was "
            "made immutable"
        ) in alert["reason"], alert
        assert alert["detail"]["fix"] == fix_for(folder), alert
        retry = wait_for_event(layout.lab.audit_log, "message.send_failed")
        assert "HTTP 503" in retry["reason"] and retry["message_id"] == alert["message_id"]
        [receipt] = wait_for_events(layout.lab.audit_log, "receipt.received")
    finally:
        subprocess.run(["chattr", "-i", str(work)], check=True)
    assert receipt["message_id"] == alert["message_id"]
    assert receipt["detail"]["disposition"] == "processed"
    assert (folder / "scan.bin").read_bytes() == document
    assert len(wait_for_events(layout.hospital.audit_log, "message.delivered")) == 1
    assert not events(layout.hospital.audit_log, "message.rejected")
