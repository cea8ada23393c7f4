"""An audit record as an IHE ATNA audit message (DICOM PS3.15 A.5.1 ``AuditMessage`` XML).

One line of XML, no declaration: the syslog message body of ITI-20.  The
record's own event name is the EventTypeCode (scheme ``urn:medgw:event``),
its reason the EventOutcomeDescription; the actor and the peer are
ActiveParticipants, the patients (role Patient) and the document (its
message ID) ParticipantObjects.  The record's sequence number and hash travel
in the syslog structured data, so a collector can check the trail's order.
"""

from __future__ import annotations

import xml.etree.ElementTree as ET

from gateway.audit.export.codes import DCM
from gateway.audit.export.record import Described, Source, clean

EVENT_SCHEME = "urn:medgw:event"


def _code(parent: ET.Element, tag: str, code: str, scheme: str, text: str) -> None:
    ET.SubElement(
        parent, tag, {"csd-code": code, "codeSystemName": scheme, "originalText": clean(text)}
    )


def atna_message(described: Described, source: Source) -> bytes:
    root = ET.Element("AuditMessage")
    identification = ET.SubElement(
        root,
        "EventIdentification",
        {
            "EventActionCode": described.action,
            "EventDateTime": clean(described.time),
            "EventOutcomeIndicator": described.outcome,
        },
    )
    _code(identification, "EventID", described.event_id.code, DCM, described.event_id.display)
    _code(identification, "EventTypeCode", clean(described.event), EVENT_SCHEME, described.event)
    if described.reason is not None:
        ET.SubElement(identification, "EventOutcomeDescription").text = described.reason
    for participant in described.participants:
        attributes = {
            "UserID": participant.user_id,
            "UserIsRequestor": "true" if participant.requestor else "false",
        }
        if participant.address is not None:
            attributes["NetworkAccessPointID"] = participant.address
            attributes["NetworkAccessPointTypeCode"] = "2"  # an IP address
        ET.SubElement(root, "ActiveParticipant", attributes)
    audit_source = ET.SubElement(
        root,
        "AuditSourceIdentification",
        {"AuditEnterpriseSiteID": clean(source.site), "AuditSourceID": clean(source.node)},
    )
    _code(audit_source, "AuditSourceTypeCode", "4", DCM, "Application Server Process")
    for patient in described.patients:
        authority = patient.get("authority")
        identifier = f"{patient['id']}^^^{authority}" if authority else patient["id"]
        item = ET.SubElement(
            root,
            "ParticipantObjectIdentification",
            {
                "ParticipantObjectID": identifier,
                "ParticipantObjectTypeCode": "1",  # Person
                "ParticipantObjectTypeCodeRole": "1",  # Patient
            },
        )
        _code(item, "ParticipantObjectIDTypeCode", "2", "RFC-3881", "Patient Number")
    message_id = described.record.get("message_id")
    if message_id is not None:
        item = ET.SubElement(
            root,
            "ParticipantObjectIdentification",
            {
                "ParticipantObjectID": clean(message_id),
                "ParticipantObjectTypeCode": "2",  # System Object
                "ParticipantObjectTypeCodeRole": "3",  # Report
            },
        )
        _code(item, "ParticipantObjectIDTypeCode", "message-id", "urn:medgw", "AS2 Message-ID")
    return bytes(ET.tostring(root, encoding="utf-8", xml_declaration=False))
