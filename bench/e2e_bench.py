"""End-to-end benchmark: two real gateways on this machine, intake -> verified receipt.

Run:  .venv/bin/python bench/e2e_bench.py [--messages 300] [--size 4096] [--big-mib 0]
                                          [--keys ec-p256|rsa-2048]

Measures, in one run:
* 4 KiB documents dropped into the lab's outbox, delivered to the hospital with a
  durable spool and signed receipts: messages/s and p50/p99 latency (outbox
  rename -> receipt verified at the sender, from the audit trail);
* the crypto bound of the same work from ``openssl speed`` on this machine now
  (measured right before and right after the run; their mean is used):
  the private-key operations one message costs, one core.  With P-256 keys (the
  demo's, ``--keys ec-p256``): two ECDSA signatures (document, receipt) and two
  ECDH derivations (the sender's ephemeral key agreement, the receiver's key
  agreement).  With RSA-2048 keys (``--keys rsa-2048``, what most AS2 partners
  use): three RSA private-key operations (document signature, key transport
  decryption, receipt signature).  The bound is 1 / (sum of their times).  The
  public-key operations (verifications, the sender's RSA-OAEP encryption) are
  not in that bound; a second figure that includes them is printed beside it;
* optionally one large document (--big-mib) end to end: time, and the peak RSS
  (VmHWM) of each daemon.
Machines are shared and noisy: read the ratio, not the absolute figures.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

from gateway.demo_run import GatewayProcess, drop_file, free_ports
from gateway.pki.demo import init_demo


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


class AuditTail:
    """Reads an audit log incrementally: each poll parses only the lines added since.

    Re-reading the whole file on every poll would cost the benchmark CPU that
    grows with the run, taken from the two daemons it measures on a small machine.
    """

    def __init__(self, path: Path) -> None:
        self._path = path
        self._offset = 0
        self._partial = b""
        self.records: list[dict] = []

    def poll(self) -> None:
        if not self._path.exists():
            return
        with self._path.open("rb") as handle:
            handle.seek(self._offset)
            data = handle.read()
        self._offset += len(data)
        *lines, self._partial = (self._partial + data).split(b"\n")
        self.records.extend(json.loads(line) for line in lines if line.strip())


def wait_receipts(tail: AuditTail, count: int, timeout: float) -> list[dict]:
    deadline = time.monotonic() + timeout
    got: list[dict] = []
    while time.monotonic() < deadline:
        tail.poll()
        got = [r for r in tail.records if r["event"] == "receipt.received"]
        if len(got) >= count:
            return got
        time.sleep(0.25)  # the finishing time comes from the audit records, not from this poll
    raise SystemExit(f"only {len(got)} of {count} receipts after {timeout}s")


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--messages", type=int, default=300)
    parser.add_argument("--size", type=int, default=4096)
    parser.add_argument("--big-mib", type=int, default=0, help="also send one document this big")
    parser.add_argument("--keys", choices=("ec-p256", "rsa-2048"), default="ec-p256")
    args = parser.parse_args()

    before = openssl_rates(args.keys)

    with tempfile.TemporaryDirectory() as tmp:
        hospital_port, lab_port = free_ports(2)
        layout = init_demo(
            Path(tmp) / "demo",
            now=datetime.now(UTC),
            hospital_port=hospital_port,
            lab_port=lab_port,
            key_kind=args.keys,
        )
        for inst in (layout.hospital, layout.lab):
            text = inst.config_path.read_text()
            text = text.replace("outbox_poll_seconds = 0.2", "outbox_poll_seconds = 0.05")
            text = text.replace("max_message_bytes = 104857600", "max_message_bytes = 4294967296")
            text = text.replace("request_timeout_seconds = 60", "request_timeout_seconds = 3600")
            inst.config_path.write_text(text)
        hospital = GatewayProcess(layout.hospital.config_path)
        hospital.wait_ready()
        lab = GatewayProcess(layout.lab.config_path)
        lab.wait_ready()
        try:
            outbox = layout.lab.outbox_dir / "hospital"
            dropped: dict[str, float] = {}
            payload = os.urandom(args.size)
            cpu_before = {
                n: cpu_seconds(p.proc.pid) for n, p in (("lab", lab), ("hospital", hospital))
            }
            start = time.time()
            for i in range(args.messages):
                name = f"doc-{i:05d}.bin"
                drop_file(outbox, name, payload)
                dropped[name] = time.time()
            tail = AuditTail(layout.lab.audit_log)
            receipts = wait_receipts(tail, args.messages, 600)
            cpu_ms = {
                n: (cpu_seconds(p.proc.pid) - cpu_before[n]) * 1000 / args.messages
                for n, p in (("lab", lab), ("hospital", hospital))
            }
            accepted_records = [r for r in tail.records if r["event"] == "message.accepted"]
            accepted = {r["message_id"]: r["detail"]["filename"] for r in accepted_records}
            accepted_at = {
                r["message_id"]: datetime.fromisoformat(r["time"]).timestamp()
                for r in accepted_records
            }
            done = [datetime.fromisoformat(r["time"]).timestamp() for r in receipts]
            elapsed = max(done) - start
            latencies = sorted(
                datetime.fromisoformat(r["time"]).timestamp() - dropped[accepted[r["message_id"]]]
                for r in receipts
            )
            intake = sorted(accepted_at[m] - dropped[f] for m, f in accepted.items())
            sending = sorted(
                datetime.fromisoformat(r["time"]).timestamp() - accepted_at[r["message_id"]]
                for r in receipts
            )
            rate = args.messages / elapsed
            p50 = statistics.median(latencies)
            p99 = latencies[min(len(latencies) - 1, int(len(latencies) * 0.99))]
            # The host's load changes within minutes: the reference is measured right
            # before and right after the run, and their mean is used.
            after = openssl_rates(args.keys)
            rates = {name: (before[name] + after[name]) / 2 for name in before}
            bound, bound_all, counted = crypto_bounds(args.keys, rates)
            rates_text = ", ".join(
                f"{name} {ops:.0f}/s (before {before[name]:.0f}, after {after[name]:.0f})"
                for name, ops in rates.items()
            )
            print(f"openssl speed ({args.keys}, one core, mean of before and after): {rates_text}")
            print(
                f"crypto bound per message ({counted}): {bound:.0f} msg/s; "
                f"with the public-key operations too: {bound_all:.0f} msg/s"
            )
            print(
                f"end to end, {args.messages} x {args.size} B: {rate:.1f} msg/s "
                f"= {rate / bound:.2f} of the crypto bound ({rate / bound_all:.2f} of the second); "
                f"latency p50 {p50 * 1000:.0f} ms, p99 {p99 * 1000:.0f} ms"
            )
            print(
                f"  of which intake (outbox -> signed, encrypted, spooled) p50 "
                f"{statistics.median(intake) * 1000:.0f} ms, send -> verified receipt p50 "
                f"{statistics.median(sending) * 1000:.0f} ms"
            )
            print(
                f"  CPU per message (user + system): lab {cpu_ms['lab']:.1f} ms, "
                f"hospital {cpu_ms['hospital']:.1f} ms; busy: lab "
                f"{cpu_ms['lab'] * rate / 1000:.0%}, "
                f"hospital {cpu_ms['hospital'] * rate / 1000:.0%}"
                " of a core"
            )
            if args.big_mib:
                big = Path(tmp) / "big.dcm.tmp"
                with big.open("wb") as handle:
                    block = os.urandom(1 << 20)
                    for _ in range(args.big_mib):
                        handle.write(block)
                t0 = time.time()
                os.rename(big, outbox / "big.dcm")
                wait_receipts(tail, args.messages + 1, 3600)
                took = time.time() - t0
                print(
                    f"one {args.big_mib} MiB document end to end: {took:.1f} s "
                    f"({args.big_mib / took:.1f} MiB/s)"
                )
            print(
                f"peak RSS: lab {peak_rss_mib(lab.proc.pid):.0f} MiB, "
                f"hospital {peak_rss_mib(hospital.proc.pid):.0f} MiB"
            )
        finally:
            lab.stop()
            hospital.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
