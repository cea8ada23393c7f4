"""CMS SignedData verified: the signer's algorithms checked against the policy,
the signature over the signed attributes encoded as a DER ``SET OF``, and the
digest over the *content octets* (the content as bytes, or its digests when
it streams)."""

from __future__ import annotations

import functools
import hmac
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import Prehashed

from ..errors import MalformedMessageError, PolicyError, SignatureError, SignerNotTrustedError
from ..policy import COMPAT_DIGESTS, AlgorithmPolicy, certificate_key, normalize_digest
from .common import cert_der, cert_label, hash_bytes, hash_for
from .signed_parsed import ParsedSignature, Signer
from .signed_read import parse_signed_data
from .trust import SignerValidator

_EC_PUBLIC_KEY_OID = "1.2.840.10045.2.1"  # some producers put id-ecPublicKey here


@dataclass(frozen=True)
class VerifiedSignature:
    """A signature that verified.

    ``compat_algorithms``: the monitored-list algorithms (``sha1``) it used,
    accepted only because the peer's accept_legacy names them; the caller audits each as a warning.
    """

    signer: x509.Certificate
    digest: str
    signature_algorithm: str
    signing_time: datetime | None
    content: bytes
    certificates: tuple[x509.Certificate, ...]
    compat_algorithms: tuple[str, ...] = ()


@dataclass(frozen=True)
class _Acceptance:
    """What a signature's signer is accepted by: a certificate byte-equal to one of
    ``trusted_signers`` (pinned), else ``validate_signer`` (path validation) when given;
    every algorithm under ``policy``."""

    trusted_signers: Sequence[x509.Certificate]
    policy: AlgorithmPolicy
    validate_signer: SignerValidator | None


def _find_cert(signer: Signer, candidates: Sequence[x509.Certificate]) -> x509.Certificate | None:
    for cert in candidates:
        if signer.names(cert):
            return cert
    return None


def _check_named_digest(signer: Signer, name: str, digest: str, policy: AlgorithmPolicy) -> None:
    """A signature algorithm that names its digest (``sha256_rsa``, ``sha384_ecdsa``): that
    digest is under the policy and is the signer's digest algorithm."""
    inner = name.split("_")[0]
    policy.check_digest(inner, inbound=True)
    if inner != digest:
        raise SignatureError(
            f"signer info #{signer.index}: signature algorithm {name} does not match "
            f"digest algorithm {digest}",
            fix="the sender's CMS implementation is inconsistent; ask the peer to fix it",
        )


