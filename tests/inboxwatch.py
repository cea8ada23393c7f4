"""Watches a folder tree every few milliseconds and reports any file written twice.

An internal system takes documents from the inbox as they appear: a document
must appear once, complete, and never be written again (same name, new inode,
size or modification time).
"""

from __future__ import annotations

import os
import threading
from pathlib import Path


class InboxWatch:
    def __init__(self, folder: Path, interval: float = 0.003) -> None:
        self.folder = folder
        self.interval = interval
        self.seen: dict[str, tuple[int, int, int]] = {}  # path -> (inode, size, mtime_ns)
        self.rewritten: list[str] = []
        self.looks = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> InboxWatch:
        self.look()  # what is there already is the reference
        self._thread.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self._stop.set()
        self._thread.join(10)
        self.look()

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.look()

    def look(self) -> None:
        for directory, _folders, files in os.walk(self.folder):
            for name in files:
                if name.startswith("."):
                    continue  # a work file: not a document yet
                path = os.path.join(directory, name)
                try:
                    st = os.stat(path, follow_symlinks=False)
                except FileNotFoundError:
                    continue
                now = (st.st_ino, st.st_size, st.st_mtime_ns)
                before = self.seen.setdefault(path, now)
                if before != now:
                    self.rewritten.append(f"{path}: {before} -> {now}")
                    self.seen[path] = now
        self.looks += 1
