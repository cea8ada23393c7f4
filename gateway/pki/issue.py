"""Create keys and X.509 certificates: the demo PKI and test PKIs.

Small, explicit helpers over ``cryptography``.  They build well-formed
certificates by default (SKI/AKI, critical basicConstraints and keyUsage,
extendedKeyUsage per purpose) and take every input a test needs to build a
deliberately bad PKI (an expired leaf, an RSA-2048 key, a too-short path
length, ...).  Nothing here reads a clock or a configuration: the caller
passes ``now``.

This module is for the demo and for tests.  A production installation gets
its certificates from the institution's (or the regional network's) CA.
"""

from __future__ import annotations

import ipaddress
import os
import secrets
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from gateway.errors import InvalidValueError
from gateway.pki.keypair import PrivateKey

KEY_KINDS = ("ec-p256", "ec-p384", "rsa-2048", "rsa-3072")
PURPOSES = ("tls", "smime-sign", "smime-encrypt")
_KEY_USAGES = (
    "digital_signature",
    "content_commitment",
    "key_encipherment",
    "data_encipherment",
    "key_agreement",
    "key_cert_sign",
    "crl_sign",
    "encipher_only",
    "decipher_only",
)

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


@dataclass(frozen=True)
class Issued:
    """A certificate and the private key of its subject."""

    certificate: x509.Certificate
    key: PrivateKey


def new_key(kind: str = "ec-p256") -> PrivateKey:
    """A fresh private key: ``ec-p256``, ``ec-p384``, ``rsa-2048`` or ``rsa-3072``."""
    if kind == "ec-p256":
        return ec.generate_private_key(ec.SECP256R1())
    if kind == "ec-p384":
        return ec.generate_private_key(ec.SECP384R1())
    if kind == "rsa-2048":
        return rsa.generate_private_key(public_exponent=65537, key_size=2048)
    if kind == "rsa-3072":
        return rsa.generate_private_key(public_exponent=65537, key_size=3072)
    raise InvalidValueError(
        f"unknown key kind {kind!r}: only these are issued",
        fix=f"use one of {', '.join(KEY_KINDS)}",
    )


def signature_hash(issuer_key: PrivateKey) -> hashes.SHA256 | hashes.SHA384:
    """SHA-384 for a P-384 issuer (matching strength), SHA-256 otherwise."""
    if isinstance(issuer_key, ec.EllipticCurvePrivateKey) and issuer_key.curve.key_size >= 384:
        return hashes.SHA384()
    return hashes.SHA256()


def make_ca(
    common_name: str,
    *,
    now: datetime,
    days: int = 3650,
    key_kind: str = "ec-p256",
    organization: str | None = None,
    parent: Issued | None = None,
    path_length: int | None = None,
) -> Issued:
    """A CA certificate: self-signed root if ``parent`` is None, else an intermediate.

    ``path_length`` is the basicConstraints pathLenConstraint (None: unlimited).
    """
    _check_time(now, days)
    key = new_key(key_kind)
    subject = _name(common_name, organization)
    if parent is None:
        issuer_name, issuer_key, aki = subject, key, _aki_from_key(key)
    else:
        issuer_name = parent.certificate.subject
        issuer_key = parent.key
        aki = _aki_from_issuer(parent)
    builder = (
        _base(subject, issuer_name, key, now, days)
        .add_extension(x509.BasicConstraints(ca=True, path_length=path_length), critical=True)
        .add_extension(
            key_usage(key_cert_sign=True, crl_sign=True),
            critical=True,
        )
        .add_extension(aki, critical=False)
    )
    certificate = builder.sign(issuer_key, signature_hash(issuer_key))
    return Issued(certificate, key)


def key_usage(**on: bool) -> x509.KeyUsage:
    """A keyUsage with the usages named in ``on`` (e.g. ``key_cert_sign=True``), the
    others off; a name keyUsage does not have is a TypeError from ``cryptography``."""
    flags = dict.fromkeys(_KEY_USAGES, False)
    flags.update(on)
    return x509.KeyUsage(**flags)


