"""Folders medgw's user cannot write, found before they hurt, said without a traceback.

Each folder is real and mounted read-only on itself (a bind mount: EROFS, which
root meets too, as medgw's own user meets EACCES in a folder root owns).

* The state folder or the audit trail's folder: ``check-config`` says so (an error
  naming the key, the folder, the rule and the fix) and ``medgw run`` does not
  start, with the same error, touching nothing.
* An inbox folder: both say so as a warning; the daemon starts, logs
  ``storage.not_writable``, and ``/health/ready`` says not ready, with the text,
  until the folder is writable again.
* An outbox root owns, in which the daemon (run as ``nobody``) cannot make the
  peers' folders: a warning, and the daemon starts (it receives meanwhile).
* A folder no start check covers ([cluster] bodies_dir): ``medgw run`` stops with
  an error naming it and the fix, not a Python traceback.
* A state folder another user owns (the one medgw runs as, most likely), checked by
  ``check-config`` run as ``nobody``: the fix says to run the check as that user,
  never to give the folder to ``nobody`` (which would take it from the daemon).
* The audit log's ``.order`` notes left root's by a command run as root: an error
  naming the file (the daemon, run as its own user, could not open them at start).
* A configuration with errors: ``medgw run`` says to check it as the user it runs as.
* A zone's CRL folder that medgw's user may not enter or list (``check-config`` run
  as ``nobody``: EACCES): a configuration error naming the key, the folder, the user
  and the fix.
"""

from __future__ import annotations

import os
import pwd
from pathlib import Path
from typing import Any

import pytest

from gateway.demo_run import wait_until
from gateway.pki.demo import DemoLayout
from tests.cli import medgw
from tests.helpers.check_config import check_config, reported
from tests.helpers.demo import new_demo
from tests.helpers.maintenance import ADDRESS as MAINTENANCE_ADDRESS
from tests.helpers.maintenance import enable_maintenance
from tests.helpers.metrics import get, with_metrics
from tests.helpers.other_user import (
    NOBODY,
    as_nobody,
    check_config_as_nobody,
    give_to_nobody,
    open_folder,
)
from tests.helpers.storage import read_only_folder


@pytest.mark.parametrize(
    ("key", "what", "folder"),
    [
        ("storage.state_dir", "the state folder", "state"),
        ("storage.audit_log", "the audit log's folder", "audit"),
    ],
)
def test_a_read_only_state_or_audit_folder_is_an_error_and_no_start(
    layout: DemoLayout, key: str, what: str, folder: str
) -> None:
    config = layout.hospital.config_path
    path = layout.hospital.root / folder
    with read_only_folder(path):
        checked = check_config(config)
        started = medgw("run", "--config", config)
    words = f"{what} {path} is on a file system mounted read-only"
    fix = f"(findmnt -T {path} shows it): mount it read-write; under systemd, name the folder"
    for result in (checked, started):
        assert result.returncode == 1, result
        assert "Traceback" not in result.stdout + result.stderr, result
        assert reported(result, config, key, words, fix), result
        assert "it cannot start" in result.stderr
    assert "medgw will not start as user root with this configuration" in checked.stderr
    assert f"medgw: not starting: {config}" in started.stderr
    assert not (layout.hospital.root / "state" / "spool.sqlite3").exists()


def test_a_read_only_inbox_folder_is_a_warning_and_not_ready_until_mended(
    layout: DemoLayout, processes: Any
) -> None:
    port = with_metrics(layout.hospital)
    config = layout.hospital.config_path
    folder = layout.hospital.inbox_dir / "lab"
    words = f"the inbox's folder {folder} is on a file system mounted read-only"
    with read_only_folder(folder) as inbox:
        checked = check_config(config)
        assert checked.returncode == 0, checked
        assert reported(checked, config, "storage.inbox_dir", words, f"findmnt -T {folder}")
        assert "configuration is valid (1 warning(s))" in checked.stdout

        hospital = processes.start(config)
        said = hospital.wait_for(lambda line: line.get("event") == "storage.not_writable", 5)
        assert words in said["problem"] and "answered 503" in said["problem"], said
        status, text = get(port, "/health/ready")
        assert status == 503 and words in text, text

        inbox.release()  # the administrator makes the folder writable: no restart
        wait_until(lambda: get(port, "/health/ready") == (200, "ready\n"), 30, "ready")


