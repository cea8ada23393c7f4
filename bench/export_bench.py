"""Audit export benchmark: end-to-end throughput with [audit.export] on, against off.

Run:  .venv/bin/python bench/export_bench.py [--messages 200] [--rounds 2]

Two real gateways on this machine (as bench/e2e_bench.py), 4 KiB documents from the
lab's outbox to verified receipts.  Rounds alternate: export off, export on (both
gateways sending every audit record, ATNA XML over mutual TLS, to a real rsyslogd
started here as in tests/rsyslog.py), off, on...  The same machine, the same run:
the figure is the ratio on/off of the summed throughputs (documents per second,
first drop to last receipt, from the audit trail).  The acceptance bound is 0.90.
At the end the collector must hold every record written while export was on.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

from e2e_bench import AuditTail, cpu_seconds, wait_receipts

from gateway.audit.export.exporter import CURSOR_NAME
from gateway.demo_run import GatewayProcess, drop_file, free_ports, read_audit
from gateway.pki.demo import DemoLayout, init_demo

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tests.rsyslog import Collector


def run_round(
    layout: DemoLayout, configs: dict[Path, str], messages: int, tag: str
) -> tuple[float, float]:
    """Documents per second of one round, with the given configuration texts, and the
    CPU seconds both gateways used for it."""
    for path, text in configs.items():
        path.write_text(text)
    hospital = GatewayProcess(layout.hospital.config_path)
    hospital.wait_ready()
    lab = GatewayProcess(layout.lab.config_path)
    lab.wait_ready()
    try:
        tail = AuditTail(layout.lab.audit_log)
        tail.poll()
        before = len([r for r in tail.records if r["event"] == "receipt.received"])
        outbox = layout.lab.outbox_dir / "hospital"
        payload = os.urandom(4096)
        cpu_before = cpu_seconds(lab.proc.pid) + cpu_seconds(hospital.proc.pid)
        start = time.time()
        for i in range(messages):
            drop_file(outbox, f"{tag}-{i:05d}.bin", payload)
        receipts = wait_receipts([tail], before + messages, 600)[before:]
        done = max(datetime.fromisoformat(r["time"]).timestamp() for r in receipts)
        used = cpu_seconds(lab.proc.pid) + cpu_seconds(hospital.proc.pid) - cpu_before
        return messages / (done - start), used
    finally:
        lab.stop()
        hospital.stop()


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--messages", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=2, help="pairs of rounds (off, on)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        hospital_port, lab_port = free_ports(2)
        now = datetime.now(UTC)
        layout = init_demo(
            Path(tmp) / "demo", now=now, hospital_port=hospital_port, lab_port=lab_port
        )
        collector = Collector(Path(tmp) / "collector", now=now)
        collector.start()
        export = f"""
[audit.export]
collector = "127.0.0.1:{collector.port}"
ca = "{collector.ca_path}"
certificate = "{collector.client_cert}"
key = "{collector.client_key}"
format = "atna"
"""
        off: dict[Path, str] = {}
        for inst in (layout.hospital, layout.lab):
            text = inst.config_path.read_text()
            off[inst.config_path] = text.replace(
                "outbox_poll_seconds = 0.2", "outbox_poll_seconds = 0.05"
            )
        on = {path: text + export for path, text in off.items()}
        rates: dict[str, list[float]] = {"off": [], "on": []}
        cpu: dict[str, float] = {"off": 0.0, "on": 0.0}
        logs = (layout.hospital.audit_log, layout.lab.audit_log)
        written_on = 0  # records written while export was on
        try:
            for number in range(args.rounds):
                # off, on, then on, off: neither mode always runs on a warmer machine
                order = ("off", "on") if number % 2 == 0 else ("on", "off")
                for mode in order:
                    before = sum(len(read_audit(log)) for log in logs)
                    for inst in (layout.hospital, layout.lab):
                        # Export starts afresh at the log's end: the records of the
                        # "off" round before are not this round's work.
                        (inst.root / "state" / CURSOR_NAME).unlink(missing_ok=True)
                    rate, seconds = run_round(
                        layout, on if mode == "on" else off, args.messages, f"{mode}{number}"
                    )
                    if mode == "on":
                        written_on += sum(len(read_audit(log)) for log in logs) - before
                    rates[mode].append(rate)
                    cpu[mode] += seconds
                    print(f"round {number + 1} export {mode:<3} {rate:7.1f} documents/s")
            assert collector.proc is not None
            collector_cpu = cpu_seconds(collector.proc.pid)
            received = len(collector.received())
        finally:
            collector.stop()
        ratio = sum(rates["on"]) / sum(rates["off"])
        documents = args.messages * args.rounds
        print(f"export on / off: {ratio:.3f} (bound 0.90: {'met' if ratio >= 0.9 else 'MISSED'})")
        print(
            f"CPU of both gateways per document: off {cpu['off'] * 1000 / documents:.1f} ms, "
            f"on {cpu['on'] * 1000 / documents:.1f} ms; rsyslogd (same machine) "
            f"{collector_cpu * 1000 / documents:.1f} ms per document exported"
        )
        # Export starts at the end of the log the first time, after the daemon's first
        # records of the first "on" round: the collector holds at least the rest.
        print(f"collector received {received} records; {written_on} written with export on")
    return 0 if ratio >= 0.9 else 1


if __name__ == "__main__":
    raise SystemExit(main())
