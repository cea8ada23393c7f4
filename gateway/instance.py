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
import errno
import fcntl
import os
import stat
from pathlib import Path

from gateway.errors import MedgwError

LOCK_NAME = "medgw.lock"


class AlreadyRunningError(MedgwError):
    """Another daemon is running with this state folder."""


class InstanceLockError(MedgwError):
    """The lock's name in the state folder is not a plain file medgw can use."""


class InstanceLock:
    def __init__(self, state_dir: Path) -> None:
        self.path = state_dir / LOCK_NAME
        self._fd = -1

    def acquire(self) -> None:
        """Take the lock, or raise AlreadyRunningError naming the running daemon's pid."""
        self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        # Never through a link: whoever owns the state folder could point the name at
        # any file, for a command run as root to truncate and write.
        flags = os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW | os.O_NOCTTY
        try:
            fd = os.open(self.path, flags, 0o600)
        except OSError as exc:
            if exc.errno != errno.ELOOP:
                raise
            raise InstanceLockError(
                f"{self.path} is a symbolic link, not the lock file medgw keeps there; "
                "nothing was done",
                fix=f"remove {self.path} (and find out who made it): medgw makes it again",
            ) from None
        held = os.fstat(fd)
        if not stat.S_ISREG(held.st_mode) or held.st_nlink != 1:
            os.close(fd)
            raise InstanceLockError(
                f"{self.path} is not a plain file of its own (a device, a folder or a hard "
                "link to another file); nothing was done",
                fix=f"remove {self.path} (and find out who made it): medgw makes it again",
            )
        folder = os.stat(self.path.parent)
        if os.geteuid() == 0 and held.st_uid == 0 and folder.st_uid != 0:
            # Made just now by a command run as root (sudo): the lock stays the state
            # folder owner's, whose daemon must open it later.
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
