"""The audit trail's lines, byte for byte: what `medgw audit verify`, the export and other
software read must not change when the writer changes.  Records of the shapes the
pipelines write, and the awkward ones (text that JSON escapes, non-ASCII, keys that
sort around ``hash``, nested detail, clipped text), written by the real AuditLog."""

from __future__ import annotations

import hashlib
import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from hypothesis import given
from hypothesis import strategies as st

from gateway.audit import AuditEvent, AuditLog, EventType, Outcome, PatientId, Severity
from gateway.audit.chain import canonical, hashed_line
from gateway.audit.export.atna import atna_message
from gateway.audit.export.cursor import Broken, Position, read_forward
from gateway.audit.export.fhir import fhir_message
from gateway.audit.export.record import Source, describe
from gateway.audit.export.syslog import octet_counted, syslog_message
from gateway.audit.verify import verify_chain
from gateway.textbounds import MAX_ITEMS, MAX_TEXT, bounded
from tests.clocks import TickingClock

MIC = "Qm9ndXMgbWljIGZvciB0ZXN0cw0KAAAAAAAAAAAAAAA=, sha-256"
SIGNER = "CN=sakura-hospital AS2 signing,O=Sakura Hospital,C=JP"
ID = "<00000001.0000000001ef@kita-lab.example>"


def _events() -> list[AuditEvent]:

    def outbound(
        kind: EventType,
        outcome: Outcome = Outcome.SUCCESS,
        severity: Severity = Severity.INFO,
        **fields: Any,
    ) -> AuditEvent:
        return AuditEvent(
            kind, outcome, severity, peer="sakura", message_id=ID, direction="outbound", **fields
        )

    def inbound(kind: EventType, **fields: Any) -> AuditEvent:
        return AuditEvent(kind, peer="kita-lab", message_id=ID, direction="inbound", **fields)

    patient = PatientId("P-102938", "hl7v2", "1.2.392.200119.6.102.11310", "MR")
    return [
        outbound(
            EventType.MESSAGE_ACCEPTED,
            service="lab-results",
            actor="outbox:kita-lab (uid 1001)",
            patient_ids=(patient, PatientId("4711", "client")),
            detail={
                "filename": "order-000001.hl7",
                "content_type": "application/hl7-v2",
                "size": 4096,
                "mic": MIC,
                "sha256": "ab" * 32,
                "cipher": "aes256-gcm",
                "digest": "sha256",
                "key_transport": "rsaes-oaep",
                "submitted_by": "api:his",
            },
        ),
        outbound(EventType.MESSAGE_SENT, detail={"attempt": 1, "receipt": "sync"}),
        outbound(
            EventType.RECEIPT_RECEIVED,
            service="lab-results",
            detail={
                "disposition": "automatic-action/MDN-sent-automatically; processed",
                "mic": MIC,
                "mic_verified": True,
                "signer": SIGNER,
                "receipt_file": "/var/lib/medgw/receipts/sakura/1.mdn",
            },
        ),
        inbound(
            EventType.MESSAGE_RECEIVED,
            remote_address="192.0.2.17:50412",
            actor="peer:kita-lab",
            patient_ids=(patient,),
            detail={
                "content_type": "application/hl7-v2",
                "filename": "order-000001.hl7",
                "size": 4096,
                "sha256": "cd" * 32,
                "signer": SIGNER,
                "signer_roles": [{"role": "doctor", "oid": "1.2.392.100495.1.6.1.1"}],
                "digest": "sha256",
            },
        ),
        inbound(
            EventType.MESSAGE_DELIVERED,
            detail={"inbox_file": "/srv/medgw/inbox/kita-lab/order.hl7", "size": 0, "x": None},
        ),
        inbound(
            EventType.RECEIPT_SENT,
            detail={"disposition": "processed", "mic": MIC, "handover": "queued"},
        ),
        # Text JSON escapes, non-ASCII written as is, control characters, a float.
        outbound(
            EventType.MESSAGE_SEND_FAILED,
            Outcome.FAILURE,
            Severity.WARNING,
            reason='peer said "503" \\ try later\n\ttab \x00\x1f \u2028 患者 é \U0001f600',
            detail={"attempt": 3, "retry_in_seconds": 12.5, "ratio": 1e-7, "big": 10**20},
        ),
        # Keys that sort just before and after "hash", in the detail and beside it.
        AuditEvent(
            EventType.TASK_FAILED,
            Outcome.FAILURE,
            Severity.WARNING,
            actor="operator:o'brien <ob@example> & co (uid 1000)",
            remote_address="[2001:db8::1]:50000",
            reason="x",
            detail={
                "hash": "not the record's",
                "node": "n",
                "seq": -1,
                "prev": "0" * 64,
                "message_id": "m",
                "h": "",
                "hasg": 1,
                "hasi": 2,
                "nested": {"b": [1, {"z": False, "a": True}], "a": {"hash": "h"}},
            },
        ),
        # An alert, with whom to call; a long reason, clipped.
        AuditEvent(
            EventType.SIGNATURE_FAILED,
            Outcome.FAILURE,
            Severity.ALERT,
            peer="sakura",
            message_id="<m@x>",
            direction="inbound",
            reason="r" * 2100,
            call=("Dr. Tanaka (security) +81 3 0000 0000",),
        ),
        # No message: no message_id, so "node" follows "hash" directly.
        AuditEvent(EventType.DAEMON_STARTED, actor="medgw", detail={"version": "1.0"}),
        AuditEvent(EventType.DAEMON_STOPPED),
    ]


