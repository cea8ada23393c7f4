"""What a maintainer did, at the hospital's collector (rsyslogd with TLS,
tests/rsyslog.py): each ``maintenance.command`` with the command as typed and its exit
status, the documents and patients it showed, and a read as a Query (110112), as the
README's export section says."""

from __future__ import annotations

import base64
import json
import xml.etree.ElementTree as ET
from typing import Any

from gateway.demo_run import drop_file, wait_until
from gateway.pki.demo import DemoLayout
from tests.helpers.audit import wait_for_events
from tests.helpers.audit_export import export_to
from tests.helpers.maintenance import Site
from tests.rsyslog import Collector

DOCUMENT = b"MSH|^~\\&|RIS|HOSP\rPID|1||PAT-888^^^MR||SUZUKI^ICHIRO||19700101|M\r"
PEOPLE = (("taro", "operator"), ("kenji", "viewer"), ("jiro", "operator"), ("ada", "admin"))


def _objects(message: ET.Element, kind: str) -> list[ET.Element]:
    """The ParticipantObjects of ``message`` whose ID type code is ``kind``."""
    found = []
    for element in message.findall("ParticipantObjectIdentification"):
        code = element.find("ParticipantObjectIDTypeCode")
        if code is not None and code.get("csd-code") == kind:
            found.append(element)
    return found


def test_a_maintainer_s_commands_reach_the_collector_with_what_they_did(
    layout: DemoLayout, processes: Any, collector: Collector
) -> None:
    site = Site(layout, layout.hospital)
    for person, role in PEOPLE:
        site.add(person, role)
    export_to(layout, collector)
    collector.start()
    processes.start(layout.hospital.config_path)
    for person, _ in PEOPLE:
        site.approve(person)
    drop_file(layout.hospital.outbox_for("lab"), "order.hl7", DOCUMENT)
    message_id = wait_for_events(site.audit, "message.accepted")[0]["message_id"]

    lines = {
        "taro": f"queue show '{message_id}'",
        "kenji": "queue list",
        "jiro": "peers suspend lab planned work",
        "ada": "audit query --patient PAT-888",
    }
    for person, line in lines.items():
        done = site.ssh(person, command=line, code=site.code(person))
        assert done.returncode == 0, done.stderr

    def exported() -> dict[str, ET.Element] | None:
        found: dict[str, ET.Element] = {}
        for item in collector.received():
            if item.event in ("maintenance.command", "messages.listed"):
                message = ET.fromstring(item.body)
                user = message.find("ActiveParticipant")
                assert user is not None
                found[f"{item.event} {user.get('UserID')}"] = message
        return found if len(found) == 5 else None

    found = wait_until(exported, 60, "the maintainers' commands at the collector")

    def event_id(message: ET.Element) -> str | None:
        element = message.find("EventIdentification/EventID")
        assert element is not None
        return element.get("csd-code")

    def command(message: ET.Element) -> tuple[str | None, str | None, str]:
        (element,) = _objects(message, "command")
        detail = element.find("ParticipantObjectDetail")
        assert detail is not None and detail.get("type") == "exit_status"
        status = base64.b64decode(detail.get("value", "")).decode()
        return (
            element.get("ParticipantObjectID"),
            element.get("ParticipantObjectTypeCodeRole"),
            status,
        )

    def ids(message: ET.Element, kind: str) -> list[str | None]:
        return [o.get("ParticipantObjectID") for o in _objects(message, kind)]

    show = found["maintenance.command maintainer:taro"]
    assert event_id(show) == "110112"  # a read: Query
    assert command(show) == (f"queue show '{message_id}'", "24", "0")
    assert ids(show, "message-id") == [message_id]
    listing = found["maintenance.command maintainer:kenji"]
    assert event_id(listing) == "110112"
    assert command(listing) == ("queue list", "24", "0")
    assert event_id(found["messages.listed maintainer:kenji"]) == "110112"
    assert ids(found["messages.listed maintainer:kenji"], "message-id") == [message_id]
    suspend = found["maintenance.command maintainer:jiro"]
    assert event_id(suspend) == "110100"  # it changed something: Application Activity
    assert command(suspend) == ("peers suspend lab planned work", "20", "0")
    query = found["maintenance.command maintainer:ada"]
    assert event_id(query) == "110112"
    assert command(query) == ("audit query --patient PAT-888", "24", "0")
    assert ids(query, "2") == ["PAT-888^^^MR"]


def test_a_maintainer_s_command_in_fhir_carries_the_command_and_its_exit_status(
    layout: DemoLayout, processes: Any, collector: Collector
) -> None:
    site = Site(layout, layout.hospital)
    site.add("jiro", "operator")
    export_to(layout, collector, message_format="fhir")
    collector.start()
    processes.start(layout.hospital.config_path)
    site.approve("jiro")
    done = site.ssh("jiro", command="peers suspend nowhere", code=site.code("jiro"))
    assert done.returncode == 1, done.stderr  # no such peer: a failure, exported as one

    def exported() -> dict[str, Any] | None:
        found = [r for r in collector.received() if r.event == "maintenance.command"]
        return json.loads(found[0].body) if found else None

    event = wait_until(exported, 60, "the command at the collector")
    assert event["type"]["code"] == "110100"
    assert event["outcome"] == "4"  # a minor failure
    assert event["agent"][0]["who"]["display"] == "maintainer:jiro"
    (entity,) = event["entity"]
    assert entity["name"] == "peers suspend nowhere"
    assert entity["role"]["code"] == "20"
    assert entity["detail"] == [{"type": "exit_status", "valueString": "1"}]
