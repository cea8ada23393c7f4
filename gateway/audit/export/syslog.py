"""RFC 5424 syslog messages, framed for RFC 5425 (TLS transport, octet counting).

``<PRI>1 TIMESTAMP HOSTNAME medgw - MSGID [medgw@32473 seq=".." event=".." hash=".."] MSG``

Facility 10 (security/authorization), as IHE ATNA asks; the severity follows
the record's: ``alert`` -> 1 (Alert), ``warning`` -> 4 (Warning), ``info`` -> 6
(Informational).  MSGID names the body's format (``IHE+RFC-3881`` for the DICOM
audit message of ITI-20, ``IHE+FHIR`` for a FHIR AuditEvent).  The structured
data element (32473 is the enterprise number RFC 5612 reserves for
documentation) carries the record's sequence number and hash: a collector sees
gaps, reordering and resends.  The body is UTF-8, after the BOM RFC 5424 asks for.
"""

from __future__ import annotations

from typing import Any

FACILITY = 10
SEVERITY = {"alert": 1, "warning": 4, "info": 6}
MSGID = {"atna": "IHE+RFC-3881", "fhir": "IHE+FHIR"}
SD_ID = "medgw@32473"
BOM = b"\xef\xbb\xbf"


def _sd_value(value: object) -> str:
    text = str(value)
    return text.replace("\\", "\\\\").replace('"', '\\"').replace("]", "\\]")


def _header_field(value: str, limit: int) -> str:
    """A header field: printable US-ASCII without spaces, at most ``limit`` characters."""
    if value.isascii() and value.isprintable() and " " not in value:
        return value[:limit] or "-"  # all of it is (a record's time, a host name)
    text = "".join(c for c in value if 33 <= ord(c) <= 126)[:limit]
    return text or "-"


def syslog_message(
    record: dict[str, Any], body: bytes, *, hostname: str, message_format: str
) -> bytes:
    severity = SEVERITY.get(str(record.get("severity")), SEVERITY["info"])
    timestamp = _header_field(str(record.get("time", "")), 32)
    params = " ".join(
        f'{name}="{_sd_value(record.get(name, ""))}"' for name in ("seq", "event", "hash")
    )
    header = (
        f"<{FACILITY * 8 + severity}>1 {timestamp} {_header_field(hostname, 255)} medgw - "
        f"{MSGID[message_format]} [{SD_ID} {params}] "
    )
    return header.encode() + BOM + body


def octet_counted(message: bytes) -> bytes:
    """RFC 5425 framing: ``MSG-LEN SP SYSLOG-MSG``."""
    return str(len(message)).encode() + b" " + message
