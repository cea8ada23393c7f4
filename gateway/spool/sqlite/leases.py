"""The leases of this node's claims, renewed together while it lives."""

from __future__ import annotations

from gateway.spool.records import OutboundState
from gateway.spool.sql import Connection, SqlStore


class Leases(SqlStore):
    """The leases of this node's claims, renewed together while it lives."""

    def renew_leases(self) -> int:
        """See :meth:`gateway.spool.protocol.Spool.renew_leases`."""
        _, lease_until = self._lease()

        def renew(db: Connection) -> int:
            sent = db.execute(
                "UPDATE outbound SET lease_until=? WHERE state IN (?, ?) AND node=?",
                (lease_until, OutboundState.INTAKE.value, OutboundState.SENDING.value, self.node),
            ).rowcount
            received = db.execute(
                "UPDATE inbound SET lease_until=? WHERE state='delivering' AND node=?",
                (lease_until, self.node),
            ).rowcount
            return int(sent) + int(received)

        return self._transact(renew)
