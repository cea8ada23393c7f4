"""The names of the files made in a folder, as the kernel reports them (inotify): also
those made and removed again between two looks at the folder's listing."""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import struct
from pathlib import Path
from types import TracebackType

IN_CREATE = 0x100
IN_NONBLOCK = os.O_NONBLOCK
_EVENT = struct.Struct("iIII")  # wd, mask, cookie, len; then len bytes of name

_libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)


class Created:
    """Files made in ``folders`` from now on, read with :meth:`names` (a context
    manager: the watch is closed at its end)."""

    def __init__(self, *folders: Path) -> None:
        self._fd = _libc.inotify_init1(IN_NONBLOCK)
        if self._fd < 0:
            raise OSError(ctypes.get_errno(), "inotify_init1")
        self._folders: dict[int, Path] = {}
        for folder in folders:
            wd = _libc.inotify_add_watch(self._fd, os.fsencode(folder), IN_CREATE)
            if wd < 0:
                raise OSError(ctypes.get_errno(), "inotify_add_watch", str(folder))
            self._folders[wd] = folder

    def names(self) -> list[Path]:
        """The files made since the last call (every event the kernel has queued: the
        calls that made them have returned)."""
        made: list[Path] = []
        while True:
            try:
                data = os.read(self._fd, 65536)
            except BlockingIOError:
                return made
            at = 0
            while at < len(data):
                wd, _mask, _cookie, size = _EVENT.unpack_from(data, at)
                at += _EVENT.size
                name = data[at : at + size].rstrip(b"\0")
                at += size
                made.append(self._folders[wd] / os.fsdecode(name))

    def __enter__(self) -> Created:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        value: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        os.close(self._fd)
