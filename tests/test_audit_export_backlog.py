"""The audit export's bound and its chain check, with a real audit log, a real exporter
and, where something must arrive, a real rsyslogd (tests/rsyslog.py)."""

from __future__ import annotations

import asyncio
import io
import json
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from cryptography.hazmat.primitives import serialization

from gateway.audit import AuditEvent, AuditLog, EventType, Severity
from gateway.audit.export.exporter import AuditExporter, Target
from gateway.audit.export.record import Source
from gateway.audit.export.settings import ExportSettings
from gateway.clock import SystemClock
from gateway.demo_run import read_audit
from gateway.egress import Network, NetworkMap
from gateway.logs import make_logger
from gateway.pki.keypair import KeyPair
from tests.helpers.audit import events
from tests.rsyslog import Collector, Received

T = TypeVar("T")


def target(collector: Collector, bound: int) -> Target:
    key = serialization.load_pem_private_key(collector.client_key.read_bytes(), None)
    identity = KeyPair(
        collector.client_cert,
        collector.client_key,
        collector.client.certificate,
        key,  # type: ignore[arg-type]
    )
    settings = ExportSettings(
        host="127.0.0.1",
        port=collector.port,
        server_name="127.0.0.1",
        message_format="atna",
        ca=collector.ca_path,
        ca_certificates=(collector.ca.certificate,),
        identity=identity,
        min_version="1.3",
        hostname="test",
        max_backlog_bytes=bound,
    )
    return Target(settings, identity, Source("TEST-NODE", "Test Hospital"))


def exporter(tmp_path: Path, log: AuditLog, found: Target) -> AuditExporter:
    return AuditExporter(
        lambda: found,
        log_path=tmp_path / "audit.jsonl",
        state_dir=tmp_path,
        audit=log,
        route=Network.fixed(NetworkMap()).internal(),
        log=make_logger(stream=io.StringIO()),
        clock=SystemClock(),
    )


def emit(log: AuditLog, count: int) -> None:
    for number in range(count):
        log.emit(AuditEvent(EventType.CONFIG_RELOADED, reason=f"record {number} " + "x" * 200))


async def until(predicate: Callable[[], T], what: str, timeout: float = 60) -> T:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while loop.time() < deadline:
        found = await asyncio.to_thread(predicate)
        if found:
            return found
        await asyncio.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def test_at_the_bound_the_oldest_are_skipped_audited_and_the_rest_sent_in_order(
    tmp_path: Path, collector: Collector
) -> None:
    path = tmp_path / "audit.jsonl"
    log = AuditLog(path, SystemClock(), node="TEST-NODE")
    emit(log, 3)  # before export was turned on: never sent
    bound = 20_000
    sender = exporter(tmp_path, log, target(collector, bound))
    emit(log, 120)  # about 30 kB wait: more than the bound, collector down

    async def scenario() -> list[Received]:
        task = asyncio.create_task(sender.run())
        skipped = (await until(lambda: events(path, "audit.export_skipped"), "the skip"))[0]
        assert skipped["severity"] == "alert"
        assert skipped["detail"]["first_seq"] == 4
        last = skipped["detail"]["last_seq"]
        assert 4 < last < 123
        # What is left to send is at most half the bound.
        kept = [r for r in read_audit(path) if last < r["seq"] <= 123]
        size = sum(len(json.dumps(r)) + 1 for r in kept)
        assert size <= bound // 2 + 400
        await asyncio.to_thread(collector.start)
        end = read_audit(path)[-1]["seq"]
        received = await until(
            lambda: [r for r in collector.received() if r.seq >= end] and collector.received(),
            "the rest at the collector",
        )
        await sender.finish(task, 5)
        return received

    received = asyncio.run(scenario())
    log.close()
    seqs = [r.seq for r in received]
    skipped = events(path, "audit.export_skipped")[0]
    assert seqs[0] == skipped["detail"]["last_seq"] + 1
    assert seqs == sorted(set(seqs))  # in order, no gap, nothing from the skipped range
    assert seqs == list(range(seqs[0], seqs[-1] + 1))
    assert "audit.export_skipped" in {r.event for r in received}


def test_a_record_edited_in_the_log_is_reported_as_an_alert_and_exported(
    tmp_path: Path, collector: Collector
) -> None:
    path = tmp_path / "audit.jsonl"
    log = AuditLog(path, SystemClock(), node="TEST-NODE")
    sender = exporter(tmp_path, log, target(collector, 1 << 20))
    emit(log, 5)
    lines = path.read_bytes().split(b"\n")
    assert b"record 2 " in lines[2]
    lines[2] = lines[2].replace(b"record 2 ", b"record 9 ")  # same length, chain now broken
    path.write_bytes(b"\n".join(lines))
    collector.start()

    async def scenario() -> list[Received]:
        task = asyncio.create_task(sender.run())
        received = await until(
            lambda: [r for r in collector.received() if r.event == "audit.verification_failed"],
            "the verification alert at the collector",
        )
        await sender.finish(task, 5)
        return received

    alerts = asyncio.run(scenario())
    log.close()
    assert alerts[0].severity == 1
    recorded = events(path, "audit.verification_failed")
    assert len(recorded) == 1 and recorded[0]["detail"]["seq"] == 3
    assert "record 3 was altered" in recorded[0]["reason"]
    assert recorded[0]["severity"] == Severity.ALERT
