"""TLS client certificates accepted by a pinned public key (``tls_spki_pins``).

A peer that renews its TLS certificate with the same key is still accepted
without a configuration change; an unlisted certificate is judged in full
(path validation, revocation) before any request is read.
"""

from __future__ import annotations

import asyncio
import hashlib
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, cast

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from gateway.config import load_config
from gateway.daemon.as2_handler import PINNED_RECHECK_SECONDS, PinnedVerdicts
from gateway.daemon.state import RuntimeState
from gateway.demo_run import drop_file
from gateway.errors import ConfigError
from gateway.pki.demo import DemoLayout
from gateway.pki.issue import Issued, make_crl, write_pem
from gateway.pki.tls import certificate_fingerprint, spki_fingerprint
from tests.clocks import SetClock
from tests.helpers.audit import events, wait_for_events
from tests.helpers.demo import demo_ca, edit


def lab_tls(layout: DemoLayout) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    certs = layout.lab.root / "certs"
    cert = x509.load_pem_x509_certificate((certs / "tls.crt").read_bytes())
    key = serialization.load_pem_private_key((certs / "tls.key").read_bytes(), None)
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    return cert, key


def reissue(ca: Issued, old: x509.Certificate, key: ec.EllipticCurvePrivateKey) -> x509.Certificate:
    """A new certificate (new serial and validity) with ``old``'s subject and extensions."""
    now = datetime.now(UTC) - timedelta(minutes=1)
    builder = (
        x509.CertificateBuilder()
        .subject_name(old.subject)
        .issuer_name(old.issuer)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now)
        .not_valid_after(now + timedelta(days=30))
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
    )
    for extension in old.extensions:
        if not isinstance(extension.value, x509.SubjectKeyIdentifier):
            builder = builder.add_extension(extension.value, critical=extension.critical)
    return builder.sign(ca.key, hashes.SHA256())


def pin_lab_key(layout: DemoLayout, pin: str) -> None:
    edit(
        layout.hospital.root / "peers.d" / "lab.toml",
        "tls_spki_pins = []",
        f'tls_spki_pins = ["{pin}"]',
    )


def renew_lab_tls(
    layout: DemoLayout, key: ec.EllipticCurvePrivateKey | None = None
) -> x509.Certificate:
    """The lab's gateway switches to a new TLS certificate (same key unless ``key``)."""
    old, own_key = lab_tls(layout)
    new = reissue(demo_ca(layout), old, key or own_key)
    if key is not None:
        write_pem(layout.lab.root / "certs" / "tls.key", key)
    write_pem(layout.lab.root / "certs" / "tls.crt", new)
    return new


# -- configuration -------------------------------------------------------------


def test_pin_is_the_sha256_of_the_subject_public_key_info() -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    spki = key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    assert spki_fingerprint(self_signed(key)) == hashlib.sha256(spki).hexdigest()


def self_signed(key: ec.EllipticCurvePrivateKey) -> x509.Certificate:
    name = x509.Name([x509.NameAttribute(x509.NameOID.COMMON_NAME, "PIN-TEST")])
    now = datetime.now(UTC)
    return (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(1)
        .not_valid_before(now)
        .not_valid_after(now + timedelta(days=1))
        .sign(key, hashes.SHA256())
    )


def test_pins_are_read_and_normalised(layout: DemoLayout) -> None:
    cert, _ = lab_tls(layout)
    pin = spki_fingerprint(cert)
    pin_lab_key(layout, pin.upper())
    peer = load_config(layout.hospital.config_path).require_peer("lab")
    assert peer.tls_spki_pins == (pin,)


@pytest.mark.parametrize("bad", ["abc", "g" * 64, "a" * 63, "a" * 65, "sha256:" + "a" * 64])
def test_malformed_pin_is_a_config_error_with_file_key_and_fix(
    layout: DemoLayout, bad: str
) -> None:
    pin_lab_key(layout, bad)
    with pytest.raises(ConfigError) as caught:
        load_config(layout.hospital.config_path)
    problems = [p for p in caught.value.problems if p.key == "tls_spki_pins"]
    assert len(problems) == 1, caught.value.problems
    assert problems[0].file.endswith("lab.toml")
    assert "64 hexadecimal digits" in problems[0].message
    assert "SubjectPublicKeyInfo" in problems[0].fix and "sha256sum" in problems[0].fix


