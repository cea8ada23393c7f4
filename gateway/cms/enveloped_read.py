"""A received EnvelopedData or AuthEnvelopedData read: the common DER shapes directly
(gateway.cms.der), their recipient infos bounded in number; anything else is left
to asn1crypto."""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Any

from asn1crypto import algos, cms, keys

from ..errors import MalformedMessageError
from ..policy import DIGESTS
from .der import Cursor, DerError, children, contents_of, count_children, integer, oid_der
from .envelope_algorithms import (
    CIPHER_BY_OID_NAME,
    CIPHERS,
    KDF_SCHEMES,
    OID_AUTH_ENVELOPED,
    OID_ENVELOPED,
    WRAP_KEYLEN,
    GcmParams,
)
from .limits import MAX_RECIPIENT_INFOS, MAX_RECIPIENT_KEYS, check_count


@dataclass
class ParsedEnvelope:
    kind: str  # "enveloped_data" | "authenticated_enveloped_data"
    recipient_infos: Any
    cipher_oid_name: str
    cipher_params: Any
    encrypted_content: bytes
    mac: bytes | None
    auth_attrs_der: bytes | None


# ---------------------------------------------------------------------------
# the common shapes, read directly (gateway.cms.der)
#
# Accepted: DER ContentInfo with EnvelopedData (AES-CBC, 3DES-CBC) or
# AuthEnvelopedData (AES-GCM) without originatorInfo, authenticated or
# unprotected attributes, the encrypted content inside as one primitive
# OCTET STRING; recipients: KeyTransRecipientInfo with RSAES-OAEP (SHA-2 hash
# and MGF1 given explicitly, no label) and KeyAgreeRecipientInfo with
# ephemeral-static ECDH (SHA-2 X9.63 KDF, AES key wrap), each recipient named
# by issuerAndSerialNumber or subjectKeyIdentifier.  Anything else raises
# DerError and is read with asn1crypto; so are our recipient infos when they
# name our certificate other than by exactly its bytes.


def _oid_contents(dotted: str) -> bytes:
    return oid_der(dotted)[2:]


_KINDS = {
    _oid_contents(OID_ENVELOPED): "enveloped_data",
    _oid_contents(OID_AUTH_ENVELOPED): "authenticated_enveloped_data",
}
_CONTENT_CIPHERS_BY_OID: dict[bytes, str] = {
    _oid_contents(dotted): name
    for dotted, name in algos.EncryptionAlgorithmId._map.items()
    if name in CIPHER_BY_OID_NAME
}
_SHA2: dict[bytes, str] = {
    _oid_contents(d): n for d, n in algos.DigestAlgorithmId._map.items() if n in DIGESTS
}
_OID_RSAES_OAEP = _oid_contents("1.2.840.113549.1.1.7")
_OID_MGF1 = _oid_contents("1.2.840.113549.1.1.8")
_OID_EC_PUBLIC_KEY = _oid_contents("1.2.840.10045.2.1")
_CURVES: dict[bytes, str] = {_oid_contents(d): n for d, n in keys.NamedCurve._map.items()}
_KDF_SHA2: dict[bytes, str] = {_oid_contents(d): h for d, h in KDF_SCHEMES.items() if h in DIGESTS}
_WRAPS: dict[bytes, int] = {
    _oid_contents(d): WRAP_KEYLEN[n]
    for d, n in cms.KeyEncryptionAlgorithmId._map.items()
    if n in WRAP_KEYLEN
}
_NULL = b"\x05\x00"


@dataclass(frozen=True)
class Rid:
    issuer_der: bytes | None  # issuerAndSerialNumber, or
    serial: int
    ski: bytes | None  # subjectKeyIdentifier


@dataclass(frozen=True)
class DirectKtri:
    rid: Rid
    hash_name: str
    mgf_hash_name: str
    encrypted_key: bytes


@dataclass(frozen=True)
class _DirectKari:
    kdf_digest: str
    wrap_der: bytes
    kek_len: int
    curve: str | None
    point: bytes
    ukm: bytes | None
    keys: tuple[tuple[Rid, bytes], ...]


