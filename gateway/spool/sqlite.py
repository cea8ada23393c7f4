"""SQLite spool: every state change of a message is one committed transaction.

Outbound life cycle::

    intake ──► queued ──► sending ──► delivered
                 ▲           │
                 └── retry ◄─┤  (connection or HTTP failure: back-off)
                             └──► failed  (negative or invalid receipt)

``intake`` means "taken from the outbox, not yet signed and encrypted";
``sending`` rows found at start-up belong to a run that died mid-send and are
queued again (the receiver deduplicates by Message-ID, so a resend after a
crash is delivered once).  Inbound rows remember each (peer, Message-ID), the
SHA-256 of what was delivered and the receipt we sent, so that a resend is
answered with the original receipt instead of being delivered twice.

The database runs with ``journal_mode=WAL`` and ``synchronous=FULL``: a
committed transition survives power loss.
"""

from __future__ import annotations

import json
import sqlite3
import threading
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Any

from gateway.clock import Clock
from gateway.errors import SpoolError

SCHEMA = """
CREATE TABLE IF NOT EXISTS outbound (
    message_id      TEXT PRIMARY KEY,
    peer            TEXT NOT NULL,
    filename        TEXT NOT NULL,
    content_type    TEXT NOT NULL,
    source_path     TEXT NOT NULL,
    payload_path    TEXT NOT NULL,
    body_path       TEXT,
    headers         TEXT,
    mic             TEXT,
    size            INTEGER,
    state           TEXT NOT NULL,
    attempts        INTEGER NOT NULL DEFAULT 0,
    next_attempt_at REAL NOT NULL DEFAULT 0,
    last_error      TEXT,
    disposition     TEXT,
    receipt_path    TEXT,
    created_at      TEXT NOT NULL,
    updated_at      TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS outbound_due ON outbound (peer, state, next_attempt_at);
CREATE TABLE IF NOT EXISTS inbound (
    peer            TEXT NOT NULL,
    message_id      TEXT NOT NULL,
    sha256          TEXT NOT NULL,
    target_path     TEXT NOT NULL,
    state           TEXT NOT NULL,
    receipt_headers TEXT,
    receipt_body    BLOB,
    received_at     TEXT NOT NULL,
    updated_at      TEXT NOT NULL,
    PRIMARY KEY (peer, message_id)
);
CREATE INDEX IF NOT EXISTS inbound_target ON inbound (target_path);
"""


class OutboundState(StrEnum):
    INTAKE = "intake"
    QUEUED = "queued"
    SENDING = "sending"
    DELIVERED = "delivered"
    FAILED = "failed"


@dataclass(frozen=True)
class OutboundRecord:
    message_id: str
    peer: str
    filename: str
    content_type: str
    source_path: Path
    payload_path: Path
    body_path: Path | None
    headers: tuple[tuple[str, str], ...]
    mic: str | None
    size: int | None
    state: OutboundState
    attempts: int
    next_attempt_at: float
    last_error: str | None
    disposition: str | None
    receipt_path: Path | None


@dataclass(frozen=True)
class InboundRecord:
    peer: str
    message_id: str
    sha256: str
    target_path: Path
    state: str  # "delivering" or "delivered"
    receipt_headers: tuple[tuple[str, str], ...]
    receipt_body: bytes | None


def _outbound(row: sqlite3.Row) -> OutboundRecord:
    return OutboundRecord(
        message_id=row["message_id"],
        peer=row["peer"],
        filename=row["filename"],
        content_type=row["content_type"],
        source_path=Path(row["source_path"]),
        payload_path=Path(row["payload_path"]),
        body_path=Path(row["body_path"]) if row["body_path"] else None,
        headers=tuple(tuple(h) for h in json.loads(row["headers"] or "[]")),
        mic=row["mic"],
        size=row["size"],
        state=OutboundState(row["state"]),
        attempts=row["attempts"],
        next_attempt_at=row["next_attempt_at"],
        last_error=row["last_error"],
        disposition=row["disposition"],
        receipt_path=Path(row["receipt_path"]) if row["receipt_path"] else None,
    )


