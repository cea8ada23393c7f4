"""The outbound queue: intake, sealing, sending, settling, expiry, operator actions."""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Sequence
from pathlib import Path

from gateway.audit.events import EventType
from gateway.errors import (
    InvalidValueError,
    SpoolError,
    StoredReceiptNotBytesError,
    StoredReceiptTooLargeError,
)
from gateway.routing import LOCAL_INTAKE, Origin, check_enqueue
from gateway.spool.records import (
    CANCELLABLE,
    CANCELLED_BY,
    RETRIED_BY,
    RETRYABLE,
    TAKEN_OVER,
    DataKey,
    Intake,
    OutboundRecord,
    OutboundState,
    Prepared,
    RowReceipt,
    Settled,
    payload_item,
    receipt_item,
)
from gateway.spool.schema import columns, file_name
from gateway.spool.sql import AUDITED, Connection, Row, SqlStore, state_is

# File names asked about in one statement (a sweep asks of a folder's files in batches).
# PostgreSQL's planner counts the file name's expression as a few cheap operators, so
# for a long list of names it reads a table of some ten thousand rows whole (computing
# every row's name, microseconds each) rather than search the index per name: with 50
# names it searches the index up to tables of a few thousand rows, and reads a smaller
# table whole in less than a millisecond.  As quick as 500 a statement for a large one.
NAMES_PER_STATEMENT = 50
# Rows read (and locked) at a time, as a multiple of those to claim, when not every row
# read is claimed (a dead node's intake whose copy is not complete yet).
KEPT_PAGE = 4
# A data key deleted with what it opened (see gateway.spool.sqlite.datakeys).
_DROP_KEY = "DELETE FROM data_keys WHERE item=?"
# Settled by its receipt (kept in the row, or in the file a path names), if still in the
# state its settler found it in (see Settled); once delivered, the body stored in the
# spool is of no more use (as its file is).
_SETTLE = (
    "UPDATE outbound SET state=?, disposition=?, receipt_path=?, receipt=?, receipt_sha256=?,"  # noqa: S608 - fixed text
    " last_error=?, updated_at=?,"
    f" body=CASE WHEN ? THEN NULL ELSE body END, {AUDITED} WHERE message_id=? AND state IN"
)
# An outbound row as a record reads it: every column but the receipt's bytes, which
# only Spool.stored_receipt reads (a listing of delivered messages reads no receipts).
_LISTED = ", ".join(
    [*(c for c in columns("outbound") if c != "receipt"), "receipt IS NOT NULL AS receipt_kept"]
)
_SELECT_OUTBOUND = f"SELECT {_LISTED} FROM outbound"  # noqa: S608 - fixed text
# The messages in one state, oldest first: a statement per state, each naming its state
# in its text (see state_is).
_IN_STATE = {
    state: f"{_SELECT_OUTBOUND} WHERE {state_is(state)} ORDER BY created_at"
    for state in OutboundState
}
# A row's receipt as stored, its SHA-256, its size, and whether it is bytes (``{bytes}``: the
# backend's SqlStore.receipt_is_bytes): the bytes only if they are bytes, of at most the
# size given (a text's length is no bound on SQLite: see StoredReceiptNotBytesError).
_STORED_RECEIPT = (
    "SELECT length(receipt) AS size, {bytes} AS is_bytes,"
    " CASE WHEN {bytes} AND length(receipt) <= ? THEN receipt END AS receipt, receipt_sha256"
    " FROM outbound WHERE message_id=?"
)
# Sent by this node, its receipt to come later (unless that receipt settled it already).
_AWAIT_RECEIPT = (
    "UPDATE outbound SET state=?, updated_at=?, lease_until=0 WHERE message_id=?"
    " AND state=? AND node=?"
)


def _receipt_kept(row: Row) -> bool:
    """Whether the row keeps its receipt: read as ``receipt_kept`` (a listing that leaves
    the receipts' bytes unread, see _LISTED), or from the ``receipt`` column itself, or,
    the bytes absent (the copy of a row a displaced record keeps, binary columns left
    out), from its SHA-256 kept beside them with no file named (a receipt kept as a
    file has its SHA-256 recorded too)."""
    try:
        return bool(row["receipt_kept"])
    except (KeyError, IndexError):
        return row["receipt"] is not None or (
            row["receipt_sha256"] is not None and not row["receipt_path"]
        )


def _outbound(row: Row) -> OutboundRecord:
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
        receipt_kept=_receipt_kept(row),
        receipt_sha256=row["receipt_sha256"],
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
        payload=row["payload"],
        node=row["node"],
        lease_until=row["lease_until"] or 0.0,
        queued_by=row["queued_by"],
        audited_by=row["audited_by"],
        audit_owed=row["audit_owed"],
        audit_owed_at=row["audit_owed_at"],
        source_file=row["source_file"],
    )


