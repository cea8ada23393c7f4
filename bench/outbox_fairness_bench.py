"""Outbox intake fairness: one peer's backlog, another peer's document, and what rounds cost.

Run:  .venv/bin/python bench/outbox_fairness_bench.py [--backlog 2000] [--repeat 3]

The lab of the demo (two peers: ``hospital`` and ``pharmacy``, the latter the
hospital's certificates under another name) takes its outbox with the gateway's
own intake (``Outbound.intake_once`` in a loop, as the daemon's intake loop
does), into a durable SQLite spool with encryption at rest and a fsync'ed audit
trail.  ``--backlog`` documents of 1 KiB wait for the hospital; after the first
call has taken its share, one document is dropped for the pharmacy.  Two ways,
alternated ``--repeat`` times in one invocation:

* ``rounds``: as shipped (``ROUND_PER_PEER`` documents of each peer a round);
* ``one pass``: ``ROUND_PER_PEER`` set beyond the backlog, so one call takes
  everything listed, as the intake did before rounds.

Printed for each: how many of the hospital's documents the audit trail records
as accepted before the pharmacy's, and the intake rate (documents/s, whole
backlog), median of the repeats; then the ratio of the rates, rounds / one pass,
measured side by side.  The machine is shared and noisy: read the ratio.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

import gateway.outbound.intake
from gateway.clock import SystemClock
from gateway.config import GatewayConfig
from gateway.demo_run import drop_file, free_ports, read_audit
from gateway.pki.demo import init_demo
from gateway.spool import SqliteSpool

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the tests' intake helper
from tests.helpers.intake import lab_intake, two_peers

SHIPPED_ROUND = gateway.outbound.intake.ROUND_PER_PEER


async def one_run(config: GatewayConfig, state: Path, backlog: int) -> tuple[int, float]:
    """(hospital documents accepted before the pharmacy's, documents per second)."""
    state.mkdir()
    busy = config.storage.outbox_dir / "hospital"
    busy.mkdir(parents=True, exist_ok=True)
    for i in range(backlog):
        (busy / f"order-{i:06}.hl7").write_bytes(b"MSH|^~\\&|%06d|" % i + b"x" * 1000)
    async with lab_intake(config, state, SystemClock(), SqliteSpool, at_rest=True) as lab:
        started = time.perf_counter()
        await lab.outbound.intake_once()
        drop_file(config.storage.outbox_dir / "pharmacy", "rx.hl7", b"MSH|rx\r")
        while await lab.outbound.intake_once():
            pass
        elapsed = time.perf_counter() - started
    peers = [
        r["peer"] for r in read_audit(state / "audit.jsonl") if r["event"] == "message.accepted"
    ]
    assert len(peers) == backlog + 1, f"{len(peers)} accepted of {backlog + 1}"
    return peers.index("pharmacy"), (backlog + 1) / elapsed


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backlog", type=int, default=2000)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="medgw-fairness-") as tmp:
        hospital_port, lab_port = free_ports(2)
        layout = init_demo(
            Path(tmp) / "demo",
            now=datetime.now(UTC),
            hospital_port=hospital_port,
            lab_port=lab_port,
        )
        config = two_peers(layout)
        results: dict[str, list[tuple[int, float]]] = {"rounds": [], "one pass": []}
        for n in range(args.repeat):
            for mode, size in (("rounds", SHIPPED_ROUND), ("one pass", args.backlog + 1)):
                gateway.outbound.intake.ROUND_PER_PEER = size
                state = Path(tmp) / f"state-{n}-{mode.replace(' ', '-')}"
                results[mode].append(asyncio.run(one_run(config, state, args.backlog)))
                before, rate = results[mode][-1]
                print(
                    f"  {mode:8}  run {n + 1}: {before:5} before the pharmacy's, {rate:6.0f} docs/s"
                )
        gateway.outbound.intake.ROUND_PER_PEER = SHIPPED_ROUND
    print(
        f"backlog {args.backlog} for one peer, {SHIPPED_ROUND} a peer a round, "
        f"{args.repeat} repeats"
    )
    rates = {}
    for mode, runs in results.items():
        rates[mode] = statistics.median(rate for _, rate in runs)
        before = max(b for b, _ in runs)
        print(
            f"{mode:8}  hospital documents before the pharmacy's: max {before:5}   "
            f"intake {rates[mode]:6.0f} docs/s (median)"
        )
    print(f"rate, rounds / one pass: {rates['rounds'] / rates['one pass']:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
