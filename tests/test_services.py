"""Services (routing keys agreed with a peer) and the hand-over to an internal system,
on real daemons, real sockets and a real little HTTP server."""

from __future__ import annotations

import hashlib
import json
import signal
import sqlite3
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from gateway.clock import SystemClock
from gateway.config import load_config
from gateway.delivery.http import idempotency_key
from gateway.demo_run import drop_file, wait_until
from gateway.errors import ConfigError
from gateway.pki.demo import DemoLayout
from gateway.spool import SqliteSpool
from tests.cli import medgw
from tests.helpers.atrest import kept_receipt
from tests.helpers.audit import events, wait_for_event, wait_for_events
from tests.helpers.internal_system import (
    InternalSystem,
    enable_delivery,
    set_services,
)
from tests.helpers.local_api import LIS_TOKEN, enable_api


def test_services_from_outbox_api_and_send_arrive_in_service_folders(
    layout: DemoLayout, processes: Any, tmp_path: Path
) -> None:
    services = '["lab-results", "referrals"]'
    set_services(layout, hospital_accepts=services, lab_sends=services)
    api = enable_api(layout)
    processes.start(layout.hospital.config_path)
    lab = processes.start(layout.lab.config_path)
    outbox = layout.lab.outbox_for("hospital")
    assert (outbox / "lab-results").is_dir() and (outbox / "referrals").is_dir()

    drop_file(outbox / "lab-results", "r1.hl7", b"MSH|result\r")
    drop_file(outbox / "billing", "b1.hl7", b"MSH|billing\r")  # no such service
    drop_file(outbox, "plain.hl7", b"MSH|plain\r")
    inbox = layout.hospital.inbox_dir / "lab"
    wait_until(lambda: (inbox / "lab-results" / "r1.hl7").exists(), 60, "r1 in lab-results")
    wait_until(lambda: (inbox / "plain.hl7").exists(), 60, "plain.hl7 in inbox/lab/")
    assert (inbox / "lab-results" / "r1.hl7").read_bytes() == b"MSH|result\r"

    status, view = api.request(
        "POST",
        "/v1/messages?to=hospital&service=referrals&filename=ref.json",
        token=LIS_TOKEN,
        body=b'{"resourceType":"ServiceRequest"}',
        headers={"Content-Type": "application/fhir+json"},
    )
    assert status == 202 and view["service"] == "referrals", view
    final = api.wait_final(view["message_id"], LIS_TOKEN)
    assert final["state"] == "delivered" and final["service"] == "referrals"
    assert (inbox / "referrals" / "ref.json").read_bytes() == b'{"resourceType":"ServiceRequest"}'

    status, answer = api.request(
        "POST", "/v1/messages?to=hospital&service=billing", token=LIS_TOKEN, body=b"MSH|x\r"
    )
    assert status == 400 and "has no service 'billing'" in answer["error"]
    assert "lab-results, referrals" in answer["error"]

    document = tmp_path / "by-hand.pdf"
    document.write_bytes(b"%PDF-1.7 by hand")
    config = str(layout.lab.config_path)
    sent = medgw(
        "send", str(document), "--to", "hospital", "--service", "referrals", "--config", config
    )
    assert sent.returncode == 0, sent.stderr
    assert "service      referrals" in sent.stdout
    assert (inbox / "referrals" / "by-hand.pdf").read_bytes() == b"%PDF-1.7 by hand"
    wrong = medgw(
        "send", str(document), "--to", "hospital", "--service", "billing", "--config", config
    )
    assert wrong.returncode == 2 and "lab-results, referrals" in wrong.stderr

    # The unknown service folder: warned about once, its file never sent.
    lab.wait_for(lambda line: line.get("event") == "outbox.unknown_service_folder", 30)
    warnings = [line for line in lab.lines if line.get("event") == "outbox.unknown_service_folder"]
    assert len(warnings) == 1 and warnings[0]["folder"] == "billing"
    assert (outbox / "billing" / "b1.hl7").exists()
    assert not list(layout.hospital.inbox_dir.rglob("b1.hl7"))

    # Audit on both sides names the service; the spool records it.
    delivered = {
        Path(e["detail"]["inbox_file"]).name: e.get("service")
        for e in wait_for_events(layout.hospital.audit_log, "message.delivered", count=4)
    }
    assert delivered == {
        "r1.hl7": "lab-results",
        "plain.hl7": None,
        "ref.json": "referrals",
        "by-hand.pdf": "referrals",
    }
    received = wait_for_events(layout.hospital.audit_log, "message.received", count=4)
    assert sorted(str(e.get("service")) for e in received) == [
        "None",
        "lab-results",
        "referrals",
        "referrals",
    ]
    accepted = {
        e["detail"]["filename"]: e.get("service")
        for e in wait_for_events(layout.lab.audit_log, "message.accepted", count=4)
    }
    assert accepted["r1.hl7"] == "lab-results" and accepted["plain.hl7"] is None
    listed = medgw("queue", "list", "--config", config, "--json")
    by_name = {m["filename"]: m["service"] for m in json.loads(listed.stdout)}
    assert by_name == {
        "r1.hl7": "lab-results",
        "plain.hl7": None,
        "ref.json": "referrals",
        "by-hand.pdf": "referrals",
    }


