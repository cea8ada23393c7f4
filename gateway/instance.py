"""One daemon per state folder.

A second ``medgw run`` with the same configuration (started by hand while the
service runs, say) would remove the first one's half-received messages, put
the messages it is sending back in the queue, and take the same outbox files.
It stops before touching anything instead: the daemon holds an exclusive lock
(``flock``) on ``<state_dir>/medgw.lock`` for as long as it runs; the kernel
releases it when the process ends, however it ends.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from pathlib import Path

from gateway.errors import MedgwError

LOCK_NAME = "medgw.lock"


class AlreadyRunningError(MedgwError):
    """Another daemon is running with this state folder."""


class InstanceLock:
    def __init__(self, state_dir: Path) -> None:
        self.path = state_dir / LOCK_NAME
        self._fd = -1

    def acquire(self) -> None:
        """Take the lock, or raise AlreadyRunningError naming the running daemon's pid."""
        self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        if os.geteuid() == 0:
            # Run as root (a command with sudo): the lock stays the state folder owner's,
            # whose daemon must open it later.
            folder = os.stat(self.path.parent)
            with contextlib.suppress(OSError):
                os.fchown(fd, folder.st_uid, folder.st_gid)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 32).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise AlreadyRunningError(
                f"another medgw (pid {holder}) is already running with the state folder "
                f"{self.path.parent}; this one did not start and changed nothing",
                fix="stop the running one first (systemctl stop medgw), or give this one a "
                "configuration with its own state_dir",
            ) from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._fd = fd

    def release(self) -> None:
        if self._fd >= 0:
            with contextlib.suppress(OSError):
                os.close(self._fd)  # closing the only descriptor releases the lock
            self._fd = -1
