"""CMS SignedData (RFC 5652 section 5) written: sign content, or its digest
(streaming), and the AS2 MIC.

Signing always produces DER with the signed attributes contentType,
messageDigest, signingTime and CMSAlgorithmProtection (RFC 6211).
"""

from __future__ import annotations

import base64
import functools
from collections.abc import Sequence
from datetime import datetime
from typing import Any, Literal

from asn1crypto import algos
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa

from ..errors import InvalidValueError, ObjectSecurityError, PolicyError
from ..policy import AlgorithmPolicy, PrivateKey, normalize_digest
from .common import (
    OID_ALGORITHM_PROTECTION,
    OID_CONTENT_TYPE,
    OID_DATA_DER,
    OID_MESSAGE_DIGEST,
    OID_SIGNED_DATA_DER,
    OID_SIGNING_TIME,
    cert_der,
    cert_label,
    hash_bytes,
    hash_for,
    issuer_and_serial_der,
    signed_attribute,
    time_der,
)
from .der import tlv

_ECDSA_BY_DIGEST = {
    "sha256": "sha256_ecdsa",
    "sha384": "sha384_ecdsa",
    "sha512": "sha512_ecdsa",
}


def compute_mic(data: bytes, digest: str) -> str:
    """Base64 of ``digest(data)``: the AS2 MIC (RFC 4130 section 7.3.1)."""
    name = normalize_digest(digest)
    AlgorithmPolicy().check_digest(name)
    h = hashes.Hash(hash_for(name))
    h.update(data)
    return base64.b64encode(h.finalize()).decode("ascii")


@functools.lru_cache(maxsize=32)
def _digest_algorithm_der(digest: str) -> bytes:
    out: bytes = algos.DigestAlgorithm({"algorithm": digest}).dump()
    return out


@functools.lru_cache(maxsize=32)
def _signature_algorithm_der(ecdsa: bool, digest: str, rsa_padding: str) -> bytes:
    """The DER of a signer's signatureAlgorithm; a pure function of its arguments."""
    out: bytes = _build_signature_algorithm(ecdsa, digest, rsa_padding).dump()
    return out


def _build_signature_algorithm(ecdsa: bool, digest: str, rsa_padding: str) -> Any:
    if ecdsa:
        return algos.SignedDigestAlgorithm({"algorithm": _ECDSA_BY_DIGEST[digest]})
    if rsa_padding == "pss":
        return algos.SignedDigestAlgorithm(
            {
                "algorithm": "rsassa_pss",
                "parameters": {
                    "hash_algorithm": {"algorithm": digest},
                    "mask_gen_algorithm": {
                        "algorithm": "mgf1",
                        "parameters": {"algorithm": digest},
                    },
                    "salt_length": hash_for(digest).digest_size,
                },
            }
        )
    return algos.SignedDigestAlgorithm({"algorithm": "rsassa_pkcs1v15"})


def sign(
    content: bytes,
    signer_cert: x509.Certificate,
    signer_key: PrivateKey,
    *,
    digest: str = "sha256",
    detached: bool = True,
    rsa_padding: Literal["pss", "pkcs1v15"] = "pkcs1v15",
    certificates: Sequence[x509.Certificate] = (),
    signing_time: datetime,
    policy: AlgorithmPolicy,
) -> bytes:
    """Sign ``content``; returns a DER ``ContentInfo(SignedData)``."""
    content = bytes(content)
    digest = normalize_digest(digest)
    policy.check_digest(digest)
    return sign_digest(
        hash_bytes(content, digest),
        signer_cert,
        signer_key,
        digest=digest,
        content=None if detached else content,
        rsa_padding=rsa_padding,
        certificates=certificates,
        signing_time=signing_time,
        policy=policy,
    )


@functools.lru_cache(maxsize=32)
def _check_signature_key(policy: AlgorithmPolicy, key: PrivateKey) -> None:
    """``policy.check_signature_key``, cached: a pure function of the policy and the key,
    and the gateway signs with the same few keys (which the cache keeps alive, as the
    configuration does anyway)."""
    policy.check_signature_key(key)


@functools.lru_cache(maxsize=32)
def _key_belongs_to(key: PrivateKey, cert: x509.Certificate) -> bool:
    """Whether ``key`` is the private key of ``cert``'s public key (cached, as above)."""
    spki = serialization.PublicFormat.SubjectPublicKeyInfo
    der = serialization.Encoding.DER
    return bool(
        key.public_key().public_bytes(der, spki) == cert.public_key().public_bytes(der, spki)
    )


