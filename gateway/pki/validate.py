"""RFC 5280 path validation for private PKIs, with purpose rules, the CRYPTREC
policy and revocation (CRL files, OCSP).

Path building and the RFC 5280 section 6 algorithm (signatures, validity,
name chaining, basic constraints, key usage of CAs, name constraints,
certificate policies, CRL scope and delta CRLs, OCSP responder authorisation)
come from ``pyhanko-certvalidator``; this module adds

* the purpose of the end-entity certificate (TLS client/server, S/MIME
  signing/encryption) checked against keyUsage and extendedKeyUsage,
* the gateway's :class:`~gateway.policy.AlgorithmPolicy` for every signature
  in the path, on CRLs and on OCSP responses, and for the leaf's own key,
* revocation per policy: ``require`` (every certificate below the trust
  anchor needs a fresh, valid status from a CRL or OCSP, else the path is
  refused), ``prefer`` (refused when revoked; a certificate whose status
  cannot be established is accepted with a warning) and ``off``,
* reasons an administrator can act on: the certificate, the rule, the fix.

Nothing here reads a clock unless ``at`` is omitted, and nothing is global:
an :class:`OcspClient` (and its cache) is passed in by the caller.

Fail closed: any error while judging a path makes it invalid.
"""

from __future__ import annotations

import enum
import itertools
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from hashlib import sha256
from typing import Any

from asn1crypto import crl as asn1_crl
from asn1crypto import ocsp as asn1_ocsp
from asn1crypto import x509 as asn1_x509
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import ExtendedKeyUsageOID
from pyhanko_certvalidator.authority import CertTrustAnchor
from pyhanko_certvalidator.context import ValidationContext
from pyhanko_certvalidator.errors import (
    CRLNoMatchesError,
    CRLValidationError,
    DisallowedAlgorithmError,
    ExpiredError,
    InsufficientRevinfoError,
    NotYetValidError,
    OCSPNoMatchesError,
    OCSPValidationError,
    PathBuildingError,
    PathValidationError,
    RevokedError,
    StaleRevinfoError,
    ValidationError,
)
from pyhanko_certvalidator.ltv.poe import POEManager
from pyhanko_certvalidator.path import ValidationPath
from pyhanko_certvalidator.policy_decl import (
    NO_REVOCATION,
    REQUIRE_REVINFO,
    AlgorithmUsageConstraint,
    AlgorithmUsagePolicy,
    CertRevTrustPolicy,
    NonRevokedStatusAssertion,
    PKIXValidationParams,
)
from pyhanko_certvalidator.registry import CertificateRegistry, SimpleTrustManager
from pyhanko_certvalidator.revinfo.archival import (
    process_legacy_crl_input,
    process_legacy_ocsp_input,
)
from pyhanko_certvalidator.revinfo.manager import RevinfoManager
from pyhanko_certvalidator.revinfo.validate_crl import verify_crl
from pyhanko_certvalidator.revinfo.validate_ocsp import verify_ocsp_response
from pyhanko_certvalidator.sig_validate import (
    DEFAULT_VALIDATION_CONTEXT,
    DefaultSignatureValidator,
    SignatureValidationContext,
)

from gateway.errors import InvalidValueError, PolicyError
from gateway.pki.crl import is_delta
from gateway.pki.ocsp import OcspAnswer, OcspClient, OcspError, ocsp_urls
from gateway.policy import AlgorithmPolicy, certificate_key

NOT_CHECKED = "not-checked"


class Purpose(enum.StrEnum):
    TLS_CLIENT = "tls-client"
    TLS_SERVER = "tls-server"
    SMIME_SIGN = "smime-sign"
    SMIME_ENCRYPT = "smime-encrypt"
    ANY = "any"


class RevocationPolicy(enum.StrEnum):
    REQUIRE = "require"
    PREFER = "prefer"
    OFF = "off"


@dataclass(frozen=True)
class CertificateStatus:
    """How the revocation status of one certificate of the path was established.

    ``status``: ``good``, ``revoked``, ``unknown``, ``not-checked`` or
    ``trust-anchor``; ``source``: ``crl``, ``ocsp``, ``crl+ocsp`` or ``""``.
    """

    subject: str
    status: str
    source: str = ""
    detail: str = ""

    def to_json(self) -> dict[str, str]:
        return {
            "subject": self.subject,
            "status": self.status,
            "source": self.source,
            "detail": self.detail,
        }


