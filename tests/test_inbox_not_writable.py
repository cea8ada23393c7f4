"""An inbox medgw cannot write loses nothing and refuses nothing for good.

The hospital's inbox is a real folder mounted read-only (a bind mount: EROFS, which
root meets too, as medgw's user meets EACCES in a folder root owns).  A document
from the lab cannot be stored: the hospital acknowledges nothing (HTTP 503, no
receipt, no negative receipt), raises an alert naming the folder and the fix, and
leaves no partial file; the lab keeps the message and resends it.  Once the folder
is writable again the document arrives, once, with a verified receipt.  On both
spool backends: the delivery's claim is taken and given back in the spool.
"""

from __future__ import annotations

import errno
import os
import pwd
from pathlib import Path
from typing import Any

from gateway.delivery import inbox
from gateway.demo_run import drop_file
from gateway.errors import InboxNotWritableError, InboxUnavailableError
from gateway.pki.demo import DemoLayout
from tests.helpers.audit import events, wait_for_event, wait_for_events
from tests.helpers.demo import new_demo
from tests.helpers.other_user import NOBODY, as_nobody, give_to_nobody, open_folder
from tests.helpers.refused_inbox import (
    assert_delivered_once,
    assert_kept_for_a_resend,
    send_to_a_refusing_inbox,
)
from tests.helpers.storage import read_only_folder


def test_read_only_inbox_answers_503_keeps_nothing_then_delivers_once(
    layout: DemoLayout, spool_backend: str, processes: Any
) -> None:
    folder = layout.hospital.inbox_dir / "lab"
    with read_only_folder(folder) as inbox:
        document, alert = send_to_a_refusing_inbox(layout, processes)
        assert f"cannot write the received document to {folder}/" in alert["reason"], alert
        assert "Read-only file system" in alert["reason"] and "answered 503" in alert["reason"]
        fix = alert["detail"]["fix"]
        assert fix.startswith(f"{folder} is on a file system mounted read-only"), fix
        assert f"findmnt -T {folder}" in fix and "ReadWritePaths= of the medgw unit" in fix
        # Nothing acknowledged, nothing half-written, nothing refused for good.
        assert_kept_for_a_resend(layout, alert)
        assert not events(layout.hospital.audit_log, "message.rejected")
        assert list(folder.iterdir()) == []

        inbox.release()  # the administrator makes the folder writable
        assert_delivered_once(layout, alert)
    assert [p.name for p in folder.iterdir()] == ["scan.bin"]
    assert (folder / "scan.bin").read_bytes() == document


def test_a_folder_this_user_may_not_write_is_a_resend_naming_the_folder_and_the_user(
    tmp_path: Path,
) -> None:
    """EACCES (root owns the inbox, medgw runs as its own user) is taken as EROFS is: the
    peer is asked to resend; the fix names the folder to change, the nearest that
    exists (medgw creates the peer's folder in it), and the user medgw runs as."""
    inbox_dir = tmp_path / "inbox"
    inbox_dir.mkdir()
    denied = PermissionError(errno.EACCES, "Permission denied", str(inbox_dir / "lab"))
    error = inbox.delivery_error(denied, inbox_dir / "lab" / "scan.bin")
    assert type(error) is InboxNotWritableError and isinstance(error, InboxUnavailableError)
    assert error.message == (
        f"cannot write the received document to {inbox_dir}/lab/scan.bin: Permission denied"
    )
    user = pwd.getpwuid(os.geteuid()).pw_name
    assert error.fix == (
        f"make {inbox_dir} writable by user {user}, whom medgw runs as "
        f"(ls -ld {inbox_dir}; for example chown {user} {inbox_dir})"
    )


def test_an_inbox_root_owns_is_answered_503_to_a_daemon_run_as_its_user(processes: Any) -> None:
    """As on a host: the hospital's daemon runs as its own user (``nobody``), and its
    inbox folder for the lab is root's, mode 0755 (EACCES).  The start says so; the
    lab's document is answered 503 and delivered once the folder is given to the user."""
    with open_folder() as base:
        layout = new_demo(base / "demo")
        give_to_nobody(layout.hospital.root)
        folder = layout.hospital.inbox_dir / "lab"
        folder.mkdir(mode=0o755)  # root's
        hospital = processes.start(layout.hospital.config_path, prefix=as_nobody())
        said = hospital.wait_for(lambda line: line.get("event") == "storage.not_writable", 5)
        assert (
            f"the inbox's folder {folder} may not be read and written by user nobody"
            in (said["problem"])
        ), said
        lab = processes.start(layout.lab.config_path)
        drop_file(layout.lab.outbox_dir / "hospital", "result.hl7", b"MSH|denied\r")

        alert = wait_for_event(layout.hospital.audit_log, "storage.unavailable")
        assert "Permission denied" in alert["reason"] and "answered 503" in alert["reason"]
        assert alert["detail"]["fix"] == (
            f"make {folder} writable by user nobody, whom medgw runs as "
            f"(ls -ld {folder}; for example chown nobody {folder})"
        )
        retry = wait_for_event(layout.lab.audit_log, "message.send_failed")
        assert "HTTP 503" in retry["reason"] and retry["message_id"] == alert["message_id"]
        assert not events(layout.lab.audit_log, "message.failed")
        assert not events(layout.hospital.audit_log, "message.rejected")
        assert list(folder.iterdir()) == []

        os.chown(folder, NOBODY.pw_uid, NOBODY.pw_gid)  # the administrator's fix
        [receipt] = wait_for_events(layout.lab.audit_log, "receipt.received")
        assert receipt["message_id"] == alert["message_id"]
        assert receipt["detail"]["disposition"] == "processed"
        assert (folder / "result.hl7").read_bytes() == b"MSH|denied\r"
        assert len(wait_for_events(layout.hospital.audit_log, "message.delivered")) == 1
        assert lab.stop() == 0 and hospital.stop() == 0  # before their folders go