@functools.lru_cache(maxsize=32)
def _fixed_attributes(digest_alg_der: bytes, sig_alg_der: bytes) -> tuple[bytes, bytes]:
    """The signed attributes that depend only on the algorithms: contentType (data) and
    CMSAlgorithmProtection (RFC 6211)."""
    return (
        signed_attribute(OID_CONTENT_TYPE, OID_DATA_DER),
        signed_attribute(
            OID_ALGORITHM_PROTECTION, tlv(0x30, digest_alg_der + b"\xa1" + sig_alg_der[1:])
        ),
    )


def sign_digest(
    content_digest: bytes,
    signer_cert: x509.Certificate,
    signer_key: PrivateKey,
    *,
    digest: str = "sha256",
    content: bytes | None = None,
    rsa_padding: Literal["pss", "pkcs1v15"] = "pkcs1v15",
    certificates: Sequence[x509.Certificate] = (),
    signing_time: datetime,
    policy: AlgorithmPolicy,
) -> bytes:
    """Sign content known by its ``digest`` (streaming); detached unless ``content`` is given."""
    digest = normalize_digest(digest)
    policy.check_digest(digest)
    if not isinstance(signer_key, rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey):
        raise PolicyError(
            type(signer_key).__name__,
            "only RSA and ECDSA signing keys are supported",
            "use an RSA-3072 or EC P-256/P-384 signing key",
        )
    _check_signature_key(policy, signer_key)
    if rsa_padding not in ("pss", "pkcs1v15"):
        raise InvalidValueError(
            f"rsa_padding={rsa_padding!r}: RSA signatures use PSS or PKCS#1 v1.5",
            fix="pass rsa_padding='pss' or 'pkcs1v15'",
        )
    if not _key_belongs_to(signer_key, signer_cert):
        raise ObjectSecurityError(
            f"signing key does not belong to the signing certificate ({cert_label(signer_cert)})",
            fix="configure the private key that matches this certificate",
        )
    if signing_time.tzinfo is None:
        raise InvalidValueError(
            f"signing_time={signing_time.isoformat()}: a signing time has a time zone",
            fix="pass an aware time, e.g. the injected clock's now()",
        )

    # Written as DER directly: asn1crypto's object builder costs more per
    # message than the private-key operation.
    digest_alg_der = _digest_algorithm_der(digest)
    sig_alg_der = _signature_algorithm_der(
        isinstance(signer_key, ec.EllipticCurvePrivateKey), digest, rsa_padding
    )
    content_type_attr, protection_attr = _fixed_attributes(digest_alg_der, sig_alg_der)
    attrs = sorted(
        [
            content_type_attr,
            signed_attribute(OID_SIGNING_TIME, time_der(signing_time)),
            signed_attribute(OID_MESSAGE_DIGEST, tlv(0x04, content_digest)),
            protection_attr,
        ]
    )
    attrs_der = tlv(0x31, b"".join(attrs))  # DER: SET OF sorted

    h = hash_for(digest)
    if isinstance(signer_key, ec.EllipticCurvePrivateKey):
        signature = signer_key.sign(attrs_der, ec.ECDSA(h))
    elif rsa_padding == "pss":
        signature = signer_key.sign(
            attrs_der, padding.PSS(mgf=padding.MGF1(h), salt_length=h.digest_size), h
        )
    else:
        signature = signer_key.sign(attrs_der, padding.PKCS1v15(), h)

    signer_info = tlv(
        0x30,
        b"\x02\x01\x01"  # version 1: issuerAndSerialNumber
        + issuer_and_serial_der(signer_cert)
        + digest_alg_der
        + b"\xa0"
        + attrs_der[1:]  # [0] IMPLICIT signedAttrs
        + sig_alg_der
        + tlv(0x04, signature),
    )
    certs: list[bytes] = []
    for c in (signer_cert, *certificates):
        d = cert_der(c)
        if d not in certs:
            certs.append(d)
    encap = OID_DATA_DER
    if content is not None:
        encap += tlv(0xA0, tlv(0x04, content))
    signed_data = tlv(
        0x30,
        b"\x02\x01\x01"  # version 1
        + tlv(0x31, digest_alg_der)
        + tlv(0x30, encap)
        + tlv(0xA0, b"".join(sorted(certs)))  # DER: SET OF sorted
        + tlv(0x31, signer_info),
    )
    return tlv(0x30, OID_SIGNED_DATA_DER + tlv(0xA0, signed_data))
