"""The sending pipeline: outbox -> sign and encrypt -> spool -> POST -> receipt.

One module per step, all over one shared ``context`` (the runtime state read
now, the spool, the audit trail, worker threads):

- ``intake``: documents taken from the outbox folder into the spool;
- ``submit``: documents streamed by local submitters (local API, control socket);
- ``seal``: a spooled document signed, encrypted and queued;
- ``recover``: what a killed process left half-done, finished at start-up;
- ``send``: queued messages claimed, POSTed, retried, expired or made dead letters;
- ``settle``: a sent message settled by its signed receipt (sync or async);
- ``status``: a message's state with its stored receipt verified again;
- ``pipeline``: :class:`Outbound`, the one object the daemon holds over them.

Intake is crash-safe in three committed steps: a spool row in state
``intake`` is written first, then the file is moved from the outbox into the
spool, then the signed and encrypted AS2 body is written and the row becomes
``queued`` (and the plaintext copy is removed).  :meth:`Outbound.recover`
finishes whatever a killed process left half-done, so a document taken from
the outbox is never lost and never sent twice as two messages.

Each peer has its own sender task, so a slow or dead peer never delays
documents to the others.
"""

from __future__ import annotations

from gateway.outbound.context import Current, Settings
from gateway.outbound.pipeline import Outbound
from gateway.outbound.seal import INLINE_BODY_BYTES

__all__ = ["INLINE_BODY_BYTES", "Current", "Outbound", "Settings"]
