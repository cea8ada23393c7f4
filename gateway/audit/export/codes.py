"""What kind of audit event a record is, in the vocabulary of IHE ATNA (DICOM PS3.15 A.5).

Each record gets one of the standard EventIDs (DICOM CID 150) and an
EventActionCode.  The mapping is by event name; a name it does not know (an
event added later) is a Security Alert when its severity is ``alert`` and an
Application Activity otherwise, so nothing is exported without an EventID.
"""

from __future__ import annotations

from dataclasses import dataclass

DCM = "DCM"  # the DICOM coding scheme
DCM_URI = "http://dicom.nema.org/resources/ontology/DCM"


@dataclass(frozen=True)
class Code:
    code: str
    display: str


APPLICATION_ACTIVITY = Code("110100", "Application Activity")
EXPORT = Code("110106", "Export")
IMPORT = Code("110107", "Import")
QUERY = Code("110112", "Query")
SECURITY_ALERT = Code("110113", "Security Alert")
USER_AUTHENTICATION = Code("110114", "User Authentication")
EMERGENCY_OVERRIDE = Code("110127", "Emergency Override")

# EventActionCode: Create, Read, Update, Delete, Execute
CREATE, READ, UPDATE, DELETE, EXECUTE = "C", "R", "U", "D", "E"

_BY_NAME: dict[str, tuple[Code, str]] = {
    # documents entering the gateway (from the internal side or a peer)
    "message.accepted": (IMPORT, CREATE),
    "message.received": (IMPORT, CREATE),
    "message.delivered": (IMPORT, CREATE),
    "message.duplicate": (IMPORT, READ),
    "receipt.received": (IMPORT, CREATE),
    "probe.received": (IMPORT, EXECUTE),
    # documents leaving it (to a peer or to the internal system)
    "message.sent": (EXPORT, READ),
    "message.handed_over": (EXPORT, READ),
    "receipt.sent": (EXPORT, READ),
    "message.send_failed": (EXPORT, READ),
    "message.handover_failed": (EXPORT, READ),
    "receipt.invalid": (IMPORT, CREATE),
    # authentication of a local client or a peer
    "api.authentication_failed": (USER_AUTHENTICATION, EXECUTE),
    "peer.authentication_failed": (USER_AUTHENTICATION, EXECUTE),
    # a maintainer's SSH session (gateway.maintenance)
    "maintenance.login": (USER_AUTHENTICATION, EXECUTE),
    "maintenance.login_failed": (USER_AUTHENTICATION, EXECUTE),
    "maintenance.logout": (USER_AUTHENTICATION, EXECUTE),
    # an operator's or a maintainer's read of a list of documents
    "messages.listed": (QUERY, EXECUTE),
}
COMMAND = "maintenance.command"

# The last part of the name of an event that reads stored documents or records
_READS = ("viewed", "shown", "fetched", "query", "read")


def classify(event: str, severity: str, reads: bool = False) -> tuple[Code, str]:
    """The ATNA EventID and EventActionCode of a record with this event name; ``reads``:
    a maintenance command that showed documents or patients, a Query as any read."""
    if event == COMMAND:
        return (QUERY if reads else APPLICATION_ACTIVITY), EXECUTE
    known = _BY_NAME.get(event)
    if known is not None:
        return known
    if event.startswith("emergency."):
        return EMERGENCY_OVERRIDE, EXECUTE
    if severity == "alert":
        return SECURITY_ALERT, EXECUTE
    if any(part in event.rsplit(".", 1)[-1] for part in _READS):
        return QUERY, EXECUTE
    return APPLICATION_ACTIVITY, EXECUTE


def outcome_indicator(outcome: str, severity: str) -> str:
    """EventOutcomeIndicator: 0 success, 4 minor failure, 8 serious failure."""
    if outcome == "success":
        return "0"
    return "8" if severity == "alert" else "4"