@dataclass(frozen=True)
class ValidationResult:
    """The verdict on one certificate.

    ``chain`` is leaf first, trust anchor last (empty when no path could be
    built).  ``revocation`` is ``"not-checked"`` or a one-line account of how
    the status of each certificate was established.
    """

    valid: bool
    reason: str | None
    chain: tuple[x509.Certificate, ...] = ()
    revocation: str = NOT_CHECKED
    statuses: tuple[CertificateStatus, ...] = ()
    warnings: tuple[str, ...] = ()

    @property
    def subjects(self) -> list[str]:
        return [_subject(c) for c in self.chain]

    def to_json(self) -> dict[str, Any]:
        return {
            "valid": self.valid,
            "reason": self.reason,
            "chain": self.subjects,
            "revocation": self.revocation,
            "revocation_details": [s.to_json() for s in self.statuses],
            "warnings": list(self.warnings),
        }


def _subject(cert: x509.Certificate | asn1_x509.Certificate) -> str:
    if isinstance(cert, x509.Certificate):
        return cert.subject.rfc4514_string() or f"(serial {cert.serial_number:x})"
    return str(
        x509.load_der_x509_certificate(cert.dump()).subject.rfc4514_string()
        or f"(serial {cert.serial_number:x})"
    )


def _to_asn1(cert: x509.Certificate) -> asn1_x509.Certificate:
    return asn1_x509.Certificate.load(cert.public_bytes(serialization.Encoding.DER))


def _from_asn1(cert: asn1_x509.Certificate) -> x509.Certificate:
    return x509.load_der_x509_certificate(cert.dump())


# --- the CRYPTREC policy inside path validation ---------------------------------

_SIGNATURE_MECHANISMS = ("rsassa_pkcs1v15", "rsassa_pss", "ecdsa")


class CryptrecAlgorithms(AlgorithmUsagePolicy):
    """Our :class:`AlgorithmPolicy` applied to certificate, CRL and OCSP signatures."""

    def __init__(self, policy: AlgorithmPolicy) -> None:
        self._policy = policy

    def digest_algorithm_allowed(self, algo: Any, moment: datetime | None) -> Any:
        try:
            self._policy.check_digest(str(algo["algorithm"].native))
        except PolicyError as exc:
            return AlgorithmUsageConstraint(allowed=False, failure_reason=str(exc))
        return AlgorithmUsageConstraint(allowed=True)

    def signature_algorithm_allowed(
        self, algo: Any, moment: datetime | None, public_key: Any
    ) -> Any:
        try:
            mechanism = algo.signature_algo
            digest = algo.hash_algo
        except ValueError:
            mechanism, digest = str(algo["algorithm"].native), None
        if mechanism not in _SIGNATURE_MECHANISMS:
            return AlgorithmUsageConstraint(
                allowed=False,
                failure_reason=(
                    f"signature algorithm {mechanism} is not on the CRYPTREC list "
                    "(RSA PKCS#1 v1.5, RSA-PSS, ECDSA); the CA must re-issue with one of them"
                ),
            )
        if digest is not None:
            verdict = self.digest_algorithm_allowed({"algorithm": _Native(digest)}, moment)
            if not verdict.allowed:
                return verdict
        if public_key is not None:
            try:
                key = serialization.load_der_public_key(public_key.dump())
                self._policy.check_signature_key(key)  # type: ignore[arg-type]
            except PolicyError as exc:
                return AlgorithmUsageConstraint(allowed=False, failure_reason=str(exc))
            except ValueError as exc:
                return AlgorithmUsageConstraint(
                    allowed=False, failure_reason=f"unreadable public key ({exc})"
                )
        return AlgorithmUsageConstraint(allowed=True)


@dataclass(frozen=True)
class _Native:
    native: str


class CryptrecSignatures(DefaultSignatureValidator):
    """Verifies a signature only if :class:`CryptrecAlgorithms` allows its algorithm and key.

    The validator checks the policy itself only for certificate signatures;
    CRL and OCSP response signatures go straight to the signature validator,
    so without this a CRL signed with SHA-1, or an OCSP response signed by an
    RSA-1024 responder key, would establish revocation status.
    """

    def __init__(self, algorithms: CryptrecAlgorithms) -> None:
        self._algorithms = algorithms

    def validate_signature(
        self,
        signature: bytes,
        signed_data: bytes,
        public_key_info: Any,
        signature_algorithm: Any,
        context: SignatureValidationContext = DEFAULT_VALIDATION_CONTEXT,
    ) -> None:
        verdict = self._algorithms.signature_algorithm_allowed(
            signature_algorithm, None, public_key_info
        )
        if not verdict.allowed:
            raise InvalidSignature(verdict.failure_reason)
        super().validate_signature(
            signature, signed_data, public_key_info, signature_algorithm, context
        )


