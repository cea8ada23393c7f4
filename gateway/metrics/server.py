"""The metrics and health endpoints: plain HTTP on a loopback address (``[metrics]``).

* ``GET /metrics``: the Prometheus text format of the daemon's registry;
* ``GET /health/live``: 200 while the process serves requests at all;
* ``GET /health/ready``: 200 once listeners, spool and trust are up; 503 with
  the reasons (one a line) before that, after a failed reload, when the spool's
  disk is (nearly) full, and while the daemon stops.

Only GET; a request body is never read.  Served through the same front door
as every other HTTP listener (:mod:`gateway.httpfront`).
"""

from __future__ import annotations

import socket
from collections.abc import Callable, Sequence

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from gateway.audit import AuditSink
from gateway.clock import Clock
from gateway.errors import MedgwError
from gateway.httpfront import FrontDoor, stop_serving
from gateway.listening import bind_cause, bind_fix
from gateway.logs import Logger
from gateway.metrics.collector import GatewayMetrics

IDLE_CONNECTION_SECONDS = 30.0


class MetricsServer:
    def __init__(
        self,
        metrics: GatewayMetrics,
        not_ready: Callable[[], Sequence[str]],
        *,
        audit: Callable[[], AuditSink | None],
        clock: Clock,
        log: Logger,
    ) -> None:
        self._metrics = metrics
        self._not_ready = not_ready
        app = web.Application(client_max_size=1024)
        app.router.add_get("/metrics", self._scrape)
        app.router.add_get("/health/live", self._live)
        app.router.add_get("/health/ready", self._ready)
        self._front = FrontDoor("metrics", log, audit, clock)
        self._runner = self._front.runner(
            app, access_log=None, handle_signals=False, keepalive_timeout=IDLE_CONNECTION_SECONDS
        )
        self.port: int | None = None

    async def start(self, address: str, port: int) -> None:
        await self._runner.setup()
        family = socket.AF_INET6 if ":" in address else socket.AF_INET
        try:
            listening = socket.create_server((address, port), family=family)
        except OSError as exc:
            await self.stop()
            raise MedgwError(
                f"cannot listen for metrics on {address}:{port}: {bind_cause(exc)}",
                fix=bind_fix(exc, address, port, "[metrics] listen"),
            ) from exc
        site = web.SockSite(self._runner, listening)
        await site.start()
        self.port = int(listening.getsockname()[1])

    async def stop(self, timeout: float = 5.0) -> None:
        await stop_serving(self._runner, timeout)

    async def _scrape(self, request: web.Request) -> web.Response:
        body = generate_latest(self._metrics.registry)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def _live(self, request: web.Request) -> web.Response:
        return web.Response(text="live\n")

    async def _ready(self, request: web.Request) -> web.Response:
        reasons = list(self._not_ready())
        if reasons:
            return web.Response(status=503, text="not ready\n" + "".join(f"{r}\n" for r in reasons))
        return web.Response(text="ready\n")
