"""Audit writer with rotation, against without: records per second in the same run.

Run:  .venv/bin/python bench/audit_rotation_bench.py [--records 200000] [--rounds 3]

One writer (gateway.audit.log.AuditLog) in this process appends ``--records``
records of a realistic size to a fresh trail in a temporary folder.  By default
its fsync does nothing, so that what is measured is the writer's own CPU per
record, where a per-record cost of rotation would show (with ``--fsync`` each
record is synced as in the daemon; on a slow disk that hides everything else).
Rounds alternate:
rotation off, rotation at the defaults (daily and 256 MiB: only the check per
record), and rotation every 1 MiB (the check, plus a checkpointless close,
rename and new file every few thousand records).  The figures are ratios of
each to "off", summed over the rounds.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

from gateway.audit import AuditEvent, AuditLog, EventType
from gateway.audit.files import trail_files
from gateway.audit.rotation import MIB, RotationSettings


class FastClock:
    """Wall time moving 1 ms per call: one rotation a second allows one every 1000 calls."""

    def __init__(self) -> None:
        self.at = datetime(2026, 12, 5, 1, 0, tzinfo=UTC)

    def now(self) -> datetime:
        self.at += timedelta(milliseconds=1)
        return self.at

    def monotonic(self) -> float:
        return self.at.timestamp()

    def boottime(self) -> float:
        return self.monotonic()


def run(
    folder: Path, records: int, rotation: RotationSettings | None, fsync: bool
) -> tuple[float, int]:
    path = folder / "audit.jsonl"
    sync = os.fsync if fsync else (lambda fd: None)
    log = AuditLog(path, FastClock(), node="BENCH-NODE", rotation=rotation, sync=sync)
    event = AuditEvent(
        EventType.MESSAGE_DELIVERED,
        peer="sakura-lab",
        message_id="<0123456789abcdef0123456789abcdef@KITA-LAB>",
        direction="inbound",
        actor="peer:sakura-lab",
        detail={"file": "inbox/lab/order-000001.hl7", "sha256": "ab" * 32, "size": 4096},
    )
    began = time.perf_counter()
    for _ in range(records):
        log.emit(event)
    log.close()
    seconds = time.perf_counter() - began
    return records / seconds, len(trail_files(path))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--records", type=int, default=200_000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--fsync", action="store_true", help="sync each record (slow)")
    args = parser.parse_args()
    kinds = {
        "off": None,
        "defaults": RotationSettings(),
        "every 1 MiB": RotationSettings(1 * MIB, daily=True),
    }
    totals = dict.fromkeys(kinds, 0.0)
    for round_ in range(args.rounds):
        for name, rotation in kinds.items():
            with tempfile.TemporaryDirectory(prefix="medgw-rotation-bench-") as folder:
                rate, files = run(Path(folder), args.records, rotation, args.fsync)
            totals[name] += rate
            print(f"round {round_ + 1} {name:12} {rate:9.0f} records/s  {files:4} files")
    for name in kinds:
        ratio = totals[name] / totals["off"]
        print(f"{name:12} {totals[name] / args.rounds:9.0f} records/s  ratio {ratio:.3f} of off")


if __name__ == "__main__":
    main()
