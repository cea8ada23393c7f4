"""The leases of this node's claims, renewed together while it lives."""

from __future__ import annotations

from gateway.spool.records import HandoverState, OutboundState
from gateway.spool.sql import Connection, SqlStore, state_is


class Leases(SqlStore):
    """The leases of this node's claims, renewed together while it lives."""

    def renew_leases(self) -> int:
        """See :meth:`gateway.spool.protocol.Spool.renew_leases`."""
        _, lease_until = self._lease()

        def renew(db: Connection) -> int:
            # One state per statement: with statistics (ANALYZE), SQLite reckons that
            # two states' share of a long queue costs as much as reading it whole and
            # scans every waiting message; one state is looked up by outbound_state.
            # The state as text: a plan made for any state (PostgreSQL's generic plans)
            # reckons with an average state's share of the table, mostly delivered
            # messages, and reads it whole.
            sent = sum(
                db.execute(
                    f"UPDATE outbound SET lease_until=? WHERE {state_is(state)}"  # noqa: S608 - fixed text
                    " AND node=?",
                    (lease_until, self.node),
                ).rowcount
                for state in (OutboundState.INTAKE, OutboundState.SENDING)
            )
            received = db.execute(
                "UPDATE inbound SET lease_until=? WHERE state='delivering' AND node=?",
                (lease_until, self.node),
            ).rowcount
            handing = db.execute(
                "UPDATE handover SET lease_until=?"  # noqa: S608 - fixed text
                f" WHERE {state_is(HandoverState.PENDING)} AND node=?",
                (lease_until, self.node),
            ).rowcount
            return int(sent) + int(received) + int(handing)

        return self._transact(renew)
