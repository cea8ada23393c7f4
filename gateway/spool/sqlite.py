"""The SQLite spool: every state change of a message is one committed transaction.

Outbound rows follow the life cycle of :class:`~gateway.spool.records.OutboundState`;
``sending`` rows found at start-up belong to a run that died mid-send and are
queued again (the receiver deduplicates by Message-ID, so a resend after a
crash is delivered once).  Inbound rows remember each (peer, Message-ID), the
SHA-256 of what was delivered and the receipt we sent, so that a resend is
answered with the original receipt instead of being delivered twice.
``submissions`` names who submitted a message (NET-3): a local API client, an
operator on the control socket, or the account owning a file taken from the
outbox folder.  The tables are in :mod:`gateway.spool.schema`.

The database runs with ``journal_mode=WAL`` and ``synchronous=FULL``: a
committed transition survives power loss.
"""

from __future__ import annotations

import json
import sqlite3
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from gateway.clock import Clock
from gateway.errors import SpoolError
from gateway.fsutil import private_file, shared_folder, storage_fix
from gateway.routing import LOCAL_INTAKE, Origin, check_enqueue
from gateway.spool.groupcommit import GroupCommit
from gateway.spool.records import (
    CANCELLABLE,
    RETRYABLE,
    HandoverRecord,
    HandoverState,
    InboundRecord,
    OutboundRecord,
    OutboundState,
    PeerControl,
)
from gateway.spool.schema import create_or_upgrade

T = TypeVar("T")


def _inbound(row: sqlite3.Row) -> InboundRecord:
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
    )


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
        expires_at=row["expires_at"],
        created_at=row["created_at"],
        updated_at=row["updated_at"],
        zone=row["zone"],
        origin=(
            Origin(row["origin_peer"], row["origin_zone"])
            if row["origin_peer"] is not None and row["origin_zone"] is not None
            else LOCAL_INTAKE
        ),
        service=row["service"],
        body=row["body"],
    )