@dataclass(frozen=True)
class DirectRecipients:
    der: bytes  # the RecipientInfos as received
    infos: tuple[DirectKtri | _DirectKari, ...]


def _sha2_algorithm(c: Cursor) -> str:
    """A SHA-2 AlgorithmIdentifier, parameters absent or NULL."""
    alg = c.inner(0x30)
    name = _SHA2.get(alg.value(0x06))
    if name is None:
        raise DerError("not a SHA-2 digest")
    if not alg.at_end() and alg.raw(0x05) != _NULL:
        raise DerError("NULL with contents")
    alg.finish()
    return name


def _rid(c: Cursor, ski_tag: int) -> Rid:
    tag = c.peek()
    if tag == 0x30:
        ias = c.inner(0x30)
        issuer = ias.raw(0x30)
        start, stop = ias.next(0x02)
        serial = integer(ias.buf, start, stop)
        ias.finish()
        return Rid(issuer, serial, None)
    if tag == ski_tag and ski_tag == 0x80:
        return Rid(None, 0, c.value(0x80))
    raise DerError("a recipient identifier the direct reader does not read")


def _direct_ktri(c: Cursor) -> DirectKtri:
    c.next(0x02)  # version: not used
    rid = _rid(c, 0x80)
    alg = c.inner(0x30)
    if alg.value(0x06) != _OID_RSAES_OAEP:
        raise DerError("key transport other than RSAES-OAEP")
    params = alg.inner(0x30)
    alg.finish()
    explicit = params.inner(0xA0)
    hash_name = _sha2_algorithm(explicit)
    explicit.finish()
    explicit = params.inner(0xA1)
    mgf = explicit.inner(0x30)
    explicit.finish()
    if mgf.value(0x06) != _OID_MGF1:
        raise DerError("mask generation other than MGF1")
    mgf_hash_name = _sha2_algorithm(mgf)
    mgf.finish()
    params.finish()  # pSourceAlgorithm: the default, an empty label
    encrypted_key = c.value(0x04)
    c.finish()
    return DirectKtri(rid, hash_name, mgf_hash_name, encrypted_key)


def _direct_kari(c: Cursor) -> _DirectKari:
    c.next(0x02)  # version: not used
    originator = c.inner(0xA0)
    spki = originator.inner(0xA1)  # originatorKey
    originator.finish()
    alg = spki.inner(0x30)
    if alg.value(0x06) != _OID_EC_PUBLIC_KEY:
        raise DerError("originator key is not an EC key")
    curve: str | None = None
    tag = alg.peek()
    if tag == 0x06:
        curve = _CURVES.get(alg.value(0x06))
        if curve is None:
            raise DerError("unknown named curve")
    elif tag != -1 and alg.raw(0x05) != _NULL:
        raise DerError("EC parameters other than a named curve")
    alg.finish()
    bits = spki.value(0x03)
    spki.finish()
    if len(bits) < 2 or bits[0] != 0:
        raise DerError("originator public key with unused bits")
    ukm: bytes | None = None
    if c.peek() == 0xA1:
        explicit = c.inner(0xA1)
        ukm = explicit.value(0x04)
        explicit.finish()
    kea = c.inner(0x30)
    kdf_digest = _KDF_SHA2.get(kea.value(0x06))
    if kdf_digest is None:
        raise DerError("key agreement other than ECDH with a SHA-2 KDF")
    wrap_start = kea.pos
    wrap = kea.inner(0x30)
    kek_len = _WRAPS.get(wrap.value(0x06))
    if kek_len is None:
        raise DerError("key wrap other than AES key wrap")
    wrap.finish()
    wrap_der = kea.buf[wrap_start : kea.pos]
    kea.finish()
    reks = c.inner(0x30)
    keys_: list[tuple[Rid, bytes]] = []
    while not reks.at_end():
        rek = reks.inner(0x30)
        rid = _rid(rek, -1)  # rKeyId: read with asn1crypto
        keys_.append((rid, rek.value(0x04)))
        rek.finish()
    c.finish()
    return _DirectKari(kdf_digest, wrap_der, kek_len, curve, bits[1:], ukm, tuple(keys_))


