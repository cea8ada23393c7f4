"""The start's sweeps of the payloads and receipts folders with many retained rows.

Run:  .venv/bin/python bench/startup_sweep_bench.py [--levels 20000,200000]
                                                    [--here 1.0,0.05] [--spool sqlite,postgresql]

At start, a node removes the files of its payloads and receipts folders that no
row names (gateway.outbound.sweep).  The spool keeps every delivered message's row
(its receipt's path among it) until retention disposes of it: hundreds of
thousands of rows at a busy site.  For each spool backend (SQLite in a temporary
folder; PostgreSQL on a server of Debian's ``postgresql`` package started for the
bench, fsync on) the spool is created by the gateway's own code, then filled by
bulk insert with delivered messages, each naming its receipt, up to each level
in turn; the receipts folder holds the files of a fraction ``--here`` of them
(1.0: a single node, every receipt on its disk; 0.05: one of several nodes, or
most receipts disposed of), the payloads folder 20 documents in flight.  Every
file is named by its row: nothing is removed, both ways do the same work.

Each way runs in a fresh child process, which reports the sweep's time (a real
clock) and its peak RSS (``ru_maxrss``) before and after the sweep:

* ``before``: the comparison as it was, every row's payload and receipt name read
  into memory (``SELECT payload_path, state, mic FROM outbound``, ``SELECT
  receipt_path ...``), then the folders listed against them;
* ``after``: the gateway's sweep, the folders read a batch at a time and the spool
  asked about those names (the file-name indexes).

It also times the first start after an upgrade, which builds those two indexes
(the spool opened after dropping them).  The machine is shared and noisy: read the
ratios (after / before), measured in the same run.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import resource
import sqlite3
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import asdict
from pathlib import Path
from typing import Protocol

from gateway.clock import SystemClock
from gateway.logs import make_logger
from gateway.outbound.sweep import remove_unrecorded_payloads, remove_unrecorded_receipts
from gateway.spool import OutboundState, Spool, SqliteSpool
from gateway.spool.postgres import PostgresSettings, PostgresSpool
from gateway.spool.records import Claimant

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the tests' server helper
from tests.helpers.postgres import SKIP_REASON, PostgresServer, running_server, server_binaries

COLUMNS = (
    "message_id, peer, filename, content_type, source_path, payload_path, body_path, mic,"
    " size, state, attempts, next_attempt_at, expires_at, created_at, updated_at,"
    " disposition, receipt_path"
)
IN_FLIGHT = 20  # documents in the payloads folder, being prepared
INDEXES = ("outbound_payload_name", "outbound_receipt_file")


def rows(start: int, stop: int, folder: Path) -> Iterator[tuple[object, ...]]:
    """Delivered messages ``start`` .. ``stop`` - 1, each naming its receipt; the first
    IN_FLIGHT still in intake, their documents in ``payloads``."""
    stamp = "2026-12-05T10:00:00"
    for i in range(start, stop):
        token = f"{i:024x}"
        flight = i < IN_FLIGHT
        yield (
            f"<{i}@hospital>", "lab", f"doc-{i}.hl7", "application/hl7-v2", f"/src/{i}",
            str(folder / "payloads" / token), None, None if flight else "mic", 4096,
            (OutboundState.INTAKE if flight else OutboundState.DELIVERED).value, 1, 0.0, 0.0,
            stamp, stamp, None if flight else "processed",
            None if flight else str(folder / "receipts" / f"{token}.{i:012x}.mdn"),
        )  # fmt: skip


def make_files(folder: Path, start: int, stop: int, here: float) -> int:
    """The receipt files of a fraction ``here`` of rows ``start`` .. ``stop`` - 1 (every
    ``1/here``-th), and the in-flight documents; how many receipt files."""
    (folder / "payloads").mkdir(parents=True, exist_ok=True)
    (folder / "receipts").mkdir(parents=True, exist_ok=True)
    step = max(1, round(1 / here))
    made = 0
    for i in range(start, stop):
        token = f"{i:024x}"
        if i < IN_FLIGHT:
            (folder / "payloads" / token).write_bytes(b"document")
        elif i % step == 0:
            os.close(os.open(folder / "receipts" / f"{token}.{i:012x}.mdn", os.O_CREAT, 0o600))
            made += 1
    return made


def open_spool(spec: dict[str, object]) -> Spool:
    if spec["kind"] == "sqlite":
        return SqliteSpool(Path(str(spec["path"])), SystemClock(), Claimant(node="this"))
    settings = dict(spec["settings"])  # type: ignore[call-overload]
    settings["socket_dir"] = Path(settings["socket_dir"])
    return PostgresSpool(PostgresSettings(**settings), SystemClock(), Claimant(node="this"))


def before(spool: Spool, folder: Path) -> None:
    """The sweeps as they were: every row's names in memory, then the folders' files."""
    read = spool._read  # type: ignore[attr-defined]
    known = {
        Path(r["payload_path"]).name: r["mic"] is None or r["state"] == "intake"
        for r in read("SELECT payload_path, state, mic FROM outbound", ())
    }
    for path in (folder / "payloads").iterdir():
        if not path.name.startswith(".") and path.is_file() and not known.get(path.name, False):
            raise AssertionError(f"{path.name} would be removed")
    recorded = {
        Path(r["receipt_path"]).name
        for r in read("SELECT receipt_path FROM outbound WHERE receipt_path IS NOT NULL", ())
    }
    for path in (folder / "receipts").iterdir():
        is_receipt = path.suffix == ".mdn" and not path.is_symlink() and path.is_file()
        if is_receipt and path.name not in recorded:
            raise AssertionError(f"{path.name} would be removed")


def after(spool: Spool, folder: Path) -> None:
    """The gateway's sweeps."""
    log = make_logger(stream=io.StringIO())
    remove_unrecorded_payloads(spool, log, folder / "payloads")
    if remove_unrecorded_receipts(spool, log, folder / "receipts"):
        raise AssertionError("a receipt was removed")
    if len(list((folder / "payloads").iterdir())) != IN_FLIGHT:
        raise AssertionError("a document was removed")


