"""A folder on a file system without hard links, made for a test (as root).

No vfat here: the kernel's POSIX message queue file system (mqueue) is mounted on the
folder instead.  A file can be made in it, and link() fails with EPERM, from the same
check of the kernel that refuses it on vfat (a file system with no link operation)."""

from __future__ import annotations

import contextlib
import subprocess
from collections.abc import Iterator
from pathlib import Path


@contextlib.contextmanager
def linkless_folder(folder: Path) -> Iterator[LinklessFolder]:
    """``folder`` (created if missing) without hard links until the end or its
    ``release()``."""
    folder.mkdir(parents=True, exist_ok=True)
    found = LinklessFolder(folder)
    subprocess.run(
        ["mount", "-t", "mqueue", "mqueue", str(folder)], capture_output=True, check=True
    )
    found.mounted = True
    try:
        yield found
    finally:
        found.release()


class LinklessFolder:
    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.mounted = False

    def release(self) -> None:
        """The administrator's fix: the folder back on a file system with hard links."""
        if self.mounted:
            subprocess.run(["umount", str(self.folder)], capture_output=True, check=True)
            self.mounted = False
