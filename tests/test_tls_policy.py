"""The TLS and certificate rules of the CRYPTREC policy, on real daemons and real
openssl: AES-GCM only, also under TLS 1.3; no CA certificate as a peer's."""

from __future__ import annotations

import asyncio
import re
import socket
import ssl
import subprocess
import types
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization

from gateway.pki import tls
from gateway.pki.demo import DemoLayout
from gateway.pki.issue import issue, make_ca, make_crl, new_key
from gateway.pki.keypair import KeyPair
from gateway.pki.validate import Purpose, RevocationPolicy, validate
from gateway.policy import AlgorithmPolicy
from tests.helpers.audit import wait_for_events


def _s_client(
    layout: DemoLayout, suite: str, *extra: str, groups: str = "P-256"
) -> subprocess.CompletedProcess[bytes]:
    certs = layout.lab.root / "certs"
    return subprocess.run(
        [
            *("openssl", "s_client", "-connect", f"127.0.0.1:{layout.hospital.port}"),
            *("-tls1_3", "-ciphersuites", suite, "-groups", groups),
            *("-cert", str(certs / "tls.crt"), "-key", str(certs / "tls.key")),
            *("-CAfile", str(layout.ca_certificate), "-ign_eof", *extra),
        ],
        input=b"GET /as2 HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
        capture_output=True,
        timeout=30,
        check=False,
    )


def _served(done: subprocess.CompletedProcess[bytes]) -> bool:
    return b"HTTP/1.1 " in done.stdout  # an HTTP answer: the connection was served


def test_tls13_offers_only_the_policys_suites_and_groups(
    layout: DemoLayout, processes: Any
) -> None:
    processes.start(layout.hospital.config_path)
    # A client that prefers ChaCha20 gets AES-GCM (before: ChaCha20, then dropped).
    prefers = _s_client(layout, "TLS_CHACHA20_POLY1305_SHA256:TLS_AES_128_GCM_SHA256")
    assert _served(prefers), prefers.stderr[-400:]
    assert b"Cipher is TLS_AES_128_GCM_SHA256" in prefers.stdout
    # One that offers ChaCha20 only is refused in the handshake, audited.
    only = _s_client(layout, "TLS_CHACHA20_POLY1305_SHA256")
    assert not _served(only)
    wait_for_events(
        layout.hospital.audit_log,
        "tls.handshake_failed",
        where=lambda r: "shared cipher" in r["reason"],
    )
    # X25519 and X448 are not on the CRYPTREC list: a client with only them is refused;
    # one that prefers X25519 is asked for (HelloRetryRequest) and gets P-256.
    for group in ("X25519", "X448"):
        assert not _served(_s_client(layout, "TLS_AES_256_GCM_SHA384", groups=group)), group
    mixed = _s_client(layout, "TLS_AES_256_GCM_SHA384", groups="X25519:P-384")
    assert _served(mixed), mixed.stderr[-400:]
    assert b"Server Temp Key: ECDH, secp384r1" in mixed.stdout or b"P-384" in mixed.stdout


def test_the_server_sends_no_root_certificate(layout: DemoLayout, processes: Any) -> None:
    processes.start(layout.hospital.config_path)
    done = _s_client(layout, "TLS_AES_256_GCM_SHA384", "-showcerts")
    assert _served(done), done.stderr[-400:]
    subjects = re.findall(rb"^ *\d+ s:(.*)$", done.stdout, re.MULTILINE)
    # the leaf alone: it is issued by the root, which the peer holds already
    assert len(subjects) == 1, done.stdout.decode()
    assert done.stdout.count(b"-----BEGIN CERTIFICATE-----") == 1