def _check_scheme(
    signer: Signer, pub: Any, policy: AlgorithmPolicy
) -> tuple[str, hashes.HashAlgorithm, Any]:
    """Policy-check the signer's algorithms; return (name, hash, padding-or-None).

    A received signature: a peer's monitored-list digest (SHA-1) passes when its
    accept_legacy names it (see :func:`_compat_digests`).
    """
    digest = signer.digest
    policy.check_digest(digest, inbound=True)
    h = hash_for(digest, allow_sha1=True)
    name = signer.sig_alg_name
    if name in ("rsassa_pkcs1v15", "sha256_rsa", "sha384_rsa", "sha512_rsa", "sha1_rsa", "md5_rsa"):
        if name != "rsassa_pkcs1v15":
            _check_named_digest(signer, name, digest, policy)
        scheme = "rsassa-pkcs1-v1_5"
        pad: Any = padding.PKCS1v15()
        if not isinstance(pub, rsa.RSAPublicKey):
            raise SignatureError(
                f"signer info #{signer.index}: RSA signature algorithm but the signer key is "
                f"{type(pub).__name__}",
                fix="the sender's CMS implementation is inconsistent",
            )
    elif name == "rsassa_pss":
        params = signer.sig_alg["parameters"]
        pss_hash = params["hash_algorithm"]["algorithm"].native
        mgf = params["mask_gen_algorithm"]
        if mgf["algorithm"].native != "mgf1":
            raise PolicyError(
                f"RSASSA-PSS with mask generation {mgf['algorithm'].native}",
                "only MGF1 is supported",
                "sign with RSASSA-PSS and MGF1",
            )
        mgf_hash = mgf["parameters"]["algorithm"].native
        policy.check_digest(pss_hash, inbound=True)
        policy.check_digest(mgf_hash, inbound=True)
        if params["trailer_field"].native != "trailer_field_bc":
            raise MalformedMessageError(
                f"signer info #{signer.index}: RSASSA-PSS trailer field must be 1",
                fix="the sender's CMS implementation is broken",
            )
        if pss_hash != digest:
            raise SignatureError(
                f"signer info #{signer.index}: RSASSA-PSS hash {pss_hash} does not match "
                f"digest algorithm {digest}",
                fix="the sender's CMS implementation is inconsistent; ask the peer to fix it",
            )
        h = hash_for(pss_hash, allow_sha1=True)
        pad = padding.PSS(
            mgf=padding.MGF1(hash_for(mgf_hash, allow_sha1=True)),
            salt_length=int(params["salt_length"].native),
        )
        scheme = "rsassa-pss"
        if not isinstance(pub, rsa.RSAPublicKey):
            raise SignatureError(
                f"signer info #{signer.index}: RSASSA-PSS signature but the signer key is "
                f"{type(pub).__name__}",
                fix="the sender's CMS implementation is inconsistent",
            )
    elif name in (
        "sha256_ecdsa",
        "sha384_ecdsa",
        "sha512_ecdsa",
        "sha1_ecdsa",
        "sha224_ecdsa",
        "ecdsa",
        _EC_PUBLIC_KEY_OID,
    ):
        if name.endswith("_ecdsa"):
            _check_named_digest(signer, name, digest, policy)
        scheme = "ecdsa"
        pad = None
        if not isinstance(pub, ec.EllipticCurvePublicKey):
            raise SignatureError(
                f"signer info #{signer.index}: ECDSA signature but the signer key is "
                f"{type(pub).__name__}",
                fix="the sender's CMS implementation is inconsistent",
            )
    else:
        raise PolicyError(
            f"signature algorithm {name}",
            "only RSASSA-PKCS1-v1_5, RSASSA-PSS and ECDSA are allowed (CRYPTREC)",
            "sign with RSA (PSS or PKCS#1 v1.5) or ECDSA P-256/P-384 and SHA-256/384/512",
        )
    policy.check_signature_key(pub)
    return scheme, h, pad


def _compat_digests(signer: Signer) -> tuple[str, ...]:
    """The monitored-list digests a (policy-checked) signer used: the signature's digest,
    and for RSASSA-PSS its hash and MGF1 hash."""
    names = [signer.digest]
    if signer.sig_alg_name == "rsassa_pss":
        params = signer.sig_alg["parameters"]
        names.append(params["hash_algorithm"]["algorithm"].native)
        names.append(params["mask_gen_algorithm"]["parameters"]["algorithm"].native)
    return tuple(dict.fromkeys(n for n in map(normalize_digest, names) if n in COMPAT_DIGESTS))


def _verify_raw(pub: Any, signature: bytes, data: bytes, h: Any, pad: Any) -> bool:
    try:
        if isinstance(pub, ec.EllipticCurvePublicKey):
            pub.verify(signature, data, ec.ECDSA(h))
        else:
            pub.verify(signature, data, pad, h)
    except InvalidSignature:
        return False
    return True


class _Content:
    """The signed content, as bytes or as its digests (streaming: ``data`` is None)."""

    def __init__(
        self, data: bytes | None, digest_of: Callable[[str], bytes] | None, length: int
    ) -> None:
        self.data = data
        self._digest_of = digest_of
        self.length = length

    def digest(self, name: str) -> bytes:
        """Only for a policy-checked signer digest (SHA-1 only if accept_legacy names it)."""
        if self.data is not None:
            return hash_bytes(self.data, name, allow_sha1=True)
        assert self._digest_of is not None
        return self._digest_of(name)


