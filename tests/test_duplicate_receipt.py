"""A peer that answers a resend with ``processed/warning: duplicate-document`` and no MIC.

Some AS2 products do this when the receipt of the first attempt was lost.  The
first attempt did reach them, so the message is delivered, with a warning that
the content check rests on that attempt; on a first attempt the same answer is
suspicious and the message fails.
"""

from __future__ import annotations

import ssl
import threading
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from gateway.as2.mdn import DISPOSITION_PREFIX
from gateway.cms.mime import make_entity, parse_entity
from gateway.cms.smime import sign_entity
from gateway.config import load_config
from gateway.demo_run import drop_file, read_audit, wait_until
from gateway.pki.demo import DemoLayout
from gateway.policy import AlgorithmPolicy


def duplicate_mdn(layout: DemoLayout, message_id: str) -> tuple[str, bytes]:
    hospital = load_config(layout.hospital.config_path)
    notification = (
        "Reporting-UA: other-as2-product\r\n"
        f"Original-Message-ID: {message_id}\r\n"
        f"Disposition: {DISPOSITION_PREFIX}; processed/Warning: duplicate-document\r\n"
    ).encode()
    report = make_entity(
        'multipart/report; report-type=disposition-notification; boundary="b1"',
        b"--b1\r\n"
        + make_entity("text/plain", b"duplicate\r\n")
        + b"\r\n--b1\r\n"
        + make_entity("message/disposition-notification", notification)
        + b"\r\n--b1--\r\n",
    )
    signed = sign_entity(
        report,
        hospital.smime.signing.certificate,
        hospital.smime.signing.key,
        digest="sha256",
        signing_time=datetime.now(UTC),
        policy=AlgorithmPolicy(),
    )
    headers, body = parse_entity(signed)
    return dict(headers)["Content-Type"], body


def serve(layout: DemoLayout, drop_first: bool) -> tuple[ThreadingHTTPServer, list[str]]:
    seen: list[str] = []

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            self.rfile.read(int(self.headers["Content-Length"]))
            message_id = self.headers["Message-ID"]
            seen.append(message_id)
            if drop_first and len(seen) == 1:
                self.close_connection = True
                self.connection.close()  # the receipt of the first attempt is lost
                return
            content_type, body = duplicate_mdn(layout, message_id)
            self.send_response(200)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: Any) -> None:
            pass

    certs = layout.hospital.root / "certs"
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(certs / "tls.crt", certs / "tls.key")
    context.load_verify_locations(layout.ca_certificate)
    context.verify_mode = ssl.CERT_REQUIRED
    server = ThreadingHTTPServer(("127.0.0.1", layout.hospital.port), Handler)
    server.socket = context.wrap_socket(server.socket, server_side=True)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, seen


def events(path: Path, name: str) -> list[dict[str, Any]]:
    return [r for r in read_audit(path) if r["event"] == name]


def test_duplicate_warning_on_a_resend_is_delivered_with_a_warning(
    layout: DemoLayout, processes: Any
) -> None:
    server, seen = serve(layout, drop_first=True)
    try:
        processes.start(layout.lab.config_path)
        drop_file(layout.lab.outbox_dir / "hospital", "twice.hl7", b"MSH|x\r")
        [receipt] = wait_until(
            lambda: events(layout.lab.audit_log, "receipt.received"), 60, "the duplicate receipt"
        )
    finally:
        server.shutdown()
        server.server_close()
    assert len(seen) == 2 and seen[0] == seen[1]
    assert receipt["severity"] == "warning" and receipt["detail"]["mic_verified"] is False
    assert "already has this document" in receipt["reason"]


def test_duplicate_warning_on_a_first_attempt_is_a_failure(
    layout: DemoLayout, processes: Any
) -> None:
    server, seen = serve(layout, drop_first=False)
    try:
        processes.start(layout.lab.config_path)
        drop_file(layout.lab.outbox_dir / "hospital", "once.hl7", b"MSH|x\r")
        [failed] = wait_until(
            lambda: events(layout.lab.audit_log, "message.failed"), 60, "the failure"
        )
    finally:
        server.shutdown()
        server.server_close()
    assert len(seen) == 1
    assert "duplicate-document" in failed["reason"]
    assert not events(layout.lab.audit_log, "receipt.received")
