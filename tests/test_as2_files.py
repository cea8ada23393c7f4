"""File-based AS2 build and receive: the same bytes as the in-memory path, any size."""

from __future__ import annotations

import base64
import hashlib
import os
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from gateway.as2.entity import payload_chunks, payload_digest, read_entity_info
from gateway.as2.message import BuiltFile, MessageSpec, build_message, build_message_file
from gateway.cms.decrypting import decrypt_bytes, decrypt_file
from gateway.cms.mime import make_entity
from gateway.cms.stream import open_and_verify_file, verify_entity_span
from gateway.config import GatewayConfig, load_config
from gateway.errors import ProtocolError
from gateway.fsutil import PARTIAL, remove_stale_partials
from gateway.pki.demo import DemoLayout
from gateway.policy import AlgorithmPolicy


def _build(
    lab: GatewayConfig, payload: Path, body: Path, filename: str, content_type: str
) -> BuiltFile:
    """The lab's AS2 message for the hospital, as the daemon builds it."""
    return build_message_file(payload, body, _spec(lab, filename, content_type))


def _spec(lab: GatewayConfig, filename: str, content_type: str, **more: Any) -> MessageSpec:
    return MessageSpec(
        filename=filename,
        content_type=content_type,
        message_id="<m1@KITA-LAB>",
        sender_as2_id="KITA-LAB",
        receiver_as2_id="SAKURA-HOSPITAL",
        signing=lab.smime.signing,
        recipients=lab.require_peer("hospital").encryption_certificates,
        digest="sha256",
        cipher="aes-256-gcm",
        policy=AlgorithmPolicy(),
        at=datetime.now(UTC),
        **more,
    )


@pytest.mark.parametrize("size", [0, 1, 4096, 3 * 1024 * 1024 + 7])
def test_built_file_opens_to_the_same_document_and_mic(
    layout: DemoLayout, tmp_path: Path, size: int
) -> None:
    lab = load_config(layout.lab.config_path)
    hospital = load_config(layout.hospital.config_path)
    payload = tmp_path / "payload"
    data = os.urandom(size)
    payload.write_bytes(data)
    body = tmp_path / "body.as2"
    built = _build(lab, payload, body, "../../etc/x.dcm", "application/dicom")
    assert built.size == size
    assert dict(built.headers)["Message-ID"] == "<m1@KITA-LAB>"
    leftovers = [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]
    assert leftovers == []  # the plaintext entity was removed
    entity = tmp_path / "entity"
    opened = open_and_verify_file(
        body,
        entity,
        cert=hospital.smime.encryption.certificate,
        key=hospital.smime.encryption.key,
        trusted_signers=hospital.require_peer("lab").signing_certificates,
        policy=AlgorithmPolicy(),
        mic_digest="sha256",
    )
    assert built.mic == f"{opened.mic}, sha-256"
    info = read_entity_info(entity)
    assert info.content_type == "application/dicom"
    assert info.filename == "x.dcm"  # reduced to a safe name by the sender already
    assert b"".join(payload_chunks(entity, info)) == data
    assert payload_digest(entity, info) == (size, hashlib.sha256(data).hexdigest())


@pytest.mark.parametrize("held", ["file", "memory"])
@pytest.mark.parametrize("encoding", ["binary", "base64"])
@pytest.mark.parametrize("size", [0, 4096, 3 * 1024 * 1024 + 7])
def test_the_verified_document_is_read_inside_the_decrypted_file_not_copied(
    layout: DemoLayout, tmp_path: Path, size: int, encoding: str, held: str
) -> None:
    """The receiver reads the document from the first part of the decrypted
    multipart/signed where it is: no copy, and not a byte of what follows it."""
    lab = load_config(layout.lab.config_path)
    hospital = load_config(layout.hospital.config_path)
    data = os.urandom(size)
    if encoding == "base64":  # a signed entity as another product may send it
        from gateway.cms.smime import sign_entity

        entity = make_entity(
            "application/pdf", base64.encodebytes(data), [("Content-Transfer-Encoding", "base64")]
        )
        signed_bytes = sign_entity(
            entity,
            lab.smime.signing.certificate,
            lab.smime.signing.key,
            signing_time=datetime.now(UTC),
            policy=AlgorithmPolicy(),
        )
    else:
        payload = tmp_path / "payload"
        payload.write_bytes(data)
        built = _build(lab, payload, tmp_path / "body.as2", "scan.pdf", "application/pdf")
        assert built.size == size
        keys = (hospital.smime.encryption.certificate, hospital.smime.encryption.key)
        from_file = decrypt_file(
            tmp_path / "body.as2", tmp_path / "signed", *keys, policy=AlgorithmPolicy()
        )
        signed_bytes = (tmp_path / "signed").read_bytes()
        # A small body is decrypted in memory by the same reader: the same bytes.
        in_memory, from_memory = decrypt_bytes(
            (tmp_path / "body.as2").read_bytes(), *keys, policy=AlgorithmPolicy()
        )
        assert in_memory == signed_bytes and from_memory == from_file
    signed = tmp_path / "signed"
    signed.write_bytes(signed_bytes)
    spill = tmp_path / "spill"
    source: Path | bytes = signed if held == "file" else signed_bytes

    verified, span, mic = verify_entity_span(
        source,
        spill,
        trusted_signers=hospital.require_peer("lab").signing_certificates,
        policy=AlgorithmPolicy(),
        mic_digest="sha256",
    )
    assert verified.signer == lab.smime.signing.certificate
    assert span.path == source and not spill.exists()  # read in place
    assert span.end < len(signed_bytes)  # the signature part follows, unread
    entity_bytes = signed_bytes[span.start : span.end]
    assert mic == base64.b64encode(hashlib.sha256(entity_bytes).digest()).decode()
    info = read_entity_info(span.path, span.start, span.end)
    assert info.content_type == "application/pdf"
    assert b"".join(payload_chunks(span.path, info)) == data
    assert payload_digest(span.path, info) == (size, hashlib.sha256(data).hexdigest())


