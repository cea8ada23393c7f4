"""Outbound messages when the configuration changes under them, or operators act on them."""

from __future__ import annotations

import json
import signal
import ssl
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from gateway.clock import SystemClock
from gateway.demo_run import drop_file, wait_until
from gateway.pki.demo import DemoLayout
from gateway.spool import SqliteSpool
from tests.cli import medgw
from tests.helpers.audit import events, wait_for_events
from tests.helpers.demo import hospital_post, hospital_receipt, set_runtime


def queue(config: Path, *args: str) -> Any:
    result = medgw("queue", *args, "--config", str(config), "--json")
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def peers(config: Path, *args: str) -> None:
    result = medgw("peers", *args, "--config", str(config))
    assert result.returncode == 0, result.stderr


def set_async_receipt_url(layout: DemoLayout, url: str) -> None:
    peer_file = layout.lab.root / "peers.d" / "hospital.toml"
    lines = peer_file.read_text().splitlines()
    out = [
        f"async_receipt_url = {url!r}" if line.startswith("async_receipt_url =") else line
        for line in lines
    ]
    assert out != lines
    peer_file.write_text("\n".join(out) + "\n")


def reload(proc: Any, audit_log: Path) -> None:
    before = len(events(audit_log, "config.reloaded"))
    proc.signal(signal.SIGHUP)
    wait_for_events(audit_log, "config.reloaded", count=before + 1)


def test_a_message_that_asked_for_an_async_receipt_waits_for_it_after_the_peer_is_made_sync(
    layout: DemoLayout, processes: Any
) -> None:
    # Signed and encrypted while the lab asked the hospital for asynchronous receipts;
    # the lab's administrator switches to synchronous ones before it is sent.
    set_async_receipt_url(layout, f"https://127.0.0.1:{layout.lab.port}/as2")
    processes.start(layout.hospital.config_path)
    lab = processes.start(layout.lab.config_path)
    peers(layout.lab.config_path, "suspend", "hospital", "--reason", "switching receipts")
    drop_file(layout.lab.outbox_dir / "hospital", "switch.hl7", b"MSH|switch\r")
    [record] = wait_until(
        lambda: queue(layout.lab.config_path, "list", "--state", "queued"), 30, "queued"
    )
    set_async_receipt_url(layout, "")
    reload(lab, layout.lab.audit_log)
    peers(layout.lab.config_path, "resume", "hospital")
    wait_for_events(layout.lab.audit_log, ("receipt.received", "receipt.invalid"))
    # The message asked for its receipt later: the empty 200 is not an invalid receipt.
    assert not events(layout.lab.audit_log, "receipt.invalid")
    # The receipt may come back before the lab has recorded the message as sent.
    [sent] = wait_for_events(layout.lab.audit_log, "message.sent")
    assert sent["detail"]["receipt"] == "async"
    shown = queue(layout.lab.config_path, "show", record["message_id"])
    assert shown["state"] == "delivered" and shown["disposition"] == "processed"


def test_retry_of_a_message_to_a_peer_no_longer_configured_is_refused_and_says_why(
    layout: DemoLayout, processes: Any
) -> None:
    set_runtime(layout.lab.config_path, "max_attempts", "1")
    lab = processes.start(layout.lab.config_path)  # the hospital is down
    drop_file(layout.lab.outbox_dir / "hospital", "gone.hl7", b"MSH|gone\r")
    wait_for_events(layout.lab.audit_log, "message.dead")
    [record] = queue(layout.lab.config_path, "list", "--state", "dead")
    (layout.lab.root / "peers.d" / "hospital.toml").unlink()  # the exchange has ended
    reload(lab, layout.lab.audit_log)
    retried = medgw("queue", "retry", record["message_id"], "--config", str(layout.lab.config_path))
    # Nobody would ever send it: not "retry done, now queued".
    assert retried.returncode == 1
    assert "hospital" in retried.stderr and "no longer configured" in retried.stderr
    assert "fix:" in retried.stderr
    assert queue(layout.lab.config_path, "show", record["message_id"])["state"] == "dead"
    assert not events(layout.lab.audit_log, "message.retried")
    # It can still be withdrawn.
    cancelled = medgw(
        "queue", "cancel", record["message_id"], "--config", str(layout.lab.config_path)
    )
    assert cancelled.returncode == 0, cancelled.stderr


