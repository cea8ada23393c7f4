"""Several real ``medgw run`` nodes of one institution sharing a real PostgreSQL spool.

The lab runs as two nodes (lab-a, lab-b) on one spool database, each with its
own state folder, outbox and audit trail, the bodies folder shared; the
hospital's gateway receives through a TCP front (tests/helpers/cluster.py).  A
node killed while it holds claims leaves its messages to the other node once
its lease runs out; the database stopped and started mid-run loses nothing; and
the crash test of a single node (random SIGKILLs, 200 documents) holds with two
nodes on each side.  Every document reaches the inbox exactly once, with a
verified receipt.
"""

from __future__ import annotations

import hashlib
import http.server
import random
import secrets
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from gateway.backup import pgspool
from gateway.commands.queue import offline_spool
from gateway.config import load_config
from gateway.demo_run import GatewayProcess, drop_file, free_port, read_audit, wait_until
from gateway.errors import MedgwError
from gateway.outbound import INLINE_BODY_BYTES
from gateway.pki.demo import DemoLayout
from gateway.spool import OutboundRecord, OutboundState
from gateway.spool.postgres import PostgresSettings
from gateway.spool.postgres.schema import upgraded_by
from gateway.spool.records import host_node_name
from tests.cli import medgw
from tests.conftest import Processes
from tests.helpers.audit import events, wait_for_events
from tests.helpers.check_config import check_config
from tests.helpers.cluster import (
    RoundRobin,
    add_node,
    inbox,
    listener_port,
    outbound,
    point_peer_at,
)
from tests.helpers.crash import LIMIT_BEYOND_DELIVERIES, drop_while_killing
from tests.helpers.faults import killed_at, wait_killed
from tests.helpers.internal_system import enable_delivery
from tests.helpers.postgres import PostgresServer
from tests.helpers.slow_proxy import edit_every

pytestmark = pytest.mark.daemon


def trails(*sides: Path) -> list[dict[str, Any]]:
    """Every record of the audit trails in these folders (each node writes its own)."""
    return [r for folder in sides for path in folder.glob("*.jsonl") for r in read_audit(path)]


def lost_its_claims(node: GatewayProcess) -> Callable[[], bool]:
    return lambda: any("lease.claims_lost" in line for line in node.raw)


def settled(spool: PostgresSettings, count: int, timeout: float) -> None:
    """Wait until ``count`` messages are in the spool, all delivered; else say where
    each one is."""

    def done() -> bool:
        records = outbound(spool)
        return len(records) == count and {r.state for r in records} == {OutboundState.DELIVERED}

    try:
        wait_until(done, timeout, f"all {count} messages delivered")
    except MedgwError as exc:
        where = Counter((r.state.value, r.node, r.last_error) for r in outbound(spool))
        raise AssertionError(f"{exc}; (state, node, last error): {dict(where)}") from exc


@pytest.fixture
def front() -> Iterator[RoundRobin]:
    proxy = RoundRobin([])
    yield proxy
    proxy.close()


@dataclass(frozen=True)
class Lab:
    """The lab as two nodes (their configurations) on one spool database, sending to the
    hospital through the front."""

    spool: PostgresSettings
    a: Path
    b: Path
    front: RoundRobin

    def slow_handshakes(self) -> None:
        """A send waits up to a minute for the hospital's TLS handshake (the demo: 5 s),
        for a test that holds its answers back."""
        for config in (self.a, self.b):
            edit_every(config, "connect_timeout_seconds = 5", "connect_timeout_seconds = 60")


@pytest.fixture
def lab(
    layout: DemoLayout, processes: Processes, postgres_server: PostgresServer, front: RoundRobin
) -> Lab:
    """lab-a and lab-b on a new spool database; the hospital started behind the front,
    neither lab node."""
    spool = postgres_server.new_database()
    lab = Lab(
        spool,
        add_node(layout.lab, "lab-a", spool),
        add_node(layout.lab, "lab-b", spool, port=free_port()),
        front,
    )
    front.ports.append(listener_port(layout.hospital.config_path))
    point_peer_at(layout.lab, "hospital", front.port)
    processes.start(layout.hospital.config_path)
    return lab


def assert_trails_verify(*configs: Path) -> None:
    """The audit trail of each node, as `medgw audit verify` checks it, is whole."""
    for config in configs:
        verified = medgw("audit", "verify", "--config", str(config))
        assert verified.returncode == 0, verified.stdout + verified.stderr


def test_a_node_killed_while_sending_leaves_its_messages_to_the_other_node(
    layout: DemoLayout,
    processes: Processes,
    lab: Lab,
) -> None:
    lab.slow_handshakes()
    lab.front.held = True  # the hospital's answers do not come back: the sends stay open
    lab_a = processes.start(lab.a)
    documents = {f"doc-{i}.hl7": f"MSH|^~\\&|LAB|{i}\r".encode() * (i + 1) for i in range(6)}
    for name, data in documents.items():
        drop_file(layout.lab.outbox_dir / "hospital", name, data)  # lab-a's outbox

    def held_by_a() -> bool:
        records = outbound(lab.spool)
        return len(records) == len(documents) and all(
            r.state is OutboundState.SENDING and r.node == "lab-a" for r in records
        )

    wait_until(held_by_a, 120, "lab-a sending every document")
    processes.start(lab.b)  # its start leaves lab-a's live claims alone
    assert held_by_a()
    lab_a.kill()  # while it holds the claims
    lab.front.held = False

    audit = layout.lab.root / "audit"
    taken = wait_for_events(audit / "audit-lab-b.jsonl", "message.taken_over", count=6)
    assert {r["detail"]["from_node"] for r in taken} == {"lab-a"}
    assert all(r["node"] == "lab-b" for r in taken)
    receipts = wait_for_events(audit / "audit-lab-b.jsonl", "receipt.received", count=6)
    assert all(r["detail"]["disposition"] == "processed" for r in receipts)
    assert all(r["detail"]["mic_verified"] for r in receipts)
    wait_until(
        lambda: {r.state for r in outbound(lab.spool)} == {OutboundState.DELIVERED},
        60,
        "every message settled",
    )
    # Each document is in the inbox once; the hospital delivered it once and answered
    # the resend with the receipt it had stored.
    assert inbox(layout) == {n: hashlib.sha256(d).hexdigest() for n, d in documents.items()}
    delivered = Counter(
        r["message_id"]
        for r in read_audit(layout.hospital.audit_log)
        if r["event"] == "message.delivered"
    )
    assert len(delivered) == 6 and set(delivered.values()) == {1}
    assert {r["message_id"] for r in taken} == set(delivered)
    # lab-a's trail never saw a receipt: it sent nothing to completion.
    assert events(audit / "audit.jsonl", "receipt.received") == []


