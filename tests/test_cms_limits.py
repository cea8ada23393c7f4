"""Counts a message cannot exceed, and encodings that cannot make it expensive.

A real message has one signer, a short certificate chain, a handful of
attributes and one or two recipients (gateway.cms.limits says what the AS2
products we interoperate with send).  A message with more than the bound of
any of these is refused as malformed, before anything is built from the
elements counted: a signature with a hundred thousand SignerInfos costs
next to nothing to refuse.  And the encrypted content split into the smallest
BER segments decrypts at a cost linear in its size, to the same plaintext.
"""

from __future__ import annotations

import io
import json
import random
import time
import tracemalloc
from pathlib import Path

import pytest

from gateway.audit import AuditEvent, EventType
from gateway.cms import decrypt, encrypt, verify
from gateway.cms.decrypting import decrypt_file
from gateway.cms.der import DerError, joined_octet_strings
from gateway.cms.limits import (
    MAX_ATTRIBUTE_VALUES,
    MAX_ATTRIBUTES,
    MAX_CERTIFICATES,
    MAX_DIGEST_ALGORITHMS,
    MAX_MIME_HEADERS,
    MAX_RECIPIENT_INFOS,
    MAX_SIGNER_INFOS,
    TooMany,
)
from gateway.cms.mime import parse_entity
from gateway.cms.signed_read import parse_signed_data_der
from gateway.cms.smime import verify_entity
from gateway.errors import MalformedMessageError
from gateway.logs import make_logger
from gateway.textbounds import MAX_ITEMS, MAX_TEXT
from tests.helpers.cms_pki import STRICT, Pki, build_pki
from tests.helpers.der_shapes import content_info_der, der_elements, der_tlv, enveloped_parts
from tests.helpers.openssl_cms import PAYLOAD, openssl_encrypted, openssl_signed


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return build_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="module")
def signed(pki: Pki, tmp_path_factory: pytest.TempPathFactory) -> bytes:
    return openssl_signed(pki, tmp_path_factory.mktemp("sign"), "rsa2048")


@pytest.fixture(scope="module")
def enveloped(pki: Pki, tmp_path_factory: pytest.TempPathFactory) -> bytes:
    return openssl_encrypted(pki, tmp_path_factory.mktemp("env"), "rsa2048", "-aes-256-gcm")


def _verify(message: bytes, pki: Pki) -> bytes:
    return verify(message, trusted_signers=[pki["rsa2048"].cert], policy=STRICT).content


def _with_signer_infos(signed: bytes, count: int) -> bytes:
    oid, _, elements = enveloped_parts(signed)
    [(_, _, whole)] = der_elements(elements[-1][1])
    parts = [e for _, _, e in elements[:-1]] + [der_tlv(0x31, whole * count)]
    return content_info_der(oid, 0x30, parts)


def _with_certificates(signed: bytes, count: int) -> bytes:
    oid, _, elements = enveloped_parts(signed)
    [index] = [i for i, (tag, _, _) in enumerate(elements) if tag == 0xA0]
    certificate = der_elements(elements[index][1])[0][2]
    parts = [e for _, _, e in elements]
    parts[index] = der_tlv(0xA0, certificate * count)
    return content_info_der(oid, 0x30, parts)


def _with_signer(signed: bytes, change: object) -> bytes:
    oid, _, elements = enveloped_parts(signed)
    [(_, signer, _)] = der_elements(elements[-1][1])
    fields = der_elements(signer)
    new = change(fields)  # type: ignore[operator]
    parts = [e for _, _, e in elements[:-1]] + [der_tlv(0x31, der_tlv(0x30, new))]
    return content_info_der(oid, 0x30, parts)


UNKNOWN_ATTRIBUTE_OID = der_tlv(
    0x06, bytes.fromhex("2b0601040182c9510101")
)  # 1.3.6.1.4.1.42193.1.1


def _attributes(count: int, values: int = 1) -> bytes:
    one = der_tlv(0x30, UNKNOWN_ATTRIBUTE_OID + der_tlv(0x31, der_tlv(0x05, b"") * values))
    return one * count


def _refused(message: bytes, pki: Pki, what: str) -> TooMany:
    started = time.process_time()
    with pytest.raises(TooMany) as refused:
        _verify(message, pki)
    assert time.process_time() - started < 5  # refused before anything is built or checked
    assert what in refused.value.message
    return refused.value


