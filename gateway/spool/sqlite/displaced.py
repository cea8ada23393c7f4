"""Records a node's changes owe that another node's later change displaced.

A row names the record its last audited change owes (``audited_by``, ``audit_owed``,
``audit_owed_at``), until a later audited change names its own.  When another node
takes the row on (claims it, or changes it and names its own record), a trigger of the
table (gateway.spool.schema.DISPLACES) keeps the row as it was in ``displaced_owed``,
in that change's transaction: the first node's next start writes the record if a kill
cut it off, then forgets it.  Nothing is added to a change that does not pass a row
owing another node's record on.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

from gateway.spool.records import DisplacedOwed
from gateway.spool.schema import BINARY_COLUMNS, columns
from gateway.spool.sql import Connection, SqlStore
from gateway.spool.sqlite.handover import _handover
from gateway.spool.sqlite.inbound import _inbound
from gateway.spool.sqlite.outbound import _outbound

_FORGET = (
    "DELETE FROM displaced_owed WHERE node=? AND source=? AND peer=? AND message_id=? AND owed_at=?"
)


class DisplacedRecords(SqlStore):
    """This node's displaced records: read at its start, forgotten once written."""

    def displaced_owed(self) -> DisplacedOwed:
        """See :meth:`gateway.spool.protocol.Spool.displaced_owed`."""
        rows = self._read(
            "SELECT source, snapshot FROM displaced_owed WHERE node=? ORDER BY owed_at",
            (self.node,),
        )
        found: dict[str, list[Any]] = {"outbound": [], "inbound": [], "handover": []}
        read: dict[str, Callable[[Any], Any]] = {
            "outbound": _outbound,
            "inbound": _inbound,
            "handover": _handover,
        }
        for row in rows:
            # Every column the table has now: the binary ones are left out of a copy, and
            # a copy kept before an upgrade lacks the columns added since (receipt_sha256).
            source = row["source"]
            missing = dict.fromkeys((*columns(source), *BINARY_COLUMNS))
            snapshot = {**missing, **json.loads(row["snapshot"])}
            found[source].append(read[source](snapshot))
        return DisplacedOwed(
            tuple(found["outbound"]), tuple(found["inbound"]), tuple(found["handover"])
        )

    def forget_displaced(self, displaced: DisplacedOwed) -> None:
        """See :meth:`gateway.spool.protocol.Spool.forget_displaced`."""
        keys = [
            (self.node, source, r.peer, r.message_id, r.audit_owed_at)
            for source, records in (
                ("outbound", displaced.outbound),
                ("inbound", displaced.inbound),
                ("handover", displaced.handover),
            )
            for r in records
        ]

        def forget(db: Connection) -> None:
            db.executemany(_FORGET, keys)

        if keys:
            self._transact(forget)