def check_recipient_counts(ri_der: bytes) -> None:
    """Refuse (:class:`~gateway.cms.limits.TooMany`) RecipientInfos (DER or BER) with
    more recipient infos, or a key agreement with more recipient keys, than any real
    message carries; nothing is built from them first."""
    try:
        for count, (tag, start, _stop) in enumerate(children(ri_der), 1):
            check_count(count, MAX_RECIPIENT_INFOS, "recipient infos")
            if tag == 0xA1:  # KeyAgreeRecipientInfo: its recipientEncryptedKeys come last
                fields = list(itertools.islice(children(ri_der, start), 6))
                if fields and fields[-1][0] == 0x30:
                    count_children(
                        ri_der, fields[-1][1], MAX_RECIPIENT_KEYS, "keys in a key agreement"
                    )
    except DerError as exc:
        raise MalformedMessageError(
            f"encrypted message has a malformed RecipientInfo: {exc.detail}",
            fix="check that the message was not truncated or altered in transit",
        ) from None


def direct_recipients(ri_der: bytes) -> DirectRecipients | None:
    """RecipientInfos (a whole SET element) read directly, or None if it is not of
    the common shapes (then read it with asn1crypto).  Check their counts first
    (:func:`check_recipient_counts`)."""
    try:
        c = contents_of(ri_der, 0x31)
        infos: list[DirectKtri | _DirectKari] = []
        while not c.at_end():
            tag = c.peek()
            if tag == 0x30:
                infos.append(_direct_ktri(c.inner(0x30)))
            elif tag == 0xA1:
                infos.append(_direct_kari(c.inner(0xA1)))
            else:
                raise DerError("a recipient info the direct reader does not read")
    except DerError:
        return None
    return DirectRecipients(ri_der, tuple(infos))


def content_algorithm_direct(c: Cursor, kind: str) -> tuple[str, GcmParams | bytes]:
    """(asn1crypto name, parameters) of a contentEncryptionAlgorithm: AES-GCM in
    AuthEnvelopedData, a CBC cipher with its IV in EnvelopedData."""
    alg = c.inner(0x30)
    oid_name = _CONTENT_CIPHERS_BY_OID.get(alg.value(0x06))
    if oid_name is None:
        raise DerError("a content cipher the direct reader does not read")
    mode = CIPHERS[CIPHER_BY_OID_NAME[oid_name]][2]
    params: GcmParams | bytes
    if mode == "gcm":
        if kind != "authenticated_enveloped_data":
            raise DerError("GCM outside AuthEnvelopedData")
        p = alg.inner(0x30)
        nonce = p.value(0x04)
        icvlen = 12
        if not p.at_end():
            start, stop = p.next(0x02)
            icvlen = integer(p.buf, start, stop)
        p.finish()
        params = GcmParams(nonce, icvlen)
    else:
        if kind != "enveloped_data":
            raise DerError("CBC inside AuthEnvelopedData")
        params = alg.value(0x04)
    alg.finish()
    return oid_name, params


def parse_enveloped_der(enveloped: bytes) -> ParsedEnvelope:
    ci = contents_of(enveloped, 0x30)
    kind = _KINDS.get(ci.value(0x06))
    if kind is None:
        raise DerError("not EnvelopedData or AuthEnvelopedData")
    explicit = ci.inner(0xA0)
    ci.finish()
    body = explicit.inner(0x30)
    explicit.finish()
    body.next(0x02)  # version: not used
    ri_der = body.raw(0x31)  # no originatorInfo
    check_recipient_counts(ri_der)
    recipients = direct_recipients(ri_der)
    if recipients is None:
        raise DerError("recipient infos of another shape")
    eci = body.inner(0x30)
    eci.next(0x06)  # content type: not used
    oid_name, params = content_algorithm_direct(eci, kind)
    encrypted = eci.value(0x80)
    eci.finish()
    mac = body.value(0x04) if kind == "authenticated_enveloped_data" else None
    body.finish()  # no authenticated, unauthenticated or unprotected attributes
    return ParsedEnvelope(kind, recipients, oid_name, params, encrypted, mac, None)
