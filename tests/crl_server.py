"""A real CRL distribution point for tests: HTTP on 127.0.0.1 serving what the test says."""

from __future__ import annotations

import http.server
import subprocess
import threading
from datetime import UTC, datetime
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

from gateway.pki import issue
from tests.ocsp_responder import index_line


class DistributionPoint:
    """``GET`` any path: ``body`` (DER), or 404 while it is None.  ``stop()`` takes it down
    (connections are then refused); ``start()`` brings it back on the same port.
    ``hold()``: requests wait for their answer (``waiting`` is set once one does) until
    ``release()``; one held past a minute (a test that never released it) is answered 503
    and counted in ``held_too_long``, so the fetch fails instead of passing unheld."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.body: bytes | None = None
        self.requests = 0
        self.clients: list[str] = []
        self.times: list[datetime] = []  # when each request came, by the wall clock
        self.waiting = threading.Event()
        self.held_too_long = 0
        self._open = threading.Event()
        self._open.set()
        self.server: http.server.ThreadingHTTPServer | None = None
        self.thread: threading.Thread | None = None
        self.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/ca.crl"

    def serve(self, crl: x509.CertificateRevocationList) -> None:
        self.body = crl.public_bytes(Encoding.DER)

    def hold(self) -> None:
        self.waiting.clear()
        self._open.clear()

    def release(self) -> None:
        self._open.set()

    def start(self) -> None:
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                if not outer._open.is_set():
                    outer.waiting.set()
                    if not outer._open.wait(60):  # bounded: a test that never releases ends
                        outer.held_too_long += 1
                        self.send_error(503)
                        return
                body = outer.body
                outer.times.append(datetime.now(UTC))
                outer.requests += 1
                outer.clients.append(self.client_address[0])
                self.send_response(200 if body is not None else 404)
                self.send_header("Content-Type", "application/pkix-crl")
                self.send_header("Content-Length", str(len(body or b"")))
                self.end_headers()
                self.wfile.write(body or b"")

            def log_message(self, format: str, *args: object) -> None:
                pass

        http.server.ThreadingHTTPServer.allow_reuse_address = True
        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def stop(self) -> None:
        if self.server is None:
            return
        self.server.shutdown()
        self.server.server_close()
        if self.thread is not None:
            self.thread.join(timeout=10)
        self.server = None


def openssl_crl(
    work: Path,
    ca: issue.Issued,
    *,
    revoked: dict[x509.Certificate, datetime],
    valid: tuple[x509.Certificate, ...] = (),
    hours: int = 24,
    seconds: int = 0,
    number: int = 1,
) -> x509.CertificateRevocationList:
    """A CRL made by ``openssl ca -gencrl`` (the reference) for ``ca``, listing ``revoked``;
    its nextUpdate ``hours`` and ``seconds`` after now."""
    work.mkdir(parents=True, exist_ok=True)
    issue.write_pem(work / "ca.pem", ca.certificate)
    issue.write_pem(work / "ca.key", ca.key)
    lines = [index_line(cert, when) for cert, when in revoked.items()]
    lines += [index_line(cert) for cert in valid]
    (work / "index.txt").write_text("".join(lines))
    (work / "index.txt.attr").write_text("unique_subject = no\n")
    (work / "crlnumber").write_text(f"{number:02X}\n")
    (work / "ca.cnf").write_text(
        "[ca]\ndefault_ca = test\n[test]\n"
        f"database = {work / 'index.txt'}\ncrlnumber = {work / 'crlnumber'}\n"
        "default_md = sha256\n"
        f"default_crl_hours = {hours}\n"
    )
    out = work / "ca.crl"
    subprocess.run(
        [
            "openssl", "ca", "-gencrl", "-batch",
            "-config", str(work / "ca.cnf"),
            "-cert", str(work / "ca.pem"),
            "-keyfile", str(work / "ca.key"),
            "-out", str(out),
            *(("-crlsec", str(seconds)) if seconds else ()),
        ],
        check=True,
        capture_output=True,
    )  # fmt: skip
    return x509.load_pem_x509_crl(out.read_bytes())
