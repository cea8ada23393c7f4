"""Audit review benchmark: `medgw audit query` and `medgw audit patients` on a year of records.

Run:  .venv/bin/python bench/audit_query_bench.py [--records 10000000] [--dir PATH]

Writes an audit log of ``--records`` records spread evenly over one year (2026),
shaped as the gateway writes them (canonical JSON, seq, prev, hash, node): documents
sent (message.accepted with actor and patient_ids, message.sent, receipt.received),
documents received (message.received with patient_ids, message.delivered,
message.handed_over with patient_ids), and operators' reads (message.viewed, naming
only the message), for 200 000 patients.  Then runs the real command line, one
process per measurement, and prints its wall time and peak RSS (``ru_maxrss`` of
that child), as ratios against ``wc -l`` and ``grep -c`` on the same file measured
in the same run: the cost of merely reading every line.  Each review is run through
the index beside the log (``<log>.index``, gateway.audit.index: built by the first
review, whose time is shown apart) and with ``--no-index`` (the log alone; those
cases are stopped after ``--limit`` seconds).  Machines are shared and noisy: read
the ratios.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

YEAR = datetime(2026, 1, 1, tzinfo=UTC)
PATIENTS = 200_000
AUTHORITY = "1.2.392.200119.6.102.11312345"
PEERS = ("sakura-lab", "kita-pharmacy", "minami-clinic")


def write_trail(path: Path, count: int, rng: random.Random) -> None:
    step = timedelta(days=365) / count
    prev = "0" * 64
    seq = 0
    document = 0
    with path.open("w") as out:
        while seq < count:
            document += 1
            peer = rng.choice(PEERS)
            patient = f"P{rng.randrange(PATIENTS):07d}"
            ids = f'[{{"authority":"{AUTHORITY}","id":"{patient}","source":"hl7v2","type":"MR"}}]'
            message = f"<{document}.{rng.getrandbits(40):x}@medgw>"
            steps: list[tuple[str, str, str | None, str | None]]
            if document % 2:
                steps = [
                    ('"actor":"api:ris",', "message.accepted", "outbound", ids),
                    ("", "message.sent", "outbound", None),
                    ("", "receipt.received", "outbound", None),
                ]
            else:
                steps = [
                    (f'"actor":"peer:{peer}",', "message.received", "inbound", ids),
                    ("", "message.delivered", "inbound", None),
                    ('"actor":"medgw",', "message.handed_over", "inbound", ids),
                ]
            if document % 7 == 0:
                steps.append(('"actor":"operator:sato (uid 1001)",', "message.viewed", None, None))
            for actor, event, direction, patients in steps:
                if seq >= count:
                    break
                seq += 1
                at = (YEAR + step * seq).isoformat(timespec="microseconds")
                digest = hashlib.sha256(prev.encode() + str(seq).encode()).hexdigest()
                line = (
                    f'{{{actor}"detail":{{"sha256":"{digest}"}},'
                    + (f'"direction":"{direction}",' if direction else "")
                    + f'"event":"{event}",'
                    f'"hash":"{digest}","message_id":"{message}","node":"SAKURA-HOSP",'
                    f'"outcome":"success",'
                    + (f'"patient_ids":{patients},' if patients else "")
                    + f'"peer":"{peer}","prev":"{prev}","seq":{seq},'
                    f'"severity":"info","time":"{at}"}}\n'
                )
                out.write(line)
                prev = digest
    # As the writer leaves it (gateway.audit.order): the file's first record noted, and no
    # step back of the clock, so that reviews bisect the file on time.
    first = json.loads(path.open().readline())
    note = json.dumps({"first_hash": first["hash"], "seq": first["seq"]})
    path.with_name(path.name + ".order").write_text(note + "\n")


def run(command: list[str], limit: float | None = None) -> tuple[float, float, int] | None:
    """Wall seconds, peak RSS in MiB, and lines of output of one child process (None if
    it had not finished after ``limit`` seconds)."""
    with tempfile.TemporaryFile() as output:
        began = time.perf_counter()
        child = subprocess.Popen(command, stdout=output, stderr=subprocess.PIPE)
        while True:
            pid, status, usage = os.wait4(child.pid, os.WNOHANG)
            if pid:
                break
            if limit is not None and time.perf_counter() - began > limit:
                child.kill()
                os.wait4(child.pid, 0)
                return None
            time.sleep(0.05)
        elapsed = time.perf_counter() - began
        child.returncode = os.waitstatus_to_exitcode(status)
        if child.returncode and not (command[0] == "grep" and child.returncode == 1):
            raise SystemExit(
                f"{command} failed: {child.stderr.read().decode() if child.stderr else ''}"
            )
        output.seek(0)
        lines = sum(1 for _ in output)
    return elapsed, usage.ru_maxrss / 1024, lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--records", type=int, default=10_000_000)
    parser.add_argument("--dir", type=Path, default=None, help="where to write the log")
    parser.add_argument("--log", type=Path, help="use this log written by an earlier run")
    parser.add_argument(
        "--limit", type=float, default=600, help="seconds a case without the index may take"
    )
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(dir=args.dir) as folder:
        path = args.log or Path(folder) / "audit.jsonl"
        began = time.perf_counter()
        if args.log is None:
            write_trail(path, args.records, random.Random(15))
        size = path.stat().st_size
        print(
            f"{args.records} records, {size / 2**30:.2f} GiB, written in "
            f"{time.perf_counter() - began:.0f} s"
        )
        medgw = [sys.executable, "-m", "gateway", "audit"]
        patient = "P0012345"
        wc = run(["wc", "-l", str(path)])
        grep = run(["grep", "-c", patient, str(path)])
        assert wc is not None and grep is not None
        print(f"{'reference':<58} {'time':>8} {'peak RSS':>10}  rows")
        print(f"{'wc -l':<58} {wc[0]:7.1f}s {wc[1]:8.1f}Mi")
        print(f"{'grep -c ' + patient:<58} {grep[0]:7.1f}s {grep[1]:8.1f}Mi")
        index = path.with_name(path.name + ".index")
        if index.exists():
            index.unlink()
        cases = [
            ("query, one day (bisected)", ["query", "--since", "2026-06-15", "--until",
                                           "2026-06-15", "--format", "json"]),
            ("query, one month, --event message.viewed", ["query", "--since", "2026-06-01",
             "--until", "2026-06-30", "--event", "message.viewed", "--format", "json"]),
            (f"query, the year, --patient {patient}", ["query", "--patient", patient,
                                                       "--format", "json"]),
            ("query, the year, --actor 'operator:sato (uid 1001)'", ["query", "--actor",
             "operator:sato (uid 1001)", "--format", "json"]),
            ("patients, one month", ["patients", "--since", "2026-06-01", "--until",
                                     "2026-06-30", "--format", "csv"]),
            ("patients, the year", ["patients", "--format", "csv"]),
        ]  # fmt: skip
        print(f"{'medgw audit ...':<58} {'time':>8} {'peak RSS':>10}  rows   time/wc  time/grep")

        def show(name: str, found: tuple[float, float, int] | None) -> None:
            if found is None:
                print(f"{name:<58} not finished after {args.limit:.0f} s")
                return
            elapsed, rss, rows = found
            print(
                f"{name:<58} {elapsed:7.1f}s {rss:8.1f}Mi {rows:>6} "
                f"{elapsed / wc[0]:8.1f}x {elapsed / grep[0]:8.1f}x"
            )

        show(
            "index built by the first review (--event audit.none)",
            run([*medgw, "query", "--event", "audit.none", "--file", str(path)]),
        )
        print(f"{'index size':<58} {index.stat().st_size / 2**30:7.2f} GiB")
        for name, command in cases:
            show(f"{name}, index", run([*medgw, *command, "--file", str(path)]))
        for name, command in cases:
            show(
                f"{name}, --no-index",
                run([*medgw, *command, "--no-index", "--file", str(path)], args.limit),
            )


if __name__ == "__main__":
    main()
