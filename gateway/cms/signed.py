"""CMS SignedData (RFC 5652 section 5): sign and verify.

Signing always produces DER with the signed attributes contentType,
messageDigest, signingTime and CMSAlgorithmProtection (RFC 6211).
Verification accepts DER or BER (indefinite lengths, constructed OCTET
STRINGs): digests are computed over the *content octets* and the signature
over the signed attributes encoded as a DER ``SET OF``.
"""

from __future__ import annotations

import base64
import contextlib
import functools
import hmac
import itertools
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Literal

from asn1crypto import algos, cms, core
from asn1crypto import x509 as asn1_x509
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import Prehashed

from ..errors import (
    MalformedMessageError,
    ObjectSecurityError,
    PolicyError,
    SignatureError,
    SignerNotTrustedError,
)
from ..policy import (
    COMPAT_DIGESTS,
    AlgorithmPolicy,
    PrivateKey,
    certificate_key,
    normalize_digest,
)
from .der import (
    MAX_NESTING,
    Cursor,
    DerError,
    children,
    contents_of,
    count_children,
    integer,
    joined_octet_strings,
    oid_der,
    oid_valid,
    tlv,
)
from .limits import (
    MAX_ATTRIBUTE_VALUES,
    MAX_ATTRIBUTES,
    MAX_CERTIFICATES,
    MAX_CRLS,
    MAX_DIGEST_ALGORITHMS,
    MAX_SIGNER_INFOS,
    check_count,
)

__all__ = [
    "ParsedSignature",
    "VerifiedSignature",
    "compute_mic",
    "parse_signature",
    "sign",
    "sign_digest",
    "signer_digests",
    "verify",
    "verify_digest",
]

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

_HASHES: dict[str, type[hashes.HashAlgorithm]] = {
    "sha256": hashes.SHA256,
    "sha384": hashes.SHA384,
    "sha512": hashes.SHA512,
}
# Only used so that a SHA-1 key-management algorithm, or a peer's SHA-1 signature,
# can be *read* when that peer's accept_legacy names it (never to sign or compute
# a MIC we send).
_COMPAT_HASHES: dict[str, type[hashes.HashAlgorithm]] = {**_HASHES, "sha1": hashes.SHA1}

_ECDSA_BY_DIGEST = {
    "sha256": "sha256_ecdsa",
    "sha384": "sha384_ecdsa",
    "sha512": "sha512_ecdsa",
}
_EC_PUBLIC_KEY_OID = "1.2.840.10045.2.1"  # some producers put id-ecPublicKey here


def hash_for(name: str, *, allow_sha1: bool = False) -> hashes.HashAlgorithm:
    """A ``cryptography`` hash object for a (policy-checked) digest name."""
    table = _COMPAT_HASHES if allow_sha1 else _HASHES
    cls = table.get(normalize_digest(name))
    if cls is None:
        raise PolicyError(name, "unsupported digest", "use sha256, sha384 or sha512")
    return cls()


def load_content_info(data: bytes, what: str) -> Any:
    """Parse a DER/BER ContentInfo; :class:`MalformedMessageError` if it is not one.

    A SignedData's counts are checked first (:func:`check_signed_counts`), and OCTET
    STRING segments joined (:func:`~gateway.cms.der.joined_octet_strings`): asn1crypto
    would build an object for every segment and every element."""
    if not isinstance(data, bytes | bytearray | memoryview):
        raise TypeError(f"{what} must be bytes, not {type(data).__name__}")
    data = bytes(data)
    if not data:
        raise MalformedMessageError(
            f"{what} is empty: expected a DER/BER CMS ContentInfo",
            fix="check that the peer sent a CMS/S-MIME body",
        )
    check_signed_counts(data, what)
    with contextlib.suppress(DerError):  # malformed: asn1crypto says how
        data = joined_octet_strings(data)
    try:
        ci = cms.ContentInfo.load(data, strict=True)
        ci["content_type"].native  # noqa: B018 - force parsing
        ci["content"]
    except ASN1_ERRORS as exc:
        raise MalformedMessageError(
            f"{what} is not a DER/BER CMS ContentInfo ({len(data)} bytes): {exc}",
            fix="check that the body is binary CMS (base64 must be decoded first) "
            "and was not truncated or altered in transit",
        ) from exc
    return ci


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


# ---------------------------------------------------------------------------
# DER writing


OID_CONTENT_TYPE = "1.2.840.113549.1.9.3"
OID_MESSAGE_DIGEST = "1.2.840.113549.1.9.4"
OID_SIGNING_TIME = "1.2.840.113549.1.9.5"
OID_ALGORITHM_PROTECTION = "1.2.840.113549.1.9.52"
_OID_DATA_DER = oid_der("1.2.840.113549.1.7.1")
_OID_SIGNED_DATA_DER = oid_der("1.2.840.113549.1.7.2")


def _attribute(oid: str, value_der: bytes) -> bytes:
    return tlv(0x30, oid_der(oid) + tlv(0x31, value_der))


@functools.lru_cache(maxsize=8)
def _time_der(dt: datetime) -> bytes:
    dt = dt.astimezone(UTC)
    if 1950 <= dt.year < 2050:
        return tlv(0x17, dt.strftime("%y%m%d%H%M%SZ").encode("ascii"))
    return tlv(0x18, dt.strftime("%Y%m%d%H%M%SZ").encode("ascii"))


