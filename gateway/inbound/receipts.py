"""The signed receipt (AS2 MDN) that answers a received message: built with our
signing key under the peer's algorithm policy; one that says the message was not
processed is audited as such."""

from __future__ import annotations

from gateway.as2.mdn import BuiltReceipt, Disposition, build_receipt
from gateway.audit import AuditSink, EventType, Outcome, Severity
from gateway.clock import Clock
from gateway.config import GatewayConfig, Peer
from gateway.errors import MedgwError
from gateway.inbound.outcomes import audit_inbound
from gateway.logs import Logger


class Receipts:
    def __init__(self, config: GatewayConfig, audit: AuditSink, log: Logger, clock: Clock) -> None:
        self._config = config
        self._audit = audit
        self._log = log
        self._clock = clock

    def build(
        self,
        peer: Peer,
        message_id: str,
        disposition: Disposition,
        mic: str | None,
        digest: str,
        details: str | None = None,
    ) -> BuiltReceipt | None:
        """The receipt for ``message_id``, or None (logged) when it cannot be built."""
        try:
            built = build_receipt(
                original_message_id=message_id,
                our_as2_id=self._config.as2_id,
                peer_as2_id=peer.as2_id,
                disposition=disposition,
                mic=mic,
                signing=self._config.smime.signing,
                digest=digest,
                policy=peer.policy,
                at=self._clock.now(),
                details=details,
            )
        except MedgwError as exc:
            self._log.error("receipt.build_failed", error=str(exc))
            return None
        if disposition is not Disposition.PROCESSED:
            audit_inbound(
                self._audit,
                EventType.RECEIPT_SENT,
                peer.name,
                message_id,
                outcome=Outcome.FAILURE,
                severity=Severity.WARNING,
                detail={"disposition": disposition.value},
            )
        return built
