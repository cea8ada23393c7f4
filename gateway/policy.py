"""The CRYPTREC algorithm policy, shared by TLS and CMS.

One frozen object answers "may this algorithm / key be used here?".  Every
refusal is a :class:`~gateway.errors.PolicyError` naming the algorithm, the
rule and the fix.

Algorithm names are the gateway's own spelling (lower case, as used in the
configuration and in audit records):

* digests: ``sha256``, ``sha384``, ``sha512`` (``sha-256`` etc. accepted as input);
  monitored list: ``sha1`` (verifying a received signature or receipt MIC only)
* content ciphers: ``aes-128-gcm``, ``aes-256-gcm``, ``aes-128-cbc``,
  ``aes-256-cbc``; monitored list: ``des-ede3-cbc``
* key transport / agreement: ``rsaes-oaep`` (SHA-256/384/512), ``ecdh``
  (X9.63 KDF with SHA-256/384/512); monitored list: ``rsaes-pkcs1-v1_5``,
  ``rsaes-oaep-sha1`` and ``ecdh-sha1kdf`` (the SHA-1 based defaults of older
  OpenSSL-based partners)

Monitored-list algorithms are accepted **inbound only**, and each only when
the peer's ``accept_legacy`` names it (:data:`LEGACY_ALGORITHMS`): admitting
one for a partner never admits another.  Every such use must be audited by the
caller as a warning (CMS results carry ``compat_algorithms``).

Sending, the peer's ``key_transport`` chooses how the content-encryption key
is wrapped for an RSA recipient (:data:`SEND_KEY_TRANSPORTS`): RSAES-OAEP with
SHA-256 by default, RSAES-OAEP with its default (SHA-1) parameters for a
partner that can decrypt nothing else, or RSAES-PKCS1-v1_5 (monitored list)
only behind the peer's own legacy option ``legacy_send_rsaes_pkcs1_v1_5``.
"""

from __future__ import annotations

from dataclasses import dataclass

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives.asymmetric import dsa, ec, ed448, ed25519, rsa, x448, x25519

from .errors import InvalidValueError, PolicyError

PublicKey = (
    rsa.RSAPublicKey
    | ec.EllipticCurvePublicKey
    | dsa.DSAPublicKey
    | ed25519.Ed25519PublicKey
    | ed448.Ed448PublicKey
    | x25519.X25519PublicKey
    | x448.X448PublicKey
)
PrivateKey = (
    rsa.RSAPrivateKey
    | ec.EllipticCurvePrivateKey
    | dsa.DSAPrivateKey
    | ed25519.Ed25519PrivateKey
    | ed448.Ed448PrivateKey
    | x25519.X25519PrivateKey
    | x448.X448PrivateKey
)

