"""TLS contexts for the mutual-TLS channel, with certificate pinning.

Both directions require a certificate from the other side that

1. chains to one of our configured trust anchors (OpenSSL's path validation,
   X.509 strict mode), and
2. is one of the certificates configured for a peer (pinning): one CA often
   serves many institutions, so a valid chain alone is not an identity.

The pin is checked inside the handshake (a custom ``SSLObject``), so on the
client side no byte of a request is sent to an unpinned server, and on the
server side an unknown client never reaches the HTTP layer.

Protocol: TLS 1.3 by default; TLS 1.2 only when configured, and then only with
ECDHE/DHE key exchange and AES-GCM (the CRYPTREC "high security" profile).
"""

from __future__ import annotations

import hashlib
import ssl
from collections.abc import Iterable

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from gateway.config import KeyPair

TLS12_CIPHERS = ":".join(
    (
        "ECDHE-ECDSA-AES256-GCM-SHA384",
        "ECDHE-ECDSA-AES128-GCM-SHA256",
        "ECDHE-RSA-AES256-GCM-SHA384",
        "ECDHE-RSA-AES128-GCM-SHA256",
        "DHE-RSA-AES256-GCM-SHA384",
        "DHE-RSA-AES128-GCM-SHA256",
    )
)


class NotPinnedError(ssl.SSLCertVerificationError):
    """The peer's certificate chains to a trust anchor but belongs to no configured peer."""


def fingerprint(der: bytes) -> str:
    return hashlib.sha256(der).hexdigest()


def certificate_fingerprint(cert: x509.Certificate) -> str:
    return fingerprint(cert.public_bytes(serialization.Encoding.DER))


def _pinned_object_class(pins: frozenset[str], side: str) -> type[ssl.SSLObject]:
    class PinnedSSLObject(ssl.SSLObject):
        def do_handshake(self) -> None:
            super().do_handshake()
            der = self.getpeercert(binary_form=True)
            if der is None or fingerprint(der) not in pins:
                what = "no certificate" if der is None else f"certificate sha256:{fingerprint(der)}"
                raise NotPinnedError(
                    f"{side} presented {what}, which is not configured for any peer"
                )

    return PinnedSSLObject


def _base_context(
    purpose: ssl.Purpose, identity: KeyPair, anchors: Iterable[x509.Certificate], min_version: str
) -> ssl.SSLContext:
    protocol = (
        ssl.PROTOCOL_TLS_SERVER if purpose is ssl.Purpose.CLIENT_AUTH else ssl.PROTOCOL_TLS_CLIENT
    )
    context = ssl.SSLContext(protocol)
    context.minimum_version = (
        ssl.TLSVersion.TLSv1_3 if min_version == "1.3" else ssl.TLSVersion.TLSv1_2
    )
    context.set_ciphers(TLS12_CIPHERS)
    context.options |= ssl.OP_NO_COMPRESSION | ssl.OP_NO_RENEGOTIATION
    context.verify_flags |= ssl.VERIFY_X509_STRICT
    context.verify_mode = ssl.CERT_REQUIRED
    pem = "".join(cert.public_bytes(serialization.Encoding.PEM).decode() for cert in anchors)
    context.load_verify_locations(cadata=pem)
    context.load_cert_chain(str(identity.certificate_path), str(identity.key_path))
    return context


def server_context(
    identity: KeyPair,
    anchors: Iterable[x509.Certificate],
    accepted_clients: Iterable[x509.Certificate],
    min_version: str,
) -> ssl.SSLContext:
    """Listener context: client certificate required, must chain and be a configured peer's."""
    context = _base_context(ssl.Purpose.CLIENT_AUTH, identity, anchors, min_version)
    pins = frozenset(certificate_fingerprint(c) for c in accepted_clients)
    context.sslobject_class = _pinned_object_class(pins, "client")
    return context


def client_context(
    identity: KeyPair,
    anchors: Iterable[x509.Certificate],
    peer_certificates: Iterable[x509.Certificate],
    min_version: str,
) -> ssl.SSLContext:
    """Context to connect to one peer: host name checked, and the certificate pinned."""
    context = _base_context(ssl.Purpose.SERVER_AUTH, identity, anchors, min_version)
    context.check_hostname = True
    pins = frozenset(certificate_fingerprint(c) for c in peer_certificates)
    context.sslobject_class = _pinned_object_class(pins, "server")
    return context
