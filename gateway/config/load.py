"""Loading a configuration: ``gateway.toml`` and ``peers.d/`` -> :class:`GatewayConfig`.

Each table is read by the module of its section; this module reads them in
order, then applies the rules that span sections (one file per place, the
peers' uniqueness, where each configured URL leads).  Loading never stops at
the first mistake: every problem found is collected as a
:class:`~gateway.errors.ConfigProblem` naming the file, the key and the fix, and
:class:`~gateway.errors.ConfigError` carries all of them.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from urllib.parse import urlsplit

from gateway.config.api import ApiSettings, load_api
from gateway.config.audit import load_audit
from gateway.config.delivery import DeliverySettings, load_delivery
from gateway.config.identity import load_identity, load_tls
from gateway.config.listeners import Listener, load_listeners
from gateway.config.model import GatewayConfig
from gateway.config.peers import Peer, check_peer_uniqueness, load_peers
from gateway.config.responsible import load_responsible
from gateway.config.runtime import load_runtime
from gateway.config.smime import load_smime
from gateway.config.storage import load_storage, named_places
from gateway.config.zones import Zone, load_zones
from gateway.egress import resolve_hosts
from gateway.errors import ConfigError
from gateway.maintenance.settings import load_maintenance
from gateway.places import overlap_problems
from gateway.routing import hosts_to_resolve, reach_problems, zone_problems
from gateway.tomlreader import Reader, Section


def load_config(path: str | os.PathLike[str]) -> GatewayConfig:
    """Load and validate ``gateway.toml`` and its ``peers.d/``.

    Raises :class:`ConfigError` listing every problem found.  Warnings (things
    that work but an administrator should know) are kept in ``.warnings``.
    """
    source = Path(path).absolute()
    reader = Reader(source.parent)
    data = reader.load_toml(source)
    if data is None:
        raise ConfigError(reader.problems)
    root = Section(reader, source, "", data)

    identity = load_identity(reader, root)
    tls = load_tls(reader, root)
    zones = load_zones(reader, root)
    smime = load_smime(reader, root)
    listeners = load_listeners(reader, root, source)
    storage = load_storage(reader, root)
    runtime = load_runtime(root)
    api_section = root.table("api", required=False) if "api" in data else None
    delivery_section = root.table("delivery", required=False) if "delivery" in data else None
    audit, audit_export, audit_rotation = load_audit(reader, root, data, storage)
    responsible = load_responsible(reader, root, source)
    maintenance_section = (
        root.table("maintenance", required=False) if "maintenance" in data else None
    )
    root.finish()

    peers = load_peers(reader, source, identity.peers_dir, smime)
    check_peer_uniqueness(reader, peers, identity.as2_id)
    delivery = (
        load_delivery(reader, delivery_section, peers) if delivery_section is not None else None
    )
    places = named_places(source, identity.peers_dir, storage, zones, reader.read)
    reader.problems.extend(overlap_problems(places))
    api = load_api(reader, api_section, peers, places) if api_section is not None else None
    maintenance = (
        load_maintenance(
            reader, maintenance_section, listeners, zones, api.endpoint if api else None
        )
        if maintenance_section is not None
        else None
    )
    resolved = _network_problems(reader, source, zones, listeners, peers, api, delivery)

    if reader.errors or tls is None or smime is None:
        raise ConfigError(reader.problems)
    return GatewayConfig(
        source=source,
        name=identity.name,
        institution_id=identity.institution_id,
        as2_id=identity.as2_id,
        tls=tls,
        smime=smime,
        listeners=tuple(listeners),
        storage=storage,
        runtime=runtime,
        peers=tuple(peers),
        zones=tuple(zones),
        warnings=tuple(reader.problems),
        api=api,
        delivery=delivery,
        audit=audit,
        responsible=responsible,
        resolved_hosts=resolved,
        audit_export=audit_export,
        audit_rotation=audit_rotation,
        maintenance=maintenance,
    )


def _network_problems(
    reader: Reader,
    source: Path,
    zones: Sequence[Zone],
    listeners: Sequence[Listener],
    peers: Sequence[Peer],
    api: ApiSettings | None,
    delivery: DeliverySettings | None,
) -> dict[str, tuple[str, ...]]:
    """The zone rules (NET-4) and where each configured URL leads, judged with the
    addresses its host name resolves to now; returns those addresses."""
    # A url already reported as unreadable is not judged against the zones a second time.
    judged = [
        replace(
            p,
            url=p.url if _parses(p.url) else "",
            async_receipt_url=p.async_receipt_url if _parses(p.async_receipt_url) else "",
        )
        for p in peers
    ]
    reader.problems.extend(zone_problems(source, zones, listeners, judged))
    handover = delivery.targets() if delivery is not None else ()
    urls = [u for p in judged for u in (p.url, p.async_receipt_url)] + [u for _, u in handover]
    resolved = resolve_hosts(hosts_to_resolve(urls))
    reader.problems.extend(
        reach_problems(
            source,
            zones,
            listeners,
            api.endpoint if api is not None else None,
            judged,
            handover,
            resolved,
        )
    )
    return resolved


def _parses(url: str) -> bool:
    try:
        _ = urlsplit(url).port  # a port that is not a number 1-65535 raises ValueError
    except ValueError:
        return False
    return True
