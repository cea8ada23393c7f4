"""The demo lab's local API with two clients ("lis" and "ris"), and a client for it over
TCP or its unix socket."""

from __future__ import annotations

import http.client
import json
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from gateway.demo_run import free_port, wait_until
from gateway.intake.api import new_token
from gateway.pki.demo import DemoLayout

LIS_TOKEN, LIS_SHA = new_token()


RIS_TOKEN, RIS_SHA = new_token()


class Api:
    """A client of the local API over TCP (127.0.0.1) or the unix socket."""

    def __init__(self, port: int, socket_path: Path) -> None:
        self.port = port
        self.socket_path = socket_path

    def request(
        self,
        method: str,
        url: str,
        *,
        token: str | None,
        body: bytes | Iterator[bytes] | None = None,
        headers: dict[str, str] | None = None,
        unix: bool = False,
    ) -> tuple[int, Any]:
        connection = (
            UnixConnection(self.socket_path)
            if unix
            else http.client.HTTPConnection("127.0.0.1", self.port, timeout=120)
        )
        all_headers = dict(headers or {})
        if token is not None:
            all_headers["Authorization"] = f"Bearer {token}"
        try:
            connection.request(method, url, body, all_headers)
            response = connection.getresponse()
            return response.status, json.loads(response.read())
        finally:
            connection.close()

    def wait_final(self, message_id: str, token: str) -> dict[str, Any]:
        def final() -> dict[str, Any] | None:
            status, view = self.request("GET", f"/v1/messages/{message_id}", token=token)
            assert status == 200, view
            return view if view["final"] else None

        result: dict[str, Any] = wait_until(final, 90, f"a final state of {message_id}")
        return result


def two_delivered(api: Api) -> list[str]:
    """Two documents sent to the hospital through the local API (as "lis"), both delivered
    with a verified receipt: their message ids."""
    sent = []
    for name in ("a.hl7", "b.hl7"):
        status, view = api.request(
            "POST", f"/v1/messages?to=hospital&filename={name}", token=LIS_TOKEN, body=b"MSH|x\r"
        )
        assert status == 202, view
        sent.append(view["message_id"])
    for message_id in sent:
        final = api.wait_final(message_id, LIS_TOKEN)
        assert final["state"] == "delivered", final
        assert final["receipt"]["verified"] is True, final
    return sent


def enable_api(layout: DemoLayout) -> Api:
    """The lab gets an [api] with two clients: "lis" and "ris", both may send to the hospital."""
    port = free_port()
    config = layout.lab.config_path
    config.write_text(
        config.read_text()
        + f"""
[api]
socket = "state/api.sock"
listen = "127.0.0.1:{port}"

[[api.clients]]
name = "lis"
token_sha256 = "{LIS_SHA}"
peers = ["hospital"]

[[api.clients]]
name = "ris"
token_sha256 = "{RIS_SHA}"
peers = ["hospital"]
"""
    )
    return Api(port, layout.lab.root / "state" / "api.sock")


class UnixConnection(http.client.HTTPConnection):
    def __init__(self, path: Path) -> None:
        super().__init__("localhost", timeout=120)
        self._path = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        sock.connect(str(self._path))
        self.sock = sock
