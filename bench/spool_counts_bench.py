"""The count of the queue by peer and state on a hub's spool: mostly delivered messages.

Run:  .venv/bin/python bench/spool_counts_bench.py [--rows 1300000] [--repeat 10]
                                                   [--spool sqlite,postgresql]

A regional hub keeps its delivered messages for years: the spool is filled (by
the gateway's own code for the schema and indexes, then bulk insert into it:
``executemany`` for SQLite, ``COPY`` for PostgreSQL, then ``ANALYZE`` and, on
PostgreSQL, ``VACUUM`` as autovacuum would have done) with ``--rows`` messages
of 20 peers, all delivered but 2,000 queued, 300 awaiting their receipts and
one in a thousand failed, each row as a delivered message's is (headers, paths,
receipt).  Then ``Spool.counts()`` (what the daemon's view of the spool reads
every few seconds in a worker thread: the status page, the metrics, the daily
report) is called ``--repeat`` times; printed: the median CPU time of the
process (SQLite: the count runs in it) or the median time of the call
(PostgreSQL: the count runs in the server), how each backend answered (SQLite's
``EXPLAIN QUERY PLAN``; PostgreSQL's plan as ``auto_explain`` logged it, with
the pages it read), and the pages of what it read against the table's.

Compare trees by running each one's copy of this file with ``PYTHONPATH=<tree>``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sqlite3
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from gateway.clock import SystemClock
from gateway.spool import SqliteSpool
from gateway.spool.postgres import PostgresSpool
from gateway.spool.records import Claimant

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the tests' server helper
from tests.helpers.postgres import SKIP_REASON, PostgresServer, running_server, server_binaries

PEERS = [f"peer-{i:02d}" for i in range(20)]
COLUMNS = (
    "message_id, peer, filename, content_type, source_path, payload_path, body_path, headers,"
    " mic, size, state, attempts, next_attempt_at, disposition, receipt_path, expires_at,"
    " created_at, updated_at, node, lease_until, queued_by, audited_by, audit_owed,"
    " audit_owed_at, encrypted_for"
)
INSERT = f"INSERT INTO outbound ({COLUMNS}) VALUES ({','.join('?' * 25)})"  # noqa: S608
HEADERS = json.dumps(
    [
        ["AS2-From", "hospital"],
        ["AS2-To", "lab"],
        ["Subject", "HL7 document"],
        ["Disposition-Notification-To", "as2@hospital.example"],
        [
            "Disposition-Notification-Options",
            "signed-receipt-protocol=optional, pkcs7-signature; "
            "signed-receipt-micalg=optional, sha-256",
        ],
    ]
)


def rows(count: int) -> Iterator[tuple[object, ...]]:
    """A hub's messages over a year: delivered but the last (queued, awaiting receipts)."""
    for i in range(count):
        peer = PEERS[i % len(PEERS)]
        if i >= count - 2000:
            state = "queued"
        elif i >= count - 2300:
            state = "awaiting-receipt"
        elif i % 997 == 0:
            state = "failed"
        else:
            state = "delivered"
        stamp = f"2025-{1 + i * 12 // count:02d}-01T10:00:00.{i:07d}+00:00"
        delivered = state == "delivered"
        yield (
            f"<{i}.{peer}@hospital.example>", peer, f"doc-{i}.hl7", "application/hl7-v2",
            f"/var/lib/medgw/outbox/{peer}/doc-{i}.hl7", f"/var/lib/medgw/payloads/{i}.p",
            None, HEADERS, "x3v5Rj0Q2Hjv0uWm8m0nLq9Ph6Y3xZk0V4b7cWnA1s=, sha-256", 4096, state,
            1, 0.0, "processed" if delivered else None,
            f"/var/lib/medgw/receipts/{i}.0123456789ab.mdn" if delivered else None, 0.0, stamp,
            stamp, "node-a", 0.0, "node-a", "node-a", "message.delivered", stamp,
            "sha256:" + "ab" * 32,
        )  # fmt: skip


def median_ms(call: Callable[[], object], repeat: int, clock: Callable[[], float]) -> float:
    """The median of ``repeat`` calls of ``call``, in ms of ``clock``."""
    took = []
    for _ in range(repeat):
        t0 = clock()
        call()
        took.append(clock() - t0)
    return statistics.median(took) * 1000