def test_a_second_node_under_a_running_nodes_name_refuses_to_start(
    layout: DemoLayout,
    processes: Processes,
    lab: Lab,
) -> None:
    """A node configured with the name of a running node (lab-a) refuses to start before
    it touches the spool's work: lab-a's sends stay lab-a's, and no record of lab-a's
    goes into the second node's trail; once lab-a is killed, its name is free and a node
    under it starts and takes up lab-a's interrupted sends."""
    lab.slow_handshakes()
    lab.front.held = True  # lab-a's sends stay open
    lab_a = processes.start(lab.a)
    documents = [f"MSH|^~\\&|LAB|{i}\r".encode() for i in range(2)]
    for i, data in enumerate(documents):
        drop_file(layout.lab.outbox_dir / "hospital", f"doc-{i}.hl7", data)  # lab-a's outbox

    def held_by_a() -> bool:
        records = outbound(lab.spool)
        return len(records) == len(documents) and all(
            r.state is OutboundState.SENDING and r.node == "lab-a" for r in records
        )

    wait_until(held_by_a, 120, "lab-a sending every document")
    # lab-b's configuration (its own state folder, outbox, trail and port) named lab-a.
    edit_every(lab.b, 'node_name = "lab-b"', 'node_name = "lab-a"')
    twin = processes.start(lab.b, wait=False)
    assert twin.wait_exit() != 0
    [failed] = [line for line in twin.lines if line.get("event") == "daemon.failed"]
    assert (
        "node name 'lab-a' ([cluster] node_name) is in use by another running node"
        in (failed["error"])
    )
    assert "'medgw node lab-a'" in failed["error"]
    assert "node_name of its own" in failed["fix"]
    assert not any(
        line.get("event") in ("message.requeued_after_restart", "recovery.audit_record_written")
        for line in twin.lines
    )
    assert held_by_a()
    ids = {r.message_id for r in outbound(lab.spool)}
    trail = layout.lab.root / "audit" / "audit-lab-b.jsonl"
    assert not trail.exists() or not [r for r in read_audit(trail) if r.get("message_id") in ids]

    lab_a.kill()  # its session, and the name's lock with it, ends with the process
    again = processes.start(lab.b)
    requeued = [
        line["message_id"]
        for line in again.lines
        if line.get("event") == "message.requeued_after_restart"
    ]
    assert sorted(requeued) == sorted(ids)
    lab.front.held = False
    settled(lab.spool, len(documents), 120)
    delivered_once(layout, *documents)


def test_an_offline_command_opens_the_spool_as_its_configured_node(
    layout: DemoLayout, postgres_server: PostgresServer
) -> None:
    """medgw queue list with the node stopped opens the spool as the node [cluster]
    node_name names, not as the host: the spool's schema it creates names lab-a, and so
    does its refusal of a spool a newer release upgraded."""
    assert host_node_name() != "lab-a"
    spool = postgres_server.new_database()
    config = add_node(layout.lab, "lab-a", spool)
    listed = medgw("queue", "list", "--config", config)
    assert listed.returncode == 0, listed.stderr
    with postgres_server.admin(spool.dbname) as db:
        [(said,)] = db.execute(
            "SELECT obj_description(CAST('spool_schema' AS regclass), 'pg_class')"
        ).fetchall()
        assert said == upgraded_by("lab-a")
        db.execute("UPDATE spool_schema SET version = version + 1")
    refused = medgw("queue", "list", "--config", config)
    assert refused.returncode != 0
    assert "on node lab-a): medgw" in refused.stderr
    assert "upgrade medgw on node lab-a " in refused.stderr


def test_an_offline_commands_sessions_are_named_as_a_commands_not_as_its_nodes(
    layout: DemoLayout, postgres_server: PostgresServer
) -> None:
    """A command that opens the spool with the node stopped (medgw queue ...) connects as
    `medgw command lab-a`: a restore refused while it is connected names the command, not
    a running node lab-a."""
    spool = postgres_server.new_database()
    opened = offline_spool(load_config(add_node(layout.lab, "lab-a", spool)))
    try:
        with pgspool.held(spool) as restoring:  # what a restore holds, and looks from
            connected = pgspool.nodes_connected(restoring)
    finally:
        opened.close()
    assert connected == ["medgw command lab-a (1 session over the server's local socket)"]


def test_a_shared_key_folder_that_is_not_there_is_an_error_not_made_anew(
    layout: DemoLayout, postgres_server: PostgresServer
) -> None:
    """lab-a's [at_rest] key_dir on the nodes' shared file system, not mounted: medgw
    must not make the folder, and its first key-encryption key, on the local disk, where
    no other node has that key."""
    config = add_node(layout.lab, "lab-a", postgres_server.new_database())
    keys = layout.lab.root / "shared-keys"
    keys.rmdir()  # the shared file system not mounted
    said = (
        f"at_rest.key_dir: the nodes' shared key folder {keys} does not exist (or is not "
        "a folder); on a spool in PostgreSQL medgw does not create it: if the shared file "
        "system it is on is not mounted, the key-encryption key this node would make there "
        "is one no other node has, and what it encrypts at rest would be unreadable to them "
        f"(fix: mount the shared file system (findmnt -T {layout.lab.root}), or, on a new "
        f"one, create the folder in it (mkdir -m 700 {keys}, owned by the medgw user); keep "
        "it a folder inside the mount, not the mount point itself, so that a missing mount "
        "is seen)"
    )
    checked = check_config(config)
    assert checked.returncode == 1 and said in checked.stderr, checked.stderr
    started = medgw("run", "--config", config)
    assert started.returncode == 1 and "Traceback" not in started.stderr, started.stderr
    assert said in started.stderr, started.stderr
    assert not keys.exists()

    keys.mkdir(mode=0o700)  # mounted
    assert check_config(config).returncode == 0


