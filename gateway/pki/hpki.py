"""HPKI: the healthcare professional qualification on a signer's certificate.

Japan's healthcare PKI (HPKI, the MHLW certificate policy for the health,
medical and welfare sector) certifies a person's national qualification - a
medical doctor, a pharmacist - in the certificate itself, with the ISO 17090
``hcRole`` attribute in the subjectDirectoryAttributes extension (2.5.29.9)::

    SubjectDirectoryAttributes ::= SEQUENCE OF Attribute
    Attribute ::= SEQUENCE { type OBJECT IDENTIFIER, values SET OF ANY }
        -- type id-hcpki-at-healthcareactor { iso(1) standard(0) hcpki(17090) 0 1 },
        -- each value an HCActorData
    HCActorData ::= SET OF HCActor
    HCActor ::= SEQUENCE {
        codedData           [0] EXPLICIT CodedData OPTIONAL,
        regionalHCActorData [1] EXPLICIT SEQUENCE OF RegionalData OPTIONAL }
    CodedData ::= SET {
        codingSchemeReference [0] EXPLICIT OBJECT IDENTIFIER,
        codeDataValue         [1] EXPLICIT (a string) OPTIONAL,
        codeDataFreeText      [2] EXPLICIT DirectoryString OPTIONAL }

Japanese HPKI certificates name the qualification in ``codeDataFreeText``
(for example ``"Medical Doctor"``) under the coding scheme
1.2.392.100495.1.6.1.1 (the national qualifications of the Japanese HPKI).

This module reads what is there and says so; it never guesses.  A role it
knows is reported by its name (with the Japanese title); anything else is
reported as the raw value, marked unrecognised.  An extension it cannot parse
gives :attr:`HcRoles.status` ``"unrecognised"`` with the reason: the role is
information for the audit trail and the receipt, never a reason to refuse a
message (the signer's certificate is judged by path validation, elsewhere).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Final, Literal

from asn1crypto import core
from asn1crypto import x509 as asn1_x509
from cryptography import x509

SUBJECT_DIRECTORY_ATTRIBUTES = x509.ObjectIdentifier("2.5.29.9")
HCROLE = "1.0.17090.0.1"  # id-hcpki-at-healthcareactor (ISO 17090)
JHPKI_QUALIFICATION = "1.2.392.100495.1.6.1.1"  # Japanese HPKI: national qualifications

# Coding schemes whose definer we can name.
AUTHORITIES = {JHPKI_QUALIFICATION: "Japanese HPKI national qualification (MHLW)"}

# Qualification names as Japanese HPKI certificates carry them, and their titles.
# Only names that are certain are listed; any other value is reported as it is.
QUALIFICATIONS = {
    "Medical Doctor": "医師",
    "Dentist": "歯科医師",
    "Pharmacist": "薬剤師",
    "Nurse": "看護師",
}

UNRECOGNISED: Final = "unrecognised"
_CONTEXT = 2  # ASN.1 tag class context-specific


class _CodedData(core.Set):  # type: ignore[misc]
    _fields = [  # noqa: RUF012 - asn1crypto schema
        ("coding_scheme_reference", core.ObjectIdentifier, {"explicit": 0}),
        ("code_data_value", core.Any, {"explicit": 1, "optional": True}),
        ("code_data_free_text", core.Any, {"explicit": 2, "optional": True}),
    ]


class _HcActor(core.Sequence):  # type: ignore[misc]
    _fields = [  # noqa: RUF012 - asn1crypto schema
        ("coded_data", _CodedData, {"explicit": 0, "optional": True}),
        ("regional_hc_actor_data", core.Any, {"explicit": 1, "optional": True}),
    ]


class _HcActorData(core.SetOf):  # type: ignore[misc]
    _child_spec = _HcActor


class _AttributeValues(core.SetOf):  # type: ignore[misc]
    _child_spec = core.Any


class _Attribute(core.Sequence):  # type: ignore[misc]
    _fields = [("type", core.ObjectIdentifier), ("values", _AttributeValues)]  # noqa: RUF012


class _Attributes(core.SequenceOf):  # type: ignore[misc]
    _child_spec = _Attribute


@dataclass(frozen=True)
class HcRole:
    """One healthcare role (one HCActor) of a certificate.

    ``name`` is what to show: the qualification's name when recognised, else
    the raw value (free text, or the code), or ``"unrecognised"`` if neither
    is present.
    """

    name: str
    recognised: bool
    scheme: str | None = None  # codingSchemeReference (OID, dotted)
    authority: str | None = None  # who defines the scheme, when known
    code: str | None = None  # codeDataValue
    text: str | None = None  # codeDataFreeText
    japanese: str | None = None  # e.g. 医師, when recognised

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "recognised": self.recognised,
            "scheme": self.scheme,
            "authority": self.authority,
            "code": self.code,
            "text": self.text,
            "japanese": self.japanese,
        }


@dataclass(frozen=True)
class HcRoles:
    """What a certificate says about its subject's healthcare role.

    ``status``: ``"absent"`` (no hcRole attribute), ``"recognised"`` (every
    role is known), ``"unrecognised"`` (a role is unknown, or the extension
    or attribute could not be parsed: ``problem`` says why).
    """

    status: Literal["absent", "recognised", "unrecognised"]
    roles: tuple[HcRole, ...] = ()
    problem: str | None = None

    @property
    def present(self) -> bool:
        return self.status != "absent"

    @property
    def summary(self) -> str | None:
        """One line for the audit trail, e.g. ``"Medical Doctor"``; None when absent."""
        if not self.present:
            return None
        if not self.roles:
            return UNRECOGNISED
        return ", ".join(r.name for r in self.roles)

    def describe(self) -> str | None:
        """For a receipt: ``"Medical Doctor (HPKI)"``; unrecognised values say so."""
        if not self.present:
            return None
        if not self.roles:
            return "healthcare role unrecognised (HPKI)"
        return ", ".join(
            f"{r.name} (HPKI)" if r.recognised else f"{r.name} (HPKI, unrecognised role)"
            for r in self.roles
        )

    def to_json(self) -> dict[str, Any]:
        return {
            "status": self.status,
            "roles": [r.to_json() for r in self.roles],
            "problem": self.problem,
        }


def _string(value: core.Any | None) -> str | None:
    """The text of an explicitly tagged string value (any ASN.1 string type)."""
    if value is None or isinstance(value, core.Void):
        return None
    loaded = core.load(value.dump())
    if loaded.class_ == _CONTEXT:  # the explicit tag around the value
        loaded = core.load(loaded.contents)
    if isinstance(loaded, core.AbstractString):
        text = loaded.native
        return text.strip() if isinstance(text, str) else None
    raise ValueError(f"expected a string, found {type(loaded).__name__}")


def _role(actor: _HcActor) -> HcRole:
    coded = actor["coded_data"]
    if isinstance(coded, core.Void):
        return HcRole(UNRECOGNISED, False)  # regional data only: nothing we can name
    scheme = coded["coding_scheme_reference"].dotted
    code = _string(coded["code_data_value"])
    text = _string(coded["code_data_free_text"])
    japanese = QUALIFICATIONS.get(text or "") if scheme == JHPKI_QUALIFICATION else None
    return HcRole(
        name=text or code or UNRECOGNISED,
        recognised=japanese is not None,
        scheme=scheme,
        authority=AUTHORITIES.get(scheme),
        code=code,
        text=text,
        japanese=japanese,
    )


def parse_hcroles(extension_value: bytes) -> HcRoles:
    """The hcRole attribute in the DER of a subjectDirectoryAttributes extension value."""
    try:
        attributes = _Attributes.load(extension_value, strict=True)
        roles: list[HcRole] = []
        found = False
        for attribute in attributes:
            if attribute["type"].dotted != HCROLE:
                continue
            found = True
            for value in attribute["values"]:
                actors = _HcActorData.load(value.dump(), strict=True)
                roles.extend(_role(actor) for actor in actors)
    except (ValueError, TypeError, KeyError, IndexError, OverflowError) as exc:
        return HcRoles(
            UNRECOGNISED,
            problem=f"subjectDirectoryAttributes is not valid ISO 17090 DER ({exc})",
        )
    if not found:
        return HcRoles("absent")
    if not roles:
        return HcRoles(UNRECOGNISED, problem="the hcRole attribute holds no role")
    status: Literal["recognised", "unrecognised"] = (
        "recognised" if all(r.recognised for r in roles) else UNRECOGNISED
    )
    return HcRoles(status, tuple(roles))


def hcroles(cert: x509.Certificate) -> HcRoles:
    """The healthcare roles ``cert`` certifies (ISO 17090 hcRole); never raises."""
    try:
        extension = cert.extensions.get_extension_for_oid(SUBJECT_DIRECTORY_ATTRIBUTES)
    except x509.ExtensionNotFound:
        return HcRoles("absent")
    except ValueError:  # another extension is malformed: cryptography refuses them all
        return _from_asn1(cert)
    value = extension.value
    der = value.value if isinstance(value, x509.UnrecognizedExtension) else value.public_bytes()
    return parse_hcroles(der)


def _from_asn1(cert: x509.Certificate) -> HcRoles:
    """Read the extension with asn1crypto when cryptography will not parse the extensions."""
    from cryptography.hazmat.primitives import serialization

    try:
        tbs = asn1_x509.Certificate.load(cert.public_bytes(serialization.Encoding.DER))
        for extension in tbs["tbs_certificate"]["extensions"]:
            if extension["extn_id"].dotted == SUBJECT_DIRECTORY_ATTRIBUTES.dotted_string:
                return parse_hcroles(extension["extn_value"].contents)
    except (ValueError, TypeError, KeyError) as exc:
        return HcRoles(UNRECOGNISED, problem=f"the certificate's extensions are unreadable ({exc})")
    return HcRoles("absent")
