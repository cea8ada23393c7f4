"""Receiving a peer's AS2 message.

- ``pipeline``: the request, from its body to the receipt (check, decrypt, verify, answer);
- ``exactly_once``: the document put in the inbox exactly once;
- ``settling``: the receipts of the documents delivered at one moment stored together;
- ``recovery``: at start, the deliveries a stopped process left in the middle;
- ``signers``: who may sign a peer's messages, and what is said about the one who did;
- ``receipts``: the signed receipt that answers a message;
- ``outcomes``: a refusal, a resend answered with its receipt, the audit record;
- ``locks``: what keeps concurrent requests apart.
"""

from gateway.inbound.locks import InboundLocks
from gateway.inbound.outcomes import DuplicateReceipt
from gateway.inbound.pipeline import (
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
