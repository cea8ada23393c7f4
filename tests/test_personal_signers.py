"""Personal signers and HPKI roles on real daemons.

The lab sends, over its own mutual TLS identity, a message signed by one of
its doctors (an HPKI certificate from the zone's CA, hcRole "Medical Doctor")
instead of the lab's institutional signing key.  The hospital accepts it only
when its peers.d/lab.toml says ``personal_signers = true`` and the doctor's
certificate validates under the zone's anchors; it records the role.
"""

from __future__ import annotations

import email
from datetime import UTC, datetime, timedelta
from email.message import Message
from pathlib import Path
from typing import Any

from cryptography import x509

from gateway.as2.mdn import parse_receipt
from gateway.config import load_config
from gateway.pki.demo import DemoLayout
from gateway.pki.issue import Issued, make_ca, write_pem
from gateway.policy import AlgorithmPolicy
from tests import as2client
from tests.helpers.audit import events, wait_for_events
from tests.helpers.demo import demo_ca, lab_post, revoke
from tests.hpki_certs import Role, issue_person, subject_directory_attributes

DOCTOR = "神楽坂 花子"  # a person's name, as HPKI certificates carry it


def allow_personal_signers(layout: DemoLayout, allowed: bool) -> None:
    peer_file = layout.hospital.root / "peers.d" / "lab.toml"
    text = peer_file.read_text(encoding="utf-8")
    assert "personal_signers = false\n" in text
    peer_file.write_text(
        text.replace("personal_signers = false\n", f"personal_signers = {str(allowed).lower()}\n"),
        encoding="utf-8",
    )
    assert load_config(layout.hospital.config_path).require_peer("lab").personal_signers is allowed


def doctor(ca: Issued) -> Issued:
    return issue_person(
        ca,
        DOCTOR,
        now=datetime.now(UTC) - timedelta(minutes=5),
        extension_der=subject_directory_attributes([Role(text="Medical Doctor")]),
    )


def send_signed_by(
    layout: DemoLayout, signer: Issued, tmp_path: Path, payload: bytes
) -> tuple[str, str]:
    """Post a message signed by ``signer`` with the lab's TLS identity: (disposition, text)."""
    cert, key = tmp_path / "signer.crt", tmp_path / "signer.key"
    write_pem(cert, signer.certificate)
    write_pem(key, signer.key)
    lab = load_config(layout.lab.config_path)
    built = as2client.build(
        payload,
        sender_as2="KITA-LAB",
        receiver_as2="SAKURA-HOSPITAL",
        signing=as2client.load_pair(cert, key),
        recipient=lab.require_peer("hospital").encryption_certificates[0],
        filename="referral.hl7",
    )
    answer = lab_post(layout, built.headers, built.body)
    assert answer.status == 200
    receipt = parse_receipt(
        answer.content_type,
        answer.body,
        trusted_signers=lab.require_peer("hospital").signing_certificates,
        policy=AlgorithmPolicy(),
    )
    return receipt.disposition, receipt_text(answer.content_type, answer.body)


def receipt_text(content_type: str, body: bytes) -> str:
    """The human-readable part of a receipt (the report's first part), decoded."""
    message = email.message_from_bytes(f"Content-Type: {content_type}\r\n\r\n".encode() + body)
    reports = [p for p in message.walk() if p.get_content_type() == "multipart/report"]
    assert len(reports) == 1
    human = reports[0].get_payload(0)
    assert isinstance(human, Message) and human.get_content_type() == "text/plain"
    raw = human.get_payload(decode=True)
    assert isinstance(raw, bytes)
    return raw.decode(human.get_content_charset() or "us-ascii")


def inbox(layout: DemoLayout) -> list[str]:
    folder = layout.hospital.inbox_dir / "lab"
    return sorted(p.name for p in folder.iterdir()) if folder.exists() else []


def test_doctor_signs_for_the_lab_when_personal_signers_are_allowed(
    layout: DemoLayout, processes: Any, tmp_path: Path
) -> None:
    allow_personal_signers(layout, True)
    processes.start(layout.hospital.config_path)
    signer = doctor(demo_ca(layout))

    disposition, text = send_signed_by(layout, signer, tmp_path, b"MSH|referral by a doctor\r")

    assert disposition == "processed"
    assert inbox(layout) == ["referral.hl7"]
    assert (layout.hospital.inbox_dir / "lab" / "referral.hl7").read_bytes() == (
        b"MSH|referral by a doctor\r"
    )
    (received,) = wait_for_events(layout.hospital.audit_log, "message.received")

    detail = received["detail"]
    assert detail["signer"] == f"CN={DOCTOR}"
    assert detail["signer_role"] == "Medical Doctor"
    assert detail["signer_kind"] == "personal"
    assert detail["signer_roles"][0]["japanese"] == "医師"
    assert "good" in detail["signer_revocation"]  # the zone requires revocation: CRL checked
    assert f"Signed by CN={DOCTOR}, Medical Doctor (HPKI)" in text
    assert not events(layout.hospital.audit_log, "signature.failed")


def test_lab_key_signed_message_has_no_personal_or_role_detail(
    layout: DemoLayout, processes: Any, tmp_path: Path
) -> None:
    """The institution's own signature still works with personal_signers on, unchanged."""
    allow_personal_signers(layout, True)
    processes.start(layout.hospital.config_path)
    lab_certs = layout.lab.root / "certs"
    lab_key = Issued(
        x509.load_pem_x509_certificate((lab_certs / "sign.crt").read_bytes()),
        as2client.load_pair(lab_certs / "sign.crt", lab_certs / "sign.key").key,
    )
    disposition, text = send_signed_by(layout, lab_key, tmp_path, b"MSH|lab key\r")
    assert disposition == "processed"
    (received,) = wait_for_events(layout.hospital.audit_log, "message.received")

    assert "signer_kind" not in received["detail"]
    assert "signer_role" not in received["detail"]
    assert "Signed by" not in text


