"""What the spool's parts need of a SQL database, whichever backend holds it.

The parts of the spool (``sqlite/outbound``, ``inbound``, ``handover``, ``peers``,
``retention``) are written once, in SQL that SQLite and PostgreSQL both run,
against :class:`SqlStore`; a backend (:class:`gateway.spool.sqlite.database.Database`,
:class:`gateway.spool.postgres.database.PostgresDatabase`) supplies the
connections and runs each change as one transaction.  Statements use ``?``
and ``:name`` parameters, as SQLite does; the PostgreSQL backend translates them.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Mapping
from typing import Any, ClassVar, Protocol, TypeVar

from gateway.audit.events import EventType
from gateway.clock import Clock
from gateway.errors import InvalidTypeError
from gateway.spool.records import Claimant, DataKey, HandoverState, OutboundState

T = TypeVar("T")

Params = tuple[Any, ...] | Mapping[str, Any]
# A change an audit record follows (written once it is committed), in a row of the
# outbound, inbound or hand-over table: whose trail it is in, which record, and when the
# change was made (see OutboundRecord.audit_owed); its parameters: SqlStore._audited.
AUDITED = "audited_by=?, audit_owed=?, audit_owed_at=?"
# A row deleted takes the copies kept of it for owed records (displaced_owed) with it,
# in the same transaction: (source table, peer, message_id).
FORGET_DISPLACED = "DELETE FROM displaced_owed WHERE source=? AND peer=? AND message_id=?"

_PUT_KEY = (
    "INSERT INTO data_keys (item, kek, wrapped) VALUES (?, ?, ?)"
    " ON CONFLICT (item) DO UPDATE SET kek=excluded.kek, wrapped=excluded.wrapped"
)


def state_is(state: OutboundState | HandoverState) -> str:
    """The condition that a row is in ``state``, the state written as text: the one way
    the spool's statements look rows up by state.

    PostgreSQL plans a prepared statement once for every value of its parameters (a
    generic plan) after a few runs: a state given as a parameter is planned as an
    average state's share of the table (mostly messages and hand-overs finished and kept
    for months), and read through no index of that state alone, or not through an
    index at all on a large spool; a state written in the text is planned for its own
    rows.  Only the spool's own states are written so, never a value from input."""
    if not isinstance(state, OutboundState | HandoverState):
        raise InvalidTypeError(
            f"a state written into a spool statement must be one of the spool's states"
            f" (OutboundState or HandoverState), not {type(state).__name__} {state!r}",
            fix="this is a bug in medgw; report it",
        )
    return f"state='{state.value}'"


class Row(Protocol):
    def __getitem__(self, key: str, /) -> Any: ...


class Cursor(Protocol):
    @property
    def rowcount(self) -> int: ...

    def fetchall(self) -> list[Any]: ...


class Connection(Protocol):
    """A connection inside one transaction (sqlite3's, or the PostgreSQL backend's)."""

    def execute(self, sql: str, parameters: Params = ..., /) -> Cursor: ...

    def executemany(self, sql: str, parameters: Iterable[Params], /) -> Cursor: ...


class SqlStore(ABC):
    """The transaction helpers the parts of the spool share; a backend supplies
    :meth:`_read` and :meth:`_transact`."""

    _clock: Clock
    _claimant: Claimant  # the node whose work this handle claims (see Spool)
    # Appended to a SELECT that claims rows (messages to send, claims to take over):
    # PostgreSQL's "FOR UPDATE SKIP LOCKED" (another node's transaction claiming or
    # renewing them at the same moment neither waits for them nor is overruled by a
    # change judged on what they were before); SQLite has one writer at a time.
    claim_lock: ClassVar[str] = ""
    # Taken, in their transaction, by a store of data keys (``key_lock_shared``) and by
    # the re-wrapping of them all under a new key-encryption key (``key_lock``): a
    # rotation on one node never falls between another node's choice of the key it wraps
    # under and its commit (gateway.atrest.vault).  PostgreSQL's advisory locks; SQLite
    # has one writer at a time.
    key_lock_shared: ClassVar[str] = ""
    key_lock: ClassVar[str] = ""
    # True (in SQL) of a row whose ``receipt`` column holds bytes, whose ``length()`` is
    # then its size in bytes: each backend's own (SQLite stores any type in any column,
    # and counts a text's length in characters up to its first NUL).
    receipt_is_bytes: ClassVar[str]
    # True: a query of the rows of several states, oldest first, reads each state's rows
    # apart through an index by state and time, in its order, and merges them (SQLite,
    # which has no statistics and otherwise reads every row of those states through the
    # index by state and sorts them); False: one read of the index by time (PostgreSQL).
    reads_states_apart: ClassVar[bool] = False

    @abstractmethod
    def close(self) -> None: ...

    @abstractmethod
    def size_bytes(self) -> int:
        """The spool database's size on disk now (see Spool.size_bytes)."""

    @abstractmethod
    def shred(self) -> bool:
        """Leave no readable copy of deleted rows where the backend can (see Spool.shred)."""

    @abstractmethod
    def _read(self, sql: str, params: Params, *, each_run: bool = False) -> list[Row]:
        """The rows of one query of committed state; ``each_run``: planned for its
        parameters' values at every run, never prepared (PostgreSQL; see list_outbound)."""

    @abstractmethod
    def _transact(self, work: Callable[[Connection], T]) -> T:
        """Run ``work`` as one transaction; return once it is committed (and durable)."""

    def _one(self, sql: str, params: Params) -> Row | None:
        rows = self._read(sql, params)
        return rows[0] if rows else None

    def _now(self) -> str:
        return self._clock.now().isoformat()

    def _audited(self, owed: EventType, now: str) -> tuple[str, str, str]:
        """The parameters of :data:`AUDITED`: this node's change, made ``now``, owes the
        record ``owed``."""
        return self.node, owed.value, now

    @property
    def node(self) -> str:
        """The name this spool handle claims work under."""
        return self._claimant.node

    def _lease(self) -> tuple[float, float]:
        """Now, and until when a claim made or renewed now lasts (epoch seconds)."""
        now = self._clock.now().timestamp()
        return now, now + self._claimant.lease_seconds

    def _store_key(self, db: Connection, key: DataKey) -> None:
        """Store ``key`` (in the transaction ``db``), wrapped as it must be now; one
        :meth:`DataKey.cleared` deletes the item's key."""
        if key.is_cleared:
            db.execute("DELETE FROM data_keys WHERE item=?", (key.item,))
            return
        if self.key_lock_shared:
            db.execute(self.key_lock_shared)
        if key.current is not None:
            key = key.current()
        db.execute(_PUT_KEY, (key.item, key.kek, key.wrapped))

    def _write(
        self,
        sql: str,
        params: tuple[Any, ...],
        more: list[tuple[str, tuple[Any, ...]]] | None = None,
        *,
        key: DataKey | None = None,
        key_if_one: bool = False,
    ) -> int:
        """Run ``sql`` (and the statements in ``more``) as one transaction, storing ``key``
        in it (with ``key_if_one``: only if ``sql`` changed exactly one row)."""

        def work(db: Connection) -> int:
            count = int(db.execute(sql, params).rowcount)
            for statement, values in more or ():
                db.execute(statement, values)
            if key is not None and (count == 1 or not key_if_one):
                self._store_key(db, key)
            return count

        return self._transact(work)
