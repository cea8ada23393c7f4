"""A TLS handshake storm is one security alert, not one per handshake (EMG-4): real TLS
clients failing their handshakes against a real daemon, the alert checked in the trail
and at a real rsyslog collector; the counting itself on a stepped clock, memory bounded."""

from __future__ import annotations

import socket
import ssl
from typing import Any

import pytest

from gateway.channel.storms import EVERYWHERE, HandshakeStorms
from gateway.demo_run import read_audit, wait_until
from gateway.pki.demo import DemoLayout
from tests.clocks import SecondsClock
from tests.helpers.audit import wait_for_event
from tests.helpers.audit_export import export_to
from tests.rsyslog import Collector, Received


def test_many_sources_make_one_storm_and_it_ends_after_a_quiet_window() -> None:
    clock = SecondsClock()
    storms = HandshakeStorms(clock, per_source=5, total=20, window_seconds=60, max_sources=8)
    began = []
    for n in range(200):  # one failure from each of 200 addresses, within the minute
        began += storms.failed(f"192.0.2.{n}")
        clock.seconds += 0.1
    assert [(b.storm.source, b.ended) for b in began] == [(EVERYWHERE, False)]
    assert began[0].failures == 20
    assert storms.in_storm("198.51.100.1")  # every failure is part of it meanwhile
    assert len(storms._counts) == 8  # bounded: the rest count in the total only
    clock.seconds += 60
    assert storms.tick() == []  # the window with 200 failures just ended: still a storm
    clock.seconds += 60
    [ended] = storms.tick()  # a whole window without one
    assert ended.ended and ended.failures == 200 and ended.seconds == pytest.approx(138.1)
    assert not storms.in_storm("192.0.2.1")


def test_one_address_makes_its_own_storm_once() -> None:
    clock = SecondsClock()
    storms = HandshakeStorms(clock, per_source=5, total=1000, window_seconds=60)
    notices = [n for _ in range(50) for n in storms.failed("203.0.113.9")]
    assert [(n.storm.source, n.ended) for n in notices] == [("203.0.113.9", False)]
    assert storms.in_storm("203.0.113.9") and not storms.in_storm("203.0.113.10")
    [ended] = storms.tick(everything=True)  # at shutdown
    assert ended.failures == 50


def fail_handshake(layout: DemoLayout) -> None:
    """A real TLS client without a client certificate: the daemon refuses the handshake."""
    context = ssl.create_default_context(cafile=str(layout.ca_certificate))
    context.check_hostname = False
    with (
        socket.create_connection(("127.0.0.1", layout.hospital.port), timeout=10) as raw,
        pytest.raises((ssl.SSLError, ConnectionError, OSError)),
        context.wrap_socket(raw, server_hostname="localhost") as tls,
    ):
        tls.sendall(b"POST /as2 HTTP/1.1\r\nHost: x\r\n\r\n")
        tls.recv(1)


def test_a_storm_of_failed_handshakes_is_one_alert_at_the_collector(
    layout: DemoLayout, processes: Any, collector: Collector
) -> None:
    export_to(layout, collector)
    collector.start()
    hospital = processes.start(layout.hospital.config_path)
    trail = layout.hospital.audit_log
    for _ in range(45):
        fail_handshake(layout)
    storm = wait_for_event(trail, "tls.handshake_storm")
    assert storm["severity"] == "alert" and storm["remote_address"] == "127.0.0.1"
    assert storm["detail"]["failures"] == 20 and storm["call"]

    def exported() -> list[Received]:
        return [r for r in collector.received() if r.event == "tls.handshake_storm"]

    [item] = wait_until(exported, 30, "the storm's alert at the collector")
    assert item.severity == 1  # syslog Alert
    assert hospital.stop() == 0
    records = read_audit(trail)
    storms = [r for r in records if r["event"] == "tls.handshake_storm"]
    assert len(storms) == 1  # one alert for the storm
    failed = [r for r in records if r["event"] == "tls.handshake_failed"]
    alerts = [r for r in failed if r["severity"] == "alert"]
    assert len(alerts) == 10  # the first ones, recorded before it was a storm
    assert all(r["seq"] < storms[0]["seq"] for r in alerts)
    assert {r["severity"] for r in failed if r["seq"] > storms[0]["seq"]} == {"warning"}
    [ended] = [r for r in records if r["event"] == "tls.handshake_storm_ended"]
    assert ended["severity"] == "warning" and ended["detail"]["failures"] == 45
    # What an administrator is called about: every alert of the run.
    called = [r["event"] for r in records if r["severity"] == "alert"]
    assert called == ["tls.handshake_failed"] * 10 + ["tls.handshake_storm"]
