"""A refused TLS client learns why, the way any TLS server tells it: an alert.

The partner's administrator must be able to tell "your certificate is not from a
CA we trust" from "it expired", "it is not the one configured for you" or "the
gateway crashed".  ``openssl s_client`` is the reference client: it prints the
alert it received.  Every refusal stays audited (``tls.handshake_failed``).
"""

from __future__ import annotations

import subprocess
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from gateway.demo_run import read_audit, wait_until
from gateway.pki.demo import DemoLayout
from gateway.pki.issue import Issued, issue, make_ca, write_pem

NOW = datetime.now(UTC)


def _demo_ca(layout: DemoLayout) -> Issued:
    folder = layout.root / "ca"
    key = serialization.load_pem_private_key((folder / "ca.key").read_bytes(), None)
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    return Issued(x509.load_pem_x509_certificate((folder / "ca.crt").read_bytes()), key)


def _client_certificate(layout: DemoLayout, kind: str, folder: Path) -> tuple[Path, Path] | None:
    """The certificate and key a client presents; None: none."""
    certs = layout.lab.root / "certs"
    if kind == "none":
        return None
    if kind == "configured":
        return certs / "tls.crt", certs / "tls.key"
    ca = _demo_ca(layout)
    issued = {
        "foreign-ca": lambda: issue(
            make_ca("Some Other CA", now=NOW), "KITA-LAB", purpose="tls", now=NOW
        ),
        "expired": lambda: issue(
            ca, "KITA-LAB", purpose="tls", now=NOW - timedelta(days=90), days=30
        ),
        "not-pinned": lambda: issue(ca, "KITA-LAB", purpose="tls", now=NOW),
        "wrong-purpose": lambda: issue(ca, "KITA-LAB", purpose="smime-sign", now=NOW),
        "not-yet-valid": lambda: issue(ca, "KITA-LAB", purpose="tls", now=NOW + timedelta(days=3)),
    }[kind]()
    write_pem(folder / f"{kind}.crt", issued.certificate)
    write_pem(folder / f"{kind}.key", issued.key)
    return folder / f"{kind}.crt", folder / f"{kind}.key"


def s_client(
    layout: DemoLayout, presented: tuple[Path, Path] | None, *extra: str, send: str = ""
) -> str:
    """openssl s_client's account of a connection to the hospital's listener (``send``
    written once it is up): it reads until the server closes (``-ign_eof``), so an
    alert sent is an alert printed."""
    command = [
        "openssl",
        "s_client",
        "-connect",
        f"127.0.0.1:{layout.hospital.port}",
        "-CAfile",
        str(layout.ca_certificate),
        "-servername",
        "localhost",
        "-ign_eof",
        *extra,
    ]
    if presented is not None:
        command += ["-cert", str(presented[0]), "-key", str(presented[1])]
    done = subprocess.run(
        command, input=send, capture_output=True, text=True, timeout=30, check=False
    )
    return done.stdout + done.stderr


@pytest.mark.parametrize(
    ("kind", "alert", "audited"),
    [
        (
            "none",
            "alert certificate required",
            "client presented no certificate (peer did not return a certificate): every "
            "listener requires one (mutual TLS)",
        ),
        (
            "foreign-ca",
            "alert unknown ca",
            ", refused: unable to get local issuer certificate (it does not chain to a trust "
            "anchor of the listener's zone)",
        ),
        (
            "expired",
            "alert certificate expired",
            ", refused: certificate has expired (its notAfter has passed: the peer must renew "
            "it, or this host's clock is ahead)",
        ),
        ("not-pinned", "alert bad certificate", ", which is not configured for any peer"),
        (
            "wrong-purpose",
            "alert unsupported certificate",
            ", refused: unsuitable certificate purpose (its keyUsage or extendedKeyUsage does "
            "not allow TLS client authentication)",
        ),
        (
            "not-yet-valid",
            "alert bad certificate",
            ", refused: certificate is not yet valid (its notBefore is still ahead (or this "
            "host's clock is behind))",
        ),
    ],
)
def test_a_refused_client_gets_the_alert_a_tls_server_sends_and_the_refusal_is_audited(
    layout: DemoLayout, processes: Any, tmp_path: Path, kind: str, alert: str, audited: str
) -> None:
    """The record names the certificate presented by its SHA-256, then the subject it
    claims (unverified: an impostor's names the partner it poses as), and says why in
    plain words."""
    processes.start(layout.hospital.config_path)
    presented = _client_certificate(layout, kind, tmp_path)
    output = s_client(layout, presented)
    assert alert in output, output
    [failed] = wait_until(
        lambda: [
            r for r in read_audit(layout.hospital.audit_log) if r["event"] == "tls.handshake_failed"
        ],
        30,
        "the refusal audited",
    )
    assert failed["severity"] == "alert"
    if presented is None:
        assert failed["reason"] == audited
    else:
        cert = x509.load_pem_x509_certificate(presented[0].read_bytes())
        sha256 = cert.fingerprint(hashes.SHA256()).hex()
        named = f"client presented a certificate (sha256:{sha256}) claiming CN=KITA-LAB"
        assert failed["reason"] == named + audited, failed["reason"]
        assert sha256 not in output  # nothing more goes to the client than the alert
    assert "_ssl.c" not in failed["reason"] and "[SSL" not in failed["reason"]
    assert "refused" not in output and "requires one" not in output


def test_a_protocol_the_zone_refuses_gets_the_protocol_version_alert(
    layout: DemoLayout, processes: Any
) -> None:
    processes.start(layout.hospital.config_path)  # the demo zone: TLS 1.3 only
    output = s_client(layout, _client_certificate(layout, "configured", Path()), "-tls1_2")
    assert "alert protocol version" in output, output


def test_the_configured_client_gets_no_alert(layout: DemoLayout, processes: Any) -> None:
    processes.start(layout.hospital.config_path)
    request = "GET /as2 HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"
    output = s_client(layout, _client_certificate(layout, "configured", Path()), send=request)
    assert "HTTP/1.1 405" in output, output  # past TLS: the HTTP layer answers
    assert "alert" not in output.lower(), output
    assert "Verify return code: 0 (ok)" in output
    assert not [
        r for r in read_audit(layout.hospital.audit_log) if r["event"] == "tls.handshake_failed"
    ]
