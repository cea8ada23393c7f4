"""Pages the SQLite spool writes per change of state of one outgoing message.

    .venv/bin/python bench/spool_pages_bench.py [--messages 12] [--kept 0]
                                                [--payload 4200] [--body 6400]
                                                [--receipt 0]
    .venv/bin/python bench/spool_pages_bench.py --threads 6 --messages 600

Each message in turn is taken in (its document's encrypted copy in the row),
queued (its sealed body in the row), claimed, sent (its receipt to come) and
settled, one transaction each; the pages each appends to the write-ahead log
are counted from the log file's size (frames of 24 + page-size bytes), so the
figures do not depend on the machine's load.  ``--kept``: delivered messages
in the spool before (the indexes then span more pages).  The defaults are the
sizes of a 4 KiB document and its sealed body in the e2e bench.  ``--receipt``:
the size of the sealed receipt each settlement keeps in its row (and the kept
messages in theirs); 0: a file the row names, as receipts were kept before.

With ``--threads``: the same lives (claimed by Message-ID, settled with their
receipts' data keys) from that many threads at once, so that their transactions
share commits as the daemon's do (savepoints of a group commit); prints the
process's CPU time and the commits per message.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import sqlite3
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import replace
from functools import partial
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from gateway.clock import SystemClock
from gateway.spool import DataKey, OutboundState, Settled, SqliteSpool

STEPS = ("taken in", "queued", "claimed", "sent", "settled")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--messages", type=int, default=12)
    parser.add_argument("--kept", type=int, default=0)
    parser.add_argument("--payload", type=int, default=4200)
    parser.add_argument("--body", type=int, default=6400)
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--receipt", type=int, default=0)
    args = parser.parse_args()
    if args.threads:
        groups(args.messages, args.threads, args.payload, args.body, args.receipt)
        return
    with tempfile.TemporaryDirectory() as folder:
        tmp = Path(folder)
        path = tmp / "spool.sqlite3"
        spool = SqliteSpool(path, SystemClock())
        for i in range(args.kept):
            message_id = f"<kept-{i}@lab>"
            spool.add_intake(message_id, "lab", "a.hl7", "text/plain", tmp, tmp / f"k{i}")
            spool.mark_queued(message_id, None, [], "mic", 10, body=b"sealed")
            spool.mark_sending(message_id)
            spool.mark_settled([kept_receipt(message_id, tmp / f"r{i}", args.receipt)])
        if not spool.shred():  # an empty log to count from
            raise SystemExit("the write-ahead log could not be emptied")
        page = int(sqlite3.connect(path).execute("PRAGMA page_size").fetchone()[0])
        wal = path.with_name(path.name + "-wal")

        def frames() -> int:
            size = wal.stat().st_size if wal.exists() else 0
            return max(0, size - 32) // (page + 24)

        counts: dict[str, list[int]] = {step: [] for step in STEPS}

        def count(step: str, change: Callable[..., object], *args: object) -> None:
            before = frames()
            change(*args)
            after = frames()
            if after < before:
                raise SystemExit("a checkpoint emptied the log meanwhile: fewer --messages")
            counts[step].append(after - before)

        for i in range(args.messages):
            m = f"<m{i}@lab>"
            payload = os.urandom(args.payload)
            count(
                "taken in",
                partial(spool.add_intake, payload=payload),
                m,
                "lab",
                "a.hl7",
                "text/plain",
                tmp,
                tmp / f"p{i}",
            )
            body = os.urandom(args.body)
            count(
                "queued",
                partial(spool.mark_queued, body=body),
                m,
                None,
                [("Subject", "x")],
                "mic",
                args.body,
            )
            count("claimed", spool.claim_due, "lab", 2e9, 1)
            count("sent", spool.mark_awaiting_receipt, m)
            settled = replace(
                kept_receipt(m, tmp / f"s{i}", args.receipt),
                data_key=DataKey(f"receipt:{m}", 1, os.urandom(60)),
                found=OutboundState.AWAITING_RECEIPT,
            )
            count("settled", spool.mark_settled, [settled])
        spool.close()
    # The first messages fill pages the later ones share: the second half's mean.
    half = args.messages // 2
    total = 0.0
    for step in STEPS:
        mean = sum(counts[step][half:]) / len(counts[step][half:])
        total += mean
        print(f"  {step:10s} {mean:5.1f} pages")
    print(f"  {'per message':10s} {total:5.1f} pages ({args.kept} delivered kept)")


def kept_receipt(message_id: str, file: Path, size: int) -> Settled:
    """Delivered, its receipt of ``size`` bytes in the row (0: in ``file``)."""
    if size:
        receipt = os.urandom(size)
        sha256 = hashlib.sha256(receipt).hexdigest()
        return Settled(
            message_id,
            OutboundState.DELIVERED,
            "processed",
            None,
            receipt=receipt,
            receipt_sha256=sha256,
        )
    return Settled(message_id, OutboundState.DELIVERED, "processed", file)


def groups(messages: int, threads: int, payload: int, body: int, receipt: int) -> None:
    """CPU time per message of ``messages`` lives run from ``threads`` threads."""
    with tempfile.TemporaryDirectory() as folder:
        tmp = Path(folder)
        spool = SqliteSpool(tmp / "spool.sqlite3", SystemClock())

        def life(i: int) -> None:
            m = f"<{i}@lab>"
            spool.add_intake(
                m,
                "lab",
                "a.hl7",
                "text/plain",
                tmp,
                tmp / f"p{i}",
                payload=os.urandom(payload),
                data_key=DataKey(f"payload:{m}", 1, os.urandom(60)),
            )
            spool.mark_queued(
                m,
                None,
                [("Subject", "x")],
                "mic",
                body,
                body=os.urandom(body),
                data_key=DataKey(f"outbound-body:{m}", 1, os.urandom(60)),
            )
            spool.mark_sending(m)
            key = DataKey(f"receipt:{m}", 1, os.urandom(60))
            spool.mark_settled([replace(kept_receipt(m, tmp / f"r{i}", receipt), data_key=key)])

        def lives(numbers: range) -> None:
            for i in numbers:
                life(i)

        workers = [
            threading.Thread(target=lives, args=(range(k, messages, threads),))
            for k in range(threads)
        ]
        before = time.process_time()
        for worker in workers:
            worker.start()
        for worker in workers:
            worker.join()
        cpu = time.process_time() - before
        commits = spool._writer.commits
        spool.close()
    print(f"  {cpu * 1000 / messages:.3f} ms CPU per message, {commits / messages:.2f} commits")


if __name__ == "__main__":
    main()
