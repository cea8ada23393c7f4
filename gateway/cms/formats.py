"""Recognising how a CMS object was handed to us: DER/BER, PEM, base64, S/MIME.

Used by the admin tools, which take whatever a partner or ``openssl cms``
produced.  Detection is by content, never by file name.
"""

from __future__ import annotations

import base64
import binascii
import re
from dataclasses import dataclass

from ..errors import MalformedMessageError
from .mime import get_header, header_param, media_type, parse_entity

__all__ = ["Detected", "detect", "to_pem"]

_PEM = re.compile(rb"-----BEGIN ([A-Z0-9 ]+)-----\s*(.*?)\s*-----END \1-----", re.DOTALL)
_PEM_LABELS = (b"CMS", b"PKCS7", b"PKCS #7 SIGNED DATA")


@dataclass(frozen=True)
class Detected:
    """``format`` is ``der``, ``pem``, ``base64`` or ``smime``.

    ``der`` holds the CMS ContentInfo for the first three; for ``smime``,
    ``entity`` is the MIME entity (headers and body) and ``mime_type`` and
    ``smime_type`` describe it.
    """

    format: str
    der: bytes | None = None
    entity: bytes | None = None
    mime_type: str | None = None
    smime_type: str | None = None


def _b64(data: bytes, what: str) -> bytes:
    try:
        return base64.b64decode(b"".join(data.split()), validate=True)
    except (binascii.Error, ValueError) as exc:
        raise MalformedMessageError(
            f"{what} is not valid base64: {exc}",
            fix="pass the file as produced (DER, PEM or S/MIME), unmodified",
        ) from exc


def detect(data: bytes, what: str = "input") -> Detected:
    """Classify ``data``; raises :class:`MalformedMessageError` if it is none of the formats."""
    data = bytes(data)
    stripped = data.lstrip()
    if not stripped:
        raise MalformedMessageError(f"{what} is empty", fix="pass a CMS or S/MIME file")
    if data[:1] == b"\x30":
        return Detected("der", der=data)
    if stripped.startswith(b"-----BEGIN"):
        m = _PEM.search(stripped)
        if m is None or m.group(1) not in _PEM_LABELS:
            label = stripped[11 : stripped.find(b"-----", 11)].decode("latin-1")
            raise MalformedMessageError(
                f"{what} is PEM of type {label!r}, not a CMS object",
                fix="pass a '-----BEGIN CMS-----' or '-----BEGIN PKCS7-----' file",
            )
        return Detected("pem", der=_b64(m.group(2), what))
    head = data[:8192]
    if re.match(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+:", head):
        headers, _ = parse_entity(data)
        ctype = get_header(headers, "Content-Type")
        if ctype is None:
            raise MalformedMessageError(
                f"{what} looks like a MIME entity but has no Content-Type header",
                fix="pass the whole S/MIME message including its headers",
            )
        return Detected(
            "smime",
            entity=data,
            mime_type=media_type(ctype),
            smime_type=(header_param(ctype, "smime-type") or "").lower() or None,
        )
    return Detected("base64", der=_b64(data, what))


def to_pem(der: bytes) -> bytes:
    text = base64.encodebytes(der).replace(b"\n", b"\n")
    return b"-----BEGIN CMS-----\n" + text + b"-----END CMS-----\n"
