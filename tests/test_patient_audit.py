"""Who touched which patient, on two real daemons: the patients a document names are in
the audit records of its intake, reception and hand-over, with the actor; never in a
log line."""

from __future__ import annotations

import os
import pwd
from pathlib import Path
from typing import Any

from gateway.demo_run import drop_file, free_port
from gateway.pki.demo import DemoLayout
from tests.cli import medgw
from tests.helpers.audit import events, wait_for_event, wait_for_events
from tests.helpers.internal_system import InternalSystem, enable_delivery
from tests.helpers.local_api import LIS_TOKEN, RIS_TOKEN, enable_api

SAMPLES = Path(__file__).parent / "samples" / "patients"
# Every patient identifier of the documents sent below; none may reach a log line.
PATIENT_IDS = ("0000123456", "8812345", "06-12345678-01", "DECL-31337")


def by_message(records: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {r["message_id"]: r for r in records}


def test_patients_and_actors_are_audited_on_both_sides_and_never_logged(
    layout: DemoLayout, processes: Any
) -> None:
    api = enable_api(layout)
    port = free_port()
    enable_delivery(layout, port)
    system = InternalSystem(port)
    try:
        hospital = processes.start(layout.hospital.config_path)
        lab = processes.start(layout.lab.config_path)
        drop_file(
            layout.lab.outbox_for("hospital"),
            "referral.xml",
            (SAMPLES / "referral_cda.xml").read_bytes(),
        )
        drop_file(layout.lab.outbox_for("hospital"), "note.txt", b"no patient here\n")
        status, view = api.request(
            "POST",
            "/v1/messages?to=hospital&filename=bundle.json",
            token=LIS_TOKEN,
            body=(SAMPLES / "referral_bundle.json").read_bytes(),
            headers={
                "Content-Type": "application/fhir+json",
                "X-Medgw-Patient": "urn:oid:1.2.392.100495.20.3.51.9|DECL-31337",
            },
        )
        assert status == 202, view
        api_message = view["message_id"]
        wait_for_events(layout.hospital.audit_log, "message.handed_over", count=3, timeout=90)

        assert hospital.stop() == 0 and lab.stop() == 0
    finally:
        system.server.shutdown()

    me = pwd.getpwuid(os.getuid()).pw_name
    accepted = by_message(events(layout.lab.audit_log, "message.accepted"))
    by_file = {r["detail"]["filename"]: r for r in accepted.values()}
    cda = by_file["referral.xml"]
    assert cda["actor"] == f"outbox:{me} (uid {os.getuid()})"
    assert cda["patient_ids"] == [
        {"id": "0000123456", "authority": "1.2.392.200119.6.102.11312345678", "source": "cda"},
        {"id": "8812345", "authority": "1.2.392.100495.20.3.51.11312345678", "source": "cda"},
    ]
    assert "patient_ids" not in by_file["note.txt"]
    fhir = accepted[api_message]
    assert fhir["actor"] == "api:lis"
    assert [(p["id"], p["source"]) for p in fhir["patient_ids"]] == [
        ("DECL-31337", "client"),
        ("0000123456", "fhir"),
        ("06-12345678-01", "fhir"),
    ]
    assert fhir["patient_ids"][0]["authority"] == "urn:oid:1.2.392.100495.20.3.51.9"

    # The receiver reads the same patients from what it decrypted (the declared one is
    # the lab's own statement: it does not travel), and records the peer as the actor.
    received = by_message(events(layout.hospital.audit_log, "message.received"))
    handed = by_message(events(layout.hospital.audit_log, "message.handed_over"))
    for message_id, sent in accepted.items():
        expected = [p for p in sent.get("patient_ids", []) if p["source"] != "client"]
        assert received[message_id]["actor"] == "peer:lab"
        assert received[message_id].get("patient_ids", []) == expected
        assert handed[message_id]["actor"] == "medgw"
        assert handed[message_id].get("patient_ids", []) == expected

    output = "\n".join(hospital.raw + lab.raw)
    assert "message.accepted" in output and "message.handed_over" in output  # they did log
    for patient in PATIENT_IDS:
        assert patient not in output


def test_a_malformed_patient_header_is_refused_naming_the_rule(
    layout: DemoLayout, processes: Any
) -> None:
    api = enable_api(layout)
    processes.start(layout.lab.config_path)
    for header in ("", "A|", "x" * 201, ",".join(str(n) for n in range(33))):
        status, answer = api.request(
            "POST",
            "/v1/messages?to=hospital&filename=r.hl7",
            token=LIS_TOKEN,
            body=b"MSH|^~\\&|A\r",
            headers={"X-Medgw-Patient": header},
        )
        assert status == 400, (header, answer)
        assert answer["error"].startswith("X-Medgw-Patient: ")
        assert "AUTHORITY|ID" in answer["fix"]
    assert events(layout.lab.audit_log, "message.accepted") == []


def test_every_read_of_a_message_is_audited_with_who_read_it(
    layout: DemoLayout, processes: Any
) -> None:
    api = enable_api(layout)
    processes.start(layout.hospital.config_path)
    lab = processes.start(layout.lab.config_path)
    status, view = api.request(
        "POST",
        "/v1/messages?to=hospital&filename=r.hl7",
        token=LIS_TOKEN,
        body=(SAMPLES / "oru_mllp.hl7").read_bytes(),
    )
    assert status == 202, view
    message_id = view["message_id"]
    api.wait_final(message_id, LIS_TOKEN)  # the client's own reads: audited too
    reads_by_lis = len(events(layout.lab.audit_log, "message.viewed"))
    assert reads_by_lis >= 1
    status, _ = api.request("GET", f"/v1/messages/{message_id}", token=RIS_TOKEN)
    assert status == 404  # not its message: nothing read, nothing recorded
    config = layout.lab.config_path
    for command in (("queue", "show", message_id), ("queue", "list", "--peer", "hospital")):
        done = medgw(*command, "--config", config)
        assert done.returncode == 0, done.stderr
    assert lab.stop() == 0
    offline = medgw("queue", "show", message_id, "--config", config)
    assert offline.returncode == 0, offline.stderr

    me = pwd.getpwuid(os.getuid()).pw_name
    operator = f"operator:{me} (uid {os.getuid()})"
    viewed = events(layout.lab.audit_log, "message.viewed")
    assert [(v["actor"], v["detail"]["via"]) for v in viewed] == [
        ("api:lis", "local API")
    ] * reads_by_lis + [(operator, "control socket"), (operator, "spool")]
    assert all(v["message_id"] == message_id and v["peer"] == "hospital" for v in viewed)
    assert viewed[reads_by_lis - 1]["detail"]["receipt"] is True  # the receipt was shown
    [listed] = events(layout.lab.audit_log, "messages.listed")
    assert listed["actor"] == operator
    assert listed["detail"] == {
        "list": "queue",
        "query": {"peer": "hospital"},
        "count": 1,
        "message_ids": [message_id],
    }
    verified = medgw("audit", "verify", "--config", config)
    assert verified.returncode == 0, verified.stderr  # the offline read chained on


def test_an_offline_read_that_cannot_be_audited_shows_nothing(layout: DemoLayout) -> None:
    audit_log = layout.lab.audit_log
    audit_log.parent.mkdir(parents=True, exist_ok=True)
    audit_log.mkdir()  # not a file: the record cannot be written
    done = medgw("queue", "list", "--config", layout.lab.config_path)
    assert done.returncode == 1
    assert "cannot record this read in the audit trail" in done.stderr
    assert "no messages" not in done.stdout and done.stdout == ""


def test_medgw_send_declares_patients_recorded_with_the_documents_own(
    layout: DemoLayout, processes: Any
) -> None:
    processes.start(layout.lab.config_path)
    sent = medgw(
        "send",
        SAMPLES / "batch.hl7",
        "--to",
        "hospital",
        "--patient",
        "urn:oid:1.2.392.9|DECL-1",
        "--patient",
        "DECL-2",
        "--no-wait",
        "--config",
        layout.lab.config_path,
    )
    assert sent.returncode == 0, sent.stderr
    accepted = wait_for_event(layout.lab.audit_log, "message.accepted")
    me = pwd.getpwuid(os.getuid()).pw_name
    assert accepted["actor"].startswith(f"operator:{me} (uid {os.getuid()}")
    assert [(p["id"], p.get("authority"), p["source"]) for p in accepted["patient_ids"]] == [
        ("DECL-1", "urn:oid:1.2.392.9", "client"),
        ("DECL-2", None, "client"),
        ("P-0001", "KITA_HOSP", "hl7v2"),
        ("P-0002", "KITA_HOSP", "hl7v2"),
    ]