def test_doctor_is_refused_when_the_peer_does_not_allow_personal_signers(
    layout: DemoLayout, processes: Any, tmp_path: Path
) -> None:
    allow_personal_signers(layout, False)
    processes.start(layout.hospital.config_path)

    disposition, text = send_signed_by(
        layout, doctor(demo_ca(layout)), tmp_path, b"MSH|not allowed\r"
    )

    assert disposition == "processed/error: authentication-failed"
    assert "Signed by" not in text
    assert inbox(layout) == []
    (refused,) = wait_for_events(layout.hospital.audit_log, "signature.failed")
    assert refused["severity"] == "alert"
    assert DOCTOR in refused["reason"]
    assert not events(layout.hospital.audit_log, "message.received")


def test_personal_certificate_from_another_ca_is_refused_even_when_allowed(
    layout: DemoLayout, processes: Any, tmp_path: Path
) -> None:
    allow_personal_signers(layout, True)
    processes.start(layout.hospital.config_path)
    elsewhere = make_ca("Another HPKI CA", now=datetime.now(UTC) - timedelta(days=1))

    disposition, _ = send_signed_by(layout, doctor(elsewhere), tmp_path, b"MSH|foreign CA\r")

    assert disposition == "processed/error: authentication-failed"
    assert inbox(layout) == []
    (refused,) = wait_for_events(layout.hospital.audit_log, "signature.failed")
    assert refused["severity"] == "alert"
    assert DOCTOR in refused["reason"]
    assert "no path" in refused["reason"] and "Another HPKI CA" in refused["reason"]


def test_revoked_doctor_is_refused_even_when_allowed(
    layout: DemoLayout, processes: Any, tmp_path: Path
) -> None:
    allow_personal_signers(layout, True)
    signer = doctor(demo_ca(layout))
    revoke(
        layout, layout.hospital.root / "certs" / "crls" / "loopback" / "ca.crl", signer.certificate
    )
    processes.start(layout.hospital.config_path)

    disposition, _ = send_signed_by(layout, signer, tmp_path, b"MSH|revoked doctor\r")

    assert disposition == "processed/error: authentication-failed"
    assert inbox(layout) == []
    (refused,) = wait_for_events(layout.hospital.audit_log, "signature.failed")
    assert DOCTOR in refused["reason"] and "revoked" in refused["reason"]


def test_another_peers_certificate_does_not_pass_as_a_person_of_this_peer(
    layout: DemoLayout, processes: Any, tmp_path: Path
) -> None:
    """A certificate configured for peer B, signing a message that comes from peer A."""
    allow_personal_signers(layout, True)
    other_sign = tmp_path / "other-sign.crt"
    signer = doctor(demo_ca(layout))
    write_pem(other_sign, signer.certificate)
    clinic = layout.hospital.root / "peers.d" / "clinic.toml"
    lab_text = (layout.hospital.root / "peers.d" / "lab.toml").read_text(encoding="utf-8")
    clinic_text = (
        lab_text.replace('as2_id = "KITA-LAB"', 'as2_id = "MINAMI-CLINIC"')
        .replace("certs/peers/lab/tls.crt", str(other_sign))
        .replace("certs/peers/lab/sign.crt", str(other_sign))
    )
    assert clinic_text.count(str(other_sign)) == 2
    clinic.write_text(clinic_text, encoding="utf-8")
    assert load_config(layout.hospital.config_path).require_peer("clinic")
    processes.start(layout.hospital.config_path)

    disposition, _ = send_signed_by(layout, signer, tmp_path, b"MSH|borrowed\r")

    assert disposition == "processed/error: authentication-failed"
    (refused,) = wait_for_events(layout.hospital.audit_log, "signature.failed")
    assert "certificate of peer 'clinic'" in refused["reason"]


def test_receipt_details_stay_one_line_and_plain_ascii_stays_7bit(tmp_path: Path) -> None:
    from gateway.as2.mdn import Disposition, build_receipt
    from gateway.pki.issue import issue
    from gateway.pki.keypair import KeyPair

    now = datetime.now(UTC)
    ca = make_ca("Receipt CA", now=now - timedelta(days=1))
    ours = issue(ca, "SAKURA-HOSPITAL", purpose="smime-sign", now=now - timedelta(minutes=5))
    built = build_receipt(
        original_message_id="<m1@KITA-LAB>",
        our_as2_id="SAKURA-HOSPITAL",
        peer_as2_id="KITA-LAB",
        disposition=Disposition.PROCESSED,
        mic="abc=, sha-256",
        signing=KeyPair(tmp_path / "c", tmp_path / "k", ours.certificate, ours.key),
        digest="sha256",
        policy=AlgorithmPolicy(),
        at=now,
        details="Signed by CN=Dr A,\r\nX-Injected: 1\r\n\r\n--boundary",
    )
    content_type = dict(built.headers)["Content-Type"]
    assert b"charset=us-ascii" in built.body and b"quoted-printable" not in built.body
    receipt = parse_receipt(
        content_type, built.body, trusted_signers=[ours.certificate], policy=AlgorithmPolicy()
    )
    assert receipt.processed
    lines = receipt_text(content_type, built.body).split("\r\n")
    assert lines[1] == "Signed by CN=Dr A, X-Injected: 1 --boundary"
    assert lines[2:] == [""]
