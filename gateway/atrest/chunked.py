"""The at-rest file format: one item's bytes under its own data key, in chunks.

::

    header   MAGIC (8) | version (1) = 1 | nonce prefix (8, random) | item length (2) | item
    chunk i  AES-256-GCM(key, nonce = prefix | i (4, big-endian),
                         plaintext = up to 64 KiB,
                         aad = header | i (8) | last (1))  -> ciphertext | tag (16)

Every chunk but the last holds exactly :data:`CHUNK` bytes; the last holds fewer
(none, when the plaintext is a multiple of :data:`CHUNK`), so a reader knows the
end.  Binding the header (the item it belongs to), the chunk's index and whether
it is the last into each chunk's tag detects a changed byte, a truncated file,
reordered chunks and a file swapped in from another item.  Memory stays at one
chunk whatever the size, writing and reading.  A file that does not start with
:data:`MAGIC` is plaintext written before at-rest encryption (an AS2 body is DER,
a receipt MIME text: neither starts with byte 0x89).
"""

from __future__ import annotations

import io
import os
import struct
from collections.abc import Iterable
from typing import BinaryIO

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from gateway.errors import AtRestTamperedError, InvalidValueError

MAGIC = b"\x89medgw\r\n"  # the 0x89 and CR LF, like PNG's: never text, never DER's 0x30
VERSION = 1
CHUNK = 64 << 10
TAG = 16
KEY_BYTES = 32  # AES-256
PREFIX_BYTES = 8
# Bytes of an item's name: the longest is a sent receipt's, "inbound-receipt:" + a peer's
# name (peers.d/<name>.toml: up to 250 bytes) + ":" + the peer's Message-ID (up to 998).
MAX_ITEM = 2048
MAX_CHUNKS = 1 << 32  # the nonce's counter
_FIXED = len(MAGIC) + 1 + PREFIX_BYTES + 2


def is_sealed(head: bytes) -> bool:
    """Whether stored bytes starting with ``head`` are in this format (else plaintext
    from before at-rest encryption)."""
    return head.startswith(MAGIC)


def _header(item: str, prefix: bytes) -> bytes:
    name = item.encode()
    if not 0 < len(name) <= MAX_ITEM:
        raise InvalidValueError(f"at-rest item name of {len(name)} bytes (1 to {MAX_ITEM})")
    return MAGIC + bytes([VERSION]) + prefix + struct.pack(">H", len(name)) + name


def _aad(header: bytes, index: int, last: bool) -> bytes:
    return header + struct.pack(">QB", index, last)


def _nonce(prefix: bytes, index: int) -> bytes:
    return prefix + struct.pack(">I", index)


def _tampered(item: str, what: str) -> AtRestTamperedError:
    return AtRestTamperedError(
        f"the stored copy of {item} fails its integrity check ({what}): it was changed, "
        "truncated or replaced after medgw wrote it",
        fix="nothing was sent or delivered from it; restore the file from a backup taken "
        "after it was written, or cancel the message (medgw queue cancel), and look for "
        "who changed the state folder",
    )


def stored_in_clear(item: str) -> AtRestTamperedError:
    """``item`` read in the clear although medgw stored it encrypted (its data key is in
    the spool): replaced, as surely as a changed byte."""
    return _tampered(item, "it is in the clear, but medgw stored it encrypted")


class SealingWriter:
    """Writes ``item``'s plaintext to ``out`` in this format; :meth:`finish` writes the
    last chunk (without it the file is refused as truncated)."""

    def __init__(self, key: bytes, item: str, out: BinaryIO) -> None:
        self._aead = AESGCM(key)
        self._prefix = os.urandom(PREFIX_BYTES)
        self._header = _header(item, self._prefix)
        self._out = out
        self._buffer = bytearray()
        self._index = 0
        self.size = 0  # plaintext bytes written
        out.write(self._header)

    def write(self, data: bytes) -> int:
        """Encrypt what makes full chunks now (a chunk is only known not to be the last
        once more follows), keep the rest; large writes are not copied first."""
        self.size += len(data)
        view = memoryview(data)
        if self._buffer:
            take = min(len(view), CHUNK - len(self._buffer))
            self._buffer += view[:take]
            view = view[take:]
            if not view:
                return len(data)
            self._chunk(self._buffer, last=False)  # full, and more follows
            self._buffer = bytearray()
        while len(view) > CHUNK:
            self._chunk(view[:CHUNK], last=False)
            view = view[CHUNK:]
        self._buffer += view
        return len(data)

    def finish(self) -> None:
        if len(self._buffer) == CHUNK:
            self._chunk(bytes(self._buffer), last=False)
            self._buffer.clear()
        self._chunk(bytes(self._buffer), last=True)
        self._buffer.clear()

    def _chunk(self, plain: bytes | bytearray | memoryview, last: bool) -> None:
        if self._index >= MAX_CHUNKS:
            raise InvalidValueError(f"more than {MAX_CHUNKS} chunks of {CHUNK} bytes")
        nonce = _nonce(self._prefix, self._index)
        self._out.write(self._aead.encrypt(nonce, plain, _aad(self._header, self._index, last)))
        self._index += 1


