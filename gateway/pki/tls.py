"""TLS contexts for the mutual-TLS channel, with certificate pinning.

Both directions require a certificate from the other side that

1. chains to one of our configured trust anchors (OpenSSL's path validation,
   X.509 strict mode), and
2. is one of the certificates configured for a peer (pinning): one CA often
   serves many institutions, so a valid chain alone is not an identity.  On
   the server side a certificate may instead carry a public key pinned for a
   peer (``tls_spki_pins``, SHA-256 of the SubjectPublicKeyInfo): the daemon
   then validates it fully (path, purpose, revocation) before reading a
   request, since it was not judged in advance like a listed certificate.

The pin is checked inside the handshake (a custom ``SSLObject``), so on the
client side no byte of a request is sent to an unpinned server, and on the
server side an unknown client never reaches the HTTP layer.  On the server side
OpenSSL itself asks for the pin, right after its own path validation (a
verification callback, see :func:`gateway.pki.tlsnative.judge_leaf`): a refused
client gets the alert a standard TLS server sends (``bad_certificate``; for
OpenSSL's own refusals ``unknown_ca``, ``certificate_expired``,
``certificate_required``...), which :func:`refusal_alert` keeps for the listener
to send, since asyncio closes a failed handshake's connection without it.

Protocol: TLS 1.3 by default; TLS 1.2 only when configured, and then only with
ECDHE/DHE key exchange and AES-GCM (the CRYPTREC "high security" profile), at
OpenSSL security level 2 whatever the system's openssl.cnf says (a server's
1024-bit DH group or RSA key is refused).
TLS 1.3 suites and the key-exchange groups are those of the policy
(:data:`gateway.policy.TLS13_SUITES`, :data:`gateway.policy.TLS_GROUPS`: AES-GCM,
ECDH over P-256/P-384/P-521), set through :mod:`gateway.pki.tlsnative` since
Python's ``ssl`` cannot: a server never selects what the policy refuses (a client
that prefers ChaCha20 gets AES-GCM), a client never offers it.  A handshake that
settled on anything else all the same is refused right after it completes.

Only the certificate and its intermediate CAs are sent, never a root: the
peer must already hold the root as its trust anchor, and a root in the chain
only tells a scanner which one it is.  Intermediates come from the certificate
file and, when it lacks them, from the trust anchors given (as OpenSSL's own
chain building did, root included).
"""

from __future__ import annotations

import hashlib
import ssl
import tempfile
import threading
from collections.abc import Iterable, Sequence
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization

from gateway.errors import InvalidValueError
from gateway.pki import tlsnative
from gateway.pki.keypair import KeyPair
from gateway.policy import TLS13_SUITES as POLICY_TLS13_SUITES
from gateway.policy import TLS_GROUPS

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


TLS13_SUITES = frozenset(POLICY_TLS13_SUITES)

# OpenSSL security level 2: at least 112-bit security in the handshake, which is
# the CRYPTREC floor (RSA and DH >= 2048 bits, EC >= 224 bits, no SHA-1
# signatures).  Set here, not left to the system's openssl.cnf, which may lower it.
SECURITY_LEVEL = 2


class _Refusal:
    """``str()`` is the message (``ssl.SSLError`` would show the tuple of arguments)."""

    args: tuple[object, ...]

    def __str__(self) -> str:
        return str(self.args[0]) if len(self.args) == 1 else str(self.args)


class NotPinnedError(_Refusal, ssl.SSLCertVerificationError):
    """The peer's certificate chains to a trust anchor but belongs to no configured peer."""


class CipherRefusedError(_Refusal, ssl.SSLError):
    """The handshake settled on a cipher suite outside the CRYPTREC list."""


def fingerprint(der: bytes) -> str:
    return hashlib.sha256(der).hexdigest()


def certificate_fingerprint(cert: x509.Certificate) -> str:
    return fingerprint(cert.public_bytes(serialization.Encoding.DER))


def spki_fingerprint(cert: x509.Certificate) -> str:
    """SHA-256 (hex) of the certificate's SubjectPublicKeyInfo DER: a pin that survives renewal."""
    spki = cert.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return hashlib.sha256(spki).hexdigest()


def der_spki_fingerprint(der: bytes) -> str | None:
    """``spki_fingerprint`` of a DER certificate; None if it cannot be parsed."""
    try:
        return spki_fingerprint(x509.load_der_x509_certificate(der))
    except (ValueError, UnsupportedAlgorithm):
        return None


def refusal_alert(exc: BaseException) -> bytes:
    """The TLS record OpenSSL wrote to tell the other side why a handshake failed (its
    alert: unknown_ca, certificate_required, bad_certificate, certificate_expired...),
    or b"" when it wrote none.  asyncio closes the connection without sending it."""
    alert = getattr(exc, "tls_alert", b"")
    return alert if isinstance(alert, bytes) else b""


class _Refused(threading.local):
    """The leaf certificate the verification callback last refused, in this thread
    (a handshake runs its callback synchronously, inside ``do_handshake``)."""

    der: bytes | None = None


