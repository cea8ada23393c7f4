"""AS2 receipts: Message Disposition Notifications (RFC 8098, RFC 4130 section 7).

A receipt is a ``multipart/report; report-type=disposition-notification`` with
a human-readable part and a ``message/disposition-notification`` part, signed
as ``multipart/signed``.  It carries the original Message-ID, the disposition
(``processed`` or ``processed/error: <reason>`` or ``failed``) and the
Received-Content-MIC.  On the sender's side a receipt whose signature, MIC or
Message-ID does not match is never taken for success.
"""

from __future__ import annotations

import quopri
import secrets
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from email.utils import format_datetime
from enum import StrEnum

from cryptography import x509

from gateway.as2.headers import (
    AS2_VERSION,
    DIGEST_TO_MICALG,
    normalize_message_id,
    quote_as2_id,
    unquote_as2_id,
)
from gateway.cms.limits import MAX_REPORT_PARTS
from gateway.cms.mime import header_param, make_entity, media_type, parse_entity
from gateway.cms.smime import sign_entity, verify_entity, verify_multipart_signed
from gateway.errors import ProtocolError
from gateway.pki.keypair import KeyPair
from gateway.policy import COMPAT_DIGESTS, AlgorithmPolicy, normalize_digest

DISPOSITION_PREFIX = "automatic-action/MDN-sent-automatically"


class Disposition(StrEnum):
    PROCESSED = "processed"
    DECRYPTION_FAILED = "processed/error: decryption-failed"
    AUTHENTICATION_FAILED = "processed/error: authentication-failed"
    INTEGRITY_CHECK_FAILED = "processed/error: integrity-check-failed"
    UNEXPECTED_ERROR = "processed/error: unexpected-processing-error"


EXPLANATIONS = {
    Disposition.PROCESSED: "The document was received, decrypted, its signature verified, "
    "and it was stored for delivery.",
    Disposition.DECRYPTION_FAILED: "The document could not be decrypted by the receiver.",
    Disposition.AUTHENTICATION_FAILED: "The sender or the signer could not be authenticated.",
    Disposition.INTEGRITY_CHECK_FAILED: "The document does not match its signature.",
    Disposition.UNEXPECTED_ERROR: "The receiver could not process the document.",
}


@dataclass(frozen=True)
class BuiltReceipt:
    headers: tuple[tuple[str, str], ...]  # HTTP headers, Content-Type included
    body: bytes


def _next_delimiter(data: bytes, delimiter: bytes, start: int) -> tuple[int, int] | None:
    """The next delimiter line at or after ``start``: (where its line break starts, its end).

    RFC 2046 5.1.1: the line break before a delimiter belongs to the delimiter.
    It is CRLF, or a bare LF in a capture whose line ends were converted; it is
    decided for each delimiter, since one body can hold both (Sterling's does).
    """
    pos = start
    while True:
        j = data.find(b"\n" + delimiter, pos)
        if j < 0:
            return None
        end = j + 1 + len(delimiter)
        tail = data[end : end + 2]
        if tail[:1] in (b"", b"\r", b"\n", b" ", b"\t") or tail == b"--":
            return (j - 1 if data[j - 1 : j] == b"\r" else j), end
        pos = j + 1


def split_multipart(body: bytes, boundary: str, *, most: int = MAX_REPORT_PARTS) -> list[bytes]:
    """The parts of a multipart body (RFC 2046 5.1.1), each without its delimiter line
    breaks; ProtocolError if there are more than ``most``."""
    delimiter = b"--" + boundary.encode()
    data = b"\n" + body  # the first delimiter may open the body
    found = _next_delimiter(data, delimiter, 0)
    if found is None:
        raise ProtocolError(
            f"multipart body has no boundary {boundary!r}",
            fix="the sender's MIME structure is broken",
        )
    parts: list[bytes] = []
    _, after = found
    while True:
        if data[after : after + 2] == b"--":
            return parts
        line_end = data.find(b"\n", after)
        if line_end < 0:
            raise ProtocolError(
                "multipart body ends inside a delimiter line",
                fix="the sender's MIME structure is broken",
            )
        found = _next_delimiter(data, delimiter, line_end)
        if found is None:
            raise ProtocolError(
                "multipart body has no closing boundary",
                fix="the sender's MIME structure is truncated",
            )
        part_end, after = found
        if len(parts) == most:
            raise ProtocolError(
                f"multipart body has more than {most} parts",
                fix="the sender's MIME structure is not a receipt's",
            )
        parts.append(data[line_end + 1 : max(part_end, line_end + 1)])


