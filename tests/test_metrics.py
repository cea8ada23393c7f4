"""The metrics and health endpoints (gateway.metrics) on a real loopback socket, read
with Prometheus' own text parser; the daemon's scrape is in test_metrics_daemon.py."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta

import aiohttp
import pytest
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from gateway.audit import DURABLE, AuditEvent, EventType, Outcome, Pending, Severity
from gateway.config import GatewayConfig, load_config
from gateway.daemon.observe import Observer
from gateway.inbound.outages import StorageOutages
from gateway.logs import make_logger
from gateway.metrics.collector import (
    Certificate,
    Crl,
    GatewayMetrics,
    MetricsSink,
    Snapshot,
    handshake_reason,
)
from gateway.metrics.server import MetricsServer
from gateway.pki.demo import DemoLayout
from tests.clocks import SetClock

START = datetime(2026, 11, 27, 3, 0, tzinfo=UTC)


class Recorder:
    def __init__(self) -> None:
        self.events: list[AuditEvent] = []

    def emit(self, event: AuditEvent) -> None:
        self.events.append(event)

    def emit_all(self, events: Sequence[AuditEvent]) -> None:
        self.events.extend(events)

    def emit_later(self, events: Sequence[AuditEvent]) -> Pending:
        self.emit_all(events)
        return DURABLE


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of a scrape, by name and sorted labels."""
    out = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return out


async def get(port: int, path: str) -> tuple[int, str]:
    async with (
        aiohttp.ClientSession() as session,
        session.get(f"http://127.0.0.1:{port}{path}") as reply,
    ):
        return reply.status, await reply.text()


@pytest.fixture
def clock() -> SetClock:
    return SetClock(START)


async def test_scrape_counts_events_and_reads_the_snapshot(clock: SetClock) -> None:
    reasons: list[str] = ["reload failed: [[zones]] trust_anchors missing"]
    snapshot = Snapshot(
        messages={("lab", "queued"): 2, ("lab", "delivered"): 5, ("gone", "queued"): 1},
        certificates=(
            Certificate("self", "tls", "ab12", START + timedelta(days=30)),
            Certificate("lab", "signing", "cd34", START - timedelta(days=1)),
        ),
        crls=(
            Crl(
                "vpn",
                "CN=Regional CA",
                START - timedelta(hours=2),
                START + timedelta(hours=22),
                True,
            ),
        ),
        export_backlog_bytes=4096,
        spool_bytes=123456,
        not_ready=reasons,
    )
    metrics = GatewayMetrics(clock, lambda: snapshot, lambda: ["lab"])
    sink = MetricsSink(Recorder(), metrics)
    sink.emit(AuditEvent(EventType.MESSAGE_ACCEPTED, peer="lab", message_id="m1"))
    clock.at += timedelta(seconds=2)
    sink.emit(AuditEvent(EventType.MESSAGE_SENT, peer="lab", message_id="m1"))
    sink.emit(AuditEvent(EventType.MESSAGE_SEND_FAILED, Outcome.FAILURE, peer="lab"))
    sink.emit(AuditEvent(EventType.MESSAGE_SEND_FAILED, Outcome.FAILURE, peer="mallory"))
    clock.at += timedelta(seconds=3)
    sink.emit(AuditEvent(EventType.RECEIPT_RECEIVED, peer="lab", message_id="m1"))
    for reason in ("certificate has expired", "peer did not return a certificate"):
        sink.emit(
            AuditEvent(
                EventType.TLS_HANDSHAKE_FAILED,
                Outcome.FAILURE,
                Severity.ALERT,
                reason=reason,
                detail={"listener": "vpn"},
            )
        )
    sink.emit(
        AuditEvent(
            EventType.TLS_HANDSHAKE_FAILED,
            Outcome.FAILURE,
            Severity.ALERT,
            reason="120 more failed TLS handshakes",
            detail={"listener": "vpn", "not_recorded_one_by_one": 120},
        )
    )
    server = MetricsServer(
        metrics, lambda: reasons, audit=lambda: None, clock=clock, log=make_logger()
    )
    await server.start("127.0.0.1", 0)
    assert server.port is not None
    try:
        status, text = await get(server.port, "/metrics")
        assert status == 200
        found = samples(text)
        assert found[("medgw_outbound_messages", (("peer", "lab"), ("state", "queued")))] == 2
        assert found[("medgw_outbound_messages", (("peer", "other"), ("state", "queued")))] == 1
        assert found[("medgw_send_retries_total", (("peer", "lab"),))] == 1
        assert found[("medgw_send_retries_total", (("peer", "other"),))] == 1
        assert not any("mallory" in str(key) for key in found)
        assert found[("medgw_receipt_latency_seconds_sum", (("peer", "lab"),))] == 3
        assert found[("medgw_receipt_latency_seconds_count", (("peer", "lab"),))] == 1
        assert found[("medgw_end_to_end_latency_seconds_sum", (("peer", "lab"),))] == 5
        assert (
            found[("medgw_end_to_end_latency_seconds_bucket", (("le", "5.0"), ("peer", "lab")))]
            == 1
        )
        assert (
            found[("medgw_end_to_end_latency_seconds_bucket", (("le", "2.5"), ("peer", "lab")))]
            == 0
        )
        handshakes = {
            dict(k[1])["reason"]: v
            for k, v in found.items()
            if k[0] == "medgw_tls_handshake_failures_total"
        }
        assert handshakes == {"certificate_expired": 1, "no_certificate": 1, "repeated": 120}
        assert found[
            (
                "medgw_certificate_expiry_days",
                (("owner", "self"), ("sha256", "ab12"), ("use", "tls")),
            )
        ] == pytest.approx(30, abs=0.01)
        assert found[
            (
                "medgw_certificate_expiry_days",
                (("owner", "lab"), ("sha256", "cd34"), ("use", "signing")),
            )
        ] == pytest.approx(-1 - 5 / 86400, abs=0.01)
        crl = (("issuer", "CN=Regional CA"), ("source", "fetched"), ("zone", "vpn"))
        assert found[("medgw_crl_age_seconds", crl)] == 2 * 3600 + 5
        assert found[("medgw_crl_next_update_seconds", crl)] == 22 * 3600 - 5
        assert found[("medgw_audit_export_backlog_bytes", ())] == 4096
        assert found[("medgw_spool_bytes", ())] == 123456
        assert found[("medgw_ready", ())] == 0
        status, text = await get(server.port, "/health/ready")
        assert status == 503 and "trust_anchors missing" in text
        reasons.clear()
        assert await get(server.port, "/health/ready") == (200, "ready\n")
        assert await get(server.port, "/health/live") == (200, "live\n")
        assert (await get(server.port, "/nothing"))[0] == 404
    finally:
        await server.stop()