# --- purpose --------------------------------------------------------------------

_EKU = {
    Purpose.TLS_CLIENT: (ExtendedKeyUsageOID.CLIENT_AUTH, "clientAuth"),
    Purpose.TLS_SERVER: (ExtendedKeyUsageOID.SERVER_AUTH, "serverAuth"),
    Purpose.SMIME_SIGN: (ExtendedKeyUsageOID.EMAIL_PROTECTION, "emailProtection"),
    Purpose.SMIME_ENCRYPT: (ExtendedKeyUsageOID.EMAIL_PROTECTION, "emailProtection"),
}


def check_purpose(cert: x509.Certificate, purpose: Purpose) -> str | None:
    """Why ``cert`` may not be used for ``purpose`` (None: it may).

    keyUsage and extendedKeyUsage are optional in RFC 5280 (absent: no
    restriction); when present they must allow the purpose.
    """
    if purpose is Purpose.ANY:
        return None
    who = f"certificate {_subject(cert)}"
    csr_hint = f"ask its CA for a certificate made for {purpose} (see `medgw pki csr`)"
    try:
        ku: x509.KeyUsage | None = cert.extensions.get_extension_for_class(x509.KeyUsage).value
    except x509.ExtensionNotFound:
        ku = None
    try:
        ca = cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    except x509.ExtensionNotFound:
        ca = False
    if ca or (ku is not None and ku.key_cert_sign):
        return (
            f"{who} is a CA certificate (basicConstraints cA or keyUsage keyCertSign): a CA's "
            f"key issues certificates and is not used for {purpose} (RFC 5280 4.2.1.9); "
            "fix: use an end-entity certificate issued by that CA"
        )
    if ku is not None:
        try:
            public = certificate_key(cert, purpose.value)
        except PolicyError as exc:
            return str(exc)
        if purpose in (Purpose.TLS_CLIENT, Purpose.TLS_SERVER):
            needed, ok = "digitalSignature", ku.digital_signature
        elif purpose is Purpose.SMIME_SIGN:
            needed, ok = (
                "digitalSignature or nonRepudiation",
                ku.digital_signature or ku.content_commitment,
            )
        else:
            from cryptography.hazmat.primitives.asymmetric import ec

            if isinstance(public, ec.EllipticCurvePublicKey):
                needed, ok = "keyAgreement", ku.key_agreement
            else:
                needed, ok = "keyEncipherment", ku.key_encipherment
        if not ok:
            return (
                f"{who} may not be used for {purpose}: its keyUsage lacks {needed} "
                f"(RFC 5280 4.2.1.3); fix: {csr_hint}"
            )
    try:
        eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    except x509.ExtensionNotFound:
        return None
    oid, label = _EKU[purpose]
    if oid not in eku and ExtendedKeyUsageOID.ANY_EXTENDED_KEY_USAGE not in eku:
        return (
            f"{who} may not be used for {purpose}: its extendedKeyUsage lacks {label} "
            f"(RFC 5280 4.2.1.12); fix: {csr_hint}"
        )
    return None


def check_validity(cert: x509.Certificate, at: datetime) -> str | None:
    """Why ``cert`` is not valid at ``at`` (None: it is): RFC 5280's validity period,
    the rule path validation applies to every certificate of a path."""
    who = f"certificate {_subject(cert)}"
    if at > cert.not_valid_after_utc:
        return _expired(who, cert.not_valid_after_utc)
    if at < cert.not_valid_before_utc:
        return _not_yet_valid(who, cert.not_valid_before_utc)
    return None


def _expired(who: str, when: datetime) -> str:
    return (
        f"{who} expired on {when:%Y-%m-%d %H:%M}Z (RFC 5280 validity); "
        "fix: renew it - its holder needs a new certificate from the CA"
    )


def _not_yet_valid(who: str, when: datetime) -> str:
    return (
        f"{who} is not valid before {when:%Y-%m-%d %H:%M}Z (RFC 5280 validity); "
        "fix: check this host's clock, or wait until the certificate is valid"
    )


