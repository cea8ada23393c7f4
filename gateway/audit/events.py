"""The audit event model.

Every security-relevant step emits one :class:`AuditEvent` of one
:class:`EventType`.  Layers do not invent their own shapes: they fill the same
fields, and anything specific goes into ``detail`` (flat, JSON-serialisable
values).  Unlike operational logs, audit events may name documents (file
names, message IDs) because the audit trail is the place where an auditor
looks for them; payload bytes never appear anywhere.  What a record holds is
bounded (gateway.textbounds): a peer cannot make one megabytes long.

Two fields say who touched which patient (MNT-1, MNT-5), and only here: never in an
operational log line.  ``actor`` is the person or account that caused the event,
as the gateway knows it (``operator:<account> (uid N)`` from the control socket's
peer credentials, ``api:<client>`` for a local API client, ``outbox:<owner> (uid
N)`` for an outbox file's owner, ``peer:<name>`` for a peer authenticated by its
certificate, ``medgw`` for the gateway's own work).  ``patient_ids`` are the
patient identifiers the document carries (see gateway.audit.patients) or its
submitter declared, each with the authority that assigned it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from enum import StrEnum
from typing import Any

from gateway.textbounds import MAX_TEXT, bounded


class EventType(StrEnum):
    DAEMON_STARTED = "daemon.started"
    DAEMON_STOPPED = "daemon.stopped"
    # One of the daemon's loops (a peer's sender, intake, hand-over, trust refresh)
    # failed; it is started again after a pause.
    TASK_FAILED = "daemon.task_failed"
    CONFIG_RELOADED = "config.reloaded"
    CONFIG_RELOAD_FAILED = "config.reload_failed"
    MESSAGE_ACCEPTED = "message.accepted"  # taken from the outbox into the spool
    MESSAGE_SENT = "message.sent"  # POSTed to the peer
    MESSAGE_SEND_FAILED = "message.send_failed"  # will be retried
    MESSAGE_FAILED = "message.failed"  # final: needs an operator
    MESSAGE_EXPIRED = "message.expired"  # not delivered in time: needs an operator
    MESSAGE_DEAD = "message.dead"  # retries exhausted: dead letter, needs an operator
    MESSAGE_RETRIED = "message.retried"  # operator put it back in the queue
    # Another node's claim on it ran out (that node died or lost the spool): queued
    # again by this node, which sends it (several nodes sharing one spool).
    MESSAGE_TAKEN_OVER = "message.taken_over"
    MESSAGE_CANCELLED = "message.cancelled"  # operator withdrew it
    QUEUE_PEER_NOT_CONFIGURED = "queue.peer_not_configured"  # queued for a peer removed
    # queued messages encrypted to a peer certificate no longer configured (a rotation)
    QUEUE_RECIPIENT_REMOVED = "queue.recipient_certificate_removed"
    # An operator or a local API client read a message's record (state, receipt, file
    # names: MNT-1), or a list of messages.
    MESSAGE_VIEWED = "message.viewed"
    MESSAGES_LISTED = "messages.listed"
    PEER_SUSPENDED = "peer.suspended"  # operator stopped the exchange with a peer
    PEER_RESUMED = "peer.resumed"
    PEER_SUSPENDED_REFUSAL = "peer.suspended_refusal"  # a suspended peer tried to send
    MESSAGE_RECEIVED = "message.received"  # accepted from a peer, verified
    MESSAGE_REJECTED = "message.rejected"  # refused from a peer
    MESSAGE_DELIVERED = "message.delivered"  # durably in the inbox
    MESSAGE_HANDED_OVER = "message.handed_over"  # POSTed to the internal system, 2xx answer
    HANDOVER_FAILED = "message.handover_failed"  # that POST failed; retried, or final
    HANDOVER_RETRIED = "message.handover_retried"  # operator put a failed hand-over back
    # What a peer sent could not be stored here (disk full, permissions, I/O error):
    # nothing was acknowledged, the peer was asked to resend (HTTP 503).
    STORAGE_UNAVAILABLE = "storage.unavailable"
    # The first document stored again of a peer that such an outage refused: it ended.
    STORAGE_AVAILABLE = "storage.available"
    # A PostgreSQL spool's server stopped answering (an alert), and answers again.
    SPOOL_UNREACHABLE = "spool.unreachable"
    SPOOL_REACHABLE = "spool.reachable"
    # A PostgreSQL spool restored while this node ran (unreachable meanwhile): it stops.
    SPOOL_REPLACED = "spool.replaced"
    # Another live node took this node's name while its session holding it was lost: it stops.
    NODE_NAME_TAKEN = "node.name_taken"
    MESSAGE_DUPLICATE = "message.duplicate"  # resend of a delivered document: not written again
    PROBE_RECEIVED = "probe.received"  # `medgw diagnose` test message: verified, not delivered
    RECEIPT_SENT = "receipt.sent"
    RECEIPT_RECEIVED = "receipt.received"
    RECEIPT_INVALID = "receipt.invalid"
    TLS_HANDSHAKE_FAILED = "tls.handshake_failed"
    # Many failed handshakes from one source or from all within a window: one alert per
    # storm (gateway.channel.storms), and a record with the count when it ends.
    TLS_HANDSHAKE_STORM = "tls.handshake_storm"
    TLS_HANDSHAKE_STORM_ENDED = "tls.handshake_storm_ended"
    TLS_CONNECTION_CLOSED = "tls.connection_closed"  # its certificate stopped being acceptable
    PEER_CERTIFICATE_REJECTED = "peer.certificate_rejected"  # a configured cert fails validation
    PEER_UNUSABLE = "peer.unusable"  # a use (TLS, signing, encryption) has no acceptable cert
    PEER_USABLE = "peer.usable"  # an unusable peer has an acceptable cert for every use again
    CRL_STALE = "pki.crl_stale"  # a CRL is near or past its nextUpdate
    CRL_FRESH = "pki.crl_fresh"  # a zone pki.crl_stale was raised for has none to act on again
    CRL_FETCHED = "pki.crl_fetched"  # a new CRL from a distribution point, verified, in use
    CRL_FETCH_FAILED = "pki.crl_fetch_failed"  # none usable from a distribution point this time
    PEER_AUTHENTICATION_FAILED = "peer.authentication_failed"
    ZONE_VIOLATION = "zone.violation"  # a peer on a listener of another zone (NET-4)
    TRANSIT_REFUSED = "routing.transit_refused"  # a message would pass through us (NET-4)
    # The connect path refused an outbound connection: outside its zone's egress, into a
    # zone for the internal side, or to one of our own listeners (NET-4).
    EGRESS_REFUSED = "zone.egress_refused"
    SIGNATURE_FAILED = "signature.failed"
    DECRYPTION_FAILED = "decryption.failed"
    COMPAT_ALGORITHM_USED = "policy.compat_algorithm_used"
    API_AUTHENTICATION_FAILED = "api.authentication_failed"  # a local client's token refused
    API_REQUEST_REFUSED = "api.request_refused"  # a client asked for a peer it may not send to
    # malformed HTTP refused, or an internal error answered 500 (any HTTP listener)
    HTTP_REQUEST_REFUSED = "http.request_refused"
    # A signed checkpoint sealing every record before it (gateway.audit.seal).
    AUDIT_CHECKPOINT = "audit.checkpoint"
    # A record left unfinished by a kill or a power cut, cut off the trail's file at the
    # next start (its bytes' size, hash and beginning in detail): the chain goes on from
    # the last complete record.
    AUDIT_RECORD_CUT_SHORT = "audit.record_cut_short"
    # At start, this host's clock is behind the trail's last record by more than the
    # margin (gateway.audit.order): set back, or it ran ahead before (an alert).
    CLOCK_BEHIND_TRAIL = "clock.behind_trail"
    # This node's clock is off the shared PostgreSQL spool's server's by more than a
    # quarter of a lease (gateway.daemon.spoolwatch): once, until it is back in step.
    CLOCK_SKEWED = "clock.skewed"
    # Export to the hospital's monitoring (gateway.audit.export)
    EXPORT_INTERRUPTED = "audit.export_interrupted"  # the collector cannot be reached
    EXPORT_RESUMED = "audit.export_resumed"  # it can again; what waited is being sent
    EXPORT_BACKLOG = "audit.export_backlog"  # what waits nears the bound
    EXPORT_SKIPPED = "audit.export_skipped"  # the bound was reached: the oldest not exported
    # A record of the audit log read for export does not hold its chain link (edited)
    AUDIT_VERIFICATION_FAILED = "audit.verification_failed"
    # Our own or a peer's certificate expires within 30, 7 or 1 day(s)
    CERTIFICATE_EXPIRING = "pki.certificate_expiring"
    # A reload found a certificate of ours in force unusable (expired, revoked): applied
    OWN_CERTIFICATE_UNUSABLE = "pki.own_certificate_unusable"
    # Remote maintenance over SSH (gateway.maintenance): one session's login, each
    # command, each refused request (shell, port forward, SFTP), logout (MNT-3).
    MAINTENANCE_LOGIN = "maintenance.login"
    MAINTENANCE_LOGIN_FAILED = "maintenance.login_failed"
    MAINTENANCE_COMMAND = "maintenance.command"
    MAINTENANCE_REFUSED = "maintenance.request_refused"
    MAINTENANCE_LOGOUT = "maintenance.logout"
    MAINTENANCE_APPROVED = "maintenance.approved"  # work approved in advance for a person
    # Too many wrong one-time codes in a row: the person's logins locked for a while (an
    # alert), and an admin lifting it.
    MAINTENANCE_LOCKED = "maintenance.locked"
    MAINTENANCE_UNLOCKED = "maintenance.unlocked"
    # An account of maintainers.d/ added, removed or changed (role, keys, expiry, name),
    # recorded at the reload that put it in force (MNT-2: when access was given or ended).
    MAINTENANCE_ACCOUNT_ADDED = "maintenance.account_added"
    MAINTENANCE_ACCOUNT_REMOVED = "maintenance.account_removed"
    MAINTENANCE_ACCOUNT_CHANGED = "maintenance.account_changed"
    # Disposal (DSP-1, gateway.retention): one purge or sweep with its counts per kind,
    # and each batch of messages whose records, receipts or copies were disposed of.
    RETENTION_PURGED = "retention.purged"
    RETENTION_DISPOSED = "retention.disposed"
    # Closed audit files removed: which (first and last record, hashes), and where the
    # trail now starts; sealed by a checkpoint before the files go.
    RETENTION_AUDIT_DISPOSED = "retention.audit_disposed"
    # Encryption at rest (gateway.atrest): an item kept by the gateway that fails its
    # integrity check when read (changed, truncated, swapped: an alert; it is kept, not
    # used), and the key-encryption key replaced after a purge (what was purged is
    # unreadable in any earlier copy of the state folder or backup).
    AT_REST_INTEGRITY_FAILED = "atrest.integrity_failed"
    AT_REST_KEY_ROTATED = "atrest.key_rotated"
    # An encrypted, signed backup bundle written (OUT-1), one restored onto this host, and
    # a restore refused (``reason``: the rule; gateway.backup.restore).
    BACKUP_CREATED = "backup.created"
    BACKUP_RESTORED = "backup.restored"
    BACKUP_RESTORE_REFUSED = "backup.restore_refused"
    # A backup refused, no bundle written: which file (``detail.file``), why (``reason``:
    # the error the command said) and its fix (gateway.backup.bundle).
    BACKUP_REFUSED = "backup.refused"
    # Emergencies (gateway.emergency): a break-glass credential sealed (any earlier one
    # stops working), used (an alert), emergency mode entered (an alert) and left.
    EMERGENCY_SEALED = "emergency.credential_sealed"
    EMERGENCY_BREAK_GLASS = "emergency.break_glass_used"
    EMERGENCY_ENTERED = "emergency.entered"
    EMERGENCY_LEFT = "emergency.left"
    EMERGENCY_RELAXATIONS_CHANGED = "emergency.relaxations_changed"
    EMERGENCY_STATE_REFUSED = "emergency.state_refused"
    # An accountable action whose record was written, but which then could not be done
    # (its state not written): the record before it did not take effect
    # (gateway.audit.first).
    ACTION_NOT_DONE = "audit.action_not_done"


class Outcome(StrEnum):
    SUCCESS = "success"
    FAILURE = "failure"


class Severity(StrEnum):
    INFO = "info"
    WARNING = "warning"
    ALERT = "alert"  # a security event an administrator must look at


@dataclass(frozen=True)
class PatientId:
    """One patient identifier: ``id`` as assigned by ``authority`` (HL7 v2 CX.4, a CDA
    ``id/@root`` OID, a FHIR ``identifier.system``; None when the document names none),
    of ``type`` where the format says (HL7 v2 CX.5 such as ``MR`` or ``PI``, a FHIR
    identifier type code), found ``source``: ``hl7v2``, ``cda``, ``fhir`` or ``client``
    (declared by the local submitter)."""

    id: str
    source: str
    authority: str | None = None
    type: str | None = None

    def to_record(self) -> dict[str, str]:
        record = {"id": self.id}
        if self.authority is not None:
            record["authority"] = self.authority
        if self.type is not None:
            record["type"] = self.type
        record["source"] = self.source
        return record


@dataclass(frozen=True)
class AuditEvent:
    event: EventType
    outcome: Outcome = Outcome.SUCCESS
    severity: Severity = Severity.INFO
    peer: str | None = None
    message_id: str | None = None
    direction: str | None = None  # "outbound" or "inbound"
    remote_address: str | None = None
    reason: str | None = None
    detail: dict[str, Any] = field(default_factory=dict)
    service: str | None = None  # the routing key agreed with the peer, if the document has one
    actor: str | None = None  # who caused it: see the module's documentation
    patient_ids: tuple[PatientId, ...] = ()  # the patients the document concerns
    call: tuple[str, ...] = ()  # an alert's: whom to call (gateway.alerts, NET-6b)

    def to_record(self, time: datetime) -> dict[str, Any]:
        record: dict[str, Any] = {
            "time": time.isoformat(timespec="microseconds"),
            # The members' own values (a plain str): what .value reads, without the
            # enum's descriptor, for every record.
            "event": self.event._value_,
            "outcome": self.outcome._value_,
            "severity": self.severity._value_,
        }
        for key in _TEXT_FIELDS:
            value = getattr(self, key)
            if value is not None:
                # a short plain string, the common case, as bounded() would return it
                short = type(value) is str and len(value) <= MAX_TEXT
                record[key] = value if short else bounded(value)
        if self.patient_ids:
            record["patient_ids"] = [bounded(p.to_record()) for p in self.patient_ids]
        if self.call:
            record["call"] = bounded(list(self.call))
        if self.detail:
            record["detail"] = bounded(self.detail)
        return record


# The fields of a record that hold one text each, in the order they are filled in.
_TEXT_FIELDS = ("peer", "service", "message_id", "direction", "remote_address", "reason", "actor")
