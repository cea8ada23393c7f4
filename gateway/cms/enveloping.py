"""CMS EnvelopedData and AuthEnvelopedData written: content encrypted (AES-GCM or
AES-CBC) for one or more recipients.

Recipients: RSA -> KeyTransRecipientInfo with the peer's key transport
(:func:`key_transport_for`): RSAES-OAEP with SHA-256 and MGF1-SHA-256, explicit
parameters (the default); RSAES-OAEP with its default parameters (SHA-1,
MGF1-SHA-1, empty label: ``RSAES-OAEP-params`` present as an empty SEQUENCE, as
RFC 4055 section 4.1 requires and OpenSSL writes and reads); or
RSAES-PKCS1-v1_5 (``rsaEncryption`` with NULL parameters, RFC 3370 section
4.2.1), a monitored-list algorithm sent only behind its own legacy option.
EC -> KeyAgreeRecipientInfo, ephemeral-static ECDH with
dhSinglePass-stdDH-sha{256,384,512}kdf-scheme (RFC 5753), ECC-CMS-SharedInfo and
AES key wrap (RFC 3394) matching the content-encryption key size.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from asn1crypto import algos, cms, keys
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives import padding as sym_padding
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.keywrap import aes_key_wrap

from ..errors import InvalidValueError, PolicyError
from ..policy import AlgorithmPolicy, certificate_key
from .common import cert_label, hash_for, issuer_and_serial_der
from .der import oid_der, tl, tlv
from .envelope_algorithms import (
    CIPHER_OID_DER,
    CIPHERS,
    KDF_BY_CURVE,
    OID_AUTH_ENVELOPED,
    OID_DATA,
    OID_ENVELOPED,
    STD_KDF_OID,
    WRAP_BY_KEYLEN,
    WRAP_KEYLEN,
    derive_kek,
)

# RecipientInfos are written as DER directly: asn1crypto's object builder
# costs milliseconds per recipient, more than the RSA operation itself.
_OAEP_SHA256_DER: bytes = cms.KeyEncryptionAlgorithm(
    {
        "algorithm": "rsaes_oaep",
        "parameters": algos.RSAESOAEPParams(
            {
                "hash_algorithm": {"algorithm": "sha256"},
                "mask_gen_algorithm": {"algorithm": "mgf1", "parameters": {"algorithm": "sha256"}},
            }
        ),
    }
).dump()
_EC_PUBLIC_KEY_ALG_DER: bytes = keys.PublicKeyAlgorithm({"algorithm": "ec"}).dump()
_WRAP_ALG_DER: dict[str, bytes] = {
    name: cms.KeyEncryptionAlgorithm({"algorithm": name}).dump() for name in WRAP_KEYLEN
}


# RSAES-OAEP with every parameter at its default (SHA-1, MGF1-SHA-1, empty label):
# DER leaves defaults out, so RSAES-OAEP-params is an empty SEQUENCE; it must be
# present (RFC 4055 section 4.1: OpenSSL refuses an OAEP identifier without it).
_OAEP_DEFAULT_DER: bytes = tlv(0x30, oid_der("1.2.840.113549.1.1.7") + b"\x30\x00")
# rsaEncryption, parameters NULL (RFC 3370 section 4.2.1).
_PKCS1V15_DER: bytes = tlv(0x30, oid_der("1.2.840.113549.1.1.1") + b"\x05\x00")

# key transport name -> (KeyEncryptionAlgorithmIdentifier DER, padding)
_KEY_TRANSPORTS: dict[str, tuple[bytes, padding.AsymmetricPadding]] = {
    "rsaes-oaep-sha256": (
        _OAEP_SHA256_DER,
        padding.OAEP(
            mgf=padding.MGF1(algorithm=hashes.SHA256()), algorithm=hashes.SHA256(), label=None
        ),
    ),
    "rsaes-oaep-sha1": (
        _OAEP_DEFAULT_DER,
        padding.OAEP(
            mgf=padding.MGF1(algorithm=hash_for("sha1", allow_sha1=True)),
            algorithm=hash_for("sha1", allow_sha1=True),
            label=None,
        ),
    ),
    "rsaes-pkcs1-v1_5": (_PKCS1V15_DER, padding.PKCS1v15()),
}


def key_transport_for(cert: x509.Certificate, policy: AlgorithmPolicy) -> str:
    """How the content-encryption key is sent to ``cert``: ``ecdh`` for an EC key,
    else the peer's RSA key transport (``policy.key_transport``)."""
    if isinstance(cert.public_key(), ec.EllipticCurvePublicKey):
        return "ecdh"
    return policy.key_transport