def _claim_keys(db: Connection, keyed: Sequence[Intake]) -> dict[str, str]:
    """Record who submitted each of ``keyed`` with its idempotency key; returns those
    whose submitter's key already names a message, each with that message's id.

    The unique index decides (``submissions_key``): a submission with the same key
    committed meanwhile, on any node, makes this one's insert do nothing (PostgreSQL
    waits for the other's transaction to end first), and its message is read then."""
    resent: dict[str, str] = {}
    for intake in keyed:
        added = db.execute(
            "INSERT INTO submissions (message_id, submitted_by, idempotency_key, content_sha256)"
            " VALUES (?,?,?,?)"
            " ON CONFLICT (submitted_by, idempotency_key) WHERE idempotency_key IS NOT NULL"
            " DO NOTHING",
            (
                intake.message_id,
                intake.submitted_by,
                intake.idempotency_key,
                intake.content_sha256,
            ),
        )
        if added.rowcount == 1:
            continue
        rows = db.execute(
            "SELECT message_id FROM submissions WHERE submitted_by=? AND idempotency_key=?",
            (intake.submitted_by, intake.idempotency_key),
        ).fetchall()
        if not rows:  # removed since (a submission abandoned): not known now
            raise SpoolError(
                "a submission with the same idempotency key was being recorded",
                fix="send it again with the same Idempotency-Key",
            )
        resent[intake.message_id] = str(rows[0]["message_id"])
    return resent


# A peer's messages not yet delivered, one state at a time with the state as text, so
# that each part is read through the index of the rows in that state (queued and
# awaiting a receipt: by peer; being sent: no more than the sends under way) instead of
# the whole table, most of which is delivered messages.
_PENDING_BY_RECIPIENT = " ".join(
    (
        "SELECT encrypted_for, COUNT(*) AS n FROM (",
        " UNION ALL ".join(
            f"SELECT encrypted_for FROM outbound WHERE {state_is(state)} AND peer=?"  # noqa: S608
            " AND encrypted_for IS NOT NULL"
            for state in (
                OutboundState.QUEUED,
                OutboundState.SENDING,
                OutboundState.AWAITING_RECEIPT,
            )
        ),
        ") AS pending GROUP BY encrypted_for",
    )
)


