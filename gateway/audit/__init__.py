"""The audit trail: one event model shared by every layer, written as JSON lines."""

from gateway.audit.events import AuditEvent, EventType, Outcome, PatientId, Severity
from gateway.audit.log import DURABLE, AuditLog, AuditSink, Pending
from gateway.audit.verify import verify_chain

__all__ = [
    "DURABLE",
    "AuditEvent",
    "AuditLog",
    "AuditSink",
    "EventType",
    "Outcome",
    "PatientId",
    "Pending",
    "Severity",
    "verify_chain",
]