DIGESTS: tuple[str, ...] = ("sha256", "sha384", "sha512")
# S/MIME micalg names of the digests (RFC 5751 section 3.4.3.2).
DIGEST_TO_MICALG = {"sha256": "sha-256", "sha384": "sha-384", "sha512": "sha-512"}
CONTENT_CIPHERS: tuple[str, ...] = ("aes-128-gcm", "aes-256-gcm", "aes-128-cbc", "aes-256-cbc")
# On the CRYPTREC list, but without integrity of their own: accepted only from a
# peer whose ``accept_cbc`` is true (see AlgorithmPolicy.accept_cbc).
CBC_CIPHERS: tuple[str, ...] = ("aes-128-cbc", "aes-256-cbc")
COMPAT_CONTENT_CIPHERS: tuple[str, ...] = ("des-ede3-cbc",)
# Verifying what a compat peer sent only: never for signing or for a MIC we send.
COMPAT_DIGESTS: tuple[str, ...] = ("sha1",)
KEY_TRANSPORTS: tuple[str, ...] = ("rsaes-oaep", "ecdh")
COMPAT_KEY_TRANSPORTS: tuple[str, ...] = ("rsaes-pkcs1-v1_5", "rsaes-oaep-sha1", "ecdh-sha1kdf")
# The monitored-list algorithms a peer may be permitted to send us, each on its
# own (the peer's ``accept_legacy``), with what each one admits.
LEGACY_ALGORITHMS: dict[str, str] = {
    "sha1": "SHA-1 signatures and receipt MICs",
    "rsaes-oaep-sha1": "RSAES-OAEP key transport with SHA-1",
    "ecdh-sha1kdf": "ECDH key agreement with a SHA-1 KDF",
    "des-ede3-cbc": "3DES content encryption",
    "rsaes-pkcs1-v1_5": "RSAES-PKCS1-v1_5 key transport",
}
# How we wrap the content-encryption key for an RSA recipient (the peer's
# ``key_transport``); RSAES-PKCS1-v1_5 only behind ``legacy_send_rsaes_pkcs1_v1_5``.
DEFAULT_KEY_TRANSPORT = "rsaes-oaep-sha256"
SEND_KEY_TRANSPORTS: tuple[str, ...] = (DEFAULT_KEY_TRANSPORT, "rsaes-oaep-sha1")
LEGACY_SEND_KEY_TRANSPORT = "rsaes-pkcs1-v1_5"
EC_CURVES: tuple[str, ...] = ("secp256r1", "secp384r1", "secp521r1")
# TLS (both directions).  TLS 1.3 cipher suites: AES-GCM only (ChaCha20-Poly1305 is
# not on the CRYPTREC e-Government Recommended Ciphers List), the stronger first.
TLS13_SUITES: tuple[str, ...] = ("TLS_AES_256_GCM_SHA384", "TLS_AES_128_GCM_SHA256")
# Key-exchange groups (TLS 1.3, and ECDHE in TLS 1.2): ECDH over the NIST curves
# P-256, P-384 and P-521.  The list followed (CRYPTREC LS-0001-2022, 2023-03-30)
# names ECDH as NIST SP 800-56A Rev. 3 specifies it, over the NIST prime curves;
# X25519 and X448 (RFC 7748) are outside that specification, so they are refused
# although OpenSSL offers and prefers X25519 by default.  (EdDSA, on the list
# since that edition, is a signature scheme: it does not admit X25519 for ECDH.)
# (Finite-field groups are not offered: TLS 1.2 DHE uses the server's parameters.)
TLS_GROUPS: tuple[str, ...] = ("P-256", "P-384", "P-521")
MIN_RSA_BITS = 2048
PREFERRED_RSA_BITS = 3072

_CURVE_LABEL = {"secp256r1": "P-256", "secp384r1": "P-384", "secp521r1": "P-521"}
_DIGEST_ALIASES = {
    "sha-256": "sha256",
    "sha-384": "sha384",
    "sha-512": "sha512",
    "sha-1": "sha1",
    "sha": "sha1",
}


def normalize_digest(name: str) -> str:
    """``"SHA-256"`` -> ``"sha256"``; unknown names are returned lower-cased."""
    n = name.strip().lower().replace("_", "-")
    return _DIGEST_ALIASES.get(n, n)


def certificate_key(cert: x509.Certificate, purpose: str) -> PublicKey:
    """``cert``'s public key, or a PolicyError when it is of a kind that cannot even be
    loaded (an EC curve outside the NIST ones, explicit curve parameters, an unknown
    algorithm): such a certificate may arrive inside a message or a receipt, and
    ``cryptography`` then raises ``UnsupportedAlgorithm``, which is no input error
    to the rest of the gateway."""
    try:
        key: PublicKey = cert.public_key()  # type: ignore[assignment]
    except (UnsupportedAlgorithm, ValueError) as exc:
        subject = cert.subject.rfc4514_string()[:200]
        raise PolicyError(
            f"public key of {subject!r} ({purpose})",
            f"{str(exc)[:200]}: only RSA (>= {MIN_RSA_BITS} bits) and EC P-256/P-384/P-521 "
            "keys are allowed (CRYPTREC)",
            "the certificate must be reissued with an RSA-3072 or EC P-256/P-384 key",
        ) from exc
    return key


def _describe_key(key: object) -> str:
    if isinstance(key, rsa.RSAPublicKey):
        return f"RSA-{key.key_size}"
    if isinstance(key, ec.EllipticCurvePublicKey):
        return f"EC {_CURVE_LABEL.get(key.curve.name, key.curve.name)}"
    return type(key).__name__


def _public(key: object) -> object:
    if isinstance(
        key,
        rsa.RSAPrivateKey
        | ec.EllipticCurvePrivateKey
        | dsa.DSAPrivateKey
        | ed25519.Ed25519PrivateKey
        | ed448.Ed448PrivateKey
        | x25519.X25519PrivateKey
        | x448.X448PrivateKey,
    ):
        return key.public_key()
    return key


