"""A hand-driven AS2 sender for negative tests: it can do what a broken or hostile peer does."""

from __future__ import annotations

import http.client
import ssl
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from gateway.as2.headers import new_message_id
from gateway.as2.message import MessageSpec, build_message
from gateway.config import KeyPair
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
) -> Answer:
    context = ssl.create_default_context(cafile=str(ca))
    context.load_cert_chain(str(client_cert), str(client_key))
    conn = http.client.HTTPSConnection("127.0.0.1", port, context=context, timeout=30)
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
