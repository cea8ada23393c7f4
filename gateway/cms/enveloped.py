"""CMS EnvelopedData (RFC 5652 section 6) and AuthEnvelopedData (RFC 5083).

Content encryption: AES-GCM (AuthEnvelopedData, RFC 5084) or AES-CBC
(EnvelopedData); 3DES-CBC is read only from a peer whose ``accept_legacy`` names it.

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
import itertools
import os
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from asn1crypto import algos, cms, core, keys
from cryptography import x509
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.decrepit.ciphers.algorithms import TripleDES
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives import padding as sym_padding
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.kdf.x963kdf import X963KDF
from cryptography.hazmat.primitives.keywrap import InvalidUnwrap, aes_key_unwrap, aes_key_wrap

from ..errors import DecryptionError, MalformedMessageError, PolicyError
from ..policy import (
    COMPAT_CONTENT_CIPHERS,
    COMPAT_KEY_TRANSPORTS,
    DIGESTS,
    AlgorithmPolicy,
    PrivateKey,
    certificate_key,
    normalize_digest,
)
from .der import Cursor, DerError, children, contents_of, count_children, integer, oid_der, tl, tlv
from .limits import MAX_RECIPIENT_INFOS, MAX_RECIPIENT_KEYS, check_count
from .signed import (
    ASN1_ERRORS,
    cert_der,
    cert_label,
    cert_ski,
    hash_for,
    issuer_and_serial_der,
    issuer_serial_ders,
    matches_issuer_serial,
    name_string,
)

__all__ = ["Decrypted", "decrypt_der", "encrypt", "encrypt_chunks", "key_transport_for"]


class GCMParameters(core.Sequence):  # type: ignore[misc]
    """RFC 5084 GCMParameters."""

    _fields = [  # noqa: RUF012 - asn1crypto schema
        ("aes_nonce", core.OctetString),
        ("aes_icvlen", core.Integer, {"default": 12}),
    ]


class EccCmsSharedInfo(core.Sequence):  # type: ignore[misc]
    """RFC 5753 ECC-CMS-SharedInfo."""

    _fields = [  # noqa: RUF012 - asn1crypto schema
        ("key_info", core.Any),
        ("entity_u_info", core.OctetString, {"explicit": 0, "optional": True}),
        ("supp_pub_info", core.OctetString, {"explicit": 2}),
    ]


# name -> (asn1crypto EncryptionAlgorithmId name, key bytes, mode)
CIPHERS: dict[str, tuple[str, int, str]] = {
    "aes-128-gcm": ("aes128_gcm", 16, "gcm"),
    "aes-192-gcm": ("aes192_gcm", 24, "gcm"),
    "aes-256-gcm": ("aes256_gcm", 32, "gcm"),
    "aes-128-cbc": ("aes128_cbc", 16, "cbc"),
    "aes-192-cbc": ("aes192_cbc", 24, "cbc"),
    "aes-256-cbc": ("aes256_cbc", 32, "cbc"),
    "des-ede3-cbc": ("tripledes_3key", 24, "cbc"),
}
CIPHER_BY_OID_NAME = {v[0]: k for k, v in CIPHERS.items()}
_CIPHER_OID_DER: dict[str, bytes] = {
    v[0]: algos.EncryptionAlgorithmId(v[0]).dump() for v in CIPHERS.values()
}

OID_DATA = "1.2.840.113549.1.7.1"
OID_ENVELOPED = "1.2.840.113549.1.7.3"
OID_AUTH_ENVELOPED = "1.2.840.113549.1.9.16.1.23"

_WRAP_BY_KEYLEN = {16: "aes128_wrap", 24: "aes192_wrap", 32: "aes256_wrap"}
_WRAP_KEYLEN = {"aes128_wrap": 16, "aes192_wrap": 24, "aes256_wrap": 32}

# ECDH KDF schemes (RFC 5753 / SEC 1). For the NIST curves the cofactor is 1,
# so cofactor DH is identical to standard DH.
KDF_SCHEMES: dict[str, str] = {
    "1.3.133.16.840.63.0.2": "sha1",  # dhSinglePass-stdDH-sha1kdf-scheme
    "1.3.132.1.11.0": "sha224",
    "1.3.132.1.11.1": "sha256",  # dhSinglePass-stdDH-sha256kdf-scheme
    "1.3.132.1.11.2": "sha384",
    "1.3.132.1.11.3": "sha512",
    "1.3.133.16.840.63.0.3": "sha1",  # dhSinglePass-cofactorDH-sha1kdf-scheme
    "1.3.132.1.14.0": "sha224",
    "1.3.132.1.14.1": "sha256",
    "1.3.132.1.14.2": "sha384",
    "1.3.132.1.14.3": "sha512",
}
_STD_KDF_OID = {"sha256": "1.3.132.1.11.1", "sha384": "1.3.132.1.11.2", "sha512": "1.3.132.1.11.3"}
_KDF_BY_CURVE = {"secp256r1": "sha256", "secp384r1": "sha384", "secp521r1": "sha512"}


@dataclass(frozen=True)
class Decrypted:
    content: bytes
    content_cipher: str
    key_transport: str
    compat_algorithms: tuple[str, ...]


# ---------------------------------------------------------------------------
# encryption


def _shared_info(key_info_der: bytes, ukm: bytes | None, kek_len: int) -> bytes:
    """DER ECC-CMS-SharedInfo (RFC 5753 7.2), written directly: ``key_info_der`` as is,
    then ``[0] EXPLICIT OCTET STRING`` ukm if there is one, ``[2] EXPLICIT OCTET STRING``
    the key-encryption key's length in bits."""
    entity_u_info = b"" if ukm is None else tlv(0xA0, tlv(0x04, ukm))
    supp_pub_info = tlv(0xA2, tlv(0x04, (kek_len * 8).to_bytes(4, "big")))
    return tlv(0x30, key_info_der + entity_u_info + supp_pub_info)