@functools.lru_cache(maxsize=256)
def _signer_label(cert: x509.Certificate) -> str:
    return f"signer {cert.subject.rfc4514_string()!r}"


def _verify_signer(
    signer: Signer,
    cert: x509.Certificate,
    parsed: ParsedSignature,
    content: _Content,
    policy: AlgorithmPolicy,
) -> str:
    pub = certificate_key(cert, "signature key")
    scheme, h, pad = _check_scheme(signer, pub, policy)
    who = _signer_label(cert)
    if signer.attrs_present:
        if signer.content_type_attr is None or signer.message_digest is None:
            raise MalformedMessageError(
                f"{who}: signed attributes lack contentType or messageDigest (RFC 5652 5.3)",
                fix="the sender's CMS implementation is broken; ask the peer to fix it",
            )
        if signer.content_type_attr != parsed.content_type:
            raise SignatureError(
                f"{who}: contentType attribute {signer.content_type_attr} does not match the "
                f"encapsulated content type {parsed.content_type}",
                fix="the message was altered or built incorrectly; ask the peer to resend",
            )
        if not hmac.compare_digest(signer.message_digest, content.digest(signer.digest)):
            raise SignatureError(
                f"content does not match its signature (messageDigest): the {signer.digest} "
                f"digest of the {content.length}-byte content differs from the one {who} signed",
                fix="the content was altered after signing (often by a line-ending or "
                "transfer-encoding conversion); ask the peer to resend with binary transfer",
            )
        signer.check_protection(who)
        ok = any(_verify_raw(pub, signer.signature, der, h, pad) for der in signer.attrs_der())
    else:
        if parsed.content_type != "data":
            raise MalformedMessageError(
                f"{who}: no signed attributes although the content type is "
                f"{parsed.content_type} (RFC 5652 5.3 requires them)",
                fix="the sender's CMS implementation is broken",
            )
        if content.data is not None:
            ok = _verify_raw(pub, signer.signature, content.data, h, pad)
        else:
            ok = _verify_raw(
                pub, signer.signature, content.digest(signer.digest), Prehashed(h), pad
            )
    if not ok:
        raise SignatureError(
            f"{who}: the {scheme} signature over the signed attributes does not verify",
            fix="the message or its signed attributes were altered, or it was signed with "
            "another key; ask the peer to resend",
        )
    return scheme


def verify(
    signed: bytes,
    *,
    content: bytes | None = None,
    trusted_signers: Sequence[x509.Certificate],
    policy: AlgorithmPolicy,
    validate_signer: SignerValidator | None = None,
) -> VerifiedSignature:
    """Verify a DER/BER ``ContentInfo(SignedData)``.

    ``content`` is the detached content, if any.  The signer certificate must be
    byte-equal to one of ``trusted_signers`` (pinning), or, when
    ``validate_signer`` is given, be accepted by it: it receives the signer
    certificate and the certificates carried in the message and raises
    :class:`SignerNotTrustedError` to refuse (path validation, e.g.
    :class:`gateway.cms.trust.TrustAnchors`).
    """
    parsed = parse_signed_data(signed)
    data = _content_for(parsed, content)
    return _verify_parsed(
        parsed,
        _Content(data, None, len(data)),
        _Acceptance(trusted_signers, policy, validate_signer),
    )


def parse_signature(signature: bytes) -> ParsedSignature:
    """Parse a DER/BER ``ContentInfo(SignedData)`` once, for :func:`signer_digests` and
    :func:`verify_digest` (which otherwise each parse it)."""
    return parse_signed_data(signature)


def _parsed(signature: bytes | ParsedSignature) -> ParsedSignature:
    if isinstance(signature, ParsedSignature):
        return signature
    return parse_signed_data(signature)


def signer_digests(signature: bytes | ParsedSignature) -> tuple[str, ...]:
    """The digest algorithms a detached signature's signers used (to hash content once)."""
    parsed = _parsed(signature)
    return tuple(dict.fromkeys(normalize_digest(s.digest) for s in parsed.signers))


