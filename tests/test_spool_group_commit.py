"""SqliteSpool writes of several threads share a COMMIT, and stay each whole.

The spool's writes come from the event loop's worker threads (taking,
sealing, sending and settling documents at once).  Each used to commit, and
fsync, alone while the others waited for it.  These tests run real threads on
a real SQLite database in WAL mode and check both halves of the promise: fewer
commits than transactions under concurrency, and every caller's transaction
committed whole or not at all, whatever the others in its batch do.
"""

from __future__ import annotations

import sqlite3
import threading
import time
from collections.abc import Callable
from datetime import datetime
from pathlib import Path

import pytest

from gateway.errors import SpoolError
from gateway.spool import OutboundState, Settled, SqliteSpool
from gateway.spool.groupcommit import GroupCommit
from tests.clocks import TickingClock


def connect(path: Path) -> sqlite3.Connection:
    db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("PRAGMA synchronous=FULL")
    db.execute("CREATE TABLE IF NOT EXISTS t (k TEXT PRIMARY KEY, v INTEGER)")
    return db


def rows(path: Path) -> dict[str, int]:
    """What another connection (another process, after a crash) finds committed."""
    with sqlite3.connect(path) as other:
        return dict(other.execute("SELECT k, v FROM t").fetchall())


def in_threads(count: int, target: Callable[[int], None]) -> list[BaseException]:
    errors: list[BaseException] = []
    start = threading.Barrier(count)

    def run(i: int) -> None:
        start.wait()
        try:
            target(i)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return errors


def test_concurrent_transactions_share_commits_and_all_land(tmp_path: Path) -> None:
    path = tmp_path / "t.db"
    writer = GroupCommit(connect(path))

    def insert(i: int) -> None:
        for j in range(50):
            key = f"{i}-{j}"

            def add(db: sqlite3.Connection, key: str = key) -> int:
                return db.execute("INSERT INTO t VALUES (?, 1)", (key,)).rowcount

            assert writer.run(add) == 1
            assert key in rows(path)  # committed when run() returns, not later

    assert in_threads(8, insert) == []
    assert len(rows(path)) == 400
    assert writer.commits < 400  # a burst shares COMMITs (and their fsyncs)


def test_a_failing_transaction_is_rolled_back_alone(tmp_path: Path) -> None:
    """Two statements each: the failing caller's first statement is undone, the
    others' both statements are committed in the same batch."""
    path = tmp_path / "t.db"
    writer = GroupCommit(connect(path))
    writer.run(lambda db: db.execute("INSERT INTO t VALUES ('taken', 0)"))

    def pair(i: int) -> None:
        def work(db: sqlite3.Connection) -> None:
            db.execute("INSERT INTO t VALUES (?, 1)", (f"a{i}",))
            if i % 3 == 0:
                db.execute("INSERT INTO t VALUES ('taken', 2)")  # duplicate key: fails
            else:
                db.execute("INSERT INTO t VALUES (?, 2)", (f"b{i}",))

        writer.run(work)

    errors = in_threads(9, pair)
    assert len(errors) == 3 and all(isinstance(e, sqlite3.IntegrityError) for e in errors)
    committed = rows(path)
    assert set(committed) == {"taken"} | {f"{p}{i}" for i in range(9) if i % 3 for p in "ab"}


def test_an_exception_of_any_kind_in_one_transaction_leaves_the_others(
    tmp_path: Path,
) -> None:
    path = tmp_path / "t.db"
    writer = GroupCommit(connect(path))

    def boom(db: sqlite3.Connection) -> None:
        db.execute("INSERT INTO t VALUES ('lost', 1)")
        raise RuntimeError("a defect in the caller")

    with pytest.raises(RuntimeError, match="defect"):
        writer.run(boom)
    writer.run(lambda db: db.execute("INSERT INTO t VALUES ('kept', 1)"))
    assert rows(path) == {"kept": 1}


def test_a_failed_commit_fails_every_caller_and_keeps_nothing(tmp_path: Path) -> None:
    """The database cannot be written (say, another process holds its lock for too
    long): nobody is told their change is stored, and none of it is."""
    path = tmp_path / "t.db"
    db = connect(path)
    db.execute("PRAGMA busy_timeout=100")
    writer = GroupCommit(db)
    blocker = sqlite3.connect(path, isolation_level=None)
    blocker.execute("BEGIN IMMEDIATE")  # holds the write lock
    try:
        with pytest.raises(sqlite3.OperationalError, match="locked"):
            writer.run(lambda db: db.execute("INSERT INTO t VALUES ('x', 1)"))
    finally:
        blocker.execute("ROLLBACK")
    assert rows(path) == {}
    writer.run(lambda db: db.execute("INSERT INTO t VALUES ('y', 1)"))  # usable again
    assert rows(path) == {"y": 1}


