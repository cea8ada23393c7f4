"""Encodings the CMS engine must see through: the same name in another string type,
signed attributes received in another encoding than the one signed, and the DER
we write directly instead of through asn1crypto's builder."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import pytest
from asn1crypto import algos, core
from asn1crypto import cms as asn1_cms
from asn1crypto import x509 as asn1_x509
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.name import _ASN1Type
from cryptography.x509.oid import NameOID

from gateway.cms import decrypt, encrypt, sign, verify
from gateway.cms.common import matches_issuer_serial
from gateway.cms.envelope_algorithms import CIPHERS, EccCmsSharedInfo, GCMParameters, _shared_info
from gateway.cms.enveloping import content_algorithm_der
from gateway.errors import SignatureError, SignerNotTrustedError
from gateway.policy import AlgorithmPolicy

STRICT = AlgorithmPolicy()
AT = datetime(2025, 6, 1, 9, 30, 15, tzinfo=UTC)
VALID = (datetime(2024, 1, 1, tzinfo=UTC), datetime(2049, 12, 31, tzinfo=UTC))


def _printable_name(cn: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Medgw Test", _ASN1Type.PrintableString),
            x509.NameAttribute(NameOID.COMMON_NAME, cn, _ASN1Type.PrintableString),
        ]
    )


def _utf8_name(cn: str) -> Any:
    """The same name as :func:`_printable_name`, as UTF8String and in other case."""
    return asn1_x509.Name.build({"organization_name": "MEDGW test", "common_name": cn.lower()})


def _leaf(key: Any, serial: int = 4242) -> x509.Certificate:
    ca_key = ec.generate_private_key(ec.SECP256R1())
    return (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "leaf.medgw.test")]))
        .issuer_name(_printable_name("Test CA"))
        .public_key(key.public_key())
        .serial_number(serial)
        .not_valid_before(VALID[0])
        .not_valid_after(VALID[1])
        .sign(ca_key, hashes.SHA256())
    )


@pytest.fixture(scope="module")
def rsa_party() -> tuple[Any, x509.Certificate]:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    return key, _leaf(key)


@pytest.fixture(scope="module")
def ec_party() -> tuple[Any, x509.Certificate]:
    key = ec.generate_private_key(ec.SECP256R1())
    return key, _leaf(key)


def _ias(name: Any, serial: int) -> Any:
    return asn1_cms.IssuerAndSerialNumber({"issuer": name, "serial_number": serial})


def test_issuer_serial_matches_the_same_name_in_another_encoding(
    rsa_party: tuple[Any, x509.Certificate],
) -> None:
    _, cert = rsa_party
    cert_issuer = asn1_x509.Certificate.load(cert.public_bytes(serialization.Encoding.DER)).issuer
    utf8 = _utf8_name("Test CA")
    assert utf8.dump() != cert_issuer.dump()  # the byte comparison alone would miss it
    assert matches_issuer_serial(cert, _ias(cert_issuer, 4242))
    assert matches_issuer_serial(cert, _ias(utf8, 4242))
    assert not matches_issuer_serial(cert, _ias(_utf8_name("Other CA"), 4242))
    assert not matches_issuer_serial(cert, _ias(utf8, 4243))
    assert not matches_issuer_serial(cert, _ias(cert_issuer, 4243))


def _resign_sid(der: bytes, name: Any) -> bytes:
    ci = asn1_cms.ContentInfo.load(der)
    sd = ci["content"]
    sd["certificates"] = []  # the signer must be found among the pinned certificates
    si = sd["signer_infos"][0]
    serial = si["sid"].chosen["serial_number"].native
    si["sid"] = asn1_cms.SignerIdentifier({"issuer_and_serial_number": _ias(name, serial)})
    out: bytes = ci.dump(force=True)
    return out


def test_signer_found_by_an_issuer_encoded_otherwise(
    rsa_party: tuple[Any, x509.Certificate], ec_party: tuple[Any, x509.Certificate]
) -> None:
    for key, cert in (rsa_party, ec_party):
        der = sign(b"payload", cert, key, signing_time=AT, policy=STRICT)
        same = _resign_sid(der, _utf8_name("Test CA"))
        v = verify(same, content=b"payload", trusted_signers=[cert], policy=STRICT)
        assert v.signer == cert
        other = _resign_sid(der, _utf8_name("Other CA"))
        with pytest.raises(SignerNotTrustedError, match="neither included"):
            verify(other, content=b"payload", trusted_signers=[cert], policy=STRICT)


def test_recipient_found_by_an_issuer_encoded_otherwise(
    rsa_party: tuple[Any, x509.Certificate], ec_party: tuple[Any, x509.Certificate]
) -> None:
    for key, cert in (rsa_party, ec_party):
        for cipher in ("aes-256-gcm", "aes-128-cbc"):
            ci = asn1_cms.ContentInfo.load(encrypt(b"secret", [cert], cipher=cipher, policy=STRICT))
            ri = ci["content"]["recipient_infos"][0]
            if ri.name == "ktri":
                ri.chosen["rid"] = asn1_cms.RecipientIdentifier(
                    {"issuer_and_serial_number": _ias(_utf8_name("Test CA"), 4242)}
                )
            else:
                rek = ri.chosen["recipient_encrypted_keys"][0]
                rek["rid"] = asn1_cms.KeyAgreementRecipientIdentifier(
                    {"issuer_and_serial_number": _ias(_utf8_name("Test CA"), 4242)}
                )
            der = ci.dump(force=True)
            assert decrypt(der, cert, key, policy=STRICT).content == b"secret"


def _reorder_signed_attrs(der: bytes, tamper: bool = False) -> bytes:
    """The signed attributes in reverse (not DER) order, lengths unchanged."""
    ci = asn1_cms.ContentInfo.load(der)
    attrs = ci["content"]["signer_infos"][0]["signed_attrs"]
    encoded = attrs.dump()
    children = [a.dump() for a in attrs]
    head = encoded[: len(encoded) - sum(map(len, children))]
    reordered = head + b"".join(reversed(children))
    assert reordered != encoded and der.count(encoded) == 1
    if tamper:  # one bit of the messageDigest value
        digest_attr = next(a.dump() for a in attrs if a["type"].native == "message_digest")
        bad = digest_attr[:-1] + bytes([digest_attr[-1] ^ 1])
        reordered = reordered.replace(digest_attr, bad)
    return der.replace(encoded, reordered)


def test_signed_attributes_received_in_another_order(
    rsa_party: tuple[Any, x509.Certificate],
) -> None:
    key, cert = rsa_party
    der = sign(b"payload", cert, key, signing_time=AT, policy=STRICT)
    # signed over the DER (sorted) SET OF; verifies through its DER re-encoding
    reordered = _reorder_signed_attrs(der)
    v = verify(reordered, content=b"payload", trusted_signers=[cert], policy=STRICT)
    assert v.signer == cert
    with pytest.raises(SignatureError):
        verify(
            _reorder_signed_attrs(der, tamper=True),
            content=b"payload",
            trusted_signers=[cert],
            policy=STRICT,
        )


@pytest.mark.parametrize("cipher", sorted(c for c in CIPHERS if c.startswith("aes")))
def test_content_algorithm_der_is_what_asn1crypto_writes(cipher: str) -> None:
    oid_name, _, mode = CIPHERS[cipher]
    if mode == "gcm":
        nonce = bytes(range(12))
        params: Any = core.Any.load(GCMParameters({"aes_nonce": nonce, "aes_icvlen": 16}).dump())
        ours = content_algorithm_der(cipher, nonce)
    else:
        params = bytes(range(16))
        ours = content_algorithm_der(cipher, params)
    built = algos.EncryptionAlgorithm({"algorithm": oid_name, "parameters": params})
    assert ours == built.dump()


@pytest.mark.parametrize("ukm", [None, b"", b"\x01" * 64])
@pytest.mark.parametrize("kek_len", [16, 32])
def test_shared_info_der_is_what_asn1crypto_writes(ukm: bytes | None, kek_len: int) -> None:
    key_info = algos.EncryptionAlgorithm({"algorithm": "aes256_wrap"}).dump()
    value: dict[str, Any] = {
        "key_info": core.Any.load(key_info),
        "supp_pub_info": (kek_len * 8).to_bytes(4, "big"),
    }
    if ukm is not None:
        value["entity_u_info"] = ukm
    assert _shared_info(key_info, ukm, kek_len) == EccCmsSharedInfo(value).dump()