def test_signer_infos_beyond_the_bound_are_refused_unread(signed: bytes, pki: Pki) -> None:
    assert _verify(_with_signer_infos(signed, MAX_SIGNER_INFOS), pki) == PAYLOAD
    _refused(_with_signer_infos(signed, MAX_SIGNER_INFOS + 1), pki, "signer infos")
    huge = _with_signer_infos(signed, 100_000)  # ~40 MB of them
    tracemalloc.start()
    try:
        refusal = _refused(huge, pki, f"more than {MAX_SIGNER_INFOS} signer infos")
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 16 << 20  # far below the message itself: nothing was built
    assert len(str(refusal)) < 500


def test_certificates_beyond_the_bound_are_refused(signed: bytes, pki: Pki) -> None:
    assert _verify(_with_certificates(signed, MAX_CERTIFICATES), pki) == PAYLOAD
    _refused(_with_certificates(signed, MAX_CERTIFICATES + 1), pki, "certificates")


def test_attributes_and_their_values_beyond_the_bound_are_refused(signed: bytes, pki: Pki) -> None:
    def unsigned(count: int, values: int = 1) -> object:
        return lambda fields: (
            b"".join(f[2] for f in fields) + der_tlv(0xA1, _attributes(count, values))
        )

    def signed_attributes(count: int) -> object:
        def change(fields: list[tuple[int, bytes, bytes]]) -> bytes:
            attrs = der_tlv(0xA0, fields[3][1] + _attributes(count))
            return b"".join(f[2] for f in fields[:3]) + attrs + b"".join(f[2] for f in fields[4:])

        return change

    # within the bounds: read (the unsigned ones are outside the signature: it verifies)
    assert _verify(_with_signer(signed, unsigned(MAX_ATTRIBUTES, MAX_ATTRIBUTE_VALUES)), pki)
    _refused(_with_signer(signed, unsigned(MAX_ATTRIBUTES + 1)), pki, "unsigned attributes")
    _refused(_with_signer(signed, signed_attributes(MAX_ATTRIBUTES)), pki, "signed attributes")
    _refused(
        _with_signer(signed, unsigned(1, MAX_ATTRIBUTE_VALUES + 1)), pki, "values of one attribute"
    )


def _with_digest_algorithms(signed: bytes, count: int) -> bytes:
    oid, _, elements = enveloped_parts(signed)
    [index] = [i for i, (tag, _, _) in enumerate(elements) if tag == 0x31][:1]
    first = der_elements(elements[index][1])[0][2]
    parts = [e for _, _, e in elements]
    parts[index] = der_tlv(0x31, first * count)
    return content_info_der(oid, 0x30, parts)


def _with_signed_attribute_values(values: int) -> object:
    def change(fields: list[tuple[int, bytes, bytes]]) -> bytes:
        attrs = der_tlv(0xA0, fields[3][1] + _attributes(1, values))
        return b"".join(f[2] for f in fields[:3]) + attrs + b"".join(f[2] for f in fields[4:])

    return change


def test_the_direct_reader_reads_up_to_each_bound_and_refuses_beyond_it(
    signed: bytes, pki: Pki
) -> None:
    """The signature of the common shape is read without a counting walk of its own: the
    direct reader counts as it reads.  At each bound it reads the signature; one more and
    it leaves it to the counting path, which refuses it, naming what is too many."""
    for build, at_bound, what in (
        (_with_digest_algorithms, MAX_DIGEST_ALGORITHMS, "digest algorithms"),
        (_with_certificates, MAX_CERTIFICATES, "certificates"),
        (_with_signer_infos, MAX_SIGNER_INFOS, "signer infos"),
        (
            lambda s, n: _with_signer(s, _with_signed_attribute_values(n)),
            MAX_ATTRIBUTE_VALUES,
            "values of one attribute",
        ),
    ):
        assert parse_signed_data_der(build(signed, at_bound)).signers
        beyond = build(signed, at_bound + 1)
        with pytest.raises(DerError):
            parse_signed_data_der(beyond)
        _refused(beyond, pki, what)
    assert _verify(_with_digest_algorithms(signed, MAX_DIGEST_ALGORITHMS), pki) == PAYLOAD


def _with_recipients(enveloped: bytes, count: int) -> bytes:
    oid, tag, elements = enveloped_parts(enveloped)
    [index] = [i for i, (t, _, _) in enumerate(elements) if t == 0x31]
    first = der_elements(elements[index][1])[0][2]
    parts = [e for _, _, e in elements]
    parts[index] = der_tlv(0x31, first * count)
    return content_info_der(oid, tag, parts)


