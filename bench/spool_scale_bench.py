"""The spool with a million waiting messages: does claiming stay as quick as with a thousand?

Run:  .venv/bin/python bench/spool_scale_bench.py [--levels 1000,100000,1000000]
                                                  [--spool sqlite,postgresql]

For each spool backend (SQLite in a temporary folder; PostgreSQL on a server of
Debian's ``postgresql`` package started for the bench, fsync on, as
bench/e2e_bench.py starts it), the spool is created by the gateway's own code
(``SqliteSpool`` / ``PostgresSpool``: its schema and indexes), then filled with
queued messages for one peer (a partner back after a long outage) by bulk
insert into that schema — ``COPY`` for PostgreSQL, ``executemany`` in large
transactions for SQLite — up to each level in turn.  Beside them, a few
messages of other peers and 100 being sent by another node under leases still
running.  At each level (after ``ANALYZE``, as autovacuum or SQLite's
``optimize`` would have done) it times, median and max over ``--repeat`` calls
of the spool's own methods, on a real clock:

* ``claim_due`` of 8 messages (what a sender's loop does per batch);
* ``take_over_expired`` (every node, periodically: the other node's leases);
* ``renew_leases`` (every node, periodically: its own claims, the 240 that
  ``claim_due`` took, given back to the queue after each level);
* ``counts`` (the spool's count of messages per peer and state);
* ``counts (daemon)`` and ``is_suspended (daemon)``: what the metrics scrape
  and the AS2 handler ask, answered by the daemon's view of the spool
  (gateway.daemon.spoolview) from memory; it reads the counts again every
  ``counts_every`` seconds (printed), in a worker thread;

and prints how each backend answers each statement at the largest level:
SQLite's ``EXPLAIN QUERY PLAN`` of the statements the spool ran (its trace),
PostgreSQL's plans as ``auto_explain`` logged them for the statements the spool
ran.  Flat means the per-call time at 1M is within a small factor of the one at
1k.  The machine is shared and noisy: one run; read the ratios.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import io
import sqlite3
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Protocol

from gateway.clock import SystemClock
from gateway.daemon.spoolview import SpoolView
from gateway.spool import OutboundState, Spool, SqliteSpool
from gateway.spool.postgres import PostgresSettings, PostgresSpool
from gateway.spool.records import Claimant

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the tests' server helper
from tests.helpers.postgres import SKIP_REASON, PostgresServer, running_server, server_binaries

PEER = "lab"
COLUMNS = (
    "message_id, peer, filename, content_type, source_path, payload_path, body_path, mic,"
    " size, state, attempts, next_attempt_at, expires_at, created_at, updated_at, node,"
    " lease_until"
)
OTHER_NODE_SENDING = 100


def rows(start: int, stop: int, now: float) -> Iterator[tuple[object, ...]]:
    """Queued messages ``start`` .. ``stop`` - 1 for PEER (due now, oldest first), and,
    with the first ones, a few of other peers and OTHER_NODE_SENDING being sent by
    node ``other`` under a lease that has not run out."""
    stamp = "2026-12-05T10:00:00"
    for i in range(start, stop):
        yield (
            f"<{i}@hospital>", PEER, f"doc-{i}.hl7", "application/hl7-v2", f"/src/{i}",
            f"/payloads/{i}", f"/bodies/{i}", "mic", 4096, OutboundState.QUEUED.value, 0,
            0.0, now + 7 * 86400, f"{stamp}.{i:07d}", stamp, None, 0.0,
        )  # fmt: skip
    if start == 0:
        for i in range(OTHER_NODE_SENDING):
            for peer, state, node, lease in (
                ("pharmacy", OutboundState.QUEUED.value, None, 0.0),
                (PEER, OutboundState.SENDING.value, "other", now + 3600),
            ):
                yield (
                    f"<{peer}-{state}-{i}@hospital>", peer, f"x-{i}.hl7", "application/hl7-v2",
                    f"/src/x{i}", f"/payloads/x{i}", f"/bodies/x{i}", "mic", 4096, state, 1,
                    0.0, now + 7 * 86400, stamp, stamp, node, lease,
                )  # fmt: skip


class Backend(Protocol):
    """One spool backend under test: how to fill it in bulk, open it, read its plans."""

    name: str

    def fill(self, start: int, stop: int, now: float) -> None: ...

    def open(self) -> Spool: ...

    def plans(self, calls: dict[str, Callable[[Spool], object]]) -> dict[str, list[str]]: ...


class SqliteBackend:
    name = "sqlite"

    def __init__(self, folder: Path) -> None:
        self.path = folder / "spool.db"
        SqliteSpool(self.path, SystemClock(), Claimant(node="this")).close()

    def fill(self, start: int, stop: int, now: float) -> None:
        with contextlib.closing(sqlite3.connect(self.path)) as db:
            batch = 100_000
            for first in range(start, stop, batch):
                with db:
                    db.executemany(
                        f"INSERT INTO outbound ({COLUMNS}) VALUES ({','.join('?' * 17)})",  # noqa: S608
                        rows(first, min(stop, first + batch), now),
                    )
            db.execute("ANALYZE")

    def open(self) -> Spool:
        return SqliteSpool(self.path, SystemClock(), Claimant(node="this"))

    def plans(self, calls: dict[str, Callable[[Spool], object]]) -> dict[str, list[str]]:
        spool = SqliteSpool(self.path, SystemClock(), Claimant(node="this"))
        found: dict[str, list[str]] = {}
        try:
            for what, call in calls.items():
                seen: list[str] = []
                spool.trace(seen.append)
                try:
                    call(spool)
                finally:
                    spool.trace(None)
                found[what] = []
                with contextlib.closing(
                    sqlite3.connect(f"file:{self.path}?mode=ro", uri=True)
                ) as db:
                    for statement in seen:
                        if statement.lstrip().upper().startswith(("SELECT", "UPDATE")):
                            steps = [r[3] for r in db.execute(f"EXPLAIN QUERY PLAN {statement}")]
                            found[what].append(
                                f"{statement.strip()[:100]}\n      -> {'; '.join(steps)}"
                            )
        finally:
            spool.close()
        return found


class PostgresBackend:
    name = "postgresql"

    def __init__(self, server: PostgresServer) -> None:
        self.server = server
        self.settings: PostgresSettings = server.new_database()
        PostgresSpool(self.settings, SystemClock(), Claimant(node="this")).close()

    def fill(self, start: int, stop: int, now: float) -> None:
        with self.server.admin(self.settings.dbname) as db:
            with db.cursor().copy(f"COPY outbound ({COLUMNS}) FROM STDIN") as copy:
                for row in rows(start, stop, now):
                    copy.write_row(row)
            db.execute("ANALYZE outbound")

    def open(self) -> Spool:
        return PostgresSpool(self.settings, SystemClock(), Claimant(node="this"))

    def plans(self, calls: dict[str, Callable[[Spool], object]]) -> dict[str, list[str]]:
        """The plans of the statements the spool runs, as ``auto_explain`` logs them
        (new connections of the spool's role load it for this)."""
        name = self.settings.dbname
        with self.server.admin(name) as db:
            db.execute(f"ALTER DATABASE \"{name}\" SET session_preload_libraries = 'auto_explain'")
            db.execute(f'ALTER DATABASE "{name}" SET auto_explain.log_min_duration = 0')
        found: dict[str, list[str]] = {}
        try:
            for what, call in calls.items():
                offset = self.server.log.stat().st_size
                spool = self.open()
                try:
                    call(spool)
                finally:
                    spool.close()
                with self.server.log.open() as log:
                    log.seek(offset)
                    text = log.read()
                found[what] = [
                    self._short(p) for p in text.split("LOG:  duration: ")[1:] if "Query Text" in p
                ]
        finally:
            with self.server.admin(name) as db:
                db.execute(f'ALTER DATABASE "{name}" RESET ALL')
        return found

    @staticmethod
    def _short(entry: str) -> str:
        lines = [line.strip() for line in entry.splitlines() if line.strip()]
        query = next(line for line in lines if line.startswith("Query Text:"))[12:]
        steps = [
            line.lstrip("-> ").split("  (cost")[0]
            for line in lines
            if "(cost=" in line or line.startswith(("Index Cond", "Filter"))
        ]
        if query.lstrip().upper().startswith(("SELECT PG_", "SELECT VERSION", "CREATE", "ALTER")):
            return ""
        return f"{query.strip()[:100]}\n      -> {'; '.join(steps)}"


def timed(spool: Spool, call: Callable[[Spool], object], repeat: int) -> tuple[float, float]:
    """Median and max milliseconds of ``call`` on ``spool``."""
    took = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        call(spool)
        took.append((time.perf_counter() - t0) * 1000)
    return statistics.median(took), max(took)


CALLS: dict[str, Callable[[Spool], object]] = {
    "claim_due (8)": lambda s: s.claim_due(PEER, time.time(), 8),
    "take_over_expired": lambda s: s.take_over_expired(),
    "renew_leases": lambda s: s.renew_leases(),
    "counts": lambda s: s.counts(),
}


def _on_view(asked: Callable[[SpoolView], object], view: SpoolView, _spool: Spool) -> object:
    """``asked`` of the daemon's view (timed as a call on the spool it reads)."""
    return asked(view)


# What the daemon asks instead, of its view of the spool (read once per level).
VIEW_CALLS: dict[str, Callable[[SpoolView], object]] = {
    "counts (daemon)": lambda v: v.counts(),
    "is_suspended (daemon)": lambda v: v.is_suspended(PEER),
}


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--levels", default="1000,100000,1000000")
    parser.add_argument("--spool", default="sqlite,postgresql")
    parser.add_argument("--repeat", type=int, default=30)
    args = parser.parse_args()
    levels = [int(n) for n in args.levels.split(",")]
    spools = args.spool.split(",")
    if levels != sorted(levels) or any(s not in ("sqlite", "postgresql") for s in spools):
        parser.error("--levels ascending; --spool: each of sqlite, postgresql")
    results: dict[str, dict[int, dict[str, tuple[float, float]]]] = {}
    plans: dict[str, dict[str, list[str]]] = {}
    every: dict[str, dict[int, float]] = {}
    with contextlib.ExitStack() as stack:
        tmp = Path(stack.enter_context(tempfile.TemporaryDirectory()))
        backends: list[Backend] = []
        if "sqlite" in spools:
            backends.append(SqliteBackend(tmp))
        if "postgresql" in spools:
            bin_dir = server_binaries()
            if bin_dir is None:
                raise SystemExit(SKIP_REASON)
            backends.append(
                PostgresBackend(stack.enter_context(running_server(bin_dir, durable=True)))
            )
        for backend in backends:
            results[backend.name] = {}
            every[backend.name] = {}
            filled = 0
            for level in levels:
                t0 = time.perf_counter()
                backend.fill(filled, level, time.time())
                print(
                    f"{backend.name}: filled to {level} waiting in "
                    f"{time.perf_counter() - t0:.1f} s",
                    flush=True,
                )
                filled = level
                spool = backend.open()
                try:
                    results[backend.name][level] = {
                        what: timed(spool, call, args.repeat) for what, call in CALLS.items()
                    }
                    view = SpoolView(spool, SystemClock())
                    view.load()
                    for what, asked in VIEW_CALLS.items():
                        results[backend.name][level][what] = timed(
                            spool, functools.partial(_on_view, asked, view), args.repeat
                        )
                    every[backend.name][level] = view.counts_every
                    # The claims back to the queue: every level renews as many.
                    spool.requeue_interrupted(PEER)
                finally:
                    spool.close()
            plans[backend.name] = backend.plans(CALLS)
    out = io.StringIO()
    for name, by_level in results.items():
        print(f"\n{name} spool: per call, median (max) ms, over {args.repeat} calls", file=out)
        print(
            f"  {'':<20}" + "".join(f"{level:>22,}" for level in levels) + "   last/first", file=out
        )
        for what in [*CALLS, *VIEW_CALLS]:
            cells = "".join(
                f"{by_level[lv][what][0]:>13.2f} ({by_level[lv][what][1]:>6.1f})" for lv in levels
            )
            ratio = by_level[levels[-1]][what][0] / by_level[levels[0]][what][0]
            print(f"  {what:<20}{cells}   {ratio:8.1f}", file=out)
        cells = "".join(f"{every[name][lv]:>22.1f}" for lv in levels)
        print(f"  {'counts_every (s)':<20}{cells}", file=out)
        print(f"  plans at {levels[-1]:,} waiting:", file=out)
        for what, steps in plans[name].items():
            shown = set()
            for step in filter(None, steps):
                # One line per statement (claim_due's UPDATE runs once per message).
                shape = step[:60]
                if shape not in shown:
                    shown.add(shape)
                    print(f"    {what}: {step}", file=out)
    print(out.getvalue())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
