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

from gateway.clock import Clock
from gateway.spool.records import Claimant

T = TypeVar("T")

Params = tuple[Any, ...] | Mapping[str, Any]


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

    @abstractmethod
    def close(self) -> None: ...

    @abstractmethod
    def shred(self) -> None:
        """Leave no readable copy of deleted rows where the backend can (see Spool.shred)."""

    @abstractmethod
    def _read(self, sql: str, params: Params) -> list[Row]:
        """The rows of one query of committed state."""

    @abstractmethod
    def _transact(self, work: Callable[[Connection], T]) -> T:
        """Run ``work`` as one transaction; return once it is committed (and durable)."""

    def _one(self, sql: str, params: Params) -> Row | None:
        rows = self._read(sql, params)
        return rows[0] if rows else None

    def _now(self) -> str:
        return self._clock.now().isoformat()

    @property
    def node(self) -> str:
        """The name this spool handle claims work under."""
        return self._claimant.node

    def _lease(self) -> tuple[float, float]:
        """Now, and until when a claim made or renewed now lasts (epoch seconds)."""
        now = self._clock.now().timestamp()
        return now, now + self._claimant.lease_seconds

    def _write(
        self,
        sql: str,
        params: tuple[Any, ...],
        more: list[tuple[str, tuple[Any, ...]]] | None = None,
    ) -> int:
        """Run ``sql`` (and the statements in ``more``) as one transaction."""

        def work(db: Connection) -> int:
            count = db.execute(sql, params).rowcount
            for statement, values in more or ():
                db.execute(statement, values)
            return int(count)

        return self._transact(work)