def _kek(
    shared_secret: bytes, kdf_digest: str, key_info_der: bytes, ukm: bytes | None, kek_len: int
) -> bytes:
    kdf = X963KDF(
        algorithm=hash_for(kdf_digest, allow_sha1=True),
        length=kek_len,
        sharedinfo=_shared_info(key_info_der, ukm, kek_len),
    )
    return kdf.derive(shared_secret)


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
    name: cms.KeyEncryptionAlgorithm({"algorithm": name}).dump() for name in _WRAP_KEYLEN
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
    kdf_digest = _KDF_BY_CURVE[pub.curve.name]
    wrap = _WRAP_BY_KEYLEN[len(cek)]
    wrap_der = _WRAP_ALG_DER[wrap]
    ephemeral = ec.generate_private_key(pub.curve)
    shared = ephemeral.exchange(ec.ECDH(), pub)
    kek = _kek(shared, kdf_digest, wrap_der, None, len(cek))
    point = ephemeral.public_key().public_bytes(
        serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint
    )
    originator_key = tlv(0x30, _EC_PUBLIC_KEY_ALG_DER + tlv(0x03, b"\x00" + point))
    return tlv(
        0xA1,  # [1] IMPLICIT KeyAgreeRecipientInfo
        b"\x02\x01\x03"  # version 3
        + tlv(0xA0, b"\xa1" + originator_key[1:])  # originator [0] { originatorKey [1] }
        + tlv(0x30, oid_der(_STD_KDF_OID[kdf_digest]) + wrap_der)
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
    return tlv(0x30, _CIPHER_OID_DER[oid_name] + params)


def _recipient_infos(
    recipients: Sequence[x509.Certificate], cek: bytes, policy: AlgorithmPolicy
) -> tuple[bytes, bool]:
    if not recipients:
        raise ValueError("encryption needs at least one recipient certificate")
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
    cipher = cipher.strip().lower()
    policy.check_content_cipher(cipher, inbound=False)
    _oid_name, key_len, mode = CIPHERS[cipher]
    if length < 0:
        raise ValueError("length must be >= 0")
    cek = os.urandom(key_len)
    ri_der, has_kari = _recipient_infos(recipients, cek, policy)
    if mode == "gcm":
        nonce = os.urandom(12)
        alg_der = content_algorithm_der(cipher, nonce)
        enc_len = length
        ctx: Any = Cipher(algorithms.AES(cek), modes.GCM(nonce)).encryptor()
        padder = None
        version = b"\x02\x01\x00"
        outer_oid = OID_AUTH_ENVELOPED
        tail_len = 2 + 16  # mac OCTET STRING
    else:
        iv = os.urandom(16)
        alg_der = content_algorithm_der(cipher, iv)
        enc_len = (length // 16 + 1) * 16
        ctx = Cipher(algorithms.AES(cek), modes.CBC(iv)).encryptor()
        padder = sym_padding.PKCS7(128).padder()
        version = b"\x02\x01\x02" if has_kari else b"\x02\x01\x00"
        outer_oid = OID_ENVELOPED
        tail_len = 0
    eci_head = oid_der(OID_DATA) + alg_der + tl(0x80, enc_len)
    eci_len = len(eci_head) + enc_len
    body_len = len(version) + len(ri_der) + len(tl(0x30, eci_len)) + eci_len + tail_len
    body_tl = tl(0x30, body_len)
    explicit_len = len(body_tl) + body_len
    oid = oid_der(outer_oid)
    ci_len = len(oid) + len(tl(0xA0, explicit_len)) + explicit_len
    yield (
        tl(0x30, ci_len)
        + oid
        + tl(0xA0, explicit_len)
        + body_tl
        + version
        + ri_der
        + tl(0x30, eci_len)
        + eci_head
    )
    seen = 0
    for chunk in chunks:
        seen += len(chunk)
        if seen > length:
            raise ValueError(f"encrypt_chunks: more than the announced {length} bytes")
        if padder is not None:
            chunk = padder.update(chunk)
        out = ctx.update(chunk)
        if out:
            yield out
    if seen != length:
        raise ValueError(f"encrypt_chunks: {seen} bytes given, {length} announced")
    last = ctx.update(padder.finalize()) if padder is not None else b""
    last += ctx.finalize()
    if mode == "gcm":
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
    return b"".join(
        encrypt_chunks([content], len(content), recipients, cipher=cipher, policy=policy)
    )


# ---------------------------------------------------------------------------
# decryption


@dataclass
class _Parsed:
    kind: str  # "enveloped_data" | "authenticated_enveloped_data"
    recipient_infos: Any
    cipher_oid_name: str
    cipher_params: Any
    encrypted_content: bytes
    mac: bytes | None
    auth_attrs_der: bytes | None


# ---------------------------------------------------------------------------
# the common shapes, read directly (gateway.cms.der)
#
# Accepted: DER ContentInfo with EnvelopedData (AES-CBC, 3DES-CBC) or
# AuthEnvelopedData (AES-GCM) without originatorInfo, authenticated or
# unprotected attributes, the encrypted content inside as one primitive
# OCTET STRING; recipients: KeyTransRecipientInfo with RSAES-OAEP (SHA-2 hash
# and MGF1 given explicitly, no label) and KeyAgreeRecipientInfo with
# ephemeral-static ECDH (SHA-2 X9.63 KDF, AES key wrap), each recipient named
# by issuerAndSerialNumber or subjectKeyIdentifier.  Anything else raises
# DerError and is read with asn1crypto; so are our recipient infos when they
# name our certificate other than by exactly its bytes.


def _oid_contents(dotted: str) -> bytes:
    return oid_der(dotted)[2:]


_KINDS = {
    _oid_contents(OID_ENVELOPED): "enveloped_data",
    _oid_contents(OID_AUTH_ENVELOPED): "authenticated_enveloped_data",
}
_CONTENT_CIPHERS_BY_OID: dict[bytes, str] = {
    _oid_contents(dotted): name
    for dotted, name in algos.EncryptionAlgorithmId._map.items()
    if name in CIPHER_BY_OID_NAME
}
_SHA2: dict[bytes, str] = {
    _oid_contents(d): n for d, n in algos.DigestAlgorithmId._map.items() if n in DIGESTS
}
_OID_RSAES_OAEP = _oid_contents("1.2.840.113549.1.1.7")
_OID_MGF1 = _oid_contents("1.2.840.113549.1.1.8")
_OID_EC_PUBLIC_KEY = _oid_contents("1.2.840.10045.2.1")
_CURVES: dict[bytes, str] = {_oid_contents(d): n for d, n in keys.NamedCurve._map.items()}
_KDF_SHA2: dict[bytes, str] = {_oid_contents(d): h for d, h in KDF_SCHEMES.items() if h in DIGESTS}
_WRAPS: dict[bytes, int] = {
    _oid_contents(d): _WRAP_KEYLEN[n]
    for d, n in cms.KeyEncryptionAlgorithmId._map.items()
    if n in _WRAP_KEYLEN
}
_NULL = b"\x05\x00"


@dataclass(frozen=True)
class GcmParams:
    """RFC 5084 GCMParameters, read directly."""

    nonce: bytes
    icvlen: int


def gcm_parameters(params: Any) -> tuple[bytes, int]:
    """(nonce, ICV length) of AES-GCM parameters, read directly or by asn1crypto."""
    if isinstance(params, GcmParams):
        return params.nonce, params.icvlen
    gp = GCMParameters.load(params.dump())
    return gp["aes_nonce"].native, gp["aes_icvlen"].native


def cbc_iv(params: Any) -> Any:
    """The IV of CBC parameters, read directly (bytes) or by asn1crypto (its native value)."""
    if isinstance(params, bytes):
        return params
    return params.native


@dataclass(frozen=True)
class _Rid:
    issuer_der: bytes | None  # issuerAndSerialNumber, or
    serial: int
    ski: bytes | None  # subjectKeyIdentifier


@dataclass(frozen=True)
class _DirectKtri:
    rid: _Rid
    hash_name: str
    mgf_hash_name: str
    encrypted_key: bytes


@dataclass(frozen=True)
class _DirectKari:
    kdf_digest: str
    wrap_der: bytes
    kek_len: int
    curve: str | None
    point: bytes
    ukm: bytes | None
    keys: tuple[tuple[_Rid, bytes], ...]


@dataclass(frozen=True)
class _DirectRecipients:
    der: bytes  # the RecipientInfos as received
    infos: tuple[_DirectKtri | _DirectKari, ...]


def _sha2_algorithm(c: Cursor) -> str:
    """A SHA-2 AlgorithmIdentifier, parameters absent or NULL."""
    alg = c.inner(0x30)
    name = _SHA2.get(alg.value(0x06))
    if name is None:
        raise DerError("not a SHA-2 digest")
    if not alg.at_end() and alg.raw(0x05) != _NULL:
        raise DerError("NULL with contents")
    alg.finish()
    return name


def _rid(c: Cursor, ski_tag: int) -> _Rid:
    tag = c.peek()
    if tag == 0x30:
        ias = c.inner(0x30)
        issuer = ias.raw(0x30)
        start, stop = ias.next(0x02)
        serial = integer(ias.buf, start, stop)
        ias.finish()
        return _Rid(issuer, serial, None)
    if tag == ski_tag and ski_tag == 0x80:
        return _Rid(None, 0, c.value(0x80))
    raise DerError("a recipient identifier the direct reader does not read")


def _direct_ktri(c: Cursor) -> _DirectKtri:
    c.next(0x02)  # version: not used
    rid = _rid(c, 0x80)
    alg = c.inner(0x30)
    if alg.value(0x06) != _OID_RSAES_OAEP:
        raise DerError("key transport other than RSAES-OAEP")
    params = alg.inner(0x30)
    alg.finish()
    explicit = params.inner(0xA0)
    hash_name = _sha2_algorithm(explicit)
    explicit.finish()
    explicit = params.inner(0xA1)
    mgf = explicit.inner(0x30)
    explicit.finish()
    if mgf.value(0x06) != _OID_MGF1:
        raise DerError("mask generation other than MGF1")
    mgf_hash_name = _sha2_algorithm(mgf)
    mgf.finish()
    params.finish()  # pSourceAlgorithm: the default, an empty label
    encrypted_key = c.value(0x04)
    c.finish()
    return _DirectKtri(rid, hash_name, mgf_hash_name, encrypted_key)


def _direct_kari(c: Cursor) -> _DirectKari:
    c.next(0x02)  # version: not used
    originator = c.inner(0xA0)
    spki = originator.inner(0xA1)  # originatorKey
    originator.finish()
    alg = spki.inner(0x30)
    if alg.value(0x06) != _OID_EC_PUBLIC_KEY:
        raise DerError("originator key is not an EC key")
    curve: str | None = None
    tag = alg.peek()
    if tag == 0x06:
        curve = _CURVES.get(alg.value(0x06))
        if curve is None:
            raise DerError("unknown named curve")
    elif tag != -1 and alg.raw(0x05) != _NULL:
        raise DerError("EC parameters other than a named curve")
    alg.finish()
    bits = spki.value(0x03)
    spki.finish()
    if len(bits) < 2 or bits[0] != 0:
        raise DerError("originator public key with unused bits")
    ukm: bytes | None = None
    if c.peek() == 0xA1:
        explicit = c.inner(0xA1)
        ukm = explicit.value(0x04)
        explicit.finish()
    kea = c.inner(0x30)
    kdf_digest = _KDF_SHA2.get(kea.value(0x06))
    if kdf_digest is None:
        raise DerError("key agreement other than ECDH with a SHA-2 KDF")
    wrap_start = kea.pos
    wrap = kea.inner(0x30)
    kek_len = _WRAPS.get(wrap.value(0x06))
    if kek_len is None:
        raise DerError("key wrap other than AES key wrap")
    wrap.finish()
    wrap_der = kea.buf[wrap_start : kea.pos]
    kea.finish()
    reks = c.inner(0x30)
    keys_: list[tuple[_Rid, bytes]] = []
    while not reks.at_end():
        rek = reks.inner(0x30)
        rid = _rid(rek, -1)  # rKeyId: read with asn1crypto
        keys_.append((rid, rek.value(0x04)))
        rek.finish()
    c.finish()
    return _DirectKari(kdf_digest, wrap_der, kek_len, curve, bits[1:], ukm, tuple(keys_))


def check_recipient_counts(ri_der: bytes) -> None:
    """Refuse (:class:`~gateway.cms.limits.TooMany`) RecipientInfos (DER or BER) with
    more recipient infos, or a key agreement with more recipient keys, than any real
    message carries; nothing is built from them first."""
    try:
        for count, (tag, start, _stop) in enumerate(children(ri_der), 1):
            check_count(count, MAX_RECIPIENT_INFOS, "recipient infos")
            if tag == 0xA1:  # KeyAgreeRecipientInfo: its recipientEncryptedKeys come last
                fields = list(itertools.islice(children(ri_der, start), 6))
                if fields and fields[-1][0] == 0x30:
                    count_children(
                        ri_der, fields[-1][1], MAX_RECIPIENT_KEYS, "keys in a key agreement"
                    )
    except DerError as exc:
        raise MalformedMessageError(
            f"encrypted message has a malformed RecipientInfo: {exc.detail}",
            fix="check that the message was not truncated or altered in transit",
        ) from None


def direct_recipients(ri_der: bytes) -> _DirectRecipients | None:
    """RecipientInfos (a whole SET element) read directly, or None if it is not of
    the common shapes (then read it with asn1crypto).  Check their counts first
    (:func:`check_recipient_counts`)."""
    try:
        c = contents_of(ri_der, 0x31)
        infos: list[_DirectKtri | _DirectKari] = []
        while not c.at_end():
            tag = c.peek()
            if tag == 0x30:
                infos.append(_direct_ktri(c.inner(0x30)))
            elif tag == 0xA1:
                infos.append(_direct_kari(c.inner(0xA1)))
            else:
                raise DerError("a recipient info the direct reader does not read")
    except DerError:
        return None
    return _DirectRecipients(ri_der, tuple(infos))


def content_algorithm_direct(c: Cursor, kind: str) -> tuple[str, GcmParams | bytes]:
    """(asn1crypto name, parameters) of a contentEncryptionAlgorithm: AES-GCM in
    AuthEnvelopedData, a CBC cipher with its IV in EnvelopedData."""
    alg = c.inner(0x30)
    oid_name = _CONTENT_CIPHERS_BY_OID.get(alg.value(0x06))
    if oid_name is None:
        raise DerError("a content cipher the direct reader does not read")
    mode = CIPHERS[CIPHER_BY_OID_NAME[oid_name]][2]
    params: GcmParams | bytes
    if mode == "gcm":
        if kind != "authenticated_enveloped_data":
            raise DerError("GCM outside AuthEnvelopedData")
        p = alg.inner(0x30)
        nonce = p.value(0x04)
        icvlen = 12
        if not p.at_end():
            start, stop = p.next(0x02)
            icvlen = integer(p.buf, start, stop)
        p.finish()
        params = GcmParams(nonce, icvlen)
    else:
        if kind != "enveloped_data":
            raise DerError("CBC inside AuthEnvelopedData")
        params = alg.value(0x04)
    alg.finish()
    return oid_name, params


def _parse_der(enveloped: bytes) -> _Parsed:
    ci = contents_of(enveloped, 0x30)
    kind = _KINDS.get(ci.value(0x06))
    if kind is None:
        raise DerError("not EnvelopedData or AuthEnvelopedData")
    explicit = ci.inner(0xA0)
    ci.finish()
    body = explicit.inner(0x30)
    explicit.finish()
    body.next(0x02)  # version: not used
    ri_der = body.raw(0x31)  # no originatorInfo
    check_recipient_counts(ri_der)
    recipients = direct_recipients(ri_der)
    if recipients is None:
        raise DerError("recipient infos of another shape")
    eci = body.inner(0x30)
    eci.next(0x06)  # content type: not used
    oid_name, params = content_algorithm_direct(eci, kind)
    encrypted = eci.value(0x80)
    eci.finish()
    mac = body.value(0x04) if kind == "authenticated_enveloped_data" else None
    body.finish()  # no authenticated, unauthenticated or unprotected attributes
    return _Parsed(kind, recipients, oid_name, params, encrypted, mac, None)


def _names(rid: _Rid, cert: x509.Certificate, issuer_der: bytes, serial: int) -> bool | None:
    """Whether ``rid`` names ``cert``; None if only asn1crypto can tell (the same
    issuer encoded otherwise, an unreadable subjectKeyIdentifier extension)."""
    if rid.issuer_der is not None:
        if rid.serial != serial:
            return False
        return True if rid.issuer_der == issuer_der else None
    try:
        return cert_ski(cert) == rid.ski
    except ValueError:
        return None


def _recover_direct(
    recipients: _DirectRecipients,
    cert: x509.Certificate,
    key: PrivateKey,
    policy: AlgorithmPolicy,
    label: str,
) -> tuple[bytes, str] | None:
    """The content-encryption key, as :func:`recover_cek` finds it; None if that
    takes the asn1crypto reading (found otherwise than by exactly our bytes, not
    found, or an error to report as the asn1crypto path reports it)."""
    issuer_der, _ = issuer_serial_ders(cert_der(cert))
    serial = cert.serial_number
    for info in recipients.infos:
        if isinstance(info, _DirectKtri):
            found = _names(info.rid, cert, issuer_der, serial)
            if found is None:
                return None
            if not found:
                continue
            if not isinstance(key, rsa.RSAPrivateKey):
                return None
            policy.check_key_transport("rsaes-oaep", inbound=True)
            h, mgf_h = hash_for(info.hash_name), hash_for(info.mgf_hash_name)
            pad = padding.OAEP(mgf=padding.MGF1(algorithm=mgf_h), algorithm=h, label=None)
            return _rsa_decrypt_cek(key, info.encrypted_key, pad, "rsaes-oaep", label)
        for rid, encrypted_key in info.keys:
            found = _names(rid, cert, issuer_der, serial)
            if found is None:
                return None
            if not found:
                continue
            if not isinstance(key, ec.EllipticCurvePrivateKey):
                return None
            if info.curve is not None and info.curve != key.curve.name:
                return None
            policy.check_key_transport("ecdh", inbound=True)
            shared = _ecdh_shared(key, info.point)
            return _ecdh_unwrap_cek(
                shared,
                info.kdf_digest,
                info.wrap_der,
                info.ukm,
                info.kek_len,
                encrypted_key,
                "ecdh",
                label,
            )
    return None


def _rid_matches(cert: x509.Certificate, rid: Any) -> bool:
    if rid.name == "issuer_and_serial_number":
        return matches_issuer_serial(cert, rid.chosen)
    if rid.name == "subject_key_identifier":
        return bool(cert_ski(cert) == rid.chosen.native)
    if rid.name == "r_key_id":
        return bool(cert_ski(cert) == rid.chosen["subject_key_identifier"].native)
    return False


def _describe_rid(rid: Any) -> str:
    try:
        if rid.name == "issuer_and_serial_number":
            ias = rid.chosen
            return f"issuer {name_string(ias['issuer'])!r} serial 0x{ias['serial_number'].native:x}"
        if rid.name == "subject_key_identifier":
            return f"subjectKeyIdentifier {rid.chosen.native.hex()}"
        if rid.name == "r_key_id":
            return f"subjectKeyIdentifier {rid.chosen['subject_key_identifier'].native.hex()}"
    except ASN1_ERRORS:
        pass
    return "<unparseable recipient identifier>"


def _oaep_name(params: Any) -> tuple[str, hashes.HashAlgorithm, hashes.HashAlgorithm]:
    if isinstance(params, core.Void):
        # Which hash the sender meant is not ours to guess (openssl refuses it too).
        raise MalformedMessageError(
            "the RSAES-OAEP key transport identifier has no parameters: RFC 4055 section 4.1 "
            "requires RSAES-OAEP-params, an empty SEQUENCE for the SHA-1 defaults",
            fix="ask the peer to write the OAEP parameters (openssl cms does), or to use "
            "RSAES-OAEP with SHA-256 (openssl: -keyopt rsa_padding_mode:oaep -keyopt "
            "rsa_oaep_md:sha256)",
        )
    h_name = normalize_digest(params["hash_algorithm"]["algorithm"].native)
    mgf = params["mask_gen_algorithm"]
    if mgf["algorithm"].native != "mgf1":
        raise PolicyError(
            f"RSAES-OAEP with mask generation {mgf['algorithm'].native}",
            "only MGF1 is supported",
            "use RSAES-OAEP with MGF1-SHA-256",
        )
    mgf_name = normalize_digest(mgf["parameters"]["algorithm"].native)
    if params["p_source_algorithm"]["parameters"].native not in (b"", None):
        raise DecryptionError(
            "RSAES-OAEP with a non-empty label is not supported",
            fix="ask the peer to use RSAES-OAEP without a label",
        )
    names = {h_name, mgf_name}
    if "sha1" in names and names <= {"sha1", "sha256", "sha384", "sha512"}:
        return (
            "rsaes-oaep-sha1",
            hash_for(h_name, allow_sha1=True),
            hash_for(mgf_name, allow_sha1=True),
        )
    for n in names:
        AlgorithmPolicy().check_digest(n)
    return "rsaes-oaep", hash_for(h_name), hash_for(mgf_name)


def _unwrap_ktri(
    ktri: Any, key: rsa.RSAPrivateKey, policy: AlgorithmPolicy, label: str
) -> tuple[bytes, str]:
    alg = ktri["key_encryption_algorithm"]
    alg_name = alg["algorithm"].native
    pad: padding.AsymmetricPadding
    if alg_name == "rsaes_oaep":
        name, h, mgf_h = _oaep_name(alg["parameters"])
        policy.check_key_transport(name, inbound=True)
        pad = padding.OAEP(mgf=padding.MGF1(algorithm=mgf_h), algorithm=h, label=None)
    elif alg_name == "rsaes_pkcs1v15":
        name = "rsaes-pkcs1-v1_5"
        policy.check_key_transport(name, inbound=True)
        pad = padding.PKCS1v15()
    else:
        raise PolicyError(
            f"key transport {alg_name}",
            "only RSAES-OAEP (and RSAES-PKCS1-v1_5, if accept_legacy names it) are "
            "supported for RSA",
            "ask the peer to use RSAES-OAEP with SHA-256",
        )
    return _rsa_decrypt_cek(key, ktri["encrypted_key"].native, pad, name, label)


def _rsa_decrypt_cek(
    key: rsa.RSAPrivateKey,
    encrypted_key: bytes,
    pad: padding.AsymmetricPadding,
    name: str,
    label: str,
) -> tuple[bytes, str]:
    try:
        cek = key.decrypt(encrypted_key, pad)
    except ValueError as exc:
        raise DecryptionError(
            f"the content-encryption key for {label} cannot be decrypted with our private key "
            f"({name})",
            fix="check that the configured private key matches our encryption certificate",
        ) from exc
    return cek, name


def _unwrap_kari(
    kari: Any, rek: Any, key: ec.EllipticCurvePrivateKey, policy: AlgorithmPolicy, label: str
) -> tuple[bytes, str]:
    alg = kari["key_encryption_algorithm"]
    oid = alg["algorithm"].dotted
    kdf_digest = KDF_SCHEMES.get(oid)
    if kdf_digest is None:
        raise PolicyError(
            f"key agreement {oid}",
            "only dhSinglePass-stdDH/cofactorDH with an X9.63 KDF are supported (RFC 5753)",
            "ask the peer to use ECDH with dhSinglePass-stdDH-sha256kdf-scheme",
        )
    if kdf_digest == "sha1":
        name = "ecdh-sha1kdf"
    else:
        AlgorithmPolicy().check_digest(kdf_digest)
        name = "ecdh"
    policy.check_key_transport(name, inbound=True)
    params = alg["parameters"]
    if isinstance(params, core.Void | core.Null):
        raise MalformedMessageError(
            "ECDH KeyAgreeRecipientInfo lacks its key-wrap algorithm parameter",
            fix="the sender's CMS implementation is broken",
        )
    wrap_der = params.dump()
    wrap_name = cms.KeyEncryptionAlgorithm.load(wrap_der)["algorithm"].native
    kek_len = _WRAP_KEYLEN.get(wrap_name)
    if kek_len is None:
        raise PolicyError(
            f"key wrap {wrap_name}",
            "only AES key wrap (RFC 3394) is supported",
            "ask the peer to use aes128-wrap or aes256-wrap",
        )
    originator = kari["originator"]
    if originator.name != "originator_key":
        raise DecryptionError(
            f"ECDH recipient info for {label} uses a static originator key "
            f"({originator.name}); only ephemeral-static ECDH is supported",
            fix="ask the peer to use ephemeral-static ECDH (RFC 5753 section 3.1)",
        )
    orig = originator.chosen
    orig_params = orig["algorithm"]["parameters"]
    if not isinstance(orig_params, core.Void | core.Null):
        named = orig_params.chosen.native if orig_params.name == "named" else None
        if named is not None and named != key.curve.name:
            raise DecryptionError(
                f"ECDH originator key is on curve {named} but our key for {label} is on "
                f"{key.curve.name}",
                fix="the peer encrypted with the wrong certificate; ask it to resend",
            )
    shared = _ecdh_shared(key, bytes(orig["public_key"]))
    ukm_v = kari["ukm"]
    ukm = None if isinstance(ukm_v, core.Void) else ukm_v.native
    return _ecdh_unwrap_cek(
        shared, kdf_digest, wrap_der, ukm, kek_len, rek["encrypted_key"].native, name, label
    )


def _ecdh_shared(key: ec.EllipticCurvePrivateKey, point: bytes) -> bytes:
    try:
        peer = ec.EllipticCurvePublicKey.from_encoded_point(key.curve, point)
        return key.exchange(ec.ECDH(), peer)
    except ValueError as exc:
        raise DecryptionError(
            f"ECDH originator public key is not a valid point on {key.curve.name}",
            fix="the message is corrupt; ask the peer to resend",
        ) from exc


def _ecdh_unwrap_cek(
    shared: bytes,
    kdf_digest: str,
    wrap_der: bytes,
    ukm: bytes | None,
    kek_len: int,
    encrypted_key: bytes,
    name: str,
    label: str,
) -> tuple[bytes, str]:
    kek = _kek(shared, kdf_digest, wrap_der, ukm, kek_len)
    try:
        cek = aes_key_unwrap(kek, encrypted_key)
    except (InvalidUnwrap, ValueError) as exc:
        raise DecryptionError(
            f"the content-encryption key for {label} cannot be unwrapped (ECDH {name})",
            fix="check that the configured private key matches our encryption certificate",
        ) from exc
    return cek, name


def _decrypt_content(parsed: _Parsed, cipher: str, cek: bytes) -> bytes:
    _oid_name, key_len, mode = CIPHERS[cipher]
    if len(cek) != key_len:
        raise DecryptionError(
            f"content-encryption key has {len(cek)} bytes, {cipher} needs {key_len}",
            fix="the message is corrupt or not for our key; ask the peer to resend",
        )
    data = parsed.encrypted_content
    if mode == "gcm":
        if parsed.kind != "authenticated_enveloped_data" or parsed.mac is None:
            raise MalformedMessageError(
                f"{cipher} used in EnvelopedData; GCM requires AuthEnvelopedData (RFC 5084)",
                fix="ask the peer to send AuthEnvelopedData for AES-GCM",
            )
        nonce, icvlen = gcm_parameters(parsed.cipher_params)
        if icvlen != len(parsed.mac) or not 12 <= icvlen <= 16:
            raise DecryptionError(
                f"{cipher} tag length {len(parsed.mac)} does not match GCMParameters "
                f"ICV length {icvlen} (must be 12..16)",
                fix="the message is corrupt; ask the peer to resend",
            )
        try:
            decryptor = Cipher(
                algorithms.AES(cek), modes.GCM(nonce, parsed.mac, min_tag_length=12)
            ).decryptor()
            if parsed.auth_attrs_der is not None:
                decryptor.authenticate_additional_data(parsed.auth_attrs_der)
            return decryptor.update(data) + decryptor.finalize()
        except (InvalidTag, ValueError) as exc:
            raise DecryptionError(
                f"{cipher} authentication tag does not verify: the encrypted content or its "
                "authenticated attributes were altered, or the key is wrong",
                fix="ask the peer to resend the message",
            ) from exc
    if parsed.kind != "enveloped_data":
        raise MalformedMessageError(
            f"{cipher} used in AuthEnvelopedData; only AEAD ciphers are allowed there",
            fix="ask the peer to use AES-GCM for AuthEnvelopedData",
        )
    iv = cbc_iv(parsed.cipher_params)
    if cipher == "des-ede3-cbc":
        algo: Any = TripleDES(cek)
        block = 64
    else:
        algo = algorithms.AES(cek)
        block = 128
    if not isinstance(iv, bytes) or len(iv) * 8 != block or len(data) % (block // 8):
        raise DecryptionError(
            f"{cipher}: bad IV or ciphertext length", fix="the message is corrupt"
        )
    cbc = Cipher(algo, modes.CBC(iv)).decryptor()
    padded = cbc.update(data) + cbc.finalize()
    try:
        unpadder = sym_padding.PKCS7(block).unpadder()
        return unpadder.update(padded) + unpadder.finalize()
    except ValueError as exc:
        raise bad_padding(cipher) from exc


def decrypt_der(
    enveloped: bytes,
    cert: x509.Certificate,
    key: PrivateKey,
    *,
    policy: AlgorithmPolicy,
) -> Decrypted | None:
    """Decrypt the common DER shapes of EnvelopedData or AuthEnvelopedData addressed to
    ``cert`` directly; None for anything else (BER, other recipient forms, a malformed
    message), which :func:`gateway.cms.decrypting.decrypt` reads as a stream."""
    try:
        parsed = _parse_der(enveloped)
    except DerError:
        return None
    cipher = content_cipher_name(parsed.cipher_oid_name, policy)
    cek, key_transport = recover_cek(parsed.recipient_infos, cert, key, policy)
    try:
        content = _decrypt_content(parsed, cipher, cek)
    except ASN1_ERRORS as exc:
        raise MalformedMessageError(
            f"encrypted message has malformed {cipher} parameters: {exc}",
            fix="check that the message was not truncated or altered in transit",
        ) from exc
    compat = tuple(
        n for n in (cipher, key_transport) if n in COMPAT_CONTENT_CIPHERS + COMPAT_KEY_TRANSPORTS
    )
    return Decrypted(
        content=content,
        content_cipher=cipher,
        key_transport=key_transport,
        compat_algorithms=compat,
    )


def bad_padding(cipher: str) -> DecryptionError:
    """For a caller that holds the whole content and answers no remote party.  (The
    daemon does not get it: it refuses such content like an altered signature, see
    gateway.cms.decrypting.DecryptedFile.intact.)"""
    return DecryptionError(
        f"{cipher}: decrypted content has invalid padding (wrong key or altered message)",
        fix="ask the peer to resend the message",
    )


def content_cipher_name(oid_name: str, policy: AlgorithmPolicy) -> str:
    """Our name for a content-encryption algorithm, policy-checked for inbound use."""
    cipher = CIPHER_BY_OID_NAME.get(oid_name)
    if cipher is None:
        raise PolicyError(
            f"content cipher {oid_name}",
            "content cipher is not on the CRYPTREC recommended list",
            "ask the peer to encrypt with aes-256-gcm or aes-256-cbc",
        )
    policy.check_content_cipher(cipher, inbound=True)
    return cipher


def recover_cek(
    recipient_infos: Any, cert: x509.Certificate, key: PrivateKey, policy: AlgorithmPolicy
) -> tuple[bytes, str]:
    """The content-encryption key from the recipient info addressed to ``cert``.

    Returns (key, key transport name).  ``recipient_infos`` is asn1crypto's
    RecipientInfos or what :func:`direct_recipients` read.
    """
    label = cert_label(cert)
    if isinstance(recipient_infos, _DirectRecipients):
        found_direct = _recover_direct(recipient_infos, cert, key, policy, label)
        if found_direct is not None:
            return found_direct
        # not the common case (ours not named by exactly our bytes, not found, ...):
        # the asn1crypto reading, for exactly its result or error
        recipient_infos = cms.RecipientInfos.load(recipient_infos.der)
    try:
        found: tuple[bytes, str] | None = None
        seen: list[Any] = []  # recipient identifiers, described only if none is ours
        for ri in recipient_infos:
            if ri.name == "ktri":
                ktri = ri.chosen
                seen.append(ktri["rid"])
                if _rid_matches(cert, ktri["rid"]):
                    if not isinstance(key, rsa.RSAPrivateKey):
                        raise DecryptionError(
                            f"message was encrypted for {label} with RSA key transport, but "
                            "our key is not an RSA key",
                            fix="configure the private key that matches our certificate",
                        )
                    found = _unwrap_ktri(ktri, key, policy, label)
                    break
            elif ri.name == "kari":
                kari = ri.chosen
                for rek in kari["recipient_encrypted_keys"]:
                    seen.append(rek["rid"])
                    if _rid_matches(cert, rek["rid"]):
                        if not isinstance(key, ec.EllipticCurvePrivateKey):
                            raise DecryptionError(
                                f"message was encrypted for {label} with ECDH, but our key "
                                "is not an EC key",
                                fix="configure the private key that matches our certificate",
                            )
                        found = _unwrap_kari(kari, rek, key, policy, label)
                        break
                if found is not None:
                    break
            else:
                seen.append(f"<{ri.name} recipient>")
    except ASN1_ERRORS as exc:
        raise MalformedMessageError(
            f"encrypted message has a malformed RecipientInfo: {exc}",
            fix="check that the message was not truncated or altered in transit",
        ) from exc
    if found is None:
        raise DecryptionError(
            f"the message was encrypted for someone else: it has no recipient info for our "
            f"certificate ({label}); recipients in the message: "
            + (
                "; ".join(r if isinstance(r, str) else _describe_rid(r) for r in seen)
                if seen
                else "none"
            ),
            fix="ask the peer to encrypt with our current encryption certificate "
            "(it may be using an old or another institution's certificate)",
        )
    return found