def _check_leaf_key(
    cert: x509.Certificate, purpose: Purpose, policy: AlgorithmPolicy
) -> str | None:
    try:
        key = certificate_key(cert, purpose.value)
        if purpose is Purpose.SMIME_ENCRYPT:
            policy.check_recipient_key(key)
        else:
            policy.check_signature_key(key)
    except PolicyError as exc:
        return f"certificate {_subject(cert)}: {exc.message}; fix: {exc.fix}"
    except (ValueError, x509.UnsupportedGeneralNameType) as exc:
        return f"certificate {_subject(cert)}: unreadable public key ({exc})"
    return None


# --- reasons --------------------------------------------------------------------

_POSITION = re.compile(r"intermediate certificate (\d+)|(end-entity certificate)")


def _culprit(exc: ValidationError, path: ValidationPath) -> asn1_x509.Certificate | None:
    certs = list(path.iter_certs(include_root=True))
    match = _POSITION.search(str(exc))
    if match is None:
        return None
    if match.group(2):
        return certs[-1]
    index = int(match.group(1))
    return certs[index] if index < len(certs) else None


def _explain(exc: Exception, path: ValidationPath | None) -> str:
    """An administrator's sentence for a validation failure: certificate, rule, fix."""
    culprit = _culprit(exc, path) if path is not None and isinstance(exc, ValidationError) else None
    who = f"certificate {_subject(culprit)}" if culprit is not None else "the path"
    detail = str(exc)
    if isinstance(exc, ExpiredError):
        return _expired(who, exc.expired_dt)
    if isinstance(exc, NotYetValidError):
        return _not_yet_valid(who, exc.valid_from)
    if isinstance(exc, RevokedError):
        return (
            f"{who} is revoked since {exc.revocation_dt:%Y-%m-%d %H:%M}Z "
            f"(reason: {exc.reason.human_friendly}); fix: its holder must obtain a new "
            "certificate, and the revoked one must be removed from the configuration"
        )
    if isinstance(exc, StaleRevinfoError):
        return (
            f"revocation status of {who} is stale ({detail}); fix: fetch the issuing CA's "
            "current CRL into the CRL folder, or check that its OCSP responder is reachable"
        )
    if isinstance(exc, InsufficientRevinfoError):
        return (
            f"revocation status of {who} could not be established ({detail}); fix: provide "
            "a current CRL of its issuer, or make its OCSP responder reachable"
        )
    if isinstance(exc, DisallowedAlgorithmError):
        return f"{who} uses an algorithm the policy refuses ({detail})"
    if isinstance(exc, PathValidationError):
        return (
            f"{who} breaks RFC 5280 path validation: {detail}; fix: the CA must issue "
            "certificates that meet RFC 5280, or this path must not be trusted"
        )
    return f"{who} could not be validated: {detail}"


# --- the context ------------------------------------------------------------------


@dataclass
class _Inputs:
    """Everything one validation needs, as DER.

    asn1crypto objects are re-encoded after some accesses during validation
    (a certificate with unique identifiers then no longer verifies), so every
    pass gets freshly parsed objects and never reuses another pass's.
    """

    leaf: bytes
    anchors: list[bytes]
    others: list[bytes]
    crls: list[bytes]
    at: datetime
    at_given: bool  # ``at`` is a time the caller chose, not this host's clock
    algorithms: CryptrecAlgorithms
    ocsps: list[bytes] = field(default_factory=list)

    def context(
        self, *, revocation: bool, assume_unrevoked: Iterable[bytes] = ()
    ) -> ValidationContext:
        registry = CertificateRegistry.build([asn1_x509.Certificate.load(d) for d in self.others])
        trust = SimpleTrustManager.build(
            trust_roots=[asn1_x509.Certificate.load(d) for d in self.anchors]
        )
        for root in trust.iter_certs():
            registry.register(root)
        crls = [asn1_crl.CertificateList.load(d) for d in self.crls] if revocation else []
        ocsps = [asn1_ocsp.OCSPResponse.load(d) for d in self.ocsps] if revocation else []
        manager = RevinfoManager(
            certificate_registry=registry,
            poe_manager=POEManager(),
            crls=process_legacy_crl_input(crls),
            ocsps=process_legacy_ocsp_input(ocsps),
            assertions=[
                NonRevokedStatusAssertion(sha256(d).digest(), self.at) for d in assume_unrevoked
            ],
        )
        return ValidationContext(
            trust_manager=trust,
            certificate_registry=registry,
            revinfo_manager=manager,
            revinfo_policy=CertRevTrustPolicy(REQUIRE_REVINFO if revocation else NO_REVOCATION),
            moment=self.at,
            algorithm_usage_policy=self.algorithms,
            signature_validator=CryptrecSignatures(self.algorithms),
        )

    def fresh(self, path: ValidationPath) -> ValidationPath:
        """The same path made of newly parsed certificates, from the original DER."""
        originals: dict[str, bytes] = {}
        for der in [*self.anchors, *self.others, self.leaf]:
            originals.setdefault(asn1_x509.Certificate.load(der).issuer_serial, der)
        certs = [
            asn1_x509.Certificate.load(originals.get(c.issuer_serial, c.dump()))
            for c in path.iter_certs(include_root=True)
        ]
        return ValidationPath(CertTrustAnchor(certs[0]), certs[1:-1], certs[-1])


