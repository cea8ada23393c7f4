"""The durable store of messages in transit (SQLite in WAL mode by default)."""

from gateway.spool.sqlite import (
    InboundRecord,
    OutboundRecord,
    OutboundState,
    PeerControl,
    Spool,
)

__all__ = ["InboundRecord", "OutboundRecord", "OutboundState", "PeerControl", "Spool"]
