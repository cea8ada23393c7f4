"""Peer authentication by PKI on real daemons: revocation, pinning, identity."""

from __future__ import annotations

import signal
import socket
import ssl
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives import serialization

from gateway.as2.mdn import parse_receipt
from gateway.config import load_config
from gateway.demo_run import drop_file
from gateway.pki.demo import DemoLayout
from gateway.pki.issue import issue, make_crl, write_pem
from gateway.pki.keypair import KeyPair
from gateway.policy import AlgorithmPolicy
from tests import as2client
from tests.helpers.audit import wait_for_events
from tests.helpers.demo import demo_ca, lab_post, revoke, wait_handshake_refused


def open_tls(layout: DemoLayout) -> ssl.SSLSocket:
    """A connection to the hospital with the lab's TLS identity, left open."""
    certs = layout.lab.root / "certs"
    context = ssl.create_default_context(cafile=str(layout.ca_certificate))
    context.load_cert_chain(str(certs / "tls.crt"), str(certs / "tls.key"))
    raw = socket.create_connection(("127.0.0.1", layout.hospital.port), timeout=10)
    return context.wrap_socket(raw, server_hostname="127.0.0.1")


def test_revoked_peer_is_refused_after_reload_and_its_open_connection_closed(
    layout: DemoLayout, processes: Any
) -> None:
    hospital = processes.start(layout.hospital.config_path)
    processes.start(layout.lab.config_path)
    drop_file(layout.lab.outbox_dir / "hospital", "before.hl7", b"MSH|before\r")
    wait_for_events(layout.lab.audit_log, "receipt.received")
    held = open_tls(layout)  # an established connection from before the revocation
    held.sendall(b"POST /as2 HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n")

    lab_tls = load_config(layout.lab.config_path).tls.identity.certificate
    revoke(layout, layout.hospital.root / "certs" / "crls" / "loopback" / "ca.crl", lab_tls)
    hospital.signal(signal.SIGHUP)
    wait_for_events(layout.hospital.audit_log, "config.reloaded")

    wait_for_events(
        layout.hospital.audit_log,
        "peer.certificate_rejected",
        where=lambda r: r["peer"] == "lab" and "revoked" in r["reason"].lower(),
    )
    closed = wait_for_events(layout.hospital.audit_log, "tls.connection_closed")
    assert "KITA-LAB" in closed[0]["detail"]["subject"]
    held.settimeout(10)
    try:
        data = held.recv(1024)  # a timeout here means the connection stayed open: a failure
    except (ConnectionResetError, ssl.SSLEOFError, ssl.SSLZeroReturnError):
        data = b""
    assert data == b""

    drop_file(layout.lab.outbox_dir / "hospital", "after.hl7", b"MSH|after\r")
    wait_handshake_refused(layout)
    assert not (layout.hospital.inbox_dir / "lab" / "after.hl7").exists()
    assert (layout.hospital.inbox_dir / "lab" / "before.hl7").exists()


def test_revoked_signing_certificate_is_not_accepted_for_messages(
    layout: DemoLayout, processes: Any
) -> None:
    lab_sign = load_config(layout.lab.config_path).smime.signing.certificate
    revoke(layout, layout.hospital.root / "certs" / "crls" / "loopback" / "ca.crl", lab_sign)
    processes.start(layout.hospital.config_path)
    processes.start(layout.lab.config_path)
    drop_file(layout.lab.outbox_dir / "hospital", "signed.hl7", b"MSH|x\r")
    failed = wait_for_events(layout.lab.audit_log, "message.failed")
    assert "authentication-failed" in failed[0]["reason"]
    wait_for_events(
        layout.hospital.audit_log,
        "peer.certificate_rejected",
        where=lambda r: r["detail"]["purpose"] == "smime-sign",
    )


