"""A hand-driven AS2 sender for negative tests: it can do what a broken or hostile peer does."""

from __future__ import annotations

import http.client
import ssl
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from gateway.as2.headers import new_message_id
from gateway.as2.message import MessageSpec, build_message
from gateway.pki.keypair import KeyPair
from gateway.policy import AlgorithmPolicy


def load_pair(cert: Path, key: Path) -> KeyPair:
    certificate = x509.load_pem_x509_certificate(cert.read_bytes())
    private = serialization.load_pem_private_key(key.read_bytes(), password=None)
    return KeyPair(cert, key, certificate, private)  # type: ignore[arg-type]


@dataclass(frozen=True)
class Answer:
    status: int
    content_type: str
    body: bytes


def post(
    port: int,
    headers: tuple[tuple[str, str], ...],
    body: bytes,
    *,
    client_cert: Path,
    client_key: Path,
    ca: Path,
    timeout: float = 30,
) -> Answer:
    context = ssl.create_default_context(cafile=str(ca))
    context.load_cert_chain(str(client_cert), str(client_key))
    conn = http.client.HTTPSConnection("127.0.0.1", port, context=context, timeout=timeout)
    try:
        conn.putrequest("POST", "/as2")
        for name, value in headers:
            conn.putheader(name, value)
        conn.putheader("Content-Length", str(len(body)))
        conn.endheaders()
        conn.send(body)
        response = conn.getresponse()
        return Answer(response.status, response.getheader("Content-Type", ""), response.read())
    finally:
        conn.close()


def build(
    payload: bytes,
    *,
    sender_as2: str,
    receiver_as2: str,
    signing: KeyPair,
    recipient: x509.Certificate,
    filename: str = "doc.bin",
    cipher: str = "aes-256-gcm",
    message_id: str | None = None,
    service: str | None = None,
):
    return build_message(
        payload,
        MessageSpec(
            filename=filename,
            content_type="application/octet-stream",
            message_id=message_id or new_message_id(sender_as2),
            sender_as2_id=sender_as2,
            receiver_as2_id=receiver_as2,
            signing=signing,
            recipients=(recipient,),
            digest="sha256",
            cipher=cipher,
            policy=AlgorithmPolicy(),
            at=datetime.now(UTC),
            service=service,
        ),
    )


def build_tampered(
    payload: bytes,
    *,
    sender_as2: str,
    receiver_as2: str,
    signing: KeyPair,
    recipient: x509.Certificate,
) -> tuple[tuple[tuple[str, str], ...], bytes]:
    """A message whose signed content was changed after signing, then encrypted properly."""
    from gateway.cms.mime import make_entity
    from gateway.cms.smime import envelope_entity, sign_entity

    policy = AlgorithmPolicy()
    entity = make_entity(
        "application/octet-stream", payload, [("Content-Transfer-Encoding", "binary")]
    )
    signed = sign_entity(
        entity,
        signing.certificate,
        signing.key,
        digest="sha256",
        signing_time=datetime.now(UTC),
        policy=policy,
    )
    assert payload in signed
    tampered = signed.replace(payload, payload[:-1] + bytes([payload[-1] ^ 0x01]))
    content_type, body = envelope_entity(
        tampered, (recipient,), cipher="aes-256-gcm", policy=policy
    )
    reference = build(
        payload,
        sender_as2=sender_as2,
        receiver_as2=receiver_as2,
        signing=signing,
        recipient=recipient,
    )
    headers = tuple((k, content_type if k == "Content-Type" else v) for k, v in reference.headers)
    return headers, body