def issuer_and_serial_der(cert: x509.Certificate) -> bytes:
    """IssuerAndSerialNumber with the issuer Name and serial exactly as in the certificate."""
    issuer, serial = issuer_serial_ders(cert_der(cert))
    return tlv(0x30, issuer + serial)


# ---------------------------------------------------------------------------
# signing


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


def compute_mic(data: bytes, digest: str) -> str:
    """Base64 of ``digest(data)``: the AS2 MIC (RFC 4130 section 7.3.1)."""
    name = normalize_digest(digest)
    AlgorithmPolicy().check_digest(name)
    h = hashes.Hash(hash_for(name))
    h.update(data)
    return base64.b64encode(h.finalize()).decode("ascii")


def _digest(data: bytes, name: str, *, allow_sha1: bool = False) -> bytes:
    h = hashes.Hash(hash_for(name, allow_sha1=allow_sha1))
    h.update(data)
    return h.finalize()


@functools.lru_cache(maxsize=32)
def _digest_algorithm_der(digest: str) -> bytes:
    out: bytes = algos.DigestAlgorithm({"algorithm": digest}).dump()
    return out


@functools.lru_cache(maxsize=32)
def _signature_algorithm_der(ecdsa: bool, digest: str, rsa_padding: str) -> bytes:
    """The DER of a signer's signatureAlgorithm; a pure function of its arguments."""
    out: bytes = _build_signature_algorithm(ecdsa, digest, rsa_padding).dump()
    return out


def _build_signature_algorithm(ecdsa: bool, digest: str, rsa_padding: str) -> Any:
    if ecdsa:
        return algos.SignedDigestAlgorithm({"algorithm": _ECDSA_BY_DIGEST[digest]})
    if rsa_padding == "pss":
        return algos.SignedDigestAlgorithm(
            {
                "algorithm": "rsassa_pss",
                "parameters": {
                    "hash_algorithm": {"algorithm": digest},
                    "mask_gen_algorithm": {
                        "algorithm": "mgf1",
                        "parameters": {"algorithm": digest},
                    },
                    "salt_length": hash_for(digest).digest_size,
                },
            }
        )
    return algos.SignedDigestAlgorithm({"algorithm": "rsassa_pkcs1v15"})


def sign(
    content: bytes,
    signer_cert: x509.Certificate,
    signer_key: PrivateKey,
    *,
    digest: str = "sha256",
    detached: bool = True,
    rsa_padding: Literal["pss", "pkcs1v15"] = "pkcs1v15",
    certificates: Sequence[x509.Certificate] = (),
    signing_time: datetime,
    policy: AlgorithmPolicy,
) -> bytes:
    """Sign ``content``; returns a DER ``ContentInfo(SignedData)``."""
    content = bytes(content)
    digest = normalize_digest(digest)
    policy.check_digest(digest)
    return sign_digest(
        _digest(content, digest),
        signer_cert,
        signer_key,
        digest=digest,
        content=None if detached else content,
        rsa_padding=rsa_padding,
        certificates=certificates,
        signing_time=signing_time,
        policy=policy,
    )


@functools.lru_cache(maxsize=32)
def _check_signature_key(policy: AlgorithmPolicy, key: PrivateKey) -> None:
    """``policy.check_signature_key``, cached: a pure function of the policy and the key,
    and the gateway signs with the same few keys (which the cache keeps alive, as the
    configuration does anyway)."""
    policy.check_signature_key(key)


@functools.lru_cache(maxsize=32)
def _key_belongs_to(key: PrivateKey, cert: x509.Certificate) -> bool:
    """Whether ``key`` is the private key of ``cert``'s public key (cached, as above)."""
    spki = serialization.PublicFormat.SubjectPublicKeyInfo
    der = serialization.Encoding.DER
    return bool(
        key.public_key().public_bytes(der, spki) == cert.public_key().public_bytes(der, spki)
    )


@functools.lru_cache(maxsize=32)
def _fixed_attributes(digest_alg_der: bytes, sig_alg_der: bytes) -> tuple[bytes, bytes]:
    """The signed attributes that depend only on the algorithms: contentType (data) and
    CMSAlgorithmProtection (RFC 6211)."""
    return (
        _attribute(OID_CONTENT_TYPE, _OID_DATA_DER),
        _attribute(OID_ALGORITHM_PROTECTION, tlv(0x30, digest_alg_der + b"\xa1" + sig_alg_der[1:])),
    )


