"""Folders the gateway's user cannot search: check-config names the folder and what it
lacks, and a reload whose findings cannot all be judged is still applied.  Each runs a
real ``medgw`` as user ``nobody`` on a demo made in a folder every user may enter."""

from __future__ import annotations

from typing import Any

from tests.cli import medgw
from tests.helpers.audit import wait_for_events
from tests.helpers.check_config import reported
from tests.helpers.demo import new_demo
from tests.helpers.other_user import as_nobody, check_config_as_nobody, give_to_nobody, open_folder


def test_a_reload_whose_folders_cannot_be_checked_is_applied_and_says_so(
    processes: Any,
) -> None:
    """The findings a reload answers with are judged once it is in force: a folder the
    daemon's user cannot search (the one holding the nodes' shared folder of bodies, made
    0600) makes that check fail, which is a finding saying what could not be checked and
    why, never a failed reload."""
    with open_folder() as base:
        layout = new_demo(base / "demo")
        config = layout.hospital.config_path
        mount = layout.hospital.root / "shared"
        bodies = mount / "outgoing"
        bodies.mkdir(parents=True)
        with config.open("a") as text:
            text.write(f'\n[cluster]\nbodies_dir = "{bodies}"\n')
        give_to_nobody(layout.hospital.root)
        processes.start(config, prefix=as_nobody())
        mount.chmod(0o600)  # user nobody may no longer look into it
        done = medgw("reload", "--config", config)
        assert done.returncode == 0, done.stdout + done.stderr
        *said, last = done.stdout.splitlines()
        assert last == f"configuration reloaded ({len(said)} problem(s) found; see above)", said
        [unchecked] = [line for line in said if "could not be checked" in line]
        assert unchecked.startswith(
            f"warning: {config}: storage: the folders [storage] names could not be checked "
            f"after the reload (Permission denied: {bodies}); the reload is applied"
        ), unchecked
        assert "fix: " in unchecked and f"ls -ld {bodies}" in unchecked, unchecked
        wait_for_events(layout.hospital.audit_log, "config.reloaded")


def test_check_config_names_an_inbox_its_user_cannot_search_rather_than_failing() -> None:
    """The peers' inbox folders are looked for inside the inbox: one that user cannot
    search hides them, and check-config says what it lacks instead of a traceback."""
    with open_folder() as base:
        layout = new_demo(base / "demo")
        give_to_nobody(layout.hospital.root)
        config = layout.hospital.config_path
        inbox = layout.hospital.inbox_dir
        inbox.chmod(0o600)
        checked = check_config_as_nobody(config)
        assert "Traceback" not in checked.stderr, checked.stderr
        assert checked.returncode == 0, checked.stdout + checked.stderr
        assert reported(
            checked, config, "storage.inbox_dir", f"the inbox {inbox} may not be read", ""
        ), checked.stdout
        assert "no search permission" in checked.stdout, checked.stdout
