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
from pathlib import Path

from gateway.config.api import load_api
from gateway.config.atrest import key_dir_place, load_at_rest
from gateway.config.audit import load_audit
from gateway.config.backup import load_backup
from gateway.config.cluster import load_cluster
from gateway.config.delivery import load_delivery
from gateway.config.emergency import EmergencySettings, load_emergency
from gateway.config.identity import TlsSettings, load_identity, load_tls
from gateway.config.listeners import load_listeners
from gateway.config.maintenance import MAINTENANCE_LISTENER, load_maintenance
from gateway.config.metrics import METRICS_LISTENER, load_metrics
from gateway.config.model import GatewayConfig
from gateway.config.network_rules import network_problems
from gateway.config.peers import check_peer_uniqueness, load_peers
from gateway.config.responsible import load_responsible
from gateway.config.retention import KEEP, load_retention
from gateway.config.runtime import load_runtime
from gateway.config.smime import SmimeSettings, load_smime
from gateway.config.spool import load_spool
from gateway.config.storage import load_storage, named_places
from gateway.config.zones import load_zones
from gateway.errors import ConfigError
from gateway.pki.keypair import KeyPair
from gateway.places import Place, overlap_problems
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
    spool = load_spool(reader, root)
    runtime = load_runtime(root)
    cluster = load_cluster(reader, root)
    api_section = root.optional_table("api")
    delivery_section = root.optional_table("delivery")
    audit, audit_export, audit_rotation = load_audit(reader, root, data, storage)
    responsible = load_responsible(reader, root, source)
    maintenance_section = root.optional_table("maintenance")
    retention_section = root.optional_table("retention")
    metrics_section = root.optional_table("metrics")
    backup_section = root.optional_table("backup")
    backup = (
        load_backup(reader, backup_section, _key_pairs(smime, tls))
        if backup_section is not None
        else None
    )
    emergency_section = root.optional_table("emergency")
    at_rest = load_at_rest(reader, root.optional_table("at_rest"), storage)
    root.finish()

    peers = load_peers(reader, source, identity.peers_dir, smime)
    check_peer_uniqueness(reader, peers, identity.as2_id)
    delivery = (
        load_delivery(reader, delivery_section, peers) if delivery_section is not None else None
    )
    retention = (
        load_retention(
            retention_section,
            {p.name: p.services for p in peers},
            runtime.message_expiry_seconds,
        )
        if retention_section is not None
        else KEEP
    )
    places = named_places(source, identity.peers_dir, storage, zones, reader.read)
    places.append(key_dir_place(at_rest, source))
    if cluster.bodies_dir is not None:
        places.append(
            Place(
                cluster.bodies_dir,
                source,
                "cluster.bodies_dir",
                "the nodes' shared folder of bodies ([cluster] bodies_dir)",
                tree=True,
                use="medgw keeps the signed and encrypted bodies of queued messages there",
            )
        )
    # No overlap is judged on a path already in error (a missing key would stand for the
    # configuration's own folder and overlap everything).
    reader.problems.extend(
        overlap_problems([p for p in places if not reader.in_error(p.file, p.key)])
    )
    api = load_api(reader, api_section, peers, places) if api_section is not None else None
    maintenance = (
        load_maintenance(
            reader, maintenance_section, listeners, zones, api.endpoint if api else None
        )
        if maintenance_section is not None
        else None
    )
    others = [("the local API ([api] listen)", api.endpoint)] if api and api.endpoint else []
    if maintenance is not None:
        others.append(("the maintenance listener", (maintenance.address, maintenance.port)))
    metrics = (
        load_metrics(metrics_section, listeners, others) if metrics_section is not None else None
    )
    emergency = (
        load_emergency(emergency_section, [p.name for p in peers])
        if emergency_section is not None
        else EmergencySettings()
    )
    ours = [(MAINTENANCE_LISTENER, maintenance.endpoint)] if maintenance is not None else []
    if metrics is not None:
        ours.append((METRICS_LISTENER, metrics.endpoint))
    resolved = network_problems(reader, source, zones, listeners, peers, api, delivery, ours)

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
        spool=spool,
        runtime=runtime,
        cluster=cluster,
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
        retention=retention,
        metrics=metrics,
        backup=backup,
        emergency=emergency,
        at_rest=at_rest,
    )


def _key_pairs(smime: SmimeSettings | None, tls: TlsSettings | None) -> list[tuple[str, KeyPair]]:
    """This gateway's key pairs for AS2 and TLS, by their key names: none signs backups."""
    pairs = []
    if smime is not None:
        pairs += [("smime.signing_key", smime.signing), ("smime.encryption_key", smime.encryption)]
    if tls is not None:
        pairs.append(("tls.key", tls.identity))
    return pairs
