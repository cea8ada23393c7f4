"""A real daemon's metrics and health endpoints, scraped after real messages and read
with Prometheus' own text parser (prometheus_client.parser)."""

from __future__ import annotations

import signal
import socket
import ssl
from datetime import UTC, datetime, timedelta
from typing import Any

from gateway.demo_run import drop_file, free_port
from gateway.pki.demo import DemoLayout
from gateway.pki.issue import issue, make_ca, write_pem
from gateway.pki.tls import certificate_fingerprint
from tests.helpers.audit import wait_for_events
from tests.helpers.audit_export import export_with_files_in
from tests.helpers.demo import tls_under_an_intermediate
from tests.helpers.metrics import DEADLINE, get, scrape, value, wait_scrape, with_metrics


def test_scrape_after_real_messages(layout: DemoLayout, processes: Any) -> None:
    lab_port = with_metrics(layout.lab)
    hospital_port = with_metrics(layout.hospital)
    processes.start(layout.hospital.config_path)
    processes.start(layout.lab.config_path)
    assert get(lab_port, "/health/live") == (200, "live\n")
    assert get(lab_port, "/health/ready") == (200, "ready\n")
    for index in range(3):
        drop_file(layout.lab.outbox_dir / "hospital", f"m{index}.hl7", b"MSH|%d\r" % index)
    wait_for_events(layout.lab.audit_log, "receipt.received", count=3)

    # The spool's counts are read every few seconds (gateway.daemon.spoolview).
    lab = wait_scrape(
        lab_port,
        "three receipts counted, and the three messages delivered in the spool's counts",
        lambda s: (
            value(s, "medgw_end_to_end_latency_seconds_count", peer="hospital") == 3
            and value(s, "medgw_outbound_messages", peer="hospital", state="delivered") == 3
        ),
    )
    assert (
        value(lab, "medgw_messages_total", direction="outbound", event="accepted", peer="hospital")
        == 3
    )
    assert value(lab, "medgw_receipt_latency_seconds_count", peer="hospital") == 3
    receipt = value(lab, "medgw_receipt_latency_seconds_sum", peer="hospital")
    whole = value(lab, "medgw_end_to_end_latency_seconds_sum", peer="hospital")
    assert receipt is not None and whole is not None and 0 < receipt <= whole < 3 * DEADLINE
    assert value(lab, "medgw_ready") == 1
    spool = value(lab, "medgw_spool_bytes")
    assert spool is not None and spool > 0
    # Certificate days to expiry: ours and the peer's, for each use (demo: 825 days).
    days = {
        (dict(k[1])["owner"], dict(k[1])["use"]): v
        for k, v in lab.items()
        if k[0] == "medgw_certificate_expiry_days"
    }
    assert {
        ("self", "tls"),
        ("self", "signing"),
        ("hospital", "tls"),
        ("hospital", "encryption"),
    } <= set(days)
    assert all(800 < d <= 825 for d in days.values()), days
    # The demo zone's CRL file: about a minute old, fresh for 30 days.
    ages = [v for k, v in lab.items() if k[0] == "medgw_crl_age_seconds"]
    left = [v for k, v in lab.items() if k[0] == "medgw_crl_next_update_seconds"]
    assert len(ages) == 1 and 0 <= ages[0] < 3600, ages
    assert len(left) == 1 and 29 * 86400 < left[0] <= 30 * 86400, left

    hospital = wait_scrape(
        hospital_port,
        "three received",
        lambda s: (
            value(s, "medgw_messages_total", direction="inbound", event="received", peer="lab") == 3
        ),
    )
    assert value(hospital, "medgw_ready") == 1

    # A TLS client without a certificate: one failed handshake, by a fixed reason.
    context = ssl.create_default_context(cafile=str(layout.ca_certificate))
    with socket.create_connection(("127.0.0.1", layout.hospital.port), timeout=10) as raw:
        try:
            with context.wrap_socket(raw, server_hostname="localhost") as tls:
                tls.recv(1)
        except (ssl.SSLError, OSError):
            pass
    failed = wait_scrape(
        hospital_port,
        "the failed handshake",
        lambda s: any(k[0] == "medgw_tls_handshake_failures_total" for k in s),
    )
    reasons = {dict(k[1])["reason"] for k in failed if k[0] == "medgw_tls_handshake_failures_total"}
    assert reasons == {"no_certificate"}, reasons


def test_not_ready_while_a_failed_reload_leaves_the_old_configuration(
    layout: DemoLayout, processes: Any
) -> None:
    port = with_metrics(layout.hospital)
    hospital = processes.start(layout.hospital.config_path)
    assert get(port, "/health/ready") == (200, "ready\n")
    good = layout.hospital.config_path.read_text()
    layout.hospital.config_path.write_text(good + "\n[metrics.nonsense]\n")
    hospital.signal(signal.SIGHUP)
    wait_for_events(layout.hospital.audit_log, "config.reload_failed")
    status, text = get(port, "/health/ready")
    assert status == 503 and "reload" in text, text
    assert value(scrape(port), "medgw_ready") == 0
    assert get(port, "/health/live") == (200, "live\n")
    layout.hospital.config_path.write_text(good)
    hospital.signal(signal.SIGHUP)
    wait_for_events(layout.hospital.audit_log, "config.reloaded")
    assert get(port, "/health/ready") == (200, "ready\n")


def test_expiry_days_of_the_ca_certificates_sent_with_ours_and_of_the_export_certificate(
    layout: DemoLayout, processes: Any
) -> None:
    """The metric covers what the expiry alerts cover: our TLS certificate issued by an
    intermediate that expires in 5 days (sent after it in tls.crt), and the audit export's
    client certificate with its own intermediate from the monitoring's CA."""
    now = datetime.now(UTC)
    issuing, tls = tls_under_an_intermediate(
        layout, ca_from=now - timedelta(days=25), ca_days=30, leaf_from=now - timedelta(days=1)
    )
    certs = layout.hospital.root / "certs"
    monitoring = make_ca("Monitoring CA", now=now - timedelta(days=400))
    monitoring_issuing = make_ca(
        "Monitoring Issuing CA", now=now - timedelta(days=10), days=100, parent=monitoring
    )
    client = issue(
        monitoring_issuing, "medgw-hospital", purpose="tls", now=now - timedelta(days=1), days=61
    )
    folder = certs / "audit-export"
    folder.mkdir()
    write_pem(folder / "client.crt", [client.certificate, monitoring_issuing.certificate])
    write_pem(folder / "client.key", client.key)
    write_pem(folder / "ca.crt", monitoring.certificate)
    port = with_metrics(layout.hospital)
    export_with_files_in(layout.hospital.config_path, f"127.0.0.1:{free_port()}", folder)
    processes.start(layout.hospital.config_path)

    found = {
        (dict(k[1])["use"], dict(k[1])["sha256"]): v
        for k, v in scrape(port).items()
        if k[0] == "medgw_certificate_expiry_days" and dict(k[1])["owner"] == "self"
    }

    def days(use: str, issued: Any) -> float:
        return found[(use, certificate_fingerprint(issued.certificate)[:16])]

    assert 823 < days("tls", tls) <= 824, found
    assert 4 < days("ca", issuing) <= 5, found
    assert 59 < days("export", client) <= 60, found
    assert 89 < days("ca", monitoring_issuing) <= 90, found
    # Roots are a peer's (or the collector's) own trust anchors: not ours to renew.
    assert len([use for use, _ in found if use == "ca"]) == 2, found
