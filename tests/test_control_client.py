"""The control socket's client against a real Unix socket: what it says when the
document it uploads cannot be read, and when an error answer carries no error object."""

from __future__ import annotations

import socket
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from gateway.control.client import ControlClient, NotRunningError, RefusedError
from gateway.errors import MedgwError


@pytest.fixture
def listening(tmp_path: Path) -> Iterator[Path]:
    """A socket that takes connections (in its backlog) and never answers."""
    path = tmp_path / "control.sock"
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(str(path))
    server.listen(4)
    yield path
    server.close()


def answering(tmp_path: Path, raw: bytes) -> tuple[Path, threading.Thread]:
    """A socket whose one connection is answered ``raw`` once its request is read."""
    path = tmp_path / "answer.sock"
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(str(path))
    server.listen(1)

    def serve() -> None:
        with server:
            connection, _ = server.accept()
            with connection:
                request = b""
                while b"\r\n\r\n" not in request:
                    request += connection.recv(65536)
                head, _, body = request.partition(b"\r\n\r\n")
                length = next(
                    int(line.split(b":")[1])
                    for line in head.split(b"\r\n")
                    if line.lower().startswith(b"content-length:")
                )
                while len(body) < length:
                    body += connection.recv(65536)
                connection.sendall(raw)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    return path, thread


def test_a_document_that_cannot_be_read_is_named_not_taken_for_a_stopped_daemon(
    listening: Path, tmp_path: Path
) -> None:
    folder = tmp_path / "not-a-file"
    folder.mkdir()
    client = ControlClient(listening, timeout=5)
    with pytest.raises(MedgwError) as raised:
        client.upload("/v1/messages?to=lab", folder, "application/octet-stream")
    assert not isinstance(raised.value, NotRunningError)
    assert raised.value.__cause__ is None  # not a lost answer (medgw send: exit 1, not 3)
    assert f"cannot read {folder}" in raised.value.message
    assert "nothing was spooled" in raised.value.message


def test_a_document_gone_before_the_upload_is_named(listening: Path, tmp_path: Path) -> None:
    client = ControlClient(listening, timeout=5)
    with pytest.raises(MedgwError) as raised:
        client.upload("/v1/messages?to=lab", tmp_path / "gone.hl7", "application/hl7-v2")
    assert not isinstance(raised.value, NotRunningError)
    assert "cannot read" in raised.value.message


@pytest.mark.parametrize("body", [b"null", b"[1, 2]", b'"text"'])
def test_an_error_answer_without_an_error_object_is_told_by_its_status(
    tmp_path: Path, body: bytes
) -> None:
    raw = (
        b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\n"
        b"Content-Length: %d\r\nConnection: close\r\n\r\n%s" % (len(body), body)
    )
    path, server = answering(tmp_path, raw)
    with pytest.raises(RefusedError) as raised:
        ControlClient(path, timeout=5).call("GET", "/v1/status")
    server.join(5)
    assert raised.value.status == 503
    assert raised.value.message == "HTTP 503"


def test_no_answer_in_time_is_said_with_where_to_look(listening: Path) -> None:
    """A daemon that takes the request and does not answer within the client's time: the
    command says so, that it may still be at work, and where its outcome is recorded,
    instead of a bare timeout."""
    with pytest.raises(MedgwError) as raised:
        ControlClient(listening, timeout=0.2).call("POST", "/v1/backup", {"to": "/x"})
    error = raised.value
    assert not isinstance(error, NotRunningError)
    assert "no answer from the gateway" in error.message and "within 0.2 seconds" in error.message
    assert error.fix is not None and "audit" in error.fix
