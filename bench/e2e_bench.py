"""End-to-end benchmark: two real gateways on this machine, intake -> verified receipt.

Run:  .venv/bin/python bench/e2e_bench.py [--messages 300] [--size 4096] [--big-mib 0]
                                          [--keys rsa-2048,ec-p256] [--spool sqlite]
                                          [--nodes 1]

Measures, in one run, for each key type asked for (both by default, in that order):
* 4 KiB documents dropped into the lab's outbox, delivered to the hospital with a
  durable spool and signed receipts: messages/s and p50/p99 latency (outbox
  rename -> receipt verified at the sender, from the audit trail);
* the references, measured right before and right after all the runs (their
  mean is used), one core each:
  - the crypto bound from ``openssl speed``: the private-key operations one
    message costs.  With RSA-2048 keys (what most AS2 partners use): three RSA
    private-key operations (document signature, key transport decryption,
    receipt signature); every run's rate is given as a ratio of this bound.
    With P-256 keys (the demo's): two ECDSA signatures (document, receipt) and
    two ECDH derivations; the P-256 run's ratio of its own bound is printed
    too.  A figure that also counts the public-key operations (verifications,
    the sender's RSA-OAEP encryption) is printed beside each bound;
  - pyas2lib's in-process round trip (build, parse, signed MDN built and
    parsed; no network, no disk), RSA-2048, installed from PyPI into the
    bench's own environment (``bench/pyas2lib_ref.py``); every run's rate is
    also given as a multiple of it;
* optionally one large document (--big-mib, with the first key type) end to
  end: time, and the peak RSS (VmHWM) of each daemon;
* with ``--spool sqlite,postgresql``, every run once per spool backend (each key
  type's runs one after the other), the PostgreSQL spool on a server of
  Debian's ``postgresql`` package started for the bench (fsync on, as the
  SQLite spool's synchronous=FULL), each daemon with a database of its own;
* with ``--nodes 1,2``, the PostgreSQL runs once per node count: with two, each
  side runs two ``medgw run`` nodes sharing its spool database (the cluster of
  README "Running several nodes", built as tests/helpers/cluster.py builds it),
  the documents dropped into the lab nodes' outboxes in turn, the hospital's
  nodes behind one TCP front that hands each connection to the next node (it
  runs in the bench's process; its CPU is printed apart).  Every run's rate and
  CPU per message is also given as a ratio of the SQLite single node's, when one
  ran with the same key type.
Machines are shared and noisy: read the ratios, not the absolute figures.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pyas2lib_ref

import gateway
from gateway.demo_run import GatewayProcess, drop_file, free_ports
from gateway.pki.demo import DemoLayout, init_demo

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the tests' server helper
from tests.helpers.cluster import RoundRobin, add_node, listener_port, point_peer_at
from tests.helpers.postgres import (
    SKIP_REASON,
    PostgresServer,
    running_server,
    server_binaries,
    spool_section,
)


def openssl_rates(keys: str) -> dict[str, float]:
    """Operations per second on one core, from ``openssl speed``, for the key type."""
    if keys == "rsa-2048":
        out = _speed("rsa2048")
        rsa = re.search(r"rsa 2048 bits\s+[\d.]+s\s+[\d.]+s\s+([\d.]+)\s+([\d.]+)", out)
        if not rsa:
            raise SystemExit(f"cannot read openssl speed output:\n{out}")
        return {"sign": float(rsa.group(1)), "public": float(rsa.group(2))}
    out = _speed("ecdsap256", "ecdhp256")
    sign_verify = re.search(
        r"256 bits ecdsa \(nistp256\)\s+[\d.]+s\s+[\d.]+s\s+([\d.]+)\s+([\d.]+)", out
    )
    ecdh = re.search(r"256 bits ecdh \(nistp256\)\s+[\d.]+s\s+([\d.]+)", out)
    if not sign_verify or not ecdh:
        raise SystemExit(f"cannot read openssl speed output:\n{out}")
    return {
        "sign": float(sign_verify.group(1)),
        "public": float(sign_verify.group(2)),
        "ecdh": float(ecdh.group(1)),
    }


def _speed(*algorithms: str) -> str:
    return subprocess.run(
        ["openssl", "speed", "-seconds", "2", *algorithms],
        capture_output=True,
        text=True,
        check=True,
    ).stdout


def crypto_bounds(keys: str, rates: dict[str, float]) -> tuple[float, float, str]:
    """(private-key bound, bound with the public-key operations too, what they count)."""
    if keys == "rsa-2048":
        private = 3 / rates["sign"]  # document signature, key transport decryption, receipt
        public = 3 / rates["public"]  # two signature verifications, the OAEP encryption
        return 1 / private, 1 / (private + public), "3 RSA-2048 private-key operations"
    private = 2 / rates["sign"] + 2 / rates["ecdh"]
    public = 2 / rates["public"]
    return 1 / private, 1 / (private + public), "2 ECDSA P-256 signatures + 2 ECDH P-256"


def peak_rss_mib(pid: int) -> float:
    status = Path(f"/proc/{pid}/status").read_text()
    match = re.search(r"VmHWM:\s+(\d+) kB", status)
    return int(match.group(1)) / 1024 if match else float("nan")


def cpu_seconds(pid: int) -> float:
    """User + system CPU time a process has used so far (/proc/PID/stat)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def context_switches(pid: int) -> int:
    """How often the threads a process has now have blocked (voluntary context switches:
    a wait for the GIL, a lock, a worker thread, the event loop or the disk; preemptions
    by other work on the host are left out)."""
    total = 0
    for status in Path(f"/proc/{pid}/task").glob("*/status"):
        with contextlib.suppress(OSError):  # a thread that ended meanwhile
            for line in status.read_text().splitlines():
                if line.startswith("voluntary_ctxt_switches:"):
                    total += int(line.split(":")[1])
    return total


