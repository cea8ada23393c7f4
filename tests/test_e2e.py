"""End to end: two real ``medgw run`` processes, real mutual TLS on 127.0.0.1."""

from __future__ import annotations

import hashlib
import os
import ssl
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from gateway.as2.mdn import parse_receipt
from gateway.atrest.chunked import MAGIC
from gateway.config import load_config
from gateway.demo_run import drop_file
from gateway.pki.demo import DemoLayout
from gateway.pki.issue import issue, make_ca, write_pem
from gateway.policy import AlgorithmPolicy
from tests import as2client
from tests.helpers.atrest import kept_receipt, stored_receipt
from tests.helpers.audit import events, wait_for_events
from tests.helpers.demo import lab_post, receipt_of


def inbox_files(layout: DemoLayout) -> list[Path]:
    folder = layout.hospital.inbox_dir / "lab"
    return (
        sorted(p for p in folder.glob("*") if not p.name.startswith(".")) if folder.exists() else []
    )


def test_documents_of_every_size_arrive_identical_with_verified_receipts(layout, processes):
    processes.start(layout.hospital.config_path)
    processes.start(layout.lab.config_path)
    rng = __import__("random").Random(7)
    sizes = {"empty.bin": 0, "one.bin": 1, "four-kib.bin": 4096, "ten-mib.dcm": 10 * 1024 * 1024}
    documents = {}
    for name, size in sizes.items():
        data = bytes(rng.getrandbits(8) for _ in range(min(size, 4096)))
        if size > 4096:
            data = os.urandom(size - 3) + b"\r\r\n"  # binary, with bare CRs at the end
        documents[name] = data
        drop_file(layout.lab.outbox_dir / "hospital", name, data)

    receipts = wait_for_events(
        layout.lab.audit_log, "receipt.received", count=len(documents), timeout=120
    )
    assert len(receipts) == len(documents)
    for name, data in documents.items():
        assert (layout.hospital.inbox_dir / "lab" / name).read_bytes() == data, name
    assert all(r["detail"]["disposition"] == "processed" for r in receipts)
    assert all(r["detail"]["mic_verified"] for r in receipts)
    # Every receipt is stored and can be verified again, later, by anyone with the cert.
    lab_config = load_config(layout.lab.config_path)
    peer = lab_config.require_peer("hospital")
    for record in receipts:
        # Kept in the message's spool row (no file per receipt), encrypted at rest.
        assert record["detail"]["receipt"] == "spool" and "receipt_file" not in record["detail"]
        sealed = stored_receipt(layout.lab.config_path, record["message_id"])
        assert sealed is not None and sealed.startswith(MAGIC)
        stored = kept_receipt(layout.lab.config_path, record["message_id"])
        assert hashlib.sha256(stored).hexdigest() == record["detail"]["receipt_sha256"]
        head, _, body = stored.partition(b"\r\n\r\n")
        content_type = head.decode().split(":", 1)[1].strip()
        again = parse_receipt(
            content_type, body, trusted_signers=peer.signing_certificates, policy=AlgorithmPolicy()
        )
        assert again.processed and again.original_message_id == record["message_id"]
    accepted = {
        r["detail"]["filename"]: r for r in events(layout.lab.audit_log, "message.accepted")
    }
    assert set(accepted) == set(documents)
    # The spool keeps no plaintext copy once the encrypted form is stored.
    assert not any((layout.lab.root / "state" / "payloads").iterdir())
    # Nor a file per receipt.
    assert not any(lab_config.storage.receipts_dir.iterdir())


def _untrusted_identity(tmp_path: Path):
    now = datetime.now(UTC)
    rogue_ca = make_ca("Rogue CA", now=now)
    rogue = issue(rogue_ca, "KITA-LAB", purpose="tls", now=now, ip_addresses=["127.0.0.1"])
    cert, key = tmp_path / "rogue.crt", tmp_path / "rogue.key"
    write_pem(cert, rogue.certificate)
    write_pem(key, rogue.key)
    return cert, key