def test_recipient_infos_beyond_the_bound_are_refused_in_memory_and_from_a_file(
    enveloped: bytes, pki: Pki, tmp_path: Path
) -> None:
    p = pki["rsa2048"]
    assert decrypt(_with_recipients(enveloped, MAX_RECIPIENT_INFOS), p.cert, p.key, policy=STRICT)
    for count in (MAX_RECIPIENT_INFOS + 1, 50_000):
        message = _with_recipients(enveloped, count)
        with pytest.raises(TooMany, match="recipient infos"):
            decrypt(message, p.cert, p.key, policy=STRICT)
        src = tmp_path / "message.p7m"
        src.write_bytes(message)
        with pytest.raises(MalformedMessageError, match=r"recipient infos|a small one"):
            decrypt_file(src, tmp_path / "out", p.cert, p.key, policy=STRICT)


def test_mime_headers_and_signed_parts_beyond_the_bound_are_refused() -> None:
    headers = b"".join(b"X-H%d: v\r\n" % i for i in range(MAX_MIME_HEADERS))
    assert len(parse_entity(headers + b"\r\nbody")[0]) == MAX_MIME_HEADERS
    with pytest.raises(TooMany, match="MIME header lines"):
        parse_entity(headers + b"X-One-More: v\r\n\r\nbody")
    many = b"".join(b"--b\r\nx\r\n" for _ in range(200_000)) + b"--b--\r\n"
    entity = b'Content-Type: multipart/signed; boundary="b"\r\n\r\n' + many
    with pytest.raises(MalformedMessageError, match="exactly 2 parts"):
        verify_entity(entity, trusted_signers=[], policy=STRICT)


def _segmented(enveloped: bytes, lengths: object) -> bytes:
    """``enveloped`` with its encrypted content split into segments of ``lengths()`` bytes."""
    oid, tag, elements = enveloped_parts(enveloped)
    [index] = [
        i
        for i, (t, contents, _) in enumerate(elements)
        if t == 0x30 and len(der_elements(contents)) == 3 and der_elements(contents)[2][0] == 0x80
    ]
    content_type, algorithm, (_, encrypted, _) = der_elements(elements[index][1])
    pieces = bytearray()
    pos = 0
    while pos < len(encrypted):
        n = lengths()  # type: ignore[operator]
        pieces += der_tlv(0x04, encrypted[pos : pos + n])
        pos += n
    info = der_tlv(0x30, content_type[2] + algorithm[2] + b"\xa0\x80" + pieces + b"\x00\x00")
    parts = [info if i == index else whole for i, (_, _, whole) in enumerate(elements)]
    return content_info_der(oid, tag, parts)


@pytest.mark.parametrize("shape", ["1-byte", "1-to-3-bytes", "mixed"])
def test_the_smallest_segments_decrypt_to_the_same_plaintext(
    pki: Pki, tmp_path: Path, shape: str
) -> None:
    rng = random.Random(7)
    lengths = {
        "1-byte": lambda: 1,
        "1-to-3-bytes": lambda: rng.randint(1, 3),
        "mixed": lambda: rng.choice([1, 1, 1, 2, 200, 5000]),
    }[shape]
    payload = PAYLOAD * 3000  # 240 kB
    p = pki["rsa2048"]
    reference = encrypt(payload, [p.cert], cipher="aes-256-gcm", policy=STRICT)
    message = _segmented(reference, lengths)
    assert decrypt(message, p.cert, p.key, policy=STRICT).content == payload
    given, dst = tmp_path / "given.p7m", tmp_path / "plain"
    given.write_bytes(message)
    decrypt_file(given, dst, p.cert, p.key, policy=STRICT)
    assert dst.read_bytes() == payload


def test_an_attached_content_in_the_smallest_segments_verifies(signed: bytes, pki: Pki) -> None:
    oid, _, elements = enveloped_parts(signed)
    content_type, (_, explicit, _) = der_elements(elements[2][1])
    [(_, content, _)] = der_elements(explicit)
    pieces = b"".join(der_tlv(0x04, content[i : i + 1]) for i in range(len(content)))
    encap = der_tlv(0x30, content_type[2] + der_tlv(0xA0, b"\x24\x80" + pieces + b"\x00\x00"))
    parts = [encap if i == 2 else whole for i, (_, _, whole) in enumerate(elements)]
    message = content_info_der(oid, 0x30, parts)
    assert _verify(message, pki) == PAYLOAD
    # and 300 000 segments, more than the reader's element budget, are joined in bulk
    many = b"\x24\x80" + b"\x04\x01x" * 300_000 + b"\x00\x00"
    assert joined_octet_strings(many) == b"\x04\x83" + (300_000).to_bytes(3, "big") + b"x" * 300_000


