"""Crafted messages from a peer: the streaming reader refuses them with a
MalformedMessageError, in bounded stack, memory and time, and the file path
judges what the in-memory path judges."""

from __future__ import annotations

import base64
import io
from pathlib import Path

import pytest

from gateway.cms import sign, verify
from gateway.cms.decrypting import decrypt_stream
from gateway.cms.der import MAX_NESTING, StreamReader
from gateway.cms.stream import verify_entity_file
from gateway.errors import MalformedMessageError
from tests.helpers.cms_pki import SIGNING_TIME, STRICT, Pki, build_pki


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return build_pki(tmp_path_factory.mktemp("pki-hostile"))


AUTH_ENVELOPED = b"\x06\x0b\x2a\x86\x48\x86\xf7\x0d\x01\x09\x10\x01\x17"  # OID 1.2.840...1.23


def _decrypt_stream(data: bytes, pki: Pki) -> None:
    p = pki["rsa2048"]
    decrypt_stream(io.BytesIO(data), io.BytesIO(), p.cert, p.key, policy=STRICT)


def test_deeply_nested_indefinite_lengths_are_refused_not_a_stack_overflow(pki: Pki) -> None:
    depth = 3000
    nested = b"\x31\x80" * depth + b"\x00\x00" * depth
    with pytest.raises(MalformedMessageError, match=f"nested more than {MAX_NESTING} deep"):
        StreamReader(io.BytesIO(nested), "x").element()
    # where a peer would put it: the recipient infos of an AuthEnvelopedData
    message = b"\x30\x80" + AUTH_ENVELOPED + b"\xa0\x80\x30\x80\x02\x01\x00" + nested
    with pytest.raises(MalformedMessageError):
        _decrypt_stream(message + b"\x00\x00" * 3, pki)


def test_nested_octet_string_segments_are_bounded(pki: Pki) -> None:
    depth = 2000
    segments = b"\x24\x80" * depth + b"\x04\x01x" + b"\x00\x00" * depth
    reader = StreamReader(io.BytesIO(segments), "x")
    with pytest.raises(MalformedMessageError, match="nested more than"):
        reader.octets(lambda _chunk: None)


def test_endless_small_indefinite_elements_are_refused_early() -> None:
    """``30 80 00 00`` repeated: every byte and every element counts toward the limit."""
    endless = b"\x31\x80" + b"\x30\x80\x00\x00" * 300_000 + b"\x00\x00"
    with pytest.raises(MalformedMessageError, match="elements where a small one is expected"):
        StreamReader(io.BytesIO(endless), "x").element()
    small = b"\x31\x80" + b"\x30\x80\x00\x00" * 1000 + b"\x00\x00"
    with pytest.raises(MalformedMessageError, match="bytes where a small one is expected"):
        StreamReader(io.BytesIO(small), "x").element(limit=1000)
    assert StreamReader(io.BytesIO(small), "x").element() == small  # within limits: read whole


def test_a_carried_certificate_of_an_unknown_version_is_a_malformed_message(
    pki: Pki, tmp_path: Path
) -> None:
    p = pki["p256"]
    signed = sign(
        b"hello", p.cert, p.key, certificates=[p.cert], signing_time=SIGNING_TIME, policy=STRICT
    )
    v3 = b"\xa0\x03\x02\x01\x02"  # [0] EXPLICIT version: v3
    assert v3 in signed
    v4 = signed.replace(v3, b"\xa0\x03\x02\x01\x03", 1)
    with pytest.raises(MalformedMessageError, match="not a valid X509 version"):
        verify(v4, content=b"hello", trusted_signers=[p.cert], policy=STRICT)
    entity = tmp_path / "signed.eml"
    entity.write_bytes(_multipart_signed(b"hello", v4))
    with pytest.raises(MalformedMessageError, match="not a valid X509 version"):
        verify_entity_file(entity, tmp_path / "out", trusted_signers=[p.cert], policy=STRICT)


@pytest.mark.parametrize("part_type", [b"text/plain", None])
def test_the_file_path_refuses_a_signature_part_that_is_not_one(
    pki: Pki, tmp_path: Path, part_type: bytes | None
) -> None:
    p = pki["p256"]
    content = b"Content-Type: text/plain\r\n\r\nhello\r\n"
    signed = sign(content, p.cert, p.key, signing_time=SIGNING_TIME, policy=STRICT)
    entity = tmp_path / "signed.eml"
    entity.write_bytes(_multipart_signed(content, signed, part_type))
    with pytest.raises(MalformedMessageError, match="expected application/pkcs7-signature"):
        verify_entity_file(entity, tmp_path / "out", trusted_signers=[p.cert], policy=STRICT)


def _multipart_signed(
    content: bytes, signature: bytes, part_type: bytes | None = b"application/pkcs7-signature"
) -> bytes:
    typed = b"Content-Type: " + part_type + b"\r\n" if part_type else b""
    return (
        b'Content-Type: multipart/signed; protocol="application/pkcs7-signature"; '
        b'micalg=sha-256; boundary="b"\r\n\r\n'
        b"--b\r\n"
        + content
        + b"\r\n--b\r\n"
        + typed
        + b"Content-Transfer-Encoding: base64\r\n\r\n"
        + base64.encodebytes(signature)
        + b"\r\n--b--\r\n"
    )
