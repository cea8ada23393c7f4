"""Fairness benchmark: one peer floods the gateway, another peer's latency is measured.

Run:  .venv/bin/python bench/fairness_bench.py [--messages 60] [--flooders 8]
                                               [--flood-mib 8] [--segments 1-3]

A real ``medgw run`` (the demo hospital) receives, over mutual TLS:

* from peer ``clinic``: ``--messages`` small valid messages (4 KiB), one after
  the other; the time from the start of each request to its receipt is its
  latency;
* from peer ``lab``, during the second half of the run only: ``--flooders``
  connections each sending, without pause, a message of ``--flood-mib`` MiB of
  encrypted content re-encoded as BER in OCTET STRING segments of 1 to 3 bytes
  (``--segments``; the costliest legal encoding to read) with an altered GCM tag:
  each costs its whole decryption and is then refused.

Printed: the clinic's p50 and p99 latency unloaded (first half) and under the
flood (second half), and their ratios, loaded / unloaded, measured in the same
invocation; and how many flood messages the gateway got through meanwhile.
Machines are shared and noisy: read the ratios, not the absolute figures.
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import tempfile
import threading
import time
from datetime import UTC, datetime
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests.as2client

from gateway.as2.headers import new_message_id
from gateway.as2.message import BuiltMessage
from gateway.config import load_config
from gateway.demo_run import GatewayProcess, free_ports
from gateway.pki.demo import add_demo_sender, init_demo
from gateway.pki.keypair import KeyPair
from tests import as2client


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--messages", type=int, default=60, help="clinic messages per phase")
    parser.add_argument("--flooders", type=int, default=8, help="lab connections flooding")
    parser.add_argument("--flood-mib", type=float, default=8.0, help="MiB of content each")
    parser.add_argument("--segments", default="1-3", help="segment lengths, e.g. 1-3 or 1")
    args = parser.parse_args()
    low, _, high = args.segments.partition("-")
    shortest, longest = int(low), int(high or low)

    with tempfile.TemporaryDirectory(prefix="medgw-fairness-") as tmp:
        now = datetime.now(UTC)
        hospital_port, lab_port = free_ports(2)
        layout = init_demo(
            Path(tmp) / "demo", now=now, hospital_port=hospital_port, lab_port=lab_port
        )
        clinic_certs = add_demo_sender(layout, "clinic", "CLINIC", now=now)
        lab_certs = layout.lab.root / "certs"
        hospital = load_config(layout.hospital.config_path)
        recipient = hospital.smime.encryption.certificate

        def sender(certs: Path, as2_id: str) -> tuple[KeyPair, Path, Path]:
            pair = as2client.load_pair(certs / "sign.crt", certs / "sign.key")
            return pair, certs / "tls.crt", certs / "tls.key"

        clinic_pair, clinic_tls, clinic_key = sender(clinic_certs, "CLINIC")
        lab_pair, lab_tls, lab_key = sender(lab_certs, "KITA-LAB")
        rng = random.Random(2026)
        built = as2client.build(
            rng.randbytes(int(args.flood_mib * (1 << 20))),
            sender_as2="KITA-LAB",
            receiver_as2="SAKURA-HOSPITAL",
            signing=lab_pair,
            recipient=recipient,
        )
        flood_body = as2client.resegmented(
            built.body, lambda: rng.randint(shortest, longest), spoil_tag=True
        )
        flood_headers = tuple((k, v) for k, v in built.headers if k != "Message-ID")
        small = [
            as2client.build(
                rng.randbytes(4096),
                sender_as2="CLINIC",
                receiver_as2="SAKURA-HOSPITAL",
                signing=clinic_pair,
                recipient=recipient,
            )
            for _ in range(2 * args.messages)
        ]

        daemon = GatewayProcess(layout.hospital.config_path)
        try:
            daemon.wait_ready()

            def clinic_latency(message: BuiltMessage) -> float:
                started = time.perf_counter()
                answer = as2client.post(
                    hospital_port,
                    message.headers,
                    message.body,
                    client_cert=clinic_tls,
                    client_key=clinic_key,
                    ca=layout.ca_certificate,
                )
                elapsed = time.perf_counter() - started
                if answer.status != 200 or b"processed/error" in answer.body:
                    raise SystemExit(f"clinic message not processed: {answer.status}")
                return elapsed

            for message in small[:3]:  # warm up: first connections, imports
                clinic_latency(message)
            unloaded = [clinic_latency(m) for m in small[3 : args.messages]]

            stop = threading.Event()
            flooded = [0]

            def flood() -> None:
                while not stop.is_set():
                    headers = (*flood_headers, ("Message-ID", new_message_id("KITA-LAB")))
                    as2client.post(
                        hospital_port,
                        headers,
                        flood_body,
                        client_cert=lab_tls,
                        client_key=lab_key,
                        ca=layout.ca_certificate,
                        timeout=600,
                    )
                    flooded[0] += 1

            threads = [threading.Thread(target=flood, daemon=True) for _ in range(args.flooders)]
            for thread in threads:
                thread.start()
            time.sleep(2.0)  # the flood is under way: the peer's workers are busy
            started = time.perf_counter()
            loaded = [clinic_latency(m) for m in small[args.messages :]]
            flood_seconds = time.perf_counter() - started
            stop.set()
            for thread in threads:
                thread.join(600)
        finally:
            daemon.stop()

    p50u, p99u = statistics.median(unloaded), percentile(unloaded, 0.99)
    p50l, p99l = statistics.median(loaded), percentile(loaded, 0.99)
    mib = len(flood_body) / (1 << 20)
    print(
        f"flood: {args.flooders} connections from peer lab, {mib:.1f} MiB messages "
        f"(content in {args.segments}-byte BER segments, altered tag)"
    )
    rate = flooded[0] * mib / flood_seconds
    print(f"  flood messages answered meanwhile: {flooded[0]} ({rate:.1f} MiB/s)")
    print(f"clinic, {len(unloaded)} messages unloaded, {len(loaded)} under the flood (4 KiB each)")
    for name, plain, flooded_value in (("p50", p50u, p50l), ("p99", p99u, p99l)):
        print(
            f"  {name}  unloaded {plain * 1000:7.1f} ms   flooded {flooded_value * 1000:7.1f} ms"
            f"   ratio {flooded_value / plain:5.2f}"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