def sign_digest(
    content_digest: bytes,
    signer_cert: x509.Certificate,
    signer_key: PrivateKey,
    *,
    digest: str = "sha256",
    content: bytes | None = None,
    rsa_padding: Literal["pss", "pkcs1v15"] = "pkcs1v15",
    certificates: Sequence[x509.Certificate] = (),
    signing_time: datetime,
    policy: AlgorithmPolicy,
) -> bytes:
    """Sign content known by its ``digest`` (streaming); detached unless ``content`` is given."""
    digest = normalize_digest(digest)
    policy.check_digest(digest)
    if not isinstance(signer_key, rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey):
        raise PolicyError(
            type(signer_key).__name__,
            "only RSA and ECDSA signing keys are supported",
            "use an RSA-3072 or EC P-256/P-384 signing key",
        )
    _check_signature_key(policy, signer_key)
    if rsa_padding not in ("pss", "pkcs1v15"):
        raise ValueError(f"rsa_padding must be 'pss' or 'pkcs1v15', not {rsa_padding!r}")
    if not _key_belongs_to(signer_key, signer_cert):
        raise ObjectSecurityError(
            f"signing key does not belong to the signing certificate ({cert_label(signer_cert)})",
            fix="configure the private key that matches this certificate",
        )
    if signing_time.tzinfo is None:
        raise ValueError("signing_time must be timezone-aware")

    # Written as DER directly: asn1crypto's object builder costs more per
    # message than the private-key operation.
    digest_alg_der = _digest_algorithm_der(digest)
    sig_alg_der = _signature_algorithm_der(
        isinstance(signer_key, ec.EllipticCurvePrivateKey), digest, rsa_padding
    )
    content_type_attr, protection_attr = _fixed_attributes(digest_alg_der, sig_alg_der)
    attrs = sorted(
        [
            content_type_attr,
            _attribute(OID_SIGNING_TIME, _time_der(signing_time)),
            _attribute(OID_MESSAGE_DIGEST, tlv(0x04, content_digest)),
            protection_attr,
        ]
    )
    attrs_der = tlv(0x31, b"".join(attrs))  # DER: SET OF sorted

    h = hash_for(digest)
    if isinstance(signer_key, ec.EllipticCurvePrivateKey):
        signature = signer_key.sign(attrs_der, ec.ECDSA(h))
    elif rsa_padding == "pss":
        signature = signer_key.sign(
            attrs_der, padding.PSS(mgf=padding.MGF1(h), salt_length=h.digest_size), h
        )
    else:
        signature = signer_key.sign(attrs_der, padding.PKCS1v15(), h)

    signer_info = tlv(
        0x30,
        b"\x02\x01\x01"  # version 1: issuerAndSerialNumber
        + issuer_and_serial_der(signer_cert)
        + digest_alg_der
        + b"\xa0"
        + attrs_der[1:]  # [0] IMPLICIT signedAttrs
        + sig_alg_der
        + tlv(0x04, signature),
    )
    certs: list[bytes] = []
    for c in (signer_cert, *certificates):
        d = cert_der(c)
        if d not in certs:
            certs.append(d)
    encap = _OID_DATA_DER
    if content is not None:
        encap += tlv(0xA0, tlv(0x04, content))
    signed_data = tlv(
        0x30,
        b"\x02\x01\x01"  # version 1
        + tlv(0x31, digest_alg_der)
        + tlv(0x30, encap)
        + tlv(0xA0, b"".join(sorted(certs)))  # DER: SET OF sorted
        + tlv(0x31, signer_info),
    )
    return tlv(0x30, _OID_SIGNED_DATA_DER + tlv(0xA0, signed_data))


# ---------------------------------------------------------------------------
# verification


@dataclass
class _ParsedSigner:
    """A SignerInfo read with asn1crypto (any shape the asn1crypto path accepts)."""

    index: int
    sid_issuer_serial: Any | None
    sid_ski: bytes | None
    digest: str  # asn1crypto name or dotted OID
    digest_alg: Any
    sig_alg: Any
    sig_alg_name: str
    signature: bytes
    attrs_present: bool
    attrs_original: bytes | None  # the signed attributes as received, tagged SET OF
    attrs: Any  # the asn1crypto [0] IMPLICIT signedAttrs, or Void
    content_type_attr: str | None
    message_digest: bytes | None
    signing_time: datetime | None
    algorithm_protection: Any | None
    _forced: bytes | None = field(default=None, repr=False)

    def attrs_der(self) -> Iterator[bytes]:
        """The encodings the signature may be over: the signed attributes as received
        (tagged SET OF), then - only if that one does not verify - their DER
        re-encoding, if it differs (a BER SET OF, or an unsorted one, that an
        intermediary re-encoded, or that its signer encoded in DER for signing)."""
        if self.attrs_original is None:
            return
        yield self.attrs_original
        if self._forced is None:
            self._forced = self.attrs.untag().dump(force=True)
        if self._forced != self.attrs_original:
            yield self._forced

    def describe(self) -> str:
        if self.sid_issuer_serial is not None:
            return (
                f"issuer {name_string(self.sid_issuer_serial['issuer'])!r}, serial "
                f"0x{self.sid_issuer_serial['serial_number'].native:x}"
            )
        return f"subjectKeyIdentifier {(self.sid_ski or b'').hex()}"

    def names(self, cert: x509.Certificate) -> bool:
        """True if the signer identifier names ``cert``."""
        if self.sid_issuer_serial is not None:
            return matches_issuer_serial(cert, self.sid_issuer_serial)
        return self.sid_ski is not None and cert_ski(cert) == self.sid_ski

    def check_protection(self, who: str) -> None:
        """RFC 6211: the CMSAlgorithmProtection attribute, if any, names the signer
        info's own digest and signature algorithms."""
        prot = self.algorithm_protection
        if prot is None:
            return
        if not isinstance(prot["mac_algorithm"], core.Void) or isinstance(
            prot["signature_algorithm"], core.Void
        ):
            raise SignatureError(
                f"{who}: CMSAlgorithmProtection must carry a signatureAlgorithm and no "
                "macAlgorithm in SignedData (RFC 6211)",
                fix="the message was built incorrectly; ask the peer to fix it",
            )
        if prot["digest_algorithm"]["algorithm"].dotted != self.digest_alg[
            "algorithm"
        ].dotted or not _same_algorithm(prot["signature_algorithm"], self.sig_alg):
            raise SignatureError(
                f"{who}: CMSAlgorithmProtection does not match the algorithms in the "
                "signer info (algorithm substitution, RFC 6211)",
                fix="the message was altered; ask the peer to resend",
            )


