"""The SQLite spool: every state change of a message is one committed transaction.

Outbound rows follow the life cycle of :class:`~gateway.spool.records.OutboundState`;
``sending`` rows are claimed by a node under a lease (see the protocol); those of
this node found at start-up belong to a run that died mid-send and are queued
again (the receiver deduplicates by Message-ID, so a resend after a crash is
delivered once).  Inbound rows remember each (peer, Message-ID), the
SHA-256 of what was delivered and the receipt we sent, so that a resend is
answered with the original receipt instead of being delivered twice.
``submissions`` names who submitted a message (NET-3): a local API client, an
operator on the control socket, or the account owning a file taken from the
outbox folder.  The tables are in :mod:`gateway.spool.schema`.

The database runs with ``journal_mode=WAL`` and ``synchronous=FULL``: a
committed transition survives power loss.
"""

from __future__ import annotations

from gateway.spool.sqlite.database import Database
from gateway.spool.sqlite.datakeys import DataKeys
from gateway.spool.sqlite.displaced import DisplacedRecords
from gateway.spool.sqlite.handover import HandoverQueue
from gateway.spool.sqlite.inbound import InboundDedup
from gateway.spool.sqlite.leases import Leases
from gateway.spool.sqlite.outbound import OutboundQueue
from gateway.spool.sqlite.peers import PeerControls
from gateway.spool.sqlite.retention import RetainedItems

__all__ = ["SqliteSpool"]


class SqliteSpool(
    Database,
    OutboundQueue,
    InboundDedup,
    HandoverQueue,
    PeerControls,
    RetainedItems,
    DataKeys,
    Leases,
    DisplacedRecords,
):
    """The spool in one SQLite database (see :class:`gateway.spool.Spool`): one part per
    concern (``outbound``, ``inbound``, ``handover``, ``peers``, ``retention``,
    ``datakeys``, ``leases``, ``displaced``) over one ``database``."""
