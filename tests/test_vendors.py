"""Messages made by other AS2 products (Mendelson, IBM Sterling): BER, 3DES, compression.

The files are raw HTTP bodies as received, with the AS2/MIME headers at the
top; they live outside the repository (``../shared/testdata/as2-vendors``).
"""

from __future__ import annotations

import subprocess
from datetime import UTC, datetime
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.serialization import load_pem_private_key

from gateway.cms.mime import get_header, header_param, parse_entity
from gateway.cms.smime import (
    _canonical_readings,
    decompress_entity,
    is_compressed_entity,
    open_envelope,
    split_multipart,
    verify_entity,
)
from gateway.cms.trust import TrustAnchors
from gateway.errors import PolicyError, SignerNotTrustedError
from gateway.policy import LEGACY_ALGORITHMS, AlgorithmPolicy
from tests import testdata

STRICT = AlgorithmPolicy()
ALL_LEGACY = AlgorithmPolicy(accept_legacy=frozenset(LEGACY_ALGORITHMS))


@pytest.fixture(scope="module")
def vendors() -> Path:
    return testdata.AS2_VENDORS.require()


def _cert(vendors: Path, name: str) -> x509.Certificate:
    return x509.load_pem_x509_certificate((vendors / name).read_bytes())


def _our_key(vendors: Path) -> tuple[x509.Certificate, object]:
    pem = (vendors / "cert_test.pem").read_bytes()
    return x509.load_pem_x509_certificate(pem), load_pem_private_key(pem, b"test")


def _body(raw: bytes) -> tuple[str, bytes]:
    headers, body = parse_entity(raw)
    ctype = get_header(headers, "Content-Type")
    assert ctype is not None
    return ctype, body


ENCRYPTED = [
    "mecas2_encrypted.as2",
    "mecas2_signed_encrypted.as2",
    "mecas2_compressed_signed_encrypted.as2",
]


@pytest.mark.parametrize("name", ENCRYPTED)
def test_mendelson_3des_refused_without_compat(vendors: Path, name: str) -> None:
    cert, key = _our_key(vendors)
    ctype, body = _body((vendors / name).read_bytes())
    assert "enveloped-data" in ctype
    assert body[:2] == b"\x30\x80", "Mendelson sends indefinite-length BER"
    with pytest.raises(PolicyError) as exc:
        open_envelope(body, cert, key, policy=STRICT)  # type: ignore[arg-type]
    err = exc.value
    assert err.algorithm == "des-ede3-cbc"
    assert "3DES" in err.rule and "monitored list" in err.rule and "accept_legacy" in err.rule
    assert (
        err.fix is not None and "aes" in err.fix and 'accept_legacy = ["des-ede3-cbc"]' in err.fix
    )


@pytest.mark.parametrize("name", ENCRYPTED)
def test_mendelson_decrypts_with_compat_and_verifies(vendors: Path, name: str) -> None:
    cert, key = _our_key(vendors)
    payload = (vendors / "payload.txt").read_bytes()
    _ctype, body = _body((vendors / name).read_bytes())
    opened = open_envelope(body, cert, key, policy=ALL_LEGACY)  # type: ignore[arg-type]
    assert opened.content_cipher == "des-ede3-cbc"
    assert opened.key_transport == "rsaes-pkcs1-v1_5"
    assert opened.compat_algorithms == ("des-ede3-cbc", "rsaes-pkcs1-v1_5")
    entity = opened.content
    if "signed" in name:
        entity, v = verify_entity(
            entity, trusted_signers=[_cert(vendors, "cert_mecas2_public.pem")], policy=ALL_LEGACY
        )
        assert v.digest == "sha256"
        assert v.signature_algorithm == "rsassa-pkcs1-v1_5"
        assert "mendelson test key 3" in v.signer.subject.rfc4514_string()
    if "compressed" in name:
        assert is_compressed_entity(entity)
        entity = decompress_entity(entity)
        _h, entity = parse_entity(entity)
    elif "signed" in name:
        _h, entity = parse_entity(entity)
    assert entity == payload


@pytest.mark.parametrize("name", ["mecas2_signed.as2", "mecas2_compressed.as2"])
def test_mendelson_signed_verifies(vendors: Path, name: str) -> None:
    raw = (vendors / name).read_bytes()
    entity, v = verify_entity(
        raw, trusted_signers=[_cert(vendors, "cert_mecas2_public.pem")], policy=STRICT
    )
    assert v.digest == "sha256"
    if "compressed" in name:
        entity = decompress_entity(entity)
    assert parse_entity(entity)[1] == (vendors / "payload.txt").read_bytes()


def test_mendelson_signed_refused_for_another_signer(vendors: Path) -> None:
    raw = (vendors / "mecas2_signed.as2").read_bytes()
    with pytest.raises(SignerNotTrustedError, match="mendelson test key 3"):
        verify_entity(
            raw, trusted_signers=[_cert(vendors, "cert_test_public.pem")], policy=ALL_LEGACY
        )


