"""What a hostile peer's requests cost a running gateway: bounded time, bounded memory.

Each test sends a real ``medgw run`` daemon, over mutual TLS with a configured
peer's certificate, what an attacker holding that certificate would send, and
checks that it is answered (or closed) within a bounded time, that the daemon's
resident memory does not grow beyond a bound, and that the refusal is audited.
The bounds are generous (a loaded two-core machine must never miss them) and
far below what the same messages cost before they were bounded.
"""

from __future__ import annotations

import json
import random
import socket
import ssl
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

from gateway.as2.headers import new_message_id
from gateway.config import load_config
from gateway.demo_run import wait_until
from gateway.pki.demo import DemoLayout
from tests import as2client
from tests.helpers.audit import wait_for_events
from tests.helpers.demo import edit, lab_post

ANSWERED_WITHIN = 60.0  # seconds: every hostile request is answered or closed by then


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
    [refusal] = wait_for_events(layout.hospital.audit_log, "message.rejected")
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
    refusals = wait_for_events(
        layout.hospital.audit_log,
        "message.rejected",
        where=lambda r: r["detail"].get("http_status") == 408,
        count=2,
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
        answer = lab_post(layout, built.headers, built.body)
        assert answer.status == 200
        assert time.monotonic() - started < ANSWERED_WITHIN
    wait_for_events(layout.hospital.audit_log, "message.delivered")


# Growth of the daemon's peak resident memory (VmHWM) that a hostile message may cause.
# Before the bounds, an 8 MB signature with many SignerInfos took it up by 650 MB.
RSS_GROWTH_MIB = 150


def _memory_kib(pid: int) -> dict[str, int]:
    status = Path(f"/proc/{pid}/status").read_text()
    return {
        key: int(line.split()[1])
        for line in status.splitlines()
        for key in ("VmRSS", "VmHWM")
        if line.startswith(f"{key}:")
    }


def _sender(layout: DemoLayout) -> tuple[Any, Any]:
    lab = load_config(layout.lab.config_path)
    return lab.smime.signing, lab.require_peer("hospital").encryption_certificates[0]


def _post_as_lab(layout: DemoLayout, headers: Any, body: bytes) -> as2client.Answer:
    return lab_post(layout, headers, body, timeout=ANSWERED_WITHIN)


def test_hostile_messages_are_answered_in_bounded_time_and_memory(
    layout: DemoLayout, processes: Any
) -> None:
    daemon = processes.start(layout.hospital.config_path)
    signing, recipient = _sender(layout)
    common = {
        "sender_as2": "KITA-LAB",
        "receiver_as2": "SAKURA-HOSPITAL",
        "signing": signing,
        "recipient": recipient,
    }
    warm_up = as2client.build(b"MSH|warm up\r", **common)
    assert b"processed/error" not in _post_as_lab(layout, warm_up.headers, warm_up.body).body
    baseline = _memory_kib(daemon.proc.pid)["VmHWM"]

    rng = random.Random(18)
    large = as2client.build(rng.randbytes(5 << 20), **common)
    hostile: dict[str, tuple[Any, bytes]] = {
        # 1500 SignerInfos in a signature part under its size bound: counted, refused
        "many signer infos": as2client.build_with_signature(
            b"MSH|x\r", lambda s: as2client.with_signer_infos(s, 1500), **common
        ),
        # an 8 MB signature part (the one that took 650 MB): refused by its size
        "8 MB of signer infos": as2client.build_with_signature(
            b"MSH|x\r", lambda s: as2client.with_signer_infos(s, 30_000), **common
        ),
        "50 000 recipient infos": (warm_up.headers, as2client.repeated(warm_up.body, 1, 50_000)),
        "1-byte segments": (large.headers, as2client.resegmented(large.body, lambda: 1)),
        "1-to-3-byte segments, altered tag": (
            large.headers,
            as2client.resegmented(large.body, lambda: rng.randint(1, 3), spoil_tag=True),
        ),
    }
    for name, (headers, body) in hostile.items():
        headers = tuple(
            (k, new_message_id("KITA-LAB") if k == "Message-ID" else v) for k, v in headers
        )
        started = time.monotonic()
        answer = _post_as_lab(layout, headers, body)
        elapsed = time.monotonic() - started
        growth_mib = (_memory_kib(daemon.proc.pid)["VmHWM"] - baseline) / 1024
        assert answer.status == 200, name
        assert elapsed < ANSWERED_WITHIN, (name, elapsed)
        assert growth_mib < RSS_GROWTH_MIB, (name, growth_mib)
        processed = b"processed/error" not in answer.body
        assert processed == (name == "1-byte segments"), name  # legal BER: delivered

    refused = wait_for_events(
        layout.hospital.audit_log, ("signature.failed", "decryption.failed"), count=4
    )
    assert all(len(json.dumps(r)) < 10_000 for r in refused)
    reasons = " ".join(r["reason"] for r in refused)
    assert "more than 8 signer infos" in reasons
    assert "implausibly large" in reasons


def test_a_hostile_asynchronous_receipt_is_refused_in_bounded_time_and_memory(
    layout: DemoLayout, processes: Any
) -> None:
    from gateway.cms.mime import make_entity, parse_entity

    daemon = processes.start(layout.hospital.config_path)
    signing, _ = _sender(layout)
    report = make_entity(
        'multipart/report; report-type=disposition-notification; boundary="r"',
        b"--r\r\nContent-Type: text/plain\r\n\r\nreceipt\r\n--r--\r\n",
    )
    baseline = _memory_kib(daemon.proc.pid)["VmHWM"]
    signed = as2client.signed_with_altered_signature(
        report, lambda s: as2client.with_signer_infos(s, 1500), signing
    )
    headers, body = parse_entity(signed)
    started = time.monotonic()
    answer = _post_as_lab(
        layout,
        (("Content-Type", dict(headers)["Content-Type"]), ("AS2-From", "KITA-LAB")),
        body,
    )
    assert answer.status == 200 and b"refused" in answer.body
    assert time.monotonic() - started < ANSWERED_WITHIN
    assert (_memory_kib(daemon.proc.pid)["VmHWM"] - baseline) / 1024 < RSS_GROWTH_MIB
    [refusal] = wait_for_events(layout.hospital.audit_log, "receipt.invalid")
    assert "more than 8 signer infos" in refusal["reason"]
    assert len(refusal["reason"]) < 3000


def test_one_peers_idle_connections_are_bounded_and_leave_the_others_in(
    layout: DemoLayout, processes: Any
) -> None:
    from datetime import UTC, datetime

    from gateway.channel.server import MAX_CONNECTIONS_PER_CERTIFICATE
    from gateway.pki.demo import add_demo_sender

    clinic = add_demo_sender(layout, "clinic", "CLINIC", now=datetime.now(UTC))
    daemon = processes.start(layout.hospital.config_path)
    _, recipient = _sender(layout)
    with ExitStack() as stack:
        for _ in range(MAX_CONNECTIONS_PER_CERTIFICATE):
            stack.enter_context(connection(layout))  # handshake done, then nothing
        started = time.monotonic()
        with connection(layout) as one_more:
            one_more.settimeout(ANSWERED_WITHIN)
            closed = one_more.recv(10)  # closed by the gateway, not by a timeout
        assert closed == b"" and time.monotonic() - started < ANSWERED_WITHIN
        daemon.wait_for(lambda line: line.get("event") == "listener.peer_connections_full", 30)
        # another peer is not affected
        built = as2client.build(
            b"MSH|from the clinic\r",
            sender_as2="CLINIC",
            receiver_as2="SAKURA-HOSPITAL",
            signing=as2client.load_pair(clinic / "sign.crt", clinic / "sign.key"),
            recipient=recipient,
        )
        answer = as2client.post(
            layout.hospital.port,
            built.headers,
            built.body,
            client_cert=clinic / "tls.crt",
            client_key=clinic / "tls.key",
            ca=layout.ca_certificate,
        )
        assert answer.status == 200 and b"processed/error" not in answer.body
    # once the peer's connections are closed, it gets in again
    signing, _ = _sender(layout)
    again = as2client.build(
        b"MSH|again\r",
        sender_as2="KITA-LAB",
        receiver_as2="SAKURA-HOSPITAL",
        signing=signing,
        recipient=recipient,
    )

    def accepted() -> bool:
        try:  # the gateway may not have seen all 32 closes yet when the first try comes
            return _post_as_lab(layout, again.headers, again.body).status == 200
        except (ConnectionError, ssl.SSLError):
            return False

    wait_until(accepted, 30, "the lab's message once its connections are closed")