def leaf_extensions(
    usage: dict[str, bool], eku: Sequence[x509.ObjectIdentifier]
) -> list[tuple[x509.ExtensionType, bool]]:
    """The extensions of an end-entity certificate (or its request), each with whether
    it is critical: not a CA, the key usages in ``usage`` (the others off), ``eku``."""
    return [
        (x509.BasicConstraints(ca=False, path_length=None), True),
        (
            key_usage(**usage),
            True,
        ),
        (x509.ExtendedKeyUsage(eku), False),
    ]


def issue(
    ca: Issued,
    common_name: str,
    *,
    purpose: str,
    now: datetime,
    days: int = 825,
    key_kind: str = "ec-p256",
    organization: str | None = None,
    dns_names: Iterable[str] = (),
    ip_addresses: Iterable[str | IPAddress] = (),
    ocsp_url: str | None = None,
    crl_url: str | None = None,
    extensions: Sequence[x509.ExtensionType] = (),
) -> Issued:
    """An end-entity certificate signed by ``ca``.

    ``purpose``:

    - ``"tls"``: keyUsage digitalSignature (+ keyEncipherment for RSA),
      extendedKeyUsage serverAuth + clientAuth (mutual TLS uses one
      certificate both ways);
    - ``"smime-sign"``: keyUsage digitalSignature + nonRepudiation,
      extendedKeyUsage emailProtection;
    - ``"smime-encrypt"``: keyUsage keyAgreement (EC) or keyEncipherment
      (RSA), extendedKeyUsage emailProtection.

    ``dns_names`` and ``ip_addresses`` go into subjectAltName (omitted when
    both are empty).  ``ocsp_url`` goes into authorityInformationAccess,
    ``crl_url`` into cRLDistributionPoints.  ``extensions`` are added as they
    are, non-critical (e.g. an HPKI hcRole in subjectDirectoryAttributes).
    """
    _check_time(now, days)
    if purpose not in PURPOSES:
        raise InvalidValueError(
            f"unknown certificate purpose {purpose!r}: only these are issued",
            fix=f"use one of {', '.join(PURPOSES)}",
        )
    key = new_key(key_kind)
    is_rsa = isinstance(key, rsa.RSAPrivateKey)
    usage = {
        "digital_signature": purpose in ("tls", "smime-sign"),
        "content_commitment": purpose == "smime-sign",
        "key_encipherment": is_rsa and purpose in ("tls", "smime-encrypt"),
        "key_agreement": not is_rsa and purpose == "smime-encrypt",
    }
    eku = (
        [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
        if purpose == "tls"
        else [ExtendedKeyUsageOID.EMAIL_PROTECTION]
    )
    builder = _base(_name(common_name, organization), ca.certificate.subject, key, now, days)
    for extension, critical in leaf_extensions(usage, eku):
        builder = builder.add_extension(extension, critical=critical)
    builder = builder.add_extension(_aki_from_issuer(ca), critical=False)
    alt_names: list[x509.GeneralName] = [x509.DNSName(name) for name in dns_names]
    alt_names += [x509.IPAddress(ipaddress.ip_address(ip)) for ip in ip_addresses]
    if alt_names:
        builder = builder.add_extension(x509.SubjectAlternativeName(alt_names), critical=False)
    builder = _add_revocation_pointers(builder, ocsp_url, crl_url)
    for extension in extensions:
        builder = builder.add_extension(extension, critical=False)
    certificate = builder.sign(ca.key, signature_hash(ca.key))
    return Issued(certificate, key)


def issue_ocsp_responder(
    ca: Issued, common_name: str, *, now: datetime, days: int = 30, key_kind: str = "ec-p256"
) -> Issued:
    """A delegated OCSP responder certificate (RFC 6960 4.2.2.2): issued by ``ca``,
    extendedKeyUsage OCSPSigning, with id-pkix-ocsp-nocheck."""
    _check_time(now, days)
    key = new_key(key_kind)
    certificate = (
        _base(_name(common_name, None), ca.certificate.subject, key, now, days)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            key_usage(digital_signature=True),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.OCSP_SIGNING]), critical=False)
        .add_extension(x509.OCSPNoCheck(), critical=False)
        .add_extension(_aki_from_issuer(ca), critical=False)
        .sign(ca.key, signature_hash(ca.key))
    )
    return Issued(certificate, key)


