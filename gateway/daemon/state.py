"""The runtime state: everything derived from one version of the configuration.

Built whole from a configuration and the verdicts on the peers' certificates
(:mod:`gateway.daemon.trust`), at start, at a reload and when trust changes;
swapped whole (:meth:`gateway.daemon.lifecycle.Daemon.swap`), never in pieces.
"""

from __future__ import annotations

import ssl
from collections.abc import Mapping
from dataclasses import dataclass, field

from cryptography.hazmat.primitives.serialization import Encoding

from gateway.atrest import Vault
from gateway.audit import AuditSink
from gateway.channel.client import PeerClient
from gateway.clock import Clock
from gateway.config import GatewayConfig, Peer
from gateway.egress import Network
from gateway.errors import MedgwError
from gateway.inbound import InboundLocks, InboundProcessor
from gateway.inbound.outages import StorageOutages
from gateway.logs import Logger
from gateway.pki.peers import PeerTrust
from gateway.pki.tls import client_context, fingerprint, server_context
from gateway.spool import Spool

PARALLEL_SENDS_PER_PEER = 8  # one peer's sends at once: its client's connections


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


@dataclass(frozen=True)
class Parts:
    """What every runtime state is built with: the parts that outlive a reload."""

    spool: Spool
    audit: AuditSink
    log: Logger
    clock: Clock
    network: Network
    inbound_locks: InboundLocks  # shared by the processors of every reload
    vault: Vault | None = None  # encryption at rest of what is kept (gateway.atrest)
    # Received documents that could not be stored: alerted once per cause.
    outages: StorageOutages | None = None


def build_state(
    config: GatewayConfig, trust: Mapping[str, PeerTrust], parts: Parts
) -> RuntimeState:
    """The TLS contexts, peer clients and inbound processor of ``config``; raises
    StartupError if the TLS configuration cannot be built."""
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
            route=parts.network.zone(p.zone),
            connections=PARALLEL_SENDS_PER_PEER,
        )
        for p in config.peers
    }
    peers_by_tls = {
        fingerprint(c.public_bytes(Encoding.DER)): p
        for p in config.peers
        for c in trust[p.name].tls_certificates
    }
    signers = {name: t.signing_certificates for name, t in trust.items()}
    inbound = InboundProcessor(
        config,
        parts.spool,
        parts.audit,
        parts.log,
        parts.clock,
        signers=signers,
        locks=parts.inbound_locks,
        network=parts.network,
        vault=parts.vault,
        outages=parts.outages,
    )
    peers_by_spki = {pin: p for p in config.peers for pin in p.tls_spki_pins}
    return RuntimeState(config, servers, clients, peers_by_tls, inbound, trust, peers_by_spki)
