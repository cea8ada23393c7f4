"""An audit record as an IHE ATNA audit message (DICOM PS3.15 A.5.1 ``AuditMessage`` XML).

One line of XML, no declaration: the syslog message body of ITI-20.  The
record's own event name is the EventTypeCode (scheme ``urn:medgw:event``),
its reason the EventOutcomeDescription; the actor and the peer are
ActiveParticipants, the patients (role Patient), the documents (their
message IDs) and a maintainer's command (its words and exit status)
ParticipantObjects.  The record's sequence number and hash travel
in the syslog structured data, so a collector can check the trail's order.
"""

from __future__ import annotations

import base64
import re
from xml.sax.saxutils import escape

from gateway.audit.export.codes import DCM
from gateway.audit.export.record import Described, Source, clean

EVENT_SCHEME = "urn:medgw:event"


# What an attribute value cannot carry as it is: control characters (clean) and markup.
_SPECIAL = re.compile(r'[\x00-\x1f\x7f&<>"]')


def _quoted(value: str) -> str:
    if _SPECIAL.search(value) is None:
        return f'"{value}"'  # most values: names, codes, times; one look instead of five
    text = clean(value).replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
    return '"' + text.replace('"', "&quot;") + '"'


def _attributes(attributes: dict[str, str]) -> str:
    return "".join(f" {name}={_quoted(value)}" for name, value in attributes.items())


def _element(tag: str, attributes: dict[str, str], children: str = "") -> str:
    if not children:
        return f"<{tag}{_attributes(attributes)}/>"
    return f"<{tag}{_attributes(attributes)}>{children}</{tag}>"


def _code(tag: str, code: str, scheme: str, text: str) -> str:
    return _element(tag, {"csd-code": code, "codeSystemName": scheme, "originalText": text})


# What is the same in every message, built once.
_DCM_SCHEME = _quoted(DCM)
_EVENT_SCHEME = _quoted(EVENT_SCHEME)
_SOURCE_TYPE = _code("AuditSourceTypeCode", "4", DCM, "Application Server Process")
_PATIENT_NUMBER = _code("ParticipantObjectIDTypeCode", "2", "RFC-3881", "Patient Number")
_COMMAND_TYPE = _code("ParticipantObjectIDTypeCode", "command", "urn:medgw", "Maintenance command")
_MESSAGE_ID_TYPE = _code("ParticipantObjectIDTypeCode", "message-id", "urn:medgw", "AS2 Message-ID")


def atna_message(described: Described, source: Source) -> bytes:
    """Built as text, escaped here: a few times cheaper than an element tree, and the
    export formats every record of the trail.  The attributes' names and fixed values
    are written as they are; every value from the record goes through ``_quoted``."""
    q = _quoted
    event_id = described.event_id
    event = q(described.event)
    identification = (
        f"<EventID csd-code={q(event_id.code)} codeSystemName={_DCM_SCHEME}"
        f" originalText={q(event_id.display)}/>"
        f"<EventTypeCode csd-code={event} codeSystemName={_EVENT_SCHEME} originalText={event}/>"
    )
    if described.reason is not None:
        identification += (
            f"<EventOutcomeDescription>{escape(described.reason)}</EventOutcomeDescription>"
        )
    parts = [
        f"<EventIdentification EventActionCode={q(described.action)}"
        f" EventDateTime={q(described.time)} EventOutcomeIndicator={q(described.outcome)}>"
        f"{identification}</EventIdentification>"
    ]
    for participant in described.participants:
        requestor = "true" if participant.requestor else "false"
        address = participant.address
        where = (
            ""
            if address is None
            else f' NetworkAccessPointID={q(address)} NetworkAccessPointTypeCode="2"'  # an IP
        )
        parts.append(
            f"<ActiveParticipant UserID={q(participant.user_id)}"
            f' UserIsRequestor="{requestor}"{where}/>'
        )
    parts.append(
        f"<AuditSourceIdentification AuditEnterpriseSiteID={q(source.site)}"
        f" AuditSourceID={q(source.node)}>{_SOURCE_TYPE}</AuditSourceIdentification>"
    )
    for patient in described.patients:
        authority = patient.get("authority")
        identifier = f"{patient['id']}^^^{authority}" if authority else patient["id"]
        parts.append(  # a Person (1) in the role Patient (1)
            f"<ParticipantObjectIdentification ParticipantObjectID={q(identifier)}"
            ' ParticipantObjectTypeCode="1" ParticipantObjectTypeCodeRole="1">'
            f"{_PATIENT_NUMBER}</ParticipantObjectIdentification>"
        )
    for message_id in described.documents:
        parts.append(  # a System Object (2) in the role Report (3)
            f"<ParticipantObjectIdentification ParticipantObjectID={q(message_id)}"
            ' ParticipantObjectTypeCode="2" ParticipantObjectTypeCodeRole="3">'
            f"{_MESSAGE_ID_TYPE}</ParticipantObjectIdentification>"
        )
    command = described.command
    if command is not None:
        # a System Object (2) in the role Query (24) when it read, else Job (20); its
        # exit status a detail (base64, as the schema has every detail's value)
        role = "24" if command.reads else "20"
        status = base64.b64encode(command.exit_status.encode()).decode()
        parts.append(
            f"<ParticipantObjectIdentification ParticipantObjectID={q(command.line)}"
            f' ParticipantObjectTypeCode="2" ParticipantObjectTypeCodeRole="{role}">'
            f"{_COMMAND_TYPE}<ParticipantObjectName>{escape(command.line)}"
            f'</ParticipantObjectName><ParticipantObjectDetail type="exit_status"'
            f' value="{status}"/></ParticipantObjectIdentification>'
        )
    return f"<AuditMessage>{''.join(parts)}</AuditMessage>".encode()
