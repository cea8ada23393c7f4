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
import random
import shutil
import signal
import ssl
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from gateway.alerts import AlertCalls
from gateway.atrest import KeyStore, Vault
from gateway.audit import AuditEvent, AuditLog, AuditSink, EventType, Outcome, Severity
from gateway.audit.export.cursor import load_position
from gateway.audit.export.exporter import CURSOR_NAME
from gateway.audit.first import log_not_written
from gateway.audit.log import last_record_time
from gateway.audit.order import clock_behind
from gateway.audit.owed import changes_since
from gateway.audit.seal import CheckpointKeys, Sealer
from gateway.audit.watch import BrokenRecords, TrailWatch
from gateway.backup.bundle import WORK_PREFIX, remove_leftovers
from gateway.backup.restore import WORK as RESTORE_WORK
from gateway.channel.server import As2Server
from gateway.clock import Clock
from gateway.config import ApiClient, GatewayConfig, load_config
from gateway.config.access import access_problems
from gateway.control import SOCKET_NAME
from gateway.control.server import ControlServer
from gateway.daemon.as2_handler import As2Handler
from gateway.daemon.crls import DaemonCrls
from gateway.daemon.export import AuditExport
from gateway.daemon.leases import LeaseKeeper
from gateway.daemon.observe import Observer
from gateway.daemon.reload import Reloader
from gateway.daemon.reports import report_config_warnings, report_stranded_messages
from gateway.daemon.sending import Senders
from gateway.daemon.spoolview import SpoolView
from gateway.daemon.spoolwatch import SpoolReachability
from gateway.daemon.state import Parts, RuntimeState, StartupError, build_state
from gateway.daemon.tasks import Tasks
from gateway.daemon.trust import TrustKeeper, unusable
from gateway.delivery.http import HandOver
from gateway.egress import Network, NetworkMap, Refused
from gateway.emergency.actions import Emergency
from gateway.emergency.mode import MarkingSink
from gateway.emergency.relax import relaxed
from gateway.errors import (
    AuditNotWrittenError,
    ConfigError,
    MedgwError,
    NodeNameTakenError,
    SpoolReplacedError,
)
from gateway.fsutil import NOT_WRITABLE, private_folder, shared_folder
from gateway.httpfront import FrontDoor
from gateway.inbound import InboundLocks
from gateway.inbound.outages import StorageOutages
from gateway.instance import InstanceLock
from gateway.intake.api import LocalApi
from gateway.listening import bind_cause, bind_fix
from gateway.logs import Logger
from gateway.maintenance import accounts
from gateway.maintenance.approvals import Approvals
from gateway.maintenance.server import MaintenanceServer
from gateway.operations import Operations, Reloaded, ReloadRefused
from gateway.outbound import Outbound
from gateway.pki.peers import PeerTrust, TrustSettings
from gateway.report import own_certificates_usable
from gateway.retention.audit_files import AuditFiles
from gateway.retention.purge import Retention
from gateway.sdnotify import Notifier
from gateway.spool import Claimant, Spool, open_spool

