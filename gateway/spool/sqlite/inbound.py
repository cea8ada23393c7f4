"""Received messages by (peer, Message-ID): delivered once, answered with the same receipt."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

from gateway.audit.events import EventType
from gateway.errors import ClaimHeldError
from gateway.spool.records import (
    DataKey,
    HandoverState,
    InboundDelivered,
    InboundRecord,
)
from gateway.spool.sql import AUDITED, FORGET_DISPLACED, Connection, Row, SqlStore


def _inbound(row: Row) -> InboundRecord:
    return InboundRecord(
        peer=row["peer"],
        message_id=row["message_id"],
        sha256=row["sha256"],
        target_path=Path(row["target_path"]),
        state=row["state"],
        receipt_headers=tuple(tuple(h) for h in json.loads(row["receipt_headers"] or "[]")),
        receipt_body=row["receipt_body"],
        service=row["service"],
        work_path=Path(row["work_path"]) if row["work_path"] else None,
        size=row["size"],
        received_at=row["received_at"],
        node=row["node"],
        lease_until=row["lease_until"] or 0.0,
        audited_by=row["audited_by"],
        audit_owed=row["audit_owed"],
        audit_owed_at=row["audit_owed_at"],
    )


class InboundDedup(SqlStore):
    """Received messages by (peer, Message-ID): delivered once, answered with the same receipt."""

    def inbound_get(self, peer: str, message_id: str) -> InboundRecord | None:
        row = self._one("SELECT * FROM inbound WHERE peer=? AND message_id=?", (peer, message_id))
        return None if row is None else _inbound(row)

    def inbound_unfinished(self) -> list[InboundRecord]:
        """See :meth:`gateway.spool.protocol.Spool.inbound_unfinished`."""
        now, _ = self._lease()
        return self._claim_delivering("(node=? OR node IS NULL OR lease_until<?)", (self.node, now))

    def inbound_changed_since(self, since: str) -> list[InboundRecord]:
        """See :meth:`gateway.spool.protocol.Spool.inbound_changed_since`."""
        rows = self._read(
            "SELECT * FROM inbound WHERE audit_owed_at>=? AND audited_by=?", (since, self.node)
        )
        return [_inbound(r) for r in rows]

    def inbound_in_progress(self) -> list[InboundRecord]:
        """See :meth:`gateway.spool.protocol.Spool.inbound_in_progress`."""
        return [
            _inbound(r) for r in self._read("SELECT * FROM inbound WHERE state='delivering'", ())
        ]

    def inbound_take_over(self) -> list[InboundRecord]:
        """See :meth:`gateway.spool.protocol.Spool.inbound_take_over`."""
        now, _ = self._lease()
        return self._claim_delivering(
            "node IS NOT NULL AND node!=? AND lease_until<?", (self.node, now)
        )

    def _claim_delivering(self, where: str, params: tuple[object, ...]) -> list[InboundRecord]:
        """Deliveries in the middle that match ``where``, claimed for this node in one
        transaction; returns them as they were (who held them before)."""
        _, lease_until = self._lease()

        def claim(db: Connection) -> list[Row]:
            # Locked as read (PostgreSQL): a renewal committing meanwhile is not overruled.
            rows = db.execute(
                f"SELECT * FROM inbound WHERE state='delivering' AND {where}"  # noqa: S608
                f"{self.claim_lock}",
                params,
            ).fetchall()
            db.executemany(
                "UPDATE inbound SET node=?, lease_until=? WHERE peer=? AND message_id=?"
                " AND state='delivering'",
                [(self.node, lease_until, r["peer"], r["message_id"]) for r in rows],
            )
            found: list[Row] = rows
            return found

        return [_inbound(r) for r in self._transact(claim)]

    def inbound_take(self, peer: str, message_id: str) -> InboundRecord | None:
        """See :meth:`gateway.spool.protocol.Spool.inbound_take`."""
        now, _ = self._lease()
        taken = self._claim_delivering(
            "peer=? AND message_id=? AND (node=? OR node IS NULL OR lease_until<?)",
            (peer, message_id, self.node, now),
        )
        if taken:
            return taken[0]
        held = self.inbound_get(peer, message_id)
        if held is None or held.state != "delivering":
            return None
        raise ClaimHeldError(
            f"message {message_id} from peer {peer} is being received by "
            f"{held.node or 'another node'} at the same time",
            fix="nothing to do: the peer resends it and is answered with its receipt",
        )

    def inbound_holds(self, peer: str, message_id: str) -> bool:
        """See :meth:`gateway.spool.protocol.Spool.inbound_holds`."""
        now, _ = self._lease()
        margin = self._claimant.lease_seconds / 2
        row = self._one(
            "SELECT 1 FROM inbound WHERE peer=? AND message_id=? AND state='delivering'"
            " AND node=? AND lease_until>?",
            (peer, message_id, self.node, now + margin),
        )
        return row is not None

    def inbound_target_claimed(self, target_path: Path) -> bool:
        return (
            self._one("SELECT 1 FROM inbound WHERE target_path=?", (str(target_path),)) is not None
        )

    def inbound_begin(
        self,
        peer: str,
        message_id: str,
        sha256: str,
        target_path: Path,
        service: str | None = None,
        *,
        work_path: Path | None = None,
        size: int | None = None,
    ) -> None:
        """See :meth:`gateway.spool.protocol.Spool.inbound_begin`."""
        now = self._now()
        _, lease_until = self._lease()
        claimed = self._write(
            # Any record there already - being delivered by another request or node, or
            # finished by one since the caller looked - is left as it is: ClaimHeldError.
            # Replacing a finished one would write its document into the inbox again.
            "INSERT INTO inbound (peer, message_id, sha256, target_path, state, received_at,"
            " updated_at, service, work_path, size, node, lease_until)"
            " VALUES (?,?,?,?,?,?,?,?,?,?,?,?)"
            " ON CONFLICT (peer, message_id) DO NOTHING",
            (
                peer,
                message_id,
                sha256,
                str(target_path),
                "delivering",
                now,
                now,
                service,
                str(work_path) if work_path is not None else None,
                size,
                self.node,
                lease_until,
            ),
        )
        if not claimed:
            held = self.inbound_get(peer, message_id)
            by = held.node if held is not None and held.node else "another node"
            raise ClaimHeldError(
                f"message {message_id} from peer {peer} is being received by {by} at the same time"
                if held is None or held.state == "delivering"
                else f"message {message_id} from peer {peer} was received by {by} meanwhile",
                fix="nothing to do: the peer resends it and is answered with its receipt",
            )

    def inbound_retarget(self, peer: str, message_id: str, target_path: Path) -> None:
        """A delivery in progress takes another name (its first one was taken meanwhile)."""
        self._write(
            "UPDATE inbound SET target_path=?, updated_at=? WHERE peer=? AND message_id=?"
            " AND state='delivering' AND node=?",
            (str(target_path), self._now(), peer, message_id, self.node),
        )

    def inbound_release(self, peer: str, message_id: str) -> bool:
        """See :meth:`gateway.spool.protocol.Spool.inbound_release`."""

        def work(db: Connection) -> bool:
            count = db.execute(
                "DELETE FROM inbound WHERE peer=? AND message_id=? AND state='delivering'"
                " AND (node=? OR node IS NULL)",
                (peer, message_id, self.node),
            ).rowcount
            if count != 1:
                return False
            # Retention never sees this row: what was kept of it goes with it.
            db.execute(FORGET_DISPLACED, ("inbound", peer, message_id))
            return True

        return self._transact(work)

    def inbound_written(self, peer: str, message_id: str) -> None:
        """An interrupted delivery is known to be in the inbox (and audited as such)."""
        self._write(
            "UPDATE inbound SET state='written', updated_at=?, lease_until=0 WHERE peer=?"
            " AND message_id=? AND state='delivering' AND (node=? OR node IS NULL)",
            (self._now(), peer, message_id, self.node),
        )

    def inbound_delivered(
        self,
        peer: str,
        message_id: str,
        receipt_headers: list[tuple[str, str]],
        receipt_body: bytes,
        handover: tuple[str, int] | None = None,
        *,
        data_key: DataKey | None = None,
    ) -> None:
        """See :meth:`gateway.spool.protocol.Spool.inbound_delivered`."""
        self.inbound_delivered_all(
            [InboundDelivered(peer, message_id, receipt_headers, receipt_body, handover, data_key)]
        )

    def inbound_delivered_all(self, delivered: Sequence[InboundDelivered]) -> None:
        """See :meth:`gateway.spool.protocol.Spool.inbound_delivered_all`."""
        now = self._now()
        audited = self._audited(EventType.RECEIPT_SENT, now)

        def work(db: Connection) -> None:
            for one in delivered:
                if one.handover is not None:
                    content_type, size = one.handover
                    # Only for a first delivery: a resend answered again after its stored
                    # receipt was disposed of (gateway.retention) was handed over already.
                    db.execute(
                        "INSERT INTO handover (peer, message_id, service, path,"
                        " content_type, sha256, size, state, created_at, updated_at)"
                        " SELECT peer, message_id, service, target_path, ?, sha256, ?, ?, ?, ?"
                        " FROM inbound WHERE peer=? AND message_id=? AND state!='delivered'"
                        " ON CONFLICT DO NOTHING",
                        (
                            content_type,
                            size,
                            HandoverState.PENDING.value,
                            now,
                            now,
                            one.peer,
                            one.message_id,
                        ),
                    )
                db.execute(
                    "UPDATE inbound SET state='delivered', receipt_headers=?, receipt_body=?,"  # noqa: S608 - fixed text
                    f" updated_at=?, lease_until=0, {AUDITED} WHERE peer=? AND message_id=?",
                    (
                        json.dumps(one.headers),
                        one.body,
                        now,
                        *audited,
                        one.peer,
                        one.message_id,
                    ),
                )
                if one.data_key is not None:
                    self._store_key(db, one.data_key)

        self._transact(work)
