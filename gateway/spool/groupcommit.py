"""Group commit: write transactions asked for at the same moment share one COMMIT.

With ``synchronous=FULL`` every COMMIT waits for an fsync of the write-ahead
log.  When several threads each record a state change at once (a burst of
documents being taken, sealed, sent and settled), committing them one by one
makes each wait for the fsyncs of all those before it.  Here the first of
them becomes the leader: it runs every transaction waiting at that moment in
one SQLite transaction, each inside its own SAVEPOINT, and commits once.

Each caller's changes still either all happen or not at all: a transaction
that fails is rolled back to its savepoint alone and its caller gets the
error, while the others commit (unless SQLite rolled back the whole transaction
for that error, as it may for a full disk: then every caller gets it).  Each
caller returns only after the COMMIT that holds its changes is durable.  A
failed COMMIT fails every caller of that batch, and none of their changes
remain.
"""

from __future__ import annotations

import contextlib
import sqlite3
import threading
from collections.abc import Callable, Iterator
from typing import Generic, TypeVar

T = TypeVar("T")


class _Transaction(Generic[T]):
    __slots__ = ("done", "error", "value", "work")

    def __init__(self, work: Callable[[sqlite3.Connection], T]) -> None:
        self.work = work
        self.done = False
        self.value: T | None = None
        self.error: BaseException | None = None


class GroupCommit:
    """Runs write transactions on one connection, several to a COMMIT (see module doc)."""

    def __init__(self, db: sqlite3.Connection) -> None:
        self._db = db  # in autocommit mode (isolation_level=None): transactions are explicit
        self._leader = threading.Lock()  # held while a batch runs and commits
        self._queue = threading.Lock()
        self._waiting: list[_Transaction[object]] = []
        self.commits = 0  # COMMITs done (transactions share them): for tests and benches

    def run(self, work: Callable[[sqlite3.Connection], T]) -> T:
        """Run ``work`` in a transaction; return its result once that is committed."""
        transaction = _Transaction(work)
        with self._queue:
            self._waiting.append(transaction)  # type: ignore[arg-type]
        with self._leader:
            if not transaction.done:  # not committed by the leader before us: lead
                with self._queue:
                    batch, self._waiting = self._waiting, []
                self._commit(batch)
        if transaction.error is not None:
            raise transaction.error
        return transaction.value  # type: ignore[return-value]

    @contextlib.contextmanager
    def exclusive(self) -> Iterator[sqlite3.Connection]:
        """The connection between transactions, none running meanwhile (for what SQLite
        does only outside a transaction: a checkpoint)."""
        with self._leader:
            yield self._db

    def _commit(self, batch: list[_Transaction[object]]) -> None:
        db = self._db
        try:
            db.execute("BEGIN IMMEDIATE")
            for transaction in batch:
                db.execute("SAVEPOINT work")
                try:
                    transaction.value = transaction.work(db)
                except BaseException as exc:  # its caller gets it; the others go on
                    transaction.error = exc
                    if not db.in_transaction:
                        # SQLite ended the whole transaction for it (a full disk, say):
                        # the others' changes are gone too, and they get this error.
                        raise
                    db.execute("ROLLBACK TO work")
                db.execute("RELEASE work")
            db.execute("COMMIT")
            self.commits += 1
        except BaseException as exc:
            for transaction in batch:  # nothing of this batch was committed
                transaction.error = transaction.error or exc
                transaction.value = None
            # Only then: on a closed connection even asking whether it is in a
            # transaction raises, and no caller may be left looking successful.
            with contextlib.suppress(sqlite3.Error):
                if db.in_transaction:
                    db.execute("ROLLBACK")
        finally:
            for transaction in batch:
                transaction.done = True