def _write(path: Path) -> bytes:
    log = AuditLog(path, TickingClock(datetime(2026, 12, 5, 1, 2, 3, 4, tzinfo=UTC)), node="N1")
    for event in _events()[:-2]:
        log.emit(event)
    log.emit_all(_events()[-2:])
    log.close()
    return path.read_bytes()


# Written by the log before its serialisation was made cheaper (chain.py, log.py).
EXPECTED = [
    (
        b'{"actor":"outbox:kita-lab (uid 1001)","detail":{"cipher":"aes256-gcm"'
        b',"content_type":"application/hl7-v2","digest":"sha256"'
        b',"filename":"order-000001.hl7","key_transport":"rsaes-oaep"'
        b',"mic":"Qm9ndXMgbWljIGZvciB0ZXN0cw0KAAAAAAAAAAAAAAA=, sha-256"'
        b',"sha256":"abababababababababababababababababababababababababababababababab"'
        b',"size":4096,"submitted_by":"api:his"},"direction":"outbound"'
        b',"event":"message.accepted"'
        b',"hash":"e7a51e42e565d4c164fd3183021be6a2686af80edea453ef0c45f0061fa4835e"'
        b',"message_id":"<00000001.0000000001ef@kita-lab.example>","node":"N1"'
        b',"outcome":"success","patient_ids":[{"authority":"1.2.392.200119.6.102.11310"'
        b',"id":"P-102938","source":"hl7v2","type":"MR"},{"id":"4711","source":"client"}]'
        b',"peer":"sakura"'
        b',"prev":"0000000000000000000000000000000000000000000000000000000000000000"'
        b',"seq":1,"service":"lab-results","severity":"info"'
        b',"time":"2026-12-05T01:02:03.001004+00:00"}'
    ),
    (
        b'{"detail":{"attempt":1,"receipt":"sync"},"direction":"outbound"'
        b',"event":"message.sent"'
        b',"hash":"1586b3e394d15323e9f1dc120315392922966d00fe01163ee514ec68cc1cd6f2"'
        b',"message_id":"<00000001.0000000001ef@kita-lab.example>","node":"N1"'
        b',"outcome":"success","peer":"sakura"'
        b',"prev":"e7a51e42e565d4c164fd3183021be6a2686af80edea453ef0c45f0061fa4835e"'
        b',"seq":2,"severity":"info","time":"2026-12-05T01:02:03.002004+00:00"}'
    ),
    (
        b'{"detail":{"disposition":"automatic-action/MDN-sent-automatically; processed"'
        b',"mic":"Qm9ndXMgbWljIGZvciB0ZXN0cw0KAAAAAAAAAAAAAAA=, sha-256"'
        b',"mic_verified":true,"receipt_file":"/var/lib/medgw/receipts/sakura/1.mdn"'
        b',"signer":"CN=sakura-hospital AS2 signing,O=Sakura Hospital,C=JP"}'
        b',"direction":"outbound","event":"receipt.received"'
        b',"hash":"2b4b450830f881f466fb0ef6a096027228d32f72df61727a221546b5d656a525"'
        b',"message_id":"<00000001.0000000001ef@kita-lab.example>","node":"N1"'
        b',"outcome":"success","peer":"sakura"'
        b',"prev":"1586b3e394d15323e9f1dc120315392922966d00fe01163ee514ec68cc1cd6f2"'
        b',"seq":3,"service":"lab-results","severity":"info"'
        b',"time":"2026-12-05T01:02:03.003004+00:00"}'
    ),
    (
        b'{"actor":"peer:kita-lab","detail":{"content_type":"application/hl7-v2"'
        b',"digest":"sha256","filename":"order-000001.hl7"'
        b',"sha256":"cdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcd"'
        b',"signer":"CN=sakura-hospital AS2 signing,O=Sakura Hospital,C=JP"'
        b',"signer_roles":[{"oid":"1.2.392.100495.1.6.1.1","role":"doctor"}],"size":4096}'
        b',"direction":"inbound","event":"message.received"'
        b',"hash":"4289ebb24d676260531b8a563adf70a7e7d7928ec80d84fd7a95379a24fde40a"'
        b',"message_id":"<00000001.0000000001ef@kita-lab.example>","node":"N1"'
        b',"outcome":"success","patient_ids":[{"authority":"1.2.392.200119.6.102.11310"'
        b',"id":"P-102938","source":"hl7v2","type":"MR"}],"peer":"kita-lab"'
        b',"prev":"2b4b450830f881f466fb0ef6a096027228d32f72df61727a221546b5d656a525"'
        b',"remote_address":"192.0.2.17:50412","seq":4,"severity":"info"'
        b',"time":"2026-12-05T01:02:03.004004+00:00"}'
    ),
    (
        b'{"detail":{"inbox_file":"/srv/medgw/inbox/kita-lab/order.hl7","size":0,"x":null}'
        b',"direction":"inbound","event":"message.delivered"'
        b',"hash":"3e2de3e5867b6df0d8d2f7992e4f12cf76b93add0a91a122de7d43cd2971fcc1"'
        b',"message_id":"<00000001.0000000001ef@kita-lab.example>","node":"N1"'
        b',"outcome":"success","peer":"kita-lab"'
        b',"prev":"4289ebb24d676260531b8a563adf70a7e7d7928ec80d84fd7a95379a24fde40a"'
        b',"seq":5,"severity":"info","time":"2026-12-05T01:02:03.005004+00:00"}'
    ),
    (
        b'{"detail":{"disposition":"processed","handover":"queued"'
        b',"mic":"Qm9ndXMgbWljIGZvciB0ZXN0cw0KAAAAAAAAAAAAAAA=, sha-256"}'
        b',"direction":"inbound","event":"receipt.sent"'
        b',"hash":"eff692cced9c8a5661e1aff5a9f343d7a0ce3aa3d6ac85f31f575d60260802f4"'
        b',"message_id":"<00000001.0000000001ef@kita-lab.example>","node":"N1"'
        b',"outcome":"success","peer":"kita-lab"'
        b',"prev":"3e2de3e5867b6df0d8d2f7992e4f12cf76b93add0a91a122de7d43cd2971fcc1"'
        b',"seq":6,"severity":"info","time":"2026-12-05T01:02:03.006004+00:00"}'
    ),
    (
        b'{"detail":{"attempt":3,"big":100000000000000000000,"ratio":1e-07'
        b',"retry_in_seconds":12.5},"direction":"outbound","event":"message.send_failed"'
        b',"hash":"c2935513a882f83ec2e4b953eeb8e1f6ebf95f502e4510b817b1bb9f54bb7876"'
        b',"message_id":"<00000001.0000000001ef@kita-lab.example>","node":"N1"'
        b',"outcome":"failure","peer":"sakura"'
        b',"prev":"eff692cced9c8a5661e1aff5a9f343d7a0ce3aa3d6ac85f31f575d60260802f4"'
        b',"reason":"peer said \\"503\\" \\\\ try later\\n\\ttab \\u0000\\u001f '
        + "\u2028 患者 é \U0001f600".encode()
        + b'","seq":7,"severity":"warning","time":"2026-12-05T01:02:03.007004+00:00"}'
    ),
    (
        b'{"actor":"operator:o\'brien <ob@example> & co (uid 1000)","detail":{"h":""'
        b',"hasg":1,"hash":"not the record\'s","hasi":2,"message_id":"m"'
        b',"nested":{"a":{"hash":"h"},"b":[1,{"a":true,"z":false}]},"node":"n"'
        b',"prev":"0000000000000000000000000000000000000000000000000000000000000000"'
        b',"seq":-1},"event":"daemon.task_failed"'
        b',"hash":"30abea6132c70ff476606068e5374e175c7fb06be17daecc4cf4e084773602a2"'
        b',"node":"N1","outcome":"failure"'
        b',"prev":"c2935513a882f83ec2e4b953eeb8e1f6ebf95f502e4510b817b1bb9f54bb7876"'
        b',"reason":"x","remote_address":"[2001:db8::1]:50000","seq":8,"severity":"warning"'
        b',"time":"2026-12-05T01:02:03.008004+00:00"}'
    ),
    (
        b'{"call":["Dr. Tanaka (security) +81 3 0000 0000"],"direction":"inbound"'
        b',"event":"signature.failed"'
        b',"hash":"b5290894a3e97ab085e3ad60d2abe913b187c47b4a7f090d9f3f9fbc46dabf36"'
        b',"message_id":"<m@x>","node":"N1","outcome":"failure","peer":"sakura"'
        b',"prev":"30abea6132c70ff476606068e5374e175c7fb06be17daecc4cf4e084773602a2"'
        b',"reason":"' + b"r" * 2000 + b'... [100 more characters]","seq":9,"severity":"alert"'
        b',"time":"2026-12-05T01:02:03.009004+00:00"}'
    ),
    (
        b'{"actor":"medgw","detail":{"version":"1.0"},"event":"daemon.started"'
        b',"hash":"5205b5af39ece3d14b6f3d9ae94eb0824b90c8207ec22a9cd0fdad4a79d7d263"'
        b',"node":"N1","outcome":"success"'
        b',"prev":"b5290894a3e97ab085e3ad60d2abe913b187c47b4a7f090d9f3f9fbc46dabf36"'
        b',"seq":10,"severity":"info","time":"2026-12-05T01:02:03.010004+00:00"}'
    ),
    (
        b'{"event":"daemon.stopped"'
        b',"hash":"b0f485e417fe32bf65cedf32848045727438b578bad5e4e9e4dc7dbc43048708"'
        b',"node":"N1","outcome":"success"'
        b',"prev":"5205b5af39ece3d14b6f3d9ae94eb0824b90c8207ec22a9cd0fdad4a79d7d263"'
        b',"seq":11,"severity":"info","time":"2026-12-05T01:02:03.010004+00:00"}'
    ),
]