class _Asn1Twin:
    """The asn1crypto reading of a signature the direct reader took, made only when
    a rare path needs an asn1crypto object (a Name compared as a Name, a DER
    re-encoding of the signed attributes, an error message)."""

    __slots__ = ("_der", "_parsed")

    def __init__(self, der: bytes) -> None:
        self._der = der
        self._parsed: _ParsedSignedData | None = None

    def signer(self, index: int) -> _ParsedSigner:
        if self._parsed is None:
            self._parsed = _parse_signed_data_asn1(self._der)
        signer = self._parsed.signers[index]
        assert isinstance(signer, _ParsedSigner)
        return signer


class _DirectSigner:
    """A SignerInfo of the common shape, read directly from its DER.

    The values read are exactly those :func:`_parse_signer` gives; anything
    needing an asn1crypto object comes from the asn1crypto reading of the same
    bytes (``_twin``), so that rare paths behave exactly as there.  Its
    CMSAlgorithmProtection, if present, was checked when it was read: it is
    accepted only as the byte-exact copy of the signer info's algorithms.
    """

    __slots__ = (
        "_twin",
        "attrs_original",
        "attrs_present",
        "content_type_attr",
        "digest",
        "index",
        "message_digest",
        "sid_issuer_der",
        "sid_serial",
        "sid_ski",
        "sig_alg_name",
        "signature",
        "signing_time",
    )

    def __init__(self, index: int, twin: _Asn1Twin) -> None:
        self.index = index
        self._twin = twin
        self.sid_issuer_der: bytes | None = None
        self.sid_serial = 0
        self.sid_ski: bytes | None = None
        self.digest = ""
        self.sig_alg_name = ""
        self.signature = b""
        self.attrs_present = False
        self.attrs_original: bytes | None = None
        self.content_type_attr: str | None = None
        self.message_digest: bytes | None = None
        self.signing_time: datetime | None = None

    @property
    def sig_alg(self) -> Any:
        return self._twin.signer(self.index).sig_alg

    def attrs_der(self) -> Iterator[bytes]:
        if self.attrs_original is None:
            return
        yield self.attrs_original
        # not verified as received: as the asn1crypto path, try the DER re-encoding
        yield from itertools.islice(self._twin.signer(self.index).attrs_der(), 1, None)

    def describe(self) -> str:
        return self._twin.signer(self.index).describe()

    def names(self, cert: x509.Certificate) -> bool:
        if self.sid_issuer_der is None:
            return self.sid_ski is not None and cert_ski(cert) == self.sid_ski
        if self.sid_serial != cert.serial_number:
            return False
        issuer_der, _ = issuer_serial_ders(cert_der(cert))
        if issuer_der == self.sid_issuer_der:
            return True
        # the same name encoded otherwise? compared as a Name, as the asn1crypto path does
        return self._twin.signer(self.index).names(cert)

    def check_protection(self, who: str) -> None:
        return None  # checked when read


_Signer = _ParsedSigner | _DirectSigner


@dataclass
class _ParsedSignedData:
    content_type: str
    content: bytes | None
    certificates: tuple[x509.Certificate, ...]
    signers: tuple[_Signer, ...]


ParsedSignature = _ParsedSignedData


def _single(attr: Any, name: str) -> Any:
    values = attr["values"]
    if len(values) != 1:
        raise MalformedMessageError(
            f"signed attribute {name} has {len(values)} values; RFC 5652 requires exactly one",
            fix="the sender's CMS implementation is broken; ask the peer to fix it",
        )
    return values[0]


def _parse_signer(index: int, si: Any) -> _ParsedSigner:
    sid = si["sid"]
    ias = sid.chosen if sid.name == "issuer_and_serial_number" else None
    ski = sid.chosen.native if sid.name == "subject_key_identifier" else None
    digest_alg = si["digest_algorithm"]
    sig_alg = si["signature_algorithm"]
    attrs = si["signed_attrs"]
    attrs_present = not isinstance(attrs, core.Void)
    ct_attr = md = st = prot = None
    original: bytes | None = None
    if attrs_present:
        seen: set[str] = set()
        for attr in attrs:
            typ = attr["type"].native
            if typ in seen and typ in (
                "content_type",
                "message_digest",
                "signing_time",
                "cms_algorithm_protection",
            ):
                raise MalformedMessageError(
                    f"signed attribute {typ} appears twice in signer info #{index}; "
                    "RFC 5652 forbids repeated attributes",
                    fix="the sender's CMS implementation is broken; ask the peer to fix it",
                )
            seen.add(typ)
            if typ == "content_type":
                ct_attr = _single(attr, typ).native
            elif typ == "message_digest":
                md = _single(attr, typ).native
            elif typ == "signing_time":
                st = _single(attr, typ).native
            elif typ == "cms_algorithm_protection":
                prot = _single(attr, typ)
        original = b"\x31" + attrs.dump()[1:]
    return _ParsedSigner(
        index=index,
        sid_issuer_serial=ias,
        sid_ski=ski,
        digest=digest_alg["algorithm"].native,
        digest_alg=digest_alg,
        sig_alg=sig_alg,
        sig_alg_name=sig_alg["algorithm"].native,
        signature=si["signature"].native,
        attrs_present=attrs_present,
        attrs_original=original,
        attrs=attrs,
        content_type_attr=ct_attr,
        message_digest=md,
        signing_time=st,
        algorithm_protection=prot,
    )


