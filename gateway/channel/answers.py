"""Every answer a peer's AS2 request can get, in one place.

Whatever decides the outcome of a request (the AS2 handler of the daemon, the
inbound pipeline) names one of these kinds; the HTTP status, the text, the
headers, and the audit event type and severity of a refusal come from the table
below and nowhere else.  So a peer learns the same from every failure of one
kind, and an administrator finds each refusal under one event type.

A document the gateway could read is always answered 200 with a signed receipt
(:attr:`Answer.RECEIPT`), whose disposition says which check failed: those
outcomes are audited by the inbound pipeline with the event type of the check.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from enum import Enum
from types import MappingProxyType
from typing import Any

from aiohttp import web

from gateway.audit import AuditEvent, EventType, Outcome, Severity

TEXT = "text/plain; charset=utf-8"


class Answer(Enum):
    """The kinds of answer; :data:`ANSWERS` holds what each one is."""

    # A receipt (synchronous MDN) in the body, whatever its disposition.
    RECEIPT = "receipt"
    # The sender asked for its receipt later (asynchronous MDN): an empty 200.
    RECEIPT_LATER = "receipt-later"
    # An asynchronous receipt for one of our messages was taken.
    RECEIPT_TAKEN = "receipt-taken"
    # Refusals: no receipt, the request is not processed.
    UNKNOWN_CERTIFICATE = "unknown-certificate"
    PINNED_KEY_REFUSED = "pinned-key-refused"
    WRONG_ZONE = "wrong-zone"
    SUSPENDED = "suspended"
    UNDECODABLE_HEADER = "undecodable-header"
    UNDECODABLE_RECEIPT_HEADER = "undecodable-receipt-header"
    BAD_MESSAGE_ID = "bad-message-id"
    TOO_LARGE = "too-large"
    TOO_SLOW = "too-slow"
    INCOMPLETE = "incomplete"
    TRUST_CHANGED = "trust-changed"
    UNAVAILABLE = "unavailable"
    RECEIPT_NOT_BUILT = "receipt-not-built"
    INTERNAL_ERROR = "internal-error"


@dataclass(frozen=True)
class Rule:
    """What one kind of answer is."""

    status: int
    text: str  # the body of a refusal: the same for every request of the kind
    # The audit event type of a refusal (None: only logged, as nothing is wrong with the
    # request: the peer hung up, or the trust changed while it was uploading).
    event: EventType | None = None
    severity: Severity = Severity.ALERT
    retry_after: int | None = None  # seconds, for a 503
    close: bool = False  # the connection is closed after the answer (its body was not read)

    def headers(self) -> tuple[tuple[str, str], ...]:
        found = [("Content-Type", TEXT)]
        if self.retry_after is not None:
            found.append(("Retry-After", str(self.retry_after)))
        return tuple(found)


_FORBIDDEN = "forbidden\n"
_BAD_REQUEST = "bad request\n"
_INTERNAL = "internal error\n"

ANSWERS: Mapping[Answer, Rule] = MappingProxyType(
    {
        Answer.RECEIPT: Rule(200, ""),
        Answer.RECEIPT_LATER: Rule(200, ""),
        Answer.RECEIPT_TAKEN: Rule(200, ""),
        # Pinned at the handshake; reaching the handler means a reload removed the peer.
        Answer.UNKNOWN_CERTIFICATE: Rule(403, _FORBIDDEN, EventType.PEER_AUTHENTICATION_FAILED),
        Answer.PINNED_KEY_REFUSED: Rule(403, _FORBIDDEN, EventType.PEER_AUTHENTICATION_FAILED),
        Answer.WRONG_ZONE: Rule(403, _FORBIDDEN, EventType.ZONE_VIOLATION),  # NET-4
        # NET-6 "stopping an exchange": the peer keeps its message and retries later.
        Answer.SUSPENDED: Rule(
            503,
            "exchange suspended, retry later\n",
            EventType.PEER_SUSPENDED_REFUSAL,
            Severity.WARNING,
        ),
        Answer.UNDECODABLE_HEADER: Rule(400, _BAD_REQUEST, EventType.MESSAGE_REJECTED),
        Answer.UNDECODABLE_RECEIPT_HEADER: Rule(400, _BAD_REQUEST, EventType.RECEIPT_INVALID),
        Answer.BAD_MESSAGE_ID: Rule(400, _BAD_REQUEST, EventType.MESSAGE_REJECTED),
        Answer.TOO_LARGE: Rule(
            413, "message too large\n", EventType.MESSAGE_REJECTED, Severity.WARNING, close=True
        ),
        Answer.TOO_SLOW: Rule(
            408, "request body too slow\n", EventType.MESSAGE_REJECTED, Severity.WARNING, close=True
        ),
        Answer.INCOMPLETE: Rule(400, "incomplete request\n"),  # the peer hung up: it resends
        # Nothing was acknowledged: the peer resends and is judged anew from the handshake.
        Answer.TRUST_CHANGED: Rule(503, "please resend\n", retry_after=5),
        # Nothing acknowledged either: the peer keeps the message and resends it.
        Answer.UNAVAILABLE: Rule(
            503,
            "temporarily unable to accept messages, retry later\n",
            EventType.STORAGE_UNAVAILABLE,
            retry_after=60,
        ),
        Answer.RECEIPT_NOT_BUILT: Rule(500, _INTERNAL),  # logged: our signing key failed
        Answer.INTERNAL_ERROR: Rule(500, _INTERNAL, EventType.MESSAGE_REJECTED),
    }
)


def rule(answer: Answer) -> Rule:
    return ANSWERS[answer]


def response(
    answer: Answer,
    *,
    headers: tuple[tuple[str, str], ...] | None = None,
    body: bytes | None = None,
) -> web.Response:
    """The HTTP answer of the kind: a refusal's text and headers unless a receipt (or
    another body) is given with its headers."""
    found = ANSWERS[answer]
    given = web.Response(
        status=found.status,
        body=found.text.encode() if body is None else body,
        headers=dict(found.headers() if headers is None else headers),
    )
    if found.close:
        given.force_close()
    return given


def refusal_event(
    why: Answer | EventType,
    *,
    reason: str,
    remote: str,
    peer: str | None = None,
    message_id: str | None = None,
    detail: Mapping[str, Any] | None = None,
) -> AuditEvent:
    """The audit record of a refusal: of a refused request (an answer: its event type
    and severity from :data:`ANSWERS`), or of a document answered with a negative
    receipt (the event type of the check that failed: an alert)."""
    if isinstance(why, Answer):
        found = ANSWERS[why]
        assert found.event is not None, f"answer {why.value!r} is not audited"
        event, severity = found.event, found.severity
    else:
        event, severity = why, Severity.ALERT
    return AuditEvent(
        event,
        Outcome.FAILURE,
        severity,
        peer=peer,
        message_id=message_id,
        direction="inbound",
        remote_address=remote,
        reason=reason,
        detail=dict(detail or {}),
    )