def test_a_node_whose_clock_is_ahead_takes_over_only_the_claims_that_ran_out(
    layout: DemoLayout,
    processes: Processes,
    lab: Lab,
) -> None:
    """lab-b's clock is ten minutes ahead of lab-a's: leases are judged by the database's
    clock, so lab-b leaves lab-a's live sends alone, and still takes them over once
    lab-a is dead and its lease has run out."""
    lab.slow_handshakes()
    lab.front.held = True  # the sends stay open
    lab_a = processes.start(lab.a)
    documents = [f"MSH|^~\\&|LAB|{i}\r".encode() for i in range(3)]
    for i, data in enumerate(documents[:2]):
        drop_file(layout.lab.outbox_dir / "hospital", f"doc-{i}.hl7", data)  # lab-a's outbox

    def sending_by(node: str, count: int) -> Callable[[], bool]:
        return lambda: (
            sum(r.state is OutboundState.SENDING and r.node == node for r in outbound(lab.spool))
            == count
        )

    wait_until(sending_by("lab-a", 2), 120, "lab-a sending its documents")
    lab_b = processes.start(lab.b, prefix=killed_at("--clock-ahead", "600"))
    drop_file(layout.lab.root / "outbox-lab-b" / "hospital", "doc-2.hl7", documents[2])
    wait_until(sending_by("lab-b", 1), 120, "lab-b sending its document")

    def renewed_after(lease: float) -> Callable[[], bool]:
        return lambda: own_lease() != lease

    def own_lease() -> float:
        [mine] = [r for r in outbound(lab.spool) if r.filename == "doc-2.hl7"]
        return mine.lease_until

    # Its claim renewed twice: lab-b has judged every claim in a take-over round between.
    for _ in range(2):
        wait_until(renewed_after(own_lease()), 60, "lab-b renewing its claim")
    assert sending_by("lab-a", 2)()  # lab-a's live claims left alone
    trail_b = layout.lab.root / "audit" / "audit-lab-b.jsonl"
    assert events(trail_b, "message.taken_over") == []
    # lab-b says once that its clock is off the database's; lab-a, in step, says nothing.
    [skewed] = [line for line in lab_b.lines if line.get("event") == "clock.skewed"]
    assert -610 < skewed["offset_seconds"] < -590
    assert "chrony" in skewed["fix"]
    [alert] = events(trail_b, "clock.skewed")
    assert "600 s ahead of the clock of the spool's database server" in alert["reason"]
    assert not any(line.get("event") == "clock.skewed" for line in lab_a.lines)

    lab_a.kill()  # dead: its claims run out, and lab-b takes them over
    taken = wait_for_events(trail_b, "message.taken_over", count=2)
    assert {r["detail"]["from_node"] for r in taken} == {"lab-a"}
    lab.front.held = False
    settled(lab.spool, len(documents), 120)
    delivered_once(layout, *documents)


def test_a_document_a_dead_node_took_in_is_sent_by_a_running_node(
    layout: DemoLayout,
    processes: Processes,
    lab: Lab,
) -> None:
    """lab-a takes a document from its outbox (its copy kept, encrypted, in the spool
    row) and is killed before signing it, never to start again: lab-b, running all
    along, prepares and sends it once lab-a's lease has run out."""
    spool = lab.spool
    processes.start(lab.b)
    lab_a = processes.start(
        lab.a,
        prefix=killed_at("--kill-before", "gateway.outbound.seal:Sealer.seal_and_queue_all"),
    )
    data = b"MSH|^~\\&|LAB|left behind\r"
    drop_file(layout.lab.outbox_dir / "hospital", "left.hl7", data)
    wait_killed(lab_a)
    [left] = outbound(spool)
    assert (left.state, left.node) == (OutboundState.INTAKE, "lab-a")
    assert left.payload is not None  # any node can read it

    [taken] = wait_for_events(layout.lab.root / "audit" / "audit-lab-b.jsonl", "message.taken_over")
    assert (taken["message_id"], taken["detail"]["from_node"]) == (left.message_id, "lab-a")
    settled(spool, 1, 120)
    assert inbox(layout) == {"left.hl7": hashlib.sha256(data).hexdigest()}