def _sterling_parts(vendors: Path) -> tuple[bytes, bytes]:
    ctype, body = _body((vendors / "sb2bi_signed_cmp.msg").read_bytes())
    boundary = header_param(ctype, "boundary")
    assert boundary
    (first, _alt), (sig_part, _) = split_multipart(body, boundary)
    sig_headers, sig_body = parse_entity(sig_part)
    assert get_header(sig_headers, "Content-Transfer-Encoding") is None  # binary DER
    return first, sig_body


def test_sterling_compressed_signed_sha1_verifies_only_for_compat(
    vendors: Path, tmp_path: Path
) -> None:
    raw = (vendors / "sb2bi_signed_cmp.msg").read_bytes()
    signer = _cert(vendors, "cert_sb2bi_public.pem")
    # SHA-1 (CRYPTREC monitored list): refused, by name, unless the peer is compat
    with pytest.raises(PolicyError) as exc:
        verify_entity(raw, trusted_signers=[signer], policy=STRICT)
    assert exc.value.algorithm == "sha1"
    assert "CRYPTREC" in exc.value.rule and "monitored list" in exc.value.rule
    assert exc.value.fix is not None and "sha256" in exc.value.fix
    assert 'accept_legacy = ["sha1"]' in exc.value.fix
    # from a compat peer: verified (the certificate is pinned; it expired in 2020,
    # which is the PKI layer's concern), the SHA-1 use reported for the audit
    entity, v = verify_entity(raw, trusted_signers=[signer], policy=ALL_LEGACY)
    assert v.signer == signer
    assert v.digest == "sha1" and v.signature_algorithm == "rsassa-pkcs1-v1_5"
    assert v.compat_algorithms == ("sha1",)
    _headers, edi = parse_entity(decompress_entity(entity))
    assert edi.startswith(b"ISA*00*")
    with pytest.raises(SignerNotTrustedError):
        verify_entity(
            raw, trusted_signers=[_cert(vendors, "cert_test_public.pem")], policy=ALL_LEGACY
        )
    # openssl confirms that the first part as we read it (its MIME headers back in
    # canonical CRLF form, the capture turned them into LF) is exactly what Sterling
    # signed, and it is what we verified.
    first, signature = _sterling_parts(vendors)
    canonical = _canonical_readings(first)[0]
    assert entity == canonical
    assert canonical.startswith(b"content-type: application/pkcs7-mime; ")
    assert canonical.split(b"\r\n\r\n", 1)[1] == first.split(b"\n\n", 1)[1]
    (tmp_path / "content").write_bytes(canonical)
    (tmp_path / "sig.der").write_bytes(signature)
    proc = subprocess.run(
        [
            *("openssl", "cms", "-verify", "-noverify", "-binary", "-inform", "DER"),
            *("-in", str(tmp_path / "sig.der"), "-content", str(tmp_path / "content")),
            *("-out", "/dev/null"),
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    assert "Verification successful" in proc.stderr


def test_sterling_compressed_content_reads(vendors: Path) -> None:
    first, _sig = _sterling_parts(vendors)
    assert is_compressed_entity(first)
    inner = decompress_entity(first)
    headers, edi = parse_entity(inner)
    assert (get_header(headers, "Content-Type") or "").lower() == "application/edi-x12"
    assert edi.startswith(b"ISA*00*")
    assert edi.rstrip().endswith(b"~")


def test_sterling_chain_validates_only_inside_its_validity(vendors: Path) -> None:
    signer = _cert(vendors, "cert_sb2bi_public.pem")
    ca_pem = (vendors / "cert_sb2bi_public.ca").read_bytes()
    chain = x509.load_pem_x509_certificates(ca_pem)
    roots = [c for c in chain if c.issuer == c.subject]
    intermediates = [c for c in chain if c.issuer != c.subject]
    anchors = tuple(roots or chain)
    TrustAnchors(anchors, datetime(2018, 1, 26, tzinfo=UTC))(signer, intermediates)
    with pytest.raises(SignerNotTrustedError, match="not valid at 2024"):
        TrustAnchors(anchors, datetime(2024, 1, 1, tzinfo=UTC))(signer, intermediates)


def test_mendelson_mdn_sha1_signature_verifies_only_for_compat(vendors: Path) -> None:
    raw = (vendors / "mecas2_signed.mdn").read_bytes()
    with pytest.raises(PolicyError) as exc:
        verify_entity(
            raw, trusted_signers=[_cert(vendors, "cert_mecas2_public.pem")], policy=STRICT
        )
    assert exc.value.algorithm == "sha1"
    # For a compat peer the SHA-1 signature verifies, but its signer is a self-signed
    # "CN=mecas2" certificate the MDN carries, not cert_mecas2_public.pem: refused
    # unless that certificate is the one pinned (see test_vendor_mdn.py).
    with pytest.raises(SignerNotTrustedError, match="CN=mecas2,"):
        verify_entity(
            raw, trusted_signers=[_cert(vendors, "cert_mecas2_public.pem")], policy=ALL_LEGACY
        )
