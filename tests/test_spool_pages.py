"""The pages the SQLite spool writes for a message's changes of state.

Every page a transaction changes is written to the write-ahead log at its commit
(a system call and a kernel copy of 4 KiB, in the commit's fsync) and again
into the database file at the next checkpoint.  A message changes state four
times after it is taken in (queued, sending, sent, settled): what each change
writes is counted here from the log itself, file-level, whatever the load.
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
import subprocess
import sys
import textwrap
from collections.abc import Callable
from functools import partial
from pathlib import Path

from gateway.spool import OutboundState, Settled, SqliteSpool
from tests.clocks import TickingClock

ROOT = Path(__file__).resolve().parents[1]
WAL_HEADER = 32
FRAME_HEADER = 24


def pages_written(database: Path, change: Callable[[], object]) -> int:
    """The pages ``change`` appends to the write-ahead log of the spool ``database``
    (no checkpoint runs meanwhile: a few hundred pages, below SQLite's threshold)."""
    wal = database.with_name(database.name + "-wal")
    with contextlib.closing(sqlite3.connect(f"file:{database}?mode=ro", uri=True)) as db:
        page = int(db.execute("PRAGMA page_size").fetchone()[0])

    def frames() -> int:
        size = wal.stat().st_size if wal.exists() else 0
        return max(0, size - WAL_HEADER) // (page + FRAME_HEADER)

    before = frames()
    change()
    return frames() - before


def test_a_change_of_state_writes_only_the_indexes_of_what_it_changes(tmp_path: Path) -> None:
    """Claiming a queued message and recording it sent write the row's page and one
    page per index the change moves it in (its time of change, its lease, and the
    index of queued or of unanswered messages it leaves or enters): not a page of
    every index that names the state, for each change of every message."""
    path = tmp_path / "spool.sqlite3"
    spool = SqliteSpool(path, TickingClock())
    for i in range(20):  # others waiting, sent, delivered: the indexes hold more than one row
        spool.add_intake(
            f"<{i}@lab>", "lab", "a.hl7", "application/hl7-v2", tmp_path / "a", tmp_path / "p"
        )
        spool.mark_queued(f"<{i}@lab>", None, [], "mic", 10, body=b"sealed")
    spool.claim_due("lab", 2e9, 20)
    for i in range(10):
        spool.mark_awaiting_receipt(f"<{i}@lab>")
    for i in range(10, 15):
        spool.mark_done(f"<{i}@lab>", OutboundState.DELIVERED, "processed", tmp_path / f"{i}")

    assert spool.counts() == {
        ("lab", "delivered"): 5,
        ("lab", "awaiting-receipt"): 10,
        ("lab", "sending"): 5,
    }

    spool.add_intake(
        "<m@lab>", "lab", "m.hl7", "application/hl7-v2", tmp_path / "m", tmp_path / "q"
    )
    changes: dict[str, int] = {}
    changes["queued"] = pages_written(
        path, lambda: spool.mark_queued("<m@lab>", None, [], "mic", 10, body=b"sealed")
    )
    changes["sending"] = pages_written(path, lambda: spool.claim_due("lab", 2e9, 20))
    changes["awaiting-receipt"] = pages_written(
        path, lambda: spool.mark_awaiting_receipt("<m@lab>")
    )
    settled = Settled(
        "<m@lab>",
        OutboundState.DELIVERED,
        "processed",
        tmp_path / "r.mdn",
        found=OutboundState.AWAITING_RECEIPT,
        held=False,
    )
    changes["delivered"] = pages_written(path, lambda: spool.mark_settled([settled]))
    assert spool.get("<m@lab>").state is OutboundState.DELIVERED  # type: ignore[union-attr]
    # The row's page and three indexes' (updated_at, lease, the index of the state it
    # leaves or enters); settled, the index of receipt files too.
    assert changes == {"queued": 4, "sending": 4, "awaiting-receipt": 4, "delivered": 5}, changes


# A group of settlements in one transaction, as a process of its own whose SQLite writes
# its temporary files to the folder SQLITE_TMPDIR names (read once, at its start).
SETTLE_A_GROUP = textwrap.dedent(
    """
    import os, sys
    from pathlib import Path
    from gateway.spool import OutboundState, Settled, SqliteSpool
    from tests.clocks import TickingClock

    state, temporary = Path(sys.argv[1]), Path(sys.argv[2])
    spool = SqliteSpool(state / "spool.sqlite3", TickingClock())
    for i in range(200):
        spool.add_intake(f"<{i}@lab>", "lab", "a.hl7", "text/plain", state / "a", state / f"p{i}")
        spool.mark_queued(f"<{i}@lab>", None, [], "mic", 10, body=os.urandom(6000))
    spool.claim_due("lab", 2e9, 200)
    before = temporary.stat().st_mtime_ns
    done = spool.mark_settled(
        [Settled(f"<{i}@lab>", OutboundState.DELIVERED, "processed", state / f"r{i}")
         for i in range(0, 200, 4)]
        # And half with their receipts kept in their rows: more pages changed at once.
        + [Settled(f"<{i}@lab>", OutboundState.DELIVERED, "processed", None,
                   receipt=os.urandom(3500), receipt_sha256="00" * 32)
           for i in range(2, 200, 4)]
    )
    assert len(done) == 100, done
    print("created" if temporary.stat().st_mtime_ns != before else "none")
    """
)


def test_a_group_of_changes_writes_no_journal_outside_the_spools_log(tmp_path: Path) -> None:
    """A transaction that changes many pages (a group of settlements, half of them keeping
    their receipts in their rows) keeps the copies
    its savepoint needs in memory: no temporary file is created for them (SQLite's
    default, past 64 KiB: a file in the system's temporary folder, unlinked at once, a
    write per page changed, and the spool's pages written outside the state folder)."""
    state, temporary = tmp_path / "state", tmp_path / "temporary"
    state.mkdir()
    temporary.mkdir()
    done = subprocess.run(
        [sys.executable, "-c", SETTLE_A_GROUP, str(state), str(temporary)],
        cwd=ROOT,
        env={**os.environ, "SQLITE_TMPDIR": str(temporary), "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    # A file made and unlinked there changes the folder's modification time.
    assert done.stdout.split() == ["none"], done.stdout


def test_a_receipt_kept_in_its_row_costs_its_settlement_one_page_at_most(
    tmp_path: Path,
) -> None:
    """Delivered, the sealed body kept in the row (6.4 KiB for a 4 KiB document) goes and
    the receipt (a signed receipt is 2-4 KiB) takes its place: the settlement's
    transaction writes at most one page more to the log than when a file held the
    receipt.  (That no receipt file is created for it, by the settler: see
    tests/test_receipt_files.py.)"""
    path = tmp_path / "spool.sqlite3"
    spool = SqliteSpool(path, TickingClock())
    pages: dict[str, list[int]] = {"file": [], "row": []}
    for i in range(16):
        message_id, form = f"<{i}@lab>", ("file", "row")[i % 2]
        spool.add_intake(message_id, "lab", "a.hl7", "text/plain", tmp_path, tmp_path / f"p{i}")
        spool.mark_queued(message_id, None, [], "mic", 10, body=os.urandom(6400))
        spool.claim_due("lab", 2e9, 1)
        settled = Settled(
            message_id,
            OutboundState.DELIVERED,
            "processed",
            tmp_path / f"r{i}" if form == "file" else None,
            receipt=os.urandom(3500) if form == "row" else None,
            receipt_sha256="00" * 32 if form == "row" else None,
        )
        pages[form].append(pages_written(path, partial(spool.mark_settled, [settled])))
    spool.close()
    # The first messages fill pages the later ones share: the second half's.
    assert max(pages["row"][4:]) <= min(pages["file"][4:]) + 1, pages
