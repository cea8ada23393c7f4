"""Reading certificates and CRLs from the files an administrator maintains.

Every file may be PEM (one or more blocks) or DER (exactly one object).  A
file that holds nothing readable is a :class:`PkiFileError` naming the file
and what was expected, never an empty list.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

from cryptography import x509

from gateway.errors import MedgwError
from gateway.fsutil import read_admin_file, this_user

CRL_SUFFIXES = (".crl", ".pem", ".der", ".r0", ".r1")


class PkiFileError(MedgwError):
    """A certificate or CRL file cannot be read."""


def _read(path: Path, what: str) -> bytes:
    try:
        return read_admin_file(path)
    except FileNotFoundError:
        raise PkiFileError(
            f"{what} file {path} not found", fix="correct the path or create the file"
        ) from None
    except OSError as exc:
        raise PkiFileError(
            f"cannot read {what} file {path}: {exc.strerror}", fix="check the path and permissions"
        ) from None


def parse_certificates(data: bytes, source: str = "input") -> list[x509.Certificate]:
    """All certificates in ``data`` (PEM blocks, or one DER certificate)."""
    try:
        if b"-----BEGIN" in data:
            return x509.load_pem_x509_certificates(data)
        return [x509.load_der_x509_certificate(data)]
    except ValueError as exc:
        raise PkiFileError(
            f"{source} holds no readable X.509 certificate ({exc})",
            fix="give a PEM or DER certificate file",
        ) from None


def load_certificates(path: str | os.PathLike[str]) -> list[x509.Certificate]:
    """Certificates from a PEM (one or more) or DER file."""
    file = Path(path)
    return parse_certificates(_read(file, "certificate"), str(file))


def parse_crls(data: bytes, source: str = "input") -> list[x509.CertificateRevocationList]:
    """All CRLs in ``data`` (PEM ``X509 CRL`` blocks, or one DER CRL)."""
    try:
        if b"-----BEGIN" in data:
            marker = b"-----BEGIN X509 CRL-----"
            blocks = [marker + part for part in data.split(marker)[1:]]
            crls = [x509.load_pem_x509_crl(block) for block in blocks]
            if not crls:
                raise ValueError("no BEGIN X509 CRL block")
            return crls
        return [x509.load_der_x509_crl(data)]
    except ValueError as exc:
        raise PkiFileError(
            f"{source} holds no readable CRL ({exc})", fix="give a PEM or DER CRL file"
        ) from None


def load_crls(path: str | os.PathLike[str]) -> list[x509.CertificateRevocationList]:
    """CRLs from a file, or from every ``*.crl``/``*.pem``/``*.der`` file in a folder."""
    file = Path(path)
    try:
        if not file.is_dir():
            return parse_crls(_read(file, "CRL"), str(file))
        entries = [
            e for e in sorted(file.iterdir()) if e.is_file() and e.suffix.lower() in CRL_SUFFIXES
        ]
    except OSError as exc:  # a folder on the way this user may not enter, or list
        user = this_user()
        raise PkiFileError(
            f"cannot read the CRLs at {file}: {exc.strerror} for user {user}, "
            "whom this command runs as",
            fix=f"if medgw runs as another user, run this command as that user "
            f"(sudo -u medgw medgw ...); otherwise let user {user} enter every folder "
            f"down to {file} and read it (namei -l {file} shows each folder's owner and mode)",
        ) from None
    out: list[x509.CertificateRevocationList] = []
    for entry in entries:
        out.extend(parse_crls(_read(entry, "CRL"), str(entry)))
    return out


def load_many(paths: Iterable[str | os.PathLike[str]]) -> list[x509.Certificate]:
    out: list[x509.Certificate] = []
    for path in paths:
        out.extend(load_certificates(path))
    return out


def describe(cert: x509.Certificate) -> str:
    """The subject as an administrator reads it, e.g. ``CN=Lab TLS,O=Lab``."""
    subject = cert.subject.rfc4514_string()
    return subject or f"(empty subject, serial {cert.serial_number:x})"
