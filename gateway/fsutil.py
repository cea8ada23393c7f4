"""Durable file operations: what is renamed into place is complete and on disk."""

from __future__ import annotations

import errno
import io
import os
import re
import secrets
from collections.abc import Iterable
from pathlib import Path
from typing import BinaryIO


def fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


PARTIAL = re.compile(r"^\..+\.[0-9a-f]{12}\.partial$")


def partial_name(path: Path) -> Path:
    """A hidden temporary name beside ``path`` for a file being written (or a working
    file): the start-up cleanup (:func:`remove_stale_partials`) knows it."""
    return path.with_name(f".{path.name}.{secrets.token_hex(6)}.partial")


def remove_stale_partials(folder: Path) -> list[Path]:
    """Delete temporary files a killed process left behind (only our own naming pattern)."""
    removed = []
    if folder.is_dir():
        for path in folder.rglob(".*.partial"):
            if PARTIAL.match(path.name) and path.is_file():
                path.unlink(missing_ok=True)
                removed.append(path)
    return removed


def write_atomic(
    path: Path, chunks: Iterable[bytes], *, mode: int = 0o640, overwrite: bool = True
) -> int:
    """Write to a hidden temporary file beside ``path``, fsync, rename, fsync the folder.

    Readers of the folder see either no file or the complete file.  With
    ``overwrite=False`` an existing ``path`` is never replaced (FileExistsError).
    Returns the number of bytes written.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = partial_name(path)
    size = 0
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, mode)
    try:
        with os.fdopen(fd, "wb", closefd=True) as handle:
            for chunk in chunks:
                handle.write(chunk)
                size += len(chunk)
            handle.flush()
            os.fsync(handle.fileno())
        if overwrite:
            os.replace(tmp, path)
        else:
            os.link(tmp, path)  # fails with FileExistsError instead of clobbering
            os.unlink(tmp)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)
    return size


def open_source(source: Path | bytes) -> BinaryIO:
    """A file, or a small document held in memory, opened for reading: the code that
    reads MIME and CMS structures works the same on both."""
    return source.open("rb") if isinstance(source, Path) else io.BytesIO(source)


def read_chunks(path: Path, chunk_size: int = 1 << 20) -> Iterable[bytes]:
    with path.open("rb") as handle:
        while chunk := handle.read(chunk_size):
            yield chunk


NO_SPACE = (errno.ENOSPC, errno.EDQUOT)  # the file system (or the user's quota) is full


def storage_fix(exc: OSError, folder: Path) -> str:
    """What an administrator does about ``exc``, raised while writing into ``folder``."""
    if exc.errno in NO_SPACE:
        return f"free disk space on the file system of {folder} (df -h {folder})"
    if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return f"make {folder} writable by the medgw user (ls -ld {folder})"
    return f"check {folder} and the disk under it (dmesg may show I/O errors)"
