"""The demo installation (two gateways, one CA) changed under a test: its CA, a CRL revoking
certificates, a configuration file edited or reloaded, an AS2 POST to the lab and its receipt."""

from __future__ import annotations

import signal
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from gateway.as2.mdn import BuiltReceipt, Disposition, build_receipt, parse_receipt
from gateway.config import load_config
from gateway.demo_run import GatewayProcess, free_ports
from gateway.pki.demo import DemoInstitution, DemoLayout, init_demo
from gateway.pki.issue import Issued, issue, make_ca, make_crl, write_pem
from gateway.policy import AlgorithmPolicy
from tests import as2client
from tests.helpers.audit import events, wait_for_events

# Issued this long ago, the demo's certificates (valid for 825 days) expire in 5 days.
EXPIRING_SOON = timedelta(days=820)


def new_demo(root: Path, *, issued_ago: timedelta = timedelta(0), **options: Any) -> DemoLayout:
    """The demo installation made in ``root``, its two gateways on free ports, its
    certificates issued ``issued_ago``; ``options``: init_demo's (``key_kind``)."""
    hospital_port, lab_port = free_ports(2)
    now = datetime.now(UTC) - issued_ago
    return init_demo(root, now=now, hospital_port=hospital_port, lab_port=lab_port, **options)


def demo_ca(layout: DemoLayout) -> Issued:
    folder = layout.root / "ca"
    key = serialization.load_pem_private_key((folder / "ca.key").read_bytes(), None)
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    return Issued(x509.load_pem_x509_certificate((folder / "ca.crt").read_bytes()), key)


def tls_under_an_intermediate(
    layout: DemoLayout, *, ca_from: datetime, ca_days: int = 3650, leaf_from: datetime
) -> tuple[Issued, Issued]:
    """The hospital's TLS certificate issued (valid from ``leaf_from``) by a CA the demo
    CA issued (valid ``ca_days`` from ``ca_from``): installed as certs/tls.crt, with that
    CA after it, and its key; returns that CA and the certificate."""
    issuing = make_ca("Sakura Issuing CA", now=ca_from, days=ca_days, parent=demo_ca(layout))
    leaf = issue(
        issuing,
        "SAKURA-HOSPITAL",
        purpose="tls",
        now=leaf_from,
        dns_names=("localhost",),
        ip_addresses=("127.0.0.1",),
    )
    certs = layout.hospital.root / "certs"
    write_pem(certs / "tls.crt", [leaf.certificate, issuing.certificate])
    write_pem(certs / "tls.key", leaf.key)
    return issuing, leaf


def revoke(layout: DemoLayout, crl_file: Path, *certs: x509.Certificate) -> None:
    now = datetime.now(UTC)
    crl = make_crl(
        demo_ca(layout),
        now=now - timedelta(minutes=1),
        revoked=[(c.serial_number, now - timedelta(minutes=2)) for c in certs],
        number=2,
    )
    crl_file.write_bytes(crl.public_bytes(serialization.Encoding.PEM))


def wait_handshake_refused(layout: DemoLayout) -> None:
    """Until the hospital refuses a TLS client certificate it no longer accepts."""
    wait_for_events(
        layout.hospital.audit_log,
        "tls.handshake_failed",
        where=lambda r: "not configured for any peer" in r["reason"],
    )


def edit(path: Path, old: str, new: str) -> None:
    text = path.read_text()
    assert old in text, f"{old!r} not in {path}"
    path.write_text(text.replace(old, new, 1))


def reload(proc: GatewayProcess, audit: Path) -> None:
    before = len(events(audit, "config.reloaded"))
    proc.signal(signal.SIGHUP)
    wait_for_events(audit, "config.reloaded", count=before + 1)
    failed = events(audit, "config.reload_failed")
    assert not failed, failed


def set_runtime(config: Path, key: str, value: str) -> None:
    lines = config.read_text().splitlines()
    out = [f"{key} = {value}" if line.startswith(f"{key} =") else line for line in lines]
    assert out != lines, f"{key} not in {config}"
    config.write_text("\n".join(out) + "\n")


def _post(
    layout: DemoLayout,
    sender: DemoInstitution,
    receiver: DemoInstitution,
    headers: tuple[tuple[str, str], ...],
    body: bytes,
    **options: Any,
) -> as2client.Answer:
    certs = sender.root / "certs"
    return as2client.post(
        receiver.port,
        headers,
        body,
        client_cert=certs / "tls.crt",
        client_key=certs / "tls.key",
        ca=layout.ca_certificate,
        **options,
    )


def lab_post(
    layout: DemoLayout, headers: tuple[tuple[str, str], ...], body: bytes, **options: Any
) -> as2client.Answer:
    """An AS2 POST to the hospital's gateway over the lab's TLS connection (its client
    certificate); ``options`` go to :func:`tests.as2client.post` (``timeout``)."""
    return _post(layout, layout.lab, layout.hospital, headers, body, **options)


def hospital_post(
    layout: DemoLayout, headers: tuple[tuple[str, str], ...], body: bytes, **options: Any
) -> as2client.Answer:
    """The same, from the hospital to the lab's gateway."""
    return _post(layout, layout.hospital, layout.lab, headers, body, **options)


def lab_message(
    layout: DemoLayout,
    payload: bytes,
    *,
    sender_as2: str = "KITA-LAB",
    filename: str = "doc.bin",
    service: str | None = None,
) -> tuple[tuple[tuple[str, str], ...], bytes]:
    """The lab's AS2 message of ``payload`` to the hospital, signed and encrypted as the
    lab's gateway sends it (``sender_as2``: the AS2-From it says; ``service``: the one
    it names); its headers and body, for :func:`lab_post` (again, for a resend)."""
    lab = load_config(layout.lab.config_path)
    built = as2client.build(
        payload,
        sender_as2=sender_as2,
        receiver_as2="SAKURA-HOSPITAL",
        signing=lab.smime.signing,
        recipient=lab.require_peer("hospital").encryption_certificates[0],
        filename=filename,
        service=service,
    )
    return built.headers, built.body


def hospital_receipt(
    layout: DemoLayout, message_id: str, mic: str | None, details: str | None = None
) -> BuiltReceipt:
    """A receipt the hospital signs for the lab's ``message_id``: processed, with ``mic``
    (and ``details``, a human-readable explanation, when given)."""
    hospital = load_config(layout.hospital.config_path)
    return build_receipt(
        original_message_id=message_id,
        our_as2_id="SAKURA-HOSPITAL",
        peer_as2_id="KITA-LAB",
        disposition=Disposition.PROCESSED,
        mic=mic,
        signing=hospital.smime.signing,
        digest="sha256",
        policy=AlgorithmPolicy(),
        at=datetime.now(UTC),
        details=details,
    )


def receipt_of(layout: DemoLayout, answer):
    lab = load_config(layout.lab.config_path)
    return parse_receipt(
        answer.content_type,
        answer.body,
        trusted_signers=lab.require_peer("hospital").signing_certificates,
        policy=AlgorithmPolicy(),
    )