def check_signed_counts(signed: bytes, what: str = "signed message") -> None:
    """Refuse (:class:`~gateway.cms.limits.TooMany`) a ContentInfo(SignedData), DER
    or BER, with more digest algorithms, certificates, CRLs, signer infos or
    attributes than any real message carries; nothing is built from them first.

    Only the containers counted are walked; a malformed one is refused here too.
    Another content type is left to the reader, which names it.
    """
    try:
        ci = list(itertools.islice(children(signed), 3))
        if len(ci) != 2 or ci[1][0] != 0xA0 or signed[ci[0][1] : ci[0][2]] != _OID_SIGNED_DATA_DER:
            return
        explicit = list(itertools.islice(children(signed, ci[1][1]), 2))
        if len(explicit) != 1 or explicit[0][0] != 0x30:
            return
        fields = _first_children(signed, explicit[0][1], 7, "SignedData fields")
        for index, (tag, start, _stop) in enumerate(fields):
            if index == 1 and tag == 0x31:
                count_children(signed, start, MAX_DIGEST_ALGORITHMS, "digest algorithms")
            elif index >= 3 and tag == 0xA0:
                count_children(signed, start, MAX_CERTIFICATES, "certificates")
            elif index >= 3 and tag == 0xA1:
                count_children(signed, start, MAX_CRLS, "CRLs")
            elif index >= 3 and tag == 0x31:
                for _, signer, _ in _first_children(
                    signed, start, MAX_SIGNER_INFOS, "signer infos"
                ):
                    _check_signer_counts(signed, signer)
    except DerError as exc:
        raise MalformedMessageError(
            f"{what} is not a DER/BER CMS ContentInfo ({len(signed)} bytes): {exc.detail}",
            fix="check that the body is binary CMS (base64 must be decoded first) "
            "and was not truncated or altered in transit",
        ) from None


def _first_children(buf: bytes, pos: int, limit: int, what: str) -> list[tuple[int, int, int]]:
    found: list[tuple[int, int, int]] = []
    for child in children(buf, pos):
        found.append(child)
        check_count(len(found), limit, what)
    return found


def _check_signer_counts(signed: bytes, pos: int) -> None:
    """At most MAX_ATTRIBUTES signed and unsigned attributes in the SignerInfo at ``pos``."""
    fields = _first_children(signed, pos, 7, "SignerInfo fields")
    for index, (tag, start, _stop) in enumerate(fields):
        if (index == 3 and tag == 0xA0) or (index >= 5 and tag == 0xA1):
            kind = "signed" if tag == 0xA0 else "unsigned"
            for _, attribute, _ in _first_children(
                signed, start, MAX_ATTRIBUTES, f"{kind} attributes in a signer info"
            ):
                parts = _first_children(signed, attribute, 2, "fields in an attribute")
                if len(parts) == 2 and parts[1][0] == 0x31:
                    count_children(
                        signed, parts[1][1], MAX_ATTRIBUTE_VALUES, "values of one attribute"
                    )


def _parse_signed_data(signed: bytes) -> _ParsedSignedData:
    """The signature read directly if it has the common shape, else with asn1crypto;
    both give the same values, and a malformed signature the asn1crypto error.
    Its counts are checked first (:func:`check_signed_counts`)."""
    if isinstance(signed, bytes | bytearray | memoryview) and len(signed):
        check_signed_counts(bytes(signed))
    if type(signed) is bytes:
        try:
            return _parse_signed_data_der(signed)
        except DerError:
            pass
    return _parse_signed_data_asn1(signed)


def _parse_signed_data_asn1(signed: bytes) -> _ParsedSignedData:
    ci = load_content_info(signed, "signed message")
    ctype = ci["content_type"].native
    if ctype != "signed_data":
        raise MalformedMessageError(
            f"signed message is a CMS {ctype}, not SignedData",
            fix="check the message order: the gateway expects a signature here",
        )
    try:
        _refuse_extra_elements(ci, "signed message")
        sd = ci["content"]
        encap = sd["encap_content_info"]
        econtent_type = encap["content_type"].native
        econtent = encap["content"]
        content: bytes | None = None
        if not isinstance(econtent, core.Void):
            # the content octets: chunks of a BER constructed OCTET STRING merged
            content = bytes(econtent)
        certs: list[x509.Certificate] = []
        if not isinstance(sd["certificates"], core.Void):
            for choice in sd["certificates"]:
                if choice.name != "certificate":
                    continue
                certs.append(x509.load_der_x509_certificate(choice.chosen.dump()))
        signers = tuple(_parse_signer(i, si) for i, si in enumerate(sd["signer_infos"]))
    except MalformedMessageError:
        raise
    except ASN1_ERRORS as exc:
        raise MalformedMessageError(
            f"signed message has a malformed SignedData structure: {exc}",
            fix="check that the message was not truncated or altered in transit",
        ) from exc
    if not signers:
        raise MalformedMessageError(
            "signed message has no SignerInfo (it carries no signature)",
            fix="ask the peer to sign the message",
        )
    return _ParsedSignedData(
        content_type=econtent_type,
        content=content,
        certificates=tuple(certs),
        signers=signers,
    )


