"""What every audit record's hash is computed over, shared by the writer and the verifier."""

from __future__ import annotations

import hashlib
import json
from typing import Any

GENESIS = "0" * 64  # the ``prev`` of the first record ever written
HASH = "hash"  # the member that holds a record's hash, left out of what is hashed

# Holds no state between calls: one encoder instead of one made by every json.dumps.
_ENCODER = json.JSONEncoder(sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def canonical(record: dict[str, Any]) -> bytes:
    """``record`` as JSON: keys sorted at every level, no spaces, UTF-8 as is."""
    return _ENCODER.encode(record).encode()


def hashed_line(record: dict[str, Any]) -> tuple[str, bytes]:
    """The hash of ``record`` (which has no ``hash`` member) and its line: ``canonical``
    of the record with that hash among its members, without the newline.

    The record is serialised once, as two halves: its members that sort before ``hash``
    and those that sort after it.  What is hashed is the two joined; the line is the
    two joined around the hash member, which is where sorting the keys puts it (no
    member's text depends on another's)."""
    head = _ENCODER.encode({k: v for k, v in record.items() if k < HASH})[1:-1]
    tail = _ENCODER.encode({k: v for k, v in record.items() if k > HASH})[1:-1]
    comma = "," if head and tail else ""
    digest = hashlib.sha256(f"{{{head}{comma}{tail}}}".encode()).hexdigest()
    members = (head, f'"{HASH}":"{digest}"', tail)
    return digest, ("{" + ",".join(m for m in members if m) + "}").encode()
