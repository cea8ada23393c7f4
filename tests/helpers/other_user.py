"""Commands run as an unprivileged user (``nobody``, through setpriv) on files given to
it: where root reads and writes anything, that user meets EACCES, as medgw's own user
does on a host."""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

from tests.cli import medgw

NOBODY = pwd.getpwnam("nobody")


def as_nobody() -> list[str]:
    """The prefix that runs a command as ``nobody``, with no supplementary groups."""
    return ["setpriv", f"--reuid={NOBODY.pw_uid}", f"--regid={NOBODY.pw_gid}", "--clear-groups"]


def check_config_as_nobody(config: Path) -> subprocess.CompletedProcess[str]:
    """``medgw check-config`` of ``config`` run as ``nobody``: an administrator's check run
    as another user than root (exit status not checked)."""
    return medgw("check-config", "--config", config, prefix=as_nobody())


def give_to_nobody(path: Path) -> None:
    """``path`` and everything under it owned by ``nobody``."""
    for folder, _, files in os.walk(path):
        for name in [folder, *(os.path.join(folder, f) for f in files)]:
            os.chown(name, NOBODY.pw_uid, NOBODY.pw_gid, follow_symlinks=False)


@contextlib.contextmanager
def open_folder() -> Iterator[Path]:
    """A new folder every user may enter (pytest's own temporary folders are root's
    only), removed at the end."""
    folder = Path(tempfile.mkdtemp(prefix="medgw-test-"))
    try:
        folder.chmod(0o755)
        yield folder
    finally:
        shutil.rmtree(folder)
