"""Asynchronous receipts (RFC 4130 section 7.3): the pure decisions.

A sender may ask for its receipt to be POSTed back later
(``Receipt-Delivery-Option: <url>``) instead of in the HTTP response.  The
receiver then answers the message at once with an empty 200 and delivers the
signed MDN to that URL in a separate request.  Two rules keep that safe:

* the receipt goes only to the sender's own gateway: the URL must be https
  and name the same host and port as the peer's configured URL (a peer can
  not make us send requests to arbitrary hosts), else the receipt is sent
  synchronously as if no option had been given;
* an incoming request is a receipt, not a document, when it carries a
  disposition-notification report and asks for no receipt itself.
"""

from __future__ import annotations

from collections.abc import Mapping
from urllib.parse import urlsplit

REPORT = "multipart/report"
SIGNED = "multipart/signed"


def _origin(url: str) -> tuple[str, str, int] | None:
    try:
        parts = urlsplit(url.strip())
        port = parts.port or (443 if parts.scheme == "https" else 80)
    except ValueError:
        return None
    if not parts.hostname:
        return None
    return parts.scheme.lower(), parts.hostname.lower(), port


def async_receipt_url(requested: str | None, peer_url: str) -> str | None:
    """The URL to POST the receipt to, or None to answer synchronously."""
    if not requested:
        return None
    origin = _origin(requested)
    if origin is None or origin[0] != "https" or origin != _origin(peer_url):
        return None
    return requested.strip()


def is_receipt(headers: Mapping[str, str]) -> bool:
    """An AS2 request that delivers a receipt (lower-case header names)."""
    if "disposition-notification-to" in headers:
        return False  # it asks for a receipt, so it is a message
    content_type = headers.get("content-type", "").split(";")[0].strip().lower()
    # Messages to this gateway are always encrypted (application/pkcs7-mime): a
    # signed or plain report that asks for no receipt can only be a receipt.
    return content_type in (REPORT, SIGNED)
