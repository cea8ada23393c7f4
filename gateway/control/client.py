"""The command-line side of the control socket (synchronous HTTP over a unix socket)."""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import socket
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote

from gateway.errors import MedgwError


def claimed_operator() -> str:
    """The login name this command says it runs for: sudo's SUDO_USER, else USER.
    Unverified (only sudo's own log can vouch for it): the actor shows it as claimed
    beside the account the kernel reports (gateway.control.server.operator)."""
    return os.environ.get("SUDO_USER") or os.environ.get("USER") or ""


class NotRunningError(MedgwError):
    """The daemon's control socket is not there or nobody answers."""


class RefusedError(MedgwError):
    """The daemon answered and refused the request; ``status`` is its HTTP status."""

    def __init__(self, message: str, *, fix: str | None, status: int) -> None:
        super().__init__(message, fix=fix)
        self.status = status


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
        return self._exchange(
            method, url, json.dumps(body or {}).encode(), {"Content-Type": "application/json"}
        )

    def upload(
        self,
        url: str,
        path: Path,
        content_type: str,
        progress: Callable[[int], None] = lambda _sent: None,
        timeout: float = 3600,
        extra_headers: dict[str, str] | None = None,
    ) -> Any:
        """POST the file at ``path`` as the body, streamed in chunks (any size).  A file
        that cannot be read (gone, a folder, an I/O error) raises an error naming it, never
        taken for the daemon's: the request ends short, and the daemon keeps nothing."""

        def unreadable(exc: OSError) -> MedgwError:
            return MedgwError(
                f"cannot read {path}: {exc.strerror or exc}; nothing was spooled",
                fix="check the file (it must stay in place until the command ends), then "
                "send it again",
            )

        try:
            size = path.stat().st_size
        except OSError as exc:
            raise unreadable(exc) from None

        def chunks() -> Iterator[bytes]:
            sent = 0
            try:
                with path.open("rb") as handle:
                    while chunk := handle.read(1 << 20):
                        yield chunk
                        sent += len(chunk)
                        progress(sent)
            except OSError as exc:
                raise unreadable(exc) from None

        headers = {"Content-Type": content_type, "Content-Length": str(size)}
        return self._exchange("POST", url, chunks(), headers | (extra_headers or {}), timeout)

    def _exchange(
        self,
        method: str,
        url: str,
        body: bytes | Iterator[bytes],
        headers: dict[str, str],
        timeout: float | None = None,
    ) -> Any:
        connection = _UnixConnection(self.path, timeout or self.timeout)
        # Percent-encoded: any name (non-ASCII, or with control characters) fits a header.
        headers = {"X-Medgw-Operator": quote(claimed_operator()[:64], safe=""), **headers}
        try:
            # The daemon may refuse before reading everything: then its answer says why.
            with contextlib.suppress(BrokenPipeError, ConnectionResetError):
                connection.request(method, url, body, headers)
            try:
                response = connection.getresponse()
                raw = response.read()
            except (http.client.HTTPException, ConnectionError) as exc:
                raise MedgwError(
                    f"the gateway closed the connection on {self.path} without an answer",
                    fix="look at the daemon's log (journalctl -u medgw) and try again",
                ) from exc
        except TimeoutError as exc:
            raise MedgwError(
                f"no answer from the gateway on {self.path} within "
                f"{connection.timeout:g} seconds; it may still be doing what was asked",
                fix="look at the audit trail (medgw audit query) and the daemon's log "
                "(journalctl -u medgw) for its outcome before asking again",
            ) from exc
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
        data = _answer(raw, response.status)
        if response.status >= 400:
            said = data if isinstance(data, dict) else {}
            error, fix = said.get("error") or f"HTTP {response.status}", said.get("fix")
            raise RefusedError(
                str(error), fix=fix if isinstance(fix, str) else None, status=response.status
            )
        return data


def _answer(raw: bytes, status: int) -> Any:
    """The daemon's JSON answer; an error answered without one (an internal error is
    answered ``500 internal error`` in plain text, saying nothing more) as its text."""
    try:
        return json.loads(raw or b"null")
    except ValueError:
        if status < 400:
            raise MedgwError(
                f"the gateway's answer (HTTP {status}) is not JSON",
                fix="check that medgw and this command are the same version",
            ) from None
        text = raw.decode("utf-8", "replace").strip()[:200] or f"HTTP {status}"
        return {"error": text, "fix": "look at the daemon's log (journalctl -u medgw)"}
