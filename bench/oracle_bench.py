"""Is a bad CBC padding answered in the same time as a bad signature?

Run from the project root:  .venv/bin/python bench/oracle_bench.py [--rounds 300]

A peer that alters a captured AES-CBC message and sends it as its own learns,
from the answer, whether the padding came out valid (a padding oracle); the
answer is the same now (integrity-check-failed), so what is left to measure is
the time.  The receiving side's work for one message (decrypt into a file,
then verify the signed entity, as ``gateway.inbound`` does) is timed for:

* reference: the second-to-last ciphertext block altered so that the padding
  stays valid (the content is noise: the signature check fails);
* bad padding: the same block altered the same way, except that the padding is
  invalid.

Each round draws new noise for that block, the same for both (what the noise
is decides how far parsing gets: it must not be confused with the padding).

Rounds alternate between the two (and which goes first); the ratio of the mean
of their fastest tenths (the work itself; other processes on a shared machine
slow some rounds) should be 1.0 (target 0.9 to 1.1).  Sizes: a 4 KiB and a 1 MiB
document.  Not part of ``make test``.
"""

from __future__ import annotations

import argparse
import contextlib
import secrets
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

from asn1crypto import cms

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from gateway.as2.headers import new_message_id  # noqa: E402
from gateway.as2.message import MessageSpec, build_message  # noqa: E402
from gateway.cms.decrypting import decrypt_file  # noqa: E402
from gateway.cms.stream import verify_entity_span  # noqa: E402
from gateway.config import load_config  # noqa: E402
from gateway.demo_run import free_ports  # noqa: E402
from gateway.errors import ObjectSecurityError, PolicyError  # noqa: E402
from gateway.pki.demo import init_demo  # noqa: E402
from gateway.policy import AlgorithmPolicy  # noqa: E402

TARGET = (0.9, 1.1)


def _altered(body: bytes, delta: int, noise: bytes) -> bytes:
    """The second-to-last ciphertext block XORed with ``noise`` (15 bytes) then ``delta``:
    the last plaintext byte (the padding) changes by ``delta``, the block before it
    turns to noise that does not depend on ``delta``."""
    ci = cms.ContentInfo.load(body)
    info = ci["content"]["encrypted_content_info"]
    ct = bytearray(info["encrypted_content"].native)
    for i, byte in enumerate(noise):
        ct[-32 + i] ^= byte
    ct[-17] ^= delta
    info["encrypted_content"] = bytes(ct)
    return bytes(ci.dump(force=True))


def _fast(samples: list[float]) -> float:
    """The mean of the fastest tenth of ``samples``."""
    fastest = sorted(samples)[: max(1, len(samples) // 10)]
    return sum(fastest) / len(fastest)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=300)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        ports = free_ports(2)
        layout = init_demo(
            folder / "demo", now=datetime.now(UTC), hospital_port=ports[0], lab_port=ports[1]
        )
        lab = load_config(layout.lab.config_path)
        hospital = load_config(layout.hospital.config_path)
        pair = hospital.smime.encryption
        signers = hospital.require_peer("lab").signing_certificates
        policy = AlgorithmPolicy()
        print(f"{'document':>10}  {'reference':>12}  {'bad padding':>12}  ratio (fastest tenths)")
        for size in (4096, 1 << 20):
            spec = MessageSpec(
                filename="doc.bin",
                content_type="application/octet-stream",
                message_id=new_message_id("KITA-LAB"),
                sender_as2_id="KITA-LAB",
                receiver_as2_id="SAKURA-HOSPITAL",
                signing=lab.smime.signing,
                recipients=lab.require_peer("hospital").encryption_certificates,
                digest="sha256",
                cipher="aes-256-cbc",
                policy=policy,
                at=datetime.now(UTC),
            )
            body = build_message(b"x" * size, spec).body
            signed = folder / "signed"
            decrypt_file(body, signed, pair.certificate, pair.key, policy=policy)
            pad = len(cms.ContentInfo.load(body)["content"]["encrypted_content_info"][
                "encrypted_content"].native) - signed.stat().st_size  # fmt: skip
            signed.unlink()
            times: dict[str, list[float]] = {"reference": [], "bad": []}
            for round_ in range(args.rounds):
                # the same noise for both: what is left to differ is the padding alone
                noise = secrets.token_bytes(15)
                kinds = {
                    "reference": _altered(body, pad ^ 0x01, noise),
                    "bad": _altered(body, pad ^ 0x11, noise),
                }
                # alternate which goes first: the second of a round would otherwise pay
                # for the file system work the first one left (page cache, unlinks)
                for kind, message in sorted(kinds.items(), reverse=bool(round_ % 2)):
                    start = time.perf_counter()
                    opened = decrypt_file(
                        message, signed, pair.certificate, pair.key, policy=policy
                    )
                    with contextlib.suppress(ObjectSecurityError, PolicyError):
                        verify_entity_span(
                            signed, folder / "entity", trusted_signers=signers, policy=policy
                        )
                    times[kind].append(time.perf_counter() - start)
                    assert opened.intact is (kind == "reference")
                    signed.unlink()
                    (folder / "entity").unlink(missing_ok=True)
            # The fastest tenth of each: the work itself, without what other processes
            # on the (shared) machine add to some rounds and not to others.
            ref, bad = (_fast(times[k]) for k in ("reference", "bad"))
            ratio = bad / ref
            verdict = "ok" if TARGET[0] <= ratio <= TARGET[1] else "OUT OF TARGET"
            print(
                f"{size:>9}B  {ref * 1e3:>9.3f} ms  {bad * 1e3:>9.3f} ms  {ratio:.3f} "
                f"(target {TARGET[0]}-{TARGET[1]}) {verdict}"
            )


if __name__ == "__main__":
    main()
