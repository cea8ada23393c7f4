"""Backups of a node whose spool is in PostgreSQL: the spool dumped by a real
``pg_dump`` (one snapshot), the shared ``[cluster] bodies_dir`` with it, restored by a
real ``pg_restore`` into a fresh database and fresh folders, where a node started on
it sends each queued document once.  A database that is not empty, and a missing
``pg_dump``, are refused with what to do.  A node with an SQLite spool and a
bodies_dir gets its bodies restored too."""

from __future__ import annotations

import contextlib
import hashlib
import random
import re
import shutil
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509

from gateway.atrest import KeyStore, Vault
from gateway.atrest.chunked import seal_bytes
from gateway.backup import pgspool
from gateway.backup.bundle import DUMP, REFRESHED, BackupError, RestoreRefused, write_bundle
from gateway.backup.restore import restore as restore_bundle
from gateway.cli import EXIT_FAILED
from gateway.config import GatewayConfig, load_config
from gateway.demo_run import GatewayProcess, drop_file, read_audit, wait_until
from gateway.outbound import INLINE_BODY_BYTES
from gateway.outbound.status import MAX_SEALED_RECEIPT
from gateway.pki.demo import DemoLayout
from gateway.spool import Claimant, OutboundRecord, OutboundState, Settled, SqliteSpool
from gateway.spool.postgres import PostgresSettings, PostgresSpool
from gateway.spool.records import receipt_item
from tests.cli import medgw
from tests.clocks import TickingClock
from tests.helpers.audit import wait_for_events
from tests.helpers.backup import (
    add_backup,
    backup_signer,
    openssl_opens,
    private_key,
    recipient,
)
from tests.helpers.cluster import add_node, inbox, outbound
from tests.helpers.postgres import PASSWORD, PostgresServer, spool_section

pytestmark = pytest.mark.daemon

BODIES = "shared-bodies"  # the nodes' [cluster] bodies_dir (tests/helpers/cluster.py)


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


@dataclass(frozen=True)
class Queued:
    """A lab node on ``spool`` whose documents wait for the hospital (down): their
    records, and which of them have their bodies in the shared bodies folder."""

    config: Path
    node: GatewayProcess
    records: list[OutboundRecord]
    in_files: list[OutboundRecord]
    documents: dict[str, bytes]


def queued_node(layout: DemoLayout, processes: Any, spool: PostgresSettings, cert: Path) -> Queued:
    config = add_node(layout.lab, "lab-a", spool)
    add_backup(config, cert)
    rng = random.Random(19)
    print("documents' random seed: 19")
    documents = {f"image-{n}.dcm": rng.randbytes(INLINE_BODY_BYTES + 4096 * n) for n in (1, 2)}
    documents["result.hl7"] = b"MSH|small enough to be kept in the spool\r"
    node = processes.start(config)
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
    return Queued(config, node, records, in_files, documents)


def restore(
    bundle: Path, key: Path, cert: Path, config: Path, *options: str
) -> subprocess.CompletedProcess[str]:
    return medgw(
        "restore", "--from", bundle, "--cert", cert, "--key", key, "--config", config, *options
    )


def taken_in(loaded: GatewayConfig, layout: DemoLayout) -> None:
    """One document taken in by a node of ``loaded`` (its spool in PostgreSQL), its payload
    in the state folder: what a bundle of a spool holds, without a daemon."""
    assert loaded.spool.postgres is not None
    spool = PostgresSpool(loaded.spool.postgres, TickingClock())  # a node's start: the tables
    spool.add_intake(
        "<one@KITA-LAB>", "hospital", "a.hl7", "application/hl7-v2",
        layout.lab.outbox_dir / "hospital" / "a.hl7", loaded.storage.state_dir / "payloads" / "a",
    )  # fmt: skip
    spool.close()
    (loaded.storage.state_dir / "payloads").mkdir(parents=True)
    (loaded.storage.state_dir / "payloads" / "a").write_bytes(b"MSH|taken in\r")


