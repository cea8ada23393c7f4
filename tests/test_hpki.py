"""HPKI hcRole (ISO 17090) on signer certificates: what is certified, and nothing guessed."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from asn1crypto import core
from cryptography import x509

from gateway.pki.hpki import HcRoles, hcroles, parse_hcroles
from gateway.pki.issue import Issued, issue, make_ca
from tests.hpki_certs import (
    JHPKI_SCHEME,
    Role,
    hc_actor,
    issue_person,
    subject_directory_attributes,
    tlv,
)

NOW = datetime(2025, 4, 1, 9, 0, tzinfo=UTC)


@pytest.fixture(scope="module")
def ca() -> Issued:
    return make_ca("HPKI Test CA", now=NOW - timedelta(days=1))


def roles_of(ca: Issued, der: bytes | None) -> HcRoles:
    return hcroles(issue_person(ca, "Dr Sato", now=NOW, extension_der=der).certificate)


def test_medical_doctor_is_recognised_with_its_japanese_title(ca: Issued) -> None:
    found = roles_of(ca, subject_directory_attributes([Role()]))
    assert found.status == "recognised"
    assert found.summary == "Medical Doctor"
    assert found.describe() == "Medical Doctor (HPKI)"
    (role,) = found.roles
    assert role.japanese == "医師"
    assert role.scheme == JHPKI_SCHEME
    assert role.authority is not None and "HPKI" in role.authority
    assert role.code is None


def test_several_roles_and_a_code_value_are_all_reported(ca: Issued) -> None:
    der = subject_directory_attributes([Role(text="Pharmacist", code="123"), Role(text="Nurse")])
    found = roles_of(ca, der)
    assert found.status == "recognised"
    by_name = {r.name: r for r in found.roles}
    assert set(by_name) == {"Pharmacist", "Nurse"}
    assert by_name["Pharmacist"].code == "123"
    assert by_name["Pharmacist"].japanese == "薬剤師"
    assert by_name["Nurse"].japanese == "看護師"


def test_unknown_role_is_reported_raw_never_guessed(ca: Issued) -> None:
    found = roles_of(ca, subject_directory_attributes([Role(text="Medical doctor (retired)")]))
    assert found.status == "unrecognised"
    (role,) = found.roles
    assert role.name == "Medical doctor (retired)"
    assert not role.recognised and role.japanese is None
    assert found.summary == "Medical doctor (retired)"
    assert found.describe() == "Medical doctor (retired) (HPKI, unrecognised role)"


def test_known_name_under_another_coding_scheme_is_not_recognised(ca: Issued) -> None:
    found = roles_of(ca, subject_directory_attributes([Role(scheme="1.2.3.4", text="Dentist")]))
    assert found.status == "unrecognised"
    assert found.roles[0].name == "Dentist"
    assert found.roles[0].authority is None


def test_a_code_without_free_text_is_reported_as_the_code(ca: Issued) -> None:
    found = roles_of(ca, subject_directory_attributes([Role(text=None, code="0042")]))
    assert found.status == "unrecognised"
    assert found.summary == "0042"


def test_no_extension_or_other_attributes_mean_absent(ca: Issued) -> None:
    assert roles_of(ca, None) == HcRoles("absent")
    other = subject_directory_attributes([Role()], attribute="1.3.6.1.5.5.7.9.1")
    found = roles_of(ca, other)
    assert found.status == "absent" and found.summary is None and found.describe() is None
    plain = issue(ca, "LAB-SIGN", purpose="smime-sign", now=NOW).certificate
    assert hcroles(plain).status == "absent"


@pytest.mark.parametrize(
    "der",
    [
        b"\x30\x03\x02\x01",  # truncated
        b"\x04\x02ab",  # an OCTET STRING, not a SEQUENCE OF Attribute
        subject_directory_attributes([Role()]) + b"\x00",  # trailing garbage
        # hcRole whose value is an INTEGER instead of HCActorData
        tlv(
            0x30,
            tlv(0x30, core.ObjectIdentifier("1.0.17090.0.1").dump() + tlv(0x31, b"\x02\x01\x05")),
        ),
        # codeDataFreeText that is not a string
        tlv(
            0x30,
            tlv(
                0x30,
                core.ObjectIdentifier("1.0.17090.0.1").dump()
                + tlv(
                    0x31,
                    tlv(
                        0x31,
                        tlv(
                            0x30,
                            tlv(
                                0xA0,
                                tlv(
                                    0x31,
                                    core.ObjectIdentifier(JHPKI_SCHEME, explicit=0).dump()
                                    + core.Integer(7, explicit=2).dump(),
                                ),
                            ),
                        ),
                    ),
                ),
            ),
        ),
    ],
    ids=["truncated", "not-a-sequence", "trailing-bytes", "integer-value", "integer-text"],
)
def test_broken_extension_is_unrecognised_with_a_reason_and_never_raises(
    ca: Issued, der: bytes
) -> None:
    found = roles_of(ca, der)
    assert found.status == "unrecognised"
    assert found.summary == "unrecognised"
    assert found.roles == ()
    assert found.problem is not None and "ISO 17090" in found.problem


def test_empty_hcrole_attribute_is_unrecognised() -> None:
    empty = tlv(0x30, tlv(0x30, core.ObjectIdentifier("1.0.17090.0.1").dump() + tlv(0x31, b"")))
    found = parse_hcroles(empty)
    assert found.status == "unrecognised"
    assert found.problem == "the hcRole attribute holds no role"


def test_a_builder_encoding_matches_the_layout_of_real_hpki_certificates() -> None:
    """The bytes HPKI CAs issue for a doctor: SEQUENCE { [0] SET { [0] OID, [2] UTF8 } }."""
    assert hc_actor(Role()).hex() == (
        "3024a0223120a00c060a2a830886910f01060101a2100c0e4d65646963616c20446f63746f72"
    )


def test_cryptography_sees_the_extension_as_unrecognised(ca: Issued) -> None:
    """hpki reads the raw value; if cryptography ever parses it, the DER path still works."""
    cert = issue_person(
        ca, "Dr Sato", now=NOW, extension_der=subject_directory_attributes([Role()])
    ).certificate
    value = cert.extensions.get_extension_for_oid(x509.ObjectIdentifier("2.5.29.9")).value
    assert isinstance(value, x509.UnrecognizedExtension)
    assert parse_hcroles(value.value).summary == "Medical Doctor"
