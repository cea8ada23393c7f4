"""Retention's batches on a SQLite spool of many hand-overs done and messages answered.

Run:  .venv/bin/python bench/retention_batch_bench.py [--rows 20000] [--sent 20000]
                                                       [--repeat 50]

The spool is made by the gateway's own code (schema and indexes), then filled by
bulk insert with ``--rows`` hand-overs done (the inbox copies of the older half
disposed of), ``--rows`` received messages answered (the receipts sent of the
older half disposed of), and a few of each in the other states (hand-overs to
make and failed, messages being written), all of one peer; and, of another peer,
``--sent`` messages sent and delivered (the receipts of the older half disposed
of), one in a hundred cancelled instead, and a few still queued and awaiting
their receipts.  No ``ANALYZE``: SQLite gathers no statistics by itself, and a
spool has none unless an operator ran it.  Then ``Spool.disposable()`` (one
batch of 64, oldest first) is called ``--repeat`` times for each kind, in the
form of a purge (every peer and service) and of the daemon's sweep (one peer and
service: the peer of the received messages, then the peer of the messages
sent); printed: the median time per batch and how SQLite answers it (``EXPLAIN
QUERY PLAN``).  The purges of receipts and records read the messages sent first
(``--sent 0``: the received messages' instead).

Compare trees by running each one's copy of this file with ``PYTHONPATH=<tree>``.
"""

from __future__ import annotations

import argparse
import contextlib
import sqlite3
import statistics
import tempfile
import time
from pathlib import Path

from gateway.clock import SystemClock
from gateway.spool import RetainedKind, SqliteSpool

PEER = "radiology"  # none of its messages sent are finished: the received ones are read
SENT_TO = "lab"  # the peer of the messages sent


def stamp(i: int) -> str:
    return f"2026-01-01T00:00:{i:09d}+00:00"


def fill(path: Path, rows: int, sent: int) -> None:
    SqliteSpool(path, SystemClock()).close()
    handovers = [
        (
            *(PEER, f"<handover-{state}-{i}>", "/inbox/d.hl7", "text/plain", "0" * 64, 3, state),
            *(stamp(i), stamp(i), stamp(i) if state == "done" and i < count // 2 else None),
        )
        for state, count in (("done", rows), ("pending", 50), ("failed", 50))
        for i in range(count)
    ]
    received = [
        (
            *(PEER, f"<received-{state}-{i}>", "0" * 64, "/inbox/d.hl7", state),
            *(None if state == "delivered" and i < count // 2 else b"receipt", stamp(i), stamp(i)),
        )
        for state, count in (("delivered", rows), ("delivering", 50))
        for i in range(count)
    ]
    finished = ["delivered" if i % 100 else "cancelled" for i in range(sent)]
    waiting = ["queued", "awaiting-receipt"] * (50 if sent else 0)
    outbound = [
        (
            *(f"<sent-{state}-{i}>", SENT_TO, "d.hl7", "text/plain", "/outbox/d.hl7", "/p"),
            *(state, stamp(i), stamp(i)),
            # Delivered: the receipts of the older half disposed of; cancelled: none.
            b"receipt" if state == "delivered" and i >= sent // 2 else None,
        )
        for i, state in enumerate([*finished, *waiting])
    ]
    with contextlib.closing(sqlite3.connect(path)) as db:
        db.executemany(
            "INSERT INTO handover (peer, message_id, path, content_type, sha256, size, state,"
            " created_at, updated_at, copy_purged_at) VALUES (?,?,?,?,?,?,?,?,?,?)",
            handovers,
        )
        db.executemany(
            "INSERT INTO inbound (peer, message_id, sha256, target_path, state, receipt_body,"
            " received_at, updated_at) VALUES (?,?,?,?,?,?,?,?)",
            received,
        )
        db.executemany(
            "INSERT INTO outbound (message_id, peer, filename, content_type, source_path,"
            " payload_path, state, created_at, updated_at, receipt) VALUES (?,?,?,?,?,?,?,?,?,?)",
            outbound,
        )
        db.commit()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=20_000)
    parser.add_argument("--sent", type=int, default=20_000)
    parser.add_argument("--repeat", type=int, default=50)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "spool.db"
        fill(path, args.rows, args.sent)
        spool = SqliteSpool(path, SystemClock())
        forms: dict[str, dict[str, object]] = {
            "purge": {},
            "sweep": {"peer": PEER, "service": None, "any_service": False},
        }
        if args.sent:
            forms["sweep sent"] = {"peer": SENT_TO, "service": None, "any_service": False}
        with contextlib.closing(sqlite3.connect(path)) as db:
            for kind in RetainedKind:
                for form, filters in forms.items():
                    seen: list[str] = []
                    times = []
                    for run in range(args.repeat):
                        spool.trace(seen.append if run == 0 else None)
                        start = time.perf_counter()
                        found = spool.disposable(kind, "2999-01-01", **filters)  # type: ignore[arg-type]
                        times.append(time.perf_counter() - start)
                    spool.trace(None)
                    median = statistics.median(times) * 1000
                    print(f"{kind.value:9} {form}: {len(found)} found, {median:.2f} ms per batch")
                    for statement in seen:
                        if statement.lstrip().upper().startswith("SELECT"):
                            steps = db.execute(f"EXPLAIN QUERY PLAN {statement}").fetchall()
                            print("    " + "; ".join(str(step[3]) for step in steps))
        spool.close()


if __name__ == "__main__":
    main()
