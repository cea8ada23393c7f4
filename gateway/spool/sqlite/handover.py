"""Hand-overs of received documents to the internal system (at least once)."""

from __future__ import annotations

from pathlib import Path

from gateway.errors import SpoolError
from gateway.spool.records import (
    HandoverRecord,
    HandoverState,
)
from gateway.spool.sql import Row, SqlStore


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
    )


class HandoverQueue(SqlStore):
    """Hand-overs of received documents to the internal system (at least once)."""

    def handover_due(self, now: float, limit: int = 16) -> list[HandoverRecord]:
        rows = self._read(
            "SELECT * FROM handover WHERE state=? AND next_attempt_at<=?"
            " ORDER BY next_attempt_at, created_at LIMIT ?",
            (HandoverState.PENDING.value, now, limit),
        )
        return [_handover(r) for r in rows]

    def handover_next_at(self) -> float | None:
        """When the earliest pending hand-over is due (None: nothing pending)."""
        row = self._one(
            "SELECT MIN(next_attempt_at) AS t FROM handover WHERE state=?",
            (HandoverState.PENDING.value,),
        )
        return float(row["t"]) if row is not None and row["t"] is not None else None

    def handover_get(self, peer: str, message_id: str) -> HandoverRecord | None:
        row = self._one("SELECT * FROM handover WHERE peer=? AND message_id=?", (peer, message_id))
        return _handover(row) if row else None

    def handover_done(self, peer: str, message_id: str) -> None:
        self._write(
            "UPDATE handover SET state=?, attempts=attempts+1, last_error=NULL, updated_at=?"
            " WHERE peer=? AND message_id=?",
            (HandoverState.DONE.value, self._now(), peer, message_id),
        )

    def handover_retry(self, peer: str, message_id: str, error: str, next_at: float) -> None:
        self._write(
            "UPDATE handover SET attempts=attempts+1, last_error=?, next_attempt_at=?,"
            " updated_at=? WHERE peer=? AND message_id=?",
            (error, next_at, self._now(), peer, message_id),
        )

    def handover_failed(self, peer: str, message_id: str, error: str) -> None:
        self._write(
            "UPDATE handover SET state=?, attempts=attempts+1, last_error=?, updated_at=?"
            " WHERE peer=? AND message_id=?",
            (HandoverState.FAILED.value, error, self._now(), peer, message_id),
        )

    def handover_list(
        self, state: HandoverState | None = None, message_id: str | None = None
    ) -> list[HandoverRecord]:
        """Hand-overs, newest first; only those in ``state`` / with ``message_id`` if given."""
        clauses = [(c, v) for c, v in (("state", state), ("message_id", message_id)) if v]
        where = " AND ".join(f"{column}=?" for column, _ in clauses)
        rows = self._read(
            "SELECT * FROM handover"  # noqa: S608 - column names are fixed above
            + (f" WHERE {where}" if where else "")
            + " ORDER BY created_at DESC, message_id",
            tuple(str(v) for _, v in clauses),
        )
        return [_handover(r) for r in rows]

    def handover_operator_retry(
        self, peer: str, message_id: str, actor: str, expires_at: float
    ) -> HandoverRecord:
        """A ``failed`` hand-over back to ``pending``: attempts reset, a new expiry."""
        changed = self._write(
            "UPDATE handover SET state=?, attempts=0, next_attempt_at=0, last_error=?,"
            " expires_at=?, updated_at=? WHERE peer=? AND message_id=? AND state=?",
            (
                HandoverState.PENDING.value,
                f"retry requested by {actor}",
                expires_at,
                self._now(),
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