EMERGENCY_TICK_SECONDS = 1.0  # how soon emergency mode is left when its time is up
# Threads for the pipeline's steps (asyncio.to_thread).  They mostly wait on fsyncs:
# with asyncio's default (CPUs + 4: 6 on two cores) and a disk whose fsync takes
# 2-4 ms, the sender's threads spent 87-92 % of their time waiting in a sync and set
# the pace; 16 let more of them share each commit.  Measured again with fast (0.2-1.6
# ms) and slow (3 ms) flushes: 8 and 16 alike, 4 slower on both (bench/README.md).
WORKER_THREADS = 16


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
        self._servers: list[As2Server] = []
        self._state: RuntimeState | None = None
        self._audit: AuditLog | None = None
        self._alerts: AlertCalls | None = None
        self._spool: Spool | None = None
        self._view: SpoolView | None = None  # what the event loop asks of it, in memory
        self._vault: Vault | None = None  # encryption at rest (gateway.atrest)
        self._outbound: Outbound | None = None
        self._tasks: Tasks | None = None
        self._parts: Parts | None = None  # what every runtime state is built with
        self._trust: TrustKeeper | None = None
        self._senders: Senders | None = None
        self._handler: As2Handler | None = None
        self._reloader: Reloader | None = None
        self._control: ControlServer | None = None
        self._maintenance: MaintenanceServer | None = None
        self._emergency: Emergency | None = None
        self._api: LocalApi | None = None
        self._handover: HandOver | None = None
        self._export: AuditExport | None = None  # [audit.export]
        self._watch: TrailWatch | None = None  # the daemon's own check of its trail
        self._broken: BrokenRecords | None = None  # alerts on bad records, once each
        self._replaced: SpoolReplacedError | None = None  # the spool restored under it
        # Every outbound connection, judged by the configuration in force when it is made.
        self._network = Network(self._network_map, on_refused=self._egress_refused)
        self._inbound_locks = InboundLocks()  # shared by the processors of every reload
        self._instance: InstanceLock | None = None  # one daemon per state folder
        self._sink: AuditSink | None = None  # the alerts, counted by the metrics
        self._crls: DaemonCrls | None = None
        # Received documents that could not be stored, alerted once per cause.
        self._outages = StorageOutages(clock)
        self._observer = Observer(
            clock,
            log,
            config=lambda: self._state.config if self._state is not None else None,
            spool=lambda: self._view,
            export_backlog=self._export_backlog,
            outages=self._outages,
        )

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

    def _build_state(self, config: GatewayConfig, trust: Mapping[str, PeerTrust]) -> RuntimeState:
        assert self._parts is not None
        return build_state(config, trust, self._parts)

    def _operations(self) -> Operations:
        assert self._spool is not None and self._outbound is not None
        assert self._view is not None
        view = self._view
        # Operator actions run in worker threads (their spool calls never hold the event
        # loop): what they wake or start is done on the loop.
        loop, outbound = asyncio.get_running_loop(), self._outbound

        def wake(peer: str) -> None:
            loop.call_soon_threadsafe(outbound.wake, peer)

        def wake_handover() -> None:
            loop.call_soon_threadsafe(self._wake_handover)

        def prepare(message_id: str) -> None:
            loop.call_soon_threadsafe(self._prepare_again, message_id)

        return Operations(
            self.state.config,
            self._spool,
            self._audit_sink(),
            self._clock,
            wake,
            wake_handover,
            prepare,
            lambda: unusable(self.state.trust),
            self._audit_files(),
            self._emergency,
            self._maintenance.unlock if self._maintenance is not None else None,
            self._vault,
            suspension_changed=view.suspension_changed,
        )

    def _audit_files(self) -> AuditFiles:
        """The closed audit files retention may dispose of: never one the export (when
        configured) has not sent yet."""
        assert self._audit is not None
        storage = self.state.config.storage
        cursor = storage.state_dir / CURSOR_NAME

        def exported() -> int | None:
            if self.state.config.audit_export is None:
                return None
            position = load_position(cursor)
            return position.seq if position is not None else 0

        return AuditFiles(storage.audit_log, self._audit.checkpoint, exported)

    def _prepare_again(self, message_id: str) -> None:
        self.tasks.spawn(self._outbound_prepare_again(message_id))

    async def _outbound_prepare_again(self, message_id: str) -> None:
        assert self._outbound is not None
        await self._outbound.prepare_again(message_id)

    def _wake_handover(self) -> None:
        if self._handover is not None:
            self._handover.wake()

    @property
    def state(self) -> RuntimeState:
        assert self._state is not None
        return self._state

    @property
    def tasks(self) -> Tasks:
        assert self._tasks is not None
        return self._tasks

    # -- running --------------------------------------------------------------

    async def run(self) -> int:
        # The worker threads of asyncio.to_thread: the sending pipeline's steps, which
        # mostly wait for the spool's commits, audit fsyncs and file syncs.
        asyncio.get_running_loop().set_default_executor(
            ThreadPoolExecutor(WORKER_THREADS, thread_name_prefix="worker")
        )
        config = load_config(self._config_path)  # ConfigError propagates: refuse to start
        # Nor does it start with a certificate of ours that every peer refuses.
        own_warnings = await own_certificates_usable(config, at=self._clock.now())
        self._log = self._log.bind(node=config.cluster.node_name)
        # A state folder or trail this user may not write: refused before it is touched.
        # An inbox or outbox: said now, and by the readiness until it is mended.
        access = access_problems(config, daemon=True)
        if refused := [p for p in access if p.severity == "error"]:
            raise ConfigError(refused)
        for problem in access:
            self._log.warning("storage.not_writable", problem=str(problem))
        self._instance = InstanceLock(config.storage.state_dir)
        self._instance.acquire()  # before anything in the state folder is touched
        # What a killed run was receiving (bodies, decrypted working files): the peers
        # resend them.  Removed first, so that no plaintext outlives a start that fails.
        shutil.rmtree(config.storage.state_dir / "incoming", ignore_errors=True)
        # Of a backup or a restore killed half-way (unencrypted documents and trail).
        remove_leftovers(config.storage.state_dir, (WORK_PREFIX, RESTORE_WORK))
        shared_folder(config.storage.state_dir)  # holds the spool; often the inbox and outbox
        private_folder(config.storage.state_dir / "incoming")
        report_config_warnings(config, own_warnings, self._log)
        # Where the trail ends before this start writes to it (alerts for certificates
        # about to expire, the inbound side's recovered records): the changes committed
        # since may lack their records, which the recovery below writes.
        since = await asyncio.to_thread(changes_since, config.storage.audit_log, self._clock.now())
        last_record = await asyncio.to_thread(last_record_time, config.storage.audit_log)
        sealer = Sealer(config.audit) if config.audit is not None else None
        self._audit = AuditLog(
            config.storage.audit_log,
            self._clock,
            node=config.cluster.node_name,
            sealer=sealer,
            rotation=config.audit_rotation,
            # The record of an outbound message's step follows a change already committed
            # (or a send that happened): nothing records it again, so one that could not
            # be written is kept for the next write; so is an operator's hand-over retry
            # (committed before its record, gateway.operations).  An inbound delivery's is
            # written again by the peer's resend, which the failure answered 503.
            owed=lambda event: (
                event.direction == "outbound" or event.event is EventType.HANDOVER_RETRIED
            ),
        )
        self._emergency = Emergency(
            config.storage.state_dir,
            self._clock,
            self._audit_sink,
            # The configuration read at start until the first state is built (the peers'
            # first judgement already asks whether emergency mode is on).
            lambda: (self._state.config if self._state is not None else config).emergency,
            trail=config.storage.audit_log,
        )
        # While emergency mode is on, every event about a message carries its mark.
        emergency = self._emergency
        marked = MarkingSink(self._audit, lambda: emergency.mode)
        self._alerts = AlertCalls(marked, config.responsible, self._log)
        keys = CheckpointKeys([config.audit.certificate]) if config.audit is not None else None
        self._sink = self._observer.sink(self._alerts)
        self._broken = BrokenRecords(self._sink, self._log)  # the same record alerts once
        behind = clock_behind(last_record, self._clock.now())
        if behind is not None:  # an alert, and the start goes on
            self._log.warning("clock.behind_trail", **behind.detail)
            self._sink.emit(behind)
        self._watch = TrailWatch(
            config.storage.audit_log, keys, self._broken, self._audit.durable_seq
        )
        postgres = config.spool.postgres
        loop = asyncio.get_running_loop()

        def stop_replaced(exc: SpoolReplacedError) -> None:  # from any thread
            loop.call_soon_threadsafe(self._stop_replaced, exc)

        reachability = SpoolReachability(
            self._audit_sink,
            self._log,
            postgres.where if postgres else "",
            self._outages,
            self._observer.readiness,
            stop_replaced,
            lease=config.cluster.lease_seconds,
        )
        self._spool = open_spool(
            config.storage.spool_path,
            self._clock,
            postgres,
            Claimant(config.cluster.node_name, config.cluster.lease_seconds),
            on_change=reachability.changed,
            on_replaced=reachability.replaced,
            hold_name=True,
            on_clock=reachability.clock,
        )
        # What is kept, encrypted at rest; a key rotation a killed run left half-done is
        # finished before anything is read (gateway.atrest).
        at_rest = config.at_rest
        vault = (
            Vault(KeyStore(at_rest.key_dir), self._spool, encrypt=at_rest.enabled)
            if at_rest is not None
            else None
        )
        if vault is not None:
            await asyncio.to_thread(vault.open)
        self._vault = vault
        self._view = SpoolView(self._spool, self._clock)
        await asyncio.to_thread(self._view.load)
        outbox = config.storage.outbox_dir
        for folder in (
            config.storage.inbox_dir,
            outbox,
            *(outbox / p.name for p in config.peers),
            *(outbox / p.name / s for p in config.peers for s in p.services),
        ):
            try:
                shared_folder(folder)
            except OSError as exc:
                # One this user may not make was said above (storage.not_writable) and
                # keeps the daemon not ready; the rest of it runs meanwhile.
                if exc.errno not in NOT_WRITABLE:
                    raise
        self._tasks = tasks = Tasks(self._audit_sink, self._log, self._clock)
        self._parts = parts = Parts(
            self._spool,
            self._audit_sink(),
            self._log,
            self._clock,
            self._network,
            self._inbound_locks,
            vault,
            self._outages,
        )
        self._crls = crls = DaemonCrls(
            config.storage.state_dir,
            self._clock,
            self._network,
            self._audit_sink,
            self._log,
            self._rng,
            self._egress_refused,
        )
        self._trust = TrustKeeper(
            self._network,
            self._audit_sink,
            self._log,
            self._clock,
            self._egress_refused,
            crl_findings=crls.findings,
            crl_sources=crls.sources,
            adjust=self._relaxed,
        )
        # The zones' CRLs from their distribution points (cached ones first), before the
        # peers' certificates are judged by them.
        crls.plan(config)
        await crls.refresh(config)
        config = crls.applied(config)
        # Ours were judged by the zones' CRL files above (refusing the start); the fetched
        # CRLs judge them too, now that they are held: alerted, not refused.
        await self._trust.recheck_own(config)
        trust = await self._trust.assess(config)
        self._trust.audit(config, trust, {})
        self._state = self._build_state(config, trust)
        self._outbound = Outbound(
            self._state, self._spool, self._audit_sink(), self._log, self._clock, vault
        )
        self._senders = Senders(lambda: self.state, parts, self._outbound, tasks, self._rng)
        self._handler = As2Handler(
            lambda: self.state,
            parts,
            self._outbound,
            tasks,
            ocsp_client=self._trust.ocsp_client,
            on_handover=self._wake_handover,
            suspended=self._view.is_suspended,
        )
        self._reloader = Reloader(
            self._config_path,
            lambda: self.state,
            self._build_state,
            self._swap,
            self._trust,
            parts=parts,
            crls=crls,
            readiness=self._observer.readiness,
            tasks=tasks,
            notifier=self._notifier,
        )
        # Entering or leaving emergency mode changes what is relaxed: judge trust again.
        reloader = self._reloader
        self._emergency.mode.on_change = lambda: tasks.spawn(reloader.refresh_trust())
        # A reload that changes what it relaxes while it is on is an alert of its own.
        reloader.on_reloaded = lambda old, new, actor: emergency.mode.relaxations_changed(
            old.emergency, new.emergency, actor
        )
        try:
            # Before any request: deliveries a killed run left half-done are settled first;
            # the records a kill cut off are looked for since the trail's end before this
            # start wrote to it.
            await asyncio.to_thread(self.state.inbound.recover, since)
            await self._outbound.recover(since)
            await self._start_listeners(config)
            self._control = ControlServer(
                config.storage.state_dir / SOCKET_NAME,
                self._operations,
                self._outbound.submit,
                self._outbound.status,
                self.reload,
                front=FrontDoor("control", self._log, self._audit_sink, self._clock),
                log=self._log,
            )
            await self._control.start()
            await self._start_api(config)
            await self._start_maintenance(config)
            await self._start_metrics(config)
            loop = asyncio.get_running_loop()
            loop.add_signal_handler(signal.SIGTERM, self._request_stop, "SIGTERM")
            loop.add_signal_handler(signal.SIGINT, self._request_stop, "SIGINT")
            loop.add_signal_handler(signal.SIGHUP, self._reloader.request)
            self._senders.sync()
            tasks.spawn(tasks.supervised("outbox intake", self._senders.intake_loop))
            tasks.spawn(tasks.supervised("spool view", self._view.run))
            self._handover = HandOver(
                self._spool,
                self._audit_sink,
                self._log,
                self._clock,
                lambda: self.state.config,
                self._rng,
                self._network.internal(),
            )
            tasks.spawn(tasks.supervised("hand-over to internal systems", self._handover.run))
            keeper = LeaseKeeper(
                self._spool,
                self._clock,
                lambda: self.state.config,
                lambda: self.state.inbound,
                self._outbound,
                self._audit_sink,
                self._log,
                self._wake_handover,
            )
            tasks.spawn(tasks.supervised("claims renewal and take-over", keeper.run))
            spool = self._spool
            tasks.spawn(
                tasks.supervised(
                    "spool reconnection", lambda: reachability.retry(spool.reach, tasks)
                )
            )
            tasks.spawn(tasks.supervised("trust refresh", self._reloader.trust_refresh_loop))
            tasks.spawn(tasks.supervised("retention sweep", self._retention_loop))
            tasks.spawn(tasks.supervised("emergency time bound", self._emergency_loop))
            tasks.spawn(tasks.supervised("CRL refresh", self._reloader.crl_refresh_loop))
            every = config.audit.every_seconds if config.audit is not None else None
            tasks.spawn(tasks.supervised("audit checkpoints", lambda: self._seal_loop(every)))
            self._export = AuditExport(
                lambda: self.state.config,
                tasks,
                self._audit_sink(),
                self._network,
                self._log,
                self._clock,
                self._broken,
                self._audit.durable_seq,
            )
            self._export.sync()
            if self._notifier.watchdog_interval:
                tasks.spawn(self._watchdog_loop(self._notifier.watchdog_interval))
            await self._observer.check_folders()  # the readiness answers of them at once
            self._observer.readiness.started = True  # listeners, spool and trust are up
            ports = {s.listener.name: s.port for s in self._servers}
            self._audit_sink().emit(
                AuditEvent(
                    EventType.DAEMON_STARTED,
                    detail={
                        "listeners": ports,
                        "local_api": config.api.endpoints() if config.api else [],
                        "maintenance": self._maintenance.port if self._maintenance else None,
                        # the accounts in force from now on (each reload records changes)
                        "maintainers": accounts.in_force(config.maintenance),
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
            # Off the event loop: it counts the queue, which a large spool makes slow.
            await asyncio.to_thread(
                report_stranded_messages, config, self._spool, self._audit_sink(), self._log
            )
            self._notifier.ready(
                f"serving {len(self._servers)} listener(s), {len(config.peers)} peer(s)"
            )
            if self._replaced is not None:  # found during the start
                tasks.stop_requested.set()
            await tasks.stop_requested.wait()
            await self._shutdown()
            # From here on a repeated SIGTERM must not kill the process mid-exit (asyncio
            # would restore the default action when the loop closes): ignore it.
            loop = asyncio.get_running_loop()
            for signum in (signal.SIGTERM, signal.SIGINT):
                loop.remove_signal_handler(signum)
                signal.signal(signum, signal.SIG_IGN)
            if self._replaced is not None:
                raise self._replaced  # a failure status: systemd shows it, and restarts
        finally:
            await self._close()
        return 0

    async def _start_listeners(self, config: GatewayConfig) -> None:
        assert self._handler is not None
        for listener in config.listeners:
            server = As2Server(
                listener,
                self._server_context_for(listener.name),
                self._handler.for_listener(listener),
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
                    f"(listener {listener.name!r}): {bind_cause(exc)}",
                    fix=bind_fix(
                        exc, listener.address, listener.port, f"[[listeners]] {listener.name!r}"
                    ),
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
            self._emergency,
            self._log,
        )
        if self._emergency is not None:
            self._emergency.on_sealed = self._maintenance.credential_sealed
        await self._maintenance.start()

    async def _start_metrics(self, config: GatewayConfig) -> None:
        try:
            await self._observer.start(config.metrics, self._audit_sink())
        except MedgwError as exc:
            raise StartupError(exc.message, fix=exc.fix) from exc

    def _export_backlog(self) -> int | None:
        """Bytes of audit records waiting for export (None: no [audit.export])."""
        if self._state is None or self._state.config.audit_export is None:
            return None
        return self._export.backlog() if self._export is not None else 0

    def _api_clients(self) -> tuple[ApiClient, ...]:
        api = self.state.config.api
        return api.clients if api is not None else ()

    def _audit_sink(self) -> AuditSink:
        """Where events go: the audit log, each alert with whom to call (gateway.alerts),
        each counted by the metrics."""
        assert self._sink is not None
        return self._sink

    def _server_context_for(self, listener_name: str) -> Callable[[], ssl.SSLContext]:
        def context() -> ssl.SSLContext:
            return self.state.server_contexts[listener_name]  # looked up anew after a reload

        return context

    # -- signals --------------------------------------------------------------

    def _stop_replaced(self, exc: SpoolReplacedError) -> None:
        """The spool was restored while this node ran (gateway.spool.postgres.generation):
        stop, as at a SIGTERM, then fail with ``exc``."""
        self._replaced = exc
        if self._tasks is not None and not self._tasks.stop_requested.is_set():
            cause = "node.name_taken" if isinstance(exc, NodeNameTakenError) else "spool.replaced"
            self._log.info("daemon.stopping", cause=cause)
            self._tasks.stop_requested.set()

    def _request_stop(self, signame: str) -> None:
        if not self.tasks.stop_requested.is_set():
            self._log.info("daemon.stopping", signal=signame)
            self.tasks.stop_requested.set()

    async def reload(self, actor: str) -> Reloaded | ReloadRefused:
        """Build a new runtime state from the files; swap it in if that succeeds (with
        the new configuration's warnings), else why not.  ``actor``: who asked, for the
        audit trail."""
        assert self._reloader is not None
        return await self._reloader.reload(actor)

    def _swap(self, new_state: RuntimeState) -> None:
        """Make ``new_state`` current; drop connections whose certificate it no longer accepts."""
        self._state = new_state
        assert self._outbound is not None and self._alerts is not None
        self._alerts.responsible = new_state.config.responsible
        if self._maintenance is not None and new_state.config.maintenance is not None:
            self._maintenance.update(new_state.config.maintenance)
        self._outbound.use(new_state)
        assert self._senders is not None
        self._senders.sync()
        if self._export is not None:
            self._export.sync()
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

    async def _shutdown(self) -> None:
        tasks = self.tasks
        tasks.stopping = True
        self._observer.readiness.stopping = True
        self._notifier.stopping()
        deadline = self.state.config.runtime.shutdown_deadline_seconds
        start = self._clock.monotonic()
        for server in self._servers:
            server.stop_accepting()
        if self._control is not None:
            self._control.drain()
        if self._maintenance is not None:
            self._maintenance.drain()
        assert self._senders is not None
        # One deadline for every transfer in progress, each way, all at once: every
        # listener stops accepting now (and closes its idle connections), the requests
        # already started run to their answer while the sends in progress finish.
        stops = [self._senders.stop(deadline), *(s.stop(deadline) for s in self._servers)]
        if self._api is not None:
            stops.append(self._api.stop(deadline))
        failed = [r for r in await asyncio.gather(*stops, return_exceptions=True) if r]

        def remaining() -> float:
            return max(0.5, deadline - (self._clock.monotonic() - start))

        # The control socket last: while the transfers finish, `medgw status` still
        # answers (stopping) rather than "not running", and `medgw reload` is refused.
        if self._control is not None:
            await self._control.stop(remaining())
        if failed:  # each one ended first: none is left running behind the failure
            raise failed[0]
        if self._maintenance is not None:
            await self._maintenance.stop()
        await self._observer.stop()
        await tasks.cancel_all()
        for client in self.state.clients.values():
            await client.close()
        self._audit_sink().emit(AuditEvent(EventType.DAEMON_STOPPED))
        if self._export is not None:
            await self._export.finish(min(5.0, remaining()))
        self._log.info("daemon.stopped")

    async def _close(self) -> None:
        await self._observer.stop()  # also after a start that failed half-way
        if self._export is not None:
            await self._export.cancel()
        # Also after a start that failed half-way (a port in use): the peers' HTTP
        # clients are closed here, not only by an orderly shutdown (closing twice is fine).
        if self._state is not None:
            for client in self._state.clients.values():
                await client.close()
        # Work still running in worker threads (a received message being delivered, a
        # submission being sealed) finishes first: the spool and the audit log it
        # writes to are closed only then.
        if self._handler is not None:
            await self._handler.pool.close()
        await asyncio.get_running_loop().shutdown_default_executor()
        if self._spool is not None:
            self._spool.close()
        if self._audit is not None:
            self._audit.close()
        if self._instance is not None:
            self._instance.release()

    def _relaxed(self, config: GatewayConfig, peer: str, trust: TrustSettings) -> TrustSettings:
        """A peer's trust settings as emergency mode, when on, relaxes them."""
        if self._emergency is None or self._emergency.mode.current() is None:
            return trust
        found = next((p for p in config.peers if p.name == peer), None)
        certificates = (
            (*found.tls_certificates, *found.signing_certificates, *found.encryption_certificates)
            if found is not None
            else ()
        )
        return relaxed(config.emergency, peer, trust, self._clock.now(), certificates)

    async def _emergency_loop(self) -> None:
        """Emergency mode ends by itself when its time is up (also one that ended while
        the gateway was down): left and audited here."""
        assert self._emergency is not None
        said = False  # a record the trail cannot take: said once, tried each tick
        while not self.tasks.stopping:
            try:
                self._emergency.mode.expire()
                said = False
            except AuditNotWrittenError as exc:
                if not said:
                    log_not_written(self._log, exc)
                    said = True
            await self.tasks.sleep_unless_stopping(EMERGENCY_TICK_SECONDS)

    async def _seal_loop(self, every: float | None) -> None:
        """The trail's tail checked at start; then (with [audit] signing) a signed
        checkpoint every ``every`` seconds if records were written since, and what was
        written since the last check checked again (gateway.audit.watch)."""
        assert self._audit is not None and self._watch is not None
        await asyncio.to_thread(self._watch.check)
        while every is not None and not self.tasks.stopping:
            await self.tasks.sleep_unless_stopping(every)
            if not self.tasks.stopping:
                await asyncio.to_thread(self._audit.checkpoint, "time")
                await asyncio.to_thread(self._watch.check)

    async def _retention_loop(self) -> None:
        """Apply the [retention] rules in force, at start and every sweep interval."""
        assert self._spool is not None
        retention = Retention(
            self._spool, self._audit_sink(), self._clock, self._audit_files(), self._vault
        )
        while not self.tasks.stopping:
            settings = self.state.config.retention
            await asyncio.to_thread(retention.sweep, settings)
            await self.tasks.sleep_unless_stopping(settings.sweep_interval_seconds)

    async def _watchdog_loop(self, interval: float) -> None:
        while True:
            self._notifier.watchdog()
            await asyncio.sleep(interval)
