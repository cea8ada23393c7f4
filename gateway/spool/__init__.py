"""The durable store of messages in transit (SQLite in WAL mode by default)."""

from gateway.spool.sqlite import (
    HandoverRecord,
    HandoverState,
    InboundRecord,
    OutboundRecord,
    OutboundState,
    PeerControl,
    Spool,
)

__all__ = [
    "HandoverRecord",
    "HandoverState",
    "InboundRecord",
    "OutboundRecord",
    "OutboundState",
    "PeerControl",
    "Spool",
]
