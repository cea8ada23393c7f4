"""The command-line side of the control socket (synchronous HTTP over a unix socket)."""

from __future__ import annotations

import http.client
import json
import os
import socket
from pathlib import Path
from typing import Any

from gateway.errors import MedgwError


class NotRunningError(MedgwError):
    """The daemon's control socket is not there or nobody answers."""


class _UnixConnection(http.client.HTTPConnection):
    def __init__(self, path: Path, timeout: float) -> None:
        super().__init__("localhost", timeout=timeout)
        self._path = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        sock.connect(str(self._path))
        self.sock = sock


class ControlClient:
    def __init__(self, path: Path, timeout: float = 30) -> None:
        self.path = path
        self.timeout = timeout

    def call(self, method: str, url: str, body: dict[str, Any] | None = None) -> Any:
        connection = _UnixConnection(self.path, self.timeout)
        operator = os.environ.get("SUDO_USER") or os.environ.get("USER") or ""
        headers = {"X-Medgw-Operator": operator, "Content-Type": "application/json"}
        try:
            connection.request(method, url, json.dumps(body or {}).encode(), headers)
            response = connection.getresponse()
            data = json.loads(response.read() or b"null")
        except (FileNotFoundError, ConnectionRefusedError) as exc:
            raise NotRunningError(
                f"medgw is not running (no answer on {self.path})",
                fix="start it (systemctl start medgw), or check --config points at its config",
            ) from exc
        except PermissionError as exc:
            raise NotRunningError(
                f"no permission to use {self.path}",
                fix="run the command as the medgw user (sudo -u medgw medgw ...)",
            ) from exc
        finally:
            connection.close()
        if response.status >= 400:
            raise MedgwError(str(data.get("error")), fix=data.get("fix"))
        return data