class OutboundQueue(SqlStore):
    """The outbound queue: intake, sealing, sending, settling, expiry, operator actions."""

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
        data_key: DataKey | None = None,
        payload: bytes | None = None,
        idempotency_key: str | None = None,
        content_sha256: str | None = None,
    ) -> str | None:
        """See :meth:`gateway.spool.protocol.Spool.add_intake`."""
        intake = Intake(
            message_id,
            peer,
            filename,
            content_type,
            source_path,
            payload_path,
            expires_at,
            zone,
            origin,
            submitted_by,
            service,
            data_key,
            payload,
            idempotency_key=idempotency_key,
            content_sha256=content_sha256,
        )
        return self.add_intakes([intake]).get(message_id)

    def add_intakes(self, intakes: Sequence[Intake]) -> dict[str, str]:
        """See :meth:`gateway.spool.protocol.Spool.add_intakes`."""
        for intake in intakes:
            check_enqueue(intake.origin, intake.peer, intake.zone)
        now = self._now()
        lease_until = self._lease()[1]
        rows = [
            (
                i.message_id,
                i.peer,
                i.filename,
                i.content_type,
                str(i.source_path),
                str(i.payload_path),
                OutboundState.INTAKE.value,
                i.expires_at,
                i.zone,
                i.origin.peer,
                i.origin.zone,
                now,
                now,
                i.service,
                self.node,
                lease_until,
                i.payload,
                i.source_file,
            )
            for i in intakes
        ]
        submitted = [
            (i.message_id, i.submitted_by)
            for i in intakes
            if i.submitted_by is not None and i.idempotency_key is None
        ]
        keyed = [i for i in intakes if i.idempotency_key is not None]
        for i in keyed:
            if i.submitted_by is None:
                raise InvalidValueError(
                    f"message {i.message_id}: an idempotency key needs its submitter",
                    fix="give submitted_by with idempotency_key",
                )

        def work(db: Connection) -> dict[str, str]:
            resent = _claim_keys(db, keyed)
            db.executemany(
                "INSERT INTO outbound (message_id, peer, filename, content_type, source_path,"
                " payload_path, state, expires_at, zone, origin_peer, origin_zone, created_at,"
                " updated_at, service, node, lease_until, payload, source_file)"
                " VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
                [row for row in rows if row[0] not in resent],
            )
            if submitted:
                db.executemany(
                    "INSERT INTO submissions (message_id, submitted_by) VALUES (?,?)", submitted
                )
            for intake in intakes:
                if intake.data_key is not None and intake.message_id not in resent:
                    self._store_key(db, intake.data_key)
            return resent

        return self._transact(work) if intakes else {}

    def submitter(self, message_id: str) -> str | None:
        """Who submitted the message (None: not recorded, or no such message)."""
        row = self._one("SELECT submitted_by FROM submissions WHERE message_id=?", (message_id,))
        return str(row["submitted_by"]) if row else None

    def submitted_sha256(self, message_id: str) -> str | None:
        """See :meth:`gateway.spool.protocol.Spool.submitted_sha256`."""
        row = self._one("SELECT content_sha256 FROM submissions WHERE message_id=?", (message_id,))
        return str(row["content_sha256"]) if row and row["content_sha256"] is not None else None

    def payloads_recorded(self, names: Sequence[str]) -> dict[str, bool]:
        """See :meth:`gateway.spool.protocol.Spool.payloads_recorded`."""
        found: dict[str, bool] = {}
        for row in self._by_file_name("payload_path", ", state, mic", names):
            name = Path(row["payload_path"]).name
            needed = row["mic"] is None or row["state"] == OutboundState.INTAKE.value
            found[name] = found.get(name, False) or needed
        return found

    def intakes_by_payload(self, names: Sequence[str]) -> list[OutboundRecord]:
        """See :meth:`gateway.spool.protocol.Spool.intakes_by_payload`."""
        # By the name's index alone (the state's would read every row in intake).
        rows = self._outbound_where_in(file_name("payload_path"), names)
        return [_outbound(r) for r in rows if r["state"] == OutboundState.INTAKE.value]

    def receipts_recorded(self, names: Sequence[str]) -> set[str]:
        """See :meth:`gateway.spool.protocol.Spool.receipts_recorded`."""
        return {Path(r["receipt_path"]).name for r in self._by_file_name("receipt_path", "", names)}

    def outbound_by_source(self, paths: Sequence[str]) -> list[OutboundRecord]:
        """See :meth:`gateway.spool.protocol.Spool.outbound_by_source`."""
        return [_outbound(r) for r in self._outbound_where_in("source_path", paths)]

    def _outbound_where_in(self, expression: str, values: Sequence[str]) -> list[Row]:
        """The outbound rows whose ``expression`` (fixed text) is one of ``values``, read
        in statements of a bounded number of values each."""
        rows: list[Row] = []
        for start in range(0, len(values), NAMES_PER_STATEMENT):
            batch = tuple(values[start : start + NAMES_PER_STATEMENT])
            rows += self._read(
                f"{_SELECT_OUTBOUND} WHERE {expression} IN ({','.join('?' for _ in batch)})",
                batch,
            )
        return rows

    def _by_file_name(self, column: str, more: str, names: Sequence[str]) -> list[Row]:
        """The rows whose path ``column`` ends in one of ``names``, that column and the
        columns ``more``: a search of that column's file-name index per name, a bounded
        number of names per statement (the name is cut from the path here: the index
        finds the rows, the database need not work it out again for each)."""
        name = file_name(column)
        found: list[Row] = []
        for start in range(0, len(names), NAMES_PER_STATEMENT):
            batch = tuple(names[start : start + NAMES_PER_STATEMENT])
            found += self._read(
                f"SELECT {column}{more} FROM outbound"  # noqa: S608
                f" WHERE {name} IN ({','.join('?' for _ in batch)})",
                batch,
            )
        return found

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
        data_key: DataKey | None = None,
    ) -> bool:
        """See :meth:`gateway.spool.protocol.Spool.mark_queued`."""
        prepared = Prepared(
            message_id, body_path, tuple(headers), mic, size, encrypted_for, body, data_key
        )
        return bool(self.mark_queued_all([prepared]))

    def mark_queued_all(self, prepared: Sequence[Prepared]) -> list[str]:
        """See :meth:`gateway.spool.protocol.Spool.mark_queued_all`."""
        for one in prepared:
            if (one.body_path is None) == (one.body is None):
                raise InvalidValueError(
                    f"message {one.message_id}: a queued message has its body in a file or in "
                    "the spool row, exactly one of them",
                    fix="pass either body_path or body",
                )
        now = self._now()

        def work(db: Connection) -> list[str]:
            queued = []
            for one in prepared:
                count = db.execute(
                    "UPDATE outbound SET state=?, body_path=?, body=?, headers=?, mic=?, size=?,"  # noqa: S608 - fixed text
                    f" updated_at=?, encrypted_for=?, payload=NULL, queued_by=?, {AUDITED}"
                    " WHERE message_id=? AND state=? AND node=?",
                    (
                        OutboundState.QUEUED.value,
                        str(one.body_path) if one.body_path is not None else None,
                        one.body,
                        json.dumps(one.headers),
                        one.mic,
                        one.size,
                        now,
                        one.encrypted_for,
                        self.node,
                        *self._audited(EventType.MESSAGE_ACCEPTED, now),
                        one.message_id,
                        OutboundState.INTAKE.value,
                        self.node,
                    ),
                ).rowcount
                if count == 1:
                    # The document's own key goes: its copy is removed next.  Not when
                    # this node no longer holds the intake: the node that does may still
                    # be reading the copy.
                    db.execute(_DROP_KEY, (payload_item(one.message_id),))
                    queued.append(one.message_id)
                    # Only the preparation that moved it out of intake stores its key: another
                    # one of the same document (on another node) must not replace it.
                    if one.data_key is not None:
                        self._store_key(db, one.data_key)
            return queued

        return self._transact(work) if prepared else []

    def pending_by_recipient(self, peer: str) -> dict[str, int]:
        """Messages for ``peer`` not yet delivered, by the SHA-256 of the certificate they
        are encrypted to (those prepared before it was recorded are left out)."""
        rows = self._read(_PENDING_BY_RECIPIENT, (peer, peer, peer))
        return {r["encrypted_for"]: r["n"] for r in rows}

    def mark_sending(self, message_id: str) -> None:
        _, lease_until = self._lease()
        self._write(
            "UPDATE outbound SET state=?, attempts=attempts+1, updated_at=?, node=?,"
            " lease_until=? WHERE message_id=?",
            (OutboundState.SENDING.value, self._now(), self.node, lease_until, message_id),
        )

    def mark_awaiting_receipt(self, message_id: str) -> bool:
        """Sent, its receipt to come later; False if that receipt has already settled it
        (or another node took it over)."""
        return self._write(_AWAIT_RECEIPT, self._awaiting(message_id, self._now())) == 1

    def _awaiting(self, message_id: str, now: str) -> tuple[object, ...]:
        """The parameters of :data:`_AWAIT_RECEIPT` for ``message_id``."""
        return (
            OutboundState.AWAITING_RECEIPT.value,
            now,
            message_id,
            OutboundState.SENDING.value,
            self.node,
        )

    def requeue_unanswered(self, peer: str, sent_before: str) -> list[str]:
        """Messages whose asynchronous receipt never came go back to the queue (resend:
        the receiver deduplicates and answers with the receipt again)."""
        rows = self._read(
            # The state as text, not a parameter: so the planner knows the partial index
            # of that state (outbound_awaiting) serves it.
            "SELECT message_id FROM outbound WHERE peer=?"  # noqa: S608 - fixed text
            f" AND {state_is(OutboundState.AWAITING_RECEIPT)} AND updated_at<?",
            (peer, sent_before),
        )
        return self._move_still(
            [r["message_id"] for r in rows],
            OutboundState.AWAITING_RECEIPT,
            OutboundState.QUEUED,
            "no asynchronous receipt in time; resending",
            EventType.MESSAGE_SEND_FAILED,
        )

    def _move_still(
        self,
        ids: list[str],
        state: OutboundState,
        new: OutboundState,
        note: str,
        owed: EventType,
    ) -> list[str]:
        """Move the messages ``ids`` (just read in ``state``) to ``new``, in one transaction,
        each owing the record ``owed``; returns those moved.  One that another thread has
        moved since it was read (its receipt settled it, an operator cancelled it) is no
        longer in ``state``: left alone."""
        if not ids:
            return []
        updated_at = self._now()

        def move(db: Connection) -> list[str]:
            return [
                message_id
                for message_id in ids
                if db.execute(
                    f"UPDATE outbound SET state=?, last_error=?, updated_at=?, {AUDITED}"  # noqa: S608 - fixed text
                    " WHERE message_id=? AND state=?",
                    (
                        new.value,
                        note,
                        updated_at,
                        *self._audited(owed, updated_at),
                        message_id,
                        state.value,
                    ),
                ).rowcount
                == 1
            ]

        return self._transact(move)

    def mark_retry(
        self,
        message_id: str,
        error: str,
        next_attempt_at: float,
        *,
        owed: EventType | None = None,
        unsent: bool = False,
    ) -> bool:
        """See :meth:`gateway.spool.protocol.Spool.mark_retry`."""
        return self._end_send(
            message_id, OutboundState.QUEUED, error, next_attempt_at, owed, unsent=unsent
        )

    def _end_send(
        self,
        message_id: str,
        new: OutboundState,
        note: str,
        next_attempt_at: float | None,
        owed: EventType | None,
        *,
        unsent: bool = False,
    ) -> bool:
        """This node's send of ``message_id`` ends in state ``new`` (``note`` why; due again
        at ``next_attempt_at`` if given), its claim let go; ``owed``: the record this node
        writes of it; ``unsent``: the attempt its claim counted given back.  False
        (nothing changed) if this node no longer sends it."""
        now = self._now()
        audited, by = (f", {AUDITED}", self._audited(owed, now)) if owed else ("", ())
        uncounted = ", attempts=CASE WHEN attempts>0 THEN attempts-1 ELSE 0 END" if unsent else ""
        return (
            self._write(
                "UPDATE outbound SET state=?, last_error=?,"  # noqa: S608 - fixed text
                " next_attempt_at=COALESCE(?, next_attempt_at), updated_at=?,"
                f" lease_until=0{uncounted}{audited} WHERE message_id=? AND state=? AND node=?",
                (
                    new.value,
                    note,
                    next_attempt_at,
                    now,
                    *by,
                    message_id,
                    OutboundState.SENDING.value,
                    self.node,
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
        *,
        data_key: DataKey | None = None,
        owed: EventType | None = None,
    ) -> bool:
        """See :meth:`gateway.spool.protocol.Spool.mark_done`."""
        done = Settled(message_id, state, disposition, receipt_path, error, data_key, owed=owed)
        return bool(self.mark_settled([done]))

    def mark_settled(self, settled: Sequence[Settled], awaiting: Sequence[str] = ()) -> list[str]:
        """See :meth:`gateway.spool.protocol.Spool.mark_settled`."""
        if not settled and not awaiting:
            return []
        now = self._now()

        def settle(db: Connection) -> list[str]:
            changed = []
            for done in settled:
                # The answer to its own send: only while this node holds it (as mark_retry).
                holder, node = (" AND node=?", (self.node,)) if done.held else ("", ())
                states = done.settles_from
                count = db.execute(
                    f"{_SETTLE} ({', '.join('?' * len(states))}){holder}",
                    (
                        done.state.value,
                        done.disposition,
                        str(done.receipt_path) if done.receipt_path else None,
                        done.receipt,
                        done.receipt_sha256,
                        done.error,
                        now,
                        done.state is OutboundState.DELIVERED,
                        *self._audited(done.owes, now),
                        done.message_id,
                        *(state.value for state in states),
                        *node,
                    ),
                ).rowcount
                if count != 1:
                    continue  # moved on meanwhile: the receipt key of whoever moved it stays
                changed.append(done.message_id)
                if done.data_key is not None:
                    self._store_key(db, done.data_key)
            return changed + [
                message_id
                for message_id in awaiting
                if db.execute(_AWAIT_RECEIPT, self._awaiting(message_id, now)).rowcount == 1
            ]

        return self._transact(settle)

    def stored_receipt(self, message_id: str, at_most: int) -> bytes | None:
        """See :meth:`gateway.spool.protocol.Spool.stored_receipt`."""
        kept = self.row_receipt(message_id, at_most)
        return None if kept is None else kept.stored

    def row_receipt(self, message_id: str, at_most: int) -> RowReceipt | None:
        """See :meth:`gateway.spool.protocol.Spool.row_receipt`."""
        # The size asked of the database first, in the same statement: a tampered row's
        # gigabyte is never read into memory.
        row = self._one(_STORED_RECEIPT.format(bytes=self.receipt_is_bytes), (at_most, message_id))
        if row is None or row["size"] is None:
            return None
        if not row["is_bytes"]:
            raise StoredReceiptNotBytesError(
                f"the receipt kept in the spool row of {message_id} is not stored as bytes"
                " (text or a number, whose length is no bound on its size), as medgw"
                " stores every receipt: refused unread",
                fix="the row was changed outside medgw: check who can write the spool"
                " database, restore it from a backup, and run medgw audit verify",
            )
        if row["receipt"] is None:
            raise StoredReceiptTooLargeError(
                f"the receipt kept in the spool row of {message_id} is {row['size']} bytes,"
                f" more than the {at_most} of any receipt medgw stores",
                fix="the row was changed outside medgw: check who can write the spool"
                " database, and restore it from a backup",
            )
        return RowReceipt(bytes(row["receipt"]), row["receipt_sha256"])

    def get(self, message_id: str) -> OutboundRecord | None:
        row = self._one(f"{_SELECT_OUTBOUND} WHERE message_id=?", (message_id,))
        return _outbound(row) if row else None

    def in_state(self, state: OutboundState) -> list[OutboundRecord]:
        rows = self._read(_IN_STATE[OutboundState(state)], ())
        return [_outbound(r) for r in rows]

    def intake_interrupted(self) -> list[OutboundRecord]:
        """See :meth:`gateway.spool.protocol.Spool.intake_interrupted`."""
        now, _ = self._lease()
        return self._claim_intake("(node=? OR node IS NULL OR lease_until<?)", (self.node, now))

    def intake_take_over(self, limit: int, shared: Path | None = None) -> list[OutboundRecord]:
        """See :meth:`gateway.spool.protocol.Spool.intake_take_over`."""
        now, _ = self._lease()
        expired = "node IS NOT NULL AND node!=? AND lease_until<?"
        if shared is None:
            return self._claim_intake(
                f"{expired} AND payload IS NOT NULL",
                (self.node, now),
                limit,
                EventType.MESSAGE_TAKEN_OVER,
            )
        # The copies in the shared folder whose file is complete (written atomically): one
        # still being copied, or left in the outbox of the node that died, stays (its
        # node takes it up when it starts).  Filtered here, so no such row holds back
        # those after it however many there are (a dead node's batches in progress).
        prefix = f"{shared}{os.sep}"
        return self._claim_intake(
            f"{expired} AND (payload IS NOT NULL OR substr(payload_path, 1, ?)=?)",
            (self.node, now, len(prefix), prefix),
            limit,
            EventType.MESSAGE_TAKEN_OVER,
            lambda row: row["payload"] is not None or Path(row["payload_path"]).is_file(),
        )

    def intake_reclaim(self, message_ids: Sequence[str]) -> list[OutboundRecord]:
        """See :meth:`gateway.spool.protocol.Spool.intake_reclaim`."""
        if not message_ids:
            return []
        now, _ = self._lease()
        asked = ",".join("?" for _ in message_ids)
        return self._claim_intake(
            f"message_id IN ({asked}) AND (node=? OR lease_until<?)",
            (*message_ids, self.node, now),
        )

    def _claim_intake(
        self,
        where: str,
        params: tuple[object, ...],
        limit: int = -1,
        owed: EventType | None = None,
        kept: Callable[[Row], bool] | None = None,
    ) -> list[OutboundRecord]:
        """Messages in intake that match ``where`` (and ``kept``, when given), oldest first
        (up to ``limit``; -1: all), claimed for this node in one transaction; returns them
        as they were (who held them before).  ``owed``: the record the caller writes of
        each claim (a change then, made by this node)."""
        _, lease_until = self._lease()
        now = self._now()
        audited = f", updated_at=?, {AUDITED}" if owed else ""
        by = (now, *self._audited(owed, now)) if owed else ()
        limited = limit >= 0
        select = f"{_SELECT_OUTBOUND} WHERE {state_is(OutboundState.INTAKE)} AND {where}"

        def claim(db: Connection) -> list[Row]:
            # Locked as read (PostgreSQL): another node claiming at the same moment passes
            # these rows by, and a renewal committing meanwhile is not overruled.
            rows: list[Row] = (
                db.execute(
                    f"{select} ORDER BY created_at{' LIMIT ?' if limited else ''}{self.claim_lock}",
                    (*params, *((limit,) if limited else ())),
                ).fetchall()
                if kept is None
                else self._first_kept(db, select, params, limit, kept)
            )
            db.executemany(
                f"UPDATE outbound SET node=?, lease_until=?{audited}"  # noqa: S608 - fixed text
                " WHERE message_id=? AND state=?",
                [
                    (self.node, lease_until, *by, r["message_id"], OutboundState.INTAKE.value)
                    for r in rows
                ],
            )
            return rows

        return [_outbound(r) for r in self._transact(claim)]

    def _first_kept(
        self,
        db: Connection,
        select: str,
        params: tuple[object, ...],
        limit: int,
        kept: Callable[[Row], bool],
    ) -> list[Row]:
        """The first ``limit`` rows (-1: all) of ``select`` that are ``kept``, oldest first,
        read (and locked) a few times ``limit`` at a time, and ``kept`` asked of each only
        until ``limit`` are found: a call locks and checks about what it claims, however
        many rows match, and those not kept ahead (at most the batches their nodes were
        taking in) hold back none after them."""
        size = KEPT_PAGE * max(limit, 1)
        found: list[Row] = []
        after: tuple[object, ...] = ()
        while len(found) != limit:
            page = db.execute(
                f"{select}{' AND (created_at, message_id) > (?, ?)' if after else ''}"
                f" ORDER BY created_at, message_id LIMIT ?{self.claim_lock}",
                (*params, *after, size),
            ).fetchall()
            for row in page:
                if kept(row):
                    found.append(row)
                    if len(found) == limit:
                        break
            if len(page) < size:
                break
            after = (page[-1]["created_at"], page[-1]["message_id"])
        return found

    def intake_release(self, message_id: str, node: str | None) -> bool:
        """See :meth:`gateway.spool.protocol.Spool.intake_release`."""
        return (
            self._write(
                "UPDATE outbound SET node=?, lease_until=0 WHERE message_id=? AND state=?"
                " AND node=?",
                (node, message_id, OutboundState.INTAKE.value, self.node),
            )
            == 1
        )

    def intake_renew(self, message_id: str, key: DataKey | None = None) -> bool:
        """See :meth:`gateway.spool.protocol.Spool.intake_renew`."""
        _, lease_until = self._lease()
        return (
            self._write(
                "UPDATE outbound SET lease_until=? WHERE message_id=? AND state=? AND node=?",
                (lease_until, message_id, OutboundState.INTAKE.value, self.node),
                key=key,
                key_if_one=True,
            )
            == 1
        )

    def all_outbound(self) -> list[OutboundRecord]:
        rows = self._read(f"{_SELECT_OUTBOUND} ORDER BY created_at", ())
        return [_outbound(r) for r in rows]

    def claim_due(
        self, peer: str, now: float, limit: int
    ) -> tuple[list[OutboundRecord], float | None]:
        """Take up to ``limit`` of ``peer``'s queued messages that are due at ``now``,
        oldest first, and mark them ``sending`` in one transaction (so no other task
        picks them up).  Returns them as they were before (``attempts`` not yet
        counted), and when the next queued message is due (None: none is queued)."""

        def claim(db: Connection) -> tuple[list[Row], list[Row]]:
            rows = db.execute(
                # The state as text: the partial index of queued messages serves it.
                f"{_SELECT_OUTBOUND} WHERE peer=?"
                f" AND {state_is(OutboundState.QUEUED)}"
                f" ORDER BY next_attempt_at, created_at LIMIT ?{self.claim_lock}",
                (peer, max(0, limit) + 1),
            ).fetchall()
            due = [r for r in rows if r["next_attempt_at"] <= now][: max(0, limit)]
            if due:
                updated_at = self._now()
                _, lease_until = self._lease()
                db.executemany(
                    "UPDATE outbound SET state=?, attempts=attempts+1, updated_at=?, node=?,"
                    " lease_until=? WHERE message_id=?",
                    [
                        (
                            OutboundState.SENDING.value,
                            updated_at,
                            self.node,
                            lease_until,
                            r["message_id"],
                        )
                        for r in due
                    ],
                )
            return rows, due

        rows, due = self._transact(claim)
        rest = rows[len(due) :]
        return [_outbound(r) for r in due], (rest[0]["next_attempt_at"] if rest else None)

    def requeue_interrupted(self, peer: str | None = None) -> list[str]:
        """See :meth:`gateway.spool.protocol.Spool.requeue_interrupted`."""
        where = f"{state_is(OutboundState.SENDING)} AND (node=? OR node IS NULL)"
        params: list[object] = [self.node]
        if peer is not None:
            where += " AND peer=?"
            params.append(peer)
        return [
            r["message_id"]
            for r in self._requeue(where, tuple(params), "interrupted; sending it again")
        ]

    def outbound_changed_since(self, since: str) -> list[OutboundRecord]:
        """See :meth:`gateway.spool.protocol.Spool.outbound_changed_since`."""
        rows = self._read(
            f"{_SELECT_OUTBOUND} WHERE updated_at>=? AND (audited_by=? OR queued_by=?"
            " OR audited_by IS NULL AND (node=? OR node IS NULL))",
            (since, self.node, self.node, self.node),
        )
        return [_outbound(r) for r in rows]

    def take_over_expired(self) -> list[OutboundRecord]:
        """See :meth:`gateway.spool.protocol.Spool.take_over_expired`."""
        now, _ = self._lease()
        rows = self._requeue(
            f"{state_is(OutboundState.SENDING)} AND node IS NOT NULL AND node!=? AND lease_until<?",
            (self.node, now),
            TAKEN_OVER,
            EventType.MESSAGE_TAKEN_OVER,
        )
        return [_outbound(r) for r in rows]

    def _requeue(
        self,
        where: str,
        params: tuple[object, ...],
        note: str,
        owed: EventType | None = None,
    ) -> list[Row]:
        """Messages being sent that match ``where`` back to the queue, due now, in one
        transaction; returns their rows as they were.  ``owed``: the record the caller
        writes of each (their last audited change is this node's)."""
        updated_at = self._now()
        audited_by = f", {AUDITED}" if owed else ""
        by = self._audited(owed, updated_at) if owed else ()

        def requeue(db: Connection) -> list[Row]:
            # Locked as read (PostgreSQL): a renewal committing meanwhile is not overruled.
            rows = db.execute(
                f"{_SELECT_OUTBOUND} WHERE {where}{self.claim_lock}",
                params,
            ).fetchall()
            db.executemany(
                "UPDATE outbound SET state=?, next_attempt_at=0, last_error=?, updated_at=?,"  # noqa: S608
                f" node=NULL, lease_until=0{audited_by} WHERE message_id=? AND state=?",
                [
                    (
                        OutboundState.QUEUED.value,
                        note,
                        updated_at,
                        *by,
                        r["message_id"],
                        OutboundState.SENDING.value,
                    )
                    for r in rows
                ],
            )
            return rows

        return self._transact(requeue)

    def holds_lease(self, message_id: str) -> bool:
        """See :meth:`gateway.spool.protocol.Spool.holds_lease`."""
        now, _ = self._lease()
        margin = self._claimant.lease_seconds / 2
        row = self._one(
            "SELECT 1 FROM outbound WHERE message_id=? AND state=? AND node=? AND lease_until>?",
            (message_id, OutboundState.SENDING.value, self.node, now + margin),
        )
        return row is not None

    def list_outbound(
        self, *, state: OutboundState | None = None, peer: str | None = None, limit: int = 1000
    ) -> list[OutboundRecord]:
        clauses: list[str] = []
        params: list[object] = []
        if state is not None:
            # The state as text (see state_is), and the limit (a number): planned for the
            # state's own rows, a state of few read through the index by state (or of
            # its state).  Bound, PostgreSQL's generic plan reckons with an average
            # state's share and a tenth of it for the limit, and reads every row newest
            # first until it has found enough: the whole table for a state of few rows.
            clauses.append(state_is(state))
        if peer is not None:
            # A peer's share of the table is its own (one peer's backlog, another's few
            # messages, a third's months of delivered ones): planned for any peer, the
            # generic plan reckons with an average peer's share, and reads every row
            # newest first (outbound_created) until it has found enough, nearly the whole
            # table for a peer of few rows.  Planned at every run for the peer given
            # (an operator's listing: rare), that peer's rows are read through
            # outbound_peer, or newest first if they are most of the table.
            clauses.append("peer=?")
            params.append(peer)
        where = f"WHERE {' AND '.join(clauses)}" if clauses else ""
        rows = self._read(
            f"{_SELECT_OUTBOUND} {where} ORDER BY created_at DESC LIMIT {int(limit)}",
            tuple(params),
            each_run=peer is not None,
        )
        return [_outbound(r) for r in rows]

    def counts(self) -> dict[tuple[str, str], int]:
        """Number of messages per (peer, state): read in the order of the index by state
        and peer (``outbound_state``), from the index alone, not from the table's rows
        (mostly delivered messages kept for months, with their headers and paths)."""
        rows = self._read(
            "SELECT peer, state, COUNT(*) AS n FROM outbound GROUP BY state, peer", ()
        )
        return {(r["peer"], r["state"]): r["n"] for r in rows}

    def expire_due(self, peer: str, now: float) -> list[str]:
        """Queued messages for ``peer`` past their expiry become ``expired``."""
        rows = self._read(
            # The state as text: the partial index of expiring ones serves it.
            "SELECT message_id FROM outbound WHERE peer=?"  # noqa: S608 - fixed text
            f" AND {state_is(OutboundState.QUEUED)} AND expires_at>0 AND expires_at<?",
            (peer, now),
        )
        return self._move_still(
            [r["message_id"] for r in rows],
            OutboundState.QUEUED,
            OutboundState.EXPIRED,
            "not delivered before its expiry",
            EventType.MESSAGE_EXPIRED,
        )

    def _transition(
        self,
        message_id: str,
        allowed: tuple[OutboundState, ...],
        new: OutboundState,
        note: str,
        owed: EventType,
        *,
        reset: bool = False,
        expires_at: float | None = None,
        drop_body: bool = False,
        claim: bool = False,
    ) -> OutboundRecord:
        """Move one message between states, only from ``allowed`` ones (checked atomically),
        owing the record ``owed``; ``claim``: claimed by this node under a new lease in the
        same change."""
        marks = ",".join("?" for _ in allowed)
        extra = (
            ", attempts=0, next_attempt_at=0, disposition=NULL, receipt_path=NULL, receipt=NULL,"
            " receipt_sha256=NULL"
            if reset
            else ""
        )
        if drop_body:
            extra += ", body=NULL, payload=NULL"
        if expires_at is not None:
            extra += f", expires_at={float(expires_at)!r}"
        claimed: tuple[object, ...] = ()
        if claim:
            extra += ", node=?, lease_until=?"
            claimed = (self.node, self._lease()[1])
        now = self._now()

        def move(db: Connection) -> int:
            count = int(
                db.execute(
                    f"UPDATE outbound SET state=?, last_error=?, updated_at=?, {AUDITED}{extra}"  # noqa: S608
                    f" WHERE message_id=? AND state IN ({marks})",
                    (
                        new.value,
                        note,
                        now,
                        *self._audited(owed, now),
                        *claimed,
                        message_id,
                        *(a.value for a in allowed),
                    ),
                ).rowcount
            )
            if count == 1 and reset:
                # The receipt it cleared (in the row or its file) opens with nothing now.
                db.execute(_DROP_KEY, (receipt_item(message_id),))
            return count

        changed = self._transact(move)
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

    def mark_dead(self, message_id: str, reason: str) -> bool:
        """See :meth:`gateway.spool.protocol.Spool.mark_dead`."""
        return self._end_send(message_id, OutboundState.DEAD, reason, None, EventType.MESSAGE_DEAD)

    def operator_retry(self, message_id: str, actor: str, expires_at: float) -> OutboundRecord:
        record = self.get(message_id)
        if record is not None and record.state in RETRYABLE and not record.sealed:
            if record.has_document:
                # Never signed and encrypted, but the document is kept: prepare it again
                # (the caller does, or the next start's recovery), claimed by this node
                # meanwhile (a node starting at that moment does not prepare it too).
                return self._transition(
                    message_id,
                    RETRYABLE,
                    OutboundState.INTAKE,
                    f"{RETRIED_BY[1]}{actor}",
                    EventType.MESSAGE_RETRIED,
                    reset=True,
                    expires_at=expires_at,
                    claim=True,
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
            f"{RETRIED_BY[0]}{actor}",
            EventType.MESSAGE_RETRIED,
            reset=True,
            expires_at=expires_at,
        )

    def operator_cancel(self, message_id: str, actor: str) -> OutboundRecord:
        record = self._transition(
            message_id,
            CANCELLABLE,
            OutboundState.CANCELLED,
            f"{CANCELLED_BY}{actor}",
            EventType.MESSAGE_CANCELLED,
            drop_body=True,
        )
        # A document kept after a failed preparation is withdrawn: its key goes now.
        self._write(_DROP_KEY, (payload_item(message_id),))
        return record

    def fail_intake(self, message_id: str, error: str) -> bool:
        """See :meth:`gateway.spool.protocol.Spool.fail_intake`."""
        now = self._now()
        return (
            self._write(
                "UPDATE outbound SET state=?, disposition=?, receipt_path=NULL, receipt=NULL,"  # noqa: S608 - fixed text
                " receipt_sha256=NULL, last_error=?,"
                f" updated_at=?, {AUDITED} WHERE message_id=? AND state=? AND node=?",
                (
                    OutboundState.FAILED.value,
                    "not-sent",
                    error,
                    now,
                    *self._audited(EventType.MESSAGE_FAILED, now),
                    message_id,
                    OutboundState.INTAKE.value,
                    self.node,
                ),
            )
            == 1
        )

    def abandon_intake(self, message_id: str) -> bool:
        """See :meth:`gateway.spool.protocol.Spool.abandon_intake`."""
        now, _ = self._lease()

        def work(db: Connection) -> bool:
            count = db.execute(
                "DELETE FROM outbound WHERE message_id=? AND state=?"
                " AND (node=? OR node IS NULL OR lease_until<?)",
                (message_id, OutboundState.INTAKE.value, self.node, now),
            ).rowcount
            if count != 1:
                return False  # the key stays: the node holding it may be reading the copy
            db.execute(_DROP_KEY, (payload_item(message_id),))
            # And who submitted it: its idempotency key then names nothing (a resend
            # under it is a new submission).
            db.execute("DELETE FROM submissions WHERE message_id=?", (message_id,))
            return True

        return self._transact(work)