def test_a_service_not_configured_for_the_peer_is_refused_with_a_signed_receipt(
    layout: DemoLayout, processes: Any
) -> None:
    set_services(
        layout, hospital_accepts='["lab-results"]', lab_sends='["lab-results", "referrals"]'
    )
    processes.start(layout.hospital.config_path)
    processes.start(layout.lab.config_path)
    drop_file(layout.lab.outbox_for("hospital") / "referrals", "ref.hl7", b"MSH|ref\r")

    failure = wait_for_event(layout.lab.audit_log, "message.failed")
    assert failure["service"] == "referrals"
    assert failure["detail"]["disposition"] == "processed/error: unexpected-processing-error"
    [rejected] = wait_for_events(layout.hospital.audit_log, "message.rejected")

    assert rejected["severity"] == "alert"
    assert "service 'referrals', which is not configured for peer 'lab'" in rejected["reason"]
    assert "its services: lab-results" in rejected["reason"]
    # The peer learns only the standard disposition, not our configuration.
    receipt = kept_receipt(layout.lab.config_path, failure["message_id"])
    assert b"unexpected-processing-error" in receipt and b"lab-results" not in receipt
    assert not list(layout.hospital.inbox_dir.rglob("ref.hl7"))


def test_an_old_spool_without_services_keeps_working(tmp_path: Path) -> None:
    path = tmp_path / "spool.sqlite3"
    SqliteSpool(path, SystemClock()).close()
    with sqlite3.connect(path) as db:  # what a spool from before services looks like
        for table in ("outbound", "inbound", "handover"):  # (nor had it triggers)
            db.execute(f"DROP TRIGGER {table}_displaced_owed")
        db.execute("ALTER TABLE outbound DROP COLUMN service")
        db.execute("ALTER TABLE inbound DROP COLUMN service")
        db.execute("DROP TABLE handover")
        db.execute(
            "INSERT INTO outbound (message_id, peer, filename, content_type, source_path,"
            " payload_path, state, created_at, updated_at) VALUES"
            " ('<old@x>', 'lab', 'a.hl7', 'application/hl7-v2', '/s', '/p', 'queued', 't', 't')"
        )
        db.execute(
            "INSERT INTO inbound (peer, message_id, sha256, target_path, state, received_at,"
            " updated_at) VALUES ('lab', '<in@x>', 'ab', '/inbox/lab/a', 'delivered', 't', 't')"
        )
    spool = SqliteSpool(path, SystemClock())
    try:
        old = spool.get("<old@x>")
        assert old is not None and old.service is None and old.state.value == "queued"
        inbound = spool.inbound_get("lab", "<in@x>")
        assert inbound is not None and inbound.service is None
        spool.add_intake("<new@x>", "lab", "b.hl7", "t/t", Path("/s"), Path("/q"), service="x")
        new = spool.get("<new@x>")
        assert new is not None and new.service == "x"
        assert spool.handover_next_at() is None
    finally:
        spool.close()


def _config_problems(layout: DemoLayout, gateway_extra: str, services: str = "[]") -> str:
    path = layout.hospital.root / "peers.d" / "lab.toml"
    path.write_text(path.read_text().replace("\nservices = []\n", f"\nservices = {services}\n"))
    config = layout.hospital.config_path
    config.write_text(config.read_text() + gateway_extra)
    with pytest.raises(ConfigError) as info:
        load_config(config)
    return "\n".join(str(p) for p in info.value.problems)