def test_message_signed_by_another_institutions_valid_certificate_is_refused(
    layout: DemoLayout, processes: Any, tmp_path: Path
) -> None:
    processes.start(layout.hospital.config_path)
    other = issue(
        demo_ca(layout),
        "OTHER-CLINIC",
        purpose="smime-sign",
        now=datetime.now(UTC) - timedelta(minutes=5),
    )
    cert, key = tmp_path / "other.crt", tmp_path / "other.key"
    write_pem(cert, other.certificate)
    write_pem(key, other.key)
    signing = as2client.load_pair(cert, key)
    assert isinstance(signing, KeyPair)
    lab = load_config(layout.lab.config_path)
    built = as2client.build(
        b"MSH|signed by someone else\r",
        sender_as2="KITA-LAB",
        receiver_as2="SAKURA-HOSPITAL",
        signing=signing,
        recipient=lab.require_peer("hospital").encryption_certificates[0],
    )
    answer = lab_post(layout, built.headers, built.body)
    receipt = parse_receipt(
        answer.content_type,
        answer.body,
        trusted_signers=lab.require_peer("hospital").signing_certificates,
        policy=AlgorithmPolicy(),
    )
    assert receipt.disposition == "processed/error: authentication-failed"
    wait_for_events(layout.hospital.audit_log, "signature.failed")
    assert not (layout.hospital.inbox_dir / "lab").exists() or not any(
        (layout.hospital.inbox_dir / "lab").iterdir()
    )


def test_stale_crl_under_require_refuses_the_peer_and_raises_an_alarm(
    layout: DemoLayout, processes: Any
) -> None:
    crl = make_crl(demo_ca(layout), now=datetime.now(UTC) - timedelta(days=40), days=30)
    (layout.hospital.root / "certs" / "crls" / "loopback" / "ca.crl").write_bytes(
        crl.public_bytes(serialization.Encoding.PEM)
    )
    processes.start(layout.hospital.config_path)
    wait_for_events(layout.hospital.audit_log, "pki.crl_stale")
    wait_for_events(
        layout.hospital.audit_log,
        "peer.certificate_rejected",
        where=lambda r: r["detail"]["purpose"] == "tls-client",
    )
    wait_for_events(
        layout.hospital.audit_log,
        "peer.certificate_rejected",
        where=lambda r: r["detail"]["purpose"] == "smime-sign",
    )


def test_no_acceptable_encryption_certificate_keeps_the_document_until_an_operator_retry(
    layout: DemoLayout, processes: Any
) -> None:
    hospital_enc = load_config(layout.hospital.config_path).smime.encryption.certificate
    lab_crl = layout.lab.root / "certs" / "crls" / "loopback" / "ca.crl"
    revoke(layout, lab_crl, hospital_enc)
    processes.start(layout.hospital.config_path)
    lab = processes.start(layout.lab.config_path)
    drop_file(layout.lab.outbox_dir / "hospital", "nowhere.hl7", b"MSH|x\r")
    [failed] = wait_for_events(layout.lab.audit_log, "message.failed")
    assert "no acceptable encryption certificate" in failed["reason"]
    assert "revoked" in failed["reason"].lower()
    message_id = failed["message_id"]
    assert f"medgw queue retry {message_id}" in failed["reason"]
    assert "the document is kept" in failed["reason"]

    def queue(*args: str) -> subprocess.CompletedProcess[str]:
        config = str(layout.lab.config_path)
        return subprocess.run(
            [sys.executable, "-m", "gateway", "queue", *args, "--config", config],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )

    # Retried before the cause is corrected: prepared again, and refused again.
    early = queue("retry", message_id)
    assert early.returncode == 0, early.stderr
    assert "signed and encrypted again" in early.stdout
    wait_for_events(layout.lab.audit_log, "message.failed", count=2)

    # The CA's next CRL no longer lists the certificate (it was suspended, say): reload.
    now = datetime.now(UTC)
    crl = make_crl(demo_ca(layout), now=now - timedelta(minutes=1), revoked=[], number=3)
    lab_crl.write_bytes(crl.public_bytes(serialization.Encoding.PEM))
    lab.signal(signal.SIGHUP)
    wait_for_events(layout.lab.audit_log, "config.reloaded")
    retried = queue("retry", message_id)
    assert retried.returncode == 0, retried.stderr
    [receipt] = wait_for_events(layout.lab.audit_log, "receipt.received")
    assert receipt["message_id"] == message_id and receipt["detail"]["mic_verified"]
    assert (layout.hospital.inbox_dir / "lab" / "nowhere.hl7").read_bytes() == b"MSH|x\r"
    assert not list((layout.lab.root / "state" / "payloads").iterdir())  # no plaintext left