def test_the_spool_reports_a_failed_write_and_reads_what_was_committed(tmp_path: Path) -> None:
    spool = SqliteSpool(tmp_path / "spool.db", TickingClock())
    spool.add_intake(
        "<m@lab>", "lab", "a.hl7", "application/hl7-v2", tmp_path / "a", tmp_path / "b"
    )
    with pytest.raises(SpoolError, match="spool write failed") as caught:
        # The same Message-ID again: refused by the primary key, named, with a fix.
        spool.add_intake(
            "<m@lab>", "lab", "a.hl7", "application/hl7-v2", tmp_path / "a", tmp_path / "b"
        )
    assert caught.value.fix
    spool.mark_queued("<m@lab>", tmp_path / "c", [], "mic", 10)
    record = spool.get("<m@lab>")  # read on the reading connection, right after the commit
    assert record is not None and record.state is OutboundState.QUEUED


def test_spool_writes_from_many_threads_are_all_there(tmp_path: Path) -> None:
    spool = SqliteSpool(tmp_path / "spool.db", TickingClock())

    def take(i: int) -> None:
        for j in range(20):
            message_id = f"<{i}-{j}@lab>"
            spool.add_intake(
                message_id, "lab", "a.hl7", "application/hl7-v2", tmp_path / "a", tmp_path / "b"
            )
            spool.mark_queued(message_id, tmp_path / "c", [], "mic", 10)
            claimed, _ = spool.claim_due("lab", 2e9, 1)
            assert len(claimed) == 1  # at least this thread's own message is there

    assert in_threads(6, take) == []
    queued = spool.list_outbound(state=OutboundState.QUEUED)
    sending = spool.list_outbound(state=OutboundState.SENDING)
    assert len(queued) == 0 and len(sending) == 120  # each claimed once, none twice


def test_a_caller_is_never_told_its_change_is_stored_when_the_database_is_gone(
    tmp_path: Path,
) -> None:
    """The spool is closed (the daemon stopping) while writes wait for the one in
    progress: every one of them fails; none returns as if it were committed."""
    path = tmp_path / "t.db"
    db = connect(path)
    writer = GroupCommit(db)
    inside, go = threading.Event(), threading.Event()

    def slow(db: sqlite3.Connection) -> None:
        inside.set()
        go.wait(10)
        db.execute("INSERT INTO t VALUES ('slow', 1)")

    outcomes: dict[str, object] = {}

    def call(name: str, work: object) -> None:
        try:
            outcomes[name] = writer.run(work)  # type: ignore[arg-type]
        except BaseException as exc:
            outcomes[name] = exc

    def insert(key: str) -> object:
        return lambda db: db.execute("INSERT INTO t VALUES (?, 1)", (key,)).rowcount

    threads = [threading.Thread(target=call, args=("slow", slow))]
    threads[0].start()
    assert inside.wait(10)
    for key in ("a", "b"):  # both wait for the batch in progress, then form one batch
        threads.append(threading.Thread(target=call, args=(key, insert(key))))
        threads[-1].start()
    deadline = time.monotonic() + 10
    while len(writer._waiting) < 2 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert len(writer._waiting) == 2  # both wait behind the batch in progress
    db.close()
    go.set()
    for thread in threads:
        thread.join(10)
    assert rows(path) == {}
    assert all(isinstance(outcome, sqlite3.Error) for outcome in outcomes.values()), outcomes


def test_a_transaction_sqlite_ended_whole_fails_every_caller_with_its_own_error(
    tmp_path: Path,
) -> None:
    """A full disk (here the database's page limit, the real library's SQLITE_FULL) ends
    the whole transaction, not only the statement: every caller of the batch gets that
    error, not a failed rollback to a savepoint SQLite already dropped."""
    path = tmp_path / "t.db"
    db = connect(path)
    writer = GroupCommit(db)
    pages = db.execute("PRAGMA page_count").fetchone()[0]
    db.execute(f"PRAGMA max_page_count={pages}")  # full: no page more
    inside, go = threading.Event(), threading.Event()

    def holder(db: sqlite3.Connection) -> None:
        inside.set()
        go.wait(10)

    def small(db: sqlite3.Connection) -> None:
        db.execute("INSERT INTO t VALUES ('small', 1)")

    def big(db: sqlite3.Connection) -> None:
        db.execute("INSERT INTO t VALUES (?, 1)", ("x" * 100_000,))

    outcomes: dict[str, object] = {}

    def call(name: str, work: Callable[[sqlite3.Connection], None]) -> None:
        try:
            outcomes[name] = writer.run(work)
        except BaseException as exc:
            outcomes[name] = exc

    threads = [threading.Thread(target=call, args=("holder", holder))]
    threads[0].start()
    assert inside.wait(10)
    for name, work in (("small", small), ("big", big)):  # one batch, after the holder's
        threads.append(threading.Thread(target=call, args=(name, work)))
        threads[-1].start()
    deadline = time.monotonic() + 10
    while len(writer._waiting) < 2 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert len(writer._waiting) == 2  # the holder's batch still holds the leader
    go.set()
    for thread in threads:
        thread.join(10)
    assert outcomes["holder"] is None  # its batch was committed before
    for name in ("small", "big"):
        error = outcomes[name]
        assert isinstance(error, sqlite3.Error), outcomes
        assert error.sqlite_errorcode == sqlite3.SQLITE_FULL, outcomes
    assert rows(path) == {}
    db.execute(f"PRAGMA max_page_count={pages * 100}")
    writer.run(small)  # usable again
    assert rows(path) == {"small": 1}


