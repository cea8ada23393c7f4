"""Per-message CPU cost of the daemon's 4 KiB path, phase by phase, with an optional profile.

Run from the project root:

    .venv/bin/python bench/profile_small.py [--kind p256|rsa2048] [--messages 300]
    .venv/bin/python bench/profile_small.py --profile sealed|opened|receipt|parsed

Calls the functions the daemon calls, on files as the daemon does:
``build_message_file`` (outbound intake), ``decrypt_file`` then
``verify_entity_file`` (inbound), ``build_receipt`` (inbound answer) and
``parse_receipt`` (outbound, the receipt).  Not part of ``make test``.
"""

from __future__ import annotations

import argparse
import cProfile
import os
import pstats
import sys
import tempfile
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--kind", choices=("p256", "rsa2048"), default="p256")
    ap.add_argument("--messages", type=int, default=300)
    ap.add_argument("--size", type=int, default=4096)
    ap.add_argument("--profile", choices=("sealed", "opened", "receipt", "parsed"))
    ap.add_argument("--top", type=int, default=30)
    args = ap.parse_args()

    from cms_bench import load, make_keys

    from gateway.as2.headers import new_message_id
    from gateway.as2.mdn import Disposition, build_receipt, parse_receipt
    from gateway.as2.message import MessageSpec, build_message_file
    from gateway.cms.decrypting import decrypt_file
    from gateway.cms.stream import verify_entity_file
    from gateway.pki.keypair import KeyPair
    from gateway.policy import AlgorithmPolicy

    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        paths = make_keys(d, args.kind)
        k = load(paths)
        signing = KeyPair(paths["signer_crt"], paths["signer_key"], k["signer"], k["signer_key"])
        ours = KeyPair(
            paths["recipient_crt"], paths["recipient_key"], k["recipient"], k["recipient_key"]
        )
        policy = AlgorithmPolicy()
        payload = d / "payload.bin"
        payload.write_bytes(os.urandom(args.size))
        body, signed, entity = d / "body.as2", d / "signed", d / "entity"
        state: dict[str, object] = {}

        def sealed() -> None:
            mid = new_message_id("lab")
            built = build_message_file(
                payload,
                body,
                MessageSpec(
                    filename="doc.bin",
                    content_type="application/octet-stream",
                    message_id=mid,
                    sender_as2_id="lab",
                    receiver_as2_id="hospital",
                    signing=signing,
                    recipients=(k["recipient"],),
                    digest="sha256",
                    cipher="aes-256-gcm",
                    policy=policy,
                    at=datetime.now(UTC),
                ),
            )
            state["mic"] = built.mic

        def opened() -> None:
            decrypt_file(body, signed, ours.certificate, ours.key, policy=policy)
            _verified, _size, mic = verify_entity_file(
                signed, entity, trusted_signers=(k["signer"],), policy=policy, mic_digest="sha256"
            )
            state["verified_mic"] = mic

        def receipt() -> None:
            built = build_receipt(
                original_message_id="<x@lab>",
                our_as2_id="hospital",
                peer_as2_id="lab",
                disposition=Disposition.PROCESSED,
                mic=f"{state['verified_mic']}, sha-256",
                signing=ours,
                digest="sha256",
                policy=policy,
                at=datetime.now(UTC),
                details=None,
            )
            state["receipt"] = built

        def parsed() -> None:
            built = state["receipt"]
            ctype = dict(built.headers)["Content-Type"]  # type: ignore[attr-defined]
            r = parse_receipt(
                ctype,
                built.body,  # type: ignore[attr-defined]
                trusted_signers=(k["recipient"],),
                policy=policy,
            )
            assert r.processed

        phases: dict[str, Callable[[], None]] = {
            "sealed": sealed,
            "opened": opened,
            "receipt": receipt,
            "parsed": parsed,
        }
        for fn in phases.values():  # warm up, and check the round trip
            fn()
        if args.profile:
            prof = cProfile.Profile()
            for _ in range(args.messages):
                for name, fn in phases.items():
                    if name == args.profile:
                        prof.enable()
                        fn()
                        prof.disable()
                    else:
                        fn()
            stats = pstats.Stats(prof)
            stats.sort_stats("cumulative").print_stats(args.top)
            stats.sort_stats("tottime").print_stats(args.top)
            return 0
        spent = dict.fromkeys(phases, 0.0)
        for _ in range(args.messages):
            for name, fn in phases.items():
                t = time.process_time()
                fn()
                spent[name] += time.process_time() - t
        total = sum(spent.values())
        print(f"{args.kind}, {args.size} B, {args.messages} messages, CPU ms per message:")
        for name, s in spent.items():
            print(f"  {name:8} {s / args.messages * 1000:7.3f}")
        print(f"  {'total':8} {total / args.messages * 1000:7.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
