"""AS2 header values: identifiers, Message-IDs, receipt options, MIC algorithm names."""

from __future__ import annotations

import re
import secrets
from collections.abc import Mapping
from dataclasses import dataclass

from gateway.errors import ProtocolError
from gateway.policy import DIGEST_TO_MICALG as DIGEST_TO_MICALG  # for AS2 headers

AS2_VERSION = "1.2"
# AS2 names for digests (RFC 5751 micalg) and ours.
MICALG_TO_DIGEST = {
    "sha-256": "sha256",
    "sha-384": "sha384",
    "sha-512": "sha512",
    "sha256": "sha256",
    "sha384": "sha384",
    "sha512": "sha512",
}
# A `medgw diagnose` test message: sent with this header and a file name of this
# shape; a receiver treats only a small document as a probe (verified, never delivered).
PROBE_HEADER = "X-Medgw-Probe"
PROBE_PREFIX = "medgw-diagnose-"
PROBE_SUFFIX = ".txt"
PROBE_MAX_BYTES = 4096
# RFC 4130 section 6.2: an AS2 name is 1-128 printable US-ASCII characters.  Only
# a name with a space, a double quote or a backslash is sent quoted (those two
# escaped); anything else goes as it is.  Quoting more (say every name that is
# not an HTTP token, like "JP/1310000001") is legal on the wire but not harmless:
# receivers echo the raw header into the MDN's Original-Recipient and look the
# original message up by it (pyas2lib does), quotes included.
_ATOMIC_AS2_NAME = re.compile(r"^[!#-\[\]-~]{1,128}$")


def quote_as2_id(value: str) -> str:
    """RFC 4130 section 6.2: quote an identifier only when it is not an atomic AS2 name."""
    if _ATOMIC_AS2_NAME.match(value):
        return value
    escaped = value.replace("\\", "\\\\").replace('"', '\\"')
    return f'"{escaped}"'


def unquote_as2_id(value: str) -> str:
    value = value.strip()
    if len(value) >= 2 and value[0] == value[-1] == '"':
        return re.sub(r"\\(.)", r"\1", value[1:-1])
    return value


def new_message_id(as2_id: str) -> str:
    host = re.sub(r"[^A-Za-z0-9.-]", "-", as2_id) or "medgw"
    return f"<{secrets.token_hex(16)}@{host}>"


# RFC 4130 section 5.3.3: the value is "<" id-left "@" id-right ">", at most 998
# characters; "angle brackets are not part of the Message-Id value" and "when
# receiving a message, do not check for angle brackets" (IBM Sterling B2B
# Integrator sends none).  An Original-Message-ID always carries them.  Printable
# US-ASCII only (RFC 5322 msg-id): the id is stored, logged and echoed in receipts.
_MESSAGE_ID_VALUE = re.compile(r"^[!-;=?-~]{1,996}$")


def normalize_message_id(value: str) -> str | None:
    """``value`` as ``<id>``, with or without the brackets it came with; None if it is no id."""
    value = value.strip()
    if value.startswith("<") and value.endswith(">"):
        value = value[1:-1].strip()
    return f"<{value}>" if _MESSAGE_ID_VALUE.match(value) else None


def undecodable_header(headers: Mapping[str, str]) -> str | None:
    """The name of the first header whose value holds bytes that are not UTF-8, if any.

    aiohttp keeps such bytes as lone surrogates (``surrogateescape``): any later
    encoding of the value (a log line, the spool, a receipt) would fail, so the
    request is refused before anything reads it.  AS2 headers are US-ASCII.
    """
    for name, value in headers.items():
        try:
            value.encode()
            name.encode()
        except UnicodeEncodeError:
            return name.encode(errors="backslashreplace").decode()[:80]
    return None


def check_message_id(value: str | None) -> str:
    """The received Message-ID in its canonical ``<id>`` form; raises if missing or malformed."""
    normalized = normalize_message_id(value) if value is not None else None
    if normalized is None:
        raise ProtocolError(
            f"Message-ID {value if value is None else value[:120]!r} is missing or malformed",
            fix="the sender must give a Message-ID such as <id@host> (at most 998 characters, "
            "no spaces)",
        )
    return normalized


@dataclass(frozen=True)
class ReceiptRequest:
    """What the sender asked for in Disposition-Notification-To / -Options."""

    requested: bool
    signed: bool
    micalgs: tuple[str, ...]  # our digest names, in the sender's order of preference
    async_url: str | None

    def choose_digest(self, default: str = "sha256") -> str:
        return self.micalgs[0] if self.micalgs else default


def parse_receipt_request(headers: Mapping[str, str]) -> ReceiptRequest:
    requested = "disposition-notification-to" in headers
    options = headers.get("disposition-notification-options", "")
    signed = False
    micalgs: list[str] = []
    for part in options.split(";"):
        name, _, values = part.partition("=")
        items = [v.strip().lower() for v in values.split(",")]
        if name.strip().lower() == "signed-receipt-protocol" and "pkcs7-signature" in items:
            signed = True
        elif name.strip().lower() == "signed-receipt-micalg":
            micalgs = [MICALG_TO_DIGEST[i] for i in items[1:] if i in MICALG_TO_DIGEST]
    return ReceiptRequest(requested, signed, tuple(micalgs), headers.get("receipt-delivery-option"))