def test_a_large_document_a_dead_node_took_in_is_sent_once_by_a_running_node(
    layout: DemoLayout,
    processes: Processes,
    lab: Lab,
) -> None:
    """lab-a takes a document too large for a spool row from its outbox (its copy,
    encrypted at rest, in lab-a's folder of the shared bodies folder) and is killed
    before signing it: lab-b, running all along, prepares and sends it once lab-a's
    lease has run out, and verifies its receipt.  lab-a, started again later, does not
    send it a second time."""
    trail_a, trail_b = layout.lab.audit_log, layout.lab.root / "audit" / "audit-lab-b.jsonl"
    processes.start(lab.b)
    lab_a = processes.start(
        lab.a, prefix=killed_at("--kill-before", "gateway.outbound.seal:Sealer.seal_and_queue_all")
    )
    data = random.Random(11).randbytes(INLINE_BODY_BYTES + 64 * 1024)
    drop_file(layout.lab.outbox_dir / "hospital", "study.dcm", data)
    wait_killed(lab_a)
    [left] = outbound(lab.spool)
    assert (left.state, left.node, left.payload) == (OutboundState.INTAKE, "lab-a", None)
    shared = layout.lab.root / "shared-bodies" / "payloads"
    assert left.payload_path.parent == shared / "lab-a"
    assert data[:4096] not in left.payload_path.read_bytes()  # encrypted at rest

    [taken] = wait_for_events(trail_b, "message.taken_over")
    assert (taken["message_id"], taken["detail"]["from_node"]) == (left.message_id, "lab-a")
    [received] = wait_for_events(trail_b, "receipt.received")
    assert received["message_id"] == left.message_id
    assert received["detail"]["disposition"] == "processed"
    assert received["detail"]["mic_verified"] is True
    settled(lab.spool, 1, 120)
    assert not left.payload_path.exists()  # only its signed, encrypted body stays
    study = hashlib.sha256(data).hexdigest()
    assert inbox(layout) == {"study.dcm": study}

    # Started again, lab-a has nothing of it left to do: a document dropped since is
    # sent (by then its start is long over), the first one is not sent again.
    lab_a = processes.start(lab.a)
    later = b"MSH|^~\\&|LAB|later\r"
    drop_file(layout.lab.outbox_dir / "hospital", "later.hl7", later)
    settled(lab.spool, 2, 120)
    assert lab_a.stop() == 0
    assert inbox(layout) == {"study.dcm": study, "later.hl7": hashlib.sha256(later).hexdigest()}
    delivered = Counter(
        r["message_id"]
        for r in read_audit(layout.hospital.audit_log)
        if r["event"] == "message.delivered"
    )
    assert len(delivered) == 2 and set(delivered.values()) == {1}
    assert not [r for r in read_audit(trail_a) if r.get("message_id") == left.message_id]
    assert [r["event"] for r in read_audit(trail_b) if r.get("message_id") == left.message_id] == [
        "message.taken_over",
        "message.accepted",
        "message.sent",
        "receipt.received",
    ]
    assert [p for p in shared.rglob("*") if p.is_file()] == []
    assert_trails_verify(lab.a, lab.b)


# lab-a taken down between recording a document it took in (its copy complete, in the
# spool row) and removing it from its outbox.
KILLED_BEFORE_REMOVING = killed_at("--kill-before", "gateway.outbound.intake:OutboxIntake._moved")


def delivered_once(layout: DemoLayout, *documents: bytes) -> None:
    """The hospital delivered each of ``documents`` once, and nothing else."""
    delivered = Counter(
        r["message_id"]
        for r in read_audit(layout.hospital.audit_log)
        if r["event"] == "message.delivered"
    )
    assert len(delivered) == len(documents) and set(delivered.values()) == {1}
    assert sorted(inbox(layout).values()) == sorted(
        hashlib.sha256(d).hexdigest() for d in documents
    )


@pytest.mark.parametrize("replaced", [False, True], ids=["same-file", "new-file-same-name"])
def test_a_document_left_in_a_dead_nodes_outbox_that_another_node_sent_is_not_sent_again(
    layout: DemoLayout, processes: Processes, lab: Lab, tmp_path: Path, replaced: bool
) -> None:
    """lab-a takes a document in and is killed before removing it from its outbox; lab-b,
    which cannot reach lab-a's outbox (on lab-a's machine: here moved out of its way),
    takes it over and sends it.  lab-a, started again, removes the file instead of
    sending it a second time; a new document dropped under the same name while lab-a
    was down is sent."""
    outbox = layout.lab.outbox_dir
    lab_a = processes.start(lab.a, prefix=KILLED_BEFORE_REMOVING)
    first = b"MSH|^~\\&|LAB|prescription\r"
    drop_file(outbox / "hospital", "rx.hl7", first)
    wait_killed(lab_a)
    [left] = outbound(lab.spool)
    assert (left.state, left.node) == (OutboundState.INTAKE, "lab-a")
    assert left.payload is not None and (outbox / "hospital" / "rx.hl7").exists()
    elsewhere = tmp_path / "lab-a-machine-outbox"
    outbox.rename(elsewhere)

    processes.start(lab.b)
    settled(lab.spool, 1, 120)
    second = b"MSH|^~\\&|LAB|prescription, a new one\r"
    if replaced:
        drop_file(elsewhere / "hospital", "rx.hl7", second)
    elsewhere.rename(outbox)

    lab_a = processes.start(lab.a)
    # Gone from the outbox: removed (the same file), or taken by lab-a's intake (recorded
    # before it was removed: all its messages are in the spool by then).
    wait_until(lambda: not (outbox / "hospital" / "rx.hl7").exists(), 60, "the outbox emptied")
    settled(lab.spool, 1 + replaced, 120)
    assert lab_a.stop() == 0
    delivered_once(layout, first, *([second] if replaced else []))
    removed = [line for line in lab_a.raw if "recovery.removed_sent_elsewhere" in line]
    assert len(removed) == (not replaced)
    assert all(left.message_id in line and "lab-b" in line for line in removed)
    assert not [
        r for r in read_audit(layout.lab.audit_log) if r.get("message_id") == left.message_id
    ]
    assert_trails_verify(lab.a, lab.b)


def test_a_node_never_takes_an_outbox_file_another_node_holds_in_intake(
    layout: DemoLayout, processes: Processes, lab: Lab
) -> None:
    """lab-a takes a document in and is killed before removing it from its outbox; lab-b
    claims it and is killed before preparing it (its claim lasting two minutes).  lab-a,
    started again meanwhile, leaves it to lab-b (no second message of it) and removes
    its outbox file; lab-b, started again, sends it once."""
    edit_every(lab.b, "lease_seconds = 5", "lease_seconds = 120")
    lab_b = processes.start(
        lab.b, prefix=killed_at("--kill-before", "gateway.daemon.leases:LeaseKeeper._taken_over")
    )
    lab_a = processes.start(lab.a, prefix=KILLED_BEFORE_REMOVING)
    data = b"MSH|^~\\&|LAB|claimed elsewhere\r"
    drop_file(layout.lab.outbox_dir / "hospital", "rx.hl7", data)
    wait_killed(lab_a)
    wait_killed(lab_b)  # its claim committed, the document not yet prepared
    [left] = outbound(lab.spool)
    assert (left.state, left.node) == (OutboundState.INTAKE, "lab-b")
    assert left.lease_until > time.time() + 30

    lab_a = processes.start(lab.a)
    assert not (layout.lab.outbox_dir / "hospital" / "rx.hl7").exists()
    assert [r.message_id for r in outbound(lab.spool)] == [left.message_id]
    lab_b = processes.start(lab.b)
    settled(lab.spool, 1, 120)
    assert lab_a.stop() == 0 and lab_b.stop() == 0
    delivered_once(layout, data)
    assert_trails_verify(lab.a, lab.b)


