"""Building an outbound AS2 message (RFC 4130).

The payload becomes a MIME entity (binary transfer encoding: HL7 v2 bare CRs
arrive exactly as sent), is signed (``multipart/signed``, detached) and then
enveloped for the peer (``application/pkcs7-mime``).  The MIC the peer must
return in its receipt is the digest of the signed entity, headers included
(RFC 4130 section 7.3.1).

A document for one of the peer's services (a routing key agreed with it, see
the admin guide) names it in the signed entity's own header
``X-Medgw-Service``: inside the signature (and the MIC), so it cannot be
changed or added in transit, and invisible outside the encryption.  Other AS2
products ignore an unknown entity header, so a medgw peer is needed for the
service to mean anything at the receiving end.
"""

from __future__ import annotations

import base64
import hashlib
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from datetime import datetime
from email.utils import format_datetime
from pathlib import Path
from typing import BinaryIO

from cryptography import x509

from gateway.as2.headers import AS2_VERSION, DIGEST_TO_MICALG, quote_as2_id
from gateway.cms.common import hash_bytes
from gateway.cms.mime import make_entity
from gateway.cms.smime import envelope_entity, sign_entity
from gateway.cms.stream import CHUNK as STREAM_CHUNK
from gateway.cms.stream import sign_and_envelope_file
from gateway.fsutil import safe_name
from gateway.pki.keypair import KeyPair
from gateway.policy import AlgorithmPolicy


@dataclass(frozen=True)
class BuiltMessage:
    headers: tuple[tuple[str, str], ...]
    body: bytes
    mic: str  # "<base64>, sha-256"


SERVICE_HEADER = "X-Medgw-Service"


def entity_headers(
    filename: str, message_id: str, service: str | None = None
) -> list[tuple[str, str]]:
    name = safe_name(filename, message_id)
    return [
        ("Content-Transfer-Encoding", "binary"),
        ("Content-Disposition", f'attachment; filename="{name}"'),
        *([(SERVICE_HEADER, service)] if service else []),
    ]


def request_headers(
    *,
    message_id: str,
    sender_as2_id: str,
    receiver_as2_id: str,
    envelope_type: str,
    digest: str,
    at: datetime,
    receipt_url: str | None = None,
) -> tuple[tuple[str, str], ...]:
    asynchronous = (("Receipt-Delivery-Option", receipt_url),) if receipt_url else ()
    return (
        ("AS2-Version", AS2_VERSION),
        ("AS2-From", quote_as2_id(sender_as2_id)),
        ("AS2-To", quote_as2_id(receiver_as2_id)),
        ("Message-ID", message_id),
        ("Date", format_datetime(at, usegmt=True)),
        ("Subject", "medgw document"),
        ("MIME-Version", "1.0"),
        ("Content-Type", envelope_type),
        ("Content-Transfer-Encoding", "binary"),
        ("Content-Disposition", 'attachment; filename="smime.p7m"'),
        ("Disposition-Notification-To", quote_as2_id(sender_as2_id)),
        (
            "Disposition-Notification-Options",
            "signed-receipt-protocol=optional, pkcs7-signature; "
            f"signed-receipt-micalg=optional, {DIGEST_TO_MICALG[digest]}",
        ),
        *asynchronous,
    )


@dataclass(frozen=True)
class MessageSpec:
    """Everything an outbound AS2 message is made of, apart from the document."""

    filename: str
    content_type: str
    message_id: str
    sender_as2_id: str
    receiver_as2_id: str
    signing: KeyPair
    recipients: tuple[x509.Certificate, ...]
    digest: str
    cipher: str
    policy: AlgorithmPolicy
    at: datetime
    service: str | None = None
    receipt_url: str | None = None  # where the peer POSTs the receipt (None: in the answer)

    def entity_head(self, payload: bytes = b"") -> bytes:
        """The signed entity: MIME headers, then ``payload`` (b"": the headers only)."""
        return make_entity(
            self.content_type,
            payload,
            entity_headers(self.filename, self.message_id, self.service),
        )

    def headers(self, envelope_type: str) -> tuple[tuple[str, str], ...]:
        return request_headers(
            message_id=self.message_id,
            sender_as2_id=self.sender_as2_id,
            receiver_as2_id=self.receiver_as2_id,
            envelope_type=envelope_type,
            digest=self.digest,
            at=self.at,
            receipt_url=self.receipt_url,
        )


def build_message(payload: bytes, spec: MessageSpec) -> BuiltMessage:
    """A small document, signed and encrypted in memory."""
    entity = spec.entity_head(payload)
    # The MIC is the digest the signature's messageDigest holds: computed once.
    spec.policy.check_digest(spec.digest)
    entity_digest = hash_bytes(entity, spec.digest)
    mic = f"{base64.b64encode(entity_digest).decode('ascii')}, {DIGEST_TO_MICALG[spec.digest]}"
    signed = sign_entity(
        entity,
        spec.signing.certificate,
        spec.signing.key,
        digest=spec.digest,
        signing_time=spec.at,
        policy=spec.policy,
        certificates=spec.signing.chain,
        entity_digest=entity_digest,
    )
    envelope_type, body = envelope_entity(
        signed, spec.recipients, cipher=spec.cipher, policy=spec.policy
    )
    return BuiltMessage(spec.headers(envelope_type), body, mic)


@dataclass(frozen=True)
class BuiltFile:
    headers: tuple[tuple[str, str], ...]
    mic: str  # "<base64>, sha-256"
    size: int  # of the payload
    sha256: str  # of the payload (hex): what the audit trail links the document by


def build_message_file(
    payload: Path | Callable[[], BinaryIO],
    body: Path,
    spec: MessageSpec,
    *,
    writer: Callable[[Path, Iterable[bytes]], object] | None = None,
) -> BuiltFile:
    """:func:`build_message` for documents of any size: file in, AS2 body file out
    (or ``writer(body, chunks)`` stores it: see :func:`sign_and_envelope_file`).
    ``payload`` is the document's file, or opens it for reading (a document kept
    encrypted at rest).

    Memory use does not grow with the payload: the MIME entity (headers, then the
    payload in chunks) is streamed twice from the payload, once to sign, once to
    encrypt, by the streaming CMS engine; no plaintext copy of it is written.
    """
    opener = payload if callable(payload) else _file_opener(payload)
    head = spec.entity_head()
    size = 0
    digest = hashlib.sha256()
    counted = False

    def entity() -> Iterator[bytes]:
        # The document's digest and size, from the first pass read to its end.
        nonlocal size, digest, counted
        counting = not counted
        if counting:
            size, digest = 0, hashlib.sha256()
        yield head
        with opener() as handle:
            while chunk := handle.read(STREAM_CHUNK):
                if counting:
                    digest.update(chunk)
                    size += len(chunk)
                yield chunk
        counted = True

    sealed = sign_and_envelope_file(
        entity,
        body,
        signer_cert=spec.signing.certificate,
        signer_key=spec.signing.key,
        recipients=spec.recipients,
        digest=spec.digest,
        cipher=spec.cipher,
        certificates=spec.signing.chain,
        signing_time=spec.at,
        policy=spec.policy,
        durable=True,  # the spool records it as queued next, and drops the plaintext
        writer=writer,
    )
    mic = f"{sealed.mic}, {DIGEST_TO_MICALG[spec.digest]}"
    return BuiltFile(spec.headers(sealed.content_type), mic, size, digest.hexdigest())


def _file_opener(path: Path) -> Callable[[], BinaryIO]:
    def opener() -> BinaryIO:
        return path.open("rb")

    return opener
