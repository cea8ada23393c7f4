"""The acceptance list of refusals, on messages made by ``openssl cms``.

Each case must fail with its own error class and a message that names the
input, the rule and the fix.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from asn1crypto import cms as asn1_cms
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from gateway.cms import decrypt, verify
from gateway.errors import (
    DecryptionError,
    MalformedMessageError,
    MedgwError,
    PolicyError,
    SignatureError,
)
from tests.helpers.cms_pki import ALL_LEGACY, NOT_AFTER, NOT_BEFORE, STRICT, Pki, build_pki
from tests.helpers.openssl_cms import (
    PAYLOAD,
    openssl_encrypted,
    openssl_signed,
)

pytestmark = pytest.mark.skipif(shutil.which("openssl") is None, reason="needs openssl on PATH")


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return build_pki(tmp_path_factory.mktemp("pki-negative"))


def _has_fix(exc: MedgwError) -> None:
    assert exc.fix, f"error without a fix: {exc}"


def test_tampered_content(pki: Pki, tmp_path: Path) -> None:
    der = openssl_signed(pki, tmp_path, "p256")
    bad = der.replace(b"4.1|mmol", b"9.1|mmol")
    assert bad != der
    with pytest.raises(SignatureError) as exc:
        verify(bad, trusted_signers=[pki["p256"].cert], policy=STRICT)
    assert "content does not match its signature (messageDigest)" in exc.value.message
    assert f"{len(PAYLOAD)}-byte content" in exc.value.message
    assert "p256.medgw.test" in exc.value.message
    _has_fix(exc.value)


def test_tampered_signed_attribute(pki: Pki, tmp_path: Path) -> None:
    der = openssl_signed(pki, tmp_path, "rsa3072", "-keyopt", "rsa_padding_mode:pss")
    si = asn1_cms.ContentInfo.load(der)["content"]["signer_infos"][0]
    times = [a for a in si["signed_attrs"] if a["type"].native == "signing_time"]
    encoded = times[0]["values"][0].dump()  # UTCTime: 17 0d YYMMDDhhmmssZ
    assert encoded[0] == 0x17
    altered = encoded[:2] + b"01" + encoded[4:]  # back-date the signature to 2001
    assert der.count(encoded) == 1
    bad = der.replace(encoded, altered)
    with pytest.raises(SignatureError) as exc:
        verify(bad, trusted_signers=[pki["rsa3072"].cert], policy=STRICT)
    assert "rsassa-pss signature over the signed attributes does not verify" in exc.value.message
    assert "rsa3072.medgw.test" in exc.value.message
    _has_fix(exc.value)


def _impostor(pki: Pki, name: str) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    """A certificate naming ``name``'s issuer and serial, with another EC key."""
    real = pki[name].cert
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(real.subject)
        .issuer_name(real.issuer)
        .public_key(key.public_key())
        .serial_number(real.serial_number)
        .not_valid_before(NOT_BEFORE)
        .not_valid_after(NOT_AFTER)
        .sign(key, hashes.SHA256())
    )
    return cert, key


@pytest.mark.parametrize("recipient", ["rsa2048", "p256"])
def test_wrong_recipient_key(pki: Pki, tmp_path: Path, recipient: str) -> None:
    der = openssl_encrypted(pki, tmp_path, recipient, "-aes-256-gcm")
    if recipient.startswith("rsa"):
        # the rogue party has rsa2048's issuer and serial but its own RSA key
        cert, key = pki["rogue"].cert, pki["rogue"].key
        rule = "cannot be decrypted with our private key (rsaes-oaep)"
    else:
        cert, key = _impostor(pki, recipient)
        rule = "cannot be unwrapped (ECDH ecdh)"
    with pytest.raises(DecryptionError) as exc:
        decrypt(der, cert, key, policy=STRICT)
    assert rule in exc.value.message
    assert f"serial 0x{cert.serial_number:x}" in exc.value.message
    assert exc.value.fix and "private key matches" in exc.value.fix