def test_intermediates_are_sent_and_the_root_is_not(tmp_path: Any) -> None:
    now = datetime.now(UTC)
    root = make_ca("Chain Root", now=now)
    middle = make_ca("Chain Intermediate", now=now, parent=root)
    leaf = issue(middle, "server.chain.test", purpose="tls", now=now, dns_names=["localhost"])
    cert_path, key_path = tmp_path / "tls.crt", tmp_path / "tls.key"
    cert_path.write_bytes(
        b"".join(
            c.public_bytes(serialization.Encoding.PEM)
            for c in (leaf.certificate, middle.certificate, root.certificate)
        )
    )
    key_path.write_bytes(
        leaf.key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    pair = KeyPair(
        cert_path, key_path, leaf.certificate, leaf.key, (middle.certificate, root.certificate)
    )
    assert tls.chain_to_send(pair, [root.certificate]) == [leaf.certificate, middle.certificate]
    # a file with the leaf alone: the intermediate comes from the anchors, the root never
    only_leaf = tmp_path / "leaf.crt"
    only_leaf.write_bytes(leaf.certificate.public_bytes(serialization.Encoding.PEM))
    pair = KeyPair(only_leaf, key_path, leaf.certificate, leaf.key)
    anchors = [root.certificate, middle.certificate]
    assert tls.chain_to_send(pair, anchors) == [leaf.certificate, middle.certificate]


def test_a_ca_certificate_is_not_accepted_as_a_peers_certificate() -> None:
    now = datetime.now(UTC)
    root = make_ca("Root", now=now - timedelta(days=10))
    key = new_key()
    sub_ca = (
        x509.CertificateBuilder()
        .subject_name(x509.Name.from_rfc4514_string("CN=Sub CA"))
        .issuer_name(root.certificate.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(days=1))
        .not_valid_after(now + timedelta(days=100))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(True, True, False, False, False, True, True, False, False),
            critical=True,
        )
        .sign(root.key, hashes.SHA256())
    )
    crl = make_crl(root, now=now - timedelta(hours=1))
    for purpose in (Purpose.TLS_CLIENT, Purpose.SMIME_SIGN):
        result = asyncio.run(
            validate(
                sub_ca,
                anchors=[root.certificate],
                purpose=purpose,
                at=now,
                revocation=RevocationPolicy.REQUIRE,
                crls=[crl],
                policy=AlgorithmPolicy(),
            )
        )
        assert not result.valid
        assert result.reason is not None and "is a CA certificate" in result.reason


@pytest.mark.parametrize("policy", [RevocationPolicy.PREFER, RevocationPolicy.REQUIRE])
def test_a_revoked_certificate_stays_revoked_when_its_crl_goes_stale(
    policy: RevocationPolicy,
) -> None:
    now = datetime.now(UTC)
    ca = make_ca("Regional CA", now=now - timedelta(days=100))
    leaf = issue(ca, "LAB-TLS", purpose="tls", now=now - timedelta(days=50))
    revoked = [(leaf.certificate.serial_number, now - timedelta(days=45))]
    stale = make_crl(ca, now=now - timedelta(days=40), days=30, revoked=revoked)
    result = asyncio.run(
        validate(
            leaf.certificate,
            anchors=[ca.certificate],
            purpose=Purpose.TLS_CLIENT,
            at=now,
            revocation=policy,
            crls=[stale],
            policy=AlgorithmPolicy(),
        )
    )
    assert not result.valid
    assert result.reason is not None and "is revoked since" in result.reason
    assert "past its nextUpdate" in result.reason
    # Another issuer's stale CRL (or a forged one) listing the same serial proves nothing.
    other = make_ca("Other CA", now=now - timedelta(days=100))
    foreign = make_crl(other, now=now - timedelta(days=40), days=30, revoked=revoked)
    if policy is RevocationPolicy.PREFER:
        lenient = asyncio.run(
            validate(
                leaf.certificate,
                anchors=[ca.certificate],
                purpose=Purpose.TLS_CLIENT,
                at=now,
                revocation=policy,
                crls=[foreign],
                policy=AlgorithmPolicy(),
            )
        )
        assert lenient.valid, lenient.reason


