"""Hand-overs of received documents to the internal system (at least once)."""

from __future__ import annotations

from pathlib import Path

from gateway.audit.events import EventType
from gateway.errors import SpoolError
from gateway.spool.records import (
    RETRIED_BY,
    HandoverRecord,
    HandoverState,
)
from gateway.spool.sql import AUDITED, Connection, Row, SqlStore, state_is


def _handover(row: Row) -> HandoverRecord:
    return HandoverRecord(
        peer=row["peer"],
        message_id=row["message_id"],
        service=row["service"],
        path=Path(row["path"]),
        content_type=row["content_type"],
        sha256=row["sha256"],
        size=row["size"],
        state=HandoverState(row["state"]),
        attempts=row["attempts"],
        next_attempt_at=row["next_attempt_at"],
        last_error=row["last_error"],
        created_at=row["created_at"],
        updated_at=row["updated_at"],
        expires_at=row["expires_at"] or 0.0,
        node=row["node"],
        lease_until=row["lease_until"] or 0.0,
        audited_by=row["audited_by"],
        audit_owed=row["audit_owed"],
        audit_owed_at=row["audit_owed_at"],
    )


class HandoverQueue(SqlStore):
    """Hand-overs of received documents to the internal system (at least once).

    A pending hand-over is taken by one node at a time to POST it (``node``, with a
    lease that node renews while it lives, see gateway.spool.sqlite.leases); the
    others leave it alone until it is settled, let go, or its lease runs out
    (:meth:`handover_take_over`)."""

    # Pending, and free for this node: held by nobody, or by this node (what its one
    # hand-over worker took before it was stopped or killed; see handover_due).
    # The state as text (see state_is): the worker's claims are planned for its rows.
    _FREE = f"{state_is(HandoverState.PENDING)} AND (node IS NULL OR node=?)"

    def handover_due(self, now: float, limit: int = 16) -> list[HandoverRecord]:
        """See :meth:`gateway.spool.protocol.Spool.handover_due`."""
        _, lease_until = self._lease()

        def claim(db: Connection) -> list[Row]:
            rows: list[Row] = db.execute(
                f"SELECT * FROM handover WHERE {self._FREE} AND next_attempt_at<=?"  # noqa: S608
                f" ORDER BY next_attempt_at, created_at LIMIT ?{self.claim_lock}",
                (self.node, now, max(0, limit)),
            ).fetchall()
            db.executemany(
                "UPDATE handover SET node=?, lease_until=? WHERE peer=? AND message_id=?",
                [(self.node, lease_until, r["peer"], r["message_id"]) for r in rows],
            )
            return rows

        return [_handover(r) for r in self._transact(claim)]

    def handover_next_at(self) -> float | None:
        """When the earliest pending hand-over this node may take is due (None: none)."""
        row = self._one(
            f"SELECT next_attempt_at FROM handover WHERE {self._FREE}"  # noqa: S608
            " ORDER BY next_attempt_at LIMIT 1",
            (self.node,),
        )
        return float(row["next_attempt_at"]) if row is not None else None

    def handover_holds(self, peer: str, message_id: str) -> bool:
        """See :meth:`gateway.spool.protocol.Spool.handover_holds`."""
        now, _ = self._lease()
        margin = self._claimant.lease_seconds / 2
        row = self._one(
            "SELECT 1 FROM handover WHERE peer=? AND message_id=? AND state=? AND node=?"
            " AND lease_until>?",
            (peer, message_id, HandoverState.PENDING.value, self.node, now + margin),
        )
        return row is not None

    def handover_release(
        self, peer: str, message_id: str, next_attempt_at: float | None = None
    ) -> bool:
        """See :meth:`gateway.spool.protocol.Spool.handover_release`."""
        return (
            self._write(
                "UPDATE handover SET node=NULL, lease_until=0,"
                " next_attempt_at=COALESCE(?, next_attempt_at) WHERE peer=? AND message_id=?"
                " AND state=? AND node=?",
                (next_attempt_at, peer, message_id, HandoverState.PENDING.value, self.node),
            )
            == 1
        )

    def handover_take_over(self) -> list[HandoverRecord]:
        """See :meth:`gateway.spool.protocol.Spool.handover_take_over`."""
        now, _ = self._lease()

        def release(db: Connection) -> list[Row]:
            # Locked as read (PostgreSQL): a renewal committing meanwhile is not overruled.
            rows: list[Row] = db.execute(
                f"SELECT * FROM handover WHERE {state_is(HandoverState.PENDING)}"  # noqa: S608
                f" AND node IS NOT NULL AND node!=? AND lease_until<?{self.claim_lock}",
                (self.node, now),
            ).fetchall()
            db.executemany(
                "UPDATE handover SET node=NULL, lease_until=0 WHERE peer=? AND message_id=?"
                " AND state=?",
                [(r["peer"], r["message_id"], HandoverState.PENDING.value) for r in rows],
            )
            return rows

        return [_handover(r) for r in self._transact(release)]

    def handover_get(self, peer: str, message_id: str) -> HandoverRecord | None:
        row = self._one("SELECT * FROM handover WHERE peer=? AND message_id=?", (peer, message_id))
        return _handover(row) if row else None

    def handover_done(self, peer: str, message_id: str) -> None:
        """See :meth:`gateway.spool.protocol.Spool.handover_done`."""
        now = self._now()
        self._write(
            "UPDATE handover SET state=?, attempts=attempts+1, last_error=NULL, updated_at=?,"  # noqa: S608 - fixed text
            f" node=NULL, lease_until=0, {AUDITED} WHERE peer=? AND message_id=?",
            (
                HandoverState.DONE.value,
                now,
                *self._audited(EventType.MESSAGE_HANDED_OVER, now),
                peer,
                message_id,
            ),
        )

    def handover_retry(self, peer: str, message_id: str, error: str, next_at: float) -> bool:
        """See :meth:`gateway.spool.protocol.Spool.handover_retry`."""
        return (
            self._write(
                "UPDATE handover SET attempts=attempts+1, last_error=?, next_attempt_at=?,"  # noqa: S608
                " updated_at=?, node=NULL, lease_until=0 WHERE peer=? AND message_id=?"
                f" AND {self._FREE}",
                (
                    error,
                    next_at,
                    self._now(),
                    peer,
                    message_id,
                    self.node,
                ),
            )
            == 1
        )

    def handover_failed(self, peer: str, message_id: str, error: str) -> bool:
        """See :meth:`gateway.spool.protocol.Spool.handover_failed`."""
        now = self._now()
        return (
            self._write(
                "UPDATE handover SET state=?, attempts=attempts+1, last_error=?, updated_at=?,"  # noqa: S608
                f" node=NULL, lease_until=0, {AUDITED} WHERE peer=? AND message_id=?"
                f" AND {self._FREE}",
                (
                    HandoverState.FAILED.value,
                    error,
                    now,
                    *self._audited(EventType.HANDOVER_FAILED, now),
                    peer,
                    message_id,
                    self.node,
                ),
            )
            == 1
        )

    def handover_changed_since(self, since: str) -> list[HandoverRecord]:
        """See :meth:`gateway.spool.protocol.Spool.handover_changed_since`."""
        rows = self._read(
            "SELECT * FROM handover WHERE audit_owed_at>=? AND audited_by=?", (since, self.node)
        )
        return [_handover(r) for r in rows]

    def handover_list(
        self, state: HandoverState | None = None, message_id: str | None = None
    ) -> list[HandoverRecord]:
        """Hand-overs, newest first; only those in ``state`` / with ``message_id`` if given."""
        clauses: list[str] = []
        params: list[str] = []
        if state is not None:
            # The state as text (see state_is): planned for its own rows, read through an
            # index by state, not the whole table (mostly hand-overs done, kept for months).
            clauses.append(state_is(state))
        if message_id:
            clauses.append("message_id=?")
            params.append(message_id)
        where = " AND ".join(clauses)
        rows = self._read(
            "SELECT * FROM handover"  # noqa: S608 - fixed text and the spool's own states
            + (f" WHERE {where}" if where else "")
            + " ORDER BY created_at DESC, message_id",
            tuple(params),
        )
        return [_handover(r) for r in rows]

    def handover_operator_retry(
        self, peer: str, message_id: str, actor: str, expires_at: float
    ) -> HandoverRecord:
        """A ``failed`` hand-over back to ``pending``: attempts reset, a new expiry."""
        now = self._now()
        changed = self._write(
            "UPDATE handover SET state=?, attempts=0, next_attempt_at=0, last_error=?,"  # noqa: S608 - fixed text
            f" expires_at=?, updated_at=?, node=NULL, lease_until=0, {AUDITED}"
            " WHERE peer=? AND message_id=? AND state=?",
            (
                HandoverState.PENDING.value,
                f"{RETRIED_BY[0]}{actor}",
                expires_at,
                now,
                *self._audited(EventType.HANDOVER_RETRIED, now),
                peer,
                message_id,
                HandoverState.FAILED.value,
            ),
        )
        record = self.handover_get(peer, message_id)
        if record is None:
            raise SpoolError(
                f"no hand-over of message {message_id} from peer {peer}",
                fix="check the id with `medgw handover list`",
            )
        if not changed:
            raise SpoolError(
                f"the hand-over of message {message_id} is {record.state.value}; only a failed "
                "hand-over can be retried",
                fix="see `medgw handover list`; a pending one is retried by itself, a done one "
                "was answered 2xx by the internal system",
            )
        return record