class AuditTail:
    """Reads an audit log incrementally: each poll parses only the lines added since.

    Re-reading the whole file on every poll would cost the benchmark CPU that
    grows with the run, taken from the two daemons it measures on a small machine.
    """

    def __init__(self, path: Path) -> None:
        self._path = path
        self._offset = 0
        self._partial = b""
        self.records: list[dict[str, Any]] = []

    def poll(self) -> None:
        if not self._path.exists():
            return
        with self._path.open("rb") as handle:
            handle.seek(self._offset)
            data = handle.read()
        self._offset += len(data)
        *lines, self._partial = (self._partial + data).split(b"\n")
        self.records.extend(json.loads(line) for line in lines if line.strip())


def wait_receipts(tails: list[AuditTail], count: int, timeout: float) -> list[dict[str, Any]]:
    """The receipts recorded in the sender's trails (one per node), once ``count`` are."""
    deadline = time.monotonic() + timeout
    got: list[dict[str, Any]] = []
    while time.monotonic() < deadline:
        for tail in tails:
            tail.poll()
        got = [r for t in tails for r in t.records if r["event"] == "receipt.received"]
        if len(got) >= count:
            return got
        time.sleep(0.25)  # the finishing time comes from the audit records, not from this poll
    raise SystemExit(f"only {len(got)} of {count} receipts after {timeout}s")


KEY_NAMES = {"rsa-2048": "RSA-2048", "ec-p256": "P-256"}


@dataclass
class Run:
    """What one end-to-end run of one key type measured."""

    keys: str
    spool: str  # "sqlite" or "postgresql"
    nodes: int  # per side
    rate: float
    latency: tuple[float, float]  # p50, p99, seconds
    intake_p50: float
    send_p50: float
    cpu_ms: dict[str, float]  # per side, its nodes' CPU together
    switches: dict[str, float]  # per side, its nodes' voluntary context switches per message
    front_cpu_ms: float  # the bench's own process (the TCP front, the audit polls)
    rss_mib: dict[str, float]
    big_seconds: float | None


def demo(root: Path, keys: str) -> DemoLayout:
    """The demo PKI and two gateways' configuration, tuned for the bench."""
    hospital_port, lab_port = free_ports(2)
    layout = init_demo(
        root, now=datetime.now(UTC), hospital_port=hospital_port, lab_port=lab_port, key_kind=keys
    )
    for inst in (layout.hospital, layout.lab):
        text = inst.config_path.read_text()
        text = text.replace("outbox_poll_seconds = 0.2", "outbox_poll_seconds = 0.05")
        text = text.replace("max_message_bytes = 104857600", "max_message_bytes = 4294967296")
        text = text.replace("request_timeout_seconds = 60", "request_timeout_seconds = 3600")
        inst.config_path.write_text(text)
    return layout


@dataclass
class Sides:
    """The running daemons of one run: each side's nodes, the lab's outboxes to the
    hospital and its audit trails."""

    lab: list[GatewayProcess]
    hospital: list[GatewayProcess]
    outboxes: list[Path]
    trails: list[Path]

    def daemons(self) -> list[tuple[str, GatewayProcess]]:
        return [("lab", p) for p in self.lab] + [("hospital", p) for p in self.hospital]