def _refuse_extra_elements(value: core.Asn1Value, what: str) -> None:
    """Refuse an element after the last field of any SEQUENCE in ``value``.

    asn1crypto keeps such elements aside instead of refusing them; they are
    outside everything the signature covers, and the direct reader (and
    openssl) refuse them.  Certificates are left to ``cryptography``'s strict
    reader, OCTET STRING and ANY contents to whoever reads them.
    """
    stack: list[tuple[core.Asn1Value, int]] = [(value, 0)]
    while stack:
        item, depth = stack.pop()
        if depth > MAX_NESTING:
            raise MalformedMessageError(
                f"{what} nests elements more than {MAX_NESTING} deep",
                fix="check that the message was not altered in transit",
            )
        if isinstance(item, core.Choice):
            stack.append((item.chosen, depth + 1))
        elif isinstance(item, asn1_x509.Certificate):
            continue
        elif isinstance(item, core.Sequence):
            fields = len(item._fields)
            if len(item) > fields:
                raise MalformedMessageError(
                    f"{what} has {len(item) - fields} unexpected element(s) after the last "
                    f"field of its {type(item).__name__}",
                    fix="check that the message was not altered in transit; the sender's "
                    "product writes CMS that is not valid",
                )
            stack.extend((item._lazy_child(i), depth + 1) for i in range(fields))
        elif isinstance(item, core.SequenceOf):
            stack.extend((child, depth + 1) for child in item)


# ---------------------------------------------------------------------------
# the common shape, read directly (gateway.cms.der)
#
# Accepted: DER; one or more SignerInfos with an issuerAndSerialNumber or a
# subjectKeyIdentifier; digest and signature algorithms without parameters
# (or NULL), so not RSASSA-PSS; signed attributes whose contentType,
# messageDigest, signingTime (UTCTime or GeneralizedTime, seconds, Z) and
# CMSAlgorithmProtection (a copy of the signer info's algorithms) have one
# value each, others skipped as the asn1crypto path skips them; certificates
# only as X.509 certificates; no CRLs, no unsigned attributes.  Anything else
# raises DerError and is read with asn1crypto.


def _oid_names(*maps: dict[str, str]) -> dict[bytes, str]:
    """DER contents of each OID -> the name asn1crypto's ``.native`` gives it."""
    out: dict[bytes, str] = {}
    for m in maps:
        for dotted, name in m.items():
            out[oid_der(dotted)[2:]] = name
    return out


_DIGEST_NAMES = _oid_names(algos.DigestAlgorithmId._map)
_SIGNATURE_NAMES = _oid_names(algos.SignedDigestAlgorithmId._map)
del _SIGNATURE_NAMES[oid_der("1.2.840.113549.1.1.10")[2:]]  # RSASSA-PSS: parameters
_CONTENT_TYPE_NAMES = _oid_names(cms.ContentType._map)
_OID_SIGNED_DATA = _OID_SIGNED_DATA_DER[2:]
_ATTR_CONTENT_TYPE = oid_der(OID_CONTENT_TYPE)[2:]
_ATTR_MESSAGE_DIGEST = oid_der(OID_MESSAGE_DIGEST)[2:]
_ATTR_SIGNING_TIME = oid_der(OID_SIGNING_TIME)[2:]
_ATTR_ALGORITHM_PROTECTION = oid_der(OID_ALGORITHM_PROTECTION)[2:]
_NULL = b"\x05\x00"


def _oid_name(c: Cursor, names: dict[bytes, str]) -> str:
    oid = c.value(0x06)
    name = names.get(oid)
    if name is None:
        raise DerError("an object identifier the direct reader does not know")
    return name


def _algorithm(c: Cursor, names: dict[bytes, str]) -> tuple[str, bytes]:
    """(asn1crypto name, DER) of an AlgorithmIdentifier without parameters or with NULL."""
    start = c.pos
    alg = c.inner(0x30)
    name = _oid_name(alg, names)
    if not alg.at_end() and alg.raw(0x05) != _NULL:
        raise DerError("NULL with contents")
    alg.finish()
    return name, c.buf[start : c.pos]


def _one_value(attr: Cursor) -> Cursor:
    values = attr.inner(0x31)
    attr.finish()
    return values


def _time_value(tag: int, text: bytes) -> datetime:
    """UTCTime / GeneralizedTime with seconds and Z, as asn1crypto's ``.native`` gives it."""
    if tag == 0x17 and len(text) == 13 and text[12] == 0x5A and text[:12].isdigit():
        year = int(text[0:2])
        year += 2000 if year < 50 else 1900
        rest = text[2:12]
    elif tag == 0x18 and len(text) == 15 and text[14] == 0x5A and text[:14].isdigit():
        year = int(text[0:4])
        rest = text[4:14]
        if year == 0:
            raise DerError("year 0")
    else:
        raise DerError("a time form the direct reader does not read")
    try:
        return datetime(
            year,
            int(rest[0:2]),
            int(rest[2:4]),
            int(rest[4:6]),
            int(rest[6:8]),
            int(rest[8:10]),
            tzinfo=UTC,
        )
    except ValueError as exc:
        raise DerError(f"invalid time: {exc}") from None


