"""What a hostile peer's requests cost a running gateway: bounded time, bounded memory.

Each test sends a real ``medgw run`` daemon, over mutual TLS with a configured
peer's certificate, what an attacker holding that certificate would send, and
checks that it is answered (or closed) within a bounded time, that the daemon's
resident memory does not grow beyond a bound, and that the refusal is audited.
The bounds are generous (a loaded two-core machine must never miss them) and
far below what the same messages cost before they were bounded.
"""

from __future__ import annotations

import socket
import ssl
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

from gateway.as2.headers import new_message_id
from gateway.config import load_config
from gateway.demo_run import read_audit, wait_until
from gateway.pki.demo import DemoLayout
from tests import as2client
from tests.test_rotation import edit

ANSWERED_WITHIN = 60.0  # seconds: every hostile request is answered or closed by then


def events(path: Path, name: str) -> list[dict[str, Any]]:
    return [r for r in read_audit(path) if r["event"] == name]


def _tls_context(layout: DemoLayout) -> ssl.SSLContext:
    certs = layout.lab.root / "certs"
    context = ssl.create_default_context(cafile=str(layout.ca_certificate))
    context.load_cert_chain(str(certs / "tls.crt"), str(certs / "tls.key"))
    return context


@contextmanager
def connection(layout: DemoLayout) -> Iterator[ssl.SSLSocket]:
    """A mutual-TLS connection to the hospital's listener with the lab's certificate."""
    raw = socket.create_connection(("127.0.0.1", layout.hospital.port), timeout=ANSWERED_WITHIN)
    with _tls_context(layout).wrap_socket(raw, server_hostname="localhost") as sock:
        yield sock


def _request_head(layout: DemoLayout, content_length: int) -> bytes:
    lines = [
        "POST /as2 HTTP/1.1",
        "Host: localhost",
        f"Message-ID: {new_message_id('KITA-LAB')}",
        "AS2-From: KITA-LAB",
        "AS2-To: SAKURA-HOSPITAL",
        "AS2-Version: 1.2",
        "Content-Type: application/pkcs7-mime; smime-type=enveloped-data",
        f"Content-Length: {content_length}",
    ]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def _status(sock: ssl.SSLSocket) -> int:
    """The status of the answer (0 if the connection was closed without one)."""
    data = b""
    while b"\r\n" not in data:
        try:
            more = sock.recv(4096)
        except (ConnectionError, ssl.SSLError):
            return 0
        if not more:
            return 0
        data += more
    return int(data.split(b" ", 2)[1])


def _with_body_idle(layout: DemoLayout, seconds: int) -> None:
    edit(layout.hospital.config_path, "body_idle_seconds = 60", f"body_idle_seconds = {seconds}")


def test_a_declared_length_above_the_limit_is_refused_before_the_body(
    layout: DemoLayout, processes: Any
) -> None:
    processes.start(layout.hospital.config_path)
    limit = load_config(layout.hospital.config_path).runtime.max_message_bytes
    with connection(layout) as sock:
        started = time.monotonic()
        sock.sendall(_request_head(layout, 2147483648))  # and not one byte of body
        assert _status(sock) == 413
        assert time.monotonic() - started < ANSWERED_WITHIN
    [refusal] = wait_until(
        lambda: events(layout.hospital.audit_log, "message.rejected"), 30, "the refusal"
    )
    assert refusal["peer"] == "lab" and refusal["detail"]["http_status"] == 413
    assert "declared Content-Length 2147483648" in refusal["reason"]
    assert str(limit) in refusal["reason"]


def test_a_stalled_or_trickling_body_is_given_up_and_frees_the_peers_slots(
    layout: DemoLayout, processes: Any
) -> None:
    # Short pauses allowed, so that the test is quick; the rule is the same at 60 s.
    _with_body_idle(layout, 3)
    processes.start(layout.hospital.config_path)
    with connection(layout) as stalled, connection(layout) as trickle:
        started = time.monotonic()
        stalled.sendall(_request_head(layout, 2_000_000) + b"\x30\x80")
        trickle.sendall(_request_head(layout, 2_000_000))
        answers: dict[str, int] = {}
        trickle.settimeout(1)
        while "trickle" not in answers and time.monotonic() - started < ANSWERED_WITHIN:
            try:
                trickle.sendall(b"\x00")  # a byte a second: far below the floor
                answers["trickle"] = _status(trickle)
            except TimeoutError:
                continue
            except OSError:
                answers["trickle"] = 0
        answers["stalled"] = _status(stalled)
        elapsed = time.monotonic() - started
    assert answers == {"trickle": 408, "stalled": 408}
    assert elapsed < ANSWERED_WITHIN
    refusals = wait_until(
        lambda: [
            r
            for r in events(layout.hospital.audit_log, "message.rejected")
            if r["detail"].get("http_status") == 408
        ][1:],
        30,
        "both refusals",
    )
    assert all("arrived too slowly" in r["reason"] for r in refusals)


def test_stalled_uploads_beyond_a_peers_slots_do_not_keep_its_next_message_out(
    layout: DemoLayout, processes: Any
) -> None:
    _with_body_idle(layout, 3)
    processes.start(layout.hospital.config_path)
    lab = load_config(layout.lab.config_path)
    built = as2client.build(
        b"MSH|after the stalled ones\r",
        sender_as2="KITA-LAB",
        receiver_as2="SAKURA-HOSPITAL",
        signing=lab.smime.signing,
        recipient=lab.require_peer("hospital").encryption_certificates[0],
    )
    with ExitStack() as stack:
        for _ in range(10):  # more than INBOUND_PER_PEER
            sock = stack.enter_context(connection(layout))
            sock.sendall(_request_head(layout, 2_000_000))
        started = time.monotonic()
        certs = layout.lab.root / "certs"
        answer = as2client.post(
            layout.hospital.port,
            built.headers,
            built.body,
            client_cert=certs / "tls.crt",
            client_key=certs / "tls.key",
            ca=layout.ca_certificate,
        )
        assert answer.status == 200
        assert time.monotonic() - started < ANSWERED_WITHIN
    wait_until(lambda: events(layout.hospital.audit_log, "message.delivered"), 30, "the delivery")