def test_a_node_backed_up_with_its_postgresql_spool_and_shared_bodies_is_restored_and_sends_once(
    layout: DemoLayout, processes: Any, postgres_server: PostgresServer, tmp_path: Path
) -> None:
    spool = postgres_server.new_database()
    key, cert = recipient(tmp_path / "offline")
    lab = queued_node(layout, processes, spool, cert)
    config, records, in_files, documents = lab.config, lab.records, lab.in_files, lab.documents
    bundle = tmp_path / "carried-out" / "lab-a.p7m"
    bundle.parent.mkdir()
    made = medgw("backup", "--to", bundle, "--json", "--config", config)
    assert made.returncode == 0, made.stderr
    lab.node.kill()  # the node, its database and its shared folder are lost
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
    refused = restore(bundle, key, cert, busy)
    assert refused.returncode == 1, refused.stdout
    assert "spool database" in refused.stderr and "is not empty" in refused.stderr
    assert "outbound (3 rows)" in refused.stderr and "--force" in refused.stderr
    assert not (host.parent / BODIES).exists()
    # Onto a host without pg_restore, with its spool in SQLite, or without bodies_dir.
    text = host.read_text()
    no_tools = tmp_path / "no-tools"
    no_tools.mkdir()
    refusals = {
        "tool-missing": (text + f'pg_bin_dir = "{no_tools}"\n', "pg_restore, PostgreSQL's tool"),
        "spool-backend": (
            re.sub(r"\n\[spool\]\n(?:[a-z_]+ = .*\n)*", "\n", text),
            "holds a spool of postgresql",
        ),
        "no-bodies-dir": (text.replace(f'bodies_dir = "{BODIES}"\n', ""), "[cluster] bodies_dir"),
    }
    for reason, (changed, says) in refusals.items():
        busy.write_text(changed)
        refused = restore(bundle, key, cert, busy)
        assert refused.returncode == 1 and says in refused.stderr, (reason, refused.stderr)
        assert "nothing was restored" in refused.stderr, refused.stderr
        [*_, event] = read_audit(host.parent / "audit" / "audit.jsonl")
        assert event["event"] == "backup.restore_refused" and event["reason"] == reason
        assert not (host.parent / BODIES).exists()
    busy.unlink()

    done = restore(bundle, key, cert, host)
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
    trail = read_audit(load_config(config).storage.audit_log)  # as with a SQLite spool
    [refused] = [r for r in trail if r["event"] == "backup.refused"]
    assert refused["detail"]["file"] == str(bundle) and "pg_dump" in refused["reason"]