def _signer_der(c: Cursor, index: int, twin: _Asn1Twin) -> _DirectSigner:
    s = _DirectSigner(index, twin)
    buf = c.buf
    c.next(0x02)  # version: not used
    tag = c.peek()
    if tag == 0x30:
        ias = c.inner(0x30)
        s.sid_issuer_der = ias.raw(0x30)
        start, stop = ias.next(0x02)
        s.sid_serial = integer(buf, start, stop)
        ias.finish()
    elif tag == 0x80:
        s.sid_ski = c.value(0x80)
    else:
        raise DerError("a signer identifier the direct reader does not read")
    s.digest, digest_alg_der = _algorithm(c, _DIGEST_NAMES)
    attrs_at = c.pos
    attrs = c.optional(0xA0)
    protection: bytes | None = None
    if attrs is not None:
        s.attrs_present = True
        s.attrs_original = b"\x31" + buf[attrs_at + 1 : c.pos]
        seen: set[bytes] = set()
        a = Cursor(buf, *attrs)
        while not a.at_end():
            attr = a.inner(0x30)
            typ = attr.value(0x06)
            if not oid_valid(typ):
                raise DerError("an object identifier not in its DER form")
            if typ == _ATTR_CONTENT_TYPE:
                v = _one_value(attr)
                s.content_type_attr = _oid_name(v, _CONTENT_TYPE_NAMES)
            elif typ == _ATTR_MESSAGE_DIGEST:
                v = _one_value(attr)
                s.message_digest = v.value(0x04)
            elif typ == _ATTR_SIGNING_TIME:
                v = _one_value(attr)
                t, start, stop = v.any()
                s.signing_time = _time_value(t, buf[start:stop])
            elif typ == _ATTR_ALGORITHM_PROTECTION:
                v = _one_value(attr)
                protection = v.value(0x30)
            else:  # skipped, as the asn1crypto path skips it
                attr.next(0x31)
                attr.finish()
                continue
            v.finish()
            if typ in seen:
                raise DerError("a signed attribute repeated")
            seen.add(typ)
    sig_alg, sig_alg_der = _algorithm(c, _SIGNATURE_NAMES)
    s.sig_alg_name = sig_alg
    s.signature = c.value(0x04)
    c.finish()  # no unsignedAttrs
    # RFC 6211: only the exact copy of the signer info's algorithms is taken here
    if protection is not None and protection != digest_alg_der + b"\xa1" + sig_alg_der[1:]:
        raise DerError("a CMSAlgorithmProtection other than the signer info's algorithms")
    return s


def _parse_signed_data_der(signed: bytes) -> _ParsedSignedData:
    ci = contents_of(signed, 0x30)
    if ci.value(0x06) != _OID_SIGNED_DATA:
        raise DerError("not SignedData")
    explicit = ci.inner(0xA0)
    ci.finish()
    sd = explicit.inner(0x30)
    explicit.finish()
    sd.next(0x02)  # version: not used
    sd.next(0x31)  # digestAlgorithms: not used (each signer names its own)
    encap = sd.inner(0x30)
    content_type = _oid_name(encap, _CONTENT_TYPE_NAMES)
    content: bytes | None = None
    if not encap.at_end():
        econtent = encap.inner(0xA0)
        content = econtent.value(0x04)
        econtent.finish()
    encap.finish()
    certs: list[x509.Certificate] = []
    certificates = sd.optional(0xA0)
    if certificates is not None:
        cc = Cursor(signed, *certificates)
        while not cc.at_end():
            try:
                certs.append(x509.load_der_x509_certificate(cc.raw(0x30)))
            except (ValueError, x509.InvalidVersion) as exc:
                raise DerError(f"certificate: {exc}") from None
    signer_infos = sd.inner(0x31)
    sd.finish()  # no CRLs
    twin = _Asn1Twin(signed)
    signers: list[_Signer] = []
    while not signer_infos.at_end():
        signers.append(_signer_der(signer_infos.inner(0x30), len(signers), twin))
    if not signers:
        raise DerError("no SignerInfo")
    return _ParsedSignedData(content_type, content, tuple(certs), tuple(signers))


def _find_cert(signer: _Signer, candidates: Sequence[x509.Certificate]) -> x509.Certificate | None:
    for cert in candidates:
        if signer.names(cert):
            return cert
    return None


def _params_native(alg: Any) -> Any:
    p = alg["parameters"]
    if isinstance(p, core.Void | core.Null):
        return None
    return p.native


def _same_algorithm(a: Any, b: Any) -> bool:
    return bool(a["algorithm"].dotted == b["algorithm"].dotted) and _params_native(
        a
    ) == _params_native(b)


