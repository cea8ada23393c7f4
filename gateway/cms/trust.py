"""Signer validation against explicit trust anchors.

A deliberately small path check used until the PKI layer's RFC 5280 validator
(with revocation) takes over: it builds a chain from the signer through the
certificates carried in the message to one of the given anchors, checks each
certificate's signature, its validity at the verification time, and that every
issuer is a CA.  It is what :func:`gateway.cms.verification.verify` calls through its
``validate_signer`` hook; the PKI layer plugs in the same way.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm

from ..errors import InvalidValueError, SignerNotTrustedError
from .common import cert_label

__all__ = ["SignerValidator", "TrustAnchors"]

SignerValidator = Callable[[x509.Certificate, Sequence[x509.Certificate]], None]

_MAX_DEPTH = 8


def _issued_by(cert: x509.Certificate, issuer: x509.Certificate) -> bool:
    if cert.issuer != issuer.subject:
        return False
    try:
        cert.verify_directly_issued_by(issuer)
    except (ValueError, TypeError, InvalidSignature, UnsupportedAlgorithm):
        return False
    return True


def _is_ca(cert: x509.Certificate) -> bool:
    try:
        bc = cert.extensions.get_extension_for_class(x509.BasicConstraints).value
    except x509.ExtensionNotFound:
        # A self-signed v1 root given explicitly as an anchor is accepted as a CA.
        return cert.version == x509.Version.v1 and cert.issuer == cert.subject
    return bool(bc.ca)


@dataclass(frozen=True)
class TrustAnchors:
    """Accept a signer whose chain ends at one of ``anchors``, valid at ``at``."""

    anchors: tuple[x509.Certificate, ...]
    at: datetime

    def __call__(self, signer: x509.Certificate, carried: Sequence[x509.Certificate]) -> None:
        if self.at.tzinfo is None:
            raise InvalidValueError(
                f"at={self.at.isoformat()}: a signer is judged at a time with a time zone",
                fix="pass an aware time, e.g. the injected clock's now()",
            )
        self._check_time(signer, "signer")
        if signer in self.anchors:
            return
        cert = signer
        pool = [c for c in carried if c != signer]
        for _ in range(_MAX_DEPTH):
            for anchor in self.anchors:
                if _issued_by(cert, anchor):
                    self._check_time(anchor, "trust anchor")
                    if not _is_ca(anchor):
                        break
                    return
            nxt = next((c for c in pool if _issued_by(cert, c) and _is_ca(c)), None)
            if nxt is None:
                break
            self._check_time(nxt, "intermediate CA")
            pool.remove(nxt)
            cert = nxt
        raise SignerNotTrustedError(
            f"signer certificate ({cert_label(signer)}) does not chain to any trust anchor "
            f"({'; '.join(a.subject.rfc4514_string() for a in self.anchors) or 'none given'}) "
            f"through the {len(carried)} certificate(s) in the message",
            fix="give the CA that issued the peer's signing certificate as a trust anchor, or "
            "ask the peer to include its intermediate CA certificates",
        )

    def _check_time(self, cert: x509.Certificate, role: str) -> None:
        if not cert.not_valid_before_utc <= self.at <= cert.not_valid_after_utc:
            raise SignerNotTrustedError(
                f"{role} certificate ({cert_label(cert)}) is not valid at "
                f"{self.at.isoformat()}: valid from {cert.not_valid_before_utc.isoformat()} "
                f"to {cert.not_valid_after_utc.isoformat()}",
                fix="ask the peer for its current certificate, or verify at a time inside "
                "the validity period (--at) when checking an old message",
            )