def seal_bytes(key: bytes, item: str, plain: bytes) -> bytes:
    """``plain`` in this format (a small item kept in the spool itself)."""
    out = io.BytesIO()
    writer = SealingWriter(key, item, out)
    writer.write(plain)
    writer.finish()
    return out.getvalue()


def seal_stream(key: bytes, item: str, chunks: Iterable[bytes], out: BinaryIO) -> int:
    """Write ``chunks`` to ``out`` in this format; returns the plaintext size."""
    writer = SealingWriter(key, item, out)
    for chunk in chunks:
        writer.write(chunk)
    writer.finish()
    return writer.size


def read_header(source: BinaryIO, item: str) -> bytes:
    """The header at the start of ``source``, checked to be ``item``'s."""
    fixed = source.read(_FIXED)
    if len(fixed) < _FIXED or not fixed.startswith(MAGIC):
        raise _tampered(item, "no at-rest header")
    if fixed[len(MAGIC)] != VERSION:
        raise _tampered(item, f"unknown format version {fixed[len(MAGIC)]}")
    (length,) = struct.unpack(">H", fixed[-2:])
    name = source.read(length) if 0 < length <= MAX_ITEM else b""
    if name != item.encode():
        raise _tampered(item, "it belongs to another item")
    return fixed + name


class OpeningReader(io.RawIOBase):
    """``item``'s plaintext, read from ``source`` (in this format) a chunk at a time;
    a chunk that fails its check raises :class:`AtRestTamperedError` before any of
    its bytes are returned."""

    def __init__(self, key: bytes, item: str, source: BinaryIO) -> None:
        super().__init__()
        self._aead = AESGCM(key)
        self._item = item
        self._source = source
        self._header = read_header(source, item)
        self._prefix = self._header[len(MAGIC) + 1 : len(MAGIC) + 1 + PREFIX_BYTES]
        self._index = 0
        self._plain = b""
        self._done = False
        self._ahead = source.read(CHUNK + TAG)
        self.failure: AtRestTamperedError | None = None  # what stopped a read, if anything

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: memoryview) -> int:  # type: ignore[override]
        data = self.read(len(buffer))
        buffer[: len(data)] = data
        return len(data)

    def read(self, size: int = -1) -> bytes:
        """Up to ``size`` bytes of plaintext (all that is left: -1), whole chunks decrypted
        as needed; b"" at the end."""
        pieces = []
        wanted = size if size >= 0 else 1 << 62
        try:
            while wanted > 0:
                if not self._plain:
                    if self._done:
                        break
                    self._next_chunk()
                    continue
                piece = self._plain[:wanted]
                self._plain = self._plain[len(piece) :] if len(piece) < len(self._plain) else b""
                pieces.append(piece)
                wanted -= len(piece)
        except AtRestTamperedError as exc:
            self.failure = exc  # for a caller that only sees its consumer fail (an upload)
            raise
        return b"".join(pieces)

    def readall(self) -> bytes:
        return self.read(-1)

    def _next_chunk(self) -> None:
        sealed = self._ahead
        last = len(sealed) < CHUNK + TAG
        if not last:
            self._ahead = self._source.read(CHUNK + TAG)
            if not self._ahead:
                raise _tampered(self._item, "its last chunk is missing")
        if len(sealed) < TAG or self._index >= MAX_CHUNKS:
            raise _tampered(self._item, f"chunk {self._index} is cut short")
        try:
            self._plain = self._aead.decrypt(
                _nonce(self._prefix, self._index),
                sealed,
                _aad(self._header, self._index, last),
            )
        except InvalidTag:
            raise _tampered(self._item, f"chunk {self._index} does not authenticate") from None
        self._index += 1
        self._done = last

    def close(self) -> None:
        self._source.close()
        super().close()


def open_bytes(key: bytes, item: str, sealed: bytes) -> bytes:
    """The plaintext of ``sealed`` (from :func:`seal_bytes`)."""
    with OpeningReader(key, item, io.BytesIO(sealed)) as reader:
        return reader.read()


def plaintext_size(sealed_size: int, item: str) -> int:
    """The plaintext size of a well-formed file of ``sealed_size`` bytes for ``item``."""
    body = sealed_size - _FIXED - len(item.encode())
    chunks = body // (CHUNK + TAG) + 1
    return body - chunks * TAG


def failure_of(handle: BinaryIO) -> AtRestTamperedError | None:
    """The integrity failure that stopped reading ``handle`` (from
    :meth:`gateway.atrest.vault.Vault.reader`), if any."""
    raw = getattr(handle, "raw", handle)
    return raw.failure if isinstance(raw, OpeningReader) else None
