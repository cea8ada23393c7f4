"""Judging every configured peer certificate, as the daemon does at start-up."""

from __future__ import annotations

from datetime import UTC, datetime

from gateway.config import GatewayConfig
from gateway.pki.peers import PeerTrust, TrustSettings, assess_peer


async def peer_trust(config: GatewayConfig, at: datetime | None = None) -> dict[str, PeerTrust]:
    """Which of each peer's certificates are acceptable ``at`` (default: now)."""
    when = at or datetime.now(UTC)
    zones = {z.name: z for z in config.zones}
    return {
        peer.name: await assess_peer(
            peer.name,
            tls=peer.tls_certificates,
            signing=peer.signing_certificates,
            encryption=peer.encryption_certificates,
            trust=TrustSettings.of_zone(zones[peer.zone]),
            at=when,
            policy=peer.policy,
        )
        for peer in config.peers
    }