@pytest.mark.parametrize("stream", [False, True], ids=["der", "ber-stream"])
@pytest.mark.parametrize("kind", ["signed", "enveloped"])
def test_truncated_input(pki: Pki, tmp_path: Path, kind: str, stream: bool) -> None:
    extra = ["-stream"] if stream else []
    if kind == "signed":
        der = openssl_signed(pki, tmp_path, "p384", *extra)
    else:
        der = openssl_encrypted(pki, tmp_path, "p384", "-aes-128-cbc", *extra)
    assert (der[1] == 0x80) is stream
    for cut in (1, 2, 17, len(der) // 2, len(der) - 1):
        short = der[:cut]
        with pytest.raises(MalformedMessageError) as exc:
            if kind == "signed":
                verify(short, trusted_signers=[pki["p384"].cert], policy=STRICT)
            else:
                decrypt(short, pki["p384"].cert, pki["p384"].key, policy=STRICT)
        if kind == "signed":
            assert f"({cut} bytes)" in exc.value.message
        else:  # read as a stream, like the daemon's file path: where it ends
            assert "ends early at byte" in exc.value.message, exc.value.message
            assert "truncated" in exc.value.message
        assert exc.value.fix and "truncated" in exc.value.fix


def test_sha1_signature_without_compat(pki: Pki, tmp_path: Path) -> None:
    der = openssl_signed(pki, tmp_path, "rsa2048", "-md", "sha1")
    with pytest.raises(PolicyError) as exc:
        verify(der, trusted_signers=[pki["rsa2048"].cert], policy=STRICT)
    assert exc.value.algorithm == "sha1"
    assert "CRYPTREC" in exc.value.rule and "monitored list" in exc.value.rule
    assert (
        exc.value.fix and "sha256" in exc.value.fix and 'accept_legacy = ["sha1"]' in exc.value.fix
    )
    # the same message is accepted from a compat peer, and the use reported
    out = verify(der, trusted_signers=[pki["rsa2048"].cert], policy=ALL_LEGACY)
    assert out.content == PAYLOAD
    assert out.compat_algorithms == ("sha1",)


def test_rsa1024_signer(pki: Pki, tmp_path: Path) -> None:
    der = openssl_signed(pki, tmp_path, "rsa1024")
    for policy in (STRICT, ALL_LEGACY):
        with pytest.raises(PolicyError) as exc:
            verify(der, trusted_signers=[pki["rsa1024"].cert], policy=policy)
        assert exc.value.algorithm == "RSA-1024 (signature key)"
        assert "at least 2048 bits" in exc.value.rule
        assert exc.value.fix and "3072" in exc.value.fix


def test_3des_without_compat(pki: Pki, tmp_path: Path) -> None:
    der = openssl_encrypted(pki, tmp_path, "rsa3072", "-des3")
    with pytest.raises(PolicyError) as exc:
        decrypt(der, pki["rsa3072"].cert, pki["rsa3072"].key, policy=STRICT)
    assert exc.value.algorithm == "des-ede3-cbc"
    assert "3DES is on the CRYPTREC monitored list" in exc.value.rule
    assert exc.value.fix and 'accept_legacy = ["des-ede3-cbc"]' in exc.value.fix
    # the same message is accepted from a compat peer
    out = decrypt(der, pki["rsa3072"].cert, pki["rsa3072"].key, policy=ALL_LEGACY)
    assert out.content == PAYLOAD
    assert out.compat_algorithms == ("des-ede3-cbc",)


def test_signature_by_a_key_other_than_the_certificates(pki: Pki, tmp_path: Path) -> None:
    # "rogue" names rsa2048's issuer and serial but holds another key: the
    # signer identifier points at the certificate we pin, the signature does not.
    der = openssl_signed(pki, tmp_path, "rogue")
    with pytest.raises(SignatureError) as exc:
        verify(der, trusted_signers=[pki["rsa2048"].cert], policy=STRICT)
    assert "rsassa-pkcs1-v1_5 signature over the signed attributes does not verify" in str(
        exc.value
    )
    assert exc.value.fix and "signed with another key" in exc.value.fix


def test_certificate_swapped_in_the_message(pki: Pki, tmp_path: Path) -> None:
    # a message signed by other-rsa whose certificate set is replaced by the
    # pinned certificate's, and the signer identifier rewritten to it
    der = openssl_signed(pki, tmp_path, "other-rsa")
    ci = asn1_cms.ContentInfo.load(der)
    sd = ci["content"]
    pinned = pki["rsa2048"].cert
    a = asn1_cms.Certificate.load(pinned.public_bytes(serialization.Encoding.DER))
    sd["certificates"] = [asn1_cms.CertificateChoices({"certificate": a})]
    si = sd["signer_infos"][0]
    si["sid"] = asn1_cms.SignerIdentifier(
        {
            "issuer_and_serial_number": asn1_cms.IssuerAndSerialNumber(
                {"issuer": a.issuer, "serial_number": a.serial_number}
            )
        }
    )
    bad = ci.dump(force=True)
    with pytest.raises(SignatureError, match="does not verify"):
        verify(bad, trusted_signers=[pinned], policy=STRICT)


@pytest.mark.parametrize(
    ("signer", "claimed"), [("p256", "sha384_ecdsa"), ("rsa2048", "sha384_rsa")]
)
def test_a_signature_algorithm_naming_another_digest_is_refused(
    pki: Pki, tmp_path: Path, signer: str, claimed: str
) -> None:
    # signed with SHA-256; the signature algorithm rewritten to name SHA-384
    der = openssl_signed(pki, tmp_path, signer)
    ci = asn1_cms.ContentInfo.load(der)
    si = ci["content"]["signer_infos"][0]
    assert si["digest_algorithm"]["algorithm"].native == "sha256"
    si["signature_algorithm"] = asn1_cms.SignedDigestAlgorithm({"algorithm": claimed})
    with pytest.raises(SignatureError) as exc:
        verify(ci.dump(force=True), trusted_signers=[pki[signer].cert], policy=STRICT)
    assert f"signature algorithm {claimed} does not match digest algorithm sha256" in str(exc.value)
    _has_fix(exc.value)