def test_a_document_another_node_held_when_its_node_started_again_is_sent_once_under_its_id(
    layout: DemoLayout, processes: Processes, lab: Lab, tmp_path: Path
) -> None:
    """lab-a records a large document from its outbox and is killed before its copy is
    written: the file stays in lab-a's outbox.  lab-b, starting while lab-a is down,
    claims the intake and is killed before giving it back (its claim lasting half a
    minute).  lab-a, started again meanwhile, leaves the file alone (no second message
    of it) and, once lab-b's claim has run out, sends the document under its first
    Message-ID, without a restart: the hospital receives it once, and no
    `message.failed` is raised for it."""
    edit_every(lab.b, "lease_seconds = 5", "lease_seconds = 30")
    lab_a = processes.start(
        lab.a, prefix=killed_at("--kill-before", "gateway.outbound.intake:move_into_spool")
    )
    data = random.Random(19).randbytes(INLINE_BODY_BYTES + 64 * 1024)
    outbox_file = layout.lab.outbox_dir / "hospital" / "study.dcm"
    drop_file(outbox_file.parent, outbox_file.name, data)
    wait_killed(lab_a)
    [left] = outbound(lab.spool)
    assert (left.state, left.node, left.payload) == (OutboundState.INTAKE, "lab-a", None)
    assert not left.payload_path.exists() and outbox_file.exists()
    wait_until(lambda: time.time() > left.lease_until + 1, 60, "lab-a's claim ran out")
    # lab-b cannot reach lab-a's outbox (on lab-a's machine: here moved out of its way).
    outbox, elsewhere = layout.lab.outbox_dir, tmp_path / "lab-a-machine-outbox"
    outbox.rename(elsewhere)
    lab_b = processes.start(
        lab.b,
        prefix=killed_at(
            "--kill-before", "gateway.spool.sqlite.outbound:OutboundQueue.intake_release"
        ),
        wait=False,
    )
    wait_killed(lab_b)  # its claim committed, not yet given back
    [held] = outbound(lab.spool)
    assert (held.message_id, held.node) == (left.message_id, "lab-b")
    elsewhere.rename(outbox)

    lab_a = processes.start(lab.a)
    settled(lab.spool, 1, 120)
    assert lab_a.stop() == 0
    delivered_once(layout, data)
    [record] = outbound(lab.spool)
    assert record.message_id == left.message_id and record.queued_by == "lab-a"
    assert not outbox_file.exists()
    if any("recovery.intake_held_elsewhere" in line for line in lab_a.raw):
        # lab-a started before lab-b's claim ran out (else its start took the document up)
        assert any("recovery.intake_taken_back" in line for line in lab_a.raw)
    records = [
        r for r in trails(layout.lab.root / "audit") if r.get("message_id") == left.message_id
    ]
    assert [r["event"] for r in records if r["severity"] != "info"] == []
    assert [(r["event"], r["node"]) for r in records if r["event"] == "message.accepted"] == [
        ("message.accepted", "lab-a")
    ]
    assert_trails_verify(lab.a, lab.b)


def test_a_record_a_kill_cut_off_goes_into_the_trail_of_the_node_that_made_the_change(
    layout: DemoLayout,
    processes: Processes,
    lab: Lab,
) -> None:
    """lab-a queues a document and is killed before writing its ``message.accepted``;
    lab-b sends it meanwhile and records the receipt in its own trail.  Started again,
    lab-a writes the ``message.accepted`` into its trail, once: not lab-b, which did not
    queue it, and whose records of it stay its own."""
    spool = lab.spool
    trail_a, trail_b = layout.lab.audit_log, layout.lab.root / "audit" / "audit-lab-b.jsonl"
    lab_a = processes.start(
        lab.a,
        prefix=killed_at(
            "--kill-after", "gateway.spool.sqlite.outbound:OutboundQueue.mark_queued_all"
        ),
    )
    drop_file(layout.lab.outbox_dir / "hospital", "cut.hl7", b"MSH|^~\\&|LAB|cut off\r")
    wait_killed(lab_a)
    [queued] = outbound(spool)
    assert queued.state is OutboundState.QUEUED

    processes.start(lab.b)
    [received] = wait_for_events(trail_b, "receipt.received")
    assert received["message_id"] == queued.message_id
    assert processes.start(lab.a).stop() == 0

    [accepted] = events(trail_a, "message.accepted")
    assert accepted["message_id"] == queued.message_id and accepted["node"] == "lab-a"
    assert accepted["detail"]["recorded_at_recovery"] is True
    assert not events(trail_b, "message.accepted")
    receipts = [r for r in trails(trail_a.parent) if r["event"] == "receipt.received"]
    assert [r["node"] for r in receipts] == ["lab-b"]  # not written again by lab-a
    assert_trails_verify(lab.a, lab.b)


def _taken_over_written_at_start(
    processes: Processes, lab: Lab, trail_b: Path, message_id: str
) -> dict[str, Any]:
    """lab-b, killed before writing its take-over of ``message_id``, started again: it
    writes that ``message.taken_over`` (once, into its own trail), and sends the message."""
    lab_b = processes.start(lab.b)
    wait_for_events(trail_b, "receipt.received")
    assert lab_b.stop() == 0
    [taken] = events(trail_b, "message.taken_over")
    assert taken["message_id"] == message_id and taken["node"] == "lab-b"
    assert taken["detail"]["recorded_at_recovery"] is True
    assert_trails_verify(lab.b)
    return taken


