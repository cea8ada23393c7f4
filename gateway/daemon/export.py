"""The audit export (``[audit.export]``) of a running daemon: started at the start
or by a reload that sets it, stopping by itself when a reload removes it,
reconnecting when one changes it, and given a moment to send the last records at
the shutdown."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable

from gateway.audit import AuditSink
from gateway.audit.export.exporter import AuditExporter
from gateway.audit.export.exporter import Target as ExportTarget
from gateway.audit.export.record import Source as ExportSource
from gateway.audit.watch import BrokenRecords
from gateway.clock import Clock
from gateway.config import GatewayConfig
from gateway.daemon.tasks import Tasks
from gateway.egress import Network
from gateway.logs import Logger


class AuditExport:
    """The exporter by the configuration in force, and its task."""

    def __init__(
        self,
        config: Callable[[], GatewayConfig],
        tasks: Tasks,
        audit: AuditSink,
        network: Network,
        log: Logger,
        clock: Clock,
        broken: BrokenRecords | None,
        durable: Callable[[], int] | None = None,
    ) -> None:
        """``durable``: the seq of the trail's last durable record (AuditLog.durable_seq)."""
        self._config = config
        self._durable = durable
        self._tasks = tasks
        self._audit = audit
        self._network = network
        self._log = log
        self._clock = clock
        self._broken = broken
        self._exporter: AuditExporter | None = None
        self._task: asyncio.Task[None] | None = None

    def _target(self) -> ExportTarget | None:
        """Where the audit trail goes, by the configuration in force (None: not exported)."""
        config = self._config()
        settings = config.audit_export
        if settings is None:
            return None
        return ExportTarget(
            settings,
            settings.identity or config.tls.identity,
            ExportSource(config.cluster.node_name, config.institution_id or config.name),
        )

    def sync(self) -> None:
        """Start the audit export when [audit.export] is set (at start or by a reload); it
        stops by itself when a reload removes it, and reconnects when one changes it."""
        if self._tasks.stopping or self._config().audit_export is None:
            return
        if self._task is not None and not self._task.done():
            return
        config = self._config()
        self._exporter = AuditExporter(
            self._target,
            log_path=config.storage.audit_log,
            state_dir=config.storage.state_dir,
            audit=self._audit,
            route=self._network.internal(),
            log=self._log,
            clock=self._clock,
            on_broken=self._broken.reporter("export") if self._broken else None,
            durable=self._durable,
        )
        self._task = asyncio.get_running_loop().create_task(
            self._tasks.supervised("audit export", self._exporter.run)
        )

    def backlog(self) -> int:
        """Bytes of audit records waiting for export."""
        return self._exporter.backlog_bytes if self._exporter is not None else 0

    async def finish(self, seconds: float) -> None:
        """At the shutdown: what is written by now is sent within ``seconds``."""
        if self._exporter is not None and self._task is not None:
            await self._exporter.finish(self._task, seconds)

    async def cancel(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(BaseException):
                await self._task
