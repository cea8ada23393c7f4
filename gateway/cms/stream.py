"""Streaming CMS / S/MIME over files: memory does not grow with the payload.

Outbound, :func:`sign_and_envelope_file` turns a MIME entity on disk into the
AS2 body on disk - ``multipart/signed`` inside AuthEnvelopedData (GCM) or
EnvelopedData (CBC) - in two sequential reads of the entity: one to digest
it (the signature and the AS2 MIC), one to encrypt it.  The output is
definite-length DER: every length is computed up front from the entity's size
(GCM ciphertext = plaintext, CBC = plaintext padded to the next block).

Inbound, :func:`open_and_verify_file` decrypts DER or BER incrementally
(:mod:`gateway.cms.decrypting`) into a temporary file next to the destination,
then verifies ``multipart/signed`` by digesting the first part while copying
it to the destination; only the small parts (recipient infos, the signature)
are ever held in memory.  On any error the destination is not created.

The functions are blocking and CPU-bound: call them from a worker thread
(``await asyncio.to_thread(sign_and_envelope_file, ...)``).  Lower-level
pieces: :func:`encrypt_chunks` (iterator in, iterator out),
:func:`sign_entity_file` and :func:`verify_entity_file`.
"""

from __future__ import annotations

import base64
import os
import secrets
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import BinaryIO, Literal

from cryptography import x509
from cryptography.hazmat.primitives import hashes

from ..errors import ContentChangedError, MalformedMessageError, SignatureError
from ..fsutil import create_private, fsync_dir, open_source, partial_name
from ..policy import DIGESTS, AlgorithmPolicy, PrivateKey
from .common import hash_for
from .decrypting import DecryptedFile, decrypt_file
from .der import CHUNK as CHUNK  # the streaming chunk size, part of this module's interface
from .enveloping import encrypt_chunks
from .limits import MAX_IN_MEMORY_ENTITY, MAX_SIGNATURE_PART
from .mime import get_header, header_param, media_type, parse_entity
from .signing import sign_digest
from .smime import check_signature_part, decode_body, signed_frame, verify_entity
from .trust import SignerValidator
from .verification import VerifiedSignature, parse_signature, signer_digests, verify_digest

__all__ = [
    "EntitySpan",
    "OpenedFile",
    "SealedFile",
    "encrypt_chunks",
    "encrypt_file",
    "open_and_verify_file",
    "sign_and_envelope_file",
    "sign_entity_file",
    "verify_entity_file",
    "verify_entity_span",
]

# Non-streaming forms (opaque signed-data, canonicalised text) are handled in
# memory up to this size (gateway.cms.limits).
IN_MEMORY_LIMIT = MAX_IN_MEMORY_ENTITY


@dataclass(frozen=True)
class SealedFile:
    """What :func:`sign_and_envelope_file` wrote.

    ``mic`` is the base64 digest of the signed entity (the AS2 MIC, RFC 4130
    7.3.1) with ``digest``; ``content_type`` is the header value for the body.
    """

    mic: str
    digest: str
    content_type: str
    size: int


@dataclass(frozen=True)
class EntitySpan:
    """Where a verified entity is: bytes ``start`` to ``end`` of the file ``path`` (or of
    the decrypted message itself, when a small one is held in memory)."""

    path: Path | bytes
    start: int
    end: int

    @property
    def size(self) -> int:
        return self.end - self.start


@dataclass(frozen=True)
class OpenedFile:
    """What :func:`open_and_verify_file` found; ``verified.content`` is empty
    (the entity is in the destination file).  ``mic`` is the base64 digest of
    the delivered entity with the requested ``mic_digest`` (or the signer's;
    sha256 if that is a legacy peer's SHA-1: we never send a SHA-1 MIC)."""

    decrypted: DecryptedFile
    verified: VerifiedSignature
    size: int
    mic: str
    mic_digest: str


# A MIME entity to sign: a file, or a callable that streams it anew at each call (read
# twice: once to sign, once to encrypt) from a store of the caller's own.
EntitySource = Path | Callable[[], Iterable[bytes]]


def _entity_chunks(src: EntitySource) -> Iterable[bytes]:
    return _file_chunks(src) if isinstance(src, Path) else src()


