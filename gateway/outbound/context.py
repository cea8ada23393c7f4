"""What every step of the sending pipeline shares: the runtime state read now, the
spool, the audit trail, the log, the clock, the spool's folders, and the worker
threads that keep fsync and crypto off the event loop."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, TypeVar

from cryptography import x509

from gateway.atrest import Vault
from gateway.audit import AuditEvent, AuditSink, EventType, Outcome, Severity
from gateway.clock import Clock
from gateway.config import GatewayConfig, Peer
from gateway.errors import ObjectSecurityError
from gateway.fsutil import FolderSync, private_folder
from gateway.logs import Logger
from gateway.pki.peers import PeerTrust
from gateway.spool import OutboundRecord, Spool

T = TypeVar("T")


class Current(Protocol):
    """The runtime state the sender reads: one configuration and the trust judged for it
    (the daemon's RuntimeState is one; :class:`Settings` for tests and tools)."""

    @property
    def config(self) -> GatewayConfig: ...

    @property
    def trust(self) -> Mapping[str, PeerTrust]: ...


@dataclass(frozen=True)
class Settings:
    config: GatewayConfig
    trust: Mapping[str, PeerTrust]


class Context:
    """The parts and the state the steps share; one per :class:`~gateway.outbound.Outbound`."""

    def __init__(
        self,
        state: Current,
        spool: Spool,
        audit: AuditSink,
        log: Logger,
        clock: Clock,
        vault: Vault | None = None,
    ) -> None:
        self._state = state
        self.spool = spool
        self.vault = vault  # None: bodies and receipts are stored as they are (tests, tools)
        self.audit = audit
        self.log = log
        self.clock = clock
        state_dir = state.config.storage.state_dir
        # The signed, encrypted bodies: a folder all nodes mount, when several share the
        # spool (a node taking over another's messages reads them there).
        bodies = state.config.cluster.bodies_dir
        self.outgoing = bodies if bodies is not None else state_dir / "outgoing"
        # The documents taken in, until they are signed and encrypted: in that folder too
        # (``shared_payloads``), so that a node taking over a dead node's intake reads its
        # copy there; each node's in a folder of its own in it, which only it writes new
        # files into and sweeps at its start.
        self.shared_payloads = bodies / "payloads" if bodies is not None else None
        self.payloads = (
            self.shared_payloads / state.config.cluster.node_name
            if self.shared_payloads is not None
            else state_dir / "payloads"
        )
        self.receipts = state.config.storage.receipts_dir
        for folder in (self.outgoing, self.shared_payloads, self.payloads, self.receipts):
            if folder is not None:
                private_folder(folder)
        # Documents taken and receipts stored at the same moment share their folders' fsyncs.
        self.folder_sync = FolderSync()
        self.wakeups: dict[str, asyncio.Event] = {}
        # Set while this node could not renew its claims for half a lease: another node
        # may take its messages over, so its sends in progress stop (see send).
        self.claims_lost = asyncio.Event()
        # Interrupted intakes whose documents are in this node's outbox, found at start
        # under another node's claim (sweep.remove_sent_elsewhere), by Message-ID: taken
        # up under their own Message-IDs once their claims come back (Recovery.take_back),
        # their files not taken as new documents meanwhile (intake).  Replaced whole,
        # never changed in place: the intake reads it in worker threads.
        self.waiting_intakes: Mapping[str, OutboundRecord] = {}

    def use(self, state: Current) -> None:
        """Read ``state`` from now on: a reload swaps the configuration and the trust
        judged for it together, never one without the other."""
        self._state = state

    @property
    def config(self) -> GatewayConfig:
        return self._state.config

    @property
    def trust(self) -> Mapping[str, PeerTrust]:
        """Which peer certificates are acceptable now."""
        return self._state.trust

    def body_path(self, record: OutboundRecord, node: str | None = None) -> Path:
        """Where this node (or ``node``) keeps ``record``'s signed, encrypted body when it
        is too large for its spool row: a name of the node's own, so that in a bodies
        folder the nodes share, a node still preparing a document another node took over
        (its claim ran out meanwhile) never writes over the body the spool names."""
        return self.outgoing / f"{record.payload_path.name}.{node or self.spool.node}.as2"

    def recipient(self, peer: Peer) -> x509.Certificate:
        """The newest acceptable encryption certificate of ``peer`` (rotation: see pki.peers)."""
        judged = self.trust.get(peer.name)
        recipient = judged.encryption_recipient if judged else None
        if recipient is None:
            reasons = "; ".join(
                v.result.reason or "" for v in (judged.encryption if judged else ())
            )
            raise ObjectSecurityError(
                f"peer {peer.name!r} has no acceptable encryption certificate"
                + (f" ({reasons})" if reasons else ""),
                fix=f"put the peer's current encryption certificate in {peer.source} "
                "encryption_certificates and reload",
            )
        return recipient

    def signers(self, peer: Peer) -> tuple[x509.Certificate, ...]:
        """The peer's signing certificates acceptable now (its receipts are signed by one)."""
        judged = self.trust.get(peer.name)
        return judged.signing_certificates if judged else ()

    def wake(self, peer: str) -> None:
        """Tell the peer's sender task that a message is queued for it."""
        event = self.wakeups.get(peer)
        if event is not None:
            event.set()

    async def in_thread(
        self,
        function: Callable[..., T],
        *args: Any,
        on_cancel: Callable[[T], None] | None = None,
    ) -> T:
        """Run ``function`` in a worker thread: the spool's transactions, audit records
        and files, each with its fsync, stay off the event loop, which keeps serving
        other messages meanwhile.  A cancellation (shutdown) waits until it has
        finished, so nothing is left half-recorded when the spool is closed;
        ``on_cancel`` then undoes what its result would have started, and an error
        it raised meanwhile is logged (its caller is gone)."""
        work = asyncio.ensure_future(asyncio.to_thread(function, *args))
        try:
            return await asyncio.shield(work)
        except asyncio.CancelledError:
            await asyncio.wait([work])
            error = None if work.cancelled() else work.exception()
            if error is not None:
                self.log.error(
                    "shutdown.step_failed",
                    step=getattr(function, "__name__", "step"),
                    error=str(error) or type(error).__name__,
                    fix="the message is queued again at the next start; see the spool's "
                    "state with `medgw queue list`",
                )
            elif on_cancel is not None and not work.cancelled():
                on_cancel(work.result())
            raise

    def record(
        self,
        event: EventType,
        *,
        peer: str,
        message_id: str | None,
        outcome: Outcome = Outcome.SUCCESS,
        severity: Severity = Severity.INFO,
        service: str | None = None,
        reason: str | None = None,
        detail: dict[str, Any] | None = None,
    ) -> None:
        """One audit record about an outbound message."""
        self.audit.emit(
            self.event(
                event,
                peer=peer,
                message_id=message_id,
                outcome=outcome,
                severity=severity,
                service=service,
                reason=reason,
                detail=detail,
            )
        )

    def event(
        self,
        event: EventType,
        *,
        peer: str,
        message_id: str | None,
        outcome: Outcome = Outcome.SUCCESS,
        severity: Severity = Severity.INFO,
        service: str | None = None,
        reason: str | None = None,
        detail: dict[str, Any] | None = None,
    ) -> AuditEvent:
        """The audit record :meth:`record` writes, made to be written with others
        (:meth:`record_all`)."""
        return AuditEvent(
            event,
            outcome,
            severity,
            peer=peer,
            message_id=message_id,
            direction="outbound",
            service=service,
            reason=reason,
            detail=detail or {},
        )

    def compat_event(
        self, peer: str, message_id: str, algorithm: str, reason: str, **detail: Any
    ) -> AuditEvent:
        """The warning, counted per message, that a legacy ``algorithm`` this peer is
        allowed was used (``reason``: where, and which option allows it); ``detail``
        adds to the algorithm's name."""
        return self.event(
            EventType.COMPAT_ALGORITHM_USED,
            peer=peer,
            message_id=message_id,
            severity=Severity.WARNING,
            reason=reason,
            detail={"algorithm": algorithm, **detail},
        )

    def record_all(self, events: Sequence[AuditEvent]) -> None:
        """Several audit records written together, in their order (one write and one
        fsync; all or none)."""
        self.audit.emit_all(events)

    def failed(
        self,
        log_event: str,
        event: EventType,
        *,
        peer: str,
        message_id: str | None,
        audit_reason: str,
        service: str | None = None,
        detail: dict[str, Any] | None = None,
        **log_fields: Any,
    ) -> None:
        """An outbound message failed: an error line for the administrator (``log_event``
        with ``log_fields``) and an alert in the audit trail (``event``, ``audit_reason``)."""
        self.log.error(log_event, peer=peer, message_id=message_id, **log_fields)
        self.alert(
            event,
            peer=peer,
            message_id=message_id,
            reason=audit_reason,
            service=service,
            detail=detail,
        )

    def alert(
        self,
        event: EventType,
        *,
        peer: str,
        message_id: str | None,
        reason: str,
        service: str | None = None,
        detail: dict[str, Any] | None = None,
    ) -> None:
        """An outbound message failed in a way an operator must look at."""
        self.record(
            event,
            peer=peer,
            message_id=message_id,
            outcome=Outcome.FAILURE,
            severity=Severity.ALERT,
            service=service,
            reason=reason,
            detail=detail,
        )
