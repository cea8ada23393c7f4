"""Operator controls per peer (suspended or not)."""

from __future__ import annotations

from gateway.spool.records import (
    PeerControl,
)
from gateway.spool.sql import SqlStore


class PeerControls(SqlStore):
    """Operator controls per peer (suspended or not)."""

    def set_suspended(self, peer: str, suspended: bool, reason: str, actor: str) -> None:
        self._write(
            "INSERT INTO peer_control (peer, suspended, reason, actor, changed_at)"
            " VALUES (?,?,?,?,?) ON CONFLICT (peer) DO UPDATE SET suspended=excluded.suspended,"
            " reason=excluded.reason, actor=excluded.actor, changed_at=excluded.changed_at",
            (peer, int(suspended), reason, actor, self._now()),
        )

    def peer_controls(self) -> dict[str, PeerControl]:
        rows = self._read("SELECT * FROM peer_control", ())
        return {
            r["peer"]: PeerControl(
                r["peer"], bool(r["suspended"]), r["reason"], r["actor"], r["changed_at"]
            )
            for r in rows
        }

    def is_suspended(self, peer: str) -> bool:
        row = self._one("SELECT suspended FROM peer_control WHERE peer=?", (peer,))
        return bool(row and row["suspended"])
