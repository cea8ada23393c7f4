"""A maintainer's reads over SSH in the patient review (MNT-1/MNT-5): a document shown or
listed in the console is recorded as the control socket records it (message.viewed,
messages.listed), with the person as actor; the patients an ``audit query`` showed are
named on its record.  ``medgw audit query --patient`` and ``audit patients`` find them."""

from __future__ import annotations

import json
from typing import Any

import pytest

from gateway.demo_run import drop_file
from gateway.pki.demo import DemoLayout
from tests.cli import medgw
from tests.helpers.audit import wait_for_events
from tests.helpers.maintenance import Site

DOCUMENT = b"MSH|^~\\&|LIS|LAB\rPID|1||PAT-888^^^MR||SUZUKI^ICHIRO||19700101|M\r"


@pytest.fixture
def site(layout: DemoLayout) -> Site:
    return Site(layout)


def _json_lines(text: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in text.splitlines()]


def test_a_maintainer_s_reads_are_in_the_patient_review(
    layout: DemoLayout, site: Site, processes: Any
) -> None:
    for person, role in (("hanako", "viewer"), ("kenji", "viewer"), ("ada", "admin")):
        site.add(person, role)
    processes.start(layout.hospital.config_path)
    processes.start(site.config)
    for person in ("hanako", "kenji", "ada"):
        site.approve(person)
    drop_file(layout.lab.outbox_for("hospital"), "result.hl7", DOCUMENT)
    message_id = wait_for_events(site.audit, "message.accepted")[0]["message_id"]

    shown = site.ssh("hanako", command=f"queue show '{message_id}'", code=site.code("hanako"))
    assert shown.returncode == 0, shown.stderr
    listed = site.ssh("kenji", command="queue list", code=site.code("kenji"))
    assert listed.returncode == 0, listed.stderr
    queried = site.ssh("ada", command="audit query --patient PAT-888", code=site.code("ada"))
    assert queried.returncode == 0, queried.stderr
    wait_for_events(site.audit, "maintenance.command", count=3)

    viewed = wait_for_events(site.audit, "message.viewed")
    assert len(viewed) == 1
    assert viewed[0]["actor"] == "maintainer:hanako"
    assert viewed[0]["message_id"] == message_id and viewed[0]["peer"] == "hospital"
    assert viewed[0]["detail"]["via"] == "maintenance console"
    lists = wait_for_events(site.audit, "messages.listed")
    assert lists[0]["actor"] == "maintainer:kenji"
    assert lists[0]["detail"]["message_ids"] == [message_id]
    commands = {r["actor"]: r for r in site.events("maintenance.command")}
    assert [p["id"] for p in commands["maintainer:ada"]["patient_ids"]] == ["PAT-888"]

    review = medgw(
        "audit", "query", "--config", site.config, "--format", "json", "--patient", "PAT-888"
    )
    assert review.returncode == 0, review.stderr
    found = _json_lines(review.stdout)
    by = {(r["event"], r.get("actor")) for r in found}
    assert ("message.viewed", "maintainer:hanako") in by, by
    assert ("maintenance.command", "maintainer:ada") in by, by

    patients = medgw("audit", "patients", "--config", site.config, "--format", "json")
    assert patients.returncode == 0, patients.stderr
    (row,) = [r for r in _json_lines(patients.stdout) if r["patient"] == "PAT-888"]
    actors = {a["actor"]: a["accesses"] for a in row["actors"]}
    assert actors.get("maintainer:hanako") == 1, actors
    assert actors.get("maintainer:ada") == 1, actors
