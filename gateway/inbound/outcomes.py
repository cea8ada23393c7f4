"""How a received message ends short of a new receipt, shared by the request pipeline
and the delivery to the inbox: a refusal (a negative receipt), a resend answered with
the original receipt; and the audit record about a received message."""

from __future__ import annotations

from typing import Any

from gateway.as2.mdn import Disposition
from gateway.audit import AuditEvent, AuditSink, EventType, Pending


class Refused(Exception):
    """The message is answered with a negative receipt: ``disposition`` for the peer,
    ``event`` and ``reason`` for the audit trail."""

    def __init__(self, disposition: Disposition, event: EventType, reason: str) -> None:
        super().__init__(reason)
        self.disposition = disposition
        self.event = event
        self.reason = reason


class DuplicateReceipt(Exception):
    """A resend of a delivered message: answered with the original receipt."""

    def __init__(self, headers: tuple[tuple[str, str], ...], body: bytes) -> None:
        super().__init__("duplicate")
        self.headers = headers
        self.body = body


def audit_inbound(
    audit: AuditSink, event: EventType, peer: str, message_id: str | None, **fields: Any
) -> None:
    """One audit record about a received message (``fields``: AuditEvent's others)."""
    audit.emit(AuditEvent(event, peer=peer, message_id=message_id, direction="inbound", **fields))


def audit_inbound_later(
    audit: AuditSink, event: EventType, peer: str, message_id: str | None, **fields: Any
) -> Pending:
    """As :func:`audit_inbound`, written now and durable once the handle is waited for:
    the caller waits just before the step the record must precede."""
    return audit.emit_later(
        (AuditEvent(event, peer=peer, message_id=message_id, direction="inbound", **fields),)
    )