class MeanwhileClock(TickingClock):
    """``meanwhile`` runs once, in another thread, when the time is next read: what
    another thread does while the spool is between a read and its write."""

    def __init__(self) -> None:
        super().__init__()
        self.meanwhile: Callable[[], object] | None = None

    def now(self) -> datetime:
        action, self.meanwhile = self.meanwhile, None
        if action is not None:
            other = threading.Thread(target=action)
            other.start()
            other.join()
        return super().now()


# Its asynchronous receipt, which found it awaiting one.
ASYNC_RECEIPT = Settled(
    "<m@lab>",
    OutboundState.DELIVERED,
    "processed",
    None,
    found=OutboundState.AWAITING_RECEIPT,
    held=False,
)


@pytest.mark.parametrize(
    ("state", "meanwhile", "sweep"),
    [
        (
            # The asynchronous receipt comes (and is settled in its worker thread) while
            # the sender looks for overdue receipts.
            OutboundState.DELIVERED,
            lambda s: s.mark_settled([ASYNC_RECEIPT]),
            lambda s: s.requeue_unanswered("lab", "2100-01-01T00:00:00"),
        ),
        (
            # An operator cancels it while the sender looks for expired messages.
            OutboundState.CANCELLED,
            lambda s: s.operator_cancel("<m@lab>", "alice"),
            lambda s: s.expire_due("lab", 2e9),
        ),
    ],
)
def test_a_message_changed_meanwhile_is_left_alone_by_the_senders_sweeps(
    tmp_path: Path,
    state: OutboundState,
    meanwhile: Callable[[SqliteSpool], object],
    sweep: Callable[[SqliteSpool], list[str]],
) -> None:
    """Not an error that stops the peer's sender (and breaks off its sends): the
    message is no longer the sweep's to move."""
    clock = MeanwhileClock()
    spool = SqliteSpool(tmp_path / "spool.db", clock)
    spool.add_intake(
        "<m@lab>", "lab", "a.hl7", "application/hl7-v2", tmp_path / "a", tmp_path / "b", 1.0
    )
    spool.mark_queued("<m@lab>", None, [], "mic", 10, body=b"sealed")
    if state is OutboundState.DELIVERED:
        assert spool.claim_due("lab", 2e9, 1)[0]
        assert spool.mark_awaiting_receipt("<m@lab>")
    clock.meanwhile = lambda: meanwhile(spool)
    assert sweep(spool) == []
    record = spool.get("<m@lab>")
    assert record is not None and record.state is state


def test_closing_the_spool_waits_for_a_read_another_thread_has_in_progress(
    tmp_path: Path,
) -> None:
    """A daemon stopping closes the spool while a worker thread may still be reading
    (the queue counts of a very large spool): the read finishes first, instead of running
    on a closed connection (which failed it, or could crash the process)."""
    spool = SqliteSpool(tmp_path / "spool.sqlite3", TickingClock())
    slow = (
        "WITH RECURSIVE n(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM n LIMIT 3000000) "
        "SELECT count(*) AS counted FROM n"
    )
    reading = threading.Event()
    spool.trace(lambda statement: reading.set() if statement.startswith("WITH") else None)
    outcome: list[object] = []

    def read() -> None:
        try:
            outcome.append(spool._read(slow, ())[0]["counted"])
        except Exception as exc:  # the test reports what it was
            outcome.append(exc)

    reader = threading.Thread(target=read)
    reader.start()
    assert reading.wait(30)
    spool.close()
    reader.join(60)
    assert outcome == [3000000]
    with pytest.raises(sqlite3.ProgrammingError):
        spool._read("SELECT 1", ())