def _file_chunks(path: Path | bytes, start: int = 0, end: int | None = None) -> Iterator[bytes]:
    with open_source(path) as f:
        f.seek(start)
        remaining = None if end is None else end - start
        while remaining is None or remaining > 0:
            n = CHUNK if remaining is None else min(CHUNK, remaining)
            data = f.read(n)
            if not data:
                break
            if remaining is not None:
                remaining -= len(data)
            yield data


def _write_atomically(dst: Path, pieces: Iterable[bytes], *, durable: bool = False) -> int:
    """Write to a hidden temporary file beside ``dst`` and rename it; ``durable``: fsync
    the file before the rename and the folder after, so that what a caller records
    next (a spool row saying "queued") never outlives the file in a power loss."""
    tmp = partial_name(dst)
    size = 0
    try:
        with create_private(tmp) as out:
            for piece in pieces:
                out.write(piece)
                size += len(piece)
            if durable:
                out.flush()
                os.fsync(out.fileno())
        os.replace(tmp, dst)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    if durable:
        fsync_dir(dst.parent)
    return size


def encrypt_file(
    src: Path,
    dst: Path,
    recipients: Sequence[x509.Certificate],
    *,
    cipher: str = "aes-256-gcm",
    policy: AlgorithmPolicy,
) -> int:
    """Encrypt the file ``src`` into ``dst`` (DER ContentInfo); returns the size written."""
    length = src.stat().st_size
    return _write_atomically(
        dst, encrypt_chunks(_file_chunks(src), length, recipients, cipher=cipher, policy=policy)
    )


# ---------------------------------------------------------------------------
# multipart/signed, streamed


@dataclass(frozen=True)
class _SignedFrame:
    head: bytes  # headers and opening delimiter
    tail: bytes  # closing of the first part, the signature part, closing delimiter
    entity_size: int
    entity_digest: bytes
    digest: str


def _frame(
    src: EntitySource,
    signer_cert: x509.Certificate,
    signer_key: PrivateKey,
    *,
    digest: str,
    rsa_padding: Literal["pss", "pkcs1v15"],
    certificates: Sequence[x509.Certificate],
    signing_time: datetime,
    policy: AlgorithmPolicy,
) -> _SignedFrame:
    policy.check_digest(digest)
    boundary = "----=_medgw_" + secrets.token_hex(16)
    b = boundary.encode("ascii")
    h = hashes.Hash(hash_for(digest))
    size = 0
    carry = b""
    for chunk in _entity_chunks(src):
        h.update(chunk)
        size += len(chunk)
        if b in carry + chunk:  # 128 random bits: never in practice, checked anyway
            return _frame(
                src,
                signer_cert,
                signer_key,
                digest=digest,
                rsa_padding=rsa_padding,
                certificates=certificates,
                signing_time=signing_time,
                policy=policy,
            )
        carry = chunk[-len(b) :]
    entity_digest = h.finalize()
    signature = sign_digest(
        entity_digest,
        signer_cert,
        signer_key,
        digest=digest,
        rsa_padding=rsa_padding,
        certificates=certificates,
        signing_time=signing_time,
        policy=policy,
    )
    head, tail = signed_frame(boundary, digest, signature)
    return _SignedFrame(head, tail, size, entity_digest, digest)


def _framed_chunks(src: EntitySource, frame: _SignedFrame) -> Iterator[bytes]:
    yield frame.head
    size = 0
    for chunk in _entity_chunks(src):
        size += len(chunk)
        yield chunk
    if size != frame.entity_size:
        raise ContentChangedError(
            f"{src if isinstance(src, Path) else 'the document'} changed while it was being "
            f"signed ({frame.entity_size} bytes signed, "
            f"{size} read): a document must not change once it is taken in",
            fix="check that no other program writes to that file; then send it again",
        )
    yield frame.tail


def sign_entity_file(
    src: Path,
    dst: Path,
    signer_cert: x509.Certificate,
    signer_key: PrivateKey,
    *,
    digest: str = "sha256",
    rsa_padding: Literal["pss", "pkcs1v15"] = "pkcs1v15",
    certificates: Sequence[x509.Certificate] = (),
    signing_time: datetime,
    policy: AlgorithmPolicy,
) -> str:
    """Write ``multipart/signed`` around the MIME entity in ``src``; returns the MIC (base64)."""
    frame = _frame(
        src,
        signer_cert,
        signer_key,
        digest=digest,
        rsa_padding=rsa_padding,
        certificates=certificates,
        signing_time=signing_time,
        policy=policy,
    )
    _write_atomically(dst, _framed_chunks(src, frame))
    return base64.b64encode(frame.entity_digest).decode("ascii")