class Spool:
    def __init__(self, path: Path, clock: Clock) -> None:
        self._clock = clock
        # One connection shared by the event loop and worker threads; the lock
        # keeps each transaction whole.
        self._lock = threading.RLock()
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            self._db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
            self._db.row_factory = sqlite3.Row
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=FULL")
            self._db.execute("PRAGMA busy_timeout=5000")
            self._db.executescript(SCHEMA)
        except sqlite3.Error as exc:
            raise SpoolError(
                f"cannot open the spool database {path}: {exc}",
                fix="check that the state directory is writable and the disk is not full",
            ) from exc

    def close(self) -> None:
        self._db.close()

    def _read(self, sql: str, params: tuple[Any, ...]) -> list[sqlite3.Row]:
        with self._lock:
            return self._db.execute(sql, params).fetchall()

    def _one(self, sql: str, params: tuple[Any, ...]) -> sqlite3.Row | None:
        rows = self._read(sql, params)
        return rows[0] if rows else None

    def _now(self) -> str:
        return self._clock.now().isoformat()

    def _write(self, sql: str, params: tuple[Any, ...]) -> int:
        try:
            with self._lock, self._db:  # one transaction, committed (and fsync'ed) on exit
                self._db.execute("BEGIN IMMEDIATE")
                return self._db.execute(sql, params).rowcount
        except sqlite3.Error as exc:
            raise SpoolError(
                f"spool write failed: {exc}",
                fix="check free disk space and permissions of the state directory",
            ) from exc

    # -- outbound -------------------------------------------------------------

    def add_intake(
        self,
        message_id: str,
        peer: str,
        filename: str,
        content_type: str,
        source_path: Path,
        payload_path: Path,
    ) -> None:
        now = self._now()
        self._write(
            "INSERT INTO outbound (message_id, peer, filename, content_type, source_path,"
            " payload_path, state, created_at, updated_at) VALUES (?,?,?,?,?,?,?,?,?)",
            (
                message_id,
                peer,
                filename,
                content_type,
                str(source_path),
                str(payload_path),
                OutboundState.INTAKE.value,
                now,
                now,
            ),
        )

    def mark_queued(
        self, message_id: str, body_path: Path, headers: list[tuple[str, str]], mic: str, size: int
    ) -> None:
        self._write(
            "UPDATE outbound SET state=?, body_path=?, headers=?, mic=?, size=?, updated_at=?"
            " WHERE message_id=? AND state=?",
            (
                OutboundState.QUEUED.value,
                str(body_path),
                json.dumps(headers),
                mic,
                size,
                self._now(),
                message_id,
                OutboundState.INTAKE.value,
            ),
        )

    def mark_sending(self, message_id: str) -> None:
        self._write(
            "UPDATE outbound SET state=?, attempts=attempts+1, updated_at=? WHERE message_id=?",
            (OutboundState.SENDING.value, self._now(), message_id),
        )

    def mark_retry(self, message_id: str, error: str, next_attempt_at: float) -> None:
        self._write(
            "UPDATE outbound SET state=?, last_error=?, next_attempt_at=?, updated_at=?"
            " WHERE message_id=?",
            (OutboundState.QUEUED.value, error, next_attempt_at, self._now(), message_id),
        )

    def mark_done(
        self,
        message_id: str,
        state: OutboundState,
        disposition: str,
        receipt_path: Path | None,
        error: str | None = None,
    ) -> None:
        self._write(
            "UPDATE outbound SET state=?, disposition=?, receipt_path=?, last_error=?,"
            " updated_at=? WHERE message_id=?",
            (
                state.value,
                disposition,
                str(receipt_path) if receipt_path else None,
                error,
                self._now(),
                message_id,
            ),
        )

    def get(self, message_id: str) -> OutboundRecord | None:
        row = self._one("SELECT * FROM outbound WHERE message_id=?", (message_id,))
        return _outbound(row) if row else None

    def in_state(self, state: OutboundState) -> list[OutboundRecord]:
        rows = self._read(
            "SELECT * FROM outbound WHERE state=? ORDER BY created_at", (state.value,)
        )
        return [_outbound(r) for r in rows]

    def all_outbound(self) -> list[OutboundRecord]:
        rows = self._read("SELECT * FROM outbound ORDER BY created_at", ())
        return [_outbound(r) for r in rows]

    def next_due(self, peer: str) -> OutboundRecord | None:
        """The oldest queued message for ``peer`` (due or not: the caller checks the time)."""
        row = self._one(
            "SELECT * FROM outbound WHERE peer=? AND state=? ORDER BY next_attempt_at, created_at"
            " LIMIT 1",
            (peer, OutboundState.QUEUED.value),
        )
        return _outbound(row) if row else None

    def requeue_interrupted(self) -> list[str]:
        """At start-up: messages a previous run was sending go back to the queue."""
        rows = self._read(
            "SELECT message_id FROM outbound WHERE state=?", (OutboundState.SENDING.value,)
        )
        ids = [r["message_id"] for r in rows]
        if ids:
            self._write(
                "UPDATE outbound SET state=?, next_attempt_at=0, updated_at=? WHERE state=?",
                (OutboundState.QUEUED.value, self._now(), OutboundState.SENDING.value),
            )
        return ids

    def known_source(self, source_path: Path) -> bool:
        row = self._one(
            "SELECT 1 FROM outbound WHERE source_path=? AND state=?",
            (str(source_path), OutboundState.INTAKE.value),
        )
        return row is not None

    # -- inbound --------------------------------------------------------------

    def inbound_get(self, peer: str, message_id: str) -> InboundRecord | None:
        row = self._one("SELECT * FROM inbound WHERE peer=? AND message_id=?", (peer, message_id))
        if row is None:
            return None
        return InboundRecord(
            peer=row["peer"],
            message_id=row["message_id"],
            sha256=row["sha256"],
            target_path=Path(row["target_path"]),
            state=row["state"],
            receipt_headers=tuple(tuple(h) for h in json.loads(row["receipt_headers"] or "[]")),
            receipt_body=row["receipt_body"],
        )

    def inbound_target_claimed(self, target_path: Path) -> bool:
        return (
            self._one("SELECT 1 FROM inbound WHERE target_path=?", (str(target_path),)) is not None
        )

    def inbound_begin(self, peer: str, message_id: str, sha256: str, target_path: Path) -> None:
        now = self._now()
        self._write(
            "INSERT OR REPLACE INTO inbound (peer, message_id, sha256, target_path, state,"
            " received_at, updated_at) VALUES (?,?,?,?,?,?,?)",
            (peer, message_id, sha256, str(target_path), "delivering", now, now),
        )

    def inbound_delivered(
        self,
        peer: str,
        message_id: str,
        receipt_headers: list[tuple[str, str]],
        receipt_body: bytes,
    ) -> None:
        self._write(
            "UPDATE inbound SET state='delivered', receipt_headers=?, receipt_body=?, updated_at=?"
            " WHERE peer=? AND message_id=?",
            (json.dumps(receipt_headers), receipt_body, self._now(), peer, message_id),
        )
