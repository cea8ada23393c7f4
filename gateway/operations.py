"""Operator actions on messages and peers, each audited with who did it.

Used by the control socket (running daemon).  Pure spool + audit logic: no
HTTP, no argument parsing.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from gateway.atrest import Vault
from gateway.audit import AuditEvent, AuditSink, EventType, Outcome, Severity
from gateway.audit.first import owed, recorded
from gateway.backup.bundle import (
    BackupError,
    Written,
    created_event,
    refused_backup_event,
    write_bundle,
)
from gateway.backup.restore import refused_event
from gateway.clock import Clock, iso_time
from gateway.config import GatewayConfig
from gateway.emergency.actions import Emergency
from gateway.errors import MedgwError, SpoolError
from gateway.retention.audit_files import AuditFiles
from gateway.retention.purge import PurgeRequest, Retention
from gateway.spool import (
    PENDING_STATES,
    HandoverRecord,
    HandoverState,
    OutboundRecord,
    OutboundState,
    Spool,
)


class UnknownPeerError(MedgwError):
    """The named peer is not configured."""


# The states in which a node holds a message under a claim: taking it in, sending it.
HELD_STATES = frozenset({OutboundState.INTAKE, OutboundState.SENDING})


@dataclass(frozen=True)
class Reloaded:
    """A reload that took effect, with the new configuration's ``warnings`` as
    ``medgw check-config`` words them (also logged as ``config.warning``)."""

    warnings: tuple[str, ...] = ()


@dataclass(frozen=True)
class ReloadRefused:
    """A reload that did not take effect, and why (``reason``).  ``for_stop``: not
    applied because medgw is stopping (the files may be right: a start reads them);
    otherwise the files were refused, for the problems they have (no ``fix``: correct
    them), or for the error whose own ``fix`` is given (a change only a restart
    applies, a TLS key that cannot be used).  ``stopping``: the stop had begun when it
    was refused (no later reload applies a correction: the next start does)."""

    reason: str
    for_stop: bool = False
    stopping: bool = False
    fix_given: str | None = None

    @property
    def error(self) -> str:
        if self.for_stop:
            return self.reason
        if self.stopping:
            return (
                f"the new configuration was refused: {self.reason}; medgw is stopping (the"
                " transfers in progress finish with the previous one)"
            )
        return (
            f"the new configuration was refused: {self.reason}; medgw goes on serving with"
            " the previous one"
        )

    @property
    def fix(self) -> str:
        if self.for_stop:
            return (
                "start medgw again (systemctl start medgw): it reads the configuration files then"
            )
        if self.fix_given is not None:
            if self.stopping:
                # Not "(fix), then start it": the given fix may itself be a restart.
                return f"medgw is stopping; once it has stopped: {self.fix_given}"
            return self.fix_given
        check = "correct what it names (medgw check-config lists every problem of the files)"
        if self.stopping:
            return f"{check}, then start medgw again (systemctl start medgw)"
        return f"{check}, then medgw reload again"


def record_view(record: OutboundRecord, now: datetime) -> dict[str, Any]:
    """``record`` as the queue shows it, its claim judged at ``now``."""
    held = record.node is not None and record.state in HELD_STATES
    return {
        "message_id": record.message_id,
        "peer": record.peer,
        "service": record.service,
        "filename": record.filename,
        "content_type": record.content_type,
        "size": record.size,
        "state": record.state.value,
        "attempts": record.attempts,
        "next_attempt_at": iso_time(record.next_attempt_at),
        "expires_at": iso_time(record.expires_at),
        "last_error": record.last_error,
        "disposition": record.disposition,
        "mic": record.mic,
        "receipt_file": str(record.receipt_path) if record.receipt_path else None,
        # Where its receipt is kept: "spool" (its row), "file" (receipt_file), or None.
        "receipt_kept": record.receipt_form,
        "created_at": record.created_at,
        "updated_at": record.updated_at,
        # Which node holds it now (preparing or sending it: a row keeps the last holder's
        # name after that) and until when its claim lasts unrenewed, and whether that
        # claim is "held", "ran out" (the node may have stopped: another node takes it
        # over) or "let go" (an intake left for the node that took it in); which node
        # queued it, last took it to send, and made its last audited change: whose audit
        # trail to read for it, where nodes share the spool.
        "node": record.node if held else None,
        "lease_until": iso_time(record.lease_until) if held else None,
        "claim": _claim(record, now) if held else None,
        "queued_by": record.queued_by,
        "sent_by": _sender(record),
        "audited_by": record.audited_by,
    }


def _claim(record: OutboundRecord, now: datetime) -> str:
    """The claim of the node holding ``record``: "held", "ran out" at its lease_until, or
    "let go" (no lease: an interrupted intake left for the node whose state folder has
    its document, see Spool.intake_release)."""
    if not record.lease_until and record.state is OutboundState.INTAKE:
        return "let go"
    return "held" if record.lease_until > now.timestamp() else "ran out"


def _sender(record: OutboundRecord) -> str | None:
    """The node that last took ``record`` to send, where its row says so for certain: a
    message awaiting its receipt or delivered keeps the name of the node that claimed it
    to send (the settler of an asynchronous receipt is audited_by); None otherwise (a
    row queued or failed may name the node that prepared it; an operator's retry counts
    its attempts from nought)."""
    sent = record.state in (OutboundState.AWAITING_RECEIPT, OutboundState.DELIVERED)
    return record.node if sent and record.attempts > 0 else None


def handover_view(record: HandoverRecord) -> dict[str, Any]:
    return {
        "message_id": record.message_id,
        "peer": record.peer,
        "service": record.service,
        "inbox_file": str(record.path),
        "content_type": record.content_type,
        "size": record.size,
        "state": record.state.value,
        "attempts": record.attempts,
        "next_attempt_at": iso_time(record.next_attempt_at),
        "expires_at": iso_time(record.expires_at),
        "last_error": record.last_error,
        "created_at": record.created_at,
        "updated_at": record.updated_at,
    }


# How the command line names an operator's change of an outbound message.
_CHANGES = {EventType.MESSAGE_RETRIED: "retry", EventType.MESSAGE_CANCELLED: "cancel"}


@dataclass
class Operations:
    config: GatewayConfig
    spool: Spool
    audit: AuditSink
    clock: Clock
    wake: Callable[[str], None] = lambda _peer: None  # tell the peer's sender to look again
    wake_handover: Callable[[], None] = lambda: None  # tell the hand-over worker to look again
    prepare: Callable[[str], None] = lambda _id: None  # sign and encrypt a kept document again
    # Peers with a use that has no acceptable certificate now, and why (the daemon's view).
    unusable: Callable[[], Mapping[str, str]] = dict
    audit_files: AuditFiles | None = None  # the closed audit files purge may dispose of
    emergency: Emergency | None = None  # break-glass credential and emergency mode
    # Lift a maintainer's lockout after wrong one-time codes: (person, actor) -> answer.
    unlock_maintainer: Callable[[str, str], dict[str, Any]] | None = None
    vault: Vault | None = None  # encryption at rest: a purge rotates its key
    # A peer suspended (True) or resumed here, once committed (the daemon's view of it).
    suspension_changed: Callable[[str, bool], None] = lambda _peer, _suspended: None

    def unlock(self, person: str, actor: str) -> dict[str, Any]:
        settings = self.config.maintenance
        if settings is None or self.unlock_maintainer is None:
            raise MedgwError(
                "remote maintenance is not configured", fix="add [maintenance] (README)"
            )
        if settings.maintainer(person) is None:
            known = ", ".join(m.person for m in settings.maintainers) or "(none)"
            raise MedgwError(f"no maintainer named {person!r}", fix=f"use one of: {known}")
        return self.unlock_maintainer(person, actor)

    def _peer(self, name: str) -> str:
        if self.config.peer(name) is None:
            known = ", ".join(p.name for p in self.config.peers) or "(none)"
            raise UnknownPeerError(
                f"no peer named {name!r}", fix=f"use one of: {known} (see medgw peers list)"
            )
        return name

    def _state_of(self, message_id: str) -> str | None:
        record = self.spool.get(message_id)
        return record.state.value if record else None

    def retry(self, message_id: str, actor: str) -> OutboundRecord:
        expires = self.clock.now().timestamp() + self.config.runtime.message_expiry_seconds
        before = self.spool.get(message_id)
        previous = before.state.value if before else None
        if before is not None and self.config.peer(before.peer) is None:
            # Queued again it would never be sent: no sender runs for an unknown peer.
            raise UnknownPeerError(
                f"message {message_id} is for peer {before.peer!r}, which is no longer "
                "configured; nothing would send it",
                fix=f"configure the peer again (peers.d/{before.peer}.toml) and reload, "
                f"or withdraw it with `medgw queue cancel {message_id}`",
            )
        record = self.spool.operator_retry(message_id, actor, expires)
        if before is not None and before.receipt_path is not None:
            # Committed: the retry cleared the row's receipt, and no other row names its
            # file (each receipt has a name of its own), so it goes.  From this node's
            # folder, by name (the row's path may be of a moved state folder); a receipt
            # another node stored, or one a kill leaves here, goes at that node's next
            # start (gateway.outbound.recover).
            (self.config.storage.receipts_dir / before.receipt_path.name).unlink(missing_ok=True)
        if record.state is OutboundState.INTAKE:
            self.prepare(message_id)  # it was never signed and encrypted: do that first
        else:
            self.wake(record.peer)
        self._audit_outbound_change(EventType.MESSAGE_RETRIED, record, actor, previous)
        return record

    def cancel(self, message_id: str, actor: str) -> OutboundRecord:
        previous = self._state_of(message_id)
        record = self.spool.operator_cancel(message_id, actor)
        if record.body_path is not None:
            record.body_path.unlink(missing_ok=True)
        record.payload_path.unlink(missing_ok=True)  # a document kept after a failed preparation
        self._audit_outbound_change(EventType.MESSAGE_CANCELLED, record, actor, previous)
        return record

    def _audit_outbound_change(
        self, kind: EventType, record: OutboundRecord, actor: str, previous: str | None
    ) -> None:
        """An operator changed an outbound message's state (a warning: it changes what
        the gateway will do with a patient's document).  Committed first, its record owed
        (the spool keeps that): one that cannot be written now follows (AuditRecordOwedError)."""
        event = AuditEvent(
            kind,
            severity=Severity.WARNING,
            peer=record.peer,
            message_id=record.message_id,
            direction="outbound",
            actor=actor,
            detail={"previous_state": previous},
        )
        what = f"the {_CHANGES[kind]} of message {record.message_id}"
        owed(self.audit, self._trail, what, event)

    def handover_retry(
        self, message_id: str, actor: str, peer: str | None = None
    ) -> HandoverRecord:
        """A failed hand-over to the internal system is tried again, from attempt 1."""
        found = [
            r for r in self.spool.handover_list(message_id=message_id) if peer in (None, r.peer)
        ]
        if not found:
            raise SpoolError(
                f"no hand-over of message {message_id}" + (f" from peer {peer}" if peer else ""),
                fix="check the id with `medgw handover list`",
            )
        if len(found) > 1:
            peers = ", ".join(r.peer for r in found)
            raise SpoolError(
                f"message {message_id} came from more than one peer ({peers})",
                fix="name the peer with --peer",
            )
        [before] = found
        expires = self.clock.now().timestamp() + self.config.runtime.message_expiry_seconds
        record = self.spool.handover_operator_retry(before.peer, message_id, actor, expires)
        self.wake_handover()
        event = AuditEvent(
            EventType.HANDOVER_RETRIED,
            severity=Severity.WARNING,
            peer=record.peer,
            service=record.service,
            message_id=message_id,
            direction="inbound",
            actor=actor,
            detail={
                "previous_state": before.state.value,
                "previous_error": before.last_error,
            },
        )
        owed(self.audit, self._trail, f"the hand-over retry of message {message_id}", event)
        return record

    def handovers(self, state: HandoverState | None = None) -> list[dict[str, Any]]:
        return [handover_view(r) for r in self.spool.handover_list(state=state)]

    def viewed(self, view: Mapping[str, Any], actor: str, via: str) -> None:
        viewed(self.audit, view, actor, via)

    def listed(self, views: list[dict[str, Any]], actor: str, what: str, query: Any) -> None:
        listed(self.audit, views, actor, what, query)

    def suspend(self, peer: str, reason: str, actor: str) -> None:
        name = self._peer(peer)
        event = AuditEvent(
            EventType.PEER_SUSPENDED,
            severity=Severity.WARNING,
            peer=peer,
            reason=reason,
            actor=actor,
        )

        def act() -> None:
            self.spool.set_suspended(name, True, reason, actor)
            self.suspension_changed(peer, True)

        recorded(self.audit, self._trail, f"suspending peer {peer}", event, act)

    def resume(self, peer: str, actor: str) -> None:
        name = self._peer(peer)
        event = AuditEvent(EventType.PEER_RESUMED, peer=peer, actor=actor)

        def act() -> None:
            self.spool.set_suspended(name, False, "", actor)
            self.suspension_changed(peer, False)
            self.wake(peer)

        recorded(self.audit, self._trail, f"resuming peer {peer}", event, act)

    @property
    def _trail(self) -> Path:
        return self.config.storage.audit_log

    def audit_verification_failed(self, reason: str, actor: str) -> None:
        """An administrator's ``medgw audit verify`` found the trail broken: an alert that
        the export carries to the monitoring (EMG-4)."""
        self.audit.emit(audit_verification_failed(reason, actor))

    def peers(self) -> list[dict[str, Any]]:
        return peers_view(self.config, self.spool, self.unusable())

    def backup(self, to: Path, actor: str) -> Written:
        """Write an encrypted, signed bundle of this gateway to ``to`` (OUT-1), audited; a
        refused one too (``backup.refused``), its error raised as it was."""
        try:
            written = self._write_backup(to)
        except MedgwError as exc:
            # Not recorded if the trail cannot be written: the refusal stands as it is.
            with contextlib.suppress(OSError):
                self.audit.emit(refused_backup_event(to, exc, actor))
            raise
        self.audit.emit(created_event(written, actor))
        return written

    def _write_backup(self, to: Path) -> Written:
        if self.config.backup is None:
            # The file may have [backup] by now: this daemon writes with what it loaded.
            raise BackupError(
                f"the running daemon's configuration has no [backup] section (it was read "
                f"from {self.config.source} at the daemon's start or last reload): there is "
                "no one to encrypt the bundle to",
                fix="if gateway.toml has [backup] now, run medgw reload (medgw check-config "
                "first), then the backup again; else add [backup] with its recipient, "
                "signing_certificate and signing_key (see README, Backups) and reload",
            )
        return write_bundle(self.config, to, self.clock.now(), self.vault)

    def restore_refused(
        self, bundle: Path, reason: str, message: str, actor: str, forced: bool
    ) -> None:
        """``medgw restore`` was refused on this running gateway's host: audited here, the
        one writer of the trail."""
        self.audit.emit(refused_event(bundle, reason, message, actor, forced=forced))

    def purge(self, request: PurgeRequest, actor: str) -> dict[str, int]:
        """Dispose of what finished before ``request.before`` (DSP-1), audited with
        ``actor`` and the counts per kind."""
        retention = Retention(self.spool, self.audit, self.clock, self.audit_files, self.vault)
        return retention.purge(request, actor)


def viewed(audit: AuditSink, view: Mapping[str, Any], actor: str, via: str) -> None:
    """An operator or a local client read one message's record (MNT-1): audited with who,
    and how (``via``: "control socket", "local API", "maintenance console", "spool")."""
    inbound = "inbox_file" in view
    audit.emit(
        AuditEvent(
            EventType.MESSAGE_VIEWED,
            peer=view.get("peer"),
            service=view.get("service"),
            message_id=view.get("message_id"),
            direction="inbound" if inbound else "outbound",
            actor=actor,
            detail={
                "via": via,
                "receipt": bool(
                    view.get("receipt") or view.get("receipt_file") or view.get("receipt_kept")
                ),
            },
        )
    )


def listed(
    audit: AuditSink, views: list[dict[str, Any]], actor: str, what: str, query: Any
) -> None:
    """An operator read a list of messages (``what``: "queue" or "handover"): one record
    with who, the filter and how many (each listed message's id, up to the audit bound)."""
    audit.emit(
        AuditEvent(
            EventType.MESSAGES_LISTED,
            actor=actor,
            detail={
                "list": what,
                "query": {k: v for k, v in dict(query).items() if v},
                "count": len(views),
                "message_ids": [v["message_id"] for v in views],
            },
        )
    )


def peers_view(
    config: GatewayConfig, spool: Spool, unusable: Mapping[str, str] | None = None
) -> list[dict[str, Any]]:
    """Every configured peer with its suspension and queue counts, and the peers no longer
    configured that messages still wait for; the running daemon and the offline
    ``medgw peers list`` show the same.  ``unusable``: why the running daemon exchanges
    nothing with a peer (its certificates; None when no daemon judged them)."""
    controls = spool.peer_controls()
    unusable = unusable or {}
    counts = spool.counts()
    result = []
    for peer in config.peers:
        control = controls.get(peer.name)
        result.append(
            {
                "name": peer.name,
                "configured": True,
                "as2_id": peer.as2_id,
                "url": peer.url,
                "suspended": bool(control and control.suspended),
                "suspended_reason": control.reason if control and control.suspended else None,
                "suspended_by": control.actor if control and control.suspended else None,
                "unusable": unusable.get(peer.name),
                "messages": {state: n for (name, state), n in counts.items() if name == peer.name},
            }
        )
    # Peers no longer configured that messages still wait for: shown, or they would be
    # forgotten (no sender runs for them; see queue.peer_not_configured).
    configured = {peer.name for peer in config.peers}
    for name in sorted({name for (name, state) in counts if name not in configured}):
        waiting = {
            state: n
            for (peer, state), n in counts.items()
            if peer == name and state in PENDING_STATES
        }
        if waiting:
            result.append(
                {
                    "name": name,
                    "configured": False,
                    "as2_id": None,
                    "url": None,
                    "suspended": False,
                    "suspended_reason": None,
                    "suspended_by": None,
                    "unusable": None,
                    "messages": waiting,
                }
            )
    return result


def audit_verification_failed(reason: str, actor: str) -> AuditEvent:
    """What ``medgw audit verify`` records when it finds the trail broken."""
    return AuditEvent(
        EventType.AUDIT_VERIFICATION_FAILED,
        Outcome.FAILURE,
        Severity.ALERT,
        reason=reason,
        actor=actor,
        detail={"checked_by": "medgw audit verify"},
    )