def sqlite_run(folder: Path, count: int, repeat: int) -> None:
    path = folder / "spool.db"
    SqliteSpool(path, SystemClock(), Claimant(node="this")).close()
    t0 = time.perf_counter()
    with contextlib.closing(sqlite3.connect(path)) as db:
        batch: list[tuple[object, ...]] = []
        for row in rows(count):
            batch.append(row)
            if len(batch) == 100_000:
                with db:
                    db.executemany(INSERT, batch)
                batch = []
        with db:
            db.executemany(INSERT, batch)
        db.execute("ANALYZE")
        db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    print(f"sqlite: filled {count:,} rows in {time.perf_counter() - t0:.1f} s", flush=True)
    spool = SqliteSpool(path, SystemClock(), Claimant(node="this"))
    try:
        seen: list[str] = []
        spool.trace(seen.append)
        spool.counts()
        spool.trace(None)
        cpu_ms = median_ms(spool.counts, repeat, time.process_time)
    finally:
        spool.close()
    with contextlib.closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True)) as db:
        steps = [r[3] for r in db.execute(f"EXPLAIN QUERY PLAN {seen[-1]}")]
        read = "outbound"
        for step in steps:
            if " INDEX " in step:
                read = step.split(" INDEX ")[1].split()[0]
        pages = dict(db.execute("SELECT name, COUNT(*) FROM dbstat GROUP BY name").fetchall())
    print(f"sqlite: counts() median CPU {cpu_ms:.1f} ms over {repeat}")
    print(f"  plan: {'; '.join(steps)}")
    print(f"  pages of {read}: {pages[read]:,} (the table: {pages['outbound']:,})")


def postgres_run(server: PostgresServer, count: int, repeat: int) -> None:
    settings = server.new_database()
    PostgresSpool(settings, SystemClock(), Claimant(node="this")).close()
    name = settings.dbname
    t0 = time.perf_counter()
    with server.admin(name) as db:
        with db.cursor().copy(f"COPY outbound ({COLUMNS}) FROM STDIN") as copy:
            for row in rows(count):
                copy.write_row(row)
        db.execute("VACUUM ANALYZE outbound")
        sizes = {
            str(r[0]): int(str(r[1]))
            for r in db.execute(
                "SELECT relname, relpages FROM pg_class WHERE relname LIKE 'outbound%'"
            )
        }
    print(f"postgresql: filled {count:,} rows in {time.perf_counter() - t0:.1f} s", flush=True)
    spool = PostgresSpool(settings, SystemClock(), Claimant(node="this"))
    try:
        wall_ms = median_ms(spool.counts, repeat, time.perf_counter)
    finally:
        spool.close()
    # One more call with its plan and the pages it read logged (new sessions load it).
    with server.admin(name) as db:
        for setting, value in (
            ("session_preload_libraries", "auto_explain"),
            ("auto_explain.log_min_duration", "0"),
            ("auto_explain.log_analyze", "on"),
            ("auto_explain.log_buffers", "on"),
            ("auto_explain.log_format", "json"),
        ):
            db.execute(f"ALTER DATABASE \"{name}\" SET {setting} = '{value}'")
    offset = server.log.stat().st_size
    spool = PostgresSpool(settings, SystemClock(), Claimant(node="this"))
    try:
        spool.counts()
    finally:
        spool.close()
    with server.log.open() as log:
        log.seek(offset)
        entries = log.read().split("LOG:  duration: ")[1:]
    print(f"postgresql: counts() median {wall_ms:.1f} ms over {repeat}")
    for entry in entries:
        found, _ = json.JSONDecoder().raw_decode(entry[entry.index("{") :])
        if "GROUP BY" not in found["Query Text"]:
            continue
        steps, read = [], "outbound"
        node = found["Plan"]
        while True:
            steps.append(
                node["Node Type"] + (f" {node['Index Name']}" if "Index Name" in node else "")
            )
            read = node.get("Index Name", read)
            if not node.get("Plans"):
                break
            node = node["Plans"][0]
        plan = found["Plan"]
        touched = plan["Shared Hit Blocks"] + plan["Shared Read Blocks"]
        print(f"  plan: {' <- '.join(steps)}")
        print(f"  pages read (shared hit + read, with its workers): {touched:,}")
        print(f"  pages of {read}: {sizes[read]:,} (the table: {sizes['outbound']:,})")


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, default=1_300_000)
    parser.add_argument("--repeat", type=int, default=10)
    parser.add_argument("--spool", default="sqlite,postgresql")
    args = parser.parse_args()
    spools = args.spool.split(",")
    if any(s not in ("sqlite", "postgresql") for s in spools):
        parser.error("--spool: each of sqlite, postgresql")
    if "sqlite" in spools:
        with tempfile.TemporaryDirectory() as folder:
            sqlite_run(Path(folder), args.rows, args.repeat)
    if "postgresql" in spools:
        bin_dir = server_binaries()
        if bin_dir is None:
            raise SystemExit(SKIP_REASON)
        with running_server(bin_dir, durable=True) as server:
            postgres_run(server, args.rows, args.repeat)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
