"""What a configuration's start and reload say: its warnings, and the queued messages
it leaves stranded."""

from __future__ import annotations

from collections.abc import Sequence

from gateway.audit import AuditEvent, AuditSink, EventType, Outcome, Severity
from gateway.config import GatewayConfig
from gateway.logs import Logger
from gateway.pki.tls import certificate_fingerprint
from gateway.spool import PENDING_STATES, Spool


def report_config_warnings(
    config: GatewayConfig, own_certificates: Sequence[object], log: Logger
) -> tuple[str, ...]:
    """The warnings ``check-config`` shows for ``config`` (and for our certificates),
    logged as the configuration comes into force: at the start, and at each reload;
    returned for the one who asked for the reload."""
    warnings = tuple(str(warning) for warning in (*config.warnings, *own_certificates))
    for warning in warnings:
        log.warning("config.warning", problem=warning)
    return warnings


def report_stranded_messages(
    config: GatewayConfig, spool: Spool, audit: AuditSink, log: Logger
) -> None:
    """Messages that wait for something no longer configured: said, never a reason for
    a start or a reload to fail (the spool or the audit log may be unwritable now)."""
    try:
        _report_unconfigured_peers(config, spool, audit, log)
        _report_removed_recipients(config, spool, audit, log)
    except Exception as exc:
        log.error(
            "queue.check_failed",
            error=f"{type(exc).__name__}: {exc}",
            fix="run `medgw queue list` to see what waits; look at the spool's and the "
            "audit log's disk",
        )


def _report_removed_recipients(
    config: GatewayConfig, spool: Spool, audit: AuditSink, log: Logger
) -> None:
    """Alert about messages queued for a peer, encrypted to a certificate of it that is
    no longer configured: the peer's rotation has moved on, and unless it still has
    that key it cannot decrypt them (their plaintext is not kept)."""
    for peer in config.peers:
        current = {certificate_fingerprint(c) for c in peer.encryption_certificates}
        for encrypted_for, count in sorted(spool.pending_by_recipient(peer.name).items()):
            if encrypted_for in current:
                continue
            fix = (
                f"ask {peer.name} to keep the decryption key of that certificate until "
                f"`medgw queue list --peer {peer.name}` shows nothing waiting; a message "
                "it can no longer decrypt comes back failed (decryption-failed) and must "
                "be submitted again from its source"
            )
            log.error(
                "queue.recipient_certificate_removed",
                peer=peer.name,
                messages=count,
                certificate_sha256=encrypted_for,
                fix=fix,
            )
            reason = (
                f"{count} message(s) waiting for {peer.name!r} are encrypted to a certificate "
                f"no longer in {peer.source.name} (SHA-256 {encrypted_for[:16]}...): the peer "
                "can read them only while it keeps that key"
            )
            detail = {"certificate_sha256": encrypted_for, "messages": count, "fix": fix}
            _alert(audit, EventType.QUEUE_RECIPIENT_REMOVED, peer.name, reason, detail)


def _report_unconfigured_peers(
    config: GatewayConfig, spool: Spool, audit: AuditSink, log: Logger
) -> None:
    """Alert about messages waiting for a peer that is no longer configured: no sender
    runs for it, so they are neither sent nor expired until an operator acts."""
    configured = {p.name for p in config.peers}
    waiting: dict[str, dict[str, int]] = {}
    for (peer, state), count in spool.counts().items():
        if peer not in configured and state in PENDING_STATES:
            waiting.setdefault(peer, {})[state] = count
    for peer, states in sorted(waiting.items()):
        total = sum(states.values())
        fix = (
            f"to send them, configure the peer again (peers.d/{peer}.toml) and reload; "
            f"to withdraw them: medgw queue list --peer {peer} --state queued, then "
            "medgw queue cancel ID for each"
        )
        log.error("queue.peer_not_configured", peer=peer, messages=states, fix=fix)
        reason = (
            f"{total} message(s) for peer {peer!r} wait in the queue, but no peer of that "
            "name is configured: they are neither sent nor expired"
        )
        detail: dict[str, object] = {"states": states, "fix": fix}
        _alert(audit, EventType.QUEUE_PEER_NOT_CONFIGURED, peer, reason, detail)


def _alert(
    audit: AuditSink, event: EventType, peer: str, reason: str, detail: dict[str, object]
) -> None:
    """An alert about messages queued for ``peer``."""
    audit.emit(
        AuditEvent(
            event,
            Outcome.FAILURE,
            Severity.ALERT,
            peer=peer,
            direction="outbound",
            reason=reason,
            detail=detail,
        )
    )
