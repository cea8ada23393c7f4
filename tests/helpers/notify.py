"""A systemd notification socket (sd_notify) that records what the daemon tells it."""

from __future__ import annotations

import socket
import threading
from pathlib import Path


class NotifySocket:
    """Plays systemd's side of sd_notify: a datagram socket collecting messages."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.messages: list[str] = []
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self._sock.bind(str(path))
        self._sock.settimeout(0.2)
        self._running = True
        self._thread = threading.Thread(target=self._collect, daemon=True)
        self._thread.start()

    def _collect(self) -> None:
        while self._running:
            try:
                self.messages.append(self._sock.recv(4096).decode())
            except TimeoutError:
                continue

    def states(self) -> list[str]:
        return [line for message in self.messages for line in message.splitlines()]

    def close(self) -> None:
        """Stop listening; what was sent before (by a daemon that has exited: all it sent)
        is in ``messages`` then."""
        self._running = False
        self._thread.join()
        self._sock.setblocking(False)
        while True:
            try:
                self.messages.append(self._sock.recv(4096).decode())
            except BlockingIOError:
                break
        self._sock.close()