def test_pin_listed_twice_is_a_config_error(layout: DemoLayout) -> None:
    edit(
        layout.hospital.root / "peers.d" / "lab.toml",
        "tls_spki_pins = []",
        f'tls_spki_pins = ["{"a" * 64}", "{"A" * 64}"]',
    )
    with pytest.raises(ConfigError) as caught:
        load_config(layout.hospital.config_path)
    assert any(
        p.key == "tls_spki_pins" and "listed twice" in p.message for p in caught.value.problems
    )


def _second_peer(layout: DemoLayout, pin: str) -> Path:
    """peers.d/other.toml: another peer with its own TLS certificate, pinning ``pin``."""
    ca = demo_ca(layout)
    key = ec.generate_private_key(ec.SECP256R1())
    other_cert = reissue(ca, lab_tls(layout)[0], key)
    folder = layout.hospital.root / "certs" / "peers" / "other"
    folder.mkdir(parents=True)
    write_pem(folder / "tls.crt", other_cert)
    text = (layout.hospital.root / "peers.d" / "lab.toml").read_text()
    text = text.replace("certs/peers/lab/tls.crt", "certs/peers/other/tls.crt")
    text = text.replace('as2_id = "KITA-LAB"', 'as2_id = "OTHER-CLINIC"')
    assert "OTHER-CLINIC" in text and "peers/other/tls.crt" in text
    path = layout.hospital.root / "peers.d" / "other.toml"
    path.write_text(text.replace("tls_spki_pins = []", f'tls_spki_pins = ["{pin}"]'))
    return path


def test_same_pin_for_two_peers_is_a_config_error(layout: DemoLayout) -> None:
    pin = "b" * 64
    pin_lab_key(layout, pin)
    _second_peer(layout, pin)
    with pytest.raises(ConfigError) as caught:
        load_config(layout.hospital.config_path)
    clash = [p for p in caught.value.problems if p.key == "tls_spki_pins"]
    assert len(clash) == 1, caught.value.problems
    assert "exactly one peer" in clash[0].message and clash[0].fix


def test_pinning_the_key_of_another_peers_listed_certificate_is_a_config_error(
    layout: DemoLayout,
) -> None:
    _second_peer(layout, spki_fingerprint(lab_tls(layout)[0]))
    with pytest.raises(ConfigError) as caught:
        load_config(layout.hospital.config_path)
    clash = [p for p in caught.value.problems if p.key == "tls_spki_pins"]
    assert len(clash) == 1 and clash[0].file.endswith("other.toml"), caught.value.problems
    assert "lab.toml" in clash[0].message


# -- real daemons --------------------------------------------------------------


def test_renewed_certificate_with_the_pinned_key_is_accepted_without_listing_it(
    layout: DemoLayout, processes: Any
) -> None:
    old, _ = lab_tls(layout)
    pin_lab_key(layout, spki_fingerprint(old))
    new = renew_lab_tls(layout)
    listed = load_config(layout.hospital.config_path).require_peer("lab").tls_certificates
    assert certificate_fingerprint(new) not in {certificate_fingerprint(c) for c in listed}

    processes.start(layout.hospital.config_path)
    processes.start(layout.lab.config_path)
    drop_file(layout.lab.outbox_dir / "hospital", "renewed.hl7", b"MSH|renewed\r")
    wait_for_events(layout.lab.audit_log, "receipt.received")
    assert (layout.hospital.inbox_dir / "lab" / "renewed.hl7").read_bytes() == b"MSH|renewed\r"
    assert not events(layout.hospital.audit_log, "peer.authentication_failed")
    assert not events(layout.hospital.audit_log, "tls.handshake_failed")


def test_same_subject_with_another_key_is_refused_at_the_handshake(
    layout: DemoLayout, processes: Any
) -> None:
    old, _ = lab_tls(layout)
    pin_lab_key(layout, spki_fingerprint(old))
    renew_lab_tls(layout, key=ec.generate_private_key(ec.SECP256R1()))

    processes.start(layout.hospital.config_path)
    processes.start(layout.lab.config_path)
    drop_file(layout.lab.outbox_dir / "hospital", "impostor.hl7", b"MSH|x\r")
    refused = wait_for_events(
        layout.hospital.audit_log,
        "tls.handshake_failed",
        where=lambda r: "not configured for any peer" in r["reason"],
    )

    assert refused[0]["severity"] == "alert"
    assert not (layout.hospital.inbox_dir / "lab" / "impostor.hl7").exists()


