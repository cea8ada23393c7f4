"""What every audit record's hash is computed over, shared by the writer and the verifier."""

from __future__ import annotations

import json
from typing import Any

GENESIS = "0" * 64  # the ``prev`` of the first record ever written


def canonical(record: dict[str, Any]) -> bytes:
    return json.dumps(record, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()