def _pinned_object_class(
    pins: frozenset[str],
    side: str,
    spki_pins: frozenset[str] = frozenset(),
    refused: _Refused | None = None,
) -> type[ssl.SSLObject]:
    class PinnedSSLObject(ssl.SSLObject):
        _outgoing: ssl.MemoryBIO | None = None

        @classmethod
        def _create(  # type: ignore[no-untyped-def]
            cls, incoming: ssl.MemoryBIO, outgoing: ssl.MemoryBIO, *args, **kwargs
        ) -> PinnedSSLObject:
            created: PinnedSSLObject = super()._create(  # type: ignore[misc]
                incoming, outgoing, *args, **kwargs
            )
            created._outgoing = outgoing  # where OpenSSL writes its alert on a refusal
            return created

        def do_handshake(self) -> None:
            try:
                super().do_handshake()
            except (ssl.SSLWantReadError, ssl.SSLWantWriteError):
                raise
            except ssl.SSLError as exc:
                raise self._refusal(exc) from None
            suite = (self.cipher() or ("",))[0]
            if self.version() == "TLSv1.3" and suite not in TLS13_SUITES:
                raise CipherRefusedError(
                    f"the {side} negotiated {suite}, which is not on the CRYPTREC list "
                    "(TLS 1.3 with AES-GCM only); fix: the other side must offer "
                    "TLS_AES_256_GCM_SHA384 or TLS_AES_128_GCM_SHA256"
                )
            der = self.getpeercert(binary_form=True)
            if der is not None and _pinned(der, pins, spki_pins):
                return
            what = "no certificate" if der is None else f"certificate sha256:{fingerprint(der)}"
            raise NotPinnedError(f"{side} presented {what}, which is not configured for any peer")

        def _refusal(self, exc: ssl.SSLError) -> ssl.SSLError:
            """``exc`` with OpenSSL's alert kept (see refusal_alert), and the certificate
            refused inside the handshake, if one was (see refusal_reason); one the pins
            refused is named as such."""
            der = refused.der if refused is not None else None
            if refused is not None:
                refused.der = None
            if isinstance(exc, ssl.SSLCertVerificationError) and der is not None:
                if exc.verify_code == tlsnative.CERT_REJECTED:
                    exc = NotPinnedError(
                        f"{side} presented {_named(der)}, which is not configured for any peer"
                    )
                exc.presented = der  # type: ignore[attr-defined]
            exc.tls_alert = self._outgoing.read() if self._outgoing is not None else b""  # type: ignore[attr-defined]
            return exc

    return PinnedSSLObject


def _named(der: bytes) -> str:
    """A presented certificate as an administrator finds it: by its fingerprint, then
    the subject it claims.  A refused certificate's subject is whatever its holder
    wrote into it (an impostor's names the peer it poses as), so it is said as a claim."""
    named = f"a certificate (sha256:{fingerprint(der)})"
    try:
        subject = x509.load_der_x509_certificate(der).subject.rfc4514_string()
    except ValueError:
        return f"{named} that cannot be read"
    return f"{named} claiming {subject}" if subject else f"{named} with no subject"


# OpenSSL's verification errors (X509_V_ERR_*) a client certificate meets most, in words.
_IN_WORDS = {
    2: "it does not chain to a trust anchor of the listener's zone",
    9: "its notBefore is still ahead (or this host's clock is behind)",
    10: "its notAfter has passed: the peer must renew it, or this host's clock is ahead",
    18: "it is self-signed, not issued by a trust anchor of the listener's zone",
    19: "its chain ends in a root that is not a trust anchor of the listener's zone",
    20: "it does not chain to a trust anchor of the listener's zone",
    26: "its keyUsage or extendedKeyUsage does not allow TLS client authentication",
}


def refusal_reason(exc: BaseException) -> str:
    """Why the listener refused a client's handshake, for the log and the audit trail
    (never sent to the client): the certificate it presented (SHA-256, and the subject
    it claims) when it presented one, OpenSSL's reason and what that means."""
    der = getattr(exc, "presented", None)
    if isinstance(exc, NotPinnedError):
        return str(exc)
    if isinstance(exc, ssl.SSLCertVerificationError):
        said = exc.verify_message or str(exc)
        words = _IN_WORDS.get(exc.verify_code)
        who = _named(der) if isinstance(der, bytes) else "a certificate"
        return f"client presented {who}, refused: {said}" + (f" ({words})" if words else "")
    if getattr(exc, "reason", None) == "PEER_DID_NOT_RETURN_A_CERTIFICATE":
        return (
            "client presented no certificate (peer did not return a certificate): "
            "every listener requires one (mutual TLS)"
        )
    return getattr(exc, "verify_message", None) or str(exc) or type(exc).__name__


