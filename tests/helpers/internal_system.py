"""The hospital's internal system on the other side of the HTTP hand-over (a real
HTTP server), and the configuration that hands documents over to it; the services a peer
may send and receive."""

from __future__ import annotations

import http.server
import threading
from typing import Any

from gateway.pki.demo import DemoLayout


def set_services(layout: DemoLayout, *, hospital_accepts: str, lab_sends: str) -> None:
    """``services = [...]`` in the hospital's file for the lab and the lab's for the hospital."""
    for path, value in (
        (layout.hospital.root / "peers.d" / "lab.toml", hospital_accepts),
        (layout.lab.root / "peers.d" / "hospital.toml", lab_sends),
    ):
        text = path.read_text()
        assert "\nservices = []\n" in text
        path.write_text(text.replace("\nservices = []\n", f"\nservices = {value}\n"))


class InternalSystem:
    """A little HTTP server: answers 503 to the first ``fail`` POSTs, then 200."""

    def __init__(self, port: int, fail: int = 0) -> None:
        self.port = port
        self.fail = fail
        self.requests: list[tuple[str, dict[str, str], bytes, int]] = []
        self._lock = threading.Lock()
        system = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                length = int(self.headers["Content-Length"])
                body = self.rfile.read(length)
                with system._lock:
                    status = 503 if system.fail > 0 else 200
                    system.fail -= 1
                    system.requests.append((self.path, dict(self.headers), body, status))
                self.send_response(status)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", port), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def ok(self) -> list[tuple[str, dict[str, str], bytes, int]]:
        with self._lock:
            return [r for r in self.requests if r[3] == 200]

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def enable_delivery(layout: DemoLayout, port: int, *, referrals: bool = False) -> None:
    """The hospital POSTs to /inbound; with ``referrals``, that service to /referrals."""
    override = f"""
[[delivery.services]]
name = "referrals"
http_url = "http://127.0.0.1:{port}/referrals"
"""
    config = layout.hospital.config_path
    config.write_text(
        config.read_text()
        + f"""
[delivery]
http_url = "http://127.0.0.1:{port}/inbound"
timeout_seconds = 5
"""
        + (override if referrals else "")
    )