async def _status_of(
    cert: asn1_x509.Certificate,
    index: int,
    path: ValidationPath,
    context: ValidationContext,
    at: datetime,
    given: bool,
) -> CertificateStatus:
    from pyhanko_certvalidator._state import ValProcState
    from pyhanko_certvalidator.util import ConsList

    subject = _subject(cert)
    sources: list[str] = []
    problems: list[str] = []
    for source, check, no_match in (
        ("ocsp", verify_ocsp_response, OCSPNoMatchesError),
        ("crl", verify_crl, CRLNoMatchesError),
    ):
        state = ValProcState(cert_path_stack=ConsList.sing(path), init_index=index)
        try:
            await check(cert, path, context, proc_state=state)
            sources.append(source)
        except RevokedError as exc:
            return CertificateStatus(subject, "revoked", source, _explain(exc, path))
        except no_match:
            problems.append(f"no {source.upper()} for it")
        except (OCSPValidationError, CRLValidationError, ValidationError, ValueError) as exc:
            failures = getattr(exc, "failures", None)
            text = "; ".join(_failure(f, at, given) for f in failures) if failures else str(exc)
            problems.append(f"{source.upper()}: {text}")
    if sources:
        return CertificateStatus(subject, "good", "+".join(sorted(sources)))
    return CertificateStatus(subject, "unknown", "", "; ".join(problems))


STALE_CRL = "passed its nextUpdate"
CRL_AHEAD = "is dated after the time checked"


def _failure(failure: object, at: datetime, given: bool) -> str:
    """One of the validator's (message, revocation info) failures, in words: the CRL
    named by its issuer and dates, never the object's repr (which holds its raw DER).
    ``at`` is this host's clock or, ``given``, a time the caller chose (``pki verify
    --at``): "the time checked", in UTC like every other time said."""
    if not isinstance(failure, tuple) or not failure:
        return str(failure)
    message = str(failure[0])
    crl = getattr(failure[1], "crl_data", failure[1]) if len(failure) > 1 else None
    if not isinstance(crl, asn1_crl.CertificateList):
        return message
    tbs = crl["tbs_cert_list"]
    issuer = tbs["issuer"].human_friendly
    this_update = tbs["this_update"].native
    next_update = tbs["next_update"].native
    dates = f"thisUpdate {this_update:%Y-%m-%d %H:%M}Z"
    checked = f"{at.astimezone(UTC):%Y-%m-%d %H:%M}Z"
    if "too recent" in message:
        # Issued after the time checked: the CA's current CRL and a clock that is behind.
        return f"the CRL of {issuer} ({dates}) {CRL_AHEAD}, {checked}"
    if next_update is None or "not recent enough" not in message:
        return f"{message} (CRL of {issuer}, {dates})"
    text = (
        f"the CRL of {issuer} ({dates}) {STALE_CRL} on {next_update:%Y-%m-%d %H:%M}Z "
        f"and the time checked is {checked}"
    )
    if at - next_update > next_update - this_update and not given:
        # Stale by more than its whole validity period: a CA rarely stops publishing
        # for that long, a clock set far ahead does that to every CRL at once.
        text += ", later than that CRL's whole validity period: check this host's clock first"
    return text


def _crl_reason(entry: x509.RevokedCertificate) -> x509.ReasonFlags | None:
    try:
        return entry.extensions.get_extension_for_class(x509.CRLReason).value.reason
    except x509.ExtensionNotFound:
        return None
    except ValueError:  # unreadable entry extensions: a revocation for good (fail closed)
        return x509.ReasonFlags.unspecified


