"""HPKI test certificates: an ISO 17090 hcRole built from ASN.1 primitives.

The DER is assembled here independently of gateway.pki.hpki, so that the
parser is checked against an encoding it did not produce.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime

from asn1crypto import core
from cryptography import x509

from gateway.pki.issue import Issued, issue

HCROLE_OID = "1.0.17090.0.1"
JHPKI_SCHEME = "1.2.392.100495.1.6.1.1"
SDA_OID = x509.ObjectIdentifier("2.5.29.9")


def tlv(tag: int, content: bytes) -> bytes:
    """One DER element: tag, definite length, content."""
    n = len(content)
    if n < 0x80:
        length = bytes([n])
    else:
        raw = n.to_bytes((n.bit_length() + 7) // 8, "big")
        length = bytes([0x80 | len(raw)]) + raw
    return bytes([tag]) + length + content


@dataclass(frozen=True)
class Role:
    scheme: str = JHPKI_SCHEME
    text: str | None = "Medical Doctor"
    code: str | None = None


def hc_actor(role: Role) -> bytes:
    parts = [core.ObjectIdentifier(role.scheme, explicit=0).dump()]
    if role.code is not None:
        parts.append(core.NumericString(role.code, explicit=1).dump())
    if role.text is not None:
        parts.append(core.UTF8String(role.text, explicit=2).dump())
    coded_data = tlv(0x31, b"".join(parts))  # SET
    return tlv(0x30, tlv(0xA0, coded_data))  # SEQUENCE { [0] EXPLICIT CodedData }


def subject_directory_attributes(roles: Sequence[Role], *, attribute: str = HCROLE_OID) -> bytes:
    hc_actor_data = tlv(0x31, b"".join(hc_actor(r) for r in roles))  # SET OF HCActor
    values = tlv(0x31, hc_actor_data)  # the attribute's SET OF values: one HCActorData
    attr = tlv(0x30, core.ObjectIdentifier(attribute).dump() + values)
    return tlv(0x30, attr)


def hcrole_extension(der: bytes) -> x509.UnrecognizedExtension:
    return x509.UnrecognizedExtension(SDA_OID, der)


def issue_person(
    ca: Issued, common_name: str, *, now: datetime, extension_der: bytes | None
) -> Issued:
    """A person's S/MIME signing certificate, with the given subjectDirectoryAttributes."""
    extra = [hcrole_extension(extension_der)] if extension_der is not None else []
    return issue(ca, common_name, purpose="smime-sign", now=now, extensions=extra)