def test_a_handshake_reason_is_one_of_a_fixed_set() -> None:
    assert handshake_reason("certificate verify failed: certificate has expired") == (
        "certificate_expired"
    )
    assert handshake_reason("tlsv1 alert unknown ca") == "certificate_untrusted"
    assert handshake_reason("[SSL: NO_SHARED_CIPHER] no shared cipher") == "no_shared_cipher"
    assert handshake_reason("unsupported protocol") == "protocol_version"
    assert handshake_reason("\x1b[31m anything a peer could put here") == "other"
    assert handshake_reason(None) == "other"


def test_not_ready_for_a_minute_after_a_document_could_not_be_stored(
    clock: SetClock, tmp_path
) -> None:
    from gateway.daemon.observe import Readiness

    outages = StorageOutages(clock)
    readiness = Readiness(clock, outages)
    assert readiness.reasons(None) == ["starting: listeners, spool and trust are not all up yet"]
    readiness.started = True
    assert readiness.reasons(None) == []
    outages.refused("full", "no space left on device (/srv/inbox)", "free space")
    assert readiness.reasons(None) == [
        "a received document could not be stored within the last minute: no space left "
        "on device (/srv/inbox) (fix: free space)"
    ]
    clock.at += timedelta(seconds=61)
    assert readiness.reasons(None) == []
    readiness.reload_failed = "gateway.toml: metrics.auth: unknown key"
    assert "the last reload failed" in readiness.reasons(None)[0]
    readiness.reload_failed = None
    readiness.stopping = True
    assert readiness.reasons(None) == ["the daemon is stopping"]


def test_the_peer_label_follows_the_configuration_in_force(layout: DemoLayout) -> None:
    """The peers' names are kept per configuration, not read for every event: after a
    reload that removes a peer, its events count as ``other``; one that adds it back
    counts it under its name again."""
    config = load_config(layout.hospital.config_path)
    peer = config.peers[0].name
    in_force: list[GatewayConfig] = [config]
    observer = Observer(
        SetClock(START),
        make_logger(),
        config=lambda: in_force[0],
        spool=lambda: None,
        export_backlog=lambda: None,
    )
    sink = observer.sink(Recorder())

    def received() -> None:
        sink.emit(AuditEvent(EventType.MESSAGE_RECEIVED, peer=peer, message_id="m"))

    received()
    in_force[0] = dataclasses.replace(config, peers=())  # a reload without the peer
    received()
    received()
    in_force[0] = config
    received()
    found = samples(generate_latest(observer.metrics.registry).decode())
    labels = (("direction", "inbound"), ("event", "received"))
    assert found[("medgw_messages_total", (*labels, ("peer", peer)))] == 2
    assert found[("medgw_messages_total", (*labels, ("peer", "other")))] == 2
