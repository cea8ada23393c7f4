"""The audit trail: one event model shared by every layer, written as JSON lines."""

from gateway.audit.events import AuditEvent, EventType, Outcome, Severity
from gateway.audit.log import AuditLog, AuditSink, verify_chain

__all__ = [
    "AuditEvent",
    "AuditLog",
    "AuditSink",
    "EventType",
    "Outcome",
    "Severity",
    "verify_chain",
]