def _check_scheme(
    signer: _Signer, pub: Any, policy: AlgorithmPolicy
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
            inner = name.split("_")[0]
            policy.check_digest(inner, inbound=True)
            if inner != digest:
                raise SignatureError(
                    f"signer info #{signer.index}: signature algorithm {name} does not match "
                    f"digest algorithm {digest}",
                    fix="the sender's CMS implementation is inconsistent; ask the peer to fix it",
                )
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
            inner = name.split("_")[0]
            policy.check_digest(inner, inbound=True)
            if inner != digest:
                raise SignatureError(
                    f"signer info #{signer.index}: signature algorithm {name} does not match "
                    f"digest algorithm {digest}",
                    fix="the sender's CMS implementation is inconsistent; ask the peer to fix it",
                )
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


def _compat_digests(signer: _Signer) -> tuple[str, ...]:
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
    """The signed content, as bytes or as its digests (streaming)."""

    def __init__(
        self, data: bytes | None, digest_of: Callable[[str], bytes] | None, length: int
    ) -> None:
        self.data = data
        self._digest_of = digest_of
        self.length = length

    def digest(self, name: str) -> bytes:
        """Only for a policy-checked signer digest (SHA-1 only if accept_legacy names it)."""
        if self.data is not None:
            return _digest(self.data, name, allow_sha1=True)
        assert self._digest_of is not None
        return self._digest_of(name)


@functools.lru_cache(maxsize=256)
def _signer_label(cert: x509.Certificate) -> str:
    return f"signer {cert.subject.rfc4514_string()!r}"


def _verify_signer(
    signer: _Signer,
    cert: x509.Certificate,
    parsed: _ParsedSignedData,
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
    validate_signer: Callable[[x509.Certificate, Sequence[x509.Certificate]], None] | None = None,
) -> VerifiedSignature:
    """Verify a DER/BER ``ContentInfo(SignedData)``.

    ``content`` is the detached content, if any.  The signer certificate must be
    byte-equal to one of ``trusted_signers`` (pinning), or, when
    ``validate_signer`` is given, be accepted by it: it receives the signer
    certificate and the certificates carried in the message and raises
    :class:`SignerNotTrustedError` to refuse (path validation, e.g.
    :class:`gateway.cms.trust.TrustAnchors`).
    """
    parsed = _parse_signed_data(signed)
    return _verify_parsed(parsed, content, None, 0, trusted_signers, policy, validate_signer)


def parse_signature(signature: bytes) -> ParsedSignature:
    """Parse a DER/BER ``ContentInfo(SignedData)`` once, for :func:`signer_digests` and
    :func:`verify_digest` (which otherwise each parse it)."""
    return _parse_signed_data(signature)


def _parsed(signature: bytes | ParsedSignature) -> _ParsedSignedData:
    if isinstance(signature, _ParsedSignedData):
        return signature
    return _parse_signed_data(signature)


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
    validate_signer: Callable[[x509.Certificate, Sequence[x509.Certificate]], None] | None = None,
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
        parsed, None, digest_of, content_length, trusted_signers, policy, validate_signer
    )


def _content_for(parsed: _ParsedSignedData, content: bytes | None) -> bytes:
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
    parsed: _ParsedSignedData,
    content: bytes | None,
    digest_of: Callable[[str], bytes] | None,
    content_length: int,
    trusted_signers: Sequence[x509.Certificate],
    policy: AlgorithmPolicy,
    validate_signer: Callable[[x509.Certificate, Sequence[x509.Certificate]], None] | None,
) -> VerifiedSignature:
    """:func:`_verify_checked`, with any parse error deep in the structure made a clean refusal.

    asn1crypto parses nested values lazily, so a corrupted field (an issuer name,
    a signed attribute) can raise a bare ValueError long after the outer parse.
    """
    try:
        return _verify_checked(
            parsed, content, digest_of, content_length, trusted_signers, policy, validate_signer
        )
    except (ValueError, TypeError, KeyError, IndexError, OverflowError) as exc:
        raise MalformedMessageError(
            f"signed message is malformed: {exc}",
            fix="the message was altered or truncated in transit; ask the peer to resend",
        ) from exc


def _verify_checked(
    parsed: _ParsedSignedData,
    content: bytes | None,
    digest_of: Callable[[str], bytes] | None,
    content_length: int,
    trusted_signers: Sequence[x509.Certificate],
    policy: AlgorithmPolicy,
    validate_signer: Callable[[x509.Certificate, Sequence[x509.Certificate]], None] | None,
) -> VerifiedSignature:
    if digest_of is not None:
        data = b""
        source = _Content(None, digest_of, content_length)
    else:
        data = _content_for(parsed, content)
        source = _Content(data, None, len(data))
    trusted_der = {cert_der(c) for c in trusted_signers}
    # pinned certificates first: a signer is checked against the key we trust
    candidates = [*trusted_signers, *parsed.certificates]
    untrusted: list[str] = []
    missing: list[str] = []
    result: VerifiedSignature | None = None
    for signer in parsed.signers:
        cert = _find_cert(signer, candidates)
        if cert is None:
            missing.append(signer.describe())
            continue
        scheme = _verify_signer(signer, cert, parsed, source, policy)
        if cert_der(cert) not in trusted_der:
            if validate_signer is None:
                untrusted.append(cert_label(cert))
                continue
            validate_signer(cert, parsed.certificates)
        if result is None:
            st = signer.signing_time
            if isinstance(st, datetime) and st.tzinfo is None:
                st = st.replace(tzinfo=UTC)
            result = VerifiedSignature(
                signer=cert,
                digest=normalize_digest(signer.digest),
                signature_algorithm=scheme,
                signing_time=st,
                content=data,
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