def test_base64_documents_are_decoded_in_chunks(tmp_path: Path) -> None:
    data = os.urandom(2 * 1024 * 1024 + 3)
    encoded = base64.encodebytes(data)  # 76-character lines, as other AS2 products send
    entity = tmp_path / "entity"
    entity.write_bytes(
        make_entity("application/pdf", encoded, [("Content-Transfer-Encoding", "base64")])
    )
    info = read_entity_info(entity)
    assert info.encoding == "base64"
    assert b"".join(payload_chunks(entity, info)) == data


def test_broken_base64_and_unknown_encodings_are_refused(tmp_path: Path) -> None:
    entity = tmp_path / "entity"
    entity.write_bytes(
        make_entity("text/plain", b"abcde", [("Content-Transfer-Encoding", "base64")])
    )
    with pytest.raises(ProtocolError, match="declared base64"):
        b"".join(payload_chunks(entity, read_entity_info(entity)))
    entity.write_bytes(
        make_entity("text/plain", b"x", [("Content-Transfer-Encoding", "x-uuencode")])
    )
    with pytest.raises(ProtocolError, match="x-uuencode"):
        read_entity_info(entity)


def _large_document(tmp_path: Path) -> tuple[Path, Path]:
    """A document too large to be sealed in memory, and an empty folder for its body."""
    payload = tmp_path / "payload"
    payload.write_bytes(os.urandom(100_000))
    folder = tmp_path / "outgoing"
    folder.mkdir()
    return payload, folder


def test_the_sealed_body_is_on_disk_before_it_is_handed_back(
    layout: DemoLayout, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The daemon records the message as queued right after this, and deletes the
    plaintext: the body and its name in the folder must survive a power loss first."""
    lab = load_config(layout.lab.config_path)
    payload, folder = _large_document(tmp_path)
    synced: list[str] = []
    real_fsync = os.fsync

    def recording_fsync(fd: int) -> None:
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", recording_fsync)
    _build(lab, payload, folder / "body.as2", "a.dcm", "application/dicom")
    body_syncs = [i for i, p in enumerate(synced) if Path(p).name.startswith(".body.as2.")]
    folder_syncs = [i for i, p in enumerate(synced) if p == str(folder)]
    assert body_syncs and folder_syncs, synced
    assert body_syncs[0] < folder_syncs[-1]  # the file's data, then its name in the folder


def test_a_killed_sealing_leaves_only_files_the_next_start_removes(
    layout: DemoLayout, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """While a large document is sealed, the body being written sits beside the body's
    final name, and nothing else: the MIME entity is streamed from the document, never
    written as a plaintext working file.  Killed at that moment, the process leaves
    the body behind, named so that the start-up cleanup (remove_stale_partials)
    deletes it."""
    lab = load_config(layout.lab.config_path)
    payload, folder = _large_document(tmp_path)
    seen: list[str] = []
    real_replace = os.replace

    def snapshot_then_replace(src: str | Path, dst: str | Path) -> None:
        seen.extend(p.name for p in folder.iterdir())  # what a kill now would leave
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", snapshot_then_replace)
    _build(lab, payload, folder / "body.as2", "a.dcm", "application/dicom")
    assert len(seen) == 1, seen  # the body being written; no plaintext entity beside it
    assert all(PARTIAL.match(name) for name in seen), seen
    assert remove_stale_partials(folder) == []  # nothing left after a clean run


@pytest.mark.parametrize("cipher", ["aes-256-gcm", "aes-128-cbc"])
@pytest.mark.parametrize(
    "more", [{}, {"service": "lab-results", "receipt_url": "https://kita-lab.example/as2"}]
)
def test_in_memory_and_file_builds_send_the_same_headers_and_mic(
    layout: DemoLayout, tmp_path: Path, cipher: str, more: dict[str, str]
) -> None:
    """A small document is sealed in memory, a large one file to file: the peer must
    not be able to tell which (same AS2 headers, asynchronous-receipt option included;
    the same MIC for the same document)."""
    lab = load_config(layout.lab.config_path)
    hospital = load_config(layout.hospital.config_path)
    spec = replace(_spec(lab, "result.hl7", "application/hl7-v2", **more), cipher=cipher)
    document = b"MSH|^~\\&|LIS|KITA|EHR|SAKURA\rOBX|1|NM|x||7\r"
    payload = tmp_path / "payload"
    payload.write_bytes(document)
    in_memory = build_message(document, spec)
    from_file = build_message_file(payload, tmp_path / "body.as2", spec)
    assert in_memory.headers == from_file.headers
    assert in_memory.mic == from_file.mic
    for body in (in_memory.body, (tmp_path / "body.as2").read_bytes()):
        signed, _ = decrypt_bytes(
            body,
            hospital.smime.encryption.certificate,
            hospital.smime.encryption.key,
            policy=AlgorithmPolicy(),
        )
        _verified, span, mic = verify_entity_span(
            signed,
            tmp_path / "spill",
            trusted_signers=hospital.require_peer("lab").signing_certificates,
            policy=AlgorithmPolicy(),
            mic_digest="sha256",
        )
        assert f"{mic}, sha-256" == in_memory.mic
        info = read_entity_info(span.path, span.start, span.end)
        assert b"".join(payload_chunks(span.path, info)) == document
        assert info.service == more.get("service")