def test_revoked_certificate_with_the_pinned_key_is_refused_and_audited(
    layout: DemoLayout, processes: Any
) -> None:
    old, _ = lab_tls(layout)
    pin_lab_key(layout, spki_fingerprint(old))
    new = renew_lab_tls(layout)
    now = datetime.now(UTC)
    crl = make_crl(
        demo_ca(layout),
        now=now - timedelta(minutes=1),
        revoked=[(new.serial_number, now - timedelta(minutes=1))],
        number=2,
    )
    (layout.hospital.root / "certs" / "crls" / "loopback" / "ca.crl").write_bytes(
        crl.public_bytes(serialization.Encoding.PEM)
    )

    processes.start(layout.hospital.config_path)
    processes.start(layout.lab.config_path)
    drop_file(layout.lab.outbox_dir / "hospital", "revoked.hl7", b"MSH|x\r")
    refused = wait_for_events(layout.hospital.audit_log, "peer.authentication_failed")
    assert refused[0]["peer"] == "lab" and refused[0]["severity"] == "alert"
    assert "revoked" in refused[0]["reason"].lower()
    assert refused[0]["detail"]["sha256"] == certificate_fingerprint(new)
    assert not (layout.hospital.inbox_dir / "lab" / "revoked.hl7").exists()
    # The listed (old) certificate is not revoked and stays acceptable.
    assert not [
        r
        for r in events(layout.hospital.audit_log, "peer.certificate_rejected")
        if r["detail"]["purpose"] == "tls-client"
    ]


def test_a_pinned_certificate_is_judged_once_per_connection_not_per_request(
    layout: DemoLayout, processes: Any
) -> None:
    old, _ = lab_tls(layout)
    pin_lab_key(layout, spki_fingerprint(old))
    new = renew_lab_tls(layout)
    hospital = processes.start(layout.hospital.config_path)
    processes.start(layout.lab.config_path)
    documents = 6
    for number in range(documents):  # one after the other: the lab keeps its connection
        drop_file(layout.lab.outbox_dir / "hospital", f"doc{number}.hl7", b"MSH|%d\r" % number)
        wait_for_events(layout.lab.audit_log, "receipt.received", count=number + 1)

    delivered = 0

    def all_delivered(line: dict[str, Any]) -> bool:  # logged after each request's check
        nonlocal delivered
        delivered += line.get("event") == "message.delivered"
        return delivered == documents

    hospital.wait_for(all_delivered, 30)
    judged = [line for line in hospital.lines if line.get("event") == "peer.pinned_key_accepted"]
    assert judged and all(line["sha256"] == certificate_fingerprint(new) for line in judged)
    assert len(judged) < documents  # once per connection, not once per request
    assert not events(layout.hospital.audit_log, "peer.authentication_failed")


class _Connection(asyncio.Transport):
    """A connection as the handler sees it (only its identity matters here)."""


def test_a_pinned_verdict_holds_on_its_connection_under_the_same_trust_for_a_minute(
    layout: DemoLayout,
) -> None:
    config = load_config(layout.hospital.config_path)
    peer = config.require_peer("lab")
    cert, _ = lab_tls(layout)  # valid for far longer than a minute
    clock = SetClock(datetime.now(UTC))
    verdicts = PinnedVerdicts(clock)
    state, reloaded = cast(RuntimeState, object()), cast(RuntimeState, object())
    connection, other = _Connection(), _Connection()
    assert verdicts.peer(connection, state) is None  # never judged: judge it
    verdicts.accepted(connection, state, peer, cert)

    clock.at += timedelta(seconds=PINNED_RECHECK_SECONDS - 1)
    assert verdicts.peer(connection, state) is peer
    assert verdicts.peer(other, state) is None  # another connection is judged on its own
    assert verdicts.peer(None, state) is None
    assert verdicts.peer(connection, reloaded) is None  # a reload or trust change: again
    clock.at += timedelta(seconds=1)
    assert verdicts.peer(connection, state) is None  # a minute on: judged again


def test_a_pinned_verdict_never_outlives_the_certificate(layout: DemoLayout) -> None:
    peer = load_config(layout.hospital.config_path).require_peer("lab")
    cert, _ = lab_tls(layout)
    clock = SetClock(cert.not_valid_after_utc - timedelta(seconds=10))
    verdicts = PinnedVerdicts(clock)
    state = cast(RuntimeState, object())
    connection = _Connection()
    verdicts.accepted(connection, state, peer, cert)
    clock.at += timedelta(seconds=9)
    assert verdicts.peer(connection, state) is peer
    clock.at += timedelta(seconds=1)
    assert verdicts.peer(connection, state) is None  # expired: judged (and refused) again