def sign_and_envelope_file(
    src_entity: EntitySource,
    dst: Path,
    *,
    signer_cert: x509.Certificate,
    signer_key: PrivateKey,
    recipients: Sequence[x509.Certificate],
    digest: str = "sha256",
    cipher: str = "aes-256-gcm",
    rsa_padding: Literal["pss", "pkcs1v15"] = "pkcs1v15",
    certificates: Sequence[x509.Certificate] = (),
    signing_time: datetime,
    policy: AlgorithmPolicy,
    durable: bool = False,
    writer: Callable[[Path, Iterable[bytes]], object] | None = None,
) -> SealedFile:
    """Sign the MIME entity in ``src_entity`` (multipart/signed) and encrypt it into ``dst``.

    ``src_entity`` is a file, or a callable streaming the entity (called twice).

    ``dst`` is the AS2 body (DER), written atomically (and with ``durable``, on disk
    when this returns); or ``writer(dst, chunks)`` stores it (complete and on disk when
    it returns), for a caller that keeps it in a form of its own (encrypted at rest).
    Equivalent to ``envelope_entity(sign_entity(entity))`` without holding the entity.
    """
    cipher = cipher.strip().lower()
    policy.check_content_cipher(cipher, inbound=False)
    frame = _frame(
        src_entity,
        signer_cert,
        signer_key,
        digest=digest,
        rsa_padding=rsa_padding,
        certificates=certificates,
        signing_time=signing_time,
        policy=policy,
    )
    length = len(frame.head) + frame.entity_size + len(frame.tail)
    chunks = encrypt_chunks(
        _framed_chunks(src_entity, frame), length, recipients, cipher=cipher, policy=policy
    )
    if writer is None:
        size = _write_atomically(dst, chunks, durable=durable)
    else:
        size = 0

        def counted() -> Iterator[bytes]:
            nonlocal size
            for chunk in chunks:
                size += len(chunk)
                yield chunk

        writer(dst, counted())
    smime_type = "authEnveloped-data" if cipher.endswith("gcm") else "enveloped-data"
    return SealedFile(
        mic=base64.b64encode(frame.entity_digest).decode("ascii"),
        digest=frame.digest,
        content_type=f'application/pkcs7-mime; smime-type={smime_type}; name="smime.p7m"',
        size=size,
    )


# ---------------------------------------------------------------------------
# verification, streamed


def _read_headers(f: BinaryIO, what: str) -> tuple[list[tuple[str, str]], int]:
    head = f.read(65536)
    candidates = [i + 4 for i in (head.find(b"\r\n\r\n"),) if i >= 0]
    candidates += [i + 2 for i in (head.find(b"\n\n"),) if i >= 0]
    if not candidates:
        raise MalformedMessageError(
            f"{what}: no end of the MIME headers in the first 64 KiB",
            fix="pass a complete S/MIME entity (headers, empty line, body)",
        )
    body_start = min(candidates)
    headers, _ = parse_entity(head[:body_start])
    return headers, body_start


def _delimiters(f: BinaryIO, start: int, delim: bytes) -> list[tuple[int, int, bool]]:
    """Each boundary delimiter line of the body starting at ``start``, up to the closing one.

    Per delimiter: (offset of the LF before it, offset of the line after it,
    closing?).  The body start counts as a line start.
    """
    pattern = b"\n" + delim
    found: list[tuple[int, int, bool]] = []
    f.seek(start)
    buf = b"\n"  # a virtual line break before the body
    base = start - 1  # file offset of buf[0]
    while True:
        data = f.read(CHUNK)
        eof = not data
        buf += data
        keep_from = max(0, len(buf) - len(pattern) + 1)
        i = buf.find(pattern)
        while i >= 0:
            after_pos = i + len(pattern)
            if not eof and after_pos + 2 > len(buf):
                keep_from = i
                break
            after = buf[after_pos : after_pos + 2]
            if after[:1] in (b"", b"\r", b"\n", b" ", b"\t") or after == b"--":
                line_end = buf.find(b"\n", after_pos)
                if line_end < 0 and not eof:
                    if len(buf) - i > 4096:
                        raise MalformedMessageError(
                            "multipart/signed boundary line is longer than 4 KiB",
                            fix="the message is malformed; ask the peer to resend",
                        )
                    keep_from = i
                    break
                next_line = base + (len(buf) if line_end < 0 else line_end + 1)
                found.append((base + i, next_line, after == b"--"))
                if after == b"--":
                    return found
            i = buf.find(pattern, i + 1)
        if eof:
            return found
        base += keep_from
        buf = buf[keep_from:]