def start_sides(
    layout: DemoLayout, db: PostgresServer | None, nodes: int, stack: contextlib.ExitStack
) -> Sides:
    """Start the hospital's nodes, then the lab's: one each (on SQLite, or each on a
    PostgreSQL database of its own), or ``nodes`` per side, each side's sharing one
    database, the hospital's behind one TCP front."""
    configs: dict[str, list[Path]] = {}
    if nodes == 1:
        for inst in (layout.hospital, layout.lab):
            if db is not None:
                with inst.config_path.open("a") as appended:
                    appended.write(spool_section(db.new_database()))
        configs = {"hospital": [layout.hospital.config_path], "lab": [layout.lab.config_path]}
    else:
        assert db is not None
        for side, inst in (("hospital", layout.hospital), ("lab", layout.lab)):
            spool = db.new_database()
            names = [f"{side}-{chr(ord('a') + n)}" for n in range(nodes)]
            configs[side] = [add_node(inst, names[0], spool)] + [
                add_node(inst, name, spool, port=free_ports(1)[0]) for name in names[1:]
            ]
        front = RoundRobin([listener_port(c) for c in configs["hospital"]])
        stack.callback(front.close)
        point_peer_at(layout.lab, "hospital", front.port)
    running: dict[str, list[GatewayProcess]] = {}
    for side in ("hospital", "lab"):
        running[side] = []
        for config in configs[side]:
            # One after the other: nodes started at the same instant race to create
            # the shared key folder of the encryption at rest (one fails: File exists).
            node = GatewayProcess(config)
            stack.callback(node.stop)
            running[side].append(node)
            node.wait_ready()
    others = [f"lab-{chr(ord('a') + n)}" for n in range(1, nodes)]  # add_node's folders
    return Sides(
        lab=running["lab"],
        hospital=running["hospital"],
        outboxes=[layout.lab.outbox_dir / "hospital"]
        + [layout.lab.root / f"outbox-{name}" / "hospital" for name in others],
        trails=[layout.lab.audit_log]
        + [layout.lab.root / "audit" / f"audit-{name}.jsonl" for name in others],
    )


def end_to_end(
    tmp: Path,
    keys: str,
    messages: int,
    size: int,
    big_mib: int,
    db: PostgresServer | None,
    nodes: int = 1,
) -> Run:
    layout = demo(tmp / f"demo-{keys}-{'postgresql' if db else 'sqlite'}-{nodes}", keys)
    with contextlib.ExitStack() as stack:
        sides = start_sides(layout, db, nodes, stack)
        return measure(sides, keys, messages, size, big_mib, tmp, db is not None, nodes)


def measure(
    sides: Sides,
    keys: str,
    messages: int,
    size: int,
    big_mib: int,
    tmp: Path,
    postgresql: bool,
    nodes: int,
) -> Run:
    """Drop ``messages`` documents into the lab's outboxes in turn; what it took until
    every receipt was verified."""
    daemons = sides.daemons()
    dropped: dict[str, float] = {}
    payload = os.urandom(size)
    cpu_before = [cpu_seconds(p.proc.pid) for _, p in daemons]
    switches_before = [context_switches(p.proc.pid) for _, p in daemons]
    own_before = time.process_time()
    start = time.time()
    for i in range(messages):
        name = f"doc-{i:05d}.bin"
        drop_file(sides.outboxes[i % len(sides.outboxes)], name, payload)
        dropped[name] = time.time()
    tails = [AuditTail(path) for path in sides.trails]
    receipts = wait_receipts(tails, messages, 600)
    front_cpu_ms = (time.process_time() - own_before) * 1000 / messages
    cpu_ms = dict.fromkeys(("lab", "hospital"), 0.0)
    switches = dict.fromkeys(("lab", "hospital"), 0.0)
    for (side, node), before, switched in zip(daemons, cpu_before, switches_before, strict=True):
        cpu_ms[side] += (cpu_seconds(node.proc.pid) - before) * 1000 / messages
        switches[side] += (context_switches(node.proc.pid) - switched) / messages
    records = [r for t in tails for r in t.records]
    accepted_records = [r for r in records if r["event"] == "message.accepted"]
    accepted = {r["message_id"]: r["detail"]["filename"] for r in accepted_records}
    accepted_at = {
        r["message_id"]: datetime.fromisoformat(r["time"]).timestamp() for r in accepted_records
    }
    done = [datetime.fromisoformat(r["time"]).timestamp() for r in receipts]
    latencies = sorted(
        datetime.fromisoformat(r["time"]).timestamp() - dropped[accepted[r["message_id"]]]
        for r in receipts
    )
    intake = [accepted_at[m] - dropped[f] for m, f in accepted.items()]
    sending = [
        datetime.fromisoformat(r["time"]).timestamp() - accepted_at[r["message_id"]]
        for r in receipts
    ]
    big_seconds = None
    if big_mib:
        big = tmp / "big.dcm.tmp"
        with big.open("wb") as handle:
            block = os.urandom(1 << 20)
            for _ in range(big_mib):
                handle.write(block)
        t0 = time.time()
        os.rename(big, sides.outboxes[0] / "big.dcm")
        wait_receipts(tails, messages + 1, 3600)
        big_seconds = time.time() - t0
    return Run(
        keys=keys,
        spool="postgresql" if postgresql else "sqlite",
        nodes=nodes,
        rate=messages / (max(done) - start),
        latency=(statistics.median(latencies), percentile(latencies, 0.99)),
        intake_p50=statistics.median(intake),
        send_p50=statistics.median(sending),
        cpu_ms=cpu_ms,
        switches=switches,
        front_cpu_ms=front_cpu_ms,
        rss_mib={n: max(peak_rss_mib(p.proc.pid) for s, p in daemons if s == n) for n in cpu_ms},
        big_seconds=big_seconds,
    )


