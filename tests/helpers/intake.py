"""The demo lab's sending side built in the test's (or the bench's) own process, as the
daemon builds it: its configuration, the trust in its peers judged now, the pipeline
over the spool, audit trail and vault the caller opened."""

from __future__ import annotations

import io
from collections.abc import Sequence
from dataclasses import replace

from gateway.atrest import Vault
from gateway.audit import AuditSink
from gateway.clock import Clock
from gateway.config import GatewayConfig, Peer, load_config
from gateway.logs import make_logger
from gateway.outbound import Outbound, Settings
from gateway.pki.demo import DemoLayout
from gateway.pki.peers import assess_peers
from gateway.spool import Spool


def two_peers(layout: DemoLayout) -> GatewayConfig:
    """The lab's configuration with a second peer, ``pharmacy`` (the hospital's
    certificates under another name: its documents are sealed as the hospital's)."""
    config = load_config(layout.lab.config_path)
    [hospital] = config.peers
    pharmacy = replace(hospital, name="pharmacy", as2_id="PHARMACY")
    return replace(config, peers=(hospital, pharmacy))


async def judged(
    config: GatewayConfig, clock: Clock, peers: Sequence[Peer] | None = None
) -> Settings:
    """``config`` with the trust in its peers judged now; only in ``peers`` if given (the
    others have no acceptable certificate)."""
    trust = await assess_peers(
        config.peers if peers is None else peers, config.zones, at=clock.now()
    )
    return Settings(config, trust)


async def lab_outbound(
    config: GatewayConfig,
    spool: Spool,
    audit: AuditSink,
    clock: Clock,
    vault: Vault | None = None,
    *,
    peers: Sequence[Peer] | None = None,
) -> Outbound:
    """The sending pipeline of ``config`` (trust :func:`judged`), its log kept from the
    output; ``vault``: what it keeps is encrypted at rest."""
    settings = await judged(config, clock, peers)
    return Outbound(settings, spool, audit, make_logger(stream=io.StringIO()), clock, vault)
