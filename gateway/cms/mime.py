"""A minimal, byte-exact MIME entity helper.

The stdlib ``email`` package rewrites line endings and header folding, which
breaks signatures over binary and HL7 (bare CR) content.  These helpers never
touch the body bytes.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from ..errors import InvalidValueError, MalformedMessageError
from .limits import MAX_MIME_HEADERS, TooMany

__all__ = ["header_param", "make_entity", "parse_entity"]

_TOKEN = re.compile(r"^[!#$%&'*+\-.^_`|~0-9A-Za-z]+$")


def _check_header(name: str, value: str) -> None:
    if not _TOKEN.match(name):
        raise InvalidValueError(
            f"MIME header name {name!r} is not a valid token (RFC 2045)",
            fix="use letters, digits and -_. in header names",
        )
    if "\r" in value or "\n" in value or "\x00" in value:
        raise InvalidValueError(
            f"MIME header {name} value {value!r} contains CR, LF or NUL: it would end the header",
            fix="remove line breaks and NUL from the value",
        )
    if not value.isascii():
        raise InvalidValueError(
            f"MIME header {name} value {value!r} is not ASCII: MIME headers are ASCII",
            fix="encode the value (RFC 2231 for parameters) or use ASCII",
        )


def make_entity(content_type: str, body: bytes, headers: Sequence[tuple[str, str]] = ()) -> bytes:
    """``Content-Type: ...`` CRLF, extra headers, CRLF, then ``body`` unchanged.

    A ``Content-Transfer-Encoding: binary`` header is added unless ``headers``
    already has a Content-Transfer-Encoding.
    """
    _check_header("Content-Type", content_type)
    lines = [f"Content-Type: {content_type}"]
    has_cte = False
    for name, value in headers:
        _check_header(name, value)
        if name.lower() == "content-type":
            raise InvalidValueError(
                f"Content-Type {value!r} given in headers: the entity's type is its own argument",
                fix="pass the Content-Type as content_type, not in headers",
            )
        if name.lower() == "content-transfer-encoding":
            has_cte = True
        lines.append(f"{name}: {value}")
    if not has_cte:
        lines.append("Content-Transfer-Encoding: binary")
    head = "\r\n".join(lines) + "\r\n\r\n"
    return head.encode("ascii") + bytes(body)


def parse_entity(entity: bytes) -> tuple[list[tuple[str, str]], bytes]:
    """Split a MIME entity into unfolded headers and the exact body bytes.

    Header lines may end in CRLF or LF; the body starts after the first empty
    line.  An entity with headers only (no empty line at the end) has an empty
    body.
    """
    entity = bytes(entity)
    headers: list[tuple[str, str]] = []
    pos = 0
    n = len(entity)
    body_start = n
    while pos < n:
        nl = entity.find(b"\n", pos)
        end = n if nl < 0 else nl
        next_pos = n if nl < 0 else nl + 1
        line = entity[pos:end]
        if line.endswith(b"\r"):
            line = line[:-1]
        if not line:
            body_start = next_pos
            break
        text = line.decode("latin-1")
        if text[0] in " \t":
            if not headers:
                raise MalformedMessageError(
                    "MIME entity starts with a continuation line",
                    fix="the sender produced a broken MIME header",
                )
            name, value = headers[-1]
            headers[-1] = (name, (value + " " + text.strip()).strip())
        else:
            if len(headers) >= MAX_MIME_HEADERS:
                raise TooMany("MIME header lines", MAX_MIME_HEADERS)
            name, sep, value = text.partition(":")
            if not sep or not name or not _TOKEN.match(name):
                raise MalformedMessageError(
                    f"MIME header line {text[:60]!r} is not 'Name: value'",
                    fix="the sender produced a broken MIME header (or the body lacks the "
                    "empty line that separates it from the headers)",
                )
            headers.append((name, value.strip()))
        pos = next_pos
    return headers, entity[body_start:]


def _split_params(value: str) -> list[str]:
    """``value`` split at each ``;`` outside a quoted string (where a backslash
    escapes the next character); an unterminated quote runs to the end."""
    if '"' not in value:
        return value.split(";")
    parts: list[str] = []
    start = pos = 0
    while True:
        semi = value.find(";", pos)
        quote = value.find('"', pos)
        if quote < 0 or 0 <= semi < quote:
            if semi < 0:
                parts.append(value[start:])
                return parts
            parts.append(value[start:semi])
            start = pos = semi + 1
            continue
        pos = quote + 1  # inside the quoted string
        while True:
            close = value.find('"', pos)
            if close < 0:
                parts.append(value[start:])
                return parts
            escape = value.find("\\", pos, close)
            if escape < 0:
                pos = close + 1
                break
            pos = escape + 2


def _unquote(v: str) -> str:
    v = v.strip()
    if len(v) >= 2 and v[0] == '"' and v[-1] == '"':
        if "\\" not in v:  # nothing escaped (a boundary, a protocol): the text between
            return v[1:-1]
        out: list[str] = []
        escaped = False
        for ch in v[1:-1]:
            if escaped:
                out.append(ch)
                escaped = False
            elif ch == "\\":
                escaped = True
            else:
                out.append(ch)
        return "".join(out)
    return v


def header_param(value: str, name: str) -> str | None:
    """A parameter of a structured header value, e.g. ``boundary``; quoted or not."""
    want = name.strip().lower()
    for part in _split_params(value)[1:]:
        key, sep, val = part.partition("=")
        if sep and key.strip().lower() == want:
            return _unquote(val)
    return None


def media_type(value: str) -> str:
    """The lower-cased ``type/subtype`` of a Content-Type value."""
    semi = value.find(";")
    quote = value.find('"')
    if quote < 0 or 0 <= semi < quote:  # no quoted string before the first ";"
        return (value if semi < 0 else value[:semi]).strip().lower()
    return _split_params(value)[0].strip().lower()


def get_header(headers: Sequence[tuple[str, str]], name: str) -> str | None:
    """The first header called ``name`` (case-insensitive), or None."""
    want = name.lower()
    for k, v in headers:
        if k.lower() == want:
            return v
    return None