def test_records_are_written_byte_for_byte_as_before(tmp_path: Path) -> None:
    written = _write(tmp_path / "audit.jsonl")
    assert written.endswith(b"\n")
    assert written.split(b"\n")[:-1] == EXPECTED


def test_each_line_is_the_canonical_form_and_hashes_without_its_hash(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    lines = _write(path).split(b"\n")[:-1]
    assert len(lines) == len(_events())
    prev = "0" * 64
    for seq, line in enumerate(lines, 1):
        record = json.loads(line)
        assert canonical(record) == line  # sorted keys, compact, UTF-8 as is
        claimed = record.pop("hash")
        assert (record["seq"], record["prev"], record["node"]) == (seq, prev, "N1")
        assert hashlib.sha256(canonical(record)).hexdigest() == claimed
        prev = claimed
    verify_chain(path)


# The export's frames of those records (syslog header, ATNA or FHIR body), as written
# before its formatting was made cheaper: the first 16 hex digits of each one's SHA-256.
FRAMES = {
    "atna": [
        "f097f85d35db2aef",
        "c8f4c5eb82a1873c",
        "7a1a2c6b98d10624",
        "3ebc3c8a0f0c3b32",
        "e2768165522066f0",
        "4e2b73d49026d72d",
        "1646a2e9930d3176",
        "f68dd66058dc737e",
        "dccecc7b105db6d3",
        "f12128ce05ae512c",
        "000178ce6b1748af",
    ],
    "fhir": [
        "f287fbaa7534c75a",
        "28dc2171b92c5b87",
        "a00a57da983544e5",
        "88495f4e290c544d",
        "ad4abd9fa2b6c8bd",
        "40bc4824f9a1277b",
        "48d485977667bc16",
        "3c904a3400361248",
        "744bf280f67c92e4",
        "2bb412c6a9a3e6c9",
        "07276eace16d4717",
    ],
}


def test_the_export_sends_the_records_as_before(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    _write(path)
    broken: list[Broken] = []
    reads = read_forward(path, Position(), 100, broken.append)
    assert not broken and len(reads) == len(_events())
    source = Source("N1", "Kita Lab")
    for message_format, encode in (("atna", atna_message), ("fhir", fhir_message)):
        frames = [
            octet_counted(
                syslog_message(
                    read.record,
                    encode(describe(read.record, source), source),
                    hostname="gw-1.example",
                    message_format=message_format,
                )
            )
            for read in reads
        ]
        digests = [hashlib.sha256(frame).hexdigest()[:16] for frame in frames]
        assert digests == FRAMES[message_format], frames


def test_a_flat_detail_is_cut_where_it_must_be() -> None:
    """A detail of plain short values is taken as it is; anything bounded() cuts is still
    cut: a long text, a long key, too many items, a key that is not a string."""
    flat = {"a": "x", "n": 1, "f": 0.5, "b": True, "none": None}
    assert bounded(flat) == flat
    long_text = bounded({"k": "x" * (MAX_TEXT + 1)})
    assert long_text == {"k": "x" * MAX_TEXT + "... [1 more characters]"}
    long_key = bounded({"k" * 201: 1})
    assert long_key == {"k" * 200 + "... [1 more characters]": 1}
    many = bounded({str(i): i for i in range(MAX_ITEMS + 1)})
    assert len(many) == MAX_ITEMS + 1 and many["..."] == "1 more items"
    assert bounded({1: "a", "b": [1, "c"]}) == {"1": "a", "b": [1, "c"]}
    record = AuditEvent(EventType.MESSAGE_SENT, detail={"k": "y" * (MAX_TEXT + 5)}).to_record(
        datetime(2026, 12, 5, tzinfo=UTC)
    )
    assert record["detail"]["k"].endswith("... [5 more characters]")


# Keys around "hash" (before, after, prefixes, case), and values of every JSON kind.
_keys = st.sampled_from(["hash ", "has", "hasg", "hasha", "hashz", "Hash", "h", "", "é", "~", "a"])
_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner),
    max_leaves=8,
)


@given(st.dictionaries(_keys | st.text(max_size=6), _values, max_size=8))
def test_the_line_is_serialised_once_as_it_would_be_twice(record: dict[str, Any]) -> None:
    """What the log hashes and writes equals the two serialisations it replaces: the
    record without its hash, hashed; the record with it, written."""
    record.pop("hash", None)
    digest, line = hashed_line(record)
    assert digest == hashlib.sha256(canonical(record)).hexdigest()
    assert line == canonical({**record, "hash": digest})
    assert (
        canonical(record)
        == json.dumps(record, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()
    )