def test_a_read_only_folder_no_check_covers_stops_the_start_with_its_fix(
    layout: DemoLayout, tmp_path: Path
) -> None:
    bodies = tmp_path / "bodies"
    config = layout.hospital.config_path
    with config.open("a") as toml:
        toml.write(f'\n[cluster]\nbodies_dir = "{bodies}"\n')
    with read_only_folder(bodies):
        started = medgw("run", "--config", config)
    assert started.returncode == 1, started
    assert "Traceback" not in started.stdout + started.stderr, started
    assert (
        f"medgw: cannot use {bodies}: Read-only file system; medgw stopped (fix: {bodies} is "
        f"on a file system mounted read-only (findmnt -T {bodies} shows it): mount it "
        "read-write; under systemd, name the folder in ReadWritePaths= of the medgw unit "
        "(the unit's ProtectSystem=strict leaves every folder outside /var/lib/medgw, "
        "/var/log/medgw and ReadWritePaths= read-only to medgw))"
    ) in started.stderr


def test_a_shared_bodies_folder_that_is_not_there_is_an_error_not_made_anew(
    layout: DemoLayout, tmp_path: Path
) -> None:
    """``[cluster] bodies_dir`` on a shared file system not mounted: medgw must not make
    the folder on the local disk, where no other node would read the bodies."""
    mount = tmp_path / "shared"  # the mount point, with nothing mounted on it
    mount.mkdir()
    bodies = mount / "medgw"
    config = layout.hospital.config_path
    with config.open("a") as toml:
        toml.write(f'\n[cluster]\nbodies_dir = "{bodies}"\n')
    said = (
        f"error: {config}: cluster.bodies_dir: the nodes' shared folder of bodies {bodies} "
        "does not exist (or is not a folder); medgw does not create it: if the shared file "
        "system it is on is not mounted, the bodies this node queues would be where no "
        f"other node can read them (fix: mount the shared file system (findmnt -T {mount}), "
        f"or, on a new one, create the folder in it (mkdir {bodies}, owned by the medgw "
        "user); keep it a folder inside the mount, not the mount point itself, so that a "
        "missing mount is seen)"
    )
    checked = check_config(config)
    assert checked.returncode == 1 and said in checked.stderr, checked.stderr
    started = medgw("run", "--config", config)
    assert started.returncode == 1 and "Traceback" not in started.stderr, started.stderr
    assert said.removeprefix("error: ") in started.stderr, started.stderr
    assert not bodies.exists()

    bodies.mkdir()  # mounted
    assert check_config(config).returncode == 0


@pytest.mark.parametrize("closed", ["certs/crls", "certs/crls/loopback"])
def test_a_crl_folder_the_user_may_not_enter_is_a_config_error(closed: str) -> None:
    """``certs/crls`` closed: the zone's folder cannot even be looked at; ``loopback``
    closed: it cannot be listed."""
    with open_folder() as base:
        layout = new_demo(base / "demo")
        give_to_nobody(layout.hospital.root)
        os.chown(layout.hospital.root / closed, 0, 0)  # root's, mode 0700
        (layout.hospital.root / closed).chmod(0o700)
        config = layout.hospital.config_path
        checked = check_config_as_nobody(config)
    assert checked.returncode == 1, checked
    assert "Traceback" not in checked.stdout + checked.stderr, checked
    crls = layout.hospital.root / "certs" / "crls" / "loopback"
    words = f"cannot read the CRLs at {crls}: Permission denied for user nobody, whom this command"
    fix = (
        "if medgw runs as another user, run this command as that user (sudo -u medgw medgw ...); "
        f"otherwise let user nobody enter every folder down to {crls} and read it (namei -l {crls}"
    )
    assert reported(checked, config, "zones[0].crls", words, fix), checked


