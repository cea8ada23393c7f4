"""The running daemon alerts before its own or a peer's certificate expires (EMG-4)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from gateway.demo_run import read_audit, wait_until
from gateway.pki.expiry import Held, expiring
from gateway.pki.issue import issue, make_ca
from tests.helpers.demo import EXPIRING_SOON, new_demo

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
