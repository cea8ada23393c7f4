"""Our own identity: a certificate and its private key, loaded and checked to match.

It lives here, below the configuration, because the layers that use a key pair
(TLS contexts, S/MIME signing, receipts) must not know how one is configured.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec, rsa

# The private keys this gateway holds for itself (the policy accepts more from peers).
PrivateKey = rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey


@dataclass(frozen=True)
class KeyPair:
    """A certificate and its private key, both loaded and checked to match."""

    certificate_path: Path
    key_path: Path
    certificate: x509.Certificate
    key: PrivateKey
    chain: tuple[x509.Certificate, ...] = ()
