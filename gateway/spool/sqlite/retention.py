"""What the spool keeps after a message is finished, and its disposal (DSP-1).

Four kinds of kept things, each disposed of on its own (see
:mod:`gateway.retention`): ``received`` (the inbox copy of a document the
internal system took over), ``receipts`` (receipts received, in rows or files, and the
receipts we sent, kept to answer a resend), ``handover`` (hand-over records)
and ``spool`` (the records of finished messages).  A thing is disposable only
when nothing is owed on it: the outbound message was delivered or cancelled,
the inbound one answered with its receipt and handed over.  A record goes only
after what it holds went first (its receipt, its hand-over record, the copy).
Every condition is checked again in the transaction that disposes of it.

A thing that is a file is cleared from its row first, and its file removed after
the commit (a reader never finds a row naming a file already gone).  A process
killed in between leaves the file: a receipt file no row names any more, which the
sweep of the receipts folder removes (gateway.outbound.sweep); an inbox copy whose
hand-over record says its removal is still owed (``copy_pending``), which
:meth:`RetainedItems.files_pending` finds again, and the record waits for it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from gateway.spool.records import Disposable, OutboundState, RetainedKind, items_of
from gateway.spool.sql import FORGET_DISPLACED, Connection, Row, SqlStore, state_is

# Nothing owed: delivered (a verified receipt), or withdrawn by an operator.
_OUT_STATES = (OutboundState.DELIVERED, OutboundState.CANCELLED)
_OUT_FINISHED = "state IN ({})".format(", ".join(f"'{state.value}'" for state in _OUT_STATES))
# Answered with its receipt, and not waiting for (or failed in) a hand-over.
_IN_FINISHED = (
    "state='delivered' AND NOT EXISTS (SELECT 1 FROM handover h WHERE h.peer=inbound.peer"
    " AND h.message_id=inbound.message_id AND h.state!='done')"
)


@dataclass(frozen=True)
class _Rule:
    table: str
    condition: str  # nothing is owed on the row
    held: str  # what the row holds went first (a kind disposed of before it)
    # ``held`` for a dry run, where those go in the same run but are not gone yet
    held_in_run: str
    file: str | None  # the column naming the file it is
    disposal: str
    # The column that is 1 while the file of a row disposed of is still to be removed
    # (None: a file no row names once it is disposed of, found by a folder's sweep).
    pending: str | None = None
    checked: bool = False  # the row records its file's sha256 and size (both NOT NULL)
    # The states of ``condition`` a batch reads apart, each through the rule's index by
    # state and time in its order, the reads merged oldest first (empty: one read).
    apart: tuple[OutboundState, ...] = ()


# Asked of each row, by the hand-overs' key, as a batch reads the rows oldest first.  A
# subquery with an OFFSET is never made a join by PostgreSQL: without one, it made this
# an anti-join, reckoned cheapest by reading every hand-over of the peer (or all of them)
# into a hash, then sorting all it found, at every batch (31,052 buffers and 21.6 ms
# against 388 and 0.26 ms for a batch of 64 of 20,000, tests/test_spool_generic_plans.py).
_NO_HANDOVER = (
    "NOT EXISTS (SELECT 1 FROM handover h WHERE h.peer=inbound.peer"
    " AND h.message_id=inbound.message_id{later} LIMIT 1 OFFSET 0)"
)

_RULES: dict[RetainedKind, tuple[_Rule, ...]] = {
    RetainedKind.RECEIVED: (
        _Rule(
            "handover",
            "state='done' AND copy_purged_at IS NULL",
            "TRUE",
            "TRUE",
            "path",
            "UPDATE handover SET copy_purged_at=:now, copy_pending=1",
            "copy_pending",
            checked=True,
        ),
    ),
    RetainedKind.RECEIPTS: (
        _Rule(
            "outbound",
            # Kept in the row, or in the file receipt_path names (a large receipt, or
            # one settled before receipts were kept in rows): NULL file, none to remove.
            f"{_OUT_FINISHED} AND (receipt_path IS NOT NULL OR receipt IS NOT NULL)",
            "TRUE",
            "TRUE",
            "receipt_path",
            "UPDATE outbound SET receipt_path=NULL, receipt=NULL, receipt_sha256=NULL",
        ),
        _Rule(
            "inbound",
            f"{_IN_FINISHED} AND receipt_body IS NOT NULL",
            "TRUE",
            "TRUE",
            None,
            "UPDATE inbound SET receipt_body=NULL, receipt_headers=NULL",
        ),
    ),
    RetainedKind.HANDOVER: (
        _Rule(
            "handover",
            "state='done'",
            "copy_purged_at IS NOT NULL AND copy_pending=0",
            "TRUE",
            None,
            "DELETE FROM handover",
        ),
    ),
    RetainedKind.SPOOL: (
        _Rule(
            "outbound",
            _OUT_FINISHED,
            "receipt_path IS NULL AND receipt IS NULL",
            "TRUE",
            None,
            "DELETE FROM outbound",
            # Both states in one read, SQLite reads every row in them through an index by
            # state (outbound_state) and sorts them, for each batch: each state apart, in
            # the order of its index, merged (SqlStore.reads_states_apart).
            apart=_OUT_STATES,
        ),
        _Rule(
            "inbound",
            _IN_FINISHED,
            "receipt_body IS NULL AND " + _NO_HANDOVER.format(later=""),
            _NO_HANDOVER.format(later=" AND h.updated_at >= :before"),
            None,
            "DELETE FROM inbound",
        ),
    ),
}


def _where(
    rule: _Rule, peer: str | None, service: str | None, any_service: bool, dry_run: bool
) -> tuple[str, dict[str, object]]:
    where = [rule.condition, rule.held_in_run if dry_run else rule.held, "updated_at < :before"]
    params: dict[str, object] = {}
    if peer is not None:
        where.append("peer = :peer")
        params["peer"] = peer
    if not any_service and service is None:
        # Written as such, not "IS NOT DISTINCT FROM" a parameter: PostgreSQL's generic
        # plan reckons with one row for that, and read every row of the rule before
        # ``before`` and sorted them for each batch of the sweep (one peer and service).
        where.append("service IS NULL")
    elif not any_service:
        where.append("service = :service")
        params["service"] = service
    return " AND ".join(f"({w})" for w in where), params


def _columns(rule: _Rule) -> str:
    """What :func:`_found` reads of a row of ``rule``."""
    return f"peer, message_id, service, {rule.file or 'NULL'} AS file" + (
        ", sha256, size" if rule.checked else ""
    )


def _found(kind: RetainedKind, rule: _Rule, rows: Sequence[Row]) -> list[Disposable]:
    """The things of ``kind`` in ``rows`` (:func:`_columns`) of ``rule``: with the SHA-256
    and size its row records of its file where the rule is ``checked``, so that what is
    at the path is removed only if it is still that file (gateway.retention)."""
    return [
        Disposable(
            kind=kind,
            table=rule.table,
            peer=r["peer"],
            message_id=r["message_id"],
            service=r["service"],
            file=Path(r["file"]) if r["file"] else None,
            sha256=str(r["sha256"]) if rule.checked else None,
            size=int(r["size"]) if rule.checked else None,
        )
        for r in rows
    ]


class RetainedItems(SqlStore):
    """Finished messages' records, receipts and copies: found and disposed of by kind."""

    def retained_groups(self, kind: RetainedKind) -> list[tuple[str, str | None]]:
        """The (peer, service) pairs that have something of ``kind`` to dispose of."""
        found: set[tuple[str, str | None]] = set()
        for rule in _RULES[kind]:
            rows = self._read(
                f"SELECT DISTINCT peer, service FROM {rule.table}"  # noqa: S608 - fixed text
                f" WHERE {rule.condition}",
                (),
            )
            found.update((r["peer"], r["service"]) for r in rows)
        return sorted(found, key=lambda g: (g[0], g[1] or ""))

    def disposable(
        self,
        kind: RetainedKind,
        before: str,
        *,
        peer: str | None = None,
        service: str | None = None,
        any_service: bool = True,
        limit: int = 64,
    ) -> list[Disposable]:
        """Up to ``limit`` things of ``kind`` finished before ``before`` (ISO 8601, as the
        spool stores times), of ``peer`` (any: None) and ``service`` (any service when
        ``any_service``; else exactly ``service``, None meaning none), oldest first."""
        found: list[Disposable] = []
        for rule in _RULES[kind]:
            where, params = _where(rule, peer, service, any_service, dry_run=False)
            apart = rule.apart if self.reads_states_apart else ()
            reads = " UNION ALL ".join(
                f"SELECT {_columns(rule)}, updated_at FROM {rule.table}"  # noqa: S608
                f" WHERE {part}"
                for part in [f"{where} AND ({state_is(state)})" for state in apart] or [where]
            )
            # The limit as a number (see OutboundQueue.list_outbound): bound, PostgreSQL's
            # generic plan reckons with a tenth of the table for it.
            rows = self._read(
                f"{reads} ORDER BY updated_at LIMIT {int(limit - len(found))}",
                params | {"before": before},
            )
            found.extend(_found(kind, rule, rows))
            if len(found) >= limit:
                break
        return found

    def count_disposable(
        self,
        kind: RetainedKind,
        before: str,
        *,
        peer: str | None = None,
        service: str | None = None,
        any_service: bool = True,
    ) -> int:
        """How many things of ``kind`` a purge with these filters would dispose of, those
        it would dispose of first (what they hold) counted as gone."""
        total = 0
        for rule in _RULES[kind]:
            where, params = _where(rule, peer, service, any_service, dry_run=True)
            row = self._one(
                f"SELECT COUNT(*) AS n FROM {rule.table} WHERE {where}",  # noqa: S608
                params | {"before": before},
            )
            total += int(row["n"]) if row is not None else 0
        return total

    def dispose(self, items: Sequence[Disposable]) -> list[Disposable]:
        """Dispose of ``items`` (as :meth:`disposable` found them) in one transaction, each
        only if it is still disposable; returns those disposed of (a finished row's
        file never changes).  Their files are the caller's to remove, after the
        commit (then :meth:`files_removed`).  The data keys of what goes are deleted in
        the same transaction."""
        now = self._now()

        def work(db: Connection) -> list[Disposable]:
            done = []
            for item in items:
                for rule in _RULES[item.kind]:
                    if rule.table != item.table:
                        continue
                    count = db.execute(
                        f"{rule.disposal} WHERE peer=:peer AND message_id=:id"
                        f" AND ({rule.condition}) AND ({rule.held})",
                        {"now": now, "peer": item.peer, "id": item.message_id},
                    ).rowcount
                    if count and item.table == "outbound" and item.kind is RetainedKind.SPOOL:
                        db.execute("DELETE FROM submissions WHERE message_id=?", (item.message_id,))
                    if count and rule.disposal.startswith("DELETE"):
                        # And the copies of the row a node's owed record kept (see displaced).
                        db.execute(FORGET_DISPLACED, (item.table, item.peer, item.message_id))
                    if count:
                        # Its data keys go with it (crypto-shredding: see datakeys).
                        db.executemany(
                            "DELETE FROM data_keys WHERE item=?",
                            [
                                (i,)
                                for i in items_of(item.table, item.peer, item.message_id, item.kind)
                            ],
                        )
                        done.append(item)
            return done

        return self._transact(work)

    def files_pending(self, limit: int = 64) -> list[Disposable]:
        """Up to ``limit`` things disposed of whose files are still to be removed (a
        process killed between the commit and the removal left them)."""
        found: list[Disposable] = []
        for kind, rules in _RULES.items():
            for rule in rules:
                if rule.pending is None or len(found) >= limit:
                    continue
                rows = self._read(
                    f"SELECT {_columns(rule)} FROM {rule.table}"  # noqa: S608
                    f" WHERE {rule.pending}=1"
                    f" LIMIT {int(limit - len(found))}",  # as in disposable
                    (),
                )
                found.extend(_found(kind, rule, rows))
        return found

    def files_removed(self, items: Sequence[Disposable]) -> None:
        """The files of ``items`` (disposed of) are removed: their rows no longer say that
        is owed, and may go in their turn (one transaction)."""
        statements = [
            (
                f"UPDATE {rule.table} SET {rule.pending}=0"  # noqa: S608 - fixed text
                " WHERE peer=? AND message_id=?",
                (item.peer, item.message_id),
            )
            for item in items
            for rule in _RULES[item.kind]
            if rule.pending is not None and rule.table == item.table
        ]
        if statements:
            self._write(*statements[0], statements[1:])
