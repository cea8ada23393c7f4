"""The demo lab's sending side built in the test's (or the bench's) own process, as the
daemon builds it: its configuration, the trust in its peers judged now, the pipeline
over the spool, audit trail and vault the caller opened (or :func:`lab_intake` opens)."""

from __future__ import annotations

import io
import os
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Generic, TypeVar

from gateway.atrest import KeyStore, Vault
from gateway.audit import AuditSink
from gateway.audit.log import AuditLog
from gateway.clock import Clock
from gateway.config import GatewayConfig, Peer, load_config
from gateway.demo_run import drop_file
from gateway.logs import make_logger
from gateway.outbound import Outbound, Settings
from gateway.pki.demo import DemoLayout
from gateway.pki.peers import assess_peers
from gateway.spool import Spool, SqliteSpool

S = TypeVar("S", bound=SqliteSpool)


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


@dataclass(frozen=True)
class LabIntake(Generic[S]):
    """The sending pipeline :func:`lab_intake` built, and what it writes to."""

    outbound: Outbound
    spool: S
    audit: AuditLog
    trail: Path
    vault: Vault | None


@asynccontextmanager
async def lab_intake(
    config: GatewayConfig,
    state: Path,
    clock: Clock,
    spool_type: type[S],
    *,
    at_rest: bool = False,
    sync: Callable[[int], None] = os.fsync,
    peers: Sequence[Peer] | None = None,
) -> AsyncIterator[LabIntake[S]]:
    """:func:`lab_outbound` over a spool of ``spool_type`` (``spool.sqlite3``) and the
    trail ``audit.jsonl`` of node ``lab`` (its writes made durable by ``sync``) opened
    in ``state``, and, ``at_rest``, a vault with its keys in ``keys``; closed after."""
    spool = spool_type(state / "spool.sqlite3", clock)
    audit = AuditLog(state / "audit.jsonl", clock, node="lab", sync=sync)
    try:
        vault = Vault(KeyStore(state / "keys"), spool) if at_rest else None
        if vault is not None:
            vault.open()
        outbound = await lab_outbound(config, spool, audit, clock, vault, peers=peers)
        yield LabIntake(outbound, spool, audit, state / "audit.jsonl", vault)
    finally:
        spool.close()
        audit.close()


def drop_all(folder: Path, documents: Mapping[str, bytes]) -> Path:
    """Each of ``documents`` (name: content) dropped into the outbox ``folder``."""
    for name, data in documents.items():
        drop_file(folder, name, data)
    return folder
