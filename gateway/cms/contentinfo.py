"""A received ContentInfo loaded: a SignedData's counts bounded before anything is
built from it (DER or BER), and OCTET STRING segments joined."""

from __future__ import annotations

import contextlib
import itertools
from typing import Any

from asn1crypto import cms

from ..errors import InvalidTypeError, MalformedMessageError
from .common import ASN1_ERRORS, OID_SIGNED_DATA_DER
from .der import DerError, children, count_children, joined_octet_strings
from .limits import (
    MAX_ATTRIBUTE_VALUES,
    MAX_ATTRIBUTES,
    MAX_CERTIFICATES,
    MAX_CRLS,
    MAX_DIGEST_ALGORITHMS,
    MAX_SIGNER_INFOS,
    check_count,
)


def load_content_info(data: bytes, what: str) -> Any:
    """Parse a DER/BER ContentInfo; :class:`MalformedMessageError` if it is not one.

    A SignedData's counts are checked first (:func:`check_signed_counts`), and OCTET
    STRING segments joined (:func:`~gateway.cms.der.joined_octet_strings`): asn1crypto
    would build an object for every segment and every element."""
    if not isinstance(data, bytes | bytearray | memoryview):
        raise InvalidTypeError(
            f"{what} is a {type(data).__name__}: a CMS ContentInfo is read from bytes",
            fix="pass the DER or BER bytes (decode base64 first)",
        )
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


def check_signed_counts(signed: bytes, what: str = "signed message") -> None:
    """Refuse (:class:`~gateway.cms.limits.TooMany`) a ContentInfo(SignedData), DER
    or BER, with more digest algorithms, certificates, CRLs, signer infos or
    attributes than any real message carries; nothing is built from them first.

    Only the containers counted are walked; a malformed one is refused here too.
    Another content type is left to the reader, which names it.
    """
    try:
        ci = list(itertools.islice(children(signed), 3))
        if len(ci) != 2 or ci[1][0] != 0xA0 or signed[ci[0][1] : ci[0][2]] != OID_SIGNED_DATA_DER:
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
