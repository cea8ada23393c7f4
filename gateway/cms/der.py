"""Reading DER/BER: one header decoder, a cursor over bytes, a reader over files.

The CMS hot path (opening a message, parsing its signature) reads the few
fields it needs directly instead of building asn1crypto objects, which cost
more per message than the private-key operation.  Everything here is strict:

* :func:`header` decodes one identifier and length.  In DER mode (the
  default) it refuses indefinite lengths, non-minimal length octets and
  high tag numbers; every length must fit inside its container.
* :class:`Cursor` walks the elements inside one container of an in-memory
  buffer: each element must have the expected tag, and :meth:`Cursor.finish`
  refuses anything left over (trailing data).
* :class:`StreamReader` reads DER or BER (indefinite lengths, constructed
  OCTET STRINGs) incrementally from a file object; the small elements it
  returns are then read with a :class:`Cursor`.

Every refusal is a :class:`DerError` (a
:class:`~gateway.errors.MalformedMessageError`).  The CMS modules treat a
refusal of the in-memory reader as "not one of the common shapes" and read
the message again with asn1crypto, so that unusual but valid messages, and the
error a malformed one gets, stay exactly as before.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator
from typing import BinaryIO

from asn1crypto import core

from ..errors import MalformedMessageError
from .limits import check_count

__all__ = [
    "CHUNK",
    "MAX_SMALL_ELEMENT",
    "Cursor",
    "DerError",
    "StreamReader",
    "Truncated",
    "children",
    "contents_of",
    "count_children",
    "header",
    "integer",
    "joined_octet_strings",
    "oid_der",
    "oid_valid",
    "tl",
    "tlv",
]

CHUNK = 1 << 20
# Parts we do hold in memory (recipient infos, a detached signature with its
# certificates, MIME headers) are small; anything bigger is refused.
MAX_SMALL_ELEMENT = 16 << 20
# Deepest nesting of indefinite-length elements (or OCTET STRING segments) read from a
# stream.  CMS needs about a dozen; a crafted message could otherwise exhaust the stack.
MAX_NESTING = 64
# Most elements one small element may be made of (counted through indefinite-length
# nesting; a definite-length element counts once, its contents are not walked).
MAX_PARTS = 100_000


class DerError(MalformedMessageError):
    """The bytes are not the DER the strict reader accepts."""

    def __init__(self, detail: str) -> None:
        super().__init__(
            f"not valid DER: {detail}",
            fix="check that the message was not truncated or altered in transit",
        )
        self.detail = detail


class Truncated(DerError):
    """A header or its contents run past the end of the input (``at``: where, from
    the start of the header, the missing bytes begin)."""

    def __init__(self, at: int) -> None:
        super().__init__("the input ends inside an element")
        self.at = at


def header(buf: bytes, pos: int, end: int, *, ber: bool = False) -> tuple[int, int | None, int]:
    """(identifier octet, content length or None, header length) of the element at ``pos``.

    ``buf[pos:end]`` is what is available.  ``None`` (indefinite length) only
    with ``ber=True``; DER also refuses long-form lengths that are not minimal.
    Raises :class:`Truncated` if the header itself is incomplete.
    """
    if end - pos < 2:
        raise Truncated(0)
    tag = buf[pos]
    ln = buf[pos + 1]
    if tag & 0x1F == 0x1F:
        raise DerError("high tag numbers do not occur in CMS")
    if ln < 0x80:
        return tag, ln, 2
    if ln == 0x80:
        if not ber:
            raise DerError("indefinite length in DER")
        if not tag & 0x20:
            raise DerError("indefinite length on a primitive element")
        return tag, None, 2
    n = ln & 0x7F
    if n > 8:
        raise DerError(f"length of {n} octets")
    if end - pos - 2 < n:
        raise Truncated(2)
    length = int.from_bytes(buf[pos + 2 : pos + 2 + n], "big")
    if not ber and (length < 0x80 or buf[pos + 2] == 0):
        raise DerError("length not in its shortest form")
    return tag, length, 2 + n


def children(buf: bytes, pos: int = 0) -> Iterator[tuple[int, int, int]]:
    """(identifier octet, start, stop) of each element inside the constructed BER
    element at ``pos`` (start: of its header; stop: after it).

    Nothing is built: an element of indefinite length is skipped by walking its
    own elements, at most MAX_PARTS of them all told (and MAX_NESTING deep), so
    that counting the elements of a container costs at most that much whatever
    the encoding.  Raises :class:`DerError` if the element is not well-formed
    BER as far as it is read.
    """
    tag, length, hlen = header(buf, pos, len(buf), ber=True)
    if not tag & 0x20:
        raise DerError(f"expected a constructed element, found tag 0x{tag:02x}")
    budget = [0]
    cursor = pos + hlen
    stop = len(buf) if length is None else cursor + length
    if stop > len(buf):
        raise Truncated(hlen)
    while True:
        if length is None:
            if buf[cursor : cursor + 2] == b"\x00\x00":
                return
        elif cursor == stop:
            return
        after = _skip(buf, cursor, stop, 1, budget)
        yield buf[cursor], cursor, after
        cursor = after


def _skip(buf: bytes, pos: int, end: int, depth: int, budget: list[int]) -> int:
    """The position after the BER element at ``pos``."""
    if depth > MAX_NESTING:
        raise DerError(f"elements nested more than {MAX_NESTING} deep")
    budget[0] += 1
    if budget[0] > MAX_PARTS:
        raise DerError(f"more than {MAX_PARTS} elements")
    _tag, length, hlen = header(buf, pos, end, ber=True)
    cursor = pos + hlen
    if length is not None:
        if cursor + length > end:
            raise Truncated(hlen)
        return cursor + length
    while buf[cursor : cursor + 2] != b"\x00\x00":
        if cursor >= end:
            raise Truncated(hlen)
        cursor = _skip(buf, cursor, end, depth + 1, budget)
    return cursor + 2


def count_children(buf: bytes, pos: int, limit: int, what: str) -> int:
    """How many elements the constructed BER element at ``pos`` holds; TooMany (read
    no further) as soon as there are more than ``limit``."""
    count = 0
    for _ in children(buf, pos):
        count += 1
        check_count(count, limit, what)
    return count


# A run of at least this many OCTET STRING segments of one short length is copied with
# strided slices (C speed) instead of one segment at a time.
_STRIDE_PROBE = 16


def _stride_run(buf: bytes, pos: int, stop: int, length: int, out: bytearray) -> int:
    """Where the run of segments ``04 <length> <length bytes>`` starting at ``pos`` ends,
    their contents appended to ``out``; ``pos`` itself if the run is shorter than
    _STRIDE_PROBE."""
    step = length + 2
    probe_end = pos + _STRIDE_PROBE * step
    if probe_end > stop or buf[pos:probe_end:step] != b"\x04" * _STRIDE_PROBE:
        return pos
    mark = bytes((length,))
    if buf[pos + 1 : probe_end : step] != mark * _STRIDE_PROBE:
        return pos
    whole = (stop - pos) // step
    end = pos + whole * step
    tags = buf[pos:end:step]
    lengths = buf[pos + 1 : end : step]
    run = min(whole - len(tags.lstrip(b"\x04")), whole - len(lengths.lstrip(mark)))
    end = pos + run * step
    if length == 1:
        out += buf[pos + 2 : end : step]
    elif length:
        block = bytearray(run * length)
        for k in range(length):
            block[k::length] = buf[pos + 2 + k : end : step]
        out += block
    return end


def primitive_segments(buf: bytes, pos: int, stop: int, out: bytearray) -> int:
    """Append to ``out`` the contents of the primitive OCTET STRING segments (BER) that
    follow one another from ``pos`` and end by ``stop``; return where the first one
    not taken starts (another tag, end-of-contents octets, a segment running past
    ``stop``).

    The cost per byte is small whatever the segmentation: runs of equal short
    segments (a 1-byte chunking, say) are copied in bulk, others one by one with
    no more than a few operations each.
    """
    view = memoryview(buf)
    probe_at = pos
    while pos + 2 <= stop and buf[pos] == 0x04:
        length = buf[pos + 1]
        if length < 0x80:
            if pos >= probe_at:
                after = _stride_run(buf, pos, stop, length, out)
                if after != pos:
                    pos = after
                    continue
                probe_at = pos + _STRIDE_PROBE * (length + 2)  # not a run: probe later
            end = pos + 2 + length
            if end > stop:
                break
            out += view[pos + 2 : end]
            pos = end
            continue
        size = length & 0x7F
        if not 0 < size <= 8 or pos + 2 + size > stop:
            break  # indefinite on a primitive, or a header cut by ``stop``: the caller's
        start = pos + 2 + size
        end = start + int.from_bytes(buf[pos + 2 : start], "big")
        if end > stop:
            break
        out += view[start:end]
        pos = end
    return pos


def _joined_segments(
    buf: bytes, start: int, stop: int, indefinite: bool, depth: int
) -> tuple[bytes, int]:
    """The octets of a constructed OCTET STRING whose contents start at ``start`` (and
    end at ``stop``, or with end-of-contents octets), and the position after it."""
    if depth > MAX_NESTING:
        raise DerError(f"OCTET STRING segments nested more than {MAX_NESTING} deep")
    out = bytearray()
    cursor = start
    while True:
        cursor = primitive_segments(buf, cursor, stop, out)
        if indefinite:
            if buf[cursor : cursor + 2] == b"\x00\x00":
                return bytes(out), cursor + 2
        elif cursor == stop:
            return bytes(out), cursor
        tag, length, hlen = header(buf, cursor, stop, ber=True)
        if tag not in (0x04, 0x24):
            raise DerError(f"constructed OCTET STRING holds tag 0x{tag:02x}")
        if tag == 0x04:  # what primitive_segments left: it runs past its container
            raise Truncated(hlen)
        inner_stop = stop if length is None else cursor + hlen + length
        if inner_stop > stop:
            raise Truncated(hlen)
        octets, cursor = _joined_segments(buf, cursor + hlen, inner_stop, length is None, depth + 1)
        out += octets
        if length is not None and cursor != inner_stop:
            raise DerError("segment overruns its constructed OCTET STRING")


def joined_octet_strings(buf: bytes) -> bytes:
    """``buf`` (BER) with every constructed OCTET STRING joined into one primitive.

    BER lets a sender split an OCTET STRING (the encapsulated content of a
    SignedData, typically) into segments, of definite or indefinite length.
    asn1crypto reads the indefinite form only; this gives it the joined one.
    Everything else keeps its tags and contents; lengths become definite.
    Raises :class:`DerError` if ``buf`` is not one well-formed BER element.
    """
    out, pos = _rewritten(buf, 0, len(buf), 0, [0])
    if pos != len(buf):
        raise DerError("trailing data after the element")
    return out


def _rewritten(buf: bytes, pos: int, end: int, depth: int, count: list[int]) -> tuple[bytes, int]:
    """The element at ``pos`` rewritten, and the position after it."""
    if depth > MAX_NESTING:
        raise DerError(f"elements nested more than {MAX_NESTING} deep")
    count[0] += 1
    check_count(count[0], MAX_PARTS, "ASN.1 elements")
    tag, length, hlen = header(buf, pos, end, ber=True)
    start = pos + hlen
    if not tag & 0x20:  # primitive: as it is
        assert length is not None
        if start + length > end:
            raise Truncated(hlen)
        return buf[pos : start + length], start + length
    stop = end if length is None else start + length
    if stop > end:
        raise Truncated(hlen)
    if tag == 0x24:  # a constructed OCTET STRING: its segments' octets, joined in bulk
        octets, after = _joined_segments(buf, start, stop, length is None, depth + 1)
        if length is not None and after != stop:
            raise DerError("segment overruns its constructed OCTET STRING")
        return _encoded(0x04, octets), after
    parts: list[bytes] = []
    cursor = start
    while True:
        if length is None:
            if buf[cursor : cursor + 2] == b"\x00\x00":
                cursor += 2
                break
        elif cursor == stop:
            break
        part, cursor = _rewritten(buf, cursor, stop, depth + 1, count)
        parts.append(part)
    return _encoded(tag, b"".join(parts)), cursor


def _encoded(tag: int, contents: bytes) -> bytes:
    n = len(contents)
    if n < 0x80:
        return bytes((tag, n)) + contents
    size = n.to_bytes((n.bit_length() + 7) // 8, "big")
    return bytes((tag, 0x80 | len(size))) + size + contents


def integer(buf: bytes, start: int, stop: int) -> int:
    """A DER INTEGER's contents (two's complement, shortest form)."""
    if stop <= start:
        raise DerError("empty INTEGER")
    if stop - start > 1:
        first, second = buf[start], buf[start + 1]
        if (first == 0 and second < 0x80) or (first == 0xFF and second >= 0x80):
            raise DerError("INTEGER not in its shortest form")
    return int.from_bytes(buf[start:stop], "big", signed=True)


def oid_valid(contents: bytes) -> bool:
    """True if ``contents`` is an OBJECT IDENTIFIER in its one DER encoding (every
    sub-identifier in the fewest octets), so that equal OIDs have equal bytes."""
    if not contents or contents[-1] & 0x80:
        return False
    prev = 0  # the previous octet: 0 marks the start of a sub-identifier
    for octet in contents:
        if octet == 0x80 and not prev & 0x80:
            return False
        prev = octet
    return True


class Cursor:
    """The elements inside ``buf[start:end]``, read in order, DER only."""

    __slots__ = ("buf", "end", "pos")

    def __init__(self, buf: bytes, start: int, end: int) -> None:
        self.buf = buf
        self.pos = start
        self.end = end

    def peek(self) -> int:
        """The identifier octet of the next element, or -1 at the end."""
        return self.buf[self.pos] if self.pos < self.end else -1

    def any(self) -> tuple[int, int, int]:
        """(tag, start, stop) of the next element's contents."""
        pos = self.pos
        tag, length, hlen = header(self.buf, pos, self.end)
        start = pos + hlen
        stop = start + length  # type: ignore[operator]  # never None in DER
        if stop > self.end:
            raise DerError(f"element of {length} bytes runs past the end of its container")
        self.pos = stop
        return tag, start, stop

    def next(self, tag: int) -> tuple[int, int]:
        """(start, stop) of the next element's contents; it must have identifier ``tag``."""
        buf, pos, end = self.buf, self.pos, self.end
        # the short form inline (most elements); anything else through header()
        if end - pos >= 2 and buf[pos] == tag and buf[pos + 1] < 0x80:
            start = pos + 2
            stop = start + buf[pos + 1]
            if stop > end:
                raise DerError(
                    f"element of {buf[pos + 1]} bytes runs past the end of its container"
                )
            self.pos = stop
            return start, stop
        found, start, stop = self.any()
        if found != tag:
            self.pos = pos
            raise DerError(f"expected tag 0x{tag:02x}, found 0x{found:02x}")
        return start, stop

    def raw(self, tag: int) -> bytes:
        """The next element, header included; it must have identifier ``tag``."""
        pos = self.pos
        self.next(tag)
        return self.buf[pos : self.pos]

    def value(self, tag: int) -> bytes:
        """The contents of the next element, which must have identifier ``tag``."""
        start, stop = self.next(tag)
        return self.buf[start:stop]

    def optional(self, tag: int) -> tuple[int, int] | None:
        """Like :meth:`next` if the next element has identifier ``tag``, else None."""
        if self.pos < self.end and self.buf[self.pos] == tag:
            return self.next(tag)
        return None

    def inner(self, tag: int) -> Cursor:
        """A cursor over the contents of the next element (identifier ``tag``)."""
        start, stop = self.next(tag)
        return Cursor(self.buf, start, stop)

    def at_end(self) -> bool:
        return self.pos >= self.end

    def finish(self) -> None:
        """Refuse anything after the last element read."""
        if self.pos != self.end:
            raise DerError(f"{self.end - self.pos} unexpected bytes at the end of an element")