def verify_entity_file(
    src: Path,
    dst: Path,
    *,
    trusted_signers: Sequence[x509.Certificate],
    policy: AlgorithmPolicy,
    validate_signer: SignerValidator | None = None,
    mic_digest: str | None = None,
) -> tuple[VerifiedSignature, int, str]:
    """Verify the ``multipart/signed`` entity in ``src``; write the signed entity to ``dst``.

    Returns (verification, size of the entity, MIC of the entity with
    ``mic_digest`` or the signer's digest - sha256 instead of a legacy peer's
    SHA-1).  Other signed forms (opaque
    signed-data, parts needing line-ending canonicalisation) are verified in
    memory up to IN_MEMORY_LIMIT.
    """
    verified, span, mic = verify_entity_span(
        src,
        dst,
        trusted_signers=trusted_signers,
        policy=policy,
        validate_signer=validate_signer,
        mic_digest=mic_digest,
    )
    if span.path != dst:  # verified where it is: copy it out
        _write_atomically(dst, _file_chunks(src, span.start, span.end))
    return verified, span.size, mic


def verify_entity_span(
    src: Path | bytes,
    spill: Path,
    *,
    trusted_signers: Sequence[x509.Certificate],
    policy: AlgorithmPolicy,
    validate_signer: SignerValidator | None = None,
    mic_digest: str | None = None,
) -> tuple[VerifiedSignature, EntitySpan, str]:
    """Verify the ``multipart/signed`` entity in ``src`` without copying it.

    Returns (verification, where the signed entity is, its MIC as for
    :func:`verify_entity_file`).  The entity is normally the first part of
    ``src`` itself (a file, or a small decrypted message held in memory); only a
    form verified in memory (opaque signed-data, line endings converted in
    transit) is written, to ``spill``.
    """
    what = f"signed entity {src}" if isinstance(src, Path) else "signed entity"
    with open_source(src) as f:
        headers, body_start = _read_headers(f, what)
        ctype = get_header(headers, "Content-Type") or ""
        boundary = header_param(ctype, "boundary")
        if media_type(ctype) != "multipart/signed" or not boundary:
            return _verify_in_memory(
                src, spill, trusted_signers, policy, validate_signer, mic_digest, what
            )
        delims = _delimiters(f, body_start, b"--" + boundary.encode("latin-1"))
        if not delims or not delims[-1][2]:
            raise MalformedMessageError(
                f"{what}: multipart/signed body has no closing boundary",
                fix="the message was truncated in transit; ask the peer to resend",
            )
        if len(delims) != 3:
            raise MalformedMessageError(
                f"{what}: multipart/signed must have exactly 2 parts (content, signature), "
                f"found {len(delims) - 1}",
                fix="ask the peer to send a standard S/MIME signed message",
            )
        (_, start, _), (nl, sig_start, _), (sig_nl, _, _) = delims
        f.seek(nl - 1 if nl > 0 else nl)
        crlf = f.read(2) == b"\r\n"
        end = nl - 1 if crlf else nl
        if sig_nl - sig_start > MAX_SIGNATURE_PART:
            raise MalformedMessageError(
                f"{what}: signature part of {sig_nl - sig_start} bytes is implausibly large",
                fix="ask the peer to send a standard S/MIME signed message",
            )
        f.seek(sig_start)
        sig_part = f.read(sig_nl - sig_start)
        if sig_part.endswith(b"\r"):
            sig_part = sig_part[:-1]
    sig_headers, sig_body = parse_entity(sig_part)
    check_signature_part(sig_headers)
    signature = parse_signature(decode_body(sig_headers, sig_body, "signature part"))
    names = list(signer_digests(signature))
    for name in names:  # what the peer signed with: SHA-1 only if accept_legacy names it
        policy.check_digest(name, inbound=True)
    if mic_digest is not None:
        policy.check_digest(mic_digest)  # a MIC we send: never SHA-1
        if mic_digest not in names:
            names.append(mic_digest)
    elif any(n not in DIGESTS for n in names) and "sha256" not in names:
        names.append("sha256")  # the MIC of a legacy peer's SHA-1 signed entity
    hashers = {n: hashes.Hash(hash_for(n, allow_sha1=True)) for n in names}
    for chunk in _file_chunks(src, start, max(start, end)):
        for h in hashers.values():
            h.update(chunk)
    exact = {n: h.copy().finalize() for n, h in hashers.items()}
    readings = [(exact, max(start, end) - start)]
    if crlf and end >= start:  # the CR before the delimiter may belong to the part
        for h in hashers.values():
            h.update(b"\r")
        readings.append(({n: h.finalize() for n, h in hashers.items()}, end - start + 1))
    first_error: SignatureError | None = None
    for digests, length in readings:
        try:
            result = verify_digest(
                signature,
                digest_of=digests.__getitem__,
                content_length=length,
                trusted_signers=trusted_signers,
                policy=policy,
                validate_signer=validate_signer,
            )
        except SignatureError as exc:
            first_error = first_error or exc
            continue
        mic_bytes = digests[_mic_name(mic_digest, result.digest)]
        return result, EntitySpan(src, start, start + length), base64.b64encode(mic_bytes).decode()
    assert first_error is not None
    if end - start <= IN_MEMORY_LIMIT:
        # line endings converted in transit: try the canonical readings
        return _verify_in_memory(
            src, spill, trusted_signers, policy, validate_signer, mic_digest, what
        )
    raise first_error


