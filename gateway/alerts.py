"""Who to call about an alert (NET-6b).

Every audit event of severity alert is recorded with ``call``: the
administrators named in ``[[responsible]]`` for its area (communication,
encryption or authentication) and for incidents, and is also written as one
log line, ``audit.alert``, with the event, the peer, the message and whom to
call, so that whoever watches the journal knows at once.  The log line carries
no reason text, and so nothing of a document or a patient.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace

from gateway.audit import AuditEvent, AuditSink, EventType, Pending, Severity
from gateway.audit.log import Then
from gateway.config import Responsible, who_to_call
from gateway.logs import Logger

# The area of each alert that is not communication's (sending, receiving, storage).
_AREAS: dict[str, str] = {
    EventType.TLS_HANDSHAKE_FAILED: "authentication",
    EventType.TLS_HANDSHAKE_STORM: "authentication",
    EventType.TLS_CONNECTION_CLOSED: "authentication",
    EventType.PEER_AUTHENTICATION_FAILED: "authentication",
    EventType.PEER_CERTIFICATE_REJECTED: "authentication",
    EventType.PEER_UNUSABLE: "authentication",
    EventType.CRL_STALE: "authentication",
    EventType.API_AUTHENTICATION_FAILED: "authentication",
    EventType.SIGNATURE_FAILED: "encryption",
    EventType.DECRYPTION_FAILED: "encryption",
    EventType.COMPAT_ALGORITHM_USED: "encryption",
    EventType.RECEIPT_INVALID: "encryption",
    EventType.EMERGENCY_BREAK_GLASS: "authentication",
    EventType.MAINTENANCE_LOCKED: "authentication",
}
NOBODY = "no one is named in [[responsible]] in gateway.toml (NET-6b)"


def area_of(event: EventType) -> str:
    return _AREAS.get(event, "communication")


class AlertCalls:
    """An audit sink that names whom to call on each alert, then passes it on."""

    def __init__(self, inner: AuditSink, responsible: Sequence[Responsible], log: Logger) -> None:
        self._inner = inner
        self._log = log
        self.responsible = tuple(responsible)  # set again by every reload

    def emit(self, event: AuditEvent) -> None:
        self.emit_all((event,))

    def emit_all(self, events: Sequence[AuditEvent]) -> None:
        called = [self._called(event) for event in events]
        self._inner.emit_all(called)
        self._log_alerts(called)

    def emit_later(self, events: Sequence[AuditEvent]) -> Pending:
        called = [self._called(event) for event in events]
        return Then(self._inner.emit_later(called), lambda: self._log_alerts(called))

    def _log_alerts(self, called: Sequence[AuditEvent]) -> None:
        for event in called:
            if event.severity is Severity.ALERT:
                self._log.error(
                    "audit.alert",
                    audit_event=event.event.value,
                    peer=event.peer,
                    message_id=event.message_id,
                    area=area_of(event.event),
                    call=list(event.call),
                )

    def _called(self, event: AuditEvent) -> AuditEvent:
        """``event`` with whom to call, if it is an alert."""
        if event.severity is not Severity.ALERT:
            return event
        people = who_to_call(self.responsible, area_of(event.event))
        return replace(event, call=tuple(p.describe() for p in people) or (NOBODY,))