def contents_of(buf: bytes, tag: int) -> Cursor:
    """A cursor over the contents of ``buf``, which must be one element with
    identifier ``tag`` and nothing after it."""
    c = Cursor(buf, 0, len(buf))
    inner = c.inner(tag)
    c.finish()
    return inner


class StreamReader:
    """Incremental DER/BER reader over a binary file object.

    Errors name the input (``what``) and the byte offset, for the audit trail.
    """

    def __init__(self, f: BinaryIO, what: str) -> None:
        self.f = f
        self.pos = 0
        self.what = what
        self._peeked: bytes = b""

    def _truncated(self, at: int = 0) -> MalformedMessageError:
        return MalformedMessageError(
            f"{self.what} ends early at byte {self.pos + at}: the CMS structure is truncated",
            fix="the message was truncated in transit; ask the peer to resend",
        )

    def malformed(self, detail: str, at: int = 0) -> MalformedMessageError:
        return MalformedMessageError(
            f"{self.what} is not valid DER/BER CMS at byte {self.pos + at}: {detail}",
            fix="check that the message was not truncated or altered in transit",
        )

    def read(self, n: int) -> bytes:
        out = self._peeked[:n]
        self._peeked = self._peeked[n:]
        if len(out) < n:
            more = self.f.read(n - len(out))
            out += more
        if len(out) < n:
            raise self._truncated()
        self.pos += n
        return out

    def peek(self, n: int) -> bytes:
        if len(self._peeked) < n:
            self._peeked += self.f.read(n - len(self._peeked))
        return self._peeked[:n]

    def at_eof(self) -> bool:
        return self.peek(1) == b""

    def header(self) -> tuple[int, int | None, bytes]:
        """(identifier octet, length or None for indefinite, raw header bytes)."""
        head = self.peek(10)
        try:
            tag, length, hlen = header(head, 0, len(head), ber=True)
        except Truncated as exc:
            raise self._truncated(exc.at) from None
        except DerError as exc:  # found after the identifier and first length octet
            raise self.malformed(exc.detail, 2) from None
        return tag, length, self.read(hlen)

    def element(self, limit: int = MAX_SMALL_ELEMENT) -> bytes:
        """A whole element (header and contents), indefinite lengths included.

        Every byte counts toward ``limit`` - headers and end-of-contents octets of
        nested indefinite-length elements too - and so does every element
        (MAX_PARTS): a peer cannot make this read without end with ``30 80 00 00``
        repeated.  Nesting is bounded (MAX_NESTING), so a crafted message cannot
        exhaust the stack.
        """
        out = bytearray()
        self._element_into(out, limit, 0, [0])
        return bytes(out)

    def _element_into(self, out: bytearray, limit: int, depth: int, count: list[int]) -> None:
        if depth > MAX_NESTING:
            raise self.malformed(f"elements nested more than {MAX_NESTING} deep")
        count[0] += 1
        if count[0] > MAX_PARTS:
            raise self.malformed(f"more than {MAX_PARTS} elements where a small one is expected")
        _tag, length, raw = self.header()
        out += raw
        if length is not None:
            if len(out) + length > limit:
                raise self.malformed(f"element of {length} bytes where a small one is expected")
            out += self.read(length)
            return
        while self.peek(2) != b"\x00\x00":
            if len(out) >= limit:
                raise self.malformed(f"element of over {limit} bytes where a small one is expected")
            self._element_into(out, limit, depth + 1, count)
        out += self.read(2)

    def end_of(self, end: int | None) -> bool:
        """At the end of a container whose end offset (or None: indefinite) is ``end``."""
        if end is None:
            return self.peek(2) == b"\x00\x00"
        if self.pos > end:
            raise self.malformed("element overruns its container")
        return self.pos == end

    def close(self, end: int | None) -> None:
        if end is None:
            if self.read(2) != b"\x00\x00":
                raise self.malformed("missing end-of-contents octets")
        elif self.pos != end:
            raise self.malformed("container has unexpected trailing elements")

    def enter(self, expected: int, name: str) -> int | None:
        tag, length, _ = self.header()
        if tag != expected:
            raise self.malformed(f"expected {name} (tag 0x{expected:02x}), found tag 0x{tag:02x}")
        return None if length is None else self.pos + length

    def octets(self, sink: Callable[[bytes], None]) -> int:
        """Stream the content octets of an [IMPLICIT] OCTET STRING, any BER form."""
        tag, length, _ = self.header()
        return self._octets_body(tag, length, sink)

    def _octets_body(
        self, tag: int, length: int | None, sink: Callable[[bytes], None], depth: int = 0
    ) -> int:
        if not tag & 0x20:  # primitive
            assert length is not None
            left = length
            while left:
                data = self.read(min(CHUNK, left))
                sink(data)
                left -= len(data)
            return length
        if depth > MAX_NESTING:
            raise self.malformed(f"OCTET STRING segments nested more than {MAX_NESTING} deep")
        end = None if length is None else self.pos + length
        total = 0
        joined = bytearray()  # the octets of small segments, passed on a CHUNK at a time
        while True:
            # the segments wholly in the next window of the input, in bulk
            want = CHUNK if end is None else min(CHUNK, end - self.pos)
            if len(self._peeked) < want:
                self._peeked += self.f.read(want - len(self._peeked))
            window = self._peeked
            taken = primitive_segments(window, 0, min(len(window), max(want, 0)), joined)
            if taken:
                self._peeked = window[taken:]
                self.pos += taken
            if len(joined) >= CHUNK or (not taken and joined):
                sink(bytes(joined))
                total += len(joined)
                joined.clear()
            if taken:
                continue
            if self.end_of(end):
                break
            ctag, clen, _ = self.header()  # a big segment, or a constructed one
            if ctag not in (0x04, 0x24):
                raise self.malformed(
                    f"constructed OCTET STRING holds tag 0x{ctag:02x}, not OCTET STRING"
                )
            total += self._octets_body(ctag, clen, sink, depth + 1)
        self.close(end)
        return total


# -- writing -----------------------------------------------------------------------


def tl(tag: int, length: int) -> bytes:
    """The DER tag and definite length of an element of ``length`` content bytes."""
    if length < 0x80:
        return bytes((tag, length))
    if length < 0x100:
        return bytes((tag, 0x81, length))
    if length < 0x10000:
        return bytes((tag, 0x82, length >> 8, length & 0xFF))
    n = (length.bit_length() + 7) // 8
    return bytes((tag, 0x80 | n)) + length.to_bytes(n, "big")


def tlv(tag: int, value: bytes) -> bytes:
    """A whole DER element: tag, definite length, ``value``."""
    return tl(tag, len(value)) + value


@functools.lru_cache(maxsize=128)
def oid_der(dotted: str) -> bytes:
    out: bytes = core.ObjectIdentifier(dotted).dump()
    return out
