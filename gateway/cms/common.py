"""What SignedData and EnvelopedData share: hash objects by name, ContentInfo
loading, certificates as CMS names them (issuerAndSerialNumber, subject key
identifier), and the DER of signed attributes."""

from __future__ import annotations

import functools
from datetime import UTC, datetime
from typing import Any

from asn1crypto import x509 as asn1_x509
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization

from ..errors import PolicyError
from ..policy import normalize_digest
from .der import oid_der, tlv

# Exceptions asn1crypto raises on malformed input (it parses lazily, so these
# can surface on any field access), and what cryptography raises on a certificate
# carried in a message with an unknown version.
ASN1_ERRORS: tuple[type[Exception], ...] = (
    ValueError,
    TypeError,
    KeyError,
    IndexError,
    OverflowError,
    x509.InvalidVersion,
)

HASHES: dict[str, type[hashes.HashAlgorithm]] = {
    "sha256": hashes.SHA256,
    "sha384": hashes.SHA384,
    "sha512": hashes.SHA512,
}

# Only used so that a SHA-1 key-management algorithm, or a peer's SHA-1 signature,
# can be *read* when that peer's accept_legacy names it (never to sign or compute
# a MIC we send).
COMPAT_HASHES: dict[str, type[hashes.HashAlgorithm]] = {**HASHES, "sha1": hashes.SHA1}


def hash_for(name: str, *, allow_sha1: bool = False) -> hashes.HashAlgorithm:
    """A ``cryptography`` hash object for a (policy-checked) digest name."""
    table = COMPAT_HASHES if allow_sha1 else HASHES
    cls = table.get(normalize_digest(name))
    if cls is None:
        raise PolicyError(name, "unsupported digest", "use sha256, sha384 or sha512")
    return cls()


def hash_bytes(data: bytes, name: str, *, allow_sha1: bool = False) -> bytes:
    h = hashes.Hash(hash_for(name, allow_sha1=allow_sha1))
    h.update(data)
    return h.finalize()


def asn1_cert(cert: x509.Certificate) -> Any:
    return asn1_x509.Certificate.load(cert.public_bytes(serialization.Encoding.DER))


def cert_label(cert: x509.Certificate) -> str:
    return (
        f"subject {cert.subject.rfc4514_string()!r}, issuer "
        f"{cert.issuer.rfc4514_string()!r}, serial 0x{cert.serial_number:x}"
    )


def cert_ski(cert: x509.Certificate) -> bytes | None:
    try:
        ext = cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier)
    except x509.ExtensionNotFound:
        return None
    return ext.value.digest


@functools.lru_cache(maxsize=256)
def issuer_serial_ders(cert_der: bytes) -> tuple[bytes, bytes]:
    """(issuer Name DER, serialNumber INTEGER DER) exactly as encoded in the certificate.

    A pure function of the certificate's bytes, cached: the certificates a
    gateway pins, signs with and decrypts with are few and the same for every
    message, and asn1crypto's parse of one costs more than the message's
    private-key operation.
    """
    tbs = asn1_x509.Certificate.load(cert_der)["tbs_certificate"]
    return tbs["issuer"].dump(), tbs["serial_number"].dump()


@functools.lru_cache(maxsize=256)
def cert_der(cert: x509.Certificate) -> bytes:
    """The DER of ``cert`` (cached: the same few certificates are compared for every message)."""
    return cert.public_bytes(serialization.Encoding.DER)


def matches_issuer_serial(cert: x509.Certificate, ias: Any) -> bool:
    """True if an asn1crypto IssuerAndSerialNumber names ``cert``.

    The issuer is compared by its DER bytes first; only if they differ is it
    compared as a Name (RFC 5280 7.1: the same name may be encoded with other
    string types, case or spacing).
    """
    if ias["serial_number"].native != cert.serial_number:
        return False
    issuer_der, _ = issuer_serial_ders(cert_der(cert))
    other = ias["issuer"]
    if other.dump() == issuer_der:
        return True
    # a fresh object each time: asn1crypto caches comparison forms on the Name
    return bool(asn1_x509.Name.load(issuer_der) == other)


def name_string(asn1_name: Any) -> str:
    """An asn1crypto ``Name`` in human-readable form (for error messages)."""
    try:
        return str(asn1_name.human_friendly)
    except Exception:  # only for messages
        return "<unparseable name>"


OID_CONTENT_TYPE = "1.2.840.113549.1.9.3"
OID_MESSAGE_DIGEST = "1.2.840.113549.1.9.4"
OID_SIGNING_TIME = "1.2.840.113549.1.9.5"
OID_ALGORITHM_PROTECTION = "1.2.840.113549.1.9.52"
OID_DATA_DER = oid_der("1.2.840.113549.1.7.1")
OID_SIGNED_DATA_DER = oid_der("1.2.840.113549.1.7.2")


def signed_attribute(oid: str, value_der: bytes) -> bytes:
    return tlv(0x30, oid_der(oid) + tlv(0x31, value_der))


@functools.lru_cache(maxsize=8)
def time_der(dt: datetime) -> bytes:
    dt = dt.astimezone(UTC)
    if 1950 <= dt.year < 2050:
        return tlv(0x17, dt.strftime("%y%m%d%H%M%SZ").encode("ascii"))
    return tlv(0x18, dt.strftime("%Y%m%d%H%M%SZ").encode("ascii"))


def issuer_and_serial_der(cert: x509.Certificate) -> bytes:
    """IssuerAndSerialNumber with the issuer Name and serial exactly as in the certificate."""
    issuer, serial = issuer_serial_ders(cert_der(cert))
    return tlv(0x30, issuer + serial)
