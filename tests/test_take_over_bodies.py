"""A large document taken over while the node that took it in still prepares it.

Node a took a document in (its copy in the shared ``<bodies_dir>/payloads/a/``) and
began to sign and encrypt it; it could not renew its claim for a lease (the spool
out of its reach), so node b took the document over and prepared it.  Node a's
preparation, still running, must not touch what b wrote: b's body (the one the row
names) stays as b wrote it, and nothing of a's write is left in the shared folder.

Two spool handles on one database act as the two nodes (each test runs on SQLite
and on PostgreSQL); the order of the two preparations is fixed by pausing each as
it opens the document, so the test does not depend on timing.
"""

from __future__ import annotations

import asyncio
import contextvars
import hashlib
import io
import random
import threading
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import BinaryIO

import pytest

from gateway.atrest import Vault
from gateway.audit import AuditLog
from gateway.config import Peer, load_config
from gateway.logs import make_logger
from gateway.outbound import INLINE_BODY_BYTES, Outbound, Settings
from gateway.outbound import seal as seal_module
from gateway.outbound.context import Context
from gateway.outbound.seal import Sealer
from gateway.pki.demo import DemoLayout
from gateway.pki.peers import assess_peers
from gateway.spool import Claimant, OutboundRecord, OutboundState, Spool
from tests.clocks import SetClock
from tests.conftest import MakeSpool

LEASE = 60.0
WAIT = 120.0  # generous: the machine may be busy


# Which node's preparation opens the document (set in each node's thread; the worker
# threads the outbound side hands work to inherit it).
NODE: contextvars.ContextVar[str] = contextvars.ContextVar("node", default="")


@dataclass
class Pause:
    """Pause node ``node`` when it opens its document for the ``nth`` time (that opening
    done), until released."""

    node: str
    nth: int
    reached: threading.Event = field(default_factory=threading.Event)
    go: threading.Event = field(default_factory=threading.Event)


def _pausing(
    real: Callable[[Vault | None, OutboundRecord], BinaryIO], pauses: list[Pause]
) -> Callable[[Vault | None, OutboundRecord], BinaryIO]:
    opened: dict[str, int] = {}

    def open_document(vault: Vault | None, record: OutboundRecord) -> BinaryIO:
        handle = real(vault, record)
        node = NODE.get()
        opened[node] = opened.get(node, 0) + 1
        for pause in pauses:
            if (pause.node, pause.nth) == (node, opened[node]):
                pause.reached.set()
                assert pause.go.wait(WAIT)
        return handle

    return open_document


@dataclass(frozen=True)
class TakenIn:
    """A large document node ``a`` took in (its copy in the shared folder ``bodies``),
    with node ``b`` beside it on the same spool."""

    clock: SetClock
    a: Spool
    b: Spool
    settings: Settings  # the lab's, its payloads in ``bodies``, the trust judged now
    peer: Peer
    bodies: Path
    copy: Path


def _taken_in_by_a(layout: DemoLayout, make_spool: MakeSpool, data: bytes) -> TakenIn:
    """Node a's intake of the lab's document ``image.dcm`` (``data``, larger than a row
    keeps): its copy written under ``<bodies_dir>/payloads/a/`` and its row made."""
    clock = SetClock(datetime.now(UTC))  # the demo's certificates are valid from now on
    a, b = make_spool(clock, Claimant("a", LEASE)), make_spool(clock, Claimant("b", LEASE))
    config = load_config(layout.lab.config_path)
    bodies = layout.lab.root / "shared-outgoing"
    config = replace(config, cluster=replace(config.cluster, bodies_dir=bodies))
    [peer] = config.peers
    copy = bodies / "payloads" / "a" / "image.dcm.0123456789ab"
    copy.parent.mkdir(parents=True)
    copy.write_bytes(data)
    a.add_intake(
        "<large@KITA-LAB>", peer.name, "image.dcm", "application/dicom",
        layout.lab.outbox_dir / "hospital" / "image.dcm", copy, zone=peer.zone,
    )  # fmt: skip
    trust = asyncio.run(assess_peers(config.peers, config.zones, at=clock.now()))
    return TakenIn(clock, a, b, Settings(config, trust), peer, bodies, copy)