def _context_under_system_policy(protocol: int) -> ssl.SSLContext:
    """An SSLContext as a Python built to defer to the system's OpenSSL policy creates it
    (``--with-ssl-default-suites=openssl``, as some distributions do) on a system whose
    policy is at level 0.  This Python sets level 2 itself, so that build is simulated."""
    context = ssl.SSLContext(protocol)
    context.set_ciphers("DEFAULT:@SECLEVEL=0")
    return context


def test_the_tls_security_level_does_not_follow_a_lowered_system_policy(
    layout: DemoLayout, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A 1024-bit DH group or RSA key must not get into a handshake, whatever the system's
    crypto policy: the contexts set OpenSSL security level 2 (112 bits) themselves."""
    certs = layout.lab.root / "certs"
    own = x509.load_pem_x509_certificate((certs / "tls.crt").read_bytes())
    anchor = x509.load_pem_x509_certificate(layout.ca_certificate.read_bytes())
    key = serialization.load_pem_private_key((certs / "tls.key").read_bytes(), password=None)
    identity = KeyPair(certs / "tls.crt", certs / "tls.key", own, key)  # type: ignore[arg-type]
    system_policy_ssl = types.SimpleNamespace(**vars(ssl))
    system_policy_ssl.SSLContext = _context_under_system_policy
    monkeypatch.setattr(tls, "ssl", system_policy_ssl)
    assert _context_under_system_policy(ssl.PROTOCOL_TLS_CLIENT).security_level == 0
    for version in ("1.2", "1.3"):
        assert tls.client_context(identity, [anchor], [anchor], version).security_level == 2
        assert tls.server_context(identity, [anchor], [anchor], version).security_level == 2


def _openssl_server(layout: DemoLayout, *options: str) -> tuple[subprocess.Popen[bytes], int]:
    """``openssl s_server`` with the hospital's TLS certificate, requiring a client one."""
    from gateway.demo_run import free_port

    certs = layout.hospital.root / "certs"
    port = free_port()
    server = subprocess.Popen(
        [
            *("openssl", "s_server", "-accept", f"127.0.0.1:{port}", "-naccept", "1"),
            *("-cert", str(certs / "tls.crt"), "-key", str(certs / "tls.key")),
            *("-CAfile", str(layout.ca_certificate), "-Verify", "1", "-www", *options),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    assert server.stdout is not None
    for line in server.stdout:  # it says ACCEPT once it listens
        if line.startswith(b"ACCEPT"):
            return server, port
    raise AssertionError("openssl s_server did not start")


def _connect(layout: DemoLayout, port: int) -> str:
    """Our client context to the hospital; the cipher suite negotiated."""
    from gateway.config import load_config

    lab = load_config(layout.lab.config_path)
    hospital = lab.require_peer("hospital")
    zone = next(z for z in lab.zones if z.name == hospital.zone)
    context = tls.client_context(
        lab.tls.identity, zone.trust_anchors, hospital.tls_certificates, "1.3"
    )
    with (
        socket.create_connection(("127.0.0.1", port), timeout=30) as raw,
        context.wrap_socket(raw, server_hostname="127.0.0.1") as conn,
    ):
        return str((conn.cipher() or ("",))[0])


@pytest.mark.parametrize(
    ("options", "refused"),
    [
        (("-ciphersuites", "TLS_CHACHA20_POLY1305_SHA256"), True),
        (("-groups", "X25519"), True),
        (("-groups", "X448:X25519"), True),
        (("-ciphersuites", "TLS_CHACHA20_POLY1305_SHA256:TLS_AES_128_GCM_SHA256"), False),
        (("-groups", "X25519:P-384"), False),
    ],
)
def test_our_client_offers_only_the_policys_suites_and_groups(
    layout: DemoLayout, options: tuple[str, ...], refused: bool
) -> None:
    server, port = _openssl_server(layout, *options)
    try:
        if refused:
            with pytest.raises(ssl.SSLError):
                _connect(layout, port)
        else:
            assert _connect(layout, port) in tls.TLS13_SUITES
    finally:
        server.kill()
        server.wait(30)
