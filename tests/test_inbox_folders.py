"""What the daemon, ``check-config`` and the readiness say of an inbox folder medgw cannot
deliver into, and the fix they give, as an administrator meets them.

* A folder another user owns, found by the daemon (run as ``nobody``): the fix lets the
  daemon's user write it (ACL or chown); it never says to run the daemon as the owner,
  as ``check-config`` run by hand as another user may (the daemon *is* medgw's user).
* medgw's own folder that it may write but not list (mode 0300): ``check-config`` and the
  start name the permission missing and the chmod that gives it, before documents arrive.
"""

from __future__ import annotations

import os
import pwd
from typing import Any

from gateway.demo_run import drop_file
from tests.helpers.audit import events, wait_for_event, wait_for_events
from tests.helpers.check_config import reported
from tests.helpers.demo import new_demo
from tests.helpers.other_user import (
    NOBODY,
    as_nobody,
    check_config_as_nobody,
    give_to_nobody,
    open_folder,
)


def test_an_inbox_folder_another_user_owns_gets_the_daemons_fix_not_the_commands(
    processes: Any,
) -> None:
    owner = pwd.getpwnam("daemon")  # an internal system's account made the folder
    with open_folder() as base:
        layout = new_demo(base / "demo")
        give_to_nobody(layout.hospital.root)
        folder = layout.hospital.inbox_dir / "lab"
        folder.mkdir(mode=0o755)
        os.chown(folder, owner.pw_uid, owner.pw_gid)
        config = layout.hospital.config_path
        daemons_fix = (
            f"{folder} is owned by user daemon: let user nobody, whom medgw runs as, write it "
            f"too (ls -ld {folder}; for example setfacl -m u:nobody:rwX {folder}), or give it "
            f"to user nobody (chown nobody {folder}) if nothing needs it to stay daemon's"
        )
        # check-config, run by hand, may run as another user than the daemon's.
        checked = check_config_as_nobody(config)
        assert checked.returncode == 0, checked
        words = f"the inbox's folder {folder} may not be read and written by user nobody"
        assert reported(checked, config, "storage.inbox_dir", words, "run this command as that")

        hospital = processes.start(config, prefix=as_nobody())
        said = hospital.wait_for(lambda line: line.get("event") == "storage.not_writable", 5)
        assert f"{words}, whom medgw runs as" in said["problem"], said
        assert said["problem"].endswith(f"(fix: {daemons_fix})"), said
        lab = processes.start(layout.lab.config_path)
        drop_file(layout.lab.outbox_dir / "hospital", "result.hl7", b"MSH|owned\r")

        alert = wait_for_event(layout.hospital.audit_log, "storage.unavailable")
        assert "Permission denied" in alert["reason"] and "answered 503" in alert["reason"]
        assert alert["detail"]["fix"] == daemons_fix, alert
        assert not events(layout.hospital.audit_log, "message.rejected")

        os.chown(folder, NOBODY.pw_uid, NOBODY.pw_gid)  # the administrator's fix
        [receipt] = wait_for_events(layout.lab.audit_log, "receipt.received")
        assert receipt["message_id"] == alert["message_id"]
        assert (folder / "result.hl7").read_bytes() == b"MSH|owned\r"
        assert lab.stop() == 0 and hospital.stop() == 0  # before their folders go


def test_an_inbox_folder_medgw_may_write_but_not_list_is_said_before_documents_arrive(
    processes: Any,
) -> None:
    """Mode 0300 on medgw's own folder: a document could be linked there, but the folder's
    sync after it needs read: each document would be answered 503 once.  ``check-config``
    and the start name the missing permission and the fix that gives it (chmod, not a
    chown to the user that owns it already)."""
    with open_folder() as base:
        layout = new_demo(base / "demo")
        give_to_nobody(layout.hospital.root)
        folder = layout.hospital.inbox_dir / "lab"
        folder.mkdir()
        os.chown(folder, NOBODY.pw_uid, NOBODY.pw_gid)
        folder.chmod(0o300)  # write and search, no read
        config = layout.hospital.config_path
        words = (
            f"the inbox's folder {folder} may not be read and written by user nobody, whom "
            "this command runs as (no read permission: medgw needs read, write and search "
            "permission on a folder, read to sync it after each change)"
        )
        fix = f"chmod u+rwx {folder}"
        checked = check_config_as_nobody(config)
        assert checked.returncode == 0, checked
        assert reported(checked, config, "storage.inbox_dir", words, fix), checked
        assert f"chown nobody {folder}" not in checked.stdout, checked

        hospital = processes.start(config, prefix=as_nobody())
        said = hospital.wait_for(lambda line: line.get("event") == "storage.not_writable", 5)
        assert words.replace("this command", "medgw") in said["problem"], said
        assert fix in said["problem"] and "chown" not in said["problem"], said
        assert hospital.stop() == 0  # before its folders go
