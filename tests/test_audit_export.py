"""Export of the audit trail to a real collector: rsyslogd with TLS (tests/rsyslog.py),
two real ``medgw run`` processes exchanging documents, the collector killed and
started again mid-stream; what it received is checked on its side."""

from __future__ import annotations

import json
import socket
import ssl
import xml.etree.ElementTree as ET

import pytest

from gateway.demo_run import drop_file, read_audit, wait_until
from gateway.pki.demo import DemoLayout
from tests.cli import medgw
from tests.helpers.audit_export import export_to, first_seen
from tests.rsyslog import Collector, Received


def delivered(layout: DemoLayout) -> int:
    return sum(r["event"] == "message.delivered" for r in read_audit(layout.hospital.audit_log))


def test_every_record_reaches_the_collector_in_order_across_a_collector_restart(
    layout: DemoLayout, processes, collector: Collector
) -> None:
    export_to(layout, collector)
    collector.start()
    hospital = processes.start(layout.hospital.config_path)
    processes.start(layout.lab.config_path)
    outbox = layout.lab.outbox_for(layout.hospital)

    def send(names: range) -> None:
        for number in names:
            drop_file(outbox, f"doc-{number}.txt", f"document {number}\n".encode())
        wait_until(lambda: delivered(layout) >= names.stop, 120, f"{names.stop} deliveries")

    send(range(0, 5))
    started = next(
        r["seq"] for r in read_audit(layout.hospital.audit_log) if r["event"] == "daemon.started"
    )
    wait_until(
        lambda: {r.seq for r in collector.received()} >= {started},
        30,
        "the collector to receive the daemon's start",
    )
    collector.kill()  # mid-stream, without warning
    send(range(5, 12))  # recorded while the collector is down: they wait
    collector.start()
    wait_until(
        lambda: any(
            r["event"] == "audit.export_resumed" for r in read_audit(layout.hospital.audit_log)
        ),
        60,
        "the export to resume",
    )
    send(range(12, 15))
    hospital.stop()

    records = read_audit(layout.hospital.audit_log)
    expected = [r["seq"] for r in records if r["seq"] >= started]
    assert records[-1]["event"] == "daemon.stopped"

    def complete() -> list[Received] | None:
        got = collector.received()
        return got if set(expected) <= {r.seq for r in got} else None

    received = wait_until(complete, 30, "every record at the collector")
    # Each record arrived, in the log's order; a repeat after the break may happen (the
    # seq tells it), nothing else.
    assert first_seen(received) == expected
    by_seq = {r["seq"]: r for r in records}
    for item in received:
        assert item.hash == by_seq[item.seq]["hash"]
        assert item.event == by_seq[item.seq]["event"]
        assert item.facility == 10 and item.msgid == "IHE+RFC-3881"
    events = [by_seq[seq]["event"] for seq in expected]
    assert "audit.export_interrupted" in events and "audit.export_resumed" in events
    assert "audit.verification_failed" not in events  # every chain link re-checked, intact
    # Each body is a DICOM audit message with the standard EventID of its event.
    for item in received:
        message = ET.fromstring(item.body)
        assert message.tag == "AuditMessage"
        event_id = message.find("EventIdentification/EventID")
        assert event_id is not None
        assert event_id.get("codeSystemName") == "DCM"
        if item.event == "message.delivered":
            assert event_id.get("csd-code") == "110107"  # Import
            source = message.find("AuditSourceIdentification")
            assert source is not None and source.get("AuditSourceID") == by_seq[item.seq]["node"]


def test_a_security_alert_reaches_the_collector_at_once_with_severity_alert(
    layout: DemoLayout, processes, collector: Collector
) -> None:
    export_to(layout, collector, message_format="fhir")
    collector.start()
    processes.start(layout.hospital.config_path)
    # A client the hospital does not know: the handshake is refused, an alert recorded.
    context = ssl.create_default_context(cafile=str(layout.ca_certificate))
    context.check_hostname = False
    context.load_cert_chain(collector.client_cert, collector.client_key)
    with (
        socket.create_connection(("127.0.0.1", layout.hospital.port), timeout=10) as raw,
        pytest.raises((ssl.SSLError, ConnectionError, OSError)),
        context.wrap_socket(raw, server_hostname="localhost") as tls,
    ):
        tls.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        tls.recv(1)

    def alert() -> Received | None:
        found = [r for r in collector.received() if r.event == "tls.handshake_failed"]
        return found[0] if found else None

    item = wait_until(alert, 30, "the handshake alert at the collector")
    assert item.severity == 1  # syslog Alert
    assert item.msgid == "IHE+FHIR"
    event = json.loads(item.body)
    assert event["resourceType"] == "AuditEvent"
    assert event["type"]["code"] == "110113"  # Security Alert
    assert event["outcome"] == "8"
    assert event["agent"][0]["network"]["address"] == "127.0.0.1"


def test_check_config_shows_the_export_and_refuses_an_unknown_key(
    layout: DemoLayout, collector: Collector
) -> None:
    export_to(layout, collector)
    shown = medgw("check-config", "--config", layout.hospital.config_path)
    assert shown.returncode == 0, shown.stderr
    assert f"audit export     syslog over TLS (RFC 5425) to 127.0.0.1:{collector.port}" in (
        shown.stdout
    )
    with layout.hospital.config_path.open("a") as handle:
        handle.write('formt = "fhir"\n')
    refused = medgw("check-config", "--config", layout.hospital.config_path)
    assert refused.returncode != 0
    assert "audit.export.formt" in refused.stderr and "unknown key" in refused.stderr
