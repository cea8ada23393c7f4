"""Backups of a node whose spool is in PostgreSQL: the spool dumped by a real
``pg_dump`` (one snapshot), the shared ``[cluster] bodies_dir`` with it, restored by a
real ``pg_restore`` into a fresh database and fresh folders, where a node started on
it sends each queued document once.  A database that is not empty, and a missing
``pg_dump``, are refused with what to do."""

from __future__ import annotations

import hashlib
import random
import shutil
from pathlib import Path
from typing import Any

import pytest

from gateway.backup.bundle import DUMP
from gateway.demo_run import drop_file, read_audit, wait_until
from gateway.outbound import INLINE_BODY_BYTES
from gateway.pki.demo import DemoLayout
from gateway.spool import OutboundRecord, OutboundState
from gateway.spool.postgres import PostgresSettings, PostgresSpool
from tests.cli import medgw
from tests.clocks import TickingClock
from tests.helpers.audit import wait_for_events
from tests.helpers.backup import add_backup, backup_signer, openssl_opens, recipient
from tests.helpers.cluster import add_node
from tests.helpers.postgres import PostgresServer

pytestmark = pytest.mark.daemon

BODIES = "shared-bodies"  # the nodes' [cluster] bodies_dir (tests/helpers/cluster.py)


def outbound(settings: PostgresSettings) -> list[OutboundRecord]:
    spool = PostgresSpool(settings, TickingClock())
    try:
        return spool.all_outbound()
    finally:
        spool.close()


def inbox(layout: DemoLayout) -> dict[str, str]:
    folder = layout.hospital.inbox_dir / "lab"
    if not folder.exists():
        return {}
    return {
        p.name: hashlib.sha256(p.read_bytes()).hexdigest()
        for p in folder.iterdir()
        if not p.name.startswith(".")
    }


def new_host(layout: DemoLayout, name: str, old: PostgresSettings, new: PostgresSettings) -> Path:
    """The lab node's configuration, keys, certificates and key folder on a new host:
    no state, audit trail, inbox, outbox or bodies; its spool in the database ``new``."""
    root = layout.lab.root.with_name(name)
    shutil.copytree(
        layout.lab.root,
        root,
        ignore=shutil.ignore_patterns("state", "audit", "inbox", "outbox", BODIES),
    )
    config = root / "gateway.toml"
    text = config.read_text()
    assert f'dbname = "{old.dbname}"' in text
    config.write_text(text.replace(f'dbname = "{old.dbname}"', f'dbname = "{new.dbname}"'))
    return config


