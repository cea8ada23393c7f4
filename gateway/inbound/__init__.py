"""Receiving: a peer's AS2 request from its body to the receipt (see ``pipeline``)."""

from gateway.inbound.pipeline import (
    DuplicateReceipt,
    InboundLocks,
    InboundProcessor,
    InboundRequest,
    InboundResponse,
)

__all__ = [
    "DuplicateReceipt",
    "InboundLocks",
    "InboundProcessor",
    "InboundRequest",
    "InboundResponse",
]
