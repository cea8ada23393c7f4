"""A document the outbox intake cannot take is blamed on what failed, not on the spool.

The lab's ``medgw run`` runs as user ``nobody`` (as medgw runs as its own user) over
a demo installation that user owns.  A document root wrote with mode 600 cannot be
read: the error names the document by folder, inode, owner and mode (never by its
name, which may carry a patient identifier) and says who must be able to read it.
An outbox folder root owns cannot give the document up: the error names that
folder.  Neither blames state/payloads, which is writable.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any

import pytest

from gateway.demo_run import drop_file
from gateway.pki.demo import DemoLayout
from tests.helpers.demo import new_demo
from tests.helpers.other_user import NOBODY, as_nobody, give_to_nobody, open_folder


@pytest.fixture
def nobodys_lab() -> Iterator[DemoLayout]:
    """The demo in a folder ``nobody`` can reach, the lab's installation owned by it."""
    with open_folder() as root:
        layout = new_demo(root / "demo")
        (root / "demo").chmod(0o755)
        give_to_nobody(layout.lab.root)
        yield layout


def _intake_failed(proc: Any, before: str = "") -> dict[str, Any]:
    """The next ``intake.failed`` whose error is not ``before`` (one is logged when the
    error changes)."""
    return proc.wait_for(  # type: ignore[no-any-return]
        lambda line: line.get("event") == "intake.failed" and line["error"] != before, 60
    )


def test_an_unreadable_document_and_an_unwritable_outbox_folder_are_named_not_the_spool(
    nobodys_lab: DemoLayout, processes: Any
) -> None:
    layout = nobodys_lab
    folder = layout.lab.outbox_dir / "hospital"
    document = drop_file(folder, "result-4711.hl7", b"MSH|^~\\&|LAB\r")
    document.chmod(0o600)  # root's, as written
    os.chown(folder, NOBODY.pw_uid, NOBODY.pw_gid)
    inode = document.stat().st_ino
    proc = processes.start(layout.lab.config_path, prefix=as_nobody())

    unreadable = _intake_failed(proc)
    assert unreadable["error"] == (
        f"cannot read a document in outbox/hospital (inode {inode}, owner root, mode 600): "
        "Permission denied; medgw (user nobody) reads each document it takes from the outbox"
    )
    assert unreadable["fix"].startswith(
        f"have the files written into {folder} readable by user nobody"
    )
    assert f"find {folder} -inum {inode}" in unreadable["fix"]
    assert "result-4711" not in str(unreadable) and "payloads" not in str(unreadable)

    # Readable now, but in a folder root owns: it cannot be moved out of the outbox.
    document.chmod(0o644)
    os.chown(folder, 0, 0)
    folder.chmod(0o755)
    stuck = _intake_failed(proc, unreadable["error"])
    assert stuck["error"] == (
        f"cannot remove a document in outbox/hospital (inode {inode}, owner root, mode 644) "
        f"from {folder}: Permission denied; medgw moves each document out of the outbox "
        "when it takes it"
    )
    assert stuck["fix"].startswith(f"make {folder} writable by user nobody")
    assert "payloads" not in str(stuck)
    assert document.exists()