def test_a_take_over_a_kill_cut_off_from_its_record_is_recorded_at_the_next_start(
    layout: DemoLayout,
    processes: Processes,
    lab: Lab,
) -> None:
    """lab-a dies while sending; lab-b queues the message again once lab-a's claim has
    run out, and is killed before writing ``message.taken_over``.  Started again, lab-b
    writes it (once, into its own trail), then sends the message."""
    lab.slow_handshakes()
    spool = lab.spool
    trail_b = layout.lab.root / "audit" / "audit-lab-b.jsonl"
    lab.front.held = True  # the hospital's answers do not come back: the send stays open
    lab_a = processes.start(lab.a)
    drop_file(layout.lab.outbox_dir / "hospital", "held.hl7", b"MSH|^~\\&|LAB|held\r")

    def sending() -> list[OutboundRecord]:
        return [r for r in outbound(spool) if r.state is OutboundState.SENDING]

    [held] = wait_until(sending, 120, "lab-a sending the document")
    lab_a.kill()  # while it holds the claim
    lab.front.held = False
    wait_until(lambda: outbound(spool)[0].lease_until < time.time(), 60, "its claim ran out")

    lab_b = processes.start(
        lab.b,
        wait=False,
        prefix=killed_at(
            "--kill-after", "gateway.spool.sqlite.outbound:OutboundQueue.take_over_expired"
        ),
    )
    wait_killed(lab_b)
    [queued] = outbound(spool)
    assert (queued.state, queued.node) == (OutboundState.QUEUED, None)
    assert not events(trail_b, "message.taken_over")

    _taken_over_written_at_start(processes, lab, trail_b, held.message_id)


def test_a_failed_send_a_kill_cut_off_is_recorded_though_another_node_sent_it_since(
    layout: DemoLayout,
    processes: Processes,
    lab: Lab,
) -> None:
    """The hospital unreachable, lab-a's send fails (queued again) and lab-a is killed
    before writing ``message.send_failed``; lab-b then sends the message and its receipt
    settles it, which leaves the row naming lab-b's record.  Started again, lab-a still
    writes its ``message.send_failed`` (once, into its own trail)."""
    spool = lab.spool
    trail_a, trail_b = layout.lab.audit_log, layout.lab.root / "audit" / "audit-lab-b.jsonl"
    hospital = lab.front.ports.pop()  # no node behind the front: every send fails
    lab_a = processes.start(
        lab.a,
        prefix=killed_at("--kill-after", "gateway.spool.sqlite.outbound:OutboundQueue.mark_retry"),
    )
    drop_file(layout.lab.outbox_dir / "hospital", "retried.hl7", b"MSH|^~\\&|LAB|retried\r")
    wait_killed(lab_a)
    [queued] = outbound(spool)
    assert (queued.state, queued.audited_by) == (OutboundState.QUEUED, "lab-a")
    assert not events(trail_a, "message.send_failed")

    lab.front.ports.append(hospital)
    processes.start(lab.b)
    [received] = wait_for_events(trail_b, "receipt.received")
    assert received["message_id"] == queued.message_id
    assert outbound(spool)[0].audited_by == "lab-b"
    assert processes.start(lab.a).stop() == 0

    [failed] = events(trail_a, "message.send_failed")
    assert failed["message_id"] == queued.message_id and failed["node"] == "lab-a"
    assert failed["detail"] == {"attempts": 1, "recorded_at_recovery": True}
    assert not events(trail_b, "message.send_failed")
    assert_trails_verify(lab.a, lab.b)


def test_an_intake_take_over_a_kill_cut_off_from_its_record_is_recorded_at_the_next_start(
    layout: DemoLayout,
    processes: Processes,
    lab: Lab,
) -> None:
    """lab-a takes a document in and dies before signing it; lab-b, running, claims it
    once lab-a's lease has run out and is killed before writing ``message.taken_over``.
    Started again, lab-b writes it (once, into its own trail), then sends the message."""
    trail_b = layout.lab.root / "audit" / "audit-lab-b.jsonl"
    lab_b = processes.start(
        lab.b, prefix=killed_at("--kill-before", "gateway.daemon.leases:LeaseKeeper._taken_over")
    )
    lab_a = processes.start(
        lab.a, prefix=killed_at("--kill-before", "gateway.outbound.seal:Sealer.seal_and_queue_all")
    )
    drop_file(layout.lab.outbox_dir / "hospital", "left.hl7", b"MSH|^~\\&|LAB|left behind\r")
    wait_killed(lab_a)
    wait_killed(lab_b)  # its claim on lab-a's intake committed, its record not written
    [left] = outbound(lab.spool)
    assert (left.state, left.node) == (OutboundState.INTAKE, "lab-b")
    assert not events(trail_b, "message.taken_over")

    taken = _taken_over_written_at_start(processes, lab, trail_b, left.message_id)
    assert "had taken it in" in taken["reason"]


def test_a_body_write_a_kill_cut_short_leaves_no_partial_file_in_the_shared_folder(
    layout: DemoLayout,
    processes: Processes,
    lab: Lab,
) -> None:
    """In the bodies folder the nodes share, a partial file may be another node's write
    in progress, so a start leaves the young ones; the partial file of a body whose
    writing a kill cut short is this node's own and is removed when the node prepares
    that message again (the cluster crash test found one left behind)."""
    spool = lab.spool
    lab_a = processes.start(
        lab.a, prefix=killed_at("--kill-before", "gateway.outbound.seal:Sealer.seal_and_queue_all")
    )
    data = random.Random(7).randbytes(INLINE_BODY_BYTES + 4096)  # its body is a file
    drop_file(layout.lab.outbox_dir / "hospital", "image.dcm", data)
    wait_killed(lab_a)
    [left] = outbound(spool)
    assert left.state is OutboundState.INTAKE and left.payload is None
    bodies = layout.lab.root / "shared-bodies"
    # What a kill in the middle of writing its body leaves, and a write of another
    # message's body in progress on another node.
    cut = bodies / f".{left.payload_path.name}.lab-a.as2.{secrets.token_hex(6)}.partial"
    cut.write_bytes(data[:1000])
    elsewhere = bodies / f".{secrets.token_hex(12)}.as2.{secrets.token_hex(6)}.partial"
    elsewhere.write_bytes(data[:1000])

    processes.start(lab.a)
    settled(spool, 1, 120)
    assert inbox(layout) == {"image.dcm": hashlib.sha256(data).hexdigest()}
    assert not cut.exists()
    assert elsewhere.exists()  # young, and not this node's to judge