def test_config_refuses_unsafe_delivery_urls_and_unknown_services(layout: DemoLayout) -> None:
    problems = _config_problems(
        layout,
        """
[delivery]
http_url = "http://10.1.2.3:9000/inbound"
ca = ""
[[delivery.services]]
name = "billing"
http_url = "https://ehr.internal/referrals"
""",
        services='["lab-results", "../up", "lab-results"]',
    )
    assert "'../up' is not a service name" in problems
    assert "a service is listed twice" in problems
    assert "plaintext http:// is allowed only to a loopback IP address" in problems
    assert "no peer has a service named 'billing'" in problems
    assert "an https:// hand-over URL needs the CA" in problems


def test_config_accepts_loopback_and_per_service_delivery(layout: DemoLayout) -> None:
    path = layout.hospital.root / "peers.d" / "lab.toml"
    path.write_text(path.read_text().replace("\nservices = []\n", '\nservices = ["referrals"]\n'))
    config_path = layout.hospital.config_path
    config_path.write_text(
        config_path.read_text()
        + """
[delivery]
http_url = "http://127.0.0.1:9000/inbound"
[[delivery.services]]
name = "referrals"
http_url = ""
"""
    )
    config = load_config(config_path)
    assert config.delivery is not None
    assert config.delivery.url_for(None) == "http://127.0.0.1:9000/inbound"
    assert config.delivery.url_for("lab-results") == "http://127.0.0.1:9000/inbound"
    assert config.delivery.url_for("referrals") == ""
    assert config.require_peer("lab").services == ("referrals",)


# --- hand-over to an internal system over HTTP -------------------------------------------


def test_received_documents_are_handed_over_with_retries_after_the_receipt(
    layout: DemoLayout, processes: Any, internal_port: int
) -> None:
    services = '["lab-results", "referrals"]'
    set_services(layout, hospital_accepts=services, lab_sends=services)
    enable_delivery(layout, internal_port, referrals=True)
    system = InternalSystem(internal_port, fail=2)
    try:
        processes.start(layout.hospital.config_path)
        processes.start(layout.lab.config_path)
        result = b"MSH|^~\\&|LIS\rOBX|1|NM|sodium||140\r" * 1000
        drop_file(layout.lab.outbox_for("hospital") / "lab-results", "r1.hl7", result)
        drop_file(layout.lab.outbox_for("hospital") / "referrals", "ref.pdf", b"%PDF ref")
        wait_until(lambda: len(system.ok()) == 2, 60, "two successful hand-overs")
        by_path = {r[0]: r for r in system.ok()}
        _, headers, body, _ = by_path["/inbound"]
        assert body == result
        assert headers["Content-Type"] == "application/hl7-v2"
        assert headers["X-Medgw-Peer"] == "lab" and headers["X-Medgw-Service"] == "lab-results"
        assert headers["X-Medgw-Filename"] == "r1.hl7"
        assert headers["X-Medgw-Sha256"] == hashlib.sha256(result).hexdigest()
        assert headers["Idempotency-Key"] == idempotency_key("lab", headers["X-Medgw-Message-Id"])
        _, ref_headers, ref_body, _ = by_path["/referrals"]
        assert ref_body == b"%PDF ref" and ref_headers["X-Medgw-Service"] == "referrals"

        audit = layout.hospital.audit_log
        # The internal system answers before the gateway records the failure.
        failures = wait_for_events(audit, "message.handover_failed", count=2)
        assert len(failures) == 2 and {f["severity"] for f in failures} == {"alert"}
        assert all("HTTP 503" in f["reason"] for f in failures)
        handed = wait_for_events(audit, "message.handed_over", count=2)
        assert len(handed) == 2
        ids = {e["message_id"]: e for e in handed}
        keys = {h["Idempotency-Key"] for _, h, _, _ in system.ok()}
        assert {idempotency_key("lab", i) for i in ids} == keys
        assert {e["service"] for e in handed} == {"lab-results", "referrals"}
        # The receipt did not wait for the internal system: both messages were delivered
        # (receipt verified at the lab) whatever the hand-over's fate.
        receipts = wait_for_events(layout.lab.audit_log, "receipt.received", count=2)
        assert len(receipts) == 2 and all(r["detail"]["mic_verified"] for r in receipts)
        assert (layout.hospital.inbox_dir / "lab" / "lab-results" / "r1.hl7").read_bytes() == result
    finally:
        system.close()


