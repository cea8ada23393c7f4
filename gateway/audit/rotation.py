"""When the audit writer starts a new file, and the file-system steps of doing so.

A rotation (gateway.audit.log) seals the current file with a checkpoint, makes
it durable, renames it to its closed name (gateway.audit.files) and creates a
new current file.  Each step leaves a trail that reads whole: a crash before the
rename leaves the old file current; after it, the trail ends with the closed
file until the new one has a record, and the writer, started again, chains on
from the last record of whichever file is newest.  A record is never copied, so
never written twice.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import date, datetime
from pathlib import Path

MIB = 1024 * 1024
DEFAULT_MIB = 256
MIN_MIB = 0.01  # 10 KiB: small enough to see rotation in a test, never every record
RETRY_SECONDS = 60.0  # after a rotation that failed (a rename refused), try again this late


@dataclass(frozen=True)
class RotationSettings:
    """``[audit] rotate_mib`` and ``rotate_daily``: when the current file is closed."""

    max_bytes: int | None = DEFAULT_MIB * MIB  # None: not by size
    daily: bool = True  # at the first record of each UTC day

    def due(self, size: int, day: date | None, now: datetime) -> bool:
        """Whether a file of ``size`` bytes whose first record was written on ``day`` (None:
        empty) is closed before a record written at ``now``."""
        if not size:
            return False
        if self.max_bytes is not None and size >= self.max_bytes:
            return True
        return self.daily and day is not None and now.date() > day


def open_current(path: Path) -> int:
    """Open (create) a file the writer appends to (the trail's current file, its order
    notes), never readable by other users: a folder or a file the gateway cannot write
    fails here (at the writer's start, or at a rotation)."""
    flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC
    fd = os.open(path, flags, 0o640)
    try:
        mode = os.fstat(fd).st_mode & 0o777
        if mode & 0o007:  # whatever the umask was
            os.fchmod(fd, mode & ~0o007)
    except OSError:
        os.close(fd)
        raise
    return fd


def close_file(current: Path, closed: Path) -> None:
    """Give the sealed, synced current file its closed name (atomic; never replaces a file)."""
    if closed.exists():
        raise FileExistsError(17, "a closed audit file of this name exists", str(closed))
    os.rename(current, closed)


def sync_folder(folder: Path) -> None:
    """Make a rename or a new file in ``folder`` durable."""
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