class SqliteSpool:
    """The spool in one SQLite database (see :class:`gateway.spool.Spool`)."""

    def __init__(self, path: Path, clock: Clock) -> None:
        self._clock = clock
        try:
            shared_folder(path.parent)  # the state folder: the inbox and outbox may be in it
            # Mode 0600 whatever the umask; SQLite gives its -wal and -shm files the mode
            # of the database (those of an older version are corrected here too).
            for file in (
                path,
                path.with_name(path.name + "-wal"),
                path.with_name(path.name + "-shm"),
            ):
                if file is path or file.exists():
                    private_file(file)
        except OSError as exc:
            raise SpoolError(
                f"cannot create the spool database {path}: {exc.strerror or exc}",
                fix=storage_fix(exc, path.parent),
            ) from exc
        try:
            # Two connections shared by the event loop and worker threads: one writes
            # (transactions of several threads share a commit: see groupcommit), one
            # reads, so a read never waits for a commit's fsync.  WAL mode lets the
            # reader see every committed transaction without blocking the writer.
            self._db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
            self._db.row_factory = sqlite3.Row
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=FULL")
            self._db.execute("PRAGMA busy_timeout=5000")
            create_or_upgrade(self._db)
            self._reader = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
            self._reader.row_factory = sqlite3.Row
            self._reader.execute("PRAGMA busy_timeout=5000")
            self._reader.execute("PRAGMA query_only=1")
        except sqlite3.Error as exc:
            raise SpoolError(
                f"cannot open the spool database {path}: {exc}",
                fix="check that the state directory is writable and the disk is not full",
            ) from exc
        self._writer = GroupCommit(self._db)
        self._read_lock = threading.Lock()

    def close(self) -> None:
        self._reader.close()
        self._db.close()

    def _read(self, sql: str, params: tuple[Any, ...]) -> list[sqlite3.Row]:
        with self._read_lock:
            return self._reader.execute(sql, params).fetchall()

    def _transact(self, work: Callable[[sqlite3.Connection], T]) -> T:
        """Run ``work`` as one transaction; returns once it is committed (and fsync'ed)."""
        try:
            return self._writer.run(work)
        except sqlite3.Error as exc:
            raise SpoolError(
                f"spool write failed: {exc}",
                fix="check free disk space and permissions of the state directory",
            ) from exc

    def _one(self, sql: str, params: tuple[Any, ...]) -> sqlite3.Row | None:
        rows = self._read(sql, params)
        return rows[0] if rows else None

    def _now(self) -> str:
        return self._clock.now().isoformat()

    def _write(
        self,
        sql: str,
        params: tuple[Any, ...],
        more: list[tuple[str, tuple[Any, ...]]] | None = None,
    ) -> int:
        """Run ``sql`` (and the statements in ``more``) as one transaction."""

        def work(db: sqlite3.Connection) -> int:
            count = db.execute(sql, params).rowcount
            for statement, values in more or ():
                db.execute(statement, values)
            return int(count)

        return self._transact(work)

    # -- outbound -------------------------------------------------------------

    def add_intake(
        self,
        message_id: str,
        peer: str,
        filename: str,
        content_type: str,
        source_path: Path,
        payload_path: Path,
        expires_at: float = 0.0,
        *,
        zone: str | None = None,
        origin: Origin = LOCAL_INTAKE,
        submitted_by: str | None = None,
        service: str | None = None,
    ) -> None:
        """Queue a message for ``peer`` (of network ``zone``).

        NET-4 invariant, enforced here whatever the caller checked before: a
        message that came in from a peer is never queued for a peer of another
        zone (:class:`~gateway.routing.TransitRefused`; the caller audits it).
        ``submitted_by`` (a local API client, an operator, an outbox file's owner) is
        recorded in the same transaction.
        """
        check_enqueue(origin, peer, zone)
        now = self._now()
        extra = (
            [
                (
                    "INSERT INTO submissions (message_id, submitted_by) VALUES (?,?)",
                    (message_id, submitted_by),
                )
            ]
            if submitted_by is not None
            else []
        )
        self._write(
            "INSERT INTO outbound (message_id, peer, filename, content_type, source_path,"
            " payload_path, state, expires_at, zone, origin_peer, origin_zone, created_at,"
            " updated_at, service) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
            (
                message_id,
                peer,
                filename,
                content_type,
                str(source_path),
                str(payload_path),
                OutboundState.INTAKE.value,
                expires_at,
                zone,
                origin.peer,
                origin.zone,
                now,
                now,
                service,
            ),
            extra,
        )

    def submitter(self, message_id: str) -> str | None:
        """Who submitted the message (None: not recorded, or no such message)."""
        row = self._one("SELECT submitted_by FROM submissions WHERE message_id=?", (message_id,))
        return str(row["submitted_by"]) if row else None

    def payload_names(self) -> dict[str, bool]:
        """File names of every message's payload (in ``state/payloads``), each with
        whether its plaintext is still needed: not once the message was signed and
        encrypted (it has a MIC) and is past intake."""
        rows = self._read("SELECT payload_path, state, mic FROM outbound", ())
        return {
            Path(r["payload_path"]).name: (
                r["mic"] is None or r["state"] == OutboundState.INTAKE.value
            )
            for r in rows
        }

    def mark_queued(
        self,
        message_id: str,
        body_path: Path | None,
        headers: list[tuple[str, str]],
        mic: str,
        size: int,
        encrypted_for: str | None = None,
        *,
        body: bytes | None = None,
    ) -> None:
        """Signed and encrypted: the AS2 body is the file ``body_path`` or, for a small
        message, ``body``, stored in this same transaction."""
        if (body_path is None) == (body is None):
            raise ValueError("a queued message has its body in a file or in the spool")
        self._write(
            "UPDATE outbound SET state=?, body_path=?, body=?, headers=?, mic=?, size=?,"
            " updated_at=?, encrypted_for=? WHERE message_id=? AND state=?",
            (
                OutboundState.QUEUED.value,
                str(body_path) if body_path is not None else None,
                body,
                json.dumps(headers),
                mic,
                size,
                self._now(),
                encrypted_for,
                message_id,
                OutboundState.INTAKE.value,
            ),
        )

    def pending_by_recipient(self, peer: str) -> dict[str, int]:
        """Messages for ``peer`` not yet delivered, by the SHA-256 of the certificate they
        are encrypted to (those prepared before it was recorded are left out)."""
        rows = self._read(
            "SELECT encrypted_for, COUNT(*) AS n FROM outbound WHERE peer=? AND state IN"
            " (?, ?, ?) AND encrypted_for IS NOT NULL GROUP BY encrypted_for",
            (
                peer,
                OutboundState.QUEUED.value,
                OutboundState.SENDING.value,
                OutboundState.AWAITING_RECEIPT.value,
            ),
        )
        return {r["encrypted_for"]: r["n"] for r in rows}

    def mark_sending(self, message_id: str) -> None:
        self._write(
            "UPDATE outbound SET state=?, attempts=attempts+1, updated_at=? WHERE message_id=?",
            (OutboundState.SENDING.value, self._now(), message_id),
        )

    def mark_awaiting_receipt(self, message_id: str) -> bool:
        """Sent, its receipt to come later; False if that receipt has already settled it."""
        return (
            self._write(
                "UPDATE outbound SET state=?, updated_at=? WHERE message_id=? AND state=?",
                (
                    OutboundState.AWAITING_RECEIPT.value,
                    self._now(),
                    message_id,
                    OutboundState.SENDING.value,
                ),
            )
            == 1
        )

    def requeue_unanswered(self, peer: str, sent_before: str) -> list[str]:
        """Messages whose asynchronous receipt never came go back to the queue (resend:
        the receiver deduplicates and answers with the receipt again)."""
        rows = self._read(
            "SELECT message_id FROM outbound WHERE peer=? AND state=? AND updated_at<?",
            (peer, OutboundState.AWAITING_RECEIPT.value, sent_before),
        )
        return self._move_still(
            [r["message_id"] for r in rows],
            OutboundState.AWAITING_RECEIPT,
            OutboundState.QUEUED,
            "no asynchronous receipt in time; resending",
        )

    def _move_still(
        self, ids: list[str], state: OutboundState, new: OutboundState, note: str
    ) -> list[str]:
        """Move the messages ``ids`` (just read in ``state``) to ``new``, in one transaction;
        returns those moved.  One that another thread has moved since it was read (its
        receipt settled it, an operator cancelled it) is no longer in ``state``: left alone."""
        if not ids:
            return []
        updated_at = self._now()

        def move(db: sqlite3.Connection) -> list[str]:
            return [
                message_id
                for message_id in ids
                if db.execute(
                    "UPDATE outbound SET state=?, last_error=?, updated_at=?"
                    " WHERE message_id=? AND state=?",
                    (new.value, note, updated_at, message_id, state.value),
                ).rowcount
                == 1
            ]

        return self._transact(move)

    def mark_retry(self, message_id: str, error: str, next_attempt_at: float) -> bool:
        """A send that did not get through goes back to the queue; False (nothing changed)
        if the message is no longer being sent (its asynchronous receipt settled it)."""
        return (
            self._write(
                "UPDATE outbound SET state=?, last_error=?, next_attempt_at=?, updated_at=?"
                " WHERE message_id=? AND state=?",
                (
                    OutboundState.QUEUED.value,
                    error,
                    next_attempt_at,
                    self._now(),
                    message_id,
                    OutboundState.SENDING.value,
                ),
            )
            == 1
        )

    def mark_done(
        self,
        message_id: str,
        state: OutboundState,
        disposition: str,
        receipt_path: Path | None,
        error: str | None = None,
    ) -> None:
        # Once delivered, the body stored in the spool is of no more use (as its file is).
        self._write(
            "UPDATE outbound SET state=?, disposition=?, receipt_path=?, last_error=?,"
            " updated_at=?, body=CASE WHEN ? THEN NULL ELSE body END WHERE message_id=?",
            (
                state.value,
                disposition,
                str(receipt_path) if receipt_path else None,
                error,
                self._now(),
                state is OutboundState.DELIVERED,
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

    def claim_due(
        self, peer: str, now: float, limit: int
    ) -> tuple[list[OutboundRecord], float | None]:
        """Take up to ``limit`` of ``peer``'s queued messages that are due at ``now``,
        oldest first, and mark them ``sending`` in one transaction (so no other task
        picks them up).  Returns them as they were before (``attempts`` not yet
        counted), and when the next queued message is due (None: none is queued)."""

        def claim(db: sqlite3.Connection) -> tuple[list[sqlite3.Row], list[sqlite3.Row]]:
            rows = db.execute(
                "SELECT * FROM outbound WHERE peer=? AND state=?"
                " ORDER BY next_attempt_at, created_at LIMIT ?",
                (peer, OutboundState.QUEUED.value, max(0, limit) + 1),
            ).fetchall()
            due = [r for r in rows if r["next_attempt_at"] <= now][: max(0, limit)]
            if due:
                updated_at = self._now()
                db.executemany(
                    "UPDATE outbound SET state=?, attempts=attempts+1, updated_at=?"
                    " WHERE message_id=?",
                    [(OutboundState.SENDING.value, updated_at, r["message_id"]) for r in due],
                )
            return rows, due

        rows, due = self._transact(claim)
        rest = rows[len(due) :]
        return [_outbound(r) for r in due], (rest[0]["next_attempt_at"] if rest else None)

    def requeue_interrupted(self, peer: str | None = None) -> list[str]:
        """Messages whose sending was interrupted go back to the queue: at start-up all
        of them, or ``peer``'s when its sender starts again after a failure."""
        where, params = "state=?", [OutboundState.SENDING.value]
        if peer is not None:
            where, params = "state=? AND peer=?", [OutboundState.SENDING.value, peer]
        rows = self._read(f"SELECT message_id FROM outbound WHERE {where}", tuple(params))  # noqa: S608
        ids = [r["message_id"] for r in rows]
        if ids:
            self._write(
                f"UPDATE outbound SET state=?, next_attempt_at=0, updated_at=? WHERE {where}",  # noqa: S608
                (OutboundState.QUEUED.value, self._now(), *params),
            )
        return ids

    def list_outbound(
        self, *, state: OutboundState | None = None, peer: str | None = None, limit: int = 1000
    ) -> list[OutboundRecord]:
        clauses, params = [], []
        if state is not None:
            clauses.append("state=?")
            params.append(state.value)
        if peer is not None:
            clauses.append("peer=?")
            params.append(peer)
        where = f"WHERE {' AND '.join(clauses)}" if clauses else ""
        rows = self._read(
            f"SELECT * FROM outbound {where} ORDER BY created_at DESC LIMIT ?",  # noqa: S608
            (*params, limit),
        )
        return [_outbound(r) for r in rows]

    def counts(self) -> dict[tuple[str, str], int]:
        """Number of messages per (peer, state)."""
        rows = self._read("SELECT peer, state, COUNT(*) AS n FROM outbound GROUP BY 1, 2", ())
        return {(r["peer"], r["state"]): r["n"] for r in rows}

    def expire_due(self, peer: str, now: float) -> list[str]:
        """Queued messages for ``peer`` past their expiry become ``expired``."""
        rows = self._read(
            "SELECT message_id FROM outbound WHERE peer=? AND state=? AND expires_at>0"
            " AND expires_at<?",
            (peer, OutboundState.QUEUED.value, now),
        )
        return self._move_still(
            [r["message_id"] for r in rows],
            OutboundState.QUEUED,
            OutboundState.EXPIRED,
            "not delivered before its expiry",
        )

    def _transition(
        self,
        message_id: str,
        allowed: tuple[OutboundState, ...],
        new: OutboundState,
        note: str,
        *,
        reset: bool = False,
        expires_at: float | None = None,
        drop_body: bool = False,
    ) -> OutboundRecord:
        """Move one message between states, only from ``allowed`` ones (checked atomically)."""
        marks = ",".join("?" for _ in allowed)
        extra = (
            ", attempts=0, next_attempt_at=0, disposition=NULL, receipt_path=NULL" if reset else ""
        )
        if drop_body:
            extra += ", body=NULL"
        if expires_at is not None:
            extra += f", expires_at={float(expires_at)!r}"
        changed = self._write(
            f"UPDATE outbound SET state=?, last_error=?, updated_at=?{extra}"  # noqa: S608
            f" WHERE message_id=? AND state IN ({marks})",
            (new.value, note, self._now(), message_id, *(a.value for a in allowed)),
        )
        record = self.get(message_id)
        if record is None:
            raise SpoolError(
                f"no message {message_id} in the spool", fix="check the id with `medgw queue list`"
            )
        if not changed:
            raise SpoolError(
                f"message {message_id} is {record.state.value}; this needs it to be "
                f"{' or '.join(a.value for a in allowed)}",
                fix="see `medgw queue show` for its state and history",
            )
        return record

    def mark_dead(self, message_id: str, reason: str) -> OutboundRecord:
        return self._transition(
            message_id, (OutboundState.SENDING, OutboundState.QUEUED), OutboundState.DEAD, reason
        )

    def operator_retry(self, message_id: str, actor: str, expires_at: float) -> OutboundRecord:
        record = self.get(message_id)
        if record is not None and record.state in RETRYABLE and not record.sealed:
            if record.payload_path.exists():
                # Never signed and encrypted, but the document is kept: prepare it again
                # (the caller does, or the next start's recovery).
                return self._transition(
                    message_id,
                    RETRYABLE,
                    OutboundState.INTAKE,
                    f"preparation retried by {actor}",
                    reset=True,
                    expires_at=expires_at,
                )
            raise SpoolError(
                f"message {message_id} was never signed and encrypted "
                f"({record.last_error or 'its preparation failed'}) and its document is no "
                "longer kept, so there is nothing to resend",
                fix="correct the cause named here, then put the document in the outbox again",
            )
        if record is not None and record.body_path is not None and not record.body_path.exists():
            raise SpoolError(
                f"message {message_id} has no stored body any more",
                fix="send the document again from the outbox",
            )
        return self._transition(
            message_id,
            RETRYABLE,
            OutboundState.QUEUED,
            f"retry requested by {actor}",
            reset=True,
            expires_at=expires_at,
        )

    def operator_cancel(self, message_id: str, actor: str) -> OutboundRecord:
        return self._transition(
            message_id,
            CANCELLABLE,
            OutboundState.CANCELLED,
            f"cancelled by {actor}",
            drop_body=True,
        )

    # -- peers ----------------------------------------------------------------

    def set_suspended(self, peer: str, suspended: bool, reason: str, actor: str) -> None:
        self._write(
            "INSERT OR REPLACE INTO peer_control (peer, suspended, reason, actor, changed_at)"
            " VALUES (?,?,?,?,?)",
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

    def abandon_intake(self, message_id: str) -> bool:
        """Forget a message whose document could not be taken from the outbox (it is
        still there, and a later scan takes it again under a new Message-ID)."""
        return (
            self._write(
                "DELETE FROM outbound WHERE message_id=? AND state=?",
                (message_id, OutboundState.INTAKE.value),
            )
            == 1
        )

    # -- inbound --------------------------------------------------------------

    def inbound_get(self, peer: str, message_id: str) -> InboundRecord | None:
        row = self._one("SELECT * FROM inbound WHERE peer=? AND message_id=?", (peer, message_id))
        return None if row is None else _inbound(row)

    def inbound_unfinished(self) -> list[InboundRecord]:
        """Deliveries a stopped process left in the middle (state ``delivering``)."""
        rows = self._read("SELECT * FROM inbound WHERE state='delivering'", ())
        return [_inbound(r) for r in rows]

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
        now = self._now()
        self._write(
            "INSERT OR REPLACE INTO inbound (peer, message_id, sha256, target_path, state,"
            " received_at, updated_at, service, work_path, size) VALUES (?,?,?,?,?,?,?,?,?,?)",
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
            ),
        )

    def inbound_retarget(self, peer: str, message_id: str, target_path: Path) -> None:
        """A delivery in progress takes another name (its first one was taken meanwhile)."""
        self._write(
            "UPDATE inbound SET target_path=?, updated_at=? WHERE peer=? AND message_id=?"
            " AND state='delivering'",
            (str(target_path), self._now(), peer, message_id),
        )

    def inbound_release(self, peer: str, message_id: str) -> None:
        """Forget a delivery that did not reach the inbox: a resend starts afresh."""
        self._write(
            "DELETE FROM inbound WHERE peer=? AND message_id=? AND state='delivering'",
            (peer, message_id),
        )

    def inbound_written(self, peer: str, message_id: str) -> None:
        """An interrupted delivery is known to be in the inbox (and audited as such)."""
        self._write(
            "UPDATE inbound SET state='written', updated_at=? WHERE peer=? AND message_id=?"
            " AND state='delivering'",
            (self._now(), peer, message_id),
        )

    def inbound_delivered(
        self,
        peer: str,
        message_id: str,
        receipt_headers: list[tuple[str, str]],
        receipt_body: bytes,
        handover: tuple[str, int] | None = None,
    ) -> None:
        """The document is durably in the inbox and its receipt stored.

        ``handover`` (content type, size): also queue its hand-over to the internal
        system, in the same transaction, so that every document answered
        ``processed`` is handed over even if the process dies right after.
        """
        now = self._now()
        more: list[tuple[str, tuple[Any, ...]]] = []
        if handover is not None:
            content_type, size = handover
            more.append(
                (
                    "INSERT OR IGNORE INTO handover (peer, message_id, service, path,"
                    " content_type, sha256, size, state, created_at, updated_at)"
                    " SELECT peer, message_id, service, target_path, ?, sha256, ?, ?, ?, ?"
                    " FROM inbound WHERE peer=? AND message_id=?",
                    (
                        content_type,
                        size,
                        HandoverState.PENDING.value,
                        now,
                        now,
                        peer,
                        message_id,
                    ),
                )
            )
        self._write(
            "UPDATE inbound SET state='delivered', receipt_headers=?, receipt_body=?, updated_at=?"
            " WHERE peer=? AND message_id=?",
            (json.dumps(receipt_headers), receipt_body, now, peer, message_id),
            more,
        )

    # -- hand-over to the internal system ---------------------------------------

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


def _handover(row: sqlite3.Row) -> HandoverRecord:
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
