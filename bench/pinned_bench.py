"""What a request on a connection accepted by a key pin (``tls_spki_pins``) costs the
receiver for judging the peer's certificate: the full judgement (path, purpose,
revocation from the zone's CRLs), which every request paid before, against the
verdict kept for the connection (:class:`gateway.daemon.as2_handler.PinnedVerdicts`),
which its later requests within a minute pay now.  CPU time, one core, demo PKI.

    .venv/bin/python bench/pinned_bench.py [--rounds 200]
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import cast

from cryptography import x509

from gateway.clock import SystemClock
from gateway.config import load_config
from gateway.daemon.as2_handler import PinnedVerdicts
from gateway.daemon.state import RuntimeState
from gateway.pki.demo import init_demo
from gateway.pki.validate import Purpose, RevocationPolicy, validate


class _Connection(asyncio.Transport):
    """Stands for one TLS connection (only its identity is used)."""


async def measure(root: Path, rounds: int) -> tuple[float, float]:
    layout = init_demo(root, now=datetime.now(UTC), hospital_port=40001, lab_port=40002)
    config = load_config(layout.hospital.config_path)
    peer = config.require_peer("lab")
    zone = next(z for z in config.zones if z.name == peer.zone)
    cert = x509.load_pem_x509_certificate((layout.lab.root / "certs" / "tls.crt").read_bytes())

    async def judge() -> bool:
        verdict = await validate(
            cert,
            anchors=zone.trust_anchors,
            purpose=Purpose.TLS_CLIENT,
            at=datetime.now(UTC),
            revocation=RevocationPolicy(zone.revocation),
            crls=zone.crls_in_use,
            ocsp=zone.ocsp,
            ocsp_client=None,
            policy=peer.policy,
        )
        return verdict.valid

    assert await judge(), "the demo certificate must be acceptable"
    started = time.process_time()
    for _ in range(rounds):
        await judge()
    full = (time.process_time() - started) / rounds

    verdicts = PinnedVerdicts(SystemClock())
    state, connection = cast(RuntimeState, object()), _Connection()
    verdicts.accepted(connection, state, peer, cert)
    started = time.process_time()
    for _ in range(rounds * 100):
        assert verdicts.peer(connection, state) is peer
    kept = (time.process_time() - started) / (rounds * 100)
    return full, kept


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=200)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        full, kept = asyncio.run(measure(Path(tmp) / "demo", args.rounds))
    print(f"full judgement of a pinned certificate: {full * 1000:.2f} ms CPU per request")
    print(f"verdict kept for the connection:        {kept * 1e6:.2f} us CPU per request")
    print(f"ratio: {full / kept:.0f} x")


if __name__ == "__main__":
    main()