def _admit_fix(name: str) -> str:
    """How an admin admits one monitored-list algorithm from one peer."""
    return (
        f'or add "{name}" to accept_legacy in this peer\'s file (accept_legacy = ["{name}"]) '
        "to accept it from this peer only, with an audit warning per message"
    )


def describe_legacy(names: frozenset[str] | tuple[str, ...]) -> str:
    """``sha1 (SHA-1 signatures and receipt MICs), ...``, in :data:`LEGACY_ALGORITHMS` order."""
    return ", ".join(f"{n} ({what})" for n, what in LEGACY_ALGORITHMS.items() if n in names)


@dataclass(frozen=True)
class AlgorithmPolicy:
    """CRYPTREC e-Government Recommended Ciphers, as one policy object.

    ``accept_legacy``: the monitored-list algorithms (names of
    :data:`LEGACY_ALGORITHMS`) accepted from this peer, **inbound only**, each
    on its own.  ``key_transport``: how we wrap content-encryption keys for this
    peer's RSA certificates (:data:`SEND_KEY_TRANSPORTS` or
    :data:`LEGACY_SEND_KEY_TRANSPORT`).
    """

    accept_legacy: frozenset[str] = frozenset()
    key_transport: str = DEFAULT_KEY_TRANSPORT
    # False: AES-CBC content (EnvelopedData) is refused inbound.  A peer's policy
    # takes it from the peer's ``accept_cbc`` (default false); True here for what
    # opens local files (the CLI) or messages of no remote party.
    accept_cbc: bool = True

    def __post_init__(self) -> None:
        unknown = sorted(set(self.accept_legacy) - set(LEGACY_ALGORITHMS))
        if unknown:
            raise InvalidValueError(
                f"accept_legacy names {', '.join(unknown)}: not a legacy algorithm",
                fix=f"name only these: {', '.join(sorted(LEGACY_ALGORITHMS))}",
            )
        if self.key_transport not in (*SEND_KEY_TRANSPORTS, LEGACY_SEND_KEY_TRANSPORT):
            raise InvalidValueError(
                f"key_transport {self.key_transport!r}: not a key transport to send with",
                fix="use one of: " + ", ".join((*SEND_KEY_TRANSPORTS, LEGACY_SEND_KEY_TRANSPORT)),
            )

    def _admits(self, name: str, inbound: bool) -> bool:
        return inbound and name in self.accept_legacy

    def check_digest(self, name: str, *, inbound: bool = False) -> None:
        """May digest ``name`` be used?

        ``inbound=True`` only to verify something a peer sent (its signature,
        its receipt's MIC): a peer whose ``accept_legacy`` names ``sha1`` may
        then use SHA-1, which the caller must audit.  Signing, MICs we send and
        everything outbound never allow it.
        """
        n = normalize_digest(name)
        if n in DIGESTS:
            return
        if n in COMPAT_DIGESTS:
            if self._admits(n, inbound):
                return
            if inbound:
                raise PolicyError(
                    name,
                    f"{n.upper()} is not collision resistant and is not on the CRYPTREC "
                    "e-Government Recommended Ciphers list for signatures and digests (it is on "
                    f'the monitored list: refused unless the peer\'s accept_legacy names "{n}")',
                    "ask the peer to sign with sha256, sha384 or sha512 (openssl: -md sha256), "
                    + _admit_fix(n),
                )
        if n in ("sha1", "md5", "md2", "md4"):
            raise PolicyError(
                name,
                f"{n.upper()} is not collision resistant and is not on the CRYPTREC "
                "e-Government Recommended Ciphers list for signatures and digests",
                "use sha256, sha384 or sha512 (ask the peer to sign with -md sha256)",
            )
        raise PolicyError(
            name,
            "digest is not on the CRYPTREC recommended list (sha256, sha384, sha512)",
            "use sha256, sha384 or sha512",
        )

    def _check_asymmetric_key(self, key: object, purpose: str) -> None:
        pub = _public(key)
        if isinstance(pub, rsa.RSAPublicKey):
            if pub.key_size < MIN_RSA_BITS:
                raise PolicyError(
                    f"RSA-{pub.key_size} ({purpose})",
                    f"RSA keys must be at least {MIN_RSA_BITS} bits (CRYPTREC)",
                    f"issue a new certificate with an RSA key of {PREFERRED_RSA_BITS} bits "
                    "or more, or an EC P-256/P-384 key",
                )
            return
        if isinstance(pub, ec.EllipticCurvePublicKey):
            if pub.curve.name not in EC_CURVES:
                raise PolicyError(
                    f"EC curve {pub.curve.name} ({purpose})",
                    "only the NIST curves P-256, P-384 and P-521 are allowed (CRYPTREC)",
                    "issue a new certificate with an EC P-256 or P-384 key",
                )
            return
        raise PolicyError(
            f"{_describe_key(pub)} ({purpose})",
            "only RSA (>= 2048 bits) and EC P-256/P-384/P-521 keys are allowed",
            "issue a new certificate with an RSA-3072 or EC P-256/P-384 key",
        )

    def check_signature_key(self, key: PublicKey | PrivateKey) -> None:
        self._check_asymmetric_key(key, "signature key")

    def check_recipient_key(self, key: PublicKey | PrivateKey) -> None:
        """Key of an encryption recipient (RSA key transport or EC key agreement)."""
        self._check_asymmetric_key(key, "encryption key")

    def check_content_cipher(self, name: str, *, inbound: bool) -> None:
        n = name.strip().lower()
        if inbound and n in CBC_CIPHERS and not self.accept_cbc:
            raise PolicyError(
                name,
                "AES-CBC content is accepted only from a peer configured for it (accept_cbc): "
                "CBC protects no integrity of its own, so each altered CBC message a peer can "
                "have decrypted here probes the decryption of messages of others",
                "ask the peer to encrypt with aes-256-gcm (AuthEnvelopedData); if its AS2 "
                "product cannot, set accept_cbc = true in this peer's file",
            )
        if n in CONTENT_CIPHERS:
            return
        if n in COMPAT_CONTENT_CIPHERS:
            if self._admits(n, inbound):
                return
            if not inbound:
                raise PolicyError(
                    name,
                    "3DES is on the CRYPTREC monitored list; the gateway never sends with it",
                    "use aes-256-gcm (or aes-256-cbc if the peer cannot do GCM)",
                )
            raise PolicyError(
                name,
                "3DES is on the CRYPTREC monitored list and is refused unless the peer's "
                f'accept_legacy names "{n}"',
                "ask the peer to encrypt with AES (aes-256-gcm or aes-256-cbc), " + _admit_fix(n),
            )
        raise PolicyError(
            name,
            "content cipher is not on the CRYPTREC recommended list "
            "(aes-128/256-gcm, aes-128/256-cbc)",
            "use aes-256-gcm (or aes-256-cbc if the peer cannot do GCM)",
        )

    def check_key_transport(self, name: str, *, inbound: bool) -> None:
        """May key transport ``name`` be used?  Inbound: ``rsaes-oaep`` (SHA-2) and
        ``ecdh`` (SHA-2 KDF), and a monitored-list one the peer's ``accept_legacy``
        names.  Outbound: ``ecdh``, or for RSA exactly this peer's ``key_transport``."""
        n = name.strip().lower()
        if not inbound:
            if n in ("ecdh", self.key_transport):
                return
            raise PolicyError(
                name,
                f"this peer's key transport is {self.key_transport}; the gateway sends with "
                "no other",
                'set key_transport = "rsaes-oaep-sha256" (the default) or "rsaes-oaep-sha1" '
                "in the peer's file",
            )
        if n in KEY_TRANSPORTS:
            return
        if n in COMPAT_KEY_TRANSPORTS:
            if self._admits(n, inbound):
                return
            raise PolicyError(
                name,
                "key transport is on the CRYPTREC monitored list and is refused unless the "
                f'peer\'s accept_legacy names "{n}"',
                "ask the peer to use RSAES-OAEP with SHA-256 (openssl: -keyopt "
                "rsa_padding_mode:oaep -keyopt rsa_oaep_md:sha256) or ECDH with a SHA-256 "
                "KDF (-keyopt ecdh_kdf_md:sha256), " + _admit_fix(n),
            )
        raise PolicyError(
            name,
            "key transport is not on the CRYPTREC recommended list (rsaes-oaep, ecdh)",
            "use rsaes-oaep (SHA-256) or ecdh",
        )

    def warnings_for_key(self, key: PublicKey | PrivateKey) -> list[str]:
        pub = _public(key)
        out: list[str] = []
        if isinstance(pub, rsa.RSAPublicKey) and MIN_RSA_BITS <= pub.key_size < PREFERRED_RSA_BITS:
            out.append(
                f"RSA-{pub.key_size} has 112-bit security strength; CRYPTREC allows it "
                "only until the end of 2030 - plan a move to RSA-3072 or EC P-256"
            )
        return out
