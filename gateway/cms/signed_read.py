"""Reading a received SignedData: the common shape read directly from its DER
(gateway.cms.der), within the bounds of gateway.cms.limits, with the same values
the asn1crypto reader (:mod:`gateway.cms.signed_parsed`) gives at a fraction of
its cost; any other shape, or one beyond a bound, has its counts checked
(:func:`~gateway.cms.contentinfo.check_signed_counts`) and is read with
asn1crypto."""

from __future__ import annotations

from datetime import UTC, datetime

from asn1crypto import algos, cms
from cryptography import x509

from .common import (
    OID_ALGORITHM_PROTECTION,
    OID_CONTENT_TYPE,
    OID_MESSAGE_DIGEST,
    OID_SIGNED_DATA_DER,
    OID_SIGNING_TIME,
)
from .contentinfo import check_signed_counts
from .der import Cursor, DerError, contents_of, integer, oid_der, oid_valid
from .limits import (
    MAX_ATTRIBUTE_VALUES,
    MAX_ATTRIBUTES,
    MAX_CERTIFICATES,
    MAX_DIGEST_ALGORITHMS,
    MAX_SIGNER_INFOS,
)
from .signed_parsed import Asn1Twin, DirectSigner, ParsedSignature, Signer, parse_signed_data_asn1

# the common shape, read directly (gateway.cms.der)
#
# Accepted: DER; one or more SignerInfos with an issuerAndSerialNumber or a
# subjectKeyIdentifier; digest and signature algorithms without parameters
# (or NULL), so not RSASSA-PSS; signed attributes whose contentType,
# messageDigest, signingTime (UTCTime or GeneralizedTime, seconds, Z) and
# CMSAlgorithmProtection (a copy of the signer info's algorithms) have one
# value each, others skipped as the asn1crypto path skips them; certificates
# only as X.509 certificates; no CRLs, no unsigned attributes; no more digest
# algorithms, certificates, signer infos, signed attributes or values of one
# attribute than gateway.cms.limits allows (the same counts check_signed_counts
# makes, so that a signature read here would pass it).  Anything else raises
# DerError and is read with asn1crypto, its counts checked first.


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
_OID_SIGNED_DATA = OID_SIGNED_DATA_DER[2:]
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


def _within(count: int, limit: int) -> None:
    """More than ``limit`` of something: left to the counting path, which refuses it."""
    if count > limit:
        raise DerError("more elements than gateway.cms.limits allows")


def _skip_elements(c: Cursor, limit: int) -> None:
    """Step over the elements left in ``c``, at most ``limit`` of them."""
    count = 0
    while not c.at_end():
        count += 1
        _within(count, limit)
        c.any()


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


def _signer_der(c: Cursor, index: int, twin: Asn1Twin) -> DirectSigner:
    s = DirectSigner(index, twin)
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
        count = 0
        while not a.at_end():
            count += 1
            _within(count, MAX_ATTRIBUTES)
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
                _skip_elements(attr.inner(0x31), MAX_ATTRIBUTE_VALUES)
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


def parse_signed_data_der(signed: bytes) -> ParsedSignature:
    ci = contents_of(signed, 0x30)
    if ci.value(0x06) != _OID_SIGNED_DATA:
        raise DerError("not SignedData")
    explicit = ci.inner(0xA0)
    ci.finish()
    sd = explicit.inner(0x30)
    explicit.finish()
    sd.next(0x02)  # version: not used
    # digestAlgorithms: not used (each signer names its own), but read as asn1crypto
    # reads them, so that a corrupted one gets its answer, not another
    digests = sd.inner(0x31)
    count = 0
    while not digests.at_end():
        count += 1
        _within(count, MAX_DIGEST_ALGORITHMS)
        _algorithm(digests, _DIGEST_NAMES)
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
            _within(len(certs) + 1, MAX_CERTIFICATES)
            try:
                certs.append(x509.load_der_x509_certificate(cc.raw(0x30)))
            except (ValueError, x509.InvalidVersion) as exc:
                raise DerError(f"certificate: {exc}") from None
    signer_infos = sd.inner(0x31)
    sd.finish()  # no CRLs
    twin = Asn1Twin(signed)
    signers: list[Signer] = []
    while not signer_infos.at_end():
        _within(len(signers) + 1, MAX_SIGNER_INFOS)
        signers.append(_signer_der(signer_infos.inner(0x30), len(signers), twin))
    if not signers:
        raise DerError("no SignerInfo")
    return ParsedSignature(content_type, content, tuple(certs), tuple(signers))


def parse_signed_data(signed: bytes) -> ParsedSignature:
    """The signature read directly if it has the common shape, within the bounds, else
    with asn1crypto; both give the same values, and a malformed signature the asn1crypto
    error.  The direct reader counts as it reads, and refuses (for the path below) what
    :func:`check_signed_counts` would; only the asn1crypto path needs the counts checked
    first, in a walk of their own."""
    if type(signed) is bytes:
        try:
            return parse_signed_data_der(signed)
        except DerError:
            pass
    if isinstance(signed, bytes | bytearray | memoryview) and len(signed):
        check_signed_counts(bytes(signed))
    return parse_signed_data_asn1(signed)
