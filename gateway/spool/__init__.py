"""The durable store of messages in transit.

Callers depend on the :class:`Spool` protocol (``protocol``) and the records it
returns (``records``); :func:`open_spool` chooses the backend: SQLite in WAL
mode (``sqlite``, its tables in ``schema``), or PostgreSQL (``postgres``).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from gateway.clock import Clock
from gateway.errors import SpoolReplacedError
from gateway.spool.postgres import PostgresSettings, PostgresSpool
from gateway.spool.protocol import Spool
from gateway.spool.records import (
    PENDING_STATES,
    Claimant,
    DataKey,
    Disposable,
    HandoverRecord,
    HandoverState,
    InboundDelivered,
    InboundRecord,
    Intake,
    OutboundRecord,
    OutboundState,
    PeerControl,
    Prepared,
    RetainedKind,
    Settled,
)
from gateway.spool.sqlite import SqliteSpool


def open_spool(
    path: Path,
    clock: Clock,
    postgres: PostgresSettings | None = None,
    claimant: Claimant | None = None,
    *,
    on_change: Callable[[str | None], None] | None = None,
    on_replaced: Callable[[SpoolReplacedError], None] | None = None,
    hold_name: bool = False,
    on_clock: Callable[[float], None] | None = None,
    command: bool = False,
) -> Spool:
    """The SQLite spool at ``path``, or with ``postgres`` the spool in that database
    (``on_change``, ``on_replaced``: see gateway.spool.postgres.database); created if missing,
    upgraded if older; its work is claimed as ``claimant`` (a node of several sharing
    it; default: this host's name); ``hold_name``: a running node's, which holds its name
    on a shared spool for its life, ``on_clock`` hears its clock's difference to the
    server's, ``command``: a command's, its sessions named as such
    (gateway.spool.postgres.database)."""
    if postgres is not None:
        return PostgresSpool(
            postgres,
            clock,
            claimant,
            on_change=on_change,
            on_replaced=on_replaced,
            hold_name=hold_name,
            on_clock=on_clock,
            command=command,
        )
    return SqliteSpool(path, clock, claimant)


__all__ = [
    "PENDING_STATES",
    "Claimant",
    "DataKey",
    "Disposable",
    "HandoverRecord",
    "HandoverState",
    "InboundDelivered",
    "InboundRecord",
    "Intake",
    "OutboundRecord",
    "OutboundState",
    "PeerControl",
    "Prepared",
    "RetainedKind",
    "Settled",
    "Spool",
    "SqliteSpool",
    "open_spool",
]