def _revoked_in_a_stale_crl(
    cert: asn1_x509.Certificate, issuer: asn1_x509.Certificate, crls: Sequence[bytes]
) -> CertificateStatus | None:
    """A CRL past its nextUpdate tells nothing about certificates it does not list, but a
    certificate it lists stays revoked: revocation does not expire.  (The validator skips
    a stale CRL as a whole, which under 'prefer' would let a revoked certificate back in
    as 'unknown' when the CRL refresh stops.)  Only a CRL signed by the issuer counts.

    A certificateHold is the one revocation that can be lifted: a later complete CRL of
    the issuer (one without an issuingDistributionPoint, so covering every certificate)
    that no longer lists the certificate, or a later delta CRL that lists it as
    removeFromCRL, releases it; a removeFromCRL entry itself never revokes."""
    issuer_cert = _from_asn1(issuer)
    listings: list[tuple[datetime, bool, bool, x509.RevokedCertificate | None]] = []
    for der in crls:
        try:
            crl = x509.load_der_x509_crl(der)
            if crl.issuer != issuer_cert.subject:
                continue
            if not crl.is_signature_valid(issuer_cert.public_key()):  # type: ignore[arg-type]
                continue
            delta = is_delta(crl)
            complete = not delta and not any(
                isinstance(e.value, x509.IssuingDistributionPoint) for e in crl.extensions
            )
        except (ValueError, TypeError):
            continue
        entry = crl.get_revoked_certificate_by_serial_number(cert.serial_number)
        listings.append((crl.last_update_utc, delta, complete, entry))
    hold = x509.ReasonFlags.certificate_hold
    revoked: x509.RevokedCertificate | None = None
    for _, _, complete, entry in sorted(listings, key=lambda listing: listing[:2]):
        on_hold = revoked is not None and _crl_reason(revoked) is hold
        if entry is None or _crl_reason(entry) is x509.ReasonFlags.remove_from_crl:
            if on_hold and (entry is not None or complete):
                revoked = None
        elif revoked is None or on_hold:
            revoked = entry
    if revoked is None:
        return None
    subject = _subject(cert)
    return CertificateStatus(
        subject,
        "revoked",
        "crl",
        f"certificate {subject} is revoked since "
        f"{revoked.revocation_date_utc:%Y-%m-%d %H:%MZ} (listed in a CRL of its issuer "
        "that is past its nextUpdate: a revocation does not expire); fix: its holder "
        "must obtain a new certificate, and the revoked one must be removed from the "
        "configuration; also refresh the zone's CRLs",
    )


async def _fetch_ocsp(
    path: ValidationPath, client: OcspClient, at: datetime, notes: dict[bytes, str]
) -> list[tuple[asn1_x509.Certificate, asn1_x509.Certificate, OcspAnswer]]:
    certs = list(path.iter_certs(include_root=True))
    out = []
    for issuer, cert in itertools.pairwise(certs):
        urls = ocsp_urls(_from_asn1(cert))
        if not urls:
            notes[cert.sha256] = "the certificate names no OCSP responder"
            continue
        answer = client.cached(cert, issuer, at)
        if answer is None:
            errors = []
            for url in urls:
                try:
                    answer = await client.fetch(cert, issuer, url, at=at)
                    break
                except OcspError as exc:
                    errors.append(str(exc))
            if answer is None:
                notes[cert.sha256] = "; ".join(errors)
                continue
        out.append((cert, issuer, answer))
    return out


