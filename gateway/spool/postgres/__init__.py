"""The spool in a PostgreSQL database, which several gateway nodes can share.

The same parts as the SQLite spool (``outbound``, ``inbound``, ``handover``,
``peers``, ``retention``, ``datakeys``, ``leases``, ``displaced``: the same statements,
the same states, every change one transaction with the same preconditions) over
:mod:`.database`'s connections; the claim of messages to send is ``FOR UPDATE SKIP LOCKED``.
"""

from __future__ import annotations

from gateway.spool.postgres.database import PostgresDatabase
from gateway.spool.postgres.settings import PostgresSettings
from gateway.spool.sqlite.datakeys import DataKeys
from gateway.spool.sqlite.displaced import DisplacedRecords
from gateway.spool.sqlite.handover import HandoverQueue
from gateway.spool.sqlite.inbound import InboundDedup
from gateway.spool.sqlite.leases import Leases
from gateway.spool.sqlite.outbound import OutboundQueue
from gateway.spool.sqlite.peers import PeerControls
from gateway.spool.sqlite.retention import RetainedItems

__all__ = ["PostgresSettings", "PostgresSpool"]


class PostgresSpool(
    PostgresDatabase,
    OutboundQueue,
    InboundDedup,
    HandoverQueue,
    PeerControls,
    RetainedItems,
    DataKeys,
    Leases,
    DisplacedRecords,
):
    """The spool in one PostgreSQL database (see :class:`gateway.spool.Spool`)."""

    def renew_leases(self) -> int:
        """See :meth:`gateway.spool.protocol.Spool.renew_leases`; a running node's name held
        first (:meth:`PostgresDatabase.hold_name`): claims are renewed only under it; and
        the database server's clock read again, which the leases are judged by."""
        if self._holds_name:
            self.hold_name()
        self.clock_offset()
        return super().renew_leases()