def build_receipt(
    *,
    original_message_id: str,
    our_as2_id: str,
    peer_as2_id: str,
    disposition: Disposition,
    mic: str | None,
    signing: KeyPair,
    digest: str,
    policy: AlgorithmPolicy,
    at: datetime,
    details: str | None = None,
) -> BuiltReceipt:
    """A signed receipt.  ``details``: a further line for its human-readable part
    (e.g. who signed the document); non-ASCII text goes as UTF-8, quoted-printable."""
    fields = [
        "Reporting-UA: medgw",
        f"Original-Recipient: rfc822; {quote_as2_id(our_as2_id)}",
        f"Final-Recipient: rfc822; {quote_as2_id(our_as2_id)}",
        f"Original-Message-ID: {original_message_id}",
    ]
    if mic is not None:
        fields.append(f"Received-Content-MIC: {mic}")
    fields.append(f"Disposition: {DISPOSITION_PREFIX}; {disposition.value}")
    notification = ("\r\n".join(fields) + "\r\n").encode()
    boundary = "----=_mdn_" + secrets.token_hex(12)
    text = EXPLANATIONS[disposition] + "\r\n"
    if details:
        text += " ".join(details.split()) + "\r\n"  # one line: no header or boundary injection
    if text.isascii():
        human = make_entity(
            "text/plain; charset=us-ascii",
            text.encode(),
            [("Content-Transfer-Encoding", "7bit")],
        )
    else:
        human = make_entity(
            "text/plain; charset=utf-8",
            quopri.encodestring(text.replace("\r\n", "\n").encode()).replace(b"\n", b"\r\n"),
            [("Content-Transfer-Encoding", "quoted-printable")],
        )
    machine = make_entity(
        "message/disposition-notification", notification, [("Content-Transfer-Encoding", "7bit")]
    )
    report_body = (
        f"--{boundary}\r\n".encode()
        + human
        + f"\r\n--{boundary}\r\n".encode()
        + machine
        + f"\r\n--{boundary}--\r\n".encode()
    )
    report = make_entity(
        f'multipart/report; report-type=disposition-notification; boundary="{boundary}"',
        report_body,
    )
    signed = sign_entity(
        report,
        signing.certificate,
        signing.key,
        digest=digest,
        signing_time=at,
        policy=policy,
        certificates=signing.chain,
    )
    entity_headers, body = parse_entity(signed)
    headers = [
        ("AS2-Version", AS2_VERSION),
        ("AS2-From", quote_as2_id(our_as2_id)),
        ("AS2-To", quote_as2_id(peer_as2_id)),
        ("Message-ID", f"<mdn-{secrets.token_hex(16)}@medgw>"),
        ("Date", format_datetime(at, usegmt=True)),
        ("MIME-Version", "1.0"),
        *[(k, v) for k, v in entity_headers if k.lower() == "content-type"],
    ]
    return BuiltReceipt(tuple(headers), body)


@dataclass(frozen=True)
class Report:
    """What a ``multipart/report; report-type=disposition-notification`` says (RFC 8098)."""

    original_message_id: str | None  # canonical "<id>" form (RFC 4130 section 5.3.3)
    disposition: str  # the text after "automatic-action/...; "
    mic: str | None
    final_recipient: str | None  # the AS2 name after "rfc822;", unquoted


@dataclass(frozen=True)
class Receipt:
    """A verified receipt.  ``compat_algorithms``: the monitored-list algorithms it
    used (``sha1`` for its signature or its MIC), accepted only because the peer's
    ``accept_legacy`` names them; the caller audits each as a warning."""

    original_message_id: str | None
    disposition: str  # the text after "automatic-action/...; "
    mic: str | None
    signer: x509.Certificate
    signing_digest: str
    compat_algorithms: tuple[str, ...] = ()

    @property
    def processed(self) -> bool:
        return self.disposition.strip().lower() == "processed"

    @property
    def duplicate_warning(self) -> bool:
        """``processed/warning: duplicate-document``: the peer already has this message."""
        text = self.disposition.strip().lower().replace(" ", "")
        return text.startswith("processed/warning:") and "duplicate" in text


def _fields(block: bytes) -> dict[str, str]:
    result: dict[str, str] = {}
    current = ""
    for raw in block.decode("utf-8", "replace").splitlines():
        if raw[:1] in (" ", "\t") and current:
            result[current] += " " + raw.strip()
            continue
        name, sep, value = raw.partition(":")
        if sep:
            current = name.strip().lower()
            result[current] = value.strip()
    return result


