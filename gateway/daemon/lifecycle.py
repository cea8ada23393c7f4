"""The ``medgw run`` daemon: build everything from config, serve, reload, drain, stop.

Life cycle (mirrors what systemd expects from ``Type=notify``):

* start: load and validate config (refuse to start on any error), open the
  spool and the audit log, finish work a previous run left half-done, bind the
  listeners, start intake and one sender per peer, then ``READY=1``;
* SIGHUP: ``RELOADING=1``, build a complete new runtime state from the files
  (TLS contexts, peers, clients), and only if that succeeds swap it in; on any
  error keep serving with the old state, log and audit why; ``READY=1``;
* SIGTERM / SIGINT: ``STOPPING=1``, stop accepting connections and taking
  files, let sends and receives in progress finish within the configured
  deadline, park anything still running back in the queue, exit 0.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import random
import secrets
import shutil
import signal
import ssl
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aiohttp import web
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

from gateway.alerts import AlertCalls
from gateway.as2.asyncmdn import is_receipt
from gateway.as2.headers import undecodable_header
from gateway.audit import AuditEvent, AuditLog, AuditSink, EventType, Outcome, Severity
from gateway.audit.export.exporter import AuditExporter
from gateway.audit.export.exporter import Target as ExportTarget
from gateway.audit.export.record import Source as ExportSource
from gateway.audit.seal import Sealer
from gateway.channel.client import MAX_RECEIPT_BYTES, PeerClient
from gateway.channel.server import As2Server
from gateway.clock import Clock
from gateway.config import ApiClient, GatewayConfig, Listener, Peer, Runtime, Zone, load_config
from gateway.control import SOCKET_NAME
from gateway.control.server import ControlServer
from gateway.delivery.http import HandOver
from gateway.egress import Network, NetworkMap, Refused, ZonePath
from gateway.errors import ConfigError, MedgwError, TransportError
from gateway.fairpool import FairPool
from gateway.fsutil import create_private, private_folder, shared_folder
from gateway.httpbody import BodyPace, BodyTooSlow, paced_chunks, read_capped
from gateway.httpfront import FrontDoor
from gateway.inbound import InboundLocks, InboundProcessor, InboundRequest
from gateway.instance import InstanceLock
from gateway.intake.api import LocalApi
from gateway.logs import Logger
from gateway.maintenance.approvals import Approvals
from gateway.maintenance.server import MaintenanceServer
from gateway.operations import Operations
from gateway.outbound import Outbound
from gateway.pki.crl import stale_crl_warnings
from gateway.pki.expiry import Held, expiring
from gateway.pki.ocsp import OcspClient
from gateway.pki.peers import PeerTrust, assess_peers
from gateway.pki.tls import (
    certificate_fingerprint,
    client_context,
    der_spki_fingerprint,
    fingerprint,
    server_context,
)
from gateway.pki.validate import Purpose, RevocationPolicy, ValidationResult, validate
from gateway.routing import admit
from gateway.sdnotify import Notifier
from gateway.spool import PENDING_STATES, Spool, open_spool

PEER_IDLE_CHECK_SECONDS = 5.0
PARALLEL_SENDS_PER_PEER = 8
INBOUND_PER_PEER = 8  # messages of one peer received at once; more wait their turn
# Worker threads that decrypt, verify and deliver received messages, and how many of
# them one peer's messages may take at once (gateway.fairpool): a peer flooding the
# gateway with expensive messages leaves the others threads that start at once.  A
# message larger than SMALL_BODY takes the peer's whole share: one such at a time.
INBOUND_WORKERS = 4
INBOUND_WORKERS_PER_PEER = 2
# A request body up to this size is held in memory (at most INBOUND_PER_PEER per peer);
# a larger one is streamed to a file under state_dir/incoming.
SMALL_BODY = 1 << 20
SUPERVISED_MAX_PAUSE = 30.0  # a failing loop is started again at most this long after
INTAKE_ERROR_REPEAT_SECONDS = 60.0  # a lasting intake failure is logged again this often
TRUST_REFRESH_SECONDS = 300.0
ASYNC_RECEIPT_ATTEMPTS = 5
CLIENT_CLOSE_MARGIN_SECONDS = 5.0  # after request_timeout_seconds, before a replaced client closes
_DER = Encoding.DER


@dataclass(frozen=True)
class RuntimeState:
    """Everything derived from one version of the configuration; swapped whole on reload."""

    config: GatewayConfig
    server_contexts: Mapping[str, ssl.SSLContext]  # by listener name: its zone's trust only
    clients: Mapping[str, PeerClient]
    peers_by_tls: Mapping[str, Peer]
    inbound: InboundProcessor
    trust: Mapping[str, PeerTrust]  # which of each peer's certificates are acceptable now
    # tls_spki_pins -> peer: certificates not listed but carrying a pinned key,
    # validated in full when they are presented.
    peers_by_spki: Mapping[str, Peer] = field(default_factory=dict)


class StartupError(MedgwError):
    """The daemon cannot start (the message says why and what to do)."""


class Daemon:
    def __init__(
        self,
        config_path: Path,
        *,
        environ: Mapping[str, str],
        clock: Clock,
        log: Logger,
        rng: random.Random | None = None,
    ) -> None:
        self._config_path = config_path
        self._clock = clock
        self._log = log
        self._notifier = Notifier(environ)
        self._rng = rng or random.Random()
        self._stop = asyncio.Event()
        self._stopping = False
        self._servers: list[As2Server] = []
        self._peer_tasks: dict[str, asyncio.Task[None]] = {}
        self._background: set[asyncio.Task[Any]] = set()
        self._reload_lock = asyncio.Lock()
        self._state: RuntimeState | None = None
        self._audit: AuditLog | None = None
        self._alerts: AlertCalls | None = None
        self._spool: Spool | None = None
        self._outbound: Outbound | None = None
        self._control: ControlServer | None = None
        self._maintenance: MaintenanceServer | None = None
        self._api: LocalApi | None = None
        self._handover: HandOver | None = None
        self._exporter: AuditExporter | None = None  # [audit.export]
        # (fingerprint, owner, use, days): certificate expiry alerts already raised
        self._expiry_alerted: set[tuple[str, str, str, int]] = set()
        self._export_task: asyncio.Task[None] | None = None
        # Per zone, with the way out it was made for: each keeps its OCSP cache.
        self._ocsp_clients: dict[str, tuple[ZonePath, OcspClient]] = {}
        # Every outbound connection, judged by the configuration in force when it is made.
        self._network = Network(self._network_map, on_refused=self._egress_refused)
        self._inbound_locks = InboundLocks()  # shared by the processors of every reload
        self._instance: InstanceLock | None = None  # one daemon per state folder
        self._inbound_slots: dict[str, asyncio.Semaphore] = {}  # per peer
        # Decrypting and verifying received messages: each peer gets its share.
        self._inbound_pool = FairPool(INBOUND_WORKERS, INBOUND_WORKERS_PER_PEER, name="inbound")

    # -- building -------------------------------------------------------------

    def _network_map(self) -> NetworkMap:
        return self.state.config.network_map

    def _egress_refused(self, refused: Refused) -> None:
        """The connect path refused a connection (may be called from a worker thread)."""
        self._log.warning(
            "egress.refused", route=refused.route, address=refused.address, port=refused.port
        )
        self._audit_sink().emit(
            AuditEvent(
                EventType.EGRESS_REFUSED,
                Outcome.FAILURE,
                Severity.ALERT,
                remote_address=refused.address,
                reason=refused.reason,
                detail={"route": refused.route, "port": refused.port},
            )
        )

    def _ocsp_client(self, zone: Zone, network: Network | None = None) -> OcspClient:
        """The zone's OCSP client: its cache survives reloads while the zone's way out
        (source address, egress) stays the same.  Its requests go through ``network``'s
        route of the zone (default: the daemon's, judged by the configuration in force)."""
        known = self._ocsp_clients.get(zone.name)
        if known is None or known[0] != zone.network:
            client = OcspClient(self._network.zone(zone.name))
            known = self._ocsp_clients[zone.name] = (zone.network, client)
        return known[1] if network is None else known[1].via(network.zone(zone.name))

    async def _assess_trust(self, config: GatewayConfig) -> dict[str, PeerTrust]:
        """Path validation (with the zone's revocation policy) of every configured peer cert.

        OCSP requests go out by ``config``'s zones: it is the configuration being judged
        (at a reload, the new one, before it is in force)."""
        network = Network(lambda: config.network_map, on_refused=self._egress_refused)
        return await assess_peers(
            config.peers,
            config.zones,
            at=self._clock.now(),
            ocsp_client=lambda zone: self._ocsp_client(zone, network),
        )

    def _audit_trust(
        self,
        config: GatewayConfig,
        trust: Mapping[str, PeerTrust],
        previous: Mapping[str, PeerTrust],
    ) -> None:
        """Alert on every configured certificate that is not acceptable (new ones only)."""
        self._alert_expiring(config)
        for name, verdicts in trust.items():
            before = previous.get(name)
            already = {(v.fingerprint, v.purpose) for v in before.rejected} if before else set()
            for verdict in verdicts.rejected:
                if (verdict.fingerprint, verdict.purpose) in already:
                    continue
                self._log.warning(
                    "peer.certificate_rejected",
                    peer=name,
                    purpose=verdict.purpose.value,
                    reason=verdict.result.reason,
                )
                self._audit_sink().emit(
                    AuditEvent(
                        EventType.PEER_CERTIFICATE_REJECTED,
                        Outcome.FAILURE,
                        Severity.ALERT,
                        peer=name,
                        reason=verdict.result.reason,
                        detail={
                            "purpose": verdict.purpose.value,
                            "subject": verdict.subject,
                            "sha256": verdict.fingerprint,
                            "revocation": verdict.result.revocation,
                        },
                    )
                )
        self._audit_unusable(trust, previous)
        now = self._clock.now()
        for zone in config.zones:
            for finding in stale_crl_warnings(zone.crls, at=now, warn_days=zone.crl_warn_days):
                self._log.warning("crl.stale", zone=zone.name, finding=finding.message)
                self._audit_sink().emit(
                    AuditEvent(
                        EventType.CRL_STALE,
                        Outcome.FAILURE,
                        Severity.ALERT if finding.severity == "error" else Severity.WARNING,
                        reason=finding.message,
                        detail={"zone": zone.name},
                    )
                )

    def _audit_unusable(
        self, trust: Mapping[str, PeerTrust], previous: Mapping[str, PeerTrust]
    ) -> None:
        """One alert when a peer becomes unusable (a use with no acceptable certificate:
        nothing is sent to it until that changes), one record when it is usable again;
        nothing while it stays as it was."""
        for name, verdicts in trust.items():
            before = previous.get(name)
            was = before.unusable if before is not None else None
            now = verdicts.unusable
            if now is not None and now != was:
                fix = (
                    f"put the peer's current certificates in peers.d/{name}.toml and reload "
                    f"(medgw check-config names each one and why it is refused); messages for "
                    f"{name} wait in the queue meanwhile"
                )
                self._log.error("peer.unusable", peer=name, reason=now, fix=fix)
                self._audit_sink().emit(
                    AuditEvent(
                        EventType.PEER_UNUSABLE,
                        Outcome.FAILURE,
                        Severity.ALERT,
                        peer=name,
                        reason=now,
                        detail={"fix": fix},
                    )
                )
            elif now is None and was is not None:
                self._log.info("peer.usable", peer=name)
                self._audit_sink().emit(
                    AuditEvent(
                        EventType.PEER_USABLE,
                        peer=name,
                        reason="every use has an acceptable certificate again",
                    )
                )

    def _unusable(self) -> dict[str, str]:
        """Peers the exchange cannot work with now, and why."""
        trust = self.state.trust
        return {name: t.unusable for name, t in trust.items() if t.unusable is not None}

    def _build_state(self, config: GatewayConfig, trust: Mapping[str, PeerTrust]) -> RuntimeState:
        assert self._spool is not None and self._audit is not None
        zones = {z.name: z for z in config.zones}
        try:
            # NET-4: each listener trusts only its zone's anchors and pins only its zone's peers.
            servers = {
                lst.name: server_context(
                    config.tls.identity,
                    zones[lst.zone].trust_anchors,
                    [
                        c
                        for p in config.peers
                        if p.zone == lst.zone
                        for c in trust[p.name].tls_certificates
                    ],
                    zones[lst.zone].min_version,
                    [pin for p in config.peers if p.zone == lst.zone for pin in p.tls_spki_pins],
                )
                for lst in config.listeners
            }
            contexts = {
                p.name: client_context(
                    config.tls.identity,
                    zones[p.zone].trust_anchors,
                    trust[p.name].tls_certificates,
                    zones[p.zone].min_version,
                )
                for p in config.peers
            }
        except (ssl.SSLError, OSError) as exc:
            raise StartupError(
                f"cannot build the TLS configuration: {exc}",
                fix="check the [tls] certificate and key and each [[zones]] trust_anchors",
            ) from exc
        clients = {
            p.name: PeerClient(
                contexts[p.name],
                config.runtime.connect_timeout_seconds,
                config.runtime.request_timeout_seconds,
                route=self._network.zone(p.zone),
                connections=PARALLEL_SENDS_PER_PEER,
            )
            for p in config.peers
        }
        peers_by_tls = {
            fingerprint(c.public_bytes(_DER)): p
            for p in config.peers
            for c in trust[p.name].tls_certificates
        }
        signers = {name: t.signing_certificates for name, t in trust.items()}
        inbound = InboundProcessor(
            config,
            self._spool,
            self._audit_sink(),
            self._log,
            self._clock,
            signers=signers,
            locks=self._inbound_locks,
            network=self._network,
        )
        peers_by_spki = {pin: p for p in config.peers for pin in p.tls_spki_pins}
        return RuntimeState(config, servers, clients, peers_by_tls, inbound, trust, peers_by_spki)

    def _operations(self) -> Operations:
        assert self._spool is not None and self._outbound is not None
        handover = self._handover
        return Operations(
            self.state.config,
            self._spool,
            self._audit_sink(),
            self._clock,
            self._outbound.wake,
            handover.wake if handover is not None else lambda: None,
            lambda message_id: self._spawn(self._outbound_prepare_again(message_id)),
            self._unusable,
        )

    async def _outbound_prepare_again(self, message_id: str) -> None:
        assert self._outbound is not None
        await self._outbound.prepare_again(message_id)

    @property
    def state(self) -> RuntimeState:
        assert self._state is not None
        return self._state

    # -- running --------------------------------------------------------------

    async def run(self) -> int:
        config = load_config(self._config_path)  # ConfigError propagates: refuse to start
        self._log = self._log.bind(node=config.as2_id)
        self._instance = InstanceLock(config.storage.state_dir)
        self._instance.acquire()  # before anything in the state folder is touched
        # What a killed run was receiving (bodies, decrypted working files): the peers
        # resend them.  Removed first, so that no plaintext outlives a start that fails.
        shutil.rmtree(config.storage.state_dir / "incoming", ignore_errors=True)
        shared_folder(config.storage.state_dir)  # holds the spool; often the inbox and outbox
        private_folder(config.storage.state_dir / "incoming")
        for warning in config.warnings:
            self._log.warning("config.warning", problem=str(warning))
        sealer = Sealer(config.audit) if config.audit is not None else None
        self._audit = AuditLog(
            config.storage.audit_log, self._clock, node=config.as2_id, sealer=sealer
        )
        self._alerts = AlertCalls(self._audit, config.responsible, self._log)
        self._spool = open_spool(config.storage.spool_path, self._clock)
        for folder in (config.storage.inbox_dir, config.storage.outbox_dir):
            shared_folder(folder)
        for peer in config.peers:
            shared_folder(config.storage.outbox_dir / peer.name)
            for service in peer.services:
                shared_folder(config.storage.outbox_dir / peer.name / service)
        trust = await self._assess_trust(config)
        self._audit_trust(config, trust, {})
        self._state = self._build_state(config, trust)
        self._outbound = Outbound(
            self._state, self._spool, self._audit_sink(), self._log, self._clock
        )
        try:
            # Before any request: deliveries a killed run left half-done are settled first.
            await asyncio.to_thread(self.state.inbound.recover)
            await self._outbound.recover()
            await self._start_listeners(config)
            self._control = ControlServer(
                config.storage.state_dir / SOCKET_NAME,
                self._operations,
                self._outbound.submit,
                self._outbound.status,
                front=FrontDoor("control", self._log, self._audit_sink, self._clock),
            )
            await self._control.start()
            await self._start_api(config)
            await self._start_maintenance(config)
            loop = asyncio.get_running_loop()
            loop.add_signal_handler(signal.SIGTERM, self._request_stop, "SIGTERM")
            loop.add_signal_handler(signal.SIGINT, self._request_stop, "SIGINT")
            loop.add_signal_handler(signal.SIGHUP, self._request_reload)
            self._sync_peer_tasks()
            self._spawn(self._supervised("outbox intake", self._intake_loop))
            self._handover = HandOver(
                self._spool,
                self._audit_sink,
                self._log,
                self._clock,
                lambda: self.state.config,
                self._rng,
                self._network.internal(),
            )
            self._spawn(self._supervised("hand-over to internal systems", self._handover.run))
            self._spawn(self._supervised("trust refresh", self._trust_refresh_loop))
            if config.audit is not None:
                every = config.audit.every_seconds
                self._spawn(self._supervised("audit checkpoints", lambda: self._seal_loop(every)))
            self._sync_exporter()
            if self._notifier.watchdog_interval:
                self._spawn(self._watchdog_loop(self._notifier.watchdog_interval))
            ports = {s.listener.name: s.port for s in self._servers}
            self._audit_sink().emit(
                AuditEvent(
                    EventType.DAEMON_STARTED,
                    detail={
                        "listeners": ports,
                        "local_api": config.api.endpoints() if config.api else [],
                        "maintenance": self._maintenance.port if self._maintenance else None,
                        "peers": [p.name for p in config.peers],
                    },
                )
            )
            self._log.info(
                "daemon.ready",
                listeners=ports,
                local_api=config.api.endpoints() if config.api else [],
                peers=[p.name for p in config.peers],
            )
            self._report_stranded_messages(config)
            self._notifier.ready(
                f"serving {len(self._servers)} listener(s), {len(config.peers)} peer(s)"
            )
            await self._stop.wait()
            await self._shutdown()
            # From here on a repeated SIGTERM must not kill the process mid-exit (asyncio
            # would restore the default action when the loop closes): ignore it.
            loop = asyncio.get_running_loop()
            for signum in (signal.SIGTERM, signal.SIGINT):
                loop.remove_signal_handler(signum)
                signal.signal(signum, signal.SIG_IGN)
        finally:
            await self._close()
        return 0

    async def _supervised(self, what: str, loop: Callable[[], Awaitable[None]]) -> None:
        """Run one of the daemon's long-lived loops, and start it again if it fails.

        A failure (a defect, or the spool's disk full for a moment) must not stop
        sending, intake or hand-overs silently until the next restart: it is logged
        and audited as an alert, and the loop starts again after a pause that grows
        from 1 s to 30 s while the failures go on.
        """
        pause = 1.0
        while not self._stopping:
            started = self._clock.monotonic()
            try:
                await loop()
                return
            except Exception as exc:
                if self._clock.monotonic() - started > SUPERVISED_MAX_PAUSE:
                    pause = 1.0  # it ran well for a while: this is a new failure
                cause = f"{type(exc).__name__}: {exc}"
                self._log.error(
                    "daemon.task_failed",
                    task=what,
                    error=cause,
                    restart_in_seconds=pause,
                    exc_info=exc,
                )
                with contextlib.suppress(Exception):  # the audit log's disk may be the problem
                    self._audit_sink().emit(
                        AuditEvent(
                            EventType.TASK_FAILED,
                            Outcome.FAILURE,
                            Severity.ALERT,
                            reason=f"{what} failed ({cause[:300]}); started again in {pause:.0f} s",
                            detail={"task": what},
                        )
                    )
            await self._sleep_unless_stopping(pause)
            pause = min(pause * 2, SUPERVISED_MAX_PAUSE)

    def _spawn(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _start_listeners(self, config: GatewayConfig) -> None:
        for listener in config.listeners:
            server = As2Server(
                listener,
                self._server_context_for(listener.name),
                self._handler_for(listener),
                self._audit_sink(),
                self._log,
                config.runtime.max_message_bytes,
                self._clock,
            )
            try:
                await server.start()
            except OSError as exc:
                raise StartupError(
                    f"cannot listen on {listener.address}:{listener.port} "
                    f"(listener {listener.name!r}): {exc.strerror}",
                    fix="free the port, or change [[listeners]] port/address in gateway.toml",
                ) from exc
            self._servers.append(server)

    async def _start_api(self, config: GatewayConfig) -> None:
        """The local submission API for internal systems (NET-3), when [api] is set."""
        if config.api is None:
            return
        assert self._outbound is not None
        self._api = LocalApi(
            self._api_clients,  # looked up anew after a reload: tokens change live
            self._outbound.submit,
            self._outbound.status,
            self._audit_sink(),
            clock=self._clock,
            log=self._log,
        )
        await self._api.start(
            socket_path=config.api.socket, address=config.api.address, port=config.api.port
        )

    async def _start_maintenance(self, config: GatewayConfig) -> None:
        if config.maintenance is None:
            return
        approvals = Approvals(config.storage.state_dir, self._clock)
        self._maintenance = MaintenanceServer(
            config.maintenance,
            self._operations,
            self._audit_sink,
            self._clock,
            self.reload,
            approvals.approved,
        )
        await self._maintenance.start()

    def _api_clients(self) -> tuple[ApiClient, ...]:
        api = self.state.config.api
        return api.clients if api is not None else ()

    def _audit_sink(self) -> AuditSink:
        """Where events go: the audit log, each alert with whom to call (gateway.alerts)."""
        assert self._alerts is not None
        return self._alerts

    def _server_context_for(self, listener_name: str) -> Callable[[], ssl.SSLContext]:
        def context() -> ssl.SSLContext:
            return self.state.server_contexts[listener_name]  # looked up anew after a reload

        return context

    def _handler_for(
        self, listener: Listener
    ) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
        async def handle(request: web.Request) -> web.StreamResponse:
            return await self._handle(request, listener)

        return handle

    async def _handle(self, request: web.Request, listener: Listener) -> web.StreamResponse:
        state = self.state
        transport = request.transport
        ssl_object = transport.get_extra_info("ssl_object") if transport else None
        der = ssl_object.getpeercert(binary_form=True) if ssl_object else None
        peer = state.peers_by_tls.get(fingerprint(der)) if der else None
        remote = request.remote or "unknown"
        if peer is None and der:
            pinned = state.peers_by_spki.get(der_spki_fingerprint(der) or "")
            if pinned is not None:
                # Accepted at the handshake by its key pin only: judge it now, in full.
                cert = x509.load_der_x509_certificate(der)
                verdict = await self._validate_spki_pinned(state, pinned, cert)
                if not verdict.valid:
                    self._refuse_spki_pinned(pinned, cert, verdict, remote, listener)
                    return web.Response(status=403, text="forbidden\n")
                peer = pinned
        if peer is None:
            # Pinned at the handshake; reaching here means the peer was removed by a reload.
            self._audit_sink().emit(
                AuditEvent(
                    EventType.PEER_AUTHENTICATION_FAILED,
                    Outcome.FAILURE,
                    Severity.ALERT,
                    remote_address=remote,
                    direction="inbound",
                    reason="TLS client certificate belongs to no configured peer",
                )
            )
            return web.Response(status=403, text="forbidden\n")
        refusal = admit(listener.name, listener.zone, peer)
        if refusal is not None:
            # Pinned per zone at the handshake; reaching here means the zones changed on reload.
            self._log.warning("zone.violation", peer=peer.name, listener=listener.name)
            self._audit_sink().emit(
                refusal.audit_event(direction="inbound", peer=peer.name, remote_address=remote)
            )
            return web.Response(status=403, text="forbidden\n")
        if self._spool is not None and self._spool.is_suspended(peer.name):
            # NET-6 "stopping an exchange": the peer keeps its message and retries later.
            self._audit_sink().emit(
                AuditEvent(
                    EventType.PEER_SUSPENDED_REFUSAL,
                    Outcome.FAILURE,
                    Severity.WARNING,
                    peer=peer.name,
                    remote_address=remote,
                    direction="inbound",
                    reason="exchange with this peer is suspended by an operator",
                )
            )
            return web.Response(status=503, text="exchange suspended, retry later\n")
        headers = {k.lower(): v for k, v in request.headers.items()}
        receipt = is_receipt(headers)
        bad = undecodable_header(headers)
        if bad is not None:
            self._audit_sink().emit(
                AuditEvent(
                    EventType.RECEIPT_INVALID if receipt else EventType.MESSAGE_REJECTED,
                    Outcome.FAILURE,
                    Severity.ALERT,
                    peer=peer.name,
                    remote_address=remote,
                    direction="inbound",
                    reason=f"header {bad} holds bytes that are not UTF-8 (AS2 headers are "
                    "US-ASCII): the request was refused unread",
                )
            )
            return web.Response(status=400, text="bad request\n")
        limit = MAX_RECEIPT_BYTES if receipt else state.config.runtime.max_message_bytes
        declared = request.content_length
        if declared is not None and declared > limit:
            # Refused before a byte of the body is read or a slot is taken.
            return self._refuse_body(
                peer,
                remote,
                413,
                f"declared Content-Length {declared} is above the limit of {limit} bytes "
                + ("for a receipt" if receipt else "(runtime.max_message_bytes)"),
            )
        # A peer's requests (messages and asynchronous receipts) beyond INBOUND_PER_PEER
        # wait here, holding only their connection: one peer cannot fill the disk with
        # bodies or take every worker.
        slots = self._inbound_slots.setdefault(peer.name, asyncio.Semaphore(INBOUND_PER_PEER))
        async with slots:
            if receipt:
                return await self._receive_receipt(request, peer)
            return await self._receive_message(request, state, peer, remote, headers)

    async def _receive_message(
        self,
        request: web.Request,
        state: RuntimeState,
        peer: Peer,
        remote: str,
        headers: dict[str, str],
    ) -> web.StreamResponse:
        """Spool the body of an AS2 message, process it, answer with its receipt."""
        body_path = self._incoming_dir() / f"{secrets.token_hex(8)}.as2"
        try:
            try:
                body = await self._receive_body(request, body_path, state.config.runtime)
            except BodyTooSlow as exc:
                return self._refuse_body(peer, remote, 408, exc.message)
            if body is None:
                return self._refuse_body(
                    peer,
                    remote,
                    413,
                    "message larger than runtime.max_message_bytes "
                    f"({state.config.runtime.max_message_bytes} bytes)",
                )
            if self.state is not state:
                # Trust changed while the body arrived (a reload, a revocation found by the
                # refresh): it is not judged under the trust of before. Nothing was
                # acknowledged; the peer resends and is judged anew from the handshake on.
                self._log.warning(
                    "inbound.trust_changed_during_upload", peer=peer.name, remote_address=remote
                )
                return web.Response(
                    status=503, headers={"Retry-After": "5"}, text="please resend\n"
                )
            result = await self._inbound_pool.run(
                peer.name,
                state.inbound.process,
                InboundRequest(peer, remote, headers, body),
                # a large body (spooled to a file) may be costly to read: it takes the
                # peer's whole share, small ones half of it each
                weight=INBOUND_WORKERS_PER_PEER if isinstance(body, Path) else 1,
            )
        except ConnectionError as exc:  # the peer hung up mid-upload: it will resend
            self._log.warning(
                "inbound.aborted", peer=peer.name, remote_address=remote, reason=str(exc)
            )
            return web.Response(status=400, text="incomplete request\n")
        except OSError as exc:  # the body could not be spooled: disk full, permissions
            request_seen = InboundRequest(peer, remote, headers, body_path)
            result = state.inbound.unavailable(request_seen, None, exc)
        except Exception as exc:  # a defect must not leak details to the peer
            self._log.exception("inbound.unexpected_error", peer=peer.name)
            self._audit_sink().emit(
                AuditEvent(
                    EventType.MESSAGE_REJECTED,
                    Outcome.FAILURE,
                    Severity.ALERT,
                    peer=peer.name,
                    direction="inbound",
                    remote_address=remote,
                    reason=f"internal error: {type(exc).__name__}: {exc}"[:500],
                )
            )
            return web.Response(status=500, text="internal error\n")
        finally:
            body_path.unlink(missing_ok=True)
        if self._handover is not None and result.status == 200:
            self._handover.wake()  # a hand-over to the internal system may be due now
        if result.receipt_url is not None and result.receipt is not None:
            self._spawn(self._deliver_async_receipt(peer, result.receipt_url, *result.receipt))
        response = web.Response(status=result.status, body=result.body)
        for name, value in result.headers:
            response.headers[name] = value
        return response

    def _refuse_body(self, peer: Peer, remote: str, status: int, reason: str) -> web.Response:
        """413 (too large) or 408 (too slow), audited; the connection is closed after it."""
        self._log.warning(
            "inbound.body_refused", peer=peer.name, remote_address=remote, status=status
        )
        self._audit_sink().emit(
            AuditEvent(
                EventType.MESSAGE_REJECTED,
                Outcome.FAILURE,
                Severity.WARNING,
                peer=peer.name,
                direction="inbound",
                remote_address=remote,
                reason=reason,
                detail={"http_status": status},
            )
        )
        text = "message too large\n" if status == 413 else "request body too slow\n"
        response = web.Response(status=status, text=text)
        response.force_close()
        return response

    async def _validate_spki_pinned(
        self, state: RuntimeState, peer: Peer, cert: x509.Certificate
    ) -> ValidationResult:
        """Path validation of an unlisted TLS client certificate with a pinned key."""
        zone = next(z for z in state.config.zones if z.name == peer.zone)
        return await validate(
            cert,
            anchors=zone.trust_anchors,
            purpose=Purpose.TLS_CLIENT,
            at=self._clock.now(),
            revocation=RevocationPolicy(zone.revocation),
            crls=zone.crls,
            ocsp=zone.ocsp,
            ocsp_client=self._ocsp_client(zone),
            policy=peer.policy,
        )

    def _refuse_spki_pinned(
        self,
        peer: Peer,
        cert: x509.Certificate,
        verdict: ValidationResult,
        remote: str,
        listener: Listener,
    ) -> None:
        subject = cert.subject.rfc4514_string()
        self._log.warning(
            "peer.authentication_failed", peer=peer.name, subject=subject, reason=verdict.reason
        )
        self._audit_sink().emit(
            AuditEvent(
                EventType.PEER_AUTHENTICATION_FAILED,
                Outcome.FAILURE,
                Severity.ALERT,
                peer=peer.name,
                remote_address=remote,
                direction="inbound",
                reason=f"TLS client certificate with a pinned key (tls_spki_pins) is not "
                f"acceptable: {verdict.reason}",
                detail={
                    "listener": listener.name,
                    "subject": subject,
                    "sha256": fingerprint(cert.public_bytes(_DER)),
                    "revocation": verdict.revocation,
                },
            )
        )

    async def _receive_receipt(self, request: web.Request, peer: Peer) -> web.StreamResponse:
        """An asynchronous receipt POSTed by a peer for one of our messages."""
        assert self._outbound is not None
        pace = BodyPace.of(self.state.config.runtime)
        remote = request.remote or "unknown"
        try:
            body = await read_capped(request.content, MAX_RECEIPT_BYTES, pace)
        except BodyTooSlow as exc:
            return self._refuse_body(peer, remote, 408, exc.message)
        if len(body) > MAX_RECEIPT_BYTES:
            return self._refuse_body(
                peer, remote, 413, f"receipt larger than {MAX_RECEIPT_BYTES} bytes"
            )
        outcome = await self._outbound.receive_async_receipt(
            peer, request.headers.get("Content-Type", ""), body
        )
        return web.Response(status=200, text=f"receipt {outcome}\n")

    async def _deliver_async_receipt(
        self, peer: Peer, url: str, headers: tuple[tuple[str, str], ...], body: bytes
    ) -> None:
        """POST a receipt the sender asked to get later; a few tries with back-off."""
        message_id = dict(headers).get("Original-Message-ID")
        delay = 1.0
        for attempt in range(1, ASYNC_RECEIPT_ATTEMPTS + 1):
            client = self.state.clients.get(peer.name)
            if client is None:
                return
            try:
                answer = await client.post(url, headers, body)
                if 200 <= answer.status < 300:
                    self._log.info("receipt.delivered_async", peer=peer.name, attempt=attempt)
                    return
                problem = f"HTTP {answer.status}"
            except TransportError as exc:
                if exc.refused:  # NET-4: the URL is outside the peer's zone as configured now
                    why = f"{exc}; not tried again"
                    break
                problem = str(exc)
            self._log.warning("receipt.async_delivery_failed", peer=peer.name, reason=problem)
            await asyncio.sleep(delay)
            delay = min(delay * 4, 300.0)
        else:
            why = f"{ASYNC_RECEIPT_ATTEMPTS} attempts failed, the last: {problem}"
        self._audit_sink().emit(
            AuditEvent(
                EventType.RECEIPT_SENT,
                Outcome.FAILURE,
                Severity.WARNING,
                peer=peer.name,
                message_id=message_id,
                direction="inbound",
                reason=f"asynchronous receipt not delivered to {url}: {why}; the peer will "
                "resend the message and get it again",
            )
        )

    def _incoming_dir(self) -> Path:
        return self.state.config.storage.state_dir / "incoming"

    @staticmethod
    async def _receive_body(
        request: web.Request, path: Path, runtime: Runtime
    ) -> bytes | Path | None:
        """The request body: in memory up to SMALL_BODY, else streamed to ``path``
        (from the start when the declared length says so); None if it exceeds the
        size limit."""
        held: list[bytes] = []
        size = 0
        declared = request.content_length
        out = create_private(path) if declared is not None and declared > SMALL_BODY else None
        try:
            async for chunk in paced_chunks(request.content, BodyPace.of(runtime)):
                size += len(chunk)
                if size > runtime.max_message_bytes:
                    return None
                if out is None and size <= SMALL_BODY:
                    held.append(chunk)
                    continue
                if out is None:  # too big to hold: to the file from here on
                    out = create_private(path)
                    held.append(chunk)
                    await asyncio.to_thread(out.writelines, held)
                    held.clear()
                else:
                    await asyncio.to_thread(out.write, chunk)
        finally:
            if out is not None:
                out.close()
        return path if out is not None else b"".join(held)

    async def _intake_loop(self) -> None:
        """Take documents from the outbox.  A failure (say, the spool's disk is full)
        leaves them there and is logged when it starts, every INTAKE_ERROR_REPEAT_SECONDS
        while it lasts (not at every poll), and when it ends."""
        assert self._outbound is not None
        failing: str | None = None  # the error being reported
        said_at = 0.0
        polls = 0  # failed polls since it was last said
        while not self._stopping:
            error, fix = None, None
            try:
                await self._outbound.intake_once()
            except MedgwError as exc:
                error, fix = exc.message, exc.fix
            except OSError as exc:
                error = str(exc)
                fix = "check the outbox and state folders' permissions and free space (df -h)"
            now = self._clock.monotonic()
            if error is None:
                if failing is not None:
                    self._log.info("intake.recovered", failed_polls=polls)
                    failing, polls = None, 0
            elif error != failing or now - said_at >= INTAKE_ERROR_REPEAT_SECONDS:
                self._log.error(
                    "intake.failed",
                    error=error,
                    fix=f"{fix}; the documents stay in the outbox until then",
                    failed_polls=polls + 1,
                )
                failing, said_at, polls = error, now, 0
            else:
                polls += 1
            await asyncio.sleep(self.state.config.runtime.outbox_poll_seconds)

    def _sync_peer_tasks(self) -> None:
        """One sender task per configured peer: start new ones, stop removed ones."""
        assert self._outbound is not None
        names = {p.name for p in self.state.config.peers}
        for name in list(self._peer_tasks):
            if name not in names:
                self._peer_tasks.pop(name).cancel()
        for name in names - set(self._peer_tasks):
            self._outbound.wakeups[name] = asyncio.Event()
            self._peer_tasks[name] = asyncio.get_running_loop().create_task(
                self._supervised(
                    f"sender for peer {name}", functools.partial(self._peer_loop, name)
                )
            )

    async def _peer_loop(self, name: str) -> None:
        """Send this peer's due messages, up to PARALLEL_SENDS_PER_PEER at a time."""
        assert self._outbound is not None and self._spool is not None
        wakeup = self._outbound.wakeups[name]
        inflight: dict[asyncio.Task[float], str] = {}  # task -> Message-ID
        # Started again after a failure: what the failed run was sending is queued again.
        for message_id in self._spool.requeue_interrupted(peer=name):
            self._log.info("message.requeued_after_failure", peer=name, message_id=message_id)
        resume_at = 0.0  # the whole peer rests after a transport failure
        try:
            while not self._stopping:
                wakeup.clear()
                state = self.state
                peer = state.config.peer(name)
                if peer is None:
                    break
                now = self._clock.now().timestamp()
                free = PARALLEL_SENDS_PER_PEER - len(inflight) if now >= resume_at else 0
                if state.trust[name].unusable is not None:
                    free = 0  # said once (peer.unusable); its messages wait, unsent
                claimed, next_at = await self._outbound.due_for_sending(peer, now, free)
                for record in claimed:
                    task = asyncio.get_running_loop().create_task(
                        self._outbound.send_one(record, peer, state.clients[name], self._rng)
                    )
                    inflight[task] = record.message_id
                wait = PEER_IDLE_CHECK_SECONDS
                if now < resume_at:
                    wait = resume_at - now
                elif next_at is not None and next_at > now:
                    wait = min(wait, next_at - now)
                waiters: set[asyncio.Future[Any]] = {*inflight}
                waiters.add(asyncio.ensure_future(wakeup.wait()))
                done, _ = await asyncio.wait(
                    waiters, timeout=wait, return_when=asyncio.FIRST_COMPLETED
                )
                for future in waiters - inflight.keys():
                    future.cancel()
                for finished in [task for task in inflight if task in done]:
                    message_id = inflight.pop(finished)
                    try:
                        pause = finished.result()
                    except Exception as exc:  # a defect must not stop this peer's queue
                        pause = self._send_crashed(name, message_id, exc)
                    if pause > 0:
                        # The peer is unreachable: back off for the whole peer instead of
                        # trying every queued message in a row.
                        resume_at = max(resume_at, self._clock.now().timestamp() + pause)
            if inflight:
                await asyncio.gather(*inflight, return_exceptions=True)
        finally:
            for task in inflight:
                task.cancel()  # send_one parks an interrupted message back in the queue
            if inflight:
                await asyncio.gather(*inflight, return_exceptions=True)

    def _send_crashed(self, peer: str, message_id: str, exc: Exception) -> float:
        """An unexpected error while sending: park the message, alert, keep the queue going."""
        delay = self.state.config.runtime.retry_max_seconds
        assert self._spool is not None
        self._spool.mark_retry(
            message_id,
            f"internal error: {type(exc).__name__}",
            self._clock.now().timestamp() + delay,
        )
        self._log.error("message.send_crashed", peer=peer, message_id=message_id, exc_info=exc)
        self._audit_sink().emit(
            AuditEvent(
                EventType.MESSAGE_SEND_FAILED,
                Outcome.FAILURE,
                Severity.ALERT,
                peer=peer,
                message_id=message_id,
                direction="outbound",
                reason=f"internal error while sending ({type(exc).__name__}); retried in "
                f"{delay:.0f} s; please report it with the daemon's log",
            )
        )
        return 0.0

    async def _sleep_unless_stopping(self, seconds: float) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._stop.wait(), timeout=seconds)

    async def _seal_loop(self, every: float) -> None:
        """A signed checkpoint every ``every`` seconds, if records were written since."""
        while not self._stopping:
            await self._sleep_unless_stopping(every)
            if not self._stopping:
                assert self._audit is not None
                await asyncio.to_thread(self._audit.checkpoint, "time")

    async def _watchdog_loop(self, interval: float) -> None:
        while True:
            self._notifier.watchdog()
            await asyncio.sleep(interval)

    # -- signals --------------------------------------------------------------

    def _request_stop(self, signame: str) -> None:
        if not self._stop.is_set():
            self._log.info("daemon.stopping", signal=signame)
            self._stop.set()

    def _request_reload(self) -> None:
        if self._stopping:
            # Shutdown may still be waiting for worker threads, which no new work can
            # use: a reload now could only fail (or apply a configuration nobody serves).
            self._log.info("config.reload_skipped", reason="the daemon is stopping")
            return
        self._spawn(self.reload())

    async def reload(self) -> bool:
        async with self._reload_lock:
            self._notifier.reloading()
            old = self.state
            try:
                new_config = await asyncio.to_thread(load_config, self._config_path)
                unchanged = self._restart_only_changes(old.config, new_config)
                if unchanged:
                    raise StartupError(
                        f"{unchanged} cannot change while running",
                        fix="restart medgw (systemctl restart medgw) to apply it",
                    )
                new_trust = await self._assess_trust(new_config)
                new_state = self._build_state(new_config, new_trust)
            except Exception as exc:
                # A defect must be a failed reload too, never a dead task that leaves the
                # old configuration half-replaced and systemd waiting in RELOADING.
                if isinstance(exc, ConfigError):
                    problems = [str(p) for p in exc.problems]
                elif isinstance(exc, MedgwError):
                    problems = [str(exc)]
                else:
                    problems = [
                        f"unexpected error while reading {self._config_path} "
                        f"({type(exc).__name__}: {exc}); run `medgw check-config --config "
                        f"{self._config_path}` and report it if it names no problem"
                    ]
                defect: dict[str, Any] = {} if isinstance(exc, MedgwError) else {"exc_info": exc}
                self._log.error(
                    "config.reload_failed",
                    problems=problems,
                    action="still serving with the previous configuration",
                    **defect,
                )
                with contextlib.suppress(Exception):  # the audit log's disk may be the problem
                    self._audit_sink().emit(
                        AuditEvent(
                            EventType.CONFIG_RELOAD_FAILED,
                            Outcome.FAILURE,
                            Severity.WARNING,
                            reason="; ".join(problems)[:2000],
                        )
                    )
                self._notifier.ready("reload failed; serving previous configuration")
                return False
            self._audit_trust(new_config, new_state.trust, old.trust)
            self._swap(new_state)
            for client in old.clients.values():
                self._spawn(_close_later(client, old.config.runtime))
            self._log.info("config.reloaded", peers=[p.name for p in new_config.peers])
            self._audit_sink().emit(
                AuditEvent(
                    EventType.CONFIG_RELOADED, detail={"peers": [p.name for p in new_config.peers]}
                )
            )
            self._report_stranded_messages(new_config)
            self._notifier.ready("configuration reloaded")
            return True

    def _report_stranded_messages(self, config: GatewayConfig) -> None:
        """Messages that wait for something no longer configured: said, never a reason for
        a start or a reload to fail (the spool or the audit log may be unwritable now)."""
        try:
            self._report_unconfigured_peers(config)
            self._report_removed_recipients(config)
        except Exception as exc:
            self._log.error(
                "queue.check_failed",
                error=f"{type(exc).__name__}: {exc}",
                fix="run `medgw queue list` to see what waits; look at the spool's and the "
                "audit log's disk",
            )

    def _report_removed_recipients(self, config: GatewayConfig) -> None:
        """Alert about messages queued for a peer, encrypted to a certificate of it that is
        no longer configured: the peer's rotation has moved on, and unless it still has
        that key it cannot decrypt them (their plaintext is not kept)."""
        assert self._spool is not None
        for peer in config.peers:
            current = {certificate_fingerprint(c) for c in peer.encryption_certificates}
            for encrypted_for, count in sorted(self._spool.pending_by_recipient(peer.name).items()):
                if encrypted_for in current:
                    continue
                fix = (
                    f"ask {peer.name} to keep the decryption key of that certificate until "
                    f"`medgw queue list --peer {peer.name}` shows nothing waiting; a message "
                    "it can no longer decrypt comes back failed (decryption-failed) and must "
                    "be submitted again from its source"
                )
                self._log.error(
                    "queue.recipient_certificate_removed",
                    peer=peer.name,
                    messages=count,
                    certificate_sha256=encrypted_for,
                    fix=fix,
                )
                self._audit_sink().emit(
                    AuditEvent(
                        EventType.QUEUE_RECIPIENT_REMOVED,
                        Outcome.FAILURE,
                        Severity.ALERT,
                        peer=peer.name,
                        direction="outbound",
                        reason=f"{count} message(s) waiting for {peer.name!r} are encrypted to "
                        f"a certificate no longer in {peer.source.name} "
                        f"(SHA-256 {encrypted_for[:16]}...): the peer can read them only "
                        "while it keeps that key",
                        detail={"certificate_sha256": encrypted_for, "messages": count, "fix": fix},
                    )
                )

    def _report_unconfigured_peers(self, config: GatewayConfig) -> None:
        """Alert about messages waiting for a peer that is no longer configured: no sender
        runs for it, so they are neither sent nor expired until an operator acts."""
        assert self._spool is not None
        configured = {p.name for p in config.peers}
        waiting: dict[str, dict[str, int]] = {}
        for (peer, state), count in self._spool.counts().items():
            if peer not in configured and state in PENDING_STATES:
                waiting.setdefault(peer, {})[state] = count
        for peer, states in sorted(waiting.items()):
            total = sum(states.values())
            fix = (
                f"to send them, configure the peer again (peers.d/{peer}.toml) and reload; "
                f"to withdraw them: medgw queue list --peer {peer} --state queued, then "
                "medgw queue cancel ID for each"
            )
            self._log.error("queue.peer_not_configured", peer=peer, messages=states, fix=fix)
            self._audit_sink().emit(
                AuditEvent(
                    EventType.QUEUE_PEER_NOT_CONFIGURED,
                    Outcome.FAILURE,
                    Severity.ALERT,
                    peer=peer,
                    direction="outbound",
                    reason=f"{total} message(s) for peer {peer!r} wait in the queue, but no "
                    "peer of that name is configured: they are neither sent nor expired",
                    detail={"states": states, "fix": fix},
                )
            )

    def _swap(self, new_state: RuntimeState) -> None:
        """Make ``new_state`` current; drop connections whose certificate it no longer accepts."""
        self._state = new_state
        assert self._outbound is not None and self._alerts is not None
        self._alerts.responsible = new_state.config.responsible
        if self._maintenance is not None and new_state.config.maintenance is not None:
            self._maintenance.update(new_state.config.maintenance)
        self._outbound.use(new_state)
        self._sync_peer_tasks()
        self._sync_exporter()
        for server in self._servers:
            closed = server.close_unaccepted(set(new_state.peers_by_tls))
            for remote, subject in closed:
                self._audit_sink().emit(
                    AuditEvent(
                        EventType.TLS_CONNECTION_CLOSED,
                        Outcome.SUCCESS,
                        Severity.WARNING,
                        remote_address=remote,
                        reason="the peer's certificate is no longer acceptable "
                        "(revoked, expired or removed from its peers.d file)",
                        detail={"listener": server.listener.name, "subject": subject},
                    )
                )

    async def _trust_refresh_loop(self) -> None:
        """Re-judge peer certificates as time passes (expiry, CRL nextUpdate, OCSP)."""
        while True:
            await asyncio.sleep(TRUST_REFRESH_SECONDS)
            async with self._reload_lock:
                old = self.state
                trust = await self._assess_trust(old.config)
                pins = {n: {v.fingerprint for v in t.tls if v.valid} for n, t in trust.items()}
                old_pins = {
                    n: {v.fingerprint for v in t.tls if v.valid} for n, t in old.trust.items()
                }
                self._audit_trust(old.config, trust, old.trust)
                changed = pins != old_pins or any(
                    trust[n].signing_certificates != old.trust[n].signing_certificates
                    or trust[n].encryption_recipient != old.trust[n].encryption_recipient
                    for n in trust
                )
                if changed:
                    self._swap(self._build_state(old.config, trust))
                    for client in old.clients.values():
                        self._spawn(_close_later(client, old.config.runtime))
                    self._log.info("trust.refreshed")

    @staticmethod
    def _restart_only_changes(old: GatewayConfig, new: GatewayConfig) -> str | None:
        if old.listeners != new.listeners:
            return "[[listeners]]"
        if old.storage != new.storage:
            return "[storage]"
        if old.as2_id != new.as2_id:
            return "gateway.as2_id"
        if old.audit != new.audit:
            return "[audit]"
        if _api_endpoints(old) != _api_endpoints(new):
            return "[api] socket and listen"
        if _maintenance_endpoint(old) != _maintenance_endpoint(new):
            return "[maintenance] listen and host_key (and whether it is there)"
        return None

    # -- stopping -------------------------------------------------------------

    async def _shutdown(self) -> None:
        self._stopping = True
        self._notifier.stopping()
        deadline = self.state.config.runtime.shutdown_deadline_seconds
        start = self._clock.monotonic()
        for server in self._servers:
            server.stop_accepting()
        assert self._outbound is not None
        for event in self._outbound.wakeups.values():
            event.set()
        senders = list(self._peer_tasks.values())
        if senders:
            _, pending = await asyncio.wait(senders, timeout=deadline)
            for task in pending:
                task.cancel()  # send_one parks the message back in the queue
            await asyncio.gather(*pending, return_exceptions=True)

        def remaining() -> float:
            return max(0.5, deadline - (self._clock.monotonic() - start))

        for server in self._servers:
            await server.stop(remaining())
        if self._api is not None:
            await self._api.stop(remaining())
        if self._control is not None:
            await self._control.stop(remaining())
        if self._maintenance is not None:
            await self._maintenance.stop()
        for task in list(self._background):
            task.cancel()
        await asyncio.gather(*self._background, return_exceptions=True)
        for client in self.state.clients.values():
            await client.close()
        self._audit_sink().emit(AuditEvent(EventType.DAEMON_STOPPED))
        if self._exporter is not None and self._export_task is not None:
            await self._exporter.finish(self._export_task, min(5.0, remaining()))
        self._log.info("daemon.stopped")

    def _alert_expiring(self, config: GatewayConfig) -> None:
        """An alert for each of our and the peers' certificates that expires within 30, 7
        and 1 day(s): once per certificate and threshold in this run."""
        for found in expiring(_held_certificates(config), self._clock.now()):
            key = (found.fingerprint, found.held.owner, found.held.use, found.threshold_days)
            if key in self._expiry_alerted:
                continue
            self._expiry_alerted.add(key)
            self._log.warning(
                "pki.certificate_expiring",
                owner=found.held.owner,
                use=found.held.use,
                days_left=round(found.days_left, 1),
            )
            self._audit_sink().emit(
                AuditEvent(
                    EventType.CERTIFICATE_EXPIRING,
                    Outcome.FAILURE if found.days_left <= 0 else Outcome.SUCCESS,
                    Severity.ALERT,
                    peer=found.held.peer,
                    reason=found.text(),
                    detail={
                        "use": found.held.use,
                        "fingerprint": found.fingerprint,
                        "threshold_days": found.threshold_days,
                        "days_left": round(found.days_left, 2),
                        "not_after": found.not_after.isoformat(timespec="seconds"),
                        "fix": "issue and install a new certificate (README: rotation runbook)",
                    },
                )
            )

    def _export_target(self) -> ExportTarget | None:
        """Where the audit trail goes, by the configuration in force (None: not exported)."""
        config = self.state.config
        settings = config.audit_export
        if settings is None:
            return None
        return ExportTarget(
            settings,
            settings.identity or config.tls.identity,
            ExportSource(config.as2_id, config.institution_id or config.name),
        )

    def _sync_exporter(self) -> None:
        """Start the audit export when [audit.export] is set (at start or by a reload); it
        stops by itself when a reload removes it, and reconnects when one changes it."""
        if self._stopping or self.state.config.audit_export is None:
            return
        if self._export_task is not None and not self._export_task.done():
            return
        config = self.state.config
        self._exporter = AuditExporter(
            self._export_target,
            log_path=config.storage.audit_log,
            state_dir=config.storage.state_dir,
            audit=self._audit_sink(),
            route=self._network.internal(),
            log=self._log,
            clock=self._clock,
        )
        self._export_task = asyncio.get_running_loop().create_task(
            self._supervised("audit export", self._exporter.run)
        )

    async def _close(self) -> None:
        if self._export_task is not None:
            self._export_task.cancel()
            with contextlib.suppress(BaseException):
                await self._export_task
        # Also after a start that failed half-way (a port in use): the peers' HTTP
        # clients are closed here, not only by an orderly shutdown (closing twice is fine).
        if self._state is not None:
            for client in self._state.clients.values():
                await client.close()
        # Work still running in worker threads (a received message being delivered, a
        # submission being sealed) finishes first: the spool and the audit log it
        # writes to are closed only then.
        await self._inbound_pool.close()
        await asyncio.get_running_loop().shutdown_default_executor()
        if self._spool is not None:
            self._spool.close()
        if self._audit is not None:
            self._audit.close()
        if self._instance is not None:
            self._instance.release()


def _held_certificates(config: GatewayConfig) -> list[Held]:
    """Every certificate the configuration uses, ours and the peers'."""
    ours = "this gateway"
    held = [
        Held(ours, "TLS", config.tls.identity.certificate),
        Held(ours, "S/MIME signing", config.smime.signing.certificate),
        *(Held(ours, "S/MIME decryption", k.certificate) for k in config.smime.decryption_keys),
    ]
    export = config.audit_export
    if export is not None and export.identity is not None:
        held.append(Held(ours, "audit export client", export.identity.certificate))
    for peer in config.peers:
        owner = f"peer {peer.name!r}"
        held += [Held(owner, "TLS", c, peer.name) for c in peer.tls_certificates]
        held += [Held(owner, "S/MIME signing", c, peer.name) for c in peer.signing_certificates]
        held += [
            Held(owner, "S/MIME encryption", c, peer.name) for c in peer.encryption_certificates
        ]
    return held


def _maintenance_endpoint(config: GatewayConfig) -> tuple[object, ...] | None:
    found = config.maintenance
    return (found.address, found.port, found.host_key_path) if found is not None else None


def _api_endpoints(config: GatewayConfig) -> tuple[object, ...] | None:
    api = config.api
    return (api.socket, api.address, api.port) if api is not None else None


async def _close_later(client: PeerClient, runtime: Runtime) -> None:
    """Close a replaced client once sends that were using it have had time to finish.

    No new request starts on it, and each one already started ends within the
    ``request_timeout_seconds`` it was made with (a large document to a slow peer
    may need all of it): closing sooner would break off a send in progress.
    """
    try:
        await asyncio.sleep(runtime.request_timeout_seconds + CLIENT_CLOSE_MARGIN_SECONDS)
    finally:
        await client.close()
