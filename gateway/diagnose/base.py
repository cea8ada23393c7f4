"""What every step of ``medgw diagnose`` works with: the peer, its target, the route."""

from __future__ import annotations

import ssl
from urllib.parse import urlsplit

from gateway.clock import Clock
from gateway.config import GatewayConfig, Peer
from gateway.diagnose.result import (
    DEFAULT_PROBE_TIMEOUT,
    Target,
)
from gateway.egress import Network
from gateway.pki.tls import client_context


class Steps:
    """The configuration, the peer and how to reach it, shared by the steps."""

    def __init__(
        self,
        config: GatewayConfig,
        peer: Peer,
        clock: Clock,
        *,
        connect_timeout: float | None = None,
        probe_timeout: float | None = None,
    ) -> None:
        self._config = config
        self._peer = peer
        self._clock = clock
        self._connect_timeout = connect_timeout or config.runtime.connect_timeout_seconds
        self._probe_timeout = probe_timeout or min(
            config.runtime.request_timeout_seconds, DEFAULT_PROBE_TIMEOUT
        )
        parts = urlsplit(peer.url)
        path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        self._target = Target(parts.hostname or "", parts.port or 443, path)
        self._peer_file = f"peers.d/{peer.source.name}"
        # The daemon's connect path for the peer's zone (NET-4), judged by this configuration.
        self._route = Network.fixed(config.network_map).zone(peer.zone)

    def _context(self) -> ssl.SSLContext:
        zone = self._config.require_zone(self._peer.zone)  # trust and TLS version are per zone
        return client_context(
            self._config.tls.identity,
            zone.trust_anchors,
            self._peer.tls_certificates,
            zone.min_version,
        )