def serve_as_hospital(
    layout: DemoLayout, handler: type[BaseHTTPRequestHandler]
) -> ThreadingHTTPServer:
    """``handler`` on the hospital's port, with its TLS certificate, clients' required."""
    certs = layout.hospital.root / "certs"
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(certs / "tls.crt", certs / "tls.key")
    context.load_verify_locations(layout.ca_certificate)
    context.verify_mode = ssl.CERT_REQUIRED
    server = ThreadingHTTPServer(("127.0.0.1", layout.hospital.port), handler)
    server.socket = context.wrap_socket(server.socket, server_side=True)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def receipt_first_peer(layout: DemoLayout) -> tuple[ThreadingHTTPServer, list[bytes]]:
    """A stand-in for the hospital that POSTs the asynchronous receipt before it answers
    the message's own request (AS2 products that process at once may do so)."""
    answers: list[bytes] = []

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.0"

        def do_POST(self) -> None:
            self.rfile.read(int(self.headers["Content-Length"]))
            message_id = self.headers["Message-ID"]
            assert self.headers["Receipt-Delivery-Option"]
            spool = SqliteSpool(layout.lab.root / "state" / "spool.sqlite3", SystemClock())
            try:
                record = spool.get(message_id)
            finally:
                spool.close()
            assert record is not None
            built = hospital_receipt(layout, message_id, record.mic)
            answer = hospital_post(layout, built.headers, built.body)
            answers.append(answer.body)
            self.send_response(200)
            self.send_header("Content-Length", "0")
            self.end_headers()
            self.close_connection = True

        def log_message(self, format: str, *args: Any) -> None:
            pass

    server = serve_as_hospital(layout, Handler)
    return server, answers


def test_an_async_receipt_that_arrives_before_the_answer_to_the_send_settles_the_message(
    layout: DemoLayout, processes: Any
) -> None:
    set_async_receipt_url(layout, f"https://127.0.0.1:{layout.lab.port}/as2")
    server, answers = receipt_first_peer(layout)
    try:
        processes.start(layout.lab.config_path)
        drop_file(layout.lab.outbox_dir / "hospital", "quick.hl7", b"MSH|quick\r")
        wait_until(lambda: answers, 30, "the receipt")
        [sent] = wait_for_events(layout.lab.audit_log, "message.sent")
        wait_until(
            lambda: queue(layout.lab.config_path, "show", sent["message_id"])["state"] != "sending",
            30,
            "the end of the send",
        )
    finally:
        server.shutdown()
        server.server_close()
    assert answers == [b"receipt accepted\n"]
    [received] = wait_for_events(layout.lab.audit_log, ("receipt.received", "receipt.invalid"))
    assert received["event"] == "receipt.received", received
    assert received["detail"]["mic_verified"] is True
    shown = queue(layout.lab.config_path, "show", sent["message_id"])
    assert shown["state"] == "delivered" and shown["disposition"] == "processed"


def quiet_async_peer(layout: DemoLayout) -> tuple[ThreadingHTTPServer, list[str]]:
    """A stand-in for the hospital that takes each message and says its receipt will come
    later (an empty 200); the test POSTs that receipt when it wants to."""
    seen: list[str] = []

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.0"

        def do_POST(self) -> None:
            self.rfile.read(int(self.headers["Content-Length"]))
            seen.append(self.headers["Message-ID"])
            self.send_response(200)
            self.send_header("Content-Length", "0")
            self.end_headers()
            self.close_connection = True

        def log_message(self, format: str, *args: Any) -> None:
            pass

    server = serve_as_hospital(layout, Handler)
    return server, seen


def post_receipt(layout: DemoLayout, message_id: str, mic: str) -> bytes:
    built = hospital_receipt(layout, message_id, mic)
    answer = hospital_post(layout, built.headers, built.body)
    assert answer.status == 200
    return answer.body


def age(layout: DemoLayout, message_id: str, column: str, value: object) -> None:
    """Time passes for one message of the lab's spool."""
    import sqlite3

    db = sqlite3.connect(layout.lab.root / "state" / "spool.sqlite3")
    with db:
        db.execute(f"UPDATE outbound SET {column}=? WHERE message_id=?", (value, message_id))
    db.close()


