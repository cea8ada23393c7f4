"""The cost of encryption at rest (gateway.atrest), on vs off in the same run.

Run:  .venv/bin/python bench/atrest_bench.py [--rounds 3] [--messages 200] [--size 4096]
                                             [--big-mib 1024] [--big-rounds 1]

Two real gateways on this machine (as ``bench/e2e_bench.py``: demo PKI, mutual TLS,
SQLite spool with ``synchronous=FULL``, signed receipts, audit with fsync), once with
``[at_rest] enabled = true`` (the default: the AS2 bodies waiting to be sent and the
receipts received and sent are encrypted under their own keys) and once with
``enabled = false``, in alternating rounds (on first, then off first, ...) so that the
host's changing load falls on both alike:

* 4 KiB documents dropped into the lab's outbox until their receipts are verified:
  messages/s per round, and the ratio on / off of the medians;
* one large document (``--big-mib``, 1 GiB by default; 0 to skip) end to end: its
  time and the peak RSS of each daemon, on and off; memory must not grow with it.

Machines are shared and noisy: read the ratios, not the absolute figures.  The 1 GiB
run needs about 6 GiB free in the temporary folder.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from e2e_bench import AuditTail, cpu_seconds, demo, peak_rss_mib, wait_receipts

from gateway.demo_run import GatewayProcess, drop_file


@dataclass
class Round:
    encrypted: bool
    rate: float  # 4 KiB messages/s
    cpu_ms: float  # both daemons' CPU (user + system) per 4 KiB message
    big_seconds: float | None
    big_cpu: float | None  # both daemons' CPU seconds for the large document
    rss_mib: dict[str, float]


def _set_at_rest(config: Path, enabled: bool) -> None:
    config.write_text(config.read_text() + f"\n[at_rest]\nenabled = {str(enabled).lower()}\n")


def one_round(tmp: Path, encrypted: bool, messages: int, size: int, big_mib: int) -> Round:
    layout = demo(tmp / f"demo-{'on' if encrypted else 'off'}-{time.monotonic_ns()}", "ec-p256")
    for inst in (layout.hospital, layout.lab):
        _set_at_rest(inst.config_path, encrypted)
    hospital = GatewayProcess(layout.hospital.config_path)
    hospital.wait_ready()
    lab = GatewayProcess(layout.lab.config_path)
    lab.wait_ready()
    daemons = (("lab", lab), ("hospital", hospital))
    try:
        outbox = layout.lab.outbox_dir / "hospital"
        tail = AuditTail(layout.lab.audit_log)
        payload = os.urandom(size)
        cpu = sum(cpu_seconds(p.proc.pid) for _, p in daemons)
        start = time.time()
        for i in range(messages):
            drop_file(outbox, f"doc-{i:05d}.bin", payload)
        receipts = wait_receipts([tail], messages, 900)
        done = max(datetime.fromisoformat(r["time"]).timestamp() for r in receipts)
        rate = messages / (done - start)
        cpu_ms = (sum(cpu_seconds(p.proc.pid) for _, p in daemons) - cpu) * 1000 / messages
        big_seconds = big_cpu = None
        if big_mib:
            big = tmp / "big.dcm.tmp"
            with big.open("wb") as handle:
                block = os.urandom(1 << 20)
                for _ in range(big_mib):
                    handle.write(block)
            cpu = sum(cpu_seconds(p.proc.pid) for _, p in daemons)
            t0 = time.time()
            os.rename(big, outbox / "big.dcm")
            wait_receipts([tail], messages + 1, 3600)
            big_seconds = time.time() - t0
            big_cpu = sum(cpu_seconds(p.proc.pid) for _, p in daemons) - cpu
        rss = {n: peak_rss_mib(p.proc.pid) for n, p in daemons}
        return Round(encrypted, rate, cpu_ms, big_seconds, big_cpu, rss)
    finally:
        lab.stop()
        hospital.stop()
        for inbox_file in layout.hospital.inbox_dir.rglob("big.dcm"):
            inbox_file.unlink()


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=3, help="4 KiB rounds of each mode")
    parser.add_argument("--messages", type=int, default=200)
    parser.add_argument("--size", type=int, default=4096)
    parser.add_argument("--big-mib", type=int, default=1024, help="0: no large document")
    parser.add_argument("--big-rounds", type=int, default=1, help="large-document rounds of each")
    parser.add_argument("--dir", type=Path, default=None, help="where the gateways' files go")
    args = parser.parse_args()

    rounds: list[Round] = []
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp_name:
        tmp = Path(tmp_name)
        for n in range(max(args.rounds, args.big_rounds)):
            order = (True, False) if n % 2 == 0 else (False, True)
            for encrypted in order:
                big = args.big_mib if n < args.big_rounds else 0
                messages = args.messages if n < args.rounds else 1
                done = one_round(tmp, encrypted, messages, args.size, big)
                rounds.append(done)
                print(
                    f"round {n + 1} at rest {'on ' if encrypted else 'off'}: "
                    f"{done.rate:.1f} msg/s, CPU {done.cpu_ms:.1f} ms/msg"
                    + (
                        f", {big} MiB in {done.big_seconds:.1f} s, CPU {done.big_cpu:.1f} s"
                        if done.big_seconds
                        else ""
                    )
                    + f"; peak RSS lab {done.rss_mib['lab']:.0f} MiB, "
                    f"hospital {done.rss_mib['hospital']:.0f} MiB",
                    flush=True,
                )
    on = [r for r in rounds if r.encrypted][: args.rounds]
    off = [r for r in rounds if not r.encrypted][: args.rounds]
    rate_on = statistics.median(r.rate for r in on)
    rate_off = statistics.median(r.rate for r in off)
    cpu_on = statistics.median(r.cpu_ms for r in on)
    cpu_off = statistics.median(r.cpu_ms for r in off)
    print(
        f"4 KiB end to end, {args.messages} messages x {args.rounds} rounds each: "
        f"at rest on {rate_on:.1f} msg/s, off {rate_off:.1f} msg/s (medians): "
        f"on/off = {rate_on / rate_off:.2f} (target >= 0.90); CPU per message (both "
        f"daemons) on {cpu_on:.1f} ms, off {cpu_off:.1f} ms: on/off = {cpu_on / cpu_off:.2f}"
    )
    big_on = [r.big_seconds for r in rounds if r.encrypted and r.big_seconds]
    big_off = [r.big_seconds for r in rounds if not r.encrypted and r.big_seconds]
    if big_on and big_off:
        seconds_on, seconds_off = statistics.median(big_on), statistics.median(big_off)
        cpu_big_on = statistics.median(r.big_cpu for r in rounds if r.encrypted and r.big_cpu)
        cpu_big_off = statistics.median(r.big_cpu for r in rounds if not r.encrypted and r.big_cpu)
        rss_on = max(r.rss_mib["lab"] for r in rounds if r.encrypted and r.big_seconds)
        rss_off = max(r.rss_mib["lab"] for r in rounds if not r.encrypted and r.big_seconds)
        print(
            f"{args.big_mib} MiB document end to end: on {seconds_on:.1f} s, off "
            f"{seconds_off:.1f} s: time on/off = {seconds_on / seconds_off:.2f} "
            f"(target <= 1.10); CPU (both daemons) on {cpu_big_on:.1f} s, off "
            f"{cpu_big_off:.1f} s: on/off = {cpu_big_on / cpu_big_off:.2f}; peak RSS of the "
            f"lab on {rss_on:.0f} MiB, off {rss_off:.0f} MiB"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