def verify_digest(
    signature: bytes | ParsedSignature,
    *,
    digest_of: Callable[[str], bytes],
    content_length: int,
    trusted_signers: Sequence[x509.Certificate],
    policy: AlgorithmPolicy,
    validate_signer: SignerValidator | None = None,
) -> VerifiedSignature:
    """Verify a detached signature over content known by its digests (streaming).

    ``digest_of(name)`` returns the digest of the content with algorithm
    ``name`` (see :func:`signer_digests`); the result's ``content`` is empty.
    ``signature`` may be given parsed (:func:`parse_signature`).
    """
    parsed = _parsed(signature)
    if parsed.content is not None:
        raise MalformedMessageError(
            "signed message carries its content (attached) but a detached signature was expected",
            fix="verify attached signatures with verify()",
        )
    return _verify_parsed(
        parsed,
        _Content(None, digest_of, content_length),
        _Acceptance(trusted_signers, policy, validate_signer),
    )


def _content_for(parsed: ParsedSignature, content: bytes | None) -> bytes:
    if parsed.content is not None and content is not None:
        raise MalformedMessageError(
            "signed message carries its content (attached) but detached content was also given",
            fix="pass content= only for detached signatures",
        )
    data = parsed.content if parsed.content is not None else content
    if data is None:
        raise MalformedMessageError(
            "signed message is a detached signature but no content was given to verify",
            fix="pass the signed content with content= (the first part of multipart/signed)",
        )
    return bytes(data)


def _verify_parsed(
    parsed: ParsedSignature, content: _Content, acceptance: _Acceptance
) -> VerifiedSignature:
    """:func:`_verify_checked`, with any parse error deep in the structure made a clean refusal.

    asn1crypto parses nested values lazily, so a corrupted field (an issuer name,
    a signed attribute) can raise a bare ValueError long after the outer parse.
    """
    try:
        return _verify_checked(parsed, content, acceptance)
    except (ValueError, TypeError, KeyError, IndexError, OverflowError) as exc:
        raise MalformedMessageError(
            f"signed message is malformed: {exc}",
            fix="the message was altered or truncated in transit; ask the peer to resend",
        ) from exc


def _verify_checked(
    parsed: ParsedSignature, content: _Content, acceptance: _Acceptance
) -> VerifiedSignature:
    trusted_der = {cert_der(c) for c in acceptance.trusted_signers}
    # pinned certificates first: a signer is checked against the key we trust
    candidates = [*acceptance.trusted_signers, *parsed.certificates]
    untrusted: list[str] = []
    missing: list[str] = []
    result: VerifiedSignature | None = None
    for signer in parsed.signers:
        cert = _find_cert(signer, candidates)
        if cert is None:
            missing.append(signer.describe())
            continue
        scheme = _verify_signer(signer, cert, parsed, content, acceptance.policy)
        if cert_der(cert) not in trusted_der:
            if acceptance.validate_signer is None:
                untrusted.append(cert_label(cert))
                continue
            acceptance.validate_signer(cert, parsed.certificates)
        if result is None:
            st = signer.signing_time
            if isinstance(st, datetime) and st.tzinfo is None:
                st = st.replace(tzinfo=UTC)
            result = VerifiedSignature(
                signer=cert,
                digest=normalize_digest(signer.digest),
                signature_algorithm=scheme,
                signing_time=st,
                content=content.data if content.data is not None else b"",
                certificates=parsed.certificates,
                compat_algorithms=_compat_digests(signer),
            )
    if result is not None:
        return result
    if untrusted:
        raise SignerNotTrustedError(
            "the signature is intact but its signer is not an accepted signer for this peer: "
            + "; ".join(untrusted),
            fix="if this certificate really belongs to the peer, add it to the peer's "
            "signing certificates (peers.d/<peer>.toml); otherwise reject the message",
        )
    raise SignerNotTrustedError(
        "the signer certificate is neither included in the message nor among the accepted "
        "signers: " + "; ".join(missing),
        fix="add the peer's signing certificate to its configuration, or ask the peer to "
        "include its certificate in the signature",
    )
