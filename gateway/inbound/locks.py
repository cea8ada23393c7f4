"""What keeps concurrent receiving requests apart, and what they share."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager

from gateway.fsutil import FolderSync


class InboundLocks:
    """What keeps concurrent requests apart, shared by every InboundProcessor of a
    daemon: a reload makes a new processor while requests on the old one go on."""

    def __init__(self) -> None:
        # Held while a new document's inbox file is chosen and claimed: two documents
        # with one name never share a target.
        self.target = threading.Lock()
        # Documents delivered into one inbox folder at the same moment share its fsync.
        self.folders = FolderSync()
        self._guard = threading.Lock()
        self._busy: dict[tuple[str, str], tuple[threading.Lock, list[int]]] = {}

    @contextmanager
    def exclusive(self, key: tuple[str, str]) -> Iterator[None]:
        """One request per ``key`` (peer, Message-ID) at a time."""
        with self._guard:
            lock, users = self._busy.setdefault(key, (threading.Lock(), [0]))
            users[0] += 1
        try:
            with lock:
                yield
        finally:
            with self._guard:
                users[0] -= 1
                if users[0] == 0:
                    del self._busy[key]