def percentile(ordered: list[float], fraction: float) -> float:
    return ordered[min(len(ordered) - 1, int(len(ordered) * fraction))]


def references(keys: list[str], pyas2lib_keys: DemoLayout, size: int) -> dict[str, float]:
    """openssl speed for every key type run (RSA-2048 always), and pyas2lib's round trip."""
    rates = {f"rsa-2048 {k}": v for k, v in openssl_rates("rsa-2048").items()}
    if "ec-p256" in keys:
        rates |= {f"ec-p256 {k}": v for k, v in openssl_rates("ec-p256").items()}
    rates["pyas2lib"] = pyas2lib_ref.rate(
        pyas2lib_keys.lab.root / "certs",
        pyas2lib_keys.hospital.root / "certs",
        pyas2lib_keys.ca_certificate,
        size,
        seconds=5,
    )
    return rates


@contextlib.contextmanager
def database(spools: list[str]) -> Iterator[PostgresServer | None]:
    """A PostgreSQL server for the runs on that spool (None: none asked for)."""
    if "postgresql" not in spools:
        yield None
        return
    bin_dir = server_binaries()
    if bin_dir is None:
        raise SystemExit(SKIP_REASON)
    with running_server(bin_dir, durable=True) as server:
        yield server


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--messages", type=int, default=300)
    parser.add_argument("--size", type=int, default=4096)
    parser.add_argument(
        "--big-mib", type=int, default=0, help="also send one document this big (first key type)"
    )
    parser.add_argument(
        "--keys",
        default="rsa-2048,ec-p256",
        help="key types to run, in this order, comma-separated: rsa-2048, ec-p256",
    )
    parser.add_argument(
        "--spool",
        default="sqlite",
        help="spool backends to run each key type on, comma-separated: sqlite, postgresql",
    )
    parser.add_argument(
        "--nodes",
        default="1",
        help="nodes per side for the PostgreSQL runs, comma-separated: 1, 2, 3",
    )
    args = parser.parse_args()
    # The daemons (`python -m gateway`) import from their working folder first, ahead of
    # PYTHONPATH: started from the folder of the package this bench imported, they run
    # the same code, also when PYTHONPATH names another tree to measure.
    os.chdir(Path(gateway.__file__).resolve().parents[1])
    keys = args.keys.split(",")
    if not keys or any(k not in KEY_NAMES for k in keys):
        parser.error(f"--keys: each of {', '.join(KEY_NAMES)}, comma-separated")
    spools = args.spool.split(",")
    if not spools or any(s not in ("sqlite", "postgresql") for s in spools):
        parser.error("--spool: each of sqlite, postgresql, comma-separated")
    node_counts = [int(n) for n in args.nodes.split(",") if n.isdigit()]
    if len(node_counts) != len(args.nodes.split(",")) or not all(1 <= n <= 3 for n in node_counts):
        parser.error("--nodes: each of 1, 2, 3, comma-separated")
    if node_counts != [1] and "postgresql" not in spools:
        parser.error("--nodes: several nodes share a PostgreSQL spool: add --spool postgresql")

    with tempfile.TemporaryDirectory() as tmp_name, database(spools) as db:
        tmp = Path(tmp_name)
        reference_keys = demo(tmp / "pyas2lib", "rsa-2048")
        # The host's load changes within minutes: the references are measured right
        # before and right after the runs, and their mean is used.
        before = references(keys, reference_keys, args.size)
        runs = [
            end_to_end(
                tmp,
                k,
                args.messages,
                args.size,
                args.big_mib if i == 0 and spool == spools[0] else 0,
                db if spool == "postgresql" else None,
                nodes,
            )
            for i, k in enumerate(keys)
            for spool in spools
            for nodes in (node_counts if spool == "postgresql" else [1])
        ]
        after = references(keys, reference_keys, args.size)
    rates = {name: (before[name] + after[name]) / 2 for name in before}
    print("references (one core; mean of right before and right after the runs):")
    for name, ops in rates.items():
        what = "round trips/s in process" if name == "pyas2lib" else "/s openssl speed"
        print(
            f"  {name:<18} {ops:8.0f} {what} (before {before[name]:.0f}, after {after[name]:.0f})"
        )
    rsa = {k.split()[1]: v for k, v in rates.items() if k.startswith("rsa-2048 ")}
    rsa_bound, rsa_bound_all, rsa_counted = crypto_bounds("rsa-2048", rsa)
    print(
        f"RSA-2048 bound ({rsa_counted}): {rsa_bound:.0f} msg/s "
        f"({rsa_bound_all:.0f} with the public-key operations too)"
    )
    for run in runs:
        own = {k.split()[1]: v for k, v in rates.items() if k.startswith(f"{run.keys} ")}
        bound, bound_all, counted = crypto_bounds(run.keys, own)
        p50, p99 = run.latency
        where = f"{run.spool} spool" + (f", {run.nodes} nodes per side" if run.nodes > 1 else "")
        print(
            f"end to end, {KEY_NAMES[run.keys]} keys, {where}, "
            f"{args.messages} x {args.size} B: "
            f"{run.rate:.1f} msg/s = {run.rate / rsa_bound:.2f} of the RSA-2048 bound "
            f"(target >= 0.30), {run.rate / rates['pyas2lib']:.1f} x pyas2lib (target >= 8); "
            f"latency p50 {p50 * 1000:.0f} ms, p99 {p99 * 1000:.0f} ms"
        )
        if run.keys != "rsa-2048":
            print(
                f"  {run.rate / bound:.2f} of its own bound ({counted}: {bound:.0f} msg/s; "
                f"{bound_all:.0f} with the verifications)"
            )
        print(
            f"  of which intake (outbox -> signed, encrypted, spooled) p50 "
            f"{run.intake_p50 * 1000:.0f} ms, send -> verified receipt p50 "
            f"{run.send_p50 * 1000:.0f} ms"
        )
        print(
            f"  CPU per message (user + system): lab {run.cpu_ms['lab']:.1f} ms, "
            f"hospital {run.cpu_ms['hospital']:.1f} ms; busy: lab "
            f"{run.cpu_ms['lab'] * run.rate / 1000:.0%}, "
            f"hospital {run.cpu_ms['hospital'] * run.rate / 1000:.0%} of a core"
        )
        print(
            f"  voluntary context switches per message (waits): lab {run.switches['lab']:.0f}, "
            f"hospital {run.switches['hospital']:.0f}"
        )
        if run.nodes > 1:
            print(
                f"  CPU per message of the TCP front and the audit polls: {run.front_cpu_ms:.1f} ms"
            )
        single = next(
            (r for r in runs if r.keys == run.keys and r.spool == "sqlite" and r.nodes == 1), None
        )
        if single is not None and run is not single:
            cpu, single_cpu = sum(run.cpu_ms.values()), sum(single.cpu_ms.values())
            print(
                f"  against the SQLite single node: rate {run.rate / single.rate:.2f}, "
                f"CPU per message {cpu / single_cpu:.2f} (both sides), "
                f"p50 {p50 / single.latency[0]:.2f}, p99 {p99 / single.latency[1]:.2f}"
            )
        if run.big_seconds is not None:
            print(
                f"  one {args.big_mib} MiB document end to end: {run.big_seconds:.1f} s "
                f"({args.big_mib / run.big_seconds:.1f} MiB/s)"
            )
        print(
            f"  peak RSS: lab {run.rss_mib['lab']:.0f} MiB, "
            f"hospital {run.rss_mib['hospital']:.0f} MiB"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