def test_a_node_backed_up_with_its_postgresql_spool_and_shared_bodies_is_restored_and_sends_once(
    layout: DemoLayout, processes: Any, postgres_server: PostgresServer, tmp_path: Path
) -> None:
    spool = postgres_server.new_database()
    config = add_node(layout.lab, "lab-a", spool)
    key, cert = recipient(tmp_path / "offline")
    add_backup(config, cert)
    rng = random.Random(19)
    print("documents' random seed: 19")
    documents = {f"image-{n}.dcm": rng.randbytes(INLINE_BODY_BYTES + 4096 * n) for n in (1, 2)}
    documents["result.hl7"] = b"MSH|small enough to be kept in the spool\r"
    lab = processes.start(config)
    for name, data in documents.items():
        drop_file(layout.lab.outbox_for("hospital"), name, data)

    # The hospital is down: the node queues them, the large ones' bodies in bodies_dir.
    def queued() -> list[OutboundRecord] | None:
        records = outbound(spool)
        prepared = [r for r in records if r.state == OutboundState.QUEUED and r.attempts]
        return records if len(prepared) == len(documents) else None

    records = wait_until(queued, 120, "every document queued, a first attempt failed")
    bodies = layout.lab.root / BODIES
    in_files = [r for r in records if r.body_path is not None and r.body_path.parent == bodies]
    assert len(in_files) == 2 and all(r.body_path and r.body_path.exists() for r in in_files)

    bundle = tmp_path / "carried-out" / "lab-a.p7m"
    bundle.parent.mkdir()
    made = medgw("backup", "--to", bundle, "--json", "--config", config)
    assert made.returncode == 0, made.stderr
    lab.kill()  # the node, its database and its shared folder are lost
    _, signer = backup_signer(config)
    manifest = openssl_opens(bundle, key, cert, signer, tmp_path)
    assert manifest["spool"] == "postgresql" and manifest["outbound_messages"] == 3
    assert DUMP in manifest["files"] and "state/spool.sqlite3" not in manifest["files"]
    held = {name for name in manifest["files"] if name.startswith("bodies/")}
    assert held == {f"bodies/{r.body_path.name}" for r in in_files if r.body_path}
    assert any(name.startswith("audit/") for name in manifest["files"])

    # Onto a host whose database is in use (here: the old one): refused, nothing written.
    fresh = postgres_server.new_database()
    host = new_host(layout, "lab-restored", spool, fresh)
    busy = host.with_name("gateway-busy.toml")
    busy.write_text(host.read_text().replace(fresh.dbname, spool.dbname))
    refused = medgw("restore", "--from", bundle, "--cert", cert, "--key", key, "--config", busy)
    assert refused.returncode == 1, refused.stdout
    assert "spool database" in refused.stderr and "is not empty" in refused.stderr
    assert "outbound (3 rows)" in refused.stderr and "--force" in refused.stderr
    assert not (host.parent / BODIES).exists()
    busy.unlink()

    done = medgw("restore", "--from", bundle, "--cert", cert, "--key", key, "--config", host)
    assert done.returncode == 0, done.stderr
    new_bodies = host.parent / BODIES
    restored = {r.message_id: r for r in outbound(fresh)}
    assert set(restored) == {r.message_id for r in records}
    for record in in_files:
        assert record.body_path is not None
        moved = restored[record.message_id].body_path
        assert moved is not None and moved == new_bodies / record.body_path.name
        assert moved.read_bytes() == record.body_path.read_bytes()
    verify = medgw("audit", "verify", "--config", host)
    assert verify.returncode == 0, verify.stderr

    processes.start(layout.hospital.config_path)
    node = processes.start(host)
    [event] = wait_for_events(host.parent / "audit" / "audit.jsonl", "backup.restored")
    assert event["detail"]["files"] == len(manifest["files"])

    def all_sent() -> bool:
        states = {r.state for r in outbound(fresh)}
        return states == {OutboundState.DELIVERED} and len(inbox(layout)) == len(documents)

    wait_until(all_sent, 180, "every restored message delivered")
    expected = {name: hashlib.sha256(data).hexdigest() for name, data in documents.items()}
    assert inbox(layout) == expected
    delivered = [
        r["message_id"]
        for r in read_audit(layout.hospital.audit_log)
        if r["event"] == "message.delivered"
    ]
    assert sorted(delivered) == sorted(restored)
    node.stop()


def test_a_backup_without_pg_dump_names_the_tool_and_how_to_install_it(
    layout: DemoLayout, postgres: PostgresSettings, tmp_path: Path
) -> None:
    config = add_node(layout.lab, "lab-a", postgres)
    add_backup(config, recipient(tmp_path / "offline")[1])
    no_tools = tmp_path / "no-tools"
    no_tools.mkdir()
    with config.open("a") as handle:  # [backup] is the file's last table
        handle.write(f'pg_bin_dir = "{no_tools}"\n')
    check = medgw("check-config", "--config", config)
    assert check.returncode == 0, check.stdout + check.stderr
    bundle = tmp_path / "b.p7m"
    made = medgw("backup", "--to", bundle, "--config", config)
    assert made.returncode == 1 and "Traceback" not in made.stderr, made.stderr
    assert "pg_dump, PostgreSQL's tool" in made.stderr and str(no_tools) in made.stderr
    assert "postgresql-client" in made.stderr and "pg_bin_dir" in made.stderr
    assert not bundle.exists()
