"""A peer that answers a resend with ``processed/warning: duplicate-document`` and no MIC.

Some AS2 products do this when the receipt of the first attempt was lost.  The
first attempt did reach them, so the message is delivered, with a warning that
the content check rests on that attempt; on a first attempt the same answer is
suspicious and the message fails.
"""

from __future__ import annotations

import ssl
import threading
import time
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest

from gateway.as2.mdn import DISPOSITION_PREFIX
from gateway.cms.mime import make_entity, parse_entity
from gateway.cms.smime import sign_entity
from gateway.config import load_config
from gateway.demo_run import drop_file
from gateway.pki.demo import DemoLayout
from gateway.policy import AlgorithmPolicy
from tests.helpers.audit import events, wait_for_events


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


def serve(
    layout: DemoLayout, drop_first: bool, split: str | None = None
) -> tuple[ThreadingHTTPServer, list[str]]:
    """A stand-in for the hospital answering with a signed duplicate-document receipt.

    ``split``: the receipt comes in two pieces 0.2 s apart, as two TLS records of
    a Content-Length body (``"length"``) or as two HTTP chunks (``"chunked"``).
    """
    seen: list[str] = []

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1" if split == "chunked" else "HTTP/1.0"

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
            half = len(body) // 2
            if split == "chunked":
                self.send_header("Transfer-Encoding", "chunked")
                self.send_header("Connection", "close")
                self.end_headers()
                pieces = [b"%x\r\n%s\r\n" % (len(p), p) for p in (body[:half], body[half:])]
                pieces[-1] += b"0\r\n\r\n"
            else:
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                pieces = [body[:half], body[half:]] if split else [body]
            for number, piece in enumerate(pieces):
                if number:
                    time.sleep(0.2)  # the rest comes a moment later
                self.wfile.write(piece)
                self.wfile.flush()
            self.close_connection = True

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


def test_duplicate_warning_on_a_resend_is_delivered_with_a_warning(
    layout: DemoLayout, processes: Any
) -> None:
    server, seen = serve(layout, drop_first=True)
    try:
        processes.start(layout.lab.config_path)
        drop_file(layout.lab.outbox_dir / "hospital", "twice.hl7", b"MSH|x\r")
        [receipt] = wait_for_events(layout.lab.audit_log, "receipt.received")
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
        [failed] = wait_for_events(layout.lab.audit_log, "message.failed")
    finally:
        server.shutdown()
        server.server_close()
    assert len(seen) == 1
    assert "duplicate-document" in failed["reason"]
    assert not events(layout.lab.audit_log, "receipt.received")


@pytest.mark.parametrize("split", ["length", "chunked"])
def test_a_receipt_that_arrives_in_pieces_is_read_whole(
    layout: DemoLayout, processes: Any, split: str
) -> None:
    """The receipt is read to its end, not only the part that has arrived so far."""
    server, seen = serve(layout, drop_first=True, split=split)
    try:
        processes.start(layout.lab.config_path)
        drop_file(layout.lab.outbox_dir / "hospital", "pieces.hl7", b"MSH|x\r")
        [receipt] = wait_for_events(layout.lab.audit_log, "receipt.received")
    finally:
        server.shutdown()
        server.server_close()
    assert len(seen) == 2
    assert receipt["detail"]["disposition"].endswith("duplicate-document")
    assert not events(layout.lab.audit_log, "receipt.invalid")
    assert not events(layout.lab.audit_log, "message.failed")
