"""A small file system (tmpfs, as root) mounted for a test, and filling it to the last byte;
a disk that refuses this process's (or a daemon's) writes; a used-up disk quota."""

from __future__ import annotations

import contextlib
import errno
import os
import resource
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import NoReturn

import pytest


@contextlib.contextmanager
def small_file_system(folder: Path, size: str) -> Iterator[Path]:
    """A tmpfs of ``size`` mounted on ``folder`` for the duration."""
    if os.geteuid() != 0:
        pytest.skip("mounting a small file system needs root (CI runs as root)")
    folder.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size},mode=0750", "tmpfs", str(folder)],
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")
    try:
        yield folder
    finally:
        subprocess.run(["umount", "-l", str(folder)], check=False)


def fill_file_system(folder: Path, leave: int = 0) -> Path:
    """Write a file into ``folder`` until its file system has no byte left, then
    give ``leave`` bytes back."""
    filler = folder / "filler.bin"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        while True:
            os.write(fd, b"\0" * 4096)
    except OSError as exc:
        assert exc.errno == errno.ENOSPC, exc
        os.ftruncate(fd, max(0, os.fstat(fd).st_size - leave))
    finally:
        os.close(fd)
    return filler


class ReadOnlyFolder:
    """A folder mounted read-only on itself (a bind mount, as root): writing into it
    fails with EROFS, for root too, as on a file system the host mounted read-only."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.mounted = False

    def mount(self) -> None:
        for argv in (
            ["mount", "--bind", str(self.folder), str(self.folder)],
            ["mount", "-o", "remount,ro,bind", str(self.folder)],
        ):
            subprocess.run(argv, capture_output=True, text=True, check=True)
            self.mounted = True

    def release(self) -> None:
        """The administrator's fix: the folder writable again."""
        if self.mounted:
            subprocess.run(["umount", str(self.folder)], capture_output=True, check=True)
            self.mounted = False


@contextlib.contextmanager
def read_only_folder(folder: Path) -> Iterator[ReadOnlyFolder]:
    """``folder`` (created if missing) read-only until the end or its ``release()``."""
    folder.mkdir(parents=True, exist_ok=True)
    found = ReadOnlyFolder(folder)
    try:
        found.mount()
        yield found
    finally:
        found.release()


@contextlib.contextmanager
def writes_refused() -> Iterator[None]:
    """For the duration, every write into a file by this process fails (EFBIG: a file
    size limit of 0, its signal ignored), as a disk refusing writes: SQLite reports it as
    its "disk I/O error" (SQLITE_IOERR_WRITE).  Nothing else may write meanwhile."""
    limit = resource.getrlimit(resource.RLIMIT_FSIZE)
    handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (0, limit[1]))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, limit)
        signal.signal(signal.SIGXFSZ, handler)


class FilesCapped:
    """Another process's writes that would make a file longer than ``size`` bytes fail
    with EFBIG, as a disk refusing them: its file size limit lowered (as root), until
    :meth:`release`.  Only for a Python process, which ignores SIGXFSZ (CPython does at
    start): another would be killed by its first such write."""

    def __init__(self, pid: int, size: int) -> None:
        self.pid = pid
        self._was: tuple[int, int] | None = resource.prlimit(
            pid, resource.RLIMIT_FSIZE, (size, resource.RLIM_INFINITY)
        )

    def release(self) -> None:
        """The disk takes writes again."""
        if self._was is not None:
            resource.prlimit(self.pid, resource.RLIMIT_FSIZE, self._was)
            self._was = None


@contextlib.contextmanager
def files_capped(pid: int, size: int) -> Iterator[FilesCapped]:
    """Process ``pid``'s files capped at ``size`` bytes until the end or ``release()``."""
    if os.geteuid() != 0:
        pytest.skip("lowering another process's file size limit needs root (CI runs as root)")
    capped = FilesCapped(pid, size)
    try:
        yield capped
    finally:
        capped.release()


def quota_used_up(*_: object) -> NoReturn:
    """In place of a file operation: fails as the kernel fails one for a user whose disk
    quota is used up (EDQUOT, "Disk quota exceeded").  Quotas cannot be set up for a test
    on a kernel built without them, nor for root, whom they do not bind."""
    raise OSError(errno.EDQUOT, os.strerror(errno.EDQUOT))