@pytest.mark.parametrize("folder", ["peers.d", "maintainers.d"])
def test_a_peers_or_maintainers_folder_the_user_may_not_list_is_a_config_error(
    folder: str,
) -> None:
    """Not a traceback (peers.d), nor a silent gateway with no maintainer (maintainers.d,
    which a glob passed over)."""
    with open_folder() as base:
        layout = new_demo(base / "demo")
        config = layout.hospital.config_path
        if folder == "maintainers.d":
            enable_maintenance(layout.hospital.root, config, f"{MAINTENANCE_ADDRESS}:2222")
        give_to_nobody(layout.hospital.root)
        closed = layout.hospital.root / folder
        os.chown(closed, 0, 0)  # root's, mode 0700
        closed.chmod(0o700)
        checked = check_config_as_nobody(config)
    assert checked.returncode == 1, checked
    assert "Traceback" not in checked.stdout + checked.stderr, checked
    key = "gateway.peers_dir" if folder == "peers.d" else "maintenance.maintainers_dir"
    words = f"cannot list the folder {closed}: Permission denied for user nobody"
    fix = f"let the user medgw runs as enter every folder down to {closed} and list it"
    assert reported(checked, config, key, words, fix), checked


def test_an_outbox_the_user_cannot_make_folders_in_is_a_warning_not_a_failed_start(
    processes: Any,
) -> None:
    with open_folder() as base:
        layout = new_demo(base / "demo")
        port = with_metrics(layout.hospital)
        give_to_nobody(layout.hospital.root)
        outbox = layout.hospital.outbox_dir
        (outbox / "lab").rmdir()
        os.chown(outbox, 0, 0)  # root's, mode 0755: the lab's folder cannot be made
        outbox.chmod(0o755)
        hospital = processes.start(layout.hospital.config_path, prefix=as_nobody())
        said = hospital.wait_for(lambda line: line.get("event") == "storage.not_writable", 5)
        words = f"the outbox {outbox} may not be read and written by user nobody"
        assert words in said["problem"] and f"chown nobody {outbox}" in said["problem"], said
        status, text = get(port, "/health/ready")
        assert status == 503 and words in text, text

        os.chown(outbox, NOBODY.pw_uid, NOBODY.pw_gid)  # the administrator's fix
        wait_until(lambda: get(port, "/health/ready") == (200, "ready\n"), 30, "ready")
        assert hospital.stop() == 0  # before its folders go


def test_a_state_folder_another_user_owns_says_to_check_as_that_user_not_to_chown() -> None:
    daemon = pwd.getpwnam("daemon")  # stands for the user the service runs as
    with open_folder() as base:
        layout = new_demo(base / "demo")
        give_to_nobody(layout.hospital.root)
        state = layout.hospital.root / "state"
        os.chown(state, daemon.pw_uid, daemon.pw_gid)
        state.chmod(0o700)
        config = layout.hospital.config_path
        checked = check_config_as_nobody(config)
    assert checked.returncode == 1, checked
    words = (
        f"the state folder {state} may not be read and written by user nobody, whom this command"
    )
    fix = (
        f"{state} is owned by user daemon: if medgw runs as daemon, run this command as that "
        f"user (sudo -u daemon medgw ...) and leave {state} as it is; otherwise let user nobody, "
        f"whom this command runs as, write it too (ls -ld {state}; for example setfacl -m "
        f"u:nobody:rwX {state})"
    )
    assert reported(checked, config, "storage.state_dir", words, fix), checked
    assert "chown" not in checked.stderr, checked


def test_run_with_config_errors_says_to_check_it_as_the_user_medgw_runs_as(
    layout: DemoLayout,
) -> None:
    config = layout.hospital.config_path
    with config.open("a") as toml:
        toml.write("\n[no_such_section]\n")
    started = medgw("run", "--config", config)
    assert started.returncode == 1, started
    assert (
        f"medgw: not starting: {config} has errors (run `sudo -u root medgw check-config "
        f"--config {config}`, as the user medgw runs as)"
    ) in started.stderr, started


def test_audit_order_notes_another_user_made_are_an_error_before_the_start() -> None:
    with open_folder() as base:
        layout = new_demo(base / "demo")
        give_to_nobody(layout.hospital.root)
        notes = layout.hospital.audit_log.with_name(layout.hospital.audit_log.name + ".order")
        notes.touch()  # as a command run with sudo, not sudo -u, leaves them
        os.chown(notes, 0, 0)
        notes.chmod(0o640)
        config = layout.hospital.config_path
        checked = check_config_as_nobody(config)
    assert checked.returncode == 1, checked
    words = f"the audit log's order notes {notes} may not be read and written by user nobody"
    fix = f"make {notes} writable by user nobody, whom this command runs as"
    assert reported(checked, config, "storage.audit_log", words, fix), checked
    assert "it cannot start" in checked.stderr, checked