async def validate(
    leaf: x509.Certificate,
    *,
    anchors: Sequence[x509.Certificate],
    purpose: Purpose,
    at: datetime,
    revocation: RevocationPolicy,
    policy: AlgorithmPolicy,
    intermediates: Sequence[x509.Certificate] = (),
    crls: Sequence[x509.CertificateRevocationList] = (),
    ocsp: bool = False,
    ocsp_client: OcspClient | None = None,
    pkix_params: PKIXValidationParams | None = None,
    at_given: bool = False,
) -> ValidationResult:
    """Validate ``leaf`` for ``purpose`` at ``at`` under the algorithm ``policy``.

    What the path is for, the time it is judged at, how strictly revocation is
    checked and which algorithms are acceptable are always the caller's choice:
    none has a default that would quietly accept more (``Purpose.ANY``,
    ``RevocationPolicy.OFF`` and the default policy are there to be named).

    ``intermediates`` may hold any certificates (from the configuration and
    from what the peer presented); only those that chain are used.
    ``revocation`` decides what a missing status means; ``crls`` are the CRLs
    (base and delta) to judge status by; ``ocsp`` asks the responders named
    in the certificates (through ``ocsp_client``, whose cache is reused and whose
    route says how the requests leave: required with ``ocsp``, else
    :class:`InvalidValueError`, as for a time without a time zone).
    ``at_given``: ``at`` is a time the caller chose (``pki verify --at``), not this
    host's clock, so a reason's fix names that time rather than the clock.
    """
    when = at
    if when.tzinfo is None:
        raise InvalidValueError(
            f"at={when.isoformat()}: a path is validated at a time with a time zone",
            fix="pass an aware time, e.g. the injected clock's now()",
        )
    if ocsp and ocsp_client is None:
        # Its route says how the requests leave (NET-4); there is no default way out.  The
        # caller's mistake, said as such: not a certificate's "internal error".
        raise InvalidValueError(
            "ocsp=True without an ocsp_client: OCSP requests leave only through a zone's "
            "route (NET-4), and no route was given",
            fix="pass the OcspClient of the peer's zone, or ocsp=False",
        )
    try:
        return await _validate(
            leaf,
            anchors=anchors,
            intermediates=intermediates,
            purpose=Purpose(purpose),
            at=when,
            revocation=RevocationPolicy(revocation),
            crls=crls,
            ocsp=ocsp,
            ocsp_client=ocsp_client if ocsp else None,
            policy=policy,
            pkix_params=pkix_params,
            at_given=at_given,
        )
    except Exception as exc:  # fail closed: an unexpected error never validates a path
        return ValidationResult(
            False, f"certificate {_subject(leaf)} could not be validated: internal error {exc!r}"
        )


async def _validate(
    leaf: x509.Certificate,
    *,
    anchors: Sequence[x509.Certificate],
    intermediates: Sequence[x509.Certificate],
    purpose: Purpose,
    at: datetime,
    revocation: RevocationPolicy,
    crls: Sequence[x509.CertificateRevocationList],
    ocsp: bool,
    ocsp_client: OcspClient | None,
    policy: AlgorithmPolicy,
    pkix_params: PKIXValidationParams | None,
    at_given: bool,
) -> ValidationResult:
    if not anchors:
        return ValidationResult(
            False,
            f"no trust anchor to validate certificate {_subject(leaf)} against; "
            "fix: configure the CA root certificate(s) of the peer's PKI",
        )
    for problem in (
        check_purpose(leaf, purpose),
        _check_leaf_key(leaf, purpose, policy),
        check_validity(leaf, at),
    ):
        if problem is not None:
            return ValidationResult(False, problem, (leaf,))
    inputs = _Inputs(
        leaf=leaf.public_bytes(serialization.Encoding.DER),
        anchors=[c.public_bytes(serialization.Encoding.DER) for c in anchors],
        others=[c.public_bytes(serialization.Encoding.DER) for c in intermediates],
        crls=[c.public_bytes(serialization.Encoding.DER) for c in crls],
        at=at,
        at_given=at_given,
        algorithms=CryptrecAlgorithms(policy),
    )
    asn1_leaf = _to_asn1(leaf)
    try:
        builder = inputs.context(revocation=False).path_builder
        paths = [inputs.fresh(p) for p in await builder.async_build_paths(asn1_leaf)]
    except PathBuildingError:
        issuer = leaf.issuer.rfc4514_string()
        return ValidationResult(
            False,
            f"no path from certificate {_subject(leaf)} to a trust anchor: its issuer "
            f"{issuer} (or a CA above it) is neither a given intermediate nor a trust anchor; "
            "fix: supply the issuing CA certificates as intermediates, or trust the PKI's root",
            (leaf,),
        )
    failures: list[ValidationResult] = []
    for path in paths:
        result = await _validate_path(path, inputs, revocation, ocsp_client, pkix_params)
        if result.valid:
            return result
        failures.append(result)
    # Prefer a reason that is not a broken signature of a competing path.
    for result in failures:
        if result.reason and "signature" not in result.reason:
            return result
    return failures[0]