def test_a_node_removes_at_its_start_the_partial_body_files_a_kill_left_of_its_own_writes(
    layout: DemoLayout,
    processes: Processes,
    lab: Lab,
) -> None:
    """A kill in the middle of writing a body leaves its partial file in the shared
    bodies folder; if another node takes that message over, this node never prepares it
    again.  Its next start removes the partial files of its own body writes (their names
    say whose they are), however young, and leaves the other nodes' (the cluster crash
    test found one left behind)."""
    bodies = layout.lab.root / "shared-bodies"
    bodies.mkdir(parents=True, exist_ok=True)
    data = random.Random(8).randbytes(1000)
    own = bodies / f".{secrets.token_hex(12)}.lab-a.as2.{secrets.token_hex(6)}.partial"
    others = bodies / f".{secrets.token_hex(12)}.lab-b.as2.{secrets.token_hex(6)}.partial"
    suffixed = bodies / f".{secrets.token_hex(12)}.x.lab-a.as2.{secrets.token_hex(6)}.partial"
    for path in (own, others, suffixed):
        path.write_bytes(data)
    lab_a = processes.start(lab.a)  # ready once its recovery is done
    assert not own.exists()
    assert others.exists() and suffixed.exists()  # young, and not this node's to judge
    assert any(
        line.get("event") == "recovery.removed_partial_file" and line.get("folder") == bodies.name
        for line in lab_a.lines
    )
    assert lab_a.stop() == 0


def test_two_nodes_lose_nothing_when_the_database_restarts_mid_run(
    layout: DemoLayout,
    processes: Processes,
    postgres_server: PostgresServer,
    lab: Lab,
) -> None:
    spool = lab.spool
    nodes = [processes.start(lab.a), processes.start(lab.b)]
    outboxes = [layout.lab.outbox_dir / "hospital", layout.lab.root / "outbox-lab-b" / "hospital"]
    sent: dict[str, str] = {}

    def drop(count: int) -> None:
        for _ in range(count):
            name = f"r-{len(sent):03d}.hl7"
            data = f"MSH|^~\\&|LAB|{len(sent)}\r".encode() * 3
            if len(sent) % 5 == 0:  # larger: its body is a file in the shared folder
                data = random.randbytes(INLINE_BODY_BYTES + 1024)
            drop_file(outboxes[len(sent) % 2], name, data)
            sent[name] = hashlib.sha256(data).hexdigest()

    drop(10)
    wait_until(lambda: len(inbox(layout)) >= 4, 120, "some documents delivered")
    postgres_server.stop("immediate")
    try:
        drop(10)  # they wait in the outboxes
        # Each node finds it cannot renew its claims and stops sending (half a lease).
        for node in nodes:
            wait_until(lost_its_claims(node), 60, "the node to say it lost its claims")
        assert all(node.proc.poll() is None for node in nodes)  # both keep running
    finally:
        postgres_server.start()
    drop(10)
    settled(spool, 30, 180)
    assert inbox(layout) == sent
    delivered = Counter(
        r["message_id"]
        for r in read_audit(layout.hospital.audit_log)
        if r["event"] == "message.delivered"
    )
    assert len(delivered) == 30 and set(delivered.values()) == {1}
    receipts = [r for r in trails(layout.lab.root / "audit") if r["event"] == "receipt.received"]
    assert all(r["detail"]["mic_verified"] for r in receipts)
    assert {r["message_id"] for r in receipts} == set(delivered)
    for node in nodes:
        assert node.stop() == 0


def test_a_node_that_cannot_renew_its_claims_says_why_how_many_and_what_to_do(
    layout: DemoLayout,
    processes: Processes,
    postgres_server: PostgresServer,
    lab: Lab,
) -> None:
    """The database goes while lab-a holds three sends open: its lease.claims_lost line
    names the cause, how many claims it held and what happens and what to do."""
    lab.slow_handshakes()
    lab.front.held = True  # the hospital's answers do not come back: the sends stay open
    lab_a = processes.start(lab.a)
    for n in range(3):
        drop_file(layout.lab.outbox_dir / "hospital", f"doc-{n}.hl7", f"MSH|{n}\r".encode())

    def held_by_a() -> bool:
        records = outbound(lab.spool)
        return len(records) == 3 and all(r.state is OutboundState.SENDING for r in records)

    wait_until(held_by_a, 120, "lab-a sending every document")
    claimed = max(r.lease_until for r in outbound(lab.spool))
    wait_until(
        lambda: all(r.lease_until > claimed for r in outbound(lab.spool)),
        60,
        "a renewal of all three claims",
    )
    postgres_server.stop("immediate")
    try:
        wait_until(lost_its_claims(lab_a), 60, "the node to say it lost its claims")
        [lost] = [line for line in lab_a.lines if line.get("event") == "lease.claims_lost"]
        assert lost["level"] == "error" and lost["claims"] == 3, lost
        assert f"the spool {lab.spool.where} is unreachable" in lost["error"], lost
        assert lost["unrenewed_seconds"] >= 2.5, lost  # half the 5 s lease
        assert "stops the work of its 3 claims in progress" in lost["fix"], lost
        assert "other nodes take them over" in lost["fix"], lost
        assert "check the spool database" in lost["fix"], lost
    finally:
        lab.front.held = False
        postgres_server.start()
    settled(lab.spool, 3, 180)
    assert lab_a.stop() == 0