def _ktri(cert: x509.Certificate, pub: rsa.RSAPublicKey, cek: bytes, key_transport: str) -> bytes:
    algorithm_der, pad = _KEY_TRANSPORTS[key_transport]
    encrypted_key = pub.encrypt(cek, pad)
    return tlv(
        0x30,
        b"\x02\x01\x00"  # version 0
        + issuer_and_serial_der(cert)
        + algorithm_der
        + tlv(0x04, encrypted_key),
    )


def _kari(cert: x509.Certificate, pub: ec.EllipticCurvePublicKey, cek: bytes) -> bytes:
    kdf_digest = KDF_BY_CURVE[pub.curve.name]
    wrap = WRAP_BY_KEYLEN[len(cek)]
    wrap_der = _WRAP_ALG_DER[wrap]
    ephemeral = ec.generate_private_key(pub.curve)
    shared = ephemeral.exchange(ec.ECDH(), pub)
    kek = derive_kek(shared, kdf_digest, wrap_der, None, len(cek))
    point = ephemeral.public_key().public_bytes(
        serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint
    )
    originator_key = tlv(0x30, _EC_PUBLIC_KEY_ALG_DER + tlv(0x03, b"\x00" + point))
    return tlv(
        0xA1,  # [1] IMPLICIT KeyAgreeRecipientInfo
        b"\x02\x01\x03"  # version 3
        + tlv(0xA0, b"\xa1" + originator_key[1:])  # originator [0] { originatorKey [1] }
        + tlv(0x30, oid_der(STD_KDF_OID[kdf_digest]) + wrap_der)
        + tlv(
            0x30,
            tlv(0x30, issuer_and_serial_der(cert) + tlv(0x04, aes_key_wrap(kek, cek))),
        ),
    )


# ---------------------------------------------------------------------------
# encryption: DER written directly, lengths computed up front


def content_algorithm_der(cipher: str, iv_or_nonce: bytes) -> bytes:
    """DER contentEncryptionAlgorithm: AES-GCM with GCMParameters (nonce, 16-byte ICV,
    RFC 5084), or a CBC cipher with its IV as the OCTET STRING parameter."""
    oid_name, _key_len, mode = CIPHERS[cipher]
    if mode == "gcm":
        params = tlv(0x30, tlv(0x04, iv_or_nonce) + b"\x02\x01\x10")  # aes-ICVlen 16
    else:
        params = tlv(0x04, iv_or_nonce)
    return tlv(0x30, CIPHER_OID_DER[oid_name] + params)


def _recipient_infos(
    recipients: Sequence[x509.Certificate], cek: bytes, policy: AlgorithmPolicy
) -> tuple[bytes, bool]:
    if not recipients:
        raise InvalidValueError(
            "no recipient certificate: content is encrypted for at least one recipient",
            fix="pass the recipient's encryption certificate",
        )
    infos = []
    has_kari = False
    for cert in recipients:
        _check_recipient(policy, cert)
        pub = cert.public_key()
        if isinstance(pub, rsa.RSAPublicKey):
            infos.append(_ktri(cert, pub, cek, policy.key_transport))
        else:
            assert isinstance(pub, ec.EllipticCurvePublicKey)
            infos.append(_kari(cert, pub, cek))
            has_kari = True
    return tlv(0x31, b"".join(sorted(infos))), has_kari  # DER: SET OF sorted


@functools.lru_cache(maxsize=64)
def _check_recipient(policy: AlgorithmPolicy, cert: x509.Certificate) -> None:
    """Policy-check a recipient certificate's key: RSA (key transport) or EC (key
    agreement).  Cached: a pure function of the policy and the certificate."""
    pub = certificate_key(cert, "encryption key")
    if isinstance(pub, rsa.RSAPublicKey):
        policy.check_key_transport(policy.key_transport, inbound=False)
        policy.check_recipient_key(pub)
        return
    if isinstance(pub, ec.EllipticCurvePublicKey):
        policy.check_key_transport("ecdh", inbound=False)
        policy.check_recipient_key(pub)
        return
    raise PolicyError(
        f"{type(pub).__name__} recipient key ({cert_label(cert)})",
        "only RSA (RSAES-OAEP) and EC P-256/P-384 (ECDH) recipients are supported",
        "ask the peer for an RSA-3072 or EC P-256/P-384 encryption certificate",
    )


@dataclass(frozen=True)
class _Envelope:
    """What the content's encryption needs, its DER written up to the ciphertext."""

    head: bytes  # the ContentInfo's DER up to the encrypted content's first octet
    mode: str  # "gcm" or "cbc"
    cek: bytes
    iv_or_nonce: bytes