def test_client_from_untrusted_ca_is_refused_at_handshake_and_audited(layout, processes, tmp_path):
    processes.start(layout.hospital.config_path)
    cert, key = _untrusted_identity(tmp_path)
    with pytest.raises((ssl.SSLError, ConnectionError)):
        as2client.post(
            layout.hospital.port,
            (("AS2-From", "KITA-LAB"),),
            b"x",
            client_cert=cert,
            client_key=key,
            ca=layout.ca_certificate,
        )
    failures = wait_for_events(layout.hospital.audit_log, "tls.handshake_failed")
    assert failures[0]["severity"] == "alert"
    assert "certificate" in failures[0]["reason"].lower()
    assert inbox_files(layout) == []


def test_trusted_ca_but_unconfigured_certificate_is_refused(layout, processes, tmp_path):
    """One CA serves many institutions: a valid chain is not an identity (pinning)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    from gateway.pki.issue import Issued

    processes.start(layout.hospital.config_path)
    ca_dir = layout.root / "ca"
    ca_key = serialization.load_pem_private_key((ca_dir / "ca.key").read_bytes(), None)
    assert isinstance(ca_key, ec.EllipticCurvePrivateKey)
    ca = Issued(x509.load_pem_x509_certificate((ca_dir / "ca.crt").read_bytes()), ca_key)
    other = issue(
        ca, "OTHER-CLINIC", purpose="tls", now=datetime.now(UTC), ip_addresses=["127.0.0.1"]
    )
    cert, key = tmp_path / "other.crt", tmp_path / "other.key"
    write_pem(cert, other.certificate)
    write_pem(key, other.key)
    with pytest.raises((ssl.SSLError, ConnectionError)):
        as2client.post(
            layout.hospital.port,
            (("AS2-From", "KITA-LAB"),),
            b"x",
            client_cert=cert,
            client_key=key,
            ca=layout.ca_certificate,
        )
    failures = wait_for_events(layout.hospital.audit_log, "tls.handshake_failed")
    assert "not configured for any peer" in failures[0]["reason"]
    assert inbox_files(layout) == []


def test_tampered_signature_from_configured_peer_is_refused(layout, processes):
    processes.start(layout.hospital.config_path)
    lab = load_config(layout.lab.config_path)
    hospital_peer = lab.require_peer("hospital")
    headers, body = as2client.build_tampered(
        b"MSH|^~\\&|tampered lab result\r",
        sender_as2="KITA-LAB",
        receiver_as2="SAKURA-HOSPITAL",
        signing=lab.smime.signing,
        recipient=hospital_peer.encryption_certificates[0],
    )
    answer = lab_post(layout, headers, body)
    assert answer.status == 200
    receipt = receipt_of(layout, answer)
    assert receipt.disposition == "processed/error: integrity-check-failed"
    assert receipt.mic is None
    failed = wait_for_events(layout.hospital.audit_log, "signature.failed")
    assert failed and failed[0]["peer"] == "lab" and failed[0]["severity"] == "alert"
    assert "messageDigest" in failed[0]["reason"] or "signature" in failed[0]["reason"].lower()
    assert inbox_files(layout) == []


def test_payload_encrypted_for_another_recipient_is_refused(layout, processes, tmp_path):
    processes.start(layout.hospital.config_path)
    lab = load_config(layout.lab.config_path)
    now = datetime.now(UTC)
    stranger = issue(
        make_ca("Elsewhere CA", now=now), "SOMEONE-ELSE", purpose="smime-encrypt", now=now
    )
    built = as2client.build(
        b"for someone else",
        sender_as2="KITA-LAB",
        receiver_as2="SAKURA-HOSPITAL",
        signing=lab.smime.signing,
        recipient=stranger.certificate,
    )
    answer = lab_post(layout, built.headers, built.body)
    receipt = receipt_of(layout, answer)
    assert receipt.disposition == "processed/error: decryption-failed"
    failed = wait_for_events(layout.hospital.audit_log, "decryption.failed")
    assert failed and failed[0]["peer"] == "lab"
    assert inbox_files(layout) == []


def test_as2_from_must_match_the_tls_identity(layout, processes):
    processes.start(layout.hospital.config_path)
    lab = load_config(layout.lab.config_path)
    built = as2client.build(
        b"spoofed",
        sender_as2="SOME-OTHER-LAB",
        receiver_as2="SAKURA-HOSPITAL",
        signing=lab.smime.signing,
        recipient=lab.require_peer("hospital").encryption_certificates[0],
    )
    answer = lab_post(layout, built.headers, built.body)
    assert receipt_of(layout, answer).disposition == "processed/error: authentication-failed"
    wait_for_events(layout.hospital.audit_log, "peer.authentication_failed")
    assert inbox_files(layout) == []


def test_resend_of_same_message_is_answered_with_original_receipt_and_delivered_once(
    layout, processes
):
    processes.start(layout.hospital.config_path)
    lab = load_config(layout.lab.config_path)
    built = as2client.build(
        b"resent result",
        sender_as2="KITA-LAB",
        receiver_as2="SAKURA-HOSPITAL",
        signing=lab.smime.signing,
        recipient=lab.require_peer("hospital").encryption_certificates[0],
        filename="resent.hl7",
    )
    first = lab_post(layout, built.headers, built.body)
    second = lab_post(layout, built.headers, built.body)
    assert first.body == second.body
    assert receipt_of(layout, second).processed
    assert [p.name for p in inbox_files(layout)] == ["resent.hl7"]
    assert len(wait_for_events(layout.hospital.audit_log, "message.delivered")) == 1
    # The document is recorded received once; the resend is recorded as a duplicate.
    [duplicate] = wait_for_events(layout.hospital.audit_log, "message.duplicate")
    assert duplicate["message_id"] == dict(built.headers)["Message-ID"]
    assert len(events(layout.hospital.audit_log, "message.received")) == 1


def test_sigkill_after_intake_before_send_delivers_exactly_once(layout, processes):
    # The hospital is down: the lab takes the file from the outbox but cannot send it.
    lab = processes.start(layout.lab.config_path)
    drop_file(layout.lab.outbox_dir / "hospital", "urgent.hl7", b"MSH|urgent\r")
    wait_for_events(layout.lab.audit_log, "message.send_failed")
    assert not (layout.lab.outbox_dir / "hospital" / "urgent.hl7").exists()
    lab.kill()
    processes.start(layout.hospital.config_path)
    processes.start(layout.lab.config_path)
    wait_for_events(layout.lab.audit_log, "receipt.received")
    assert [p.name for p in inbox_files(layout)] == ["urgent.hl7"]
    assert (layout.hospital.inbox_dir / "lab" / "urgent.hl7").read_bytes() == b"MSH|urgent\r"
    assert len(wait_for_events(layout.hospital.audit_log, "message.delivered")) == 1
    assert len(events(layout.lab.audit_log, "message.accepted")) == 1


def test_logs_carry_no_payload_or_patient_data_but_the_audit_names_the_document(
    layout: DemoLayout, processes: Any
) -> None:
    hospital = processes.start(layout.hospital.config_path)
    lab = processes.start(layout.lab.config_path)
    document = b"MSH|^~\\&|LIS|LAB\rPID|1||PAT-4711^^^MR||YAMADA^HANAKO||19800101|F\r"
    drop_file(layout.lab.outbox_dir / "hospital", "YAMADA-HANAKO-result.hl7", document)
    wait_for_events(layout.lab.audit_log, "receipt.received")
    assert hospital.stop() == 0 and lab.stop() == 0
    output = "\n".join(hospital.raw + lab.raw)
    assert output  # the daemons did log
    for secret in ("YAMADA", "HANAKO", "PAT-4711"):
        assert secret not in output
    accepted = events(layout.lab.audit_log, "message.accepted")
    assert accepted[0]["detail"]["filename"] == "YAMADA-HANAKO-result.hl7"
