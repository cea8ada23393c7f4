"""The loaded configuration as one frozen object: :class:`GatewayConfig`."""

from __future__ import annotations

import functools
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from gateway.audit.export.settings import ExportSettings
from gateway.audit.rotation import RotationSettings
from gateway.audit.seal import SealSettings
from gateway.config.api import ApiSettings
from gateway.config.atrest import AtRestSettings
from gateway.config.backup import BackupSettings
from gateway.config.cluster import ClusterSettings
from gateway.config.delivery import DeliverySettings
from gateway.config.emergency import EmergencySettings
from gateway.config.identity import TlsSettings
from gateway.config.listeners import Listener
from gateway.config.maintenance import MAINTENANCE_LISTENER, MaintenanceSettings
from gateway.config.metrics import METRICS_LISTENER, MetricsSettings
from gateway.config.peers import Peer
from gateway.config.responsible import Responsible
from gateway.config.retention import KEEP, RetentionSettings
from gateway.config.runtime import Runtime
from gateway.config.smime import SmimeSettings
from gateway.config.spool import SQLITE, SpoolSettings
from gateway.config.storage import Storage
from gateway.config.zones import Zone
from gateway.egress import NetworkMap
from gateway.errors import ConfigProblem, UnknownNameError
from gateway.routing import Address, endpoint, own_listeners
from gateway.spool.records import host_node_name


@dataclass(frozen=True)
class GatewayConfig:
    source: Path
    name: str
    institution_id: str
    as2_id: str
    tls: TlsSettings
    smime: SmimeSettings
    listeners: tuple[Listener, ...]
    storage: Storage
    runtime: Runtime
    peers: tuple[Peer, ...]
    zones: tuple[Zone, ...]
    warnings: tuple[ConfigProblem, ...] = ()
    api: ApiSettings | None = None
    delivery: DeliverySettings | None = None
    audit: SealSettings | None = None  # [audit]: signed checkpoints (gateway.audit.seal)
    responsible: tuple[Responsible, ...] = ()  # [[responsible]]: who to call (NET-6b)
    # The addresses each host name in a peer or hand-over URL resolved to when the
    # configuration was loaded (a name that did not resolve is absent).
    resolved_hosts: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    audit_export: ExportSettings | None = None  # [audit.export]: off when None
    # [audit] rotate_mib, rotate_daily: when the audit log is rotated (gateway.audit.rotation)
    audit_rotation: RotationSettings = field(default_factory=RotationSettings)
    maintenance: MaintenanceSettings | None = None  # the SSH maintenance listener
    retention: RetentionSettings = KEEP  # [retention]: everything kept for ever by default
    metrics: MetricsSettings | None = None  # [metrics]: Prometheus and health endpoints
    backup: BackupSettings | None = None  # [backup]: whom medgw backup encrypts to
    emergency: EmergencySettings = field(default_factory=EmergencySettings)  # [emergency]
    # [at_rest]: what medgw keeps, encrypted; None only for a config built by hand
    at_rest: AtRestSettings | None = None
    spool: SpoolSettings = SQLITE  # [spool]: SQLite in state_dir, or a PostgreSQL database
    # [cluster]: this node's name, how long its claims last, the shared bodies folder
    cluster: ClusterSettings = field(default_factory=lambda: ClusterSettings(host_node_name()))

    def peer(self, name: str) -> Peer | None:
        return next((p for p in self.peers if p.name == name), None)

    @functools.cached_property
    def network_map(self) -> NetworkMap:
        """What every outbound connection is judged by (:mod:`gateway.egress`)."""
        api = self.api.endpoint if self.api is not None else None
        endpoints: dict[tuple[Address, int], Peer] = {}
        for peer in self.peers:
            found = endpoint(peer.url, self.resolved_hosts)
            if found is not None:
                addresses, port = found
                for ip in addresses:
                    endpoints.setdefault((ip, port), peer)
        return NetworkMap(
            {z.name: z.network for z in self.zones},
            tuple(own_listeners(self.listeners, api, self._other_listeners)),
            endpoints,
        )

    @property
    def _other_listeners(self) -> list[tuple[str, tuple[str, int]]]:
        """Our listeners besides the zones' and the local API's."""
        found = []
        if self.metrics is not None:
            found.append((METRICS_LISTENER, self.metrics.endpoint))
        if self.maintenance is not None:
            found.append((MAINTENANCE_LISTENER, self.maintenance.endpoint))
        return found

    def zone(self, name: str) -> Zone | None:
        return next((z for z in self.zones if z.name == name), None)

    def require_zone(self, name: str) -> Zone:
        """The zone of a loaded peer or listener (load_config guarantees it exists)."""
        zone = self.zone(name)
        if zone is None:
            raise UnknownNameError(
                f"no zone {name!r} in {self.source}",
                fix=f"add a [[zones]] entry named {name!r} to {self.source}, or name one of "
                "its zones",
            )
        return zone

    def require_peer(self, name: str) -> Peer:
        peer = self.peer(name)
        if peer is None:
            raise UnknownNameError(
                f"no peer {name!r} in {self.source.parent / 'peers.d'}",
                fix=f"create peers.d/{name}.toml, or name one of the configured peers",
            )
        return peer