def make_crl(
    ca: Issued,
    *,
    now: datetime,
    days: int = 7,
    revoked: Iterable[tuple[int, datetime]] = (),
    number: int = 1,
) -> x509.CertificateRevocationList:
    """A CRL signed by ``ca``: thisUpdate ``now``, nextUpdate ``now + days``,
    listing the ``(serial, revocation time)`` pairs in ``revoked``."""
    _check_time(now, days)
    builder = (
        x509.CertificateRevocationListBuilder()
        .issuer_name(ca.certificate.subject)
        .last_update(now)
        .next_update(now + timedelta(days=days))
        .add_extension(x509.CRLNumber(number), critical=False)
        .add_extension(_aki_from_issuer(ca), critical=False)
    )
    for serial, when in revoked:
        builder = builder.add_revoked_certificate(
            x509.RevokedCertificateBuilder().serial_number(serial).revocation_date(when).build()
        )
    return builder.sign(ca.key, signature_hash(ca.key))


def _add_revocation_pointers(
    builder: x509.CertificateBuilder, ocsp_url: str | None, crl_url: str | None
) -> x509.CertificateBuilder:
    if ocsp_url:
        builder = builder.add_extension(
            x509.AuthorityInformationAccess(
                [
                    x509.AccessDescription(
                        x509.oid.AuthorityInformationAccessOID.OCSP,
                        x509.UniformResourceIdentifier(ocsp_url),
                    )
                ]
            ),
            critical=False,
        )
    if crl_url:
        point = x509.DistributionPoint([x509.UniformResourceIdentifier(crl_url)], None, None, None)
        builder = builder.add_extension(x509.CRLDistributionPoints([point]), critical=False)
    return builder


def write_pem(path: Path, obj: x509.Certificate | Sequence[x509.Certificate] | PrivateKey) -> None:
    """Write a certificate (or a chain, leaf first) or a private key as PEM.

    Private keys are written as unencrypted PKCS#8 into a file of mode 0600
    (the mode is set before any key byte is written); certificates get 0644
    less the umask.  The write is atomic: a temporary file in the same folder,
    flushed to disk, then renamed over ``path``.
    """
    if isinstance(obj, rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey):
        data = obj.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        mode = 0o600
    elif isinstance(obj, x509.Certificate):
        data = obj.public_bytes(serialization.Encoding.PEM)
        mode = 0o644
    else:
        data = b"".join(cert.public_bytes(serialization.Encoding.PEM) for cert in obj)
        mode = 0o644
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(6)}.tmp")
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0)
    fd = os.open(tmp, flags, mode)
    try:
        if mode == 0o600:
            os.fchmod(fd, 0o600)  # independent of the umask, and before the key is written
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _check_time(now: datetime, days: int) -> None:
    if now.tzinfo is None or now.utcoffset() is None:
        raise InvalidValueError(
            f"now={now.isoformat()}: a certificate's validity starts at a time with a time zone",
            fix="pass an aware time, e.g. datetime.now(timezone.utc)",
        )
    if days <= 0:
        raise InvalidValueError(
            f"days={days}: a certificate is valid for a positive number of days",
            fix="pass days of 1 or more",
        )


def _name(common_name: str, organization: str | None) -> x509.Name:
    attributes = []
    if organization:
        attributes.append(x509.NameAttribute(NameOID.ORGANIZATION_NAME, organization))
    attributes.append(x509.NameAttribute(NameOID.COMMON_NAME, common_name))
    return x509.Name(attributes)


def _base(
    subject: x509.Name, issuer: x509.Name, key: PrivateKey, now: datetime, days: int
) -> x509.CertificateBuilder:
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now)
        .not_valid_after(now + timedelta(days=days))
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
    )


def _aki_from_key(key: PrivateKey) -> x509.AuthorityKeyIdentifier:
    return x509.AuthorityKeyIdentifier.from_issuer_public_key(key.public_key())


def _aki_from_issuer(issuer: Issued) -> x509.AuthorityKeyIdentifier:
    try:
        ski = issuer.certificate.extensions.get_extension_for_class(x509.SubjectKeyIdentifier)
    except x509.ExtensionNotFound:
        return _aki_from_key(issuer.key)
    return x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski.value)