def test_audit_records_and_log_lines_are_bounded_whatever_is_put_in_them() -> None:
    record = AuditEvent(
        EventType.MESSAGE_REJECTED,
        message_id="<" + "m" * 100_000 + ">",
        reason="r" * 6_000_000,
        detail={"recipients": ["x" * 50] * 50_000, "nested": {"deep": "d" * 10_000}},
    ).to_record(__import__("datetime").datetime.now())
    text = json.dumps(record)
    assert len(text) < 40_000
    assert record["reason"].endswith(f"[{6_000_000 - MAX_TEXT} more characters]")
    assert len(record["detail"]["recipients"]) == MAX_ITEMS + 1
    stream = io.StringIO()
    make_logger(stream=stream).warning("message.rejected", reason="r" * 6_000_000)
    line = stream.getvalue()
    assert len(line) < MAX_TEXT + 500
    assert json.loads(line)["reason"].startswith("rrr")


@pytest.mark.parametrize("mib", [1, 17])
def test_a_form_verified_in_memory_is_so_only_up_to_its_bound(
    pki: Pki, tmp_path: Path, mib: int
) -> None:
    """Line endings converted in transit: verified in memory (several copies of the
    entity at once), so only up to MAX_IN_MEMORY_ENTITY."""
    from datetime import UTC, datetime

    from gateway.cms.limits import MAX_IN_MEMORY_ENTITY
    from gateway.cms.mime import make_entity
    from gateway.cms.smime import sign_entity
    from gateway.cms.stream import verify_entity_span
    from gateway.errors import SignatureError

    p = pki["p256"]
    content = (b"x" * 70 + b"\r\n") * ((mib << 20) // 72)
    signed = sign_entity(
        make_entity("text/plain", content),
        p.cert,
        p.key,
        digest="sha256",
        signing_time=datetime.now(UTC),
        policy=STRICT,
    )
    src = tmp_path / "signed"
    src.write_bytes(signed.replace(b"\r\n", b"\n"))  # converted in transit
    tracemalloc.start()
    try:
        if mib << 20 < MAX_IN_MEMORY_ENTITY:
            verify_entity_span(src, tmp_path / "spill", trusted_signers=[p.cert], policy=STRICT)
        else:
            with pytest.raises(SignatureError, match="line-ending"):
                verify_entity_span(src, tmp_path / "spill", trusted_signers=[p.cert], policy=STRICT)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 12 * min(mib << 20, MAX_IN_MEMORY_ENTITY) + (8 << 20)


def test_the_inspection_and_decompression_tools_are_bounded_too(
    signed: bytes, enveloped: bytes
) -> None:
    """``medgw smime inspect`` and the CompressedData reader read with asn1crypto: the
    counts are checked and segments joined before it builds anything."""
    from gateway.cms.compressed import compress, decompress
    from gateway.cms.inspect import describe

    with pytest.raises(TooMany, match="signer infos"):
        describe(_with_signer_infos(signed, 100_000))
    with pytest.raises(TooMany, match="recipient infos"):
        describe(_with_recipients(enveloped, MAX_RECIPIENT_INFOS + 1))
    with pytest.raises(TooMany):  # too many elements for the join, even before they are counted
        describe(_with_recipients(enveloped, 50_000))
    assert describe(_with_signer_infos(signed, 2))[0].startswith("CMS signed_data")
    # a CompressedData whose compressed octets come in 1-byte segments
    oid, _, elements = enveloped_parts(compress(PAYLOAD * 100))
    content_type, (_, explicit, _) = der_elements(elements[2][1])
    [(_, octets, _)] = der_elements(explicit)
    pieces = b"".join(der_tlv(0x04, octets[i : i + 1]) for i in range(len(octets)))
    encap = der_tlv(0x30, content_type[2] + der_tlv(0xA0, b"\x24\x80" + pieces + b"\x00\x00"))
    parts = [encap if i == 2 else whole for i, (_, _, whole) in enumerate(elements)]
    tracemalloc.start()
    try:
        assert decompress(content_info_der(oid, 0x30, parts)) == PAYLOAD * 100
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 4 << 20
