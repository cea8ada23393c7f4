"""Per-message CPU cost of the daemon's 4 KiB path, phase by phase, with an optional profile.

Run from the project root:

    .venv/bin/python bench/profile_small.py [--kind p256|rsa2048] [--messages 300]
    .venv/bin/python bench/profile_small.py --profile sealed|opened|receipt|parsed
    valgrind --tool=callgrind --trace-children=no \
        .venv/bin/python bench/profile_small.py --kind rsa2048 --only sealed --messages 50

Calls the functions the daemon calls, as the daemon does: ``build_message``
(outbound, a document up to 64 KiB is sealed in memory; ``--sealed-file``:
``build_message_file``, the path of a larger one), ``decrypt_file`` then
``verify_entity_file`` (inbound), ``build_receipt`` (inbound answer) and
``parse_receipt`` (outbound, the receipt).  ``--only PHASE`` runs each phase
once (to check the round trip and have its input), then only PHASE
``--messages`` times: under callgrind, the difference between two counts
divided by the difference of the counts is that phase's instructions per
message, without the set-up.  Not part of ``make test``.
"""

from __future__ import annotations

import argparse
import cProfile
import gc
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
    ap.add_argument("--only", choices=("sealed", "opened", "receipt", "parsed"))
    ap.add_argument(
        "--sealed-file",
        action="store_true",
        help="seal through build_message_file (documents over 64 KiB) instead of in memory",
    )
    args = ap.parse_args()

    from cms_bench import load, make_keys

    from gateway.as2.headers import new_message_id
    from gateway.as2.mdn import Disposition, build_receipt, parse_receipt
    from gateway.as2.message import MessageSpec, build_message, build_message_file
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
        document = os.urandom(args.size)
        payload.write_bytes(document)
        body, signed, entity = d / "body.as2", d / "signed", d / "entity"
        state: dict[str, object] = {}

        def sealed() -> None:
            spec = MessageSpec(
                filename="doc.bin",
                content_type="application/octet-stream",
                message_id=new_message_id("lab"),
                sender_as2_id="lab",
                receiver_as2_id="hospital",
                signing=signing,
                recipients=(k["recipient"],),
                digest="sha256",
                cipher="aes-256-gcm",
                policy=policy,
                at=datetime.now(UTC),
            )
            if args.sealed_file:
                state["mic"] = build_message_file(payload, body, spec).mic
                return
            # The daemon's way for a small document: sealed in memory, the body kept
            # (in the spool's row, here in memory; "opened" writes it as received).
            built = build_message(document, spec)
            state["body"] = built.body
            state["mic"] = built.mic

        def opened() -> None:
            if "body" in state:
                body.write_bytes(state["body"])  # type: ignore[arg-type]
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
        if args.only:
            fn = phases[args.only]
            # The objects of the set-up (modules, keys) out of the collector's way: a
            # full collection over them, at whichever message it falls, would weigh
            # more than the message (and differ between two counts under callgrind).
            gc.collect()
            gc.freeze()
            t = time.process_time()
            for _ in range(args.messages):
                fn()
            spent_ms = (time.process_time() - t) / args.messages * 1000
            print(f"{args.kind}, {args.size} B, {args.messages} x {args.only}: {spent_ms:.3f} ms")
            return 0
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