def _mic_name(mic_digest: str | None, signer_digest: str) -> str:
    """The digest of the MIC we return: the one asked for, else the signer's - unless
    that is a legacy peer's SHA-1, which we never compute a MIC with: then sha256."""
    if mic_digest is not None:
        return mic_digest
    return signer_digest if signer_digest in DIGESTS else "sha256"


def _verify_in_memory(
    src: Path | bytes,
    spill: Path,
    trusted_signers: Sequence[x509.Certificate],
    policy: AlgorithmPolicy,
    validate_signer: SignerValidator | None,
    mic_digest: str | None,
    what: str,
) -> tuple[VerifiedSignature, EntitySpan, str]:
    size = src.stat().st_size if isinstance(src, Path) else len(src)
    if size > IN_MEMORY_LIMIT:
        raise MalformedMessageError(
            f"{what} ({size} bytes) can only be verified in memory (it is not "
            "multipart/signed, or its line endings were converted in transit), which is "
            f"done up to {IN_MEMORY_LIMIT >> 20} MiB",
            fix="ask the peer to sign large documents as multipart/signed (detached) and "
            "to send them with binary transfer, line endings unchanged",
        )
    entity, verified = verify_entity(
        src.read_bytes() if isinstance(src, Path) else src,
        trusted_signers=trusted_signers,
        policy=policy,
        validate_signer=validate_signer,
    )
    _write_atomically(spill, [entity])
    h = hashes.Hash(hash_for(_mic_name(mic_digest, verified.digest)))
    h.update(entity)
    return verified, EntitySpan(spill, 0, len(entity)), base64.b64encode(h.finalize()).decode()


def open_and_verify_file(
    src: Path,
    dst_entity: Path,
    *,
    cert: x509.Certificate,
    key: PrivateKey,
    trusted_signers: Sequence[x509.Certificate],
    policy: AlgorithmPolicy,
    validate_signer: SignerValidator | None = None,
    mic_digest: str | None = None,
) -> OpenedFile:
    """Decrypt the AS2 body in ``src`` and verify the signed entity inside it.

    ``dst_entity`` receives the signed MIME entity (headers and payload), and
    appears only if decryption and verification succeed.  ``mic_digest`` is the
    algorithm the sender asked for in Disposition-Notification-Options.
    """
    decrypted_path = dst_entity.with_name(f".{dst_entity.name}.{secrets.token_hex(4)}.dec")
    try:
        decrypted = decrypt_file(src, decrypted_path, cert, key, policy=policy)
        verified, size, mic = verify_entity_file(
            decrypted_path,
            dst_entity,
            trusted_signers=trusted_signers,
            policy=policy,
            validate_signer=validate_signer,
            mic_digest=mic_digest,
        )
    finally:
        decrypted_path.unlink(missing_ok=True)
    return OpenedFile(decrypted, verified, size, mic, _mic_name(mic_digest, verified.digest))
