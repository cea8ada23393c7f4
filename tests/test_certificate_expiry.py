"""The running daemon alerts before its own or a peer's certificate expires (EMG-4)."""

from __future__ import annotations

import signal
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from gateway.demo_run import read_audit, wait_until
from gateway.pki.demo import DemoLayout
from gateway.pki.expiry import Held, expiring
from gateway.pki.issue import issue, make_ca, write_pem
from tests.helpers.audit import events, wait_for_events
from tests.helpers.demo import EXPIRING_SOON, demo_ca, new_demo

NOW = datetime(2026, 6, 1, tzinfo=UTC)


def test_each_threshold_is_the_smallest_one_reached() -> None:
    ca = make_ca("CA", now=NOW - timedelta(days=400))

    def cert(days_left: float) -> Held:
        issued = NOW + timedelta(days=days_left) - timedelta(days=100)
        made = issue(ca, f"left-{days_left}", purpose="tls", now=issued, days=100)
        return Held("this gateway", "TLS", made.certificate)

    found = {
        round(e.days_left): e.threshold_days
        for e in expiring([cert(d) for d in (45, 30, 20, 7, 3, 1, 0.5, -2)], NOW)
    }
    assert found == {30: 30, 20: 30, 7: 7, 3: 7, 1: 1, 0: 1, -2: 1}


def test_the_daemon_alerts_for_its_own_and_the_peers_certificates_expiring_soon(
    tmp_path: Path, processes
) -> None:
    layout = new_demo(tmp_path / "demo", issued_ago=EXPIRING_SOON)  # expires in 5 days
    processes.start(layout.hospital.config_path)

    def alerts() -> list[dict[str, Any]] | None:
        found = [
            r
            for r in read_audit(layout.hospital.audit_log)
            if r["event"] == "pki.certificate_expiring"
        ]
        return found if len(found) >= 6 else None

    found = wait_until(alerts, 60, "six certificate expiry alerts")
    assert all(r["severity"] == "alert" and r["detail"]["threshold_days"] == 7 for r in found)
    ours = {r["detail"]["use"] for r in found if "peer" not in r}
    assert ours == {"TLS", "S/MIME signing", "S/MIME decryption"}
    theirs = {r["detail"]["use"] for r in found if r.get("peer") == "lab"}
    assert theirs == {"TLS", "S/MIME signing", "S/MIME encryption"}
    assert all("in 4." in r["reason"] or "in 5.0" in r["reason"] for r in found)


def test_a_ca_certificate_of_our_chain_expiring_soon_is_alerted_once(
    layout: DemoLayout, processes: Any
) -> None:
    """Our TLS and signing certificates issued by an intermediate CA that expires in 5
    days, long before them: every peer refuses them then.  One alert for that CA
    certificate, naming both uses, and none again at a reload."""
    now = datetime.now(UTC)
    issuing = make_ca(
        "Sakura Issuing CA", now=now - timedelta(days=25), days=30, parent=demo_ca(layout)
    )
    certs = layout.hospital.root / "certs"
    for role, purpose in (("tls", "tls"), ("sign", "smime-sign")):
        made = issue(
            issuing,
            "SAKURA-HOSPITAL",
            purpose=purpose,
            now=now - timedelta(days=1),
            dns_names=("localhost",),
            ip_addresses=("127.0.0.1",),
        )
        write_pem(certs / f"{role}.crt", [made.certificate, issuing.certificate])
        write_pem(certs / f"{role}.key", made.key)
    hospital = processes.start(layout.hospital.config_path)
    audit = layout.hospital.audit_log

    def of_the_ca(record: dict[str, Any]) -> bool:
        return bool(record["detail"]["use"] == "CA")

    [alert] = wait_for_events(audit, "pki.certificate_expiring", where=of_the_ca)
    assert alert["severity"] == "alert" and alert["detail"]["threshold_days"] == 7
    assert alert["detail"]["sent_with"] == ["TLS", "S/MIME signing"]
    assert alert["reason"].startswith(
        "this gateway's CA certificate CN=Sakura Issuing CA (in the chain of its TLS and "
        "S/MIME signing certificate) expires at "
    ), alert["reason"]
    assert "after yours in each certificate file" in alert["detail"]["fix"]
    hospital.signal(signal.SIGHUP)
    wait_for_events(audit, "config.reloaded")
    expiring = events(audit, "pki.certificate_expiring")
    assert [r for r in expiring if of_the_ca(r)] == [alert]
