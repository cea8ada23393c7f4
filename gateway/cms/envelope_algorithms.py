"""The algorithms of CMS EnvelopedData (RFC 5652 section 6) and AuthEnvelopedData
(RFC 5083) by name and identifier: content ciphers and their parameters (AES-GCM,
RFC 5084; AES-CBC; 3DES-CBC read only from a peer whose ``accept_legacy`` names
it), AES key wrap, and the ECDH key-derivation schemes (RFC 5753)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from asn1crypto import algos, core
from cryptography.hazmat.primitives.kdf.x963kdf import X963KDF

from ..errors import DecryptionError, PolicyError
from ..policy import AlgorithmPolicy
from .common import hash_for
from .der import tlv


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
CIPHER_OID_DER: dict[str, bytes] = {
    v[0]: algos.EncryptionAlgorithmId(v[0]).dump() for v in CIPHERS.values()
}

OID_DATA = "1.2.840.113549.1.7.1"
OID_ENVELOPED = "1.2.840.113549.1.7.3"
OID_AUTH_ENVELOPED = "1.2.840.113549.1.9.16.1.23"

WRAP_BY_KEYLEN = {16: "aes128_wrap", 24: "aes192_wrap", 32: "aes256_wrap"}
WRAP_KEYLEN = {"aes128_wrap": 16, "aes192_wrap": 24, "aes256_wrap": 32}

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
STD_KDF_OID = {"sha256": "1.3.132.1.11.1", "sha384": "1.3.132.1.11.2", "sha512": "1.3.132.1.11.3"}
KDF_BY_CURVE = {"secp256r1": "sha256", "secp384r1": "sha384", "secp521r1": "sha512"}


@dataclass(frozen=True)
class Decrypted:
    content: bytes
    content_cipher: str
    key_transport: str
    compat_algorithms: tuple[str, ...]


def _shared_info(key_info_der: bytes, ukm: bytes | None, kek_len: int) -> bytes:
    """DER ECC-CMS-SharedInfo (RFC 5753 7.2), written directly: ``key_info_der`` as is,
    then ``[0] EXPLICIT OCTET STRING`` ukm if there is one, ``[2] EXPLICIT OCTET STRING``
    the key-encryption key's length in bits."""
    entity_u_info = b"" if ukm is None else tlv(0xA0, tlv(0x04, ukm))
    supp_pub_info = tlv(0xA2, tlv(0x04, (kek_len * 8).to_bytes(4, "big")))
    return tlv(0x30, key_info_der + entity_u_info + supp_pub_info)


def derive_kek(
    shared_secret: bytes, kdf_digest: str, key_info_der: bytes, ukm: bytes | None, kek_len: int
) -> bytes:
    kdf = X963KDF(
        algorithm=hash_for(kdf_digest, allow_sha1=True),
        length=kek_len,
        sharedinfo=_shared_info(key_info_der, ukm, kek_len),
    )
    return kdf.derive(shared_secret)


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
