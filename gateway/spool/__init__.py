"""The durable store of messages in transit.

Callers depend on the :class:`Spool` protocol (``protocol``) and the records it
returns (``records``); :func:`open_spool` chooses the backend: SQLite in WAL
mode (``sqlite``, its tables in ``schema``).
"""

from __future__ import annotations

from pathlib import Path

from gateway.clock import Clock
from gateway.spool.protocol import Spool
from gateway.spool.records import (
    PENDING_STATES,
    DataKey,
    Disposable,
    HandoverRecord,
    HandoverState,
    InboundRecord,
    OutboundRecord,
    OutboundState,
    PeerControl,
    RetainedKind,
)
from gateway.spool.sqlite import SqliteSpool


def open_spool(path: Path, clock: Clock) -> Spool:
    """The spool database at ``path`` (created if missing, upgraded if older)."""
    return SqliteSpool(path, clock)


__all__ = [
    "PENDING_STATES",
    "DataKey",
    "Disposable",
    "HandoverRecord",
    "HandoverState",
    "InboundRecord",
    "OutboundRecord",
    "OutboundState",
    "PeerControl",
    "RetainedKind",
    "Spool",
    "SqliteSpool",
    "open_spool",
]