def test_a_pending_hand_over_survives_a_crash_and_resumes_once(
    layout: DemoLayout, processes: Any, internal_port: int
) -> None:
    enable_delivery(layout, internal_port)  # nothing listens there yet
    hospital = processes.start(layout.hospital.config_path)
    processes.start(layout.lab.config_path)
    drop_file(layout.lab.outbox_for("hospital"), "doc.hl7", b"MSH|doc\r")
    wait_for_events(layout.hospital.audit_log, "message.handover_failed")
    [receipt] = wait_for_events(layout.lab.audit_log, "receipt.received")
    assert receipt["detail"]["mic_verified"] is True
    assert hospital.kill() == -signal.SIGKILL  # the pending hand-over is only in the spool
    system = InternalSystem(internal_port)
    try:
        processes.start(layout.hospital.config_path)
        wait_until(lambda: system.ok(), 30, "the hand-over after the restart")
        wait_for_events(layout.hospital.audit_log, "message.handed_over")
        [(path, headers, body, _)] = system.ok()
        assert path == "/inbound" and body == b"MSH|doc\r" and "X-Medgw-Service" not in headers
        assert headers["Idempotency-Key"] == idempotency_key("lab", receipt["message_id"])
        failures = events(layout.hospital.audit_log, "message.handover_failed")
        assert failures and "ClientConnector" in failures[0]["reason"]
        [handed] = events(layout.hospital.audit_log, "message.handed_over")
        # Every attempt the spool counted before the hand-over is audited; the kill may
        # fall between an attempt's audit record and its count, so that the hand-over
        # after the restart carries the number of that audited attempt again.
        attempt = handed["detail"]["attempt"]
        audited = {f["detail"]["attempt"] for f in failures}
        assert set(range(1, attempt)) <= audited <= set(range(1, attempt + 1))
    finally:
        system.close()


def test_a_changed_inbox_file_is_not_handed_over(
    layout: DemoLayout, processes: Any, internal_port: int
) -> None:
    enable_delivery(layout, internal_port)
    hospital = processes.start(layout.hospital.config_path)
    processes.start(layout.lab.config_path)
    drop_file(layout.lab.outbox_for("hospital"), "doc.hl7", b"MSH|doc\r")
    hospital.wait_for(lambda line: line.get("event") == "message.handover_failed", 60)
    (layout.hospital.inbox_dir / "lab" / "doc.hl7").write_bytes(b"MSH|other\r")
    system = InternalSystem(internal_port)
    try:
        [gave_up] = wait_for_events(
            layout.hospital.audit_log,
            "message.handover_failed",
            where=lambda e: e["detail"].get("final"),
        )

        assert "changed after delivery" in gave_up["reason"] and gave_up["severity"] == "alert"
        assert all(r[2] != b"MSH|other\r" or r[3] != 200 for r in system.requests)
        assert not system.ok()
    finally:
        system.close()


def test_handover_state_is_in_the_spool(layout: DemoLayout) -> None:
    """The spool row a hand-over needs is written with the receipt, in one transaction."""
    spool = SqliteSpool(layout.hospital.root / "state" / "s.sqlite3", SystemClock())
    try:
        spool.inbound_begin("lab", "<m@x>", "ab" * 32, Path("/inbox/lab/svc/a.hl7"), "svc")
        spool.inbound_delivered(
            "lab", "<m@x>", [("Content-Type", "x/y")], b"mdn", handover=("application/hl7-v2", 7)
        )
        spool.inbound_delivered(
            "lab", "<m@x>", [("Content-Type", "x/y")], b"mdn", handover=("application/hl7-v2", 7)
        )
        now = datetime.now(UTC).timestamp()
        [due] = spool.handover_due(now)
        assert (due.service, due.path.name, due.size, due.state.value) == (
            "svc",
            "a.hl7",
            7,
            "pending",
        )
        spool.handover_retry("lab", "<m@x>", "HTTP 503", now + 100)
        assert spool.handover_due(now) == [] and spool.handover_next_at() == now + 100
        spool.handover_done("lab", "<m@x>")
        record = spool.handover_get("lab", "<m@x>")
        assert record is not None and record.state.value == "done" and record.attempts == 2
    finally:
        spool.close()