async def _validate_path(
    path: ValidationPath,
    inputs: _Inputs,
    revocation: RevocationPolicy,
    client: OcspClient | None,
    pkix_params: PKIXValidationParams | None,
) -> ValidationResult:
    """One candidate path; ``client``: ask OCSP through it (None: no OCSP)."""
    certs = list(path.iter_certs(include_root=True))
    chain = tuple(_from_asn1(c) for c in reversed(certs))
    # 1. Everything except revocation: signatures, validity, names, constraints, policies.
    try:
        await _run(inputs.context(revocation=False), inputs.fresh(path), pkix_params)
    except (ValidationError, ValueError) as exc:
        return ValidationResult(False, _explain(exc, path), chain)
    if revocation is RevocationPolicy.OFF:
        return ValidationResult(True, None, chain, NOT_CHECKED)
    # 2. Revocation status of every certificate below the anchor.
    notes: dict[bytes, str] = {}
    fetched = await _fetch_ocsp(path, client, inputs.at, notes) if client is not None else []
    inputs.ocsps = [answer.response.dump() for _, _, answer in fetched]
    context = inputs.context(revocation=True)
    path = inputs.fresh(path)
    pairs: list[tuple[asn1_x509.Certificate, CertificateStatus]] = []
    for index, cert in enumerate(certs[1:], start=1):
        status = await _status_of(cert, index, path, context, inputs.at, inputs.at_given)
        if status.status == "unknown":
            status = _revoked_in_a_stale_crl(cert, certs[index - 1], inputs.crls) or status
        note = notes.get(cert.sha256)
        if note and status.status != "good":
            status = CertificateStatus(
                status.subject, status.status, status.source, f"{status.detail}; OCSP: {note}"
            )
        pairs.append((cert, status))
    pairs.reverse()  # leaf first, like the chain
    statuses = (*tuple(s for _, s in pairs), CertificateStatus(_subject(certs[0]), "trust-anchor"))
    summary = "; ".join(
        f"{s.subject}: {s.status}" + (f" ({s.source})" if s.source else "") for _, s in pairs
    )
    for _, status in pairs:
        if status.status == "revoked":
            return ValidationResult(False, status.detail, chain, summary, statuses)
    unknown = [(c, s) for c, s in pairs if s.status == "unknown"]
    if unknown and revocation is RevocationPolicy.REQUIRE:
        first = unknown[0][1]
        fix = _unknown_fix(first.detail, inputs.at, inputs.at_given)
        return ValidationResult(
            False,
            f"revocation status of certificate {first.subject} could not be established "
            f"({first.detail}); revocation policy 'require' refuses it; fix: {fix}",
            chain,
            summary,
            statuses,
        )
    warnings = tuple(
        f"revocation status of certificate {s.subject} is unknown ({s.detail}); accepted "
        "because the revocation policy is 'prefer'"
        for _, s in unknown
    )
    assumed = [c.dump() for c, _ in unknown]
    # 3. The whole path once more with revocation on (the authoritative check).
    try:
        await _run(
            inputs.context(revocation=True, assume_unrevoked=assumed),
            inputs.fresh(path),
            pkix_params,
        )
    except (ValidationError, ValueError) as exc:
        return ValidationResult(False, _explain(exc, path), chain, summary, statuses)
    good_by_ocsp = {c.sha256 for c, s in pairs if "ocsp" in s.source}
    for cert, issuer, answer in fetched:
        if cert.sha256 in good_by_ocsp and client is not None:
            client.remember(cert, issuer, answer)
    return ValidationResult(True, None, chain, summary, statuses, warnings)


def _unknown_fix(detail: str, at: datetime, given: bool) -> str:
    """The fix for a status that could not be established under 'require': a CRL past its
    nextUpdate, or dated after the time checked, is fixed by another CRL or by this
    host's clock; when ``at`` was given (``pki verify --at``) the clock is not the cause,
    the time given is."""
    if given and (STALE_CRL in detail or CRL_AHEAD in detail):
        when = f"{at.astimezone(UTC):%Y-%m-%d %H:%M}Z"
        return (
            f"give a CRL of its issuer that was current at the time given ({when}): "
            "thisUpdate before it and nextUpdate after it; or verify at a time within that "
            "CRL's validity period"
        )
    if STALE_CRL in detail:
        return (
            "fetch the CA's current CRL into the zone's `crls` (or check why fetch_crls "
            "cannot refresh it) and reload, or, if that CRL is current, correct this host's "
            "clock (timedatectl)"
        )
    if CRL_AHEAD in detail:
        return "check this host's clock (timedatectl): it reads before the CRL's thisUpdate"
    return "provide a current CRL of its issuer, or make its OCSP responder reachable"


async def _run(
    context: ValidationContext, path: ValidationPath, params: PKIXValidationParams | None
) -> None:
    from pyhanko_certvalidator.validate import async_validate_path

    await async_validate_path(context, path, parameters=params)