def child(way: str, spec: dict[str, object], folder: Path) -> None:
    """One sweep in this process: its time and RSS as JSON on stdout."""
    spool = open_spool(spec)
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t0 = time.perf_counter()
    (before if way == "before" else after)(spool, folder)
    took = time.perf_counter() - t0
    rss1 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    spool.close()
    print(json.dumps({"seconds": took, "rss_kib": rss1, "grew_kib": rss1 - rss0}))


def run_child(way: str, spec: dict[str, object], folder: Path) -> dict[str, float]:
    out = subprocess.run(
        [sys.executable, __file__, "--child", way, "--spec", json.dumps(spec), str(folder)],
        check=True,
        capture_output=True,
        text=True,
    )
    return dict(json.loads(out.stdout.splitlines()[-1]))


class Backend(Protocol):
    """A spool backend the sweeps are measured on (SQLite, PostgreSQL)."""

    name: str

    def fill(self, start: int, stop: int, folder: Path) -> None: ...

    def spec(self) -> dict[str, object]: ...

    def drop_indexes(self) -> None: ...


class SqliteBackend:
    name = "sqlite"

    def __init__(self, folder: Path) -> None:
        self.path = folder / "spool.db"
        SqliteSpool(self.path, SystemClock(), Claimant(node="this")).close()

    def fill(self, start: int, stop: int, folder: Path) -> None:
        with contextlib.closing(sqlite3.connect(self.path)) as db, db:
            db.executemany(
                f"INSERT INTO outbound ({COLUMNS}) VALUES ({','.join('?' * 17)})",  # noqa: S608
                rows(start, stop, folder),
            )

    def spec(self) -> dict[str, object]:
        return {"kind": "sqlite", "path": str(self.path)}

    def drop_indexes(self) -> None:
        with contextlib.closing(sqlite3.connect(self.path)) as db, db:
            for index in INDEXES:
                db.execute(f"DROP INDEX {index}")