def read_report(entity: bytes) -> Report:
    """Read the disposition of a report entity (headers included); it is *not* verified here.

    :func:`parse_receipt` calls this only on what a trusted signature covers.
    """
    report_headers, report_body = parse_entity(entity)
    report_type = dict((k.lower(), v) for k, v in report_headers).get("content-type", "")
    boundary = header_param(report_type, "boundary")
    if not report_type.lower().startswith("multipart/report") or not boundary:
        raise ProtocolError(
            f"receipt content is {report_type!r}, not multipart/report",
            fix="the peer's receipt does not follow RFC 8098",
        )
    for part in split_multipart(report_body, boundary):
        part_headers, part_body = parse_entity(part)
        part_type = dict((k.lower(), v) for k, v in part_headers).get("content-type", "")
        if part_type.lower().startswith("message/disposition-notification"):
            fields = _fields(part_body)
            disposition = fields.get("disposition", "")
            _, _, action = disposition.partition(";")
            original = fields.get("original-message-id")
            recipient = fields.get("final-recipient") or fields.get("original-recipient")
            _, _, address = (recipient or "").partition(";")
            return Report(
                # Compared with what we sent; the brackets are not part of the value.
                original_message_id=(
                    normalize_message_id(original) or original if original is not None else None
                ),
                disposition=action.strip() or disposition,
                mic=fields.get("received-content-mic"),
                final_recipient=unquote_as2_id(address) if recipient else None,
            )
    raise ProtocolError(
        "the receipt has no message/disposition-notification part",
        fix="the peer's receipt does not follow RFC 8098",
    )


def parse_receipt(
    content_type: str,
    body: bytes,
    *,
    trusted_signers: Sequence[x509.Certificate],
    policy: AlgorithmPolicy,
) -> Receipt:
    """Verify a signed receipt and read its disposition; raises on anything unsigned or broken."""
    if not content_type.lower().startswith("multipart/signed"):
        raise ProtocolError(
            f"the receipt is not signed (Content-Type {content_type.split(';')[0]!r})",
            fix="the peer must send signed receipts (signed-receipt-protocol=pkcs7-signature)",
        )
    try:
        head = f"Content-Type: {content_type}\r\n\r\n".encode("ascii")
    except UnicodeEncodeError as exc:
        raise ProtocolError(
            "the receipt's Content-Type holds characters that are not US-ASCII",
            fix="the peer's AS2 product sent a broken receipt header; ask the peer to fix it",
        ) from exc
    ctype = content_type.strip()
    if "\r" in ctype or "\n" in ctype or media_type(ctype) != "multipart/signed":
        # what the entity's own reading makes of it (and the error it gives)
        inner, verified = verify_entity(head + body, trusted_signers=trusted_signers, policy=policy)
    else:  # the body as it is: not copied behind its header to be split off again
        inner, verified = verify_multipart_signed(
            ctype, bytes(body), trusted_signers=trusted_signers, policy=policy
        )
    report = read_report(inner)
    compat = list(verified.compat_algorithms)
    if report.mic is not None:
        mic_digest = normalize_digest(report.mic.partition(",")[2])
        if mic_digest in COMPAT_DIGESTS:
            # The peer's MIC of what we sent: SHA-1 is read only if accept_legacy names it.
            policy.check_digest(report.mic.partition(",")[2].strip(), inbound=True)
            compat.append(mic_digest)
    return Receipt(
        original_message_id=report.original_message_id,
        disposition=report.disposition,
        mic=report.mic,
        signer=verified.signer,
        signing_digest=verified.digest,
        compat_algorithms=tuple(dict.fromkeys(compat)),
    )


def mic_matches(expected: str, received: str | None) -> bool:
    """Compare "<base64>, <alg>" values; the algorithm names are compared loosely."""
    if not received:
        return False
    exp_value, _, exp_alg = expected.partition(",")
    got_value, _, got_alg = received.partition(",")
    exp_alg = DIGEST_TO_MICALG.get(exp_alg.strip().lower(), exp_alg.strip().lower())
    got_alg = DIGEST_TO_MICALG.get(got_alg.strip().lower(), got_alg.strip().lower())
    return exp_value.strip() == got_value.strip() and exp_alg == got_alg


__all__ = [
    "DIGEST_TO_MICALG",
    "BuiltReceipt",
    "Disposition",
    "Receipt",
    "Report",
    "build_receipt",
    "mic_matches",
    "parse_receipt",
    "read_report",
    "split_multipart",
]