@pytest.mark.parametrize("then", ["expired", "cancelled"])
def test_a_late_receipt_tells_the_truth_about_a_message_given_up_meanwhile(
    layout: DemoLayout, processes: Any, then: str
) -> None:
    set_async_receipt_url(layout, f"https://127.0.0.1:{layout.lab.port}/as2")
    server, seen = quiet_async_peer(layout)
    lab_cfg = layout.lab.config_path
    try:
        processes.start(lab_cfg)
        drop_file(layout.lab.outbox_dir / "hospital", "late.hl7", b"MSH|late receipt\r")
        [record] = wait_until(
            lambda: queue(lab_cfg, "list", "--state", "awaiting-receipt"), 30, "the send"
        )
        message_id = record["message_id"]
        # The receipt is late: the lab holds the hospital, gives the receipt up for
        # overdue, and the message expires or an operator withdraws it.
        peers(lab_cfg, "suspend", "hospital", "--reason", "slow receipts")
        age(layout, message_id, "updated_at", "2000-01-01T00:00:00+00:00")
        wait_until(lambda: queue(lab_cfg, "list", "--state", "queued"), 30, "the resend")
        if then == "expired":
            age(layout, message_id, "expires_at", 1)
            wait_until(lambda: queue(lab_cfg, "list", "--state", "expired"), 30, "the expiry")
        else:
            cancelled = medgw("queue", "cancel", message_id, "--config", str(lab_cfg))
            assert cancelled.returncode == 0, cancelled.stderr
        peers(lab_cfg, "resume", "hospital")
        # The peer had the document all along; its signed receipt says so.
        answer = post_receipt(layout, message_id, record["mic"])
    finally:
        server.shutdown()
        server.server_close()
    assert seen == [message_id]
    assert answer == b"receipt accepted\n"
    [received] = wait_for_events(layout.lab.audit_log, ("receipt.received", "receipt.invalid"))
    assert received["event"] == "receipt.received", received
    assert received["detail"]["mic_verified"] is True
    assert received["severity"] == "warning" and then in received["reason"]
    shown = queue(lab_cfg, "show", message_id)
    assert shown["state"] == "delivered" and shown["disposition"] == "processed"


@pytest.mark.long
def test_a_reload_does_not_break_off_a_long_send_in_progress(
    layout: DemoLayout, processes: Any
) -> None:
    """A large document to a slow peer may take minutes (request_timeout_seconds); a
    reload meanwhile (a CRL refreshed by cron, say) must let it finish."""
    set_async_receipt_url(layout, f"https://127.0.0.1:{layout.lab.port}/as2")
    set_runtime(layout.lab.config_path, "request_timeout_seconds", "150")
    seen: list[str] = []
    answered: list[str] = []
    certs = layout.hospital.root / "certs"

    class Slow(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.0"

        def do_POST(self) -> None:
            self.rfile.read(int(self.headers["Content-Length"]))
            seen.append(self.headers["Message-ID"])
            time.sleep(70)  # still working on it when the old connections are closed
            try:
                self.send_response(200)
                self.send_header("Content-Length", "0")
                self.end_headers()
                answered.append("200")
            except OSError as exc:
                answered.append(type(exc).__name__)
            self.close_connection = True

        def log_message(self, format: str, *args: Any) -> None:
            pass

    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(certs / "tls.crt", certs / "tls.key")
    context.load_verify_locations(layout.ca_certificate)
    context.verify_mode = ssl.CERT_REQUIRED
    server = ThreadingHTTPServer(("127.0.0.1", layout.hospital.port), Slow)
    server.socket = context.wrap_socket(server.socket, server_side=True)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        lab = processes.start(layout.lab.config_path)
        drop_file(layout.lab.outbox_dir / "hospital", "large.dcm", b"DICM" * 1000)
        wait_until(lambda: seen, 30, "the send to begin")
        reload(lab, layout.lab.audit_log)
        wait_for_events(layout.lab.audit_log, ("message.sent", "message.send_failed"), timeout=120)

    finally:
        server.shutdown()
        server.server_close()
    assert not events(layout.lab.audit_log, "message.send_failed")
    assert len(seen) == 1 and answered == ["200"]
    [record] = queue(layout.lab.config_path, "list")
    assert record["state"] == "awaiting-receipt" and record["attempts"] == 1