class PostgresBackend:
    name = "postgresql"

    def __init__(self, server: PostgresServer) -> None:
        self.server = server
        self.settings = server.new_database()
        PostgresSpool(self.settings, SystemClock(), Claimant(node="this")).close()

    def fill(self, start: int, stop: int, folder: Path) -> None:
        with self.server.admin(self.settings.dbname) as db:
            with db.cursor().copy(f"COPY outbound ({COLUMNS}) FROM STDIN") as copy:
                for row in rows(start, stop, folder):
                    copy.write_row(row)
            db.execute("ANALYZE outbound")

    def spec(self) -> dict[str, object]:
        settings = {k: v for k, v in asdict(self.settings).items() if v is not None}
        settings["socket_dir"] = str(self.settings.socket_dir)
        return {"kind": "postgresql", "settings": settings}

    def drop_indexes(self) -> None:
        with self.server.admin(self.settings.dbname) as db:
            for index in INDEXES:
                db.execute(f"DROP INDEX {index}")
            db.execute(f"UPDATE spool_schema SET version = version - {len(INDEXES)}")  # noqa: S608


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--levels", default="20000,200000")
    parser.add_argument("--here", default="1.0,0.05")
    parser.add_argument("--spool", default="sqlite,postgresql")
    parser.add_argument("--child", choices=("before", "after"))
    parser.add_argument("--spec")
    parser.add_argument("folder", nargs="?")
    args = parser.parse_args()
    if args.child:
        child(args.child, json.loads(args.spec), Path(args.folder))
        return 0
    levels = [int(n) for n in args.levels.split(",")]
    fractions = [float(f) for f in args.here.split(",")]
    spools = args.spool.split(",")
    if levels != sorted(levels) or any(s not in ("sqlite", "postgresql") for s in spools):
        parser.error("--levels ascending; --spool: each of sqlite, postgresql")
    lines = []
    with contextlib.ExitStack() as stack:
        tmp = Path(stack.enter_context(tempfile.TemporaryDirectory()))
        server = None
        if "postgresql" in spools:
            bin_dir = server_binaries()
            if bin_dir is None:
                raise SystemExit(SKIP_REASON)
            server = stack.enter_context(running_server(bin_dir, durable=True))
        for spool_name in spools:
            for here in fractions:
                folder = tmp / f"{spool_name}-{here}"
                folder.mkdir()
                backend: Backend
                if spool_name == "sqlite":
                    backend = SqliteBackend(folder)
                else:
                    assert server is not None
                    backend = PostgresBackend(server)
                filled = files = 0
                for level in levels:
                    backend.fill(filled, level, folder)
                    files += make_files(folder, filled, level, here)
                    filled = level
                    old = run_child("before", backend.spec(), folder)
                    new = run_child("after", backend.spec(), folder)
                    line = (
                        f"{spool_name:<10} {level:>8,} rows {files:>8,} receipts here   "
                        f"before {old['seconds']:6.2f} s +{old['grew_kib'] / 1024:5.1f} MiB "
                        f"(peak {old['rss_kib'] / 1024:5.1f})   "
                        f"after {new['seconds']:6.2f} s +{new['grew_kib'] / 1024:5.1f} MiB "
                        f"(peak {new['rss_kib'] / 1024:5.1f})   "
                        f"after/before time {new['seconds'] / old['seconds']:5.2f}"
                    )
                    print(line, flush=True)
                    lines.append(line)
                backend.drop_indexes()
                t0 = time.perf_counter()
                open_spool(backend.spec()).close()
                line = (
                    f"{spool_name:<10} {filled:>8,} rows: first start after the upgrade builds "
                    f"the file-name indexes in {time.perf_counter() - t0:.2f} s"
                )
                print(line, flush=True)
                lines.append(line)
    print("\n" + "\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
