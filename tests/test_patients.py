"""Patient identifiers read from real-shaped HL7 v2, CDA and FHIR documents (samples
written for these tests: no real patient), and from documents that name none."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gateway.audit import PatientId
from gateway.audit.patients import MAX_IDS, SCAN_BYTES, declared_patients, patients_in

SAMPLES = Path(__file__).parent / "samples" / "patients"


def ids(name: str) -> list[dict[str, str]]:
    return [p.to_record() for p in patients_in((SAMPLES / name).read_bytes())]


def test_hl7v2_every_pid3_repetition_with_its_assigning_authority_in_iso2022jp() -> None:
    assert ids("oml_iso2022jp.hl7") == [
        {"id": "0000123456", "authority": "KITA_HOSP", "type": "PI", "source": "hl7v2"},
        {
            "id": "8812345",
            "authority": "1.2.392.200119.6.102.11312345678",
            "type": "MR",
            "source": "hl7v2",
        },
    ]


def test_hl7v2_mllp_framed_escapes_decoded_and_pid2_kept() -> None:
    assert ids("oru_mllp.hl7") == [
        {"id": "A^99", "authority": "KITA&LAB", "type": "MR", "source": "hl7v2"},
        {"id": "OLD-4711", "source": "hl7v2"},
    ]


def test_hl7v2_batch_names_each_messages_patient() -> None:
    assert [p["id"] for p in ids("batch.hl7")] == ["P-0001", "P-0002"]


def test_hl7v2_without_pid_names_no_patient() -> None:
    assert ids("ack_no_patient.hl7") == []


def test_hl7v2_other_encoding_characters_are_honoured() -> None:
    message = b"MSH#!@$%#LIS#LAB\rPID#1##X1!!!AUTH!MR@X2!!!AUTH!PI#NAME\r"
    assert [(p.id, p.authority, p.type) for p in patients_in(message)] == [
        ("X1", "AUTH", "MR"),
        ("X2", "AUTH", "PI"),
    ]


def test_hl7v2_segments_are_found_after_any_line_break_and_only_at_a_line_start() -> None:
    message = (
        b"MSH|^~\\&|LIS|LAB\n"
        b"OBX|1|ST|PID|x|PID|1||NOT-A-PATIENT\r\n"  # "PID" inside another segment
        b"PID|1||P-1^^^AUTH^MR\r\r"
        b"NTE|PID|1||NOT-EITHER\n\n"
        b"PIDX|1||NOR-THIS\r"  # a segment whose name only begins with PID
        b"PID|1||P-2^^^AUTH^PI\n"
        b"MSH#!@$%#LIS#LAB\r"  # the next message of a batch, other separators
        b"PID#1##P-3!!!AUTH!MR"  # the last line, with no line break after it
    )
    assert [(p.id, p.type) for p in patients_in(message)] == [
        ("P-1", "MR"),
        ("P-2", "PI"),
        ("P-3", "MR"),
    ]


_SEGMENT = st.sampled_from(
    [
        "PID|1||A-1^^^AUTH^MR",
        "PID|1|OLD-2|B-2~C-3^^^X&1.2.3&ISO^PI",
        "PID|",
        "OBX|1|NM|2345-7^GLUCOSE^LN||98",
        "NTE|PID|1||Z-9",
        "PIDX|1||Y-8",
        "MSH|^~\\&|LIS|LAB",
        "MSH#!@$%#LIS#LAB",
        "PID#1##D-4!!!AUTH!MR",
        "",
    ]
)


@given(
    st.lists(st.tuples(_SEGMENT, st.sampled_from(["\r", "\n", "\r\n", "\n\r", "\r\r"]))),
)
def test_hl7v2_patients_do_not_depend_on_line_breaks_or_other_segments(
    lines: list[tuple[str, str]],
) -> None:
    """CR, LF or both between segments name the same patients, and so does the message
    without the segments that are neither a header nor a PID."""
    header = "MSH|^~\\&|LIS|LAB\r"
    document = header + "".join(segment + end for segment, end in lines)
    only_cr = header + "".join(segment + "\r" for segment, _ in lines)
    kept = [s for s, _ in lines if s[:3] in ("MSH", "PID") and s[:4] != "PIDX"]
    read = header + "\r".join(kept)
    found = patients_in(document.encode())
    assert found == patients_in(only_cr.encode()) == patients_in(read.encode())


def test_cda_referral_letter_record_target_ids_only() -> None:
    assert ids("referral_cda.xml") == [
        {"id": "0000123456", "authority": "1.2.392.200119.6.102.11312345678", "source": "cda"},
        {"id": "8812345", "authority": "1.2.392.100495.20.3.51.11312345678", "source": "cda"},
    ]


def test_cda_in_shift_jis_is_read() -> None:
    assert [p["id"] for p in ids("discharge_cda_sjis.xml")] == ["0000123456", "8812345"]


def test_cda_without_record_target_names_no_patient() -> None:
    assert ids("cda_without_record_target.xml") == []


def test_fhir_json_bundle_patient_identifiers_not_the_practitioners() -> None:
    assert ids("referral_bundle.json") == [
        {
            "id": "0000123456",
            "authority": "urn:oid:1.2.392.100495.20.3.51.11312345678",
            "type": "MR",
            "source": "fhir",
        },
        {"id": "06-12345678-01", "authority": "urn:oid:1.2.392.100495.20.3.61", "source": "fhir"},
    ]


def test_fhir_json_bundle_without_patient_names_none() -> None:
    assert ids("bundle_without_patient.json") == []


def test_fhir_xml_bundle_patient_identifier_not_its_assigners() -> None:
    assert ids("lab_bundle.xml") == [
        {
            "id": "0000123456",
            "authority": "urn:oid:1.2.392.100495.20.3.51.11312345678",
            "type": "MR",
            "source": "fhir",
        }
    ]


def test_a_single_fhir_patient_resource() -> None:
    patient = {"resourceType": "Patient", "identifier": [{"system": "urn:x", "value": "7"}]}
    assert patients_in(json.dumps(patient).encode()) == (PatientId("7", "fhir", "urn:x"),)


@pytest.mark.parametrize(
    "document",
    [
        b"%PDF-1.7\n%\xe2\xe3\xcf\xd3\n1 0 obj\n<< /Type /Catalog >>\nendobj\n",
        b"DICM" + bytes(200),
        b"",
        b"plain text letter",
        b"<html><body>MSH|^~\\&|</body></html>",
        b'{"resourceType": "Observation", "subject": {"identifier": {"value": "x"}}}',
        b"{not json",
        b"<ClinicalDocument xmlns='urn:hl7-org:v3'><recordTarget>",  # cut before any id
    ],
)
def test_documents_in_no_known_format_or_without_patient_name_none(document: bytes) -> None:
    assert patients_in(document) == ()


def test_cda_with_a_dtd_is_refused_so_no_entity_is_expanded(tmp_path: Path) -> None:
    secret = tmp_path / "secret"
    secret.write_text("LEAKED")
    external = (
        f'<?xml version="1.0"?><!DOCTYPE ClinicalDocument [<!ENTITY x SYSTEM "file://{secret}">]>'
        '<ClinicalDocument xmlns="urn:hl7-org:v3"><recordTarget><patientRole>'
        '<id root="1.2" extension="&x;"/></patientRole></recordTarget></ClinicalDocument>'
    ).encode()
    assert patients_in(external) == ()
    laughs = b'<?xml version="1.0"?><!DOCTYPE d [<!ENTITY a "aaaaaaaaaa">' + b"".join(
        f'<!ENTITY a{i} "{("&a" + str(i - 1) + ";") * 10 if i else "&a;" * 10}">'.encode()
        for i in range(9)
    )
    laughs += b']><ClinicalDocument xmlns="urn:hl7-org:v3"><recordTarget><patientRole>'
    laughs += b'<id root="1" extension="&a8;"/></patientRole></recordTarget></ClinicalDocument>'
    started = time.monotonic()
    assert patients_in(laughs) == ()
    assert time.monotonic() - started < 5  # refused at the DTD, not expanded


def test_deep_nesting_is_bounded() -> None:
    deep = b'<Bundle xmlns="http://hl7.org/fhir">' + b"<entry>" * 100_000
    assert patients_in(deep) == ()
    deep_json = b'{"resourceType": "Bundle", "entry": [' + b"[" * 200_000
    assert patients_in(deep_json) == ()


def test_only_the_first_scan_bytes_are_read_and_a_cut_bundle_keeps_what_came_before() -> None:
    padding = {"resourceType": "Binary", "data": "A" * (SCAN_BYTES // 2)}
    patient = {"resourceType": "Patient", "identifier": [{"system": "urn:h", "value": "P1"}]}
    late = {"resourceType": "Patient", "identifier": [{"system": "urn:h", "value": "P2"}]}
    bundle = {
        "resourceType": "Bundle",
        "type": "document",
        "entry": [{"resource": r} for r in (patient, padding, padding, late)],
    }
    document = json.dumps(bundle).encode()
    assert len(document) > SCAN_BYTES
    assert [p.id for p in patients_in(document)] == ["P1"]  # P2 is beyond the bound


def test_identifiers_are_bounded_in_number_and_length() -> None:
    many = "~".join(f"{n}^^^A" for n in range(10_000))
    message = f"MSH|^~\\&|A|B\rPID|1||{many}\r".encode()
    assert len(patients_in(message)) == MAX_IDS
    long = f"MSH|^~\\&|A|B\rPID|1||{'9' * 100_000}^^^A\r".encode()
    [patient] = patients_in(long)
    assert len(patient.id) <= 200


def test_control_characters_do_not_reach_the_record() -> None:
    message = b"MSH|^~\\&|A|B\rPID|1||12\x1b[31m34^^^A\x07\r"
    [patient] = patients_in(message)
    assert patient.id.isprintable() and patient.authority == "A"


def test_declared_patients_with_and_without_authority() -> None:
    assert declared_patients(["urn:oid:1.2|P-1, P-2", "a|b|P-3"]) == (
        PatientId("P-1", "client", "urn:oid:1.2"),
        PatientId("P-2", "client"),
        PatientId("P-3", "client", "a|b"),
    )


@pytest.mark.parametrize("value", ["", "A|", "P\x00", "\u202eP", "x" * 201, ",".join("1" * 33)])
def test_declared_patients_refused(value: str) -> None:
    with pytest.raises(ValueError):
        declared_patients([value])