def test_a_stale_preparation_leaves_the_body_of_the_node_that_took_it_over_alone(
    layout: DemoLayout, make_spool: MakeSpool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Node b takes over and prepares a document node a is still preparing.  a is
    slightly behind: it begins writing its body after b began, and finishes after b
    queued the message.  b's body stays as b wrote it (a's preparation is not
    recorded, and its write is removed), and the document arrives as taken in."""
    data = random.Random(19).randbytes(INLINE_BODY_BYTES + 64 * 1024)  # its body is a file
    taken_in = _taken_in_by_a(layout, make_spool, data)
    clock, a, b, settings = taken_in.clock, taken_in.a, taken_in.b, taken_in.settings
    peer, bodies, copy = taken_in.peer, taken_in.bodies, taken_in.copy
    [held] = a.intake_interrupted()  # node a's claim, as its intake makes it
    assert held.node == "a"

    # A preparation opens the document three times: to read the patients it names,
    # to sign it, then to encrypt it as it writes the body.  b's take-over is paused
    # as it first opens it, a as it opens it to write.
    b_signs, a_writes = Pause("b", 1), Pause("a", 3)
    pauses = [b_signs, a_writes]
    monkeypatch.setattr(seal_module, "open_document", _pausing(seal_module.open_document, pauses))
    streams = {"a": io.StringIO(), "b": io.StringIO()}
    audits = {n: AuditLog(layout.lab.root / f"audit-{n}.jsonl", clock, node=n) for n in "ab"}
    sealer_a = Sealer(Context(settings, a, audits["a"], make_logger(stream=streams["a"]), clock))
    outbound_b = Outbound(settings, b, audits["b"], make_logger(stream=streams["b"]), clock)
    errors: list[BaseException] = []

    def as_node(node: str, work: Callable[[], object]) -> threading.Thread:
        def run() -> None:
            NODE.set(node)
            try:
                work()
            except BaseException as exc:  # reported by the test below
                errors.append(exc)

        thread = threading.Thread(target=run, name=f"node-{node}")
        thread.start()
        return thread

    try:
        clock.at += timedelta(seconds=LEASE + 1)  # a could not renew: its claim ran out
        [taken] = b.intake_take_over(8, outbound_b.shared_payloads)
        assert taken.message_id == "<large@KITA-LAB>"
        node_b = as_node("b", lambda: asyncio.run(outbound_b.prepare_taken_over([taken])))
        assert b_signs.reached.wait(WAIT)  # b's take-over removed its partial files
        node_a = as_node("a", lambda: sealer_a.seal_and_queue(held, peer, None))
        assert a_writes.reached.wait(WAIT)  # a has begun writing its body
        b_signs.go.set()
        node_b.join(WAIT)
        assert not node_b.is_alive()
        queued = b.get("<large@KITA-LAB>")
        assert queued is not None and queued.state is OutboundState.QUEUED
        assert queued.body_path is not None
        written_by_b = hashlib.sha256(queued.body_path.read_bytes()).hexdigest()
        a_writes.go.set()
        node_a.join(WAIT)
        assert not node_a.is_alive()
    finally:
        for pause in pauses:
            pause.go.set()
        for audit in audits.values():
            audit.close()
    assert errors == []
    record = b.get("<large@KITA-LAB>")
    assert record is not None and record.state is OutboundState.QUEUED
    assert record.queued_by == "b" and record.body_path == queued.body_path
    assert hashlib.sha256(record.body_path.read_bytes()).hexdigest() == written_by_b
    assert "message.prepared_elsewhere" in streams["a"].getvalue()
    # Nothing of a's write is left in the shared folder: only b's body.
    assert sorted(p.name for p in bodies.iterdir() if p.is_file()) == [record.body_path.name]
    assert not copy.exists()


def test_the_body_a_dead_node_wrote_before_recording_it_goes_when_another_prepares_it(
    layout: DemoLayout, make_spool: MakeSpool
) -> None:
    """Node a wrote a large document's body into the shared folder and died before the
    commit that records it; node b, taking the document over, prepares and queues it,
    and removes a's body, which no row names (no node would ever remove it)."""
    taken_in = _taken_in_by_a(
        layout, make_spool, random.Random(23).randbytes(INLINE_BODY_BYTES + 1024)
    )
    clock, b, bodies = taken_in.clock, taken_in.b, taken_in.bodies
    left = bodies / f"{taken_in.copy.name}.a.as2"  # as node a names the body it writes
    left.write_bytes(b"the body node a wrote before it was killed")
    audit = AuditLog(layout.lab.root / "audit-b.jsonl", clock, node="b")
    outbound_b = Outbound(taken_in.settings, b, audit, make_logger(stream=io.StringIO()), clock)
    try:
        clock.at += timedelta(seconds=LEASE + 1)
        [taken] = b.intake_take_over(8, outbound_b.shared_payloads)
        asyncio.run(outbound_b.prepare_taken_over([taken]))
    finally:
        audit.close()
    record = b.get("<large@KITA-LAB>")
    assert record is not None and record.state is OutboundState.QUEUED
    assert record.body_path is not None and record.body_path.exists()
    assert sorted(p.name for p in bodies.iterdir() if p.is_file()) == [record.body_path.name]