def _envelope(
    length: int, recipients: Sequence[x509.Certificate], cipher: str, policy: AlgorithmPolicy
) -> _Envelope:
    """A fresh content-encryption key wrapped for ``recipients``, and the DER before the
    ciphertext of ``length`` bytes of content (the lengths are written first)."""
    cipher = cipher.strip().lower()
    policy.check_content_cipher(cipher, inbound=False)
    _oid_name, key_len, mode = CIPHERS[cipher]
    if length < 0:
        raise InvalidValueError(
            f"length={length}: the announced content length is 0 or more",
            fix="announce the content's size in bytes",
        )
    cek = os.urandom(key_len)
    ri_der, has_kari = _recipient_infos(recipients, cek, policy)
    if mode == "gcm":
        iv_or_nonce = os.urandom(12)
        enc_len = length
        version = b"\x02\x01\x00"
        outer_oid = OID_AUTH_ENVELOPED
        tail_len = 2 + 16  # mac OCTET STRING
    else:
        iv_or_nonce = os.urandom(16)
        enc_len = (length // 16 + 1) * 16
        version = b"\x02\x01\x02" if has_kari else b"\x02\x01\x00"
        outer_oid = OID_ENVELOPED
        tail_len = 0
    alg_der = content_algorithm_der(cipher, iv_or_nonce)
    eci_head = oid_der(OID_DATA) + alg_der + tl(0x80, enc_len)
    eci_len = len(eci_head) + enc_len
    body_len = len(version) + len(ri_der) + len(tl(0x30, eci_len)) + eci_len + tail_len
    body_tl = tl(0x30, body_len)
    explicit_len = len(body_tl) + body_len
    oid = oid_der(outer_oid)
    ci_len = len(oid) + len(tl(0xA0, explicit_len)) + explicit_len
    head = b"".join(
        (
            tl(0x30, ci_len),
            oid,
            tl(0xA0, explicit_len),
            body_tl,
            version,
            ri_der,
            tl(0x30, eci_len),
            eci_head,
        )
    )
    return _Envelope(head, mode, cek, iv_or_nonce)


def encrypt_chunks(
    chunks: Iterable[bytes],
    length: int,
    recipients: Sequence[x509.Certificate],
    *,
    cipher: str = "aes-256-gcm",
    policy: AlgorithmPolicy,
) -> Iterator[bytes]:
    """Encrypt ``length`` bytes arriving as ``chunks``; yields the DER ContentInfo.

    AES-GCM gives AuthEnvelopedData, AES-CBC EnvelopedData.  ``chunks`` must
    add up to exactly ``length`` bytes (the DER lengths are written first).
    """
    env = _envelope(length, recipients, cipher, policy)
    yield from _encrypted(env, chunks, length)


def _encrypted(env: _Envelope, chunks: Iterable[bytes], length: int) -> Iterator[bytes]:
    """The DER of :func:`encrypt_chunks` from ``env``: its head, then the ciphertext."""
    padder = None
    ctx: Any
    if env.mode == "gcm":
        ctx = Cipher(algorithms.AES(env.cek), modes.GCM(env.iv_or_nonce)).encryptor()
    else:
        ctx = Cipher(algorithms.AES(env.cek), modes.CBC(env.iv_or_nonce)).encryptor()
        padder = sym_padding.PKCS7(128).padder()
    yield env.head
    seen = 0
    for chunk in chunks:
        seen += len(chunk)
        if seen > length:
            raise InvalidValueError(
                f"encrypt_chunks: more than the announced {length} bytes given: the length "
                "is written before the content",
                fix="announce the content's exact size",
            )
        if padder is not None:
            chunk = padder.update(chunk)
        out = ctx.update(chunk)
        if out:
            yield out
    if seen != length:
        raise InvalidValueError(
            f"encrypt_chunks: {seen} bytes given, {length} announced: the length is written "
            "before the content",
            fix="announce the content's exact size",
        )
    last = ctx.update(padder.finalize()) if padder is not None else b""
    last += ctx.finalize()
    if env.mode == "gcm":
        last += tlv(0x04, ctx.tag)
    if last:
        yield last


def encrypt(
    content: bytes,
    recipients: Sequence[x509.Certificate],
    *,
    cipher: str = "aes-256-gcm",
    policy: AlgorithmPolicy,
) -> bytes:
    """Encrypt ``content`` for ``recipients``; returns DER ``ContentInfo``.

    GCM ciphers give AuthEnvelopedData, CBC ciphers EnvelopedData.
    """
    content = bytes(content)
    env = _envelope(len(content), recipients, cipher, policy)
    if env.mode != "gcm":
        return b"".join(_encrypted(env, [content], len(content)))
    # All of it at hand: AES-GCM in one call (the same ciphertext and tag as
    # encrypt_chunks writes), the tag moved after its OCTET STRING header.
    sealed = memoryview(AESGCM(env.cek).encrypt(env.iv_or_nonce, content, None))
    return b"".join((env.head, sealed[:-16], b"\x04\x10", sealed[-16:]))