def _tlv(tag: int, content: bytes) -> bytes:
    n = len(content)
    if n < 0x80:
        return bytes([tag, n]) + content
    size = n.to_bytes((n.bit_length() + 7) // 8, "big")
    return bytes([tag, 0x80 | len(size)]) + size + content


def resegmented(body: bytes, lengths: Callable[[], int], *, spoil_tag: bool = False) -> bytes:
    """The AuthEnvelopedData ``body`` (DER, as medgw sends it) with its encrypted content
    re-encoded as a constructed OCTET STRING of indefinite length, in segments of
    ``lengths()`` bytes each: legal BER, the same plaintext.  ``spoil_tag``: the GCM
    tag altered, so that the message costs its whole decryption and is then refused."""
    from gateway.cms.der import contents_of

    info = contents_of(body, 0x30)
    oid = info.raw(0x06)
    explicit = info.inner(0xA0)
    data = explicit.inner(0x30)
    version, recipients = data.raw(0x02), data.raw(0x31)
    content_info = data.inner(0x30)
    content_type, algorithm = content_info.raw(0x06), content_info.raw(0x30)
    encrypted = content_info.value(0x80)
    mac = bytearray(data.value(0x04))
    if spoil_tag:
        mac[-1] ^= 0x01
    segments = bytearray()
    pos = 0
    while pos < len(encrypted):
        n = max(1, lengths())
        segments += _tlv(0x04, encrypted[pos : pos + n])
        pos += n
    constructed = b"\xa0\x80" + segments + b"\x00\x00"
    inner = _tlv(0x30, content_type + algorithm + constructed)
    rebuilt = _tlv(0x30, version + recipients + inner + _tlv(0x04, bytes(mac)))
    return _tlv(0x30, oid + _tlv(0xA0, rebuilt))


def repeated(message: bytes, field: int, count: int) -> bytes:
    """The DER ContentInfo ``message`` (SignedData, EnvelopedData...) with the first
    element of the SET that is its content's ``field``-th field (-1: the last) repeated
    ``count`` times: each one still valid, only their number is hostile."""
    from gateway.cms.der import contents_of

    info = contents_of(message, 0x30)
    oid = info.raw(0x06)
    data = info.inner(0xA0).inner(0x30)
    fields = []
    while not data.at_end():
        fields.append(data.raw(data.peek()))
    elements = contents_of(fields[field], 0x31)
    fields[field] = _tlv(0x31, elements.raw(elements.peek()) * count)
    return _tlv(0x30, oid + _tlv(0xA0, _tlv(0x30, b"".join(fields))))


def with_signer_infos(signature: bytes, count: int) -> bytes:
    """A ContentInfo(SignedData) with its SignerInfo repeated ``count`` times."""
    return repeated(signature, -1, count)


def signed_with_altered_signature(
    entity: bytes, alter: Callable[[bytes], bytes], signing: KeyPair
) -> bytes:
    """``entity`` signed (multipart/signed), its detached signature (DER) then changed by
    ``alter``."""
    import base64

    from gateway.cms.mime import header_param, parse_entity
    from gateway.cms.smime import sign_entity, split_multipart

    signed = sign_entity(
        entity,
        signing.certificate,
        signing.key,
        digest="sha256",
        signing_time=datetime.now(UTC),
        policy=AlgorithmPolicy(),
    )
    headers, body = parse_entity(signed)
    boundary = header_param(dict(headers)["Content-Type"], "boundary")
    assert boundary
    (content, _), (signature_part, _) = split_multipart(body, boundary)
    signature_headers, encoded = parse_entity(signature_part)
    altered = base64.encodebytes(alter(base64.b64decode(b"".join(encoded.split()))))
    part = b"".join(f"{k}: {v}\r\n".encode() for k, v in signature_headers) + b"\r\n" + altered
    delimiter = b"--" + boundary.encode()
    return b"".join(
        (
            signed[: len(signed) - len(body)],
            delimiter + b"\r\n" + content + b"\r\n",
            delimiter + b"\r\n" + part + b"\r\n",
            delimiter + b"--\r\n",
        )
    )


def build_with_signature(
    payload: bytes,
    alter: Callable[[bytes], bytes],
    *,
    sender_as2: str,
    receiver_as2: str,
    signing: KeyPair,
    recipient: x509.Certificate,
) -> tuple[tuple[tuple[str, str], ...], bytes]:
    """A message signed and encrypted properly, whose detached signature (DER) was
    changed by ``alter`` before encryption."""
    from gateway.cms.mime import make_entity
    from gateway.cms.smime import envelope_entity

    entity = make_entity("application/octet-stream", payload)
    signed = signed_with_altered_signature(entity, alter, signing)
    content_type, envelope = envelope_entity(
        signed, (recipient,), cipher="aes-256-gcm", policy=AlgorithmPolicy()
    )
    reference = build(
        payload,
        sender_as2=sender_as2,
        receiver_as2=receiver_as2,
        signing=signing,
        recipient=recipient,
    )
    message_headers = tuple(
        (k, content_type if k == "Content-Type" else v) for k, v in reference.headers
    )
    return message_headers, envelope
