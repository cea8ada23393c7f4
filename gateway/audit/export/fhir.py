"""An audit record as a FHIR R4 AuditEvent (IHE Basic Audit Log Patterns), as JSON.

``type`` is the same DICOM EventID the ATNA format carries, ``subtype`` the
record's own event name; agents are the actor and the peer, entities the
patients (``Patient`` references by identifier), the documents and a maintainer's
command (its words and exit status).
"""

from __future__ import annotations

import json
from typing import Any

from gateway.audit.export.codes import DCM_URI
from gateway.audit.export.record import Described, Source, clean

EVENT_SYSTEM = "urn:medgw:event"
OBJECT_ROLE = "http://terminology.hl7.org/CodeSystem/object-role"
SOURCE_TYPE = "http://terminology.hl7.org/CodeSystem/security-source-type"
ENTITY_TYPE = "http://terminology.hl7.org/CodeSystem/audit-entity-type"


def fhir_message(described: Described, source: Source) -> bytes:
    event: dict[str, Any] = {
        "resourceType": "AuditEvent",
        "type": {
            "system": DCM_URI,
            "code": described.event_id.code,
            "display": described.event_id.display,
        },
        "subtype": [{"system": EVENT_SYSTEM, "code": clean(described.event)}],
        "action": described.action,
        "recorded": clean(described.time),
        "outcome": described.outcome,
    }
    if described.reason is not None:
        event["outcomeDesc"] = described.reason
    agents = []
    for participant in described.participants:
        agent: dict[str, Any] = {
            "who": {"display": participant.user_id},
            "requestor": participant.requestor,
        }
        if participant.address is not None:
            agent["network"] = {"address": participant.address, "type": "2"}
        agents.append(agent)
    event["agent"] = agents
    event["source"] = {
        "site": clean(source.site),
        "observer": {"display": clean(source.node)},
        "type": [{"system": SOURCE_TYPE, "code": "4", "display": "Application Server"}],
    }
    entities = []
    for patient in described.patients:
        identifier = {"value": patient["id"]}
        if patient.get("authority"):
            identifier["system"] = patient["authority"]
        entities.append(
            {
                "what": {"type": "Patient", "identifier": identifier},
                "type": {"system": ENTITY_TYPE, "code": "1", "display": "Person"},
                "role": {"system": OBJECT_ROLE, "code": "1", "display": "Patient"},
            }
        )
    for message_id in described.documents:
        entities.append(
            {
                "what": {"identifier": {"system": "urn:medgw:message-id", "value": message_id}},
                "type": {"system": ENTITY_TYPE, "code": "2", "display": "System Object"},
                "role": {"system": OBJECT_ROLE, "code": "3", "display": "Report"},
            }
        )
    command = described.command
    if command is not None:
        role = ("24", "Query") if command.reads else ("20", "Job")
        entities.append(
            {
                "type": {"system": ENTITY_TYPE, "code": "2", "display": "System Object"},
                "role": {"system": OBJECT_ROLE, "code": role[0], "display": role[1]},
                "name": command.line,
                "detail": [{"type": "exit_status", "valueString": command.exit_status}],
            }
        )
    if entities:
        event["entity"] = entities
    return json.dumps(event, ensure_ascii=False, separators=(",", ":")).encode()