def _pinned(der: bytes, pins: frozenset[str], spki_pins: frozenset[str]) -> bool:
    """A listed certificate, or one carrying a pinned key (validated in full by the
    daemon before any request is read)."""
    if fingerprint(der) in pins:
        return True
    return bool(spki_pins) and der_spki_fingerprint(der) in spki_pins


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
    context.set_ciphers(f"{TLS12_CIPHERS}:@SECLEVEL={SECURITY_LEVEL}")
    context.options |= ssl.OP_NO_COMPRESSION | ssl.OP_NO_RENEGOTIATION
    context.verify_flags |= ssl.VERIFY_X509_STRICT
    context.verify_mode = ssl.CERT_REQUIRED
    anchors = tuple(anchors)
    pem = "".join(cert.public_bytes(serialization.Encoding.PEM).decode() for cert in anchors)
    context.load_verify_locations(cadata=pem)
    tlsnative.restrict(
        context,
        tls13_suites=":".join(POLICY_TLS13_SUITES),
        groups=":".join(TLS_GROUPS),
        security_level=SECURITY_LEVEL,
    )
    chain = chain_to_send(identity, anchors)
    with tempfile.TemporaryDirectory(prefix="medgw-chain-") as folder:
        # ssl loads a chain from a file only; it holds public certificates alone
        chain_file = Path(folder) / "chain.pem"
        chain_file.write_bytes(b"".join(c.public_bytes(serialization.Encoding.PEM) for c in chain))
        context.load_cert_chain(str(chain_file), str(identity.key_path))
    return context


def _self_signed(cert: x509.Certificate) -> bool:
    return cert.issuer == cert.subject


def issues(issuer: x509.Certificate, cert: x509.Certificate) -> bool:
    """Whether ``issuer`` issued ``cert``: its name, and the key that signed it (of two CA
    certificates with one name, during a rollover, only one has that key)."""
    if cert.issuer != issuer.subject:
        return False
    try:
        cert.verify_directly_issued_by(issuer)
    except (ValueError, TypeError, InvalidSignature, UnsupportedAlgorithm):
        return False
    return True


def chain_to_send(identity: KeyPair, anchors: Iterable[x509.Certificate]) -> list[x509.Certificate]:
    """Our certificate, then the intermediate CAs up to (not including) a root: from the
    certificate file, else from ``anchors``.  At most 8 intermediates."""
    leaf = identity.certificate
    candidates = [c for c in (*identity.chain, *anchors) if c != leaf and not _self_signed(c)]
    chain = [leaf]
    while len(chain) <= 8 and not _self_signed(chain[-1]):
        issuer = next((c for c in candidates if c not in chain and issues(c, chain[-1])), None)
        if issuer is None:
            break
        chain.append(issuer)
    return chain


def server_context(
    identity: KeyPair,
    anchors: Iterable[x509.Certificate],
    accepted_clients: Iterable[x509.Certificate],
    min_version: str,
    accepted_spki: Iterable[str] = (),
) -> ssl.SSLContext:
    """Listener context: client certificate required, must chain and be a configured peer's
    (a listed certificate, or one whose public key is in ``accepted_spki``)."""
    context = _base_context(ssl.Purpose.CLIENT_AUTH, identity, anchors, min_version)
    # No session resumption: a resumed session skips the client certificate's path
    # validation and pin check, which must be judged again on every connection (a
    # revocation or a peer removed since then counts).  AS2 clients keep connections
    # alive, so a full handshake per connection costs little.
    context.options |= ssl.OP_NO_TICKET
    context.num_tickets = 0
    tlsnative.no_session_cache(context, security_level=SECURITY_LEVEL)
    pins = frozenset(certificate_fingerprint(c) for c in accepted_clients)
    spki_pins = frozenset(accepted_spki)
    refused = _Refused()

    def accept(der: bytes) -> bool:
        return _pinned(der, pins, spki_pins)

    def refuse(der: bytes) -> None:
        refused.der = der

    # Refused inside the handshake: the client gets the bad_certificate alert.
    tlsnative.judge_leaf(context, security_level=SECURITY_LEVEL, accept=accept, refused=refuse)
    context.sslobject_class = _pinned_object_class(pins, "client", spki_pins, refused)
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


def collector_context(
    identity: KeyPair, anchors: Iterable[x509.Certificate], min_version: str
) -> ssl.SSLContext:
    """Context to connect to the hospital's audit collector (syslog over TLS): our client
    certificate, the policy's TLS, the collector's certificate chained to ``anchors``
    and its name checked."""
    context = _base_context(ssl.Purpose.SERVER_AUTH, identity, anchors, min_version)
    context.check_hostname = True
    return context


def delivery_tls_context(certificates: Sequence[x509.Certificate]) -> ssl.SSLContext:
    """The client TLS context for an https:// hand-over: trusts exactly ``certificates``
    (``[delivery] ca``), TLS 1.2 or newer.  Built from the loaded certificates rather
    than the file, so a DER file works as well as a PEM one.  Raises ssl.SSLError."""
    if not certificates:
        raise InvalidValueError(
            "no CA certificate to verify the internal system against: an https:// hand-over "
            "trusts exactly the certificates of [delivery] ca",
            fix="set [delivery] ca in gateway.toml to the CA of the internal system's certificate",
        )
    pem = "".join(c.public_bytes(serialization.Encoding.PEM).decode() for c in certificates)
    context = ssl.create_default_context(cadata=pem)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    return context
