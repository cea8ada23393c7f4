"""A proxy between the spool and PostgreSQL that loses a connection at its COMMIT.

It listens on a Unix socket of its own (a ``socket_dir`` for the spool's settings)
and passes each connection through to the server's socket, reading the
client's protocol messages as they pass (no TLS on a Unix socket).  Armed with
:meth:`CommitCut.cut`, it ends the next connection that sends ``COMMIT`` (a query,
or the execution of a statement prepared from it):
``"before"`` the server sees it (the transaction is rolled back), or ``"after"``
the server has answered it (committed) without the answer reaching the client.
With ``refuse`` set it closes every new connection at once, as a server that
has gone away; with ``hang`` set it holds every new one without an answer, as a
path to the server that has gone silent (libpq waits its connect_timeout), and
:meth:`drop` ends the connections already made.
"""

from __future__ import annotations

import contextlib
import socket
import struct
import threading
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest

from gateway.clock import SystemClock
from gateway.spool.postgres import PostgresSettings, PostgresSpool


def commit_cut() -> object:
    """The fixture ``cut``, a :class:`CommitCut` in front of the test's database, for a
    test module to take as its own: ``cut = commit_cut()``."""

    @pytest.fixture
    def cut(postgres: PostgresSettings, tmp_path: Path) -> Iterator[CommitCut]:
        assert postgres.socket_dir is not None
        proxy = CommitCut(tmp_path / "cut", postgres.socket_dir, postgres.port)
        yield proxy
        proxy.close()

    return cut


def spool_behind_a_cut(connect_timeout: int) -> tuple[object, object]:
    """The fixtures ``cut`` (as :func:`commit_cut`) and ``spool`` (a
    :class:`PostgresSpool` on the test's database through it, waiting at most
    ``connect_timeout`` seconds for a connection), for a test module to take as its
    own: ``cut, spool = spool_behind_a_cut(3)``."""
    cut = commit_cut()

    @pytest.fixture
    def spool(postgres: PostgresSettings, cut: CommitCut) -> Iterator[PostgresSpool]:
        settings = replace(postgres, socket_dir=cut.socket_dir, connect_timeout=connect_timeout)
        handle = PostgresSpool(settings, SystemClock())
        yield handle
        handle.close()

    return cut, spool


class CommitCut:
    def __init__(self, folder: Path, server_socket_dir: Path, port: int) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        self.socket_dir = folder
        self._target = str(server_socket_dir / f".s.PGSQL.{port}")
        self._listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._listener.bind(str(folder / f".s.PGSQL.{port}"))
        self._listener.listen(64)
        self._lock = threading.Lock()
        self._armed: str | None = None
        self.refuse = False
        self.hang = False
        self._links: list[_Link] = []
        self._held: list[socket.socket] = []
        self.cuts = 0  # connections ended at a COMMIT
        threading.Thread(target=self._accept, daemon=True).start()

    def cut(self, when: str) -> None:
        """End the next connection sending COMMIT, ``"before"`` or ``"after"`` it."""
        assert when in ("before", "after")
        with self._lock:
            self._armed = when

    def drop(self) -> None:
        """End every connection passed through so far."""
        with self._lock:
            links, self._links = self._links, []
        for link in links:
            link.end()

    def close(self) -> None:
        self._listener.close()
        self.drop()
        for held in self._held:
            held.close()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            if self.refuse:
                client.close()
                continue
            if self.hang:
                self._held.append(client)
                continue
            server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            server.connect(self._target)
            link = _Link(self, client, server)
            with self._lock:
                self._links.append(link)
            threading.Thread(target=link.upstream, daemon=True).start()
            threading.Thread(target=link.downstream, daemon=True).start()

    def _take(self) -> str | None:
        with self._lock:
            when, self._armed = self._armed, None
            if when is not None:
                self.cuts += 1
            return when


class _Link:
    def __init__(self, cut: CommitCut, client: socket.socket, server: socket.socket) -> None:
        self._cut = cut
        self._client = client
        self._server = server
        self._holding = False  # the server's answers are no longer passed on
        self._prepared_commits: set[bytes] = set()  # the statements that are a COMMIT

    def end(self) -> None:
        for sock in (self._client, self._server):
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()

    def _read(self, count: int) -> bytes:
        data = b""
        while len(data) < count:
            more = self._client.recv(count - len(data))
            if not more:
                raise ConnectionError("client closed")
            data += more
        return data

    def _commits(self, message: bytes) -> bool:
        """Whether ``message`` runs a COMMIT: as a simple query, or as the Bind of a
        statement prepared from one (psycopg prepares a statement it has run a few times
        on a connection, COMMIT too, and then only binds and executes it)."""
        kind, body = message[:1], message[5:]
        if kind == b"Q":
            return body.upper().startswith(b"COMMIT")
        if kind == b"P":  # Parse: the statement's name, then its text
            name, text, _ = body.split(b"\0", 2)
            if text.upper().startswith(b"COMMIT"):
                self._prepared_commits.add(name)
            else:
                self._prepared_commits.discard(name)
        if kind == b"B":  # Bind: the portal's name, then the statement's
            _, name, _ = body.split(b"\0", 2)
            return name in self._prepared_commits
        return False

    def upstream(self) -> None:
        """Client to server, message by message (the first is the startup message)."""
        try:
            (length,) = struct.unpack("!I", self._read(4))
            self._server.sendall(struct.pack("!I", length) + self._read(length - 4))
            while True:
                head = self._read(5)
                (length,) = struct.unpack("!I", head[1:])
                message = head + self._read(length - 4)
                if self._commits(message):
                    when = self._cut._take()
                    if when == "before":
                        self.end()
                        return
                    if when == "after":
                        self._holding = True
                self._server.sendall(message)
        except OSError:
            self.end()

    def downstream(self) -> None:
        """Server to client; once holding, the first answer (COMMIT's) ends both."""
        try:
            while data := self._server.recv(65536):
                if self._holding:
                    break
                self._client.sendall(data)
        except OSError:
            pass
        self.end()