def test_a_body_removed_after_the_dump_takes_its_row_as_it_is_now(
    layout: DemoLayout,
    processes: Any,
    postgres_server: PostgresServer,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The dump is one snapshot; a message sent after it (its body removed before the
    copy) is restored as it is now, delivered, not queued with a body the bundle lacks,
    with the receipt its row keeps and that receipt's data key (stored after the dump).
    A body gone while its message still waits is an error that names the file."""
    spool = postgres_server.new_database()
    key, cert = recipient(tmp_path / "offline")
    lab = queued_node(layout, processes, spool, cert)
    lab.node.stop()
    moved_on, waiting = lab.in_files
    assert moved_on.body_path is not None and waiting.body_path is not None
    real = pgspool.snapshot
    at_rest = load_config(lab.config).at_rest
    assert at_rest is not None
    item = receipt_item(moved_on.message_id)
    receipt = b"Content-Type: text/plain\r\n\r\nthe receipt, settled after the dump"

    @contextlib.contextmanager
    def then_sent(*args: Any) -> Iterator[Any]:
        with real(*args) as snapshot:  # dumped: the message is sent, its body removed
            node = PostgresSpool(spool, TickingClock(), Claimant("lab-a"))
            try:
                claimed, _ = node.claim_due("hospital", time.time() + 3600, 10)
                assert moved_on.message_id in {r.message_id for r in claimed}
                for record in claimed:
                    if record.message_id != moved_on.message_id:
                        assert node.mark_retry(record.message_id, "not now", 0)
                dek, data_key = Vault(KeyStore(at_rest.key_dir), node).new_key(item)
                settled = Settled(
                    moved_on.message_id,
                    OutboundState.DELIVERED,
                    "processed",
                    None,
                    None,
                    data_key,
                    receipt=seal_bytes(dek, item, receipt),
                    receipt_sha256=hashlib.sha256(receipt).hexdigest(),
                )
                assert node.mark_settled([settled]) == [moved_on.message_id]
            finally:
                node.close()
            assert moved_on.body_path is not None
            moved_on.body_path.unlink()
            yield snapshot

    monkeypatch.setattr(pgspool, "snapshot", then_sent)
    config = load_config(lab.config)
    bundle = tmp_path / "lab-a.p7m"
    write_bundle(config, bundle, datetime.now(UTC))
    monkeypatch.undo()
    _, signer = backup_signer(lab.config)
    manifest = openssl_opens(bundle, key, cert, signer, tmp_path)
    assert REFRESHED in manifest["files"]
    assert f"bodies/{moved_on.body_path.name}" not in manifest["files"]
    assert f"bodies/{waiting.body_path.name}" in manifest["files"]

    fresh = postgres_server.new_database()
    host = new_host(layout, "lab-restored", spool, fresh)
    done = restore(bundle, key, cert, host)
    assert done.returncode == 0, done.stderr
    restored = {r.message_id: r for r in outbound(fresh)}
    assert restored[moved_on.message_id].state == OutboundState.DELIVERED
    assert restored[moved_on.message_id].receipt_kept
    again = PostgresSpool(fresh, TickingClock())
    try:
        kept = again.stored_receipt(moved_on.message_id, MAX_SEALED_RECEIPT)
        assert kept is not None
        restored_at_rest = load_config(host).at_rest
        assert restored_at_rest is not None
        vault = Vault(KeyStore(restored_at_rest.key_dir), again)
        assert vault.open_bytes(item, kept) == receipt
    finally:
        again.close()
    assert restored[waiting.message_id].state == OutboundState.QUEUED
    body = restored[waiting.message_id].body_path
    assert body == host.parent / BODIES / waiting.body_path.name and body.exists()

    waiting.body_path.unlink()  # by hand: the message still waits for it
    with pytest.raises(BackupError, match=re.escape(f"{waiting.body_path}, which the spool")):
        write_bundle(config, tmp_path / "again.p7m", datetime.now(UTC))
    assert not (tmp_path / "again.p7m").exists()


def test_a_single_node_with_bodies_dir_and_its_sqlite_spool_is_restored_with_its_bodies(
    layout: DemoLayout, processes: Any, tmp_path: Path
) -> None:
    """An SQLite spool whose node keeps its large bodies in ``[cluster] bodies_dir``: the
    bodies travel in the bundle, are put in the new host's bodies_dir, and are sent."""
    key, cert = recipient(tmp_path / "offline")
    config = layout.lab.config_path
    add_backup(config, cert)
    with config.open("a") as handle:
        handle.write(f'\n[cluster]\nnode_name = "lab-a"\nbodies_dir = "{BODIES}"\n')
    (layout.lab.root / BODIES).mkdir()
    data = random.Random(19).randbytes(INLINE_BODY_BYTES + 4096)
    lab = processes.start(config)
    drop_file(layout.lab.outbox_for("hospital"), "image.dcm", data)
    spool_path = layout.lab.root / "state" / "spool.sqlite3"

    def queued() -> OutboundRecord | None:
        spool = SqliteSpool(spool_path, TickingClock())
        try:
            found = [r for r in spool.all_outbound() if r.attempts]
        finally:
            spool.close()
        return found[0] if found and found[0].state == OutboundState.QUEUED else None

    record = wait_until(queued, 120, "the document queued, a first attempt failed")
    assert record.body_path is not None and record.body_path.parent == layout.lab.root / BODIES
    bundle = tmp_path / "lab.p7m"
    made = medgw("backup", "--to", bundle, "--config", config)
    assert made.returncode == 0, made.stderr
    lab.kill()

    root = layout.lab.root.with_name("lab-restored")
    shutil.copytree(
        layout.lab.root,
        root,
        ignore=shutil.ignore_patterns("state", "audit", "inbox", "outbox", BODIES),
    )
    done = restore(bundle, key, cert, root / "gateway.toml")
    assert done.returncode == 0, done.stderr
    spool = SqliteSpool(root / "state" / "spool.sqlite3", TickingClock())
    try:
        [restored] = spool.all_outbound()
    finally:
        spool.close()
    assert restored.body_path == root / BODIES / record.body_path.name
    assert (
        restored.body_path is not None
        and restored.body_path.read_bytes() == record.body_path.read_bytes()
    )

    processes.start(layout.hospital.config_path)
    processes.start(root / "gateway.toml")
    wait_until(lambda: "image.dcm" in inbox(layout), 180, "the restored document delivered")
    assert inbox(layout) == {"image.dcm": hashlib.sha256(data).hexdigest()}


def test_over_the_network_the_tools_get_the_password_and_tls_settings_never_on_a_command_line(
    layout: DemoLayout,
    postgres_server: PostgresServer,
    postgres: PostgresSettings,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A spool reached over TCP with TLS (verify-full) and a password file (the server
    asks for it over TCP): pg_dump and pg_restore connect with the spool's settings,
    given in their environment; pg_dump's command line holds no password."""
    password = tmp_path / "db.password"
    password.write_text(PASSWORD + "\n")
    password.chmod(0o600)
    key, cert = recipient(tmp_path / "offline")
    config = layout.lab.config_path
    add_backup(config, cert)

    def spool_over_tls(dbname: str) -> str:
        return (
            f'\n[spool]\nbackend = "postgresql"\nhost = "localhost"\n'
            f'port = {postgres_server.port}\nca_file = "{postgres_server.ca_file}"\n'
            f'password_file = "{password}"\ndbname = "{dbname}"\nuser = "{postgres.user}"\n'
        )

    text = config.read_text()
    config.write_text(text + spool_over_tls(postgres.dbname))
    loaded = load_config(config)
    taken_in(loaded, layout)
    seen: list[tuple[list[str], dict[str, str]]] = []
    real_run = subprocess.run

    def run(argv: list[str], **kwargs: Any) -> Any:
        seen.append((list(argv), dict(kwargs.get("env") or {})))
        return real_run(argv, **kwargs)

    monkeypatch.setattr(subprocess, "run", run)
    bundle = tmp_path / "lab.p7m"
    write_bundle(loaded, bundle, datetime.now(UTC))
    monkeypatch.setattr(subprocess, "run", real_run)
    [(argv, env)] = seen
    assert Path(argv[0]).name == "pg_dump" and not any(PASSWORD in a for a in argv)
    assert env["PGPASSWORD"] == PASSWORD and env["PGSSLMODE"] == "verify-full"
    assert env["PGHOST"] == "localhost" and env["PGSSLROOTCERT"] == str(postgres_server.ca_file)

    fresh = postgres_server.new_database()
    root = layout.lab.root.with_name("lab-restored")
    shutil.copytree(
        layout.lab.root, root, ignore=shutil.ignore_patterns("state", "audit", "inbox", "outbox")
    )
    host = root / "gateway.toml"
    host.write_text(text + spool_over_tls(fresh.dbname))
    done = restore(bundle, key, cert, host)
    assert done.returncode == 0, done.stderr
    [record] = outbound(fresh)
    assert record.state == OutboundState.INTAKE
    assert record.payload_path == root / "state" / "payloads" / "a"
    assert record.payload_path.read_bytes() == b"MSH|taken in\r"


def test_a_document_in_another_nodes_own_state_folder_stops_the_backup_naming_bodies_dir(
    layout: DemoLayout, postgres: PostgresSettings, tmp_path: Path
) -> None:
    """Without a shared bodies_dir, a document another node took in is kept in that
    node's state folder, out of this node's reach: the backup stops and says to share
    bodies_dir, rather than write a bundle whose restore could not send it."""
    config = layout.lab.config_path
    add_backup(config, recipient(tmp_path / "offline")[1])
    with config.open("a") as handle:
        handle.write(spool_section(postgres) + '\n[cluster]\nnode_name = "lab-a"\n')
    loaded = load_config(config)
    elsewhere = tmp_path / "lab-b" / "state" / "payloads" / "a.hl7.0123"
    elsewhere.parent.mkdir(parents=True)
    elsewhere.write_bytes(b"MSH|taken in by lab-b\r")
    spool = PostgresSpool(postgres, TickingClock(), Claimant("lab-b"))
    spool.add_intake(
        "<b@KITA-LAB>", "hospital", "a.hl7", "application/hl7-v2",
        tmp_path / "lab-b" / "outbox" / "hospital" / "a.hl7", elsewhere,
    )  # fmt: skip
    spool.close()
    bundle = tmp_path / "lab-a.p7m"
    with pytest.raises(BackupError) as refused:
        write_bundle(loaded, bundle, datetime.now(UTC))
    assert str(elsewhere) in str(refused.value) and "another node's own state" in str(refused.value)
    assert "[cluster] bodies_dir" in str(refused.value)
    assert not bundle.exists()


def _bundle_and_fresh_host(
    layout: DemoLayout, postgres_server: PostgresServer, postgres: PostgresSettings, tmp_path: Path
) -> tuple[Path, Path, Path, PostgresSettings, Path]:
    """lab-a's bundle with one document taken in, and a fresh host on a new database to
    restore it to: the recipient's key and certificate, the bundle, the database, the
    host's gateway.toml."""
    key, cert = recipient(tmp_path / "offline")
    config = add_node(layout.lab, "lab-a", postgres)
    add_backup(config, cert)
    taken_in(load_config(config), layout)
    bundle = tmp_path / "lab-a.p7m"
    made = medgw("backup", "--to", bundle, "--config", config)
    assert made.returncode == 0, made.stderr
    fresh = postgres_server.new_database()
    return key, cert, bundle, fresh, new_host(layout, "lab-restored", postgres, fresh)


def test_a_restore_is_refused_while_a_node_uses_the_spool_database_even_with_force(
    layout: DemoLayout, postgres_server: PostgresServer, postgres: PostgresSettings, tmp_path: Path
) -> None:
    """A node connected to the spool database (started by mistake, or another node of the
    cluster) would have its rows replaced by pg_restore, and dropped by a restore that
    fails: the restore is refused, naming the node, with or without --force, and changes
    nothing; once the node has stopped, it proceeds."""
    key, cert, bundle, fresh, host = _bundle_and_fresh_host(
        layout, postgres_server, postgres, tmp_path
    )
    node = PostgresSpool(fresh, TickingClock(), Claimant("lab-b"))
    try:
        node.add_intake(
            "<b@KITA-LAB>", "hospital", "b.hl7", "application/hl7-v2",
            tmp_path / "outbox" / "b.hl7", tmp_path / "payloads" / "b",
        )  # fmt: skip
        for options in ((), ("--force",)):
            refused = restore(bundle, key, cert, host, *options)
            assert refused.returncode == 1, refused.stdout
            assert "Traceback" not in refused.stderr, refused.stderr
            assert f"{fresh.where} is in use by medgw node lab-b" in refused.stderr
            assert "nothing was restored" in refused.stderr
            assert "stop every node that uses this database" in refused.stderr
            [*_, event] = read_audit(host.parent / "audit" / "audit.jsonl")
            assert event["event"] == "backup.restore_refused", event
            assert event["reason"] == "database-in-use"
            assert event["detail"]["forced"] == bool(options)
            assert [r.message_id for r in node.all_outbound()] == ["<b@KITA-LAB>"]
            assert not (host.parent / "state" / "payloads").exists()
    finally:
        node.close()

    done = restore(bundle, key, cert, host, "--force")
    assert done.returncode == 0, done.stderr
    [record] = outbound(fresh)
    assert record.message_id == "<one@KITA-LAB>"
    assert record.payload_path == host.parent / "state" / "payloads" / "a"
    assert record.payload_path.read_bytes() == b"MSH|taken in\r"


def test_a_node_starting_during_a_restore_waits_and_the_restore_stops_before_writing(
    layout: DemoLayout,
    postgres_server: PostgresServer,
    postgres: PostgresSettings,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A node started while a restore runs (after its first check) cannot get past its
    start (the restore holds the lock a start takes): the restore sees it connected
    before it writes anything, and stops; the node's start then finishes, on tables the
    restore left alone."""
    key, cert, bundle, fresh, host = _bundle_and_fresh_host(
        layout, postgres_server, postgres, tmp_path
    )
    started: list[PostgresSpool] = []

    def start_node() -> None:
        started.append(PostgresSpool(fresh, TickingClock(), Claimant("lab-b")))

    starting = threading.Thread(target=start_node)
    real = pgspool.read_into

    def then_a_node_starts(*args: Any) -> None:
        real(*args)  # the bundle's dump read: the first check is behind
        starting.start()

        def waiting() -> bool:
            with postgres_server.admin(fresh.dbname) as admin:
                row = admin.execute(
                    "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()"
                    " AND application_name = 'medgw node lab-b' AND wait_event_type = 'Lock'"
                ).fetchone()
            return row is not None and row[0] == 1

        wait_until(waiting, 60, "the node's start waiting for the restore's lock")

    monkeypatch.setattr(pgspool, "read_into", then_a_node_starts)
    loaded = load_config(host)
    certificate = x509.load_pem_x509_certificate(cert.read_bytes())
    with pytest.raises(RestoreRefused) as refused:
        restore_bundle(
            loaded, bundle, recipient=lambda: (certificate, private_key(key)), now=datetime.now(UTC)
        )
    assert refused.value.reason == "database-in-use"
    assert "medgw node lab-b" in str(refused.value)
    starting.join(60)
    assert not starting.is_alive()
    [node] = started
    try:
        assert node.all_outbound() == []  # its start's tables, nothing of the bundle
    finally:
        node.close()
    assert not (host.parent / "state" / "payloads").exists()


def _pg_bin_dir(host: Path, postgres_server: PostgresServer, folder: Path, script: str) -> None:
    """``[backup] pg_bin_dir`` of ``host`` names ``folder``, whose ``pg_restore`` is a
    shell script: ``script``, where ``$REAL`` is the real one."""
    folder.mkdir()
    wrapper = folder / "pg_restore"
    wrapper.write_text(f'#!/bin/sh\nREAL="{postgres_server.bin / "pg_restore"}"\n{script}\n')
    wrapper.chmod(0o755)
    with host.open("a") as handle:  # [backup] is the file's last section
        handle.write(f'pg_bin_dir = "{folder}"\n')
    assert load_config(host).backup.pg_bin_dir == folder  # type: ignore[union-attr]


# The load into the database (not the reading of the dump without a server).
_LOAD = 'case " $* " in *" --single-transaction "*)'
# Ctrl-C at the terminal: SIGINT to medgw (the wrapper's parent); the wrapper waits to be
# ended by it (medgw stops waiting for a pg_restore it was interrupted in, and kills it).
_CTRL_C = "kill -INT $PPID; exec sleep 60"


@pytest.mark.parametrize(
    ("end", "said"),
    [
        ("kill -KILL $$", "ended by SIGKILL"),
        (_CTRL_C, "interrupted (Ctrl-C) after the spool was loaded"),
    ],
    ids=["killed", "ctrl-c"],
)
@pytest.mark.parametrize("ran", [True, False], ids=["spool-replaced", "fresh-database"])
def test_a_restore_whose_pg_restore_is_killed_after_its_commit_is_done(
    layout: DemoLayout,
    postgres_server: PostgresServer,
    postgres: PostgresSettings,
    tmp_path: Path,
    end: str,
    said: str,
    ran: bool,
) -> None:
    """``medgw restore`` runs the ``pg_restore`` of ``[backup] pg_bin_dir`` (else the
    one on PATH): here one that runs the real one and, once its load has committed, is
    killed before it exits, or medgw is interrupted (Ctrl-C) then.  The spool is the
    bundle's, so the restore is done (the file names moved to this host's, exit status
    0, how pg_restore ended said), and the spool keeps its new generation: a node cut
    off meanwhile stops when it is back instead of going on with the old.  The same onto
    a database no node has run on (no spool tables before: the restore of a new host)."""
    key, cert, bundle, fresh, host = _bundle_and_fresh_host(
        layout, postgres_server, postgres, tmp_path
    )

    def token() -> object:
        with postgres_server.admin(fresh.dbname) as admin:
            [(value,)] = admin.execute("SELECT token FROM spool_generation").fetchall()
        return value

    before = None
    if ran:
        PostgresSpool(fresh, TickingClock(), Claimant("lab-b")).close()  # a node ran on it
        before = token()
    _pg_bin_dir(
        host, postgres_server, tmp_path / "tools", f'"$REAL" "$@" || exit $?\n{_LOAD} {end} ;; esac'
    )

    done = restore(bundle, key, cert, host, *(["--force"] if ran else []))
    assert done.returncode == 0, done.stderr
    assert "pg_restore ended badly after its load had committed" in done.stdout
    assert said in done.stdout
    trail = read_audit(host.parent / "audit" / "audit.jsonl")
    [event] = [e for e in trail if e["event"] == "backup.restored"]
    assert said in event["detail"]["pg_restore_after_commit"]
    [record] = outbound(fresh)
    assert record.message_id == "<one@KITA-LAB>"
    assert record.payload_path == host.parent / "state" / "payloads" / "a"
    assert record.payload_path.read_bytes() == b"MSH|taken in\r"
    assert token() is not None and token() != before


def test_a_restore_interrupted_before_its_load_committed_says_so_and_leaves_the_host_fresh(
    layout: DemoLayout, postgres_server: PostgresServer, postgres: PostgresSettings, tmp_path: Path
) -> None:
    """Ctrl-C while pg_restore loads, before its transaction committed: the restore says
    it was interrupted and that nothing was restored, and a fresh host is fresh again
    (the files it had placed removed, the spool's tables gone), so that the same restore
    run again is done."""
    key, cert, bundle, fresh, host = _bundle_and_fresh_host(
        layout, postgres_server, postgres, tmp_path
    )
    tools = tmp_path / "tools"
    _pg_bin_dir(host, postgres_server, tools, f'{_LOAD} {_CTRL_C} ;; esac\nexec "$REAL" "$@"')
    payload = host.parent / "state" / "payloads" / "a"

    done = restore(bundle, key, cert, host)
    assert done.returncode == EXIT_FAILED, (done.returncode, done.stderr)
    assert "the restore was interrupted (Ctrl-C) while pg_restore ran" in done.stderr
    assert "nothing was restored" in done.stderr and "fix: restore again" in done.stderr
    assert not payload.exists()
    with postgres_server.admin(fresh.dbname) as admin:
        [(table,)] = admin.execute("SELECT to_regclass('outbound')").fetchall()
    assert table is None
    trail = read_audit(host.parent / "audit" / "audit.jsonl")
    [refused] = [e for e in trail if e["event"] == "backup.restore_refused"]
    assert refused["reason"] == "interrupted"

    (tools / "pg_restore").write_text(
        f'#!/bin/sh\nexec "{postgres_server.bin / "pg_restore"}" "$@"\n'
    )
    again = restore(bundle, key, cert, host)
    assert again.returncode == 0, again.stderr
    [record] = outbound(fresh)
    assert record.payload_path == payload
    assert payload.read_bytes() == b"MSH|taken in\r"