class HeldInternalSystem:
    """The internal system of the HTTP hand-over: the first POST is never answered (the
    node making it is killed meanwhile), the others are answered 200; each POST with the
    time it came."""

    def __init__(self, port: int) -> None:
        self.posts: list[tuple[float, dict[str, str]]] = []
        self.release = threading.Event()
        system = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                self.rfile.read(int(self.headers["Content-Length"]))
                system.posts.append((time.monotonic(), dict(self.headers)))
                if len(system.posts) == 1:
                    system.release.wait(120)
                self.send_response(200)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", port), Handler)
        self.server.daemon_threads = True
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.release.set()
        self.server.shutdown()
        self.server.server_close()


def test_a_node_killed_while_handing_over_leaves_the_document_to_the_other_node(
    layout: DemoLayout,
    processes: Processes,
    postgres_server: PostgresServer,
    internal_port: int,
) -> None:
    """The hospital runs as two nodes.  hospital-a is POSTing a received document to the
    internal system when it is killed; hospital-b, running meanwhile, leaves a's live
    claim alone, then takes the hand-over over once a's lease ran out and makes it."""
    enable_delivery(layout, internal_port)
    spool = postgres_server.new_database()
    node_a = add_node(layout.hospital, "hospital-a", spool)
    node_b = add_node(layout.hospital, "hospital-b", spool, port=free_port())
    system = HeldInternalSystem(internal_port)
    try:
        hospital_a = processes.start(node_a)
        processes.start(layout.lab.config_path)
        drop_file(layout.lab.outbox_for("hospital"), "doc.hl7", b"MSH|doc\r")
        wait_until(lambda: len(system.posts) == 1, 120, "hospital-a handing the document over")
        processes.start(node_b)
        trail_b = layout.hospital.root / "audit" / "audit-hospital-b.jsonl"
        wait_for_events(trail_b, "daemon.started")
        hospital_a.kill()  # while it holds the hand-over
        killed_at = time.monotonic()
        [taken] = wait_for_events(
            trail_b, "message.taken_over", where=lambda r: r.get("direction") == "inbound"
        )
        assert taken["detail"]["from_node"] == "hospital-a" and taken["node"] == "hospital-b"
        [handed] = wait_for_events(trail_b, "message.handed_over")
        assert handed["message_id"] == taken["message_id"]
        # hospital-b POSTed once, and only after hospital-a was gone.
        [(first_at, first), (then_at, then)] = system.posts
        assert then_at > killed_at > first_at
        assert then["Idempotency-Key"] == first["Idempotency-Key"]
        assert then["X-Medgw-Message-Id"] == handed["message_id"]
    finally:
        system.close()


MESSAGES = 200
DELIVERED_WITHIN = 400  # seconds, once every document is dropped


@pytest.mark.long
# pytest's limit of a test (300 s) would end the run before its own deadline: it allows
# the drops, the restarts and the stops beyond the wait for the deliveries.
@pytest.mark.timeout(LIMIT_BEYOND_DELIVERIES + DELIVERED_WITHIN)
def test_random_sigkills_of_two_nodes_on_each_side_deliver_every_message_exactly_once(
    layout: DemoLayout,
    processes: Processes,
    postgres_server: PostgresServer,
    front: RoundRobin,
) -> None:
    """The crash test (tests/test_crash.py) with two nodes on each side, each side's
    nodes on one PostgreSQL spool; the hospital's behind one address, sharing the
    inbox."""
    lab_spool, hospital_spool = postgres_server.new_database(), postgres_server.new_database()
    configs = {
        "lab-a": add_node(layout.lab, "lab-a", lab_spool),
        "lab-b": add_node(layout.lab, "lab-b", lab_spool, port=free_port()),
        "hospital-a": add_node(layout.hospital, "hospital-a", hospital_spool),
        "hospital-b": add_node(layout.hospital, "hospital-b", hospital_spool, port=free_port()),
    }
    front.ports.extend(listener_port(configs[n]) for n in ("hospital-a", "hospital-b"))
    point_peer_at(layout.lab, "hospital", front.port)
    outboxes = [layout.lab.outbox_dir / "hospital", layout.lab.root / "outbox-lab-b" / "hospital"]

    def all_delivered() -> bool:
        records = outbound(lab_spool)
        return len(records) >= MESSAGES and all(r.state is OutboundState.DELIVERED for r in records)

    run = drop_while_killing(
        processes,
        configs,
        outboxes,
        layout.hospital.inbox_dir,
        all_delivered,
        messages=MESSAGES,
        timeout=DELIVERED_WITHIN,
    )
    seed, sent = run.seed, run.sent
    assert inbox(layout) == sent, f"seed {seed}: inbox differs"

    records = outbound(lab_spool)
    assert len(records) == MESSAGES, f"seed {seed}: a file became two messages"
    assert {r.disposition for r in records} == {"processed"}
    # No copy of a document left (each node's are in its folder of the shared one).
    copies = layout.lab.root / "shared-bodies" / "payloads"
    assert sorted(p.name for p in copies.iterdir()) == ["lab-a", "lab-b"]
    assert [p for p in copies.rglob("*") if p.is_file()] == []
    assert all(list(outbox.iterdir()) == [] for outbox in outboxes)
    assert list(layout.root.rglob("*.partial")) == []
    assert run.kills >= 5
    # Each hospital node's trail records a delivery at most once; together, every
    # document is recorded delivered (a node settling another's interrupted delivery
    # records it in its own trail, with the reason).
    hospital = trails(layout.hospital.root / "audit")
    for node in ("hospital-a", "hospital-b"):
        mine = Counter(
            r["message_id"]
            for r in hospital
            if r["event"] == "message.delivered" and r["node"] == node
        )
        assert set(mine.values()) <= {1}, f"seed {seed}: {node}"
    delivered = {r["message_id"] for r in hospital if r["event"] == "message.delivered"}
    assert delivered == {r.message_id for r in records}, f"seed {seed}"
    print(f"{MESSAGES} messages, {run.kills} SIGKILLs of four nodes, all delivered exactly once")
