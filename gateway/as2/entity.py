"""The document inside a verified MIME entity, read in chunks.

After decryption and signature verification the signed entity (MIME headers,
empty line, body) is in a file, or in part of one (the first part of the
decrypted ``multipart/signed``: it is not copied out); a small message is held
in memory instead, and read the same way.  These functions find its content
type, the sender's file name and transfer encoding, and yield the decoded
document in chunks, so a received DICOM study of gigabytes is never held in
memory.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from gateway.cms.mime import header_param, parse_entity
from gateway.errors import ProtocolError
from gateway.fsutil import open_source

HEADER_LIMIT = 65536
CHUNK = 1 << 20
_NOT_BASE64 = re.compile(rb"[^A-Za-z0-9+/=]")


@dataclass(frozen=True)
class EntityInfo:
    content_type: str
    filename: str | None
    encoding: str
    body_offset: int  # where the body starts in the file
    # The X-Medgw-Service header (None: absent; checked by the caller against the peer's).
    service: str | None = None
    end: int | None = None  # where the entity ends in the file (None: at its end)


def read_entity_info(path: Path | bytes, start: int = 0, end: int | None = None) -> EntityInfo:
    """The entity in bytes ``start`` to ``end`` (None: the end) of the file ``path`` (or
    of a small message held in memory)."""
    with open_source(path) as handle:
        handle.seek(start)
        limit = HEADER_LIMIT if end is None else min(HEADER_LIMIT, end - start)
        head = handle.read(limit)
    ends = [i + 4 for i in (head.find(b"\r\n\r\n"),) if i >= 0]
    ends += [i + 2 for i in (head.find(b"\n\n"),) if i >= 0]
    if not ends:
        raise ProtocolError(
            "the signed document has no end of its MIME headers in the first 64 KiB",
            fix="the sender's MIME structure is broken",
        )
    offset = min(ends)
    headers, _ = parse_entity(head[:offset])
    fields = {k.lower(): v for k, v in headers}
    content_type = fields.get("content-type", "application/octet-stream").split(";")[0].strip()
    encoding = fields.get("content-transfer-encoding", "binary").strip().lower()
    if encoding not in ("binary", "8bit", "7bit", "base64"):
        raise ProtocolError(
            f"unsupported Content-Transfer-Encoding {encoding!r}",
            fix="the sender should use binary or base64",
        )
    filename = header_param(fields.get("content-disposition", ""), "filename")
    service = fields.get("x-medgw-service")
    return EntityInfo(
        content_type,
        filename,
        encoding,
        start + offset,
        service.strip() if service is not None else None,
        end,
    )


def payload_chunks(path: Path | bytes, info: EntityInfo) -> Iterator[bytes]:
    """The document's bytes, decoded from its transfer encoding, a chunk at a time."""
    with open_source(path) as handle:
        handle.seek(info.body_offset)
        left = None if info.end is None else info.end - info.body_offset

        def read() -> bytes:
            nonlocal left
            if left is None:
                return handle.read(CHUNK)
            chunk = handle.read(min(CHUNK, left))
            left -= len(chunk)
            return chunk

        if info.encoding != "base64":
            while chunk := read():
                yield chunk
            return
        pending = b""
        while chunk := read():
            pending += _NOT_BASE64.sub(b"", chunk)
            usable = len(pending) - len(pending) % 4
            if usable:
                yield _b64(pending[:usable])
                pending = pending[usable:]
        if pending:
            yield _b64(pending + b"=" * (-len(pending) % 4))


def _b64(data: bytes) -> bytes:
    try:
        return base64.b64decode(data, validate=True)
    except binascii.Error as exc:
        raise ProtocolError(
            "the document is declared base64 but is not",
            fix="the sender's MIME encoding is broken",
        ) from exc


def payload_digest(path: Path | bytes, info: EntityInfo) -> tuple[int, str]:
    """Size and SHA-256 (hex) of the decoded document."""
    digest = hashlib.sha256()
    size = 0
    for chunk in payload_chunks(path, info):
        digest.update(chunk)
        size += len(chunk)
    return size, digest.hexdigest()
