"""A real OCSP responder for tests: ``openssl ocsp`` answering on 127.0.0.1."""

from __future__ import annotations

import http.server
import subprocess
import tempfile
import threading
from datetime import datetime
from pathlib import Path

from cryptography import x509

from gateway.pki import issue


def index_line(cert: x509.Certificate, revoked_at: datetime | None = None) -> str:
    """One line of an ``openssl ca`` index.txt: ``cert`` valid, or revoked at ``revoked_at``."""
    expiry = cert.not_valid_after_utc.strftime("%y%m%d%H%M%SZ")
    serial = f"{cert.serial_number:X}"
    if len(serial) % 2:
        serial = "0" + serial
    subject = "/" + "/".join(reversed(cert.subject.rfc4514_string().split(",")))
    if revoked_at is None:
        return f"V\t{expiry}\t\t{serial}\tunknown\t{subject}\n"
    when = revoked_at.strftime("%y%m%d%H%M%SZ")
    return f"R\t{expiry}\t{when},keyCompromise\t{serial}\tunknown\t{subject}\n"


class Responder:
    """A real OCSP responder on 127.0.0.1 only: every POST is answered by
    ``openssl ocsp -index ... -reqin ... -respout ...`` (OpenSSL 3.0's own
    server mode cannot bind to one address: ``-port`` takes a number and
    listens on all interfaces)."""

    def __init__(
        self,
        work: Path,
        ca: x509.Certificate,
        signer: issue.Issued,
        port: int,
        *,
        next_update_minutes: int | None = 10,
    ) -> None:
        """Serve the status of ``work/index.txt`` (see :func:`index_line`) for ``ca``,
        signed by ``signer``, on 127.0.0.1:``port``.  ``next_update_minutes=None``:
        responses without nextUpdate, which a client must not keep."""
        for name, obj in (
            ("ca.pem", ca),
            ("rsigner.pem", signer.certificate),
            ("rkey.pem", signer.key),
        ):
            issue.write_pem(work / name, obj)
        command = [
            "openssl",
            "ocsp",
            "-index",
            str(work / "index.txt"),
            "-CA",
            str(work / "ca.pem"),
            "-rsigner",
            str(work / "rsigner.pem"),
            "-rkey",
            str(work / "rkey.pem"),
            "-rmd",
            "sha256",
        ]
        if next_update_minutes is not None:
            command += ["-nmin", str(next_update_minutes)]
        self.requests = 0
        self.clients: list[str] = []  # the source address of each request
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length", "0"))
                request = self.rfile.read(length)
                with tempfile.TemporaryDirectory(dir=work) as tmp:
                    req, resp = Path(tmp) / "req.der", Path(tmp) / "resp.der"
                    req.write_bytes(request)
                    done = subprocess.run(
                        [*command, "-reqin", str(req), "-respout", str(resp)],
                        capture_output=True,
                        check=False,
                    )
                    body = resp.read_bytes() if done.returncode == 0 else b""
                outer.requests += 1
                outer.clients.append(self.client_address[0])
                self.send_response(200 if body else 500)
                self.send_header("Content-Type", "application/ocsp-response")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: object) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", port), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=10)
