"""CMS / S/MIME throughput and memory, beside openssl on the same inputs.

Run from the project root:  .venv/bin/python bench/cms_bench.py [--sizes 1M,64M,1G]

1. 4 KiB messages, sign+encrypt and decrypt+verify, messages/s on one core,
   as a ratio of ``openssl speed``'s private-key operation rate for the same
   key (each message needs exactly one private-key operation).
2. Large payloads: sign+encrypt of a MIME entity file into the AS2 body
   (``sign_and_envelope_file``), MB/s as a ratio of ``openssl cms -sign``
   followed by ``openssl cms -encrypt`` (both ``-stream``) on the same file,
   and peak RSS of a child process doing only that.  decrypt+verify
   (``open_and_verify_file``) is measured too.

Not part of ``make test``.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

TARGET_SMALL = 0.8
TARGET_LARGE = 0.7
TARGET_RSS_MIB = 100


def _run(*cmd: str | Path) -> None:
    subprocess.run([str(c) for c in cmd], check=True, capture_output=True)


def make_keys(d: Path, kind: str) -> dict[str, Path]:
    """A CA, a signer and a recipient, made by openssl."""
    keyopt = ["-algorithm", "RSA", "-pkeyopt", "rsa_keygen_bits:2048"]
    if kind == "p256":
        keyopt = ["-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256"]
    out: dict[str, Path] = {}
    _run("openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256",
         "-nodes", "-keyout", d / "ca.key", "-out", d / "ca.crt", "-subj", "/CN=bench CA",
         "-days", "30")  # fmt: skip
    for name in ("signer", "recipient"):
        key, csr, crt = d / f"{name}.key", d / f"{name}.csr", d / f"{name}.crt"
        _run("openssl", "genpkey", *keyopt, "-out", key)
        _run("openssl", "req", "-new", "-key", key, "-subj", f"/CN=bench {name}", "-out", csr)
        _run("openssl", "x509", "-req", "-in", csr, "-CA", d / "ca.crt", "-CAkey", d / "ca.key",
             "-days", "30", "-out", crt)  # fmt: skip
        out[f"{name}_key"], out[f"{name}_crt"] = key, crt
    out["ca"] = d / "ca.crt"
    return out


def key_paths(d: Path) -> dict[str, Path]:
    return {
        f"{name}_{kind}": d / f"{name}.{'key' if kind == 'key' else 'crt'}"
        for name in ("signer", "recipient")
        for kind in ("key", "crt")
    }


def load(keys: dict[str, Path]) -> dict[str, Any]:
    from cryptography import x509
    from cryptography.hazmat.primitives.serialization import load_pem_private_key

    return {
        name: x509.load_pem_x509_certificate(keys[f"{name}_crt"].read_bytes())
        for name in ("signer", "recipient")
    } | {
        f"{name}_key": load_pem_private_key(keys[f"{name}_key"].read_bytes(), None)
        for name in ("signer", "recipient")
    }


def openssl_speed(kind: str, seconds: int) -> float:
    alg = ["rsa2048"] if kind == "rsa2048" else ["ecdsap256"]
    text = subprocess.run(
        ["openssl", "speed", "-seconds", str(seconds), *alg],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    if kind == "rsa2048":
        m = re.search(r"^rsa 2048 bits\s+\S+\s+\S+\s+([\d.]+)", text, re.M)
    else:
        m = re.search(r"256 bits ecdsa \(nistp256\)\s+\S+\s+\S+\s+([\d.]+)", text, re.M)
    if m is None:
        raise SystemExit(f"cannot parse openssl speed output:\n{text}")
    return float(m.group(1))


def small_messages(kind: str, keys: dict[str, Path], seconds: float) -> dict[str, float]:
    from gateway.cms.mime import make_entity
    from gateway.cms.smime import envelope_entity, open_envelope, sign_entity, verify_entity
    from gateway.policy import AlgorithmPolicy

    k = load(keys)
    policy = AlgorithmPolicy()
    entity = make_entity("application/hl7-v2", os.urandom(4096))
    now = datetime.now(UTC)

    def seal() -> bytes:
        signed = sign_entity(entity, k["signer"], k["signer_key"], signing_time=now, policy=policy)
        return envelope_entity(signed, [k["recipient"]], policy=policy)[1]

    def open_(body: bytes) -> None:
        opened = open_envelope(body, k["recipient"], k["recipient_key"], policy=policy)
        inner, _ = verify_entity(opened.content, trusted_signers=[k["signer"]], policy=policy)
        assert inner == entity

    body = seal()
    open_(body)
    rates = {}
    for name, fn in (("sign+encrypt", seal), ("decrypt+verify", lambda: open_(body))):
        n = 0
        start = time.perf_counter()
        while (elapsed := time.perf_counter() - start) < seconds:
            for _ in range(20):
                fn()
            n += 20
        rates[name] = n / elapsed
    return rates


def write_entity(path: Path, size: int) -> None:
    block = os.urandom(1 << 20)
    with path.open("wb") as f:
        f.write(b"Content-Type: application/dicom\r\nContent-Transfer-Encoding: binary\r\n\r\n")
        left = size
        while left > 0:
            f.write(block[: min(left, len(block))])
            left -= len(block)


def child(args: list[str]) -> None:
    """Run one operation in this (fresh) process and print seconds and peak RSS as JSON."""
    op, keydir, src, dst = args[0], Path(args[1]), Path(args[2]), Path(args[3])
    keys = key_paths(keydir)
    from gateway.cms.stream import open_and_verify_file, sign_and_envelope_file
    from gateway.policy import AlgorithmPolicy

    k = load(keys)
    policy = AlgorithmPolicy()
    start = time.perf_counter()
    if op == "seal":
        sign_and_envelope_file(
            src,
            dst,
            signer_cert=k["signer"],
            signer_key=k["signer_key"],
            recipients=[k["recipient"]],
            signing_time=datetime.now(UTC),
            policy=policy,
        )
    else:
        open_and_verify_file(
            src,
            dst,
            cert=k["recipient"],
            key=k["recipient_key"],
            trusted_signers=[k["signer"]],
            policy=policy,
        )
    seconds = time.perf_counter() - start
    rss_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"seconds": seconds, "rss_mib": rss_kib / 1024}))


def run_child(*args: str | Path) -> dict[str, float]:
    out = subprocess.run(
        [sys.executable, __file__, "--child", *(str(a) for a in args)],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    result: dict[str, float] = json.loads(out)
    return result


def openssl_seal(keys: dict[str, Path], src: Path, d: Path) -> dict[str, float]:
    """openssl cms sign then encrypt, timed; peak RSS of the larger of the two."""
    script = (
        "import resource, subprocess, sys, time, json\n"
        "t = time.perf_counter()\n"
        "subprocess.run(json.loads(sys.argv[1]), check=True)\n"
        "subprocess.run(json.loads(sys.argv[2]), check=True)\n"
        "s = time.perf_counter() - t\n"
        "r = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss\n"
        "print(json.dumps({'seconds': s, 'rss_mib': r / 1024}))\n"
    )
    signed, body = d / "ossl.signed", d / "ossl.p7m"
    sign = ["openssl", "cms", "-sign", "-binary", "-stream", "-in", str(src)]
    sign += ["-signer", str(keys["signer_crt"]), "-inkey", str(keys["signer_key"])]
    sign += ["-out", str(signed)]
    enc = ["openssl", "cms", "-encrypt", "-binary", "-stream", "-aes-256-gcm", "-in", str(signed)]
    enc += ["-recip", str(keys["recipient_crt"]), "-keyopt", "rsa_padding_mode:oaep"]
    enc += ["-keyopt", "rsa_oaep_md:sha256", "-outform", "DER", "-out", str(body)]
    out = subprocess.run(
        [sys.executable, "-c", script, json.dumps(sign), json.dumps(enc)],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    signed.unlink()
    body.unlink()
    result: dict[str, float] = json.loads(out)
    return result


def parse_size(text: str) -> int:
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    text = text.strip().upper()
    return int(text[:-1]) * units[text[-1]] if text[-1] in units else int(text)


def main() -> int:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        child(sys.argv[2:])
        return 0
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", default="1M,64M,1G", help="large payload sizes (default 1M,64M,1G)")
    ap.add_argument("--seconds", type=float, default=3.0, help="duration of each small-message run")
    ap.add_argument("--dir", type=Path, help="scratch folder (default: a temporary one)")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        d = Path(tmp)
        version = subprocess.run(["openssl", "version"], capture_output=True, text=True).stdout
        print(f"openssl: {version.strip()}")
        print(f"python:  {sys.version.split()[0]}, cpus: {os.cpu_count()}")
        print()
        print("4 KiB messages, one core (ratio = our msgs/s / openssl private-key ops/s)")
        for kind in ("rsa2048", "p256"):
            kd = d / kind
            kd.mkdir()
            keys = make_keys(kd, kind)
            speed = openssl_speed(kind, max(1, int(args.seconds)))
            rates = small_messages(kind, keys, args.seconds)
            for name, rate in rates.items():
                ratio = rate / speed
                mark = "ok" if ratio >= TARGET_SMALL else "BELOW TARGET"
                print(
                    f"  {kind:8} {name:15} {rate:8.0f} msg/s   openssl sign {speed:8.0f}/s   "
                    f"ratio {ratio:4.2f} (target >= {TARGET_SMALL}) {mark}"
                )
        print()
        print("Large payloads, RSA-2048 signer and recipient, AES-256-GCM, SHA-256")
        keys = key_paths(d / "rsa2048")
        for size in [parse_size(s) for s in args.sizes.split(",")]:
            src, body, out = d / "entity", d / "body.p7m", d / "out"
            write_entity(src, size)
            mb = src.stat().st_size / 1e6
            ours = run_child("seal", d / "rsa2048", src, body)
            theirs = openssl_seal(keys, src, d)
            opened = run_child("open", d / "rsa2048", body, out)
            assert out.stat().st_size == src.stat().st_size
            ratio = theirs["seconds"] / ours["seconds"]
            label = f"{size >> 20} MiB" if size < 1 << 30 else f"{size >> 30} GiB"
            mark = "ok" if ratio >= TARGET_LARGE else "BELOW TARGET"
            print(
                f"  {label:>7} sign+encrypt   ours {mb / ours['seconds']:7.0f} MB/s  "
                f"openssl {mb / theirs['seconds']:7.0f} MB/s  ratio {ratio:4.2f} "
                f"(target >= {TARGET_LARGE}) {mark}"
            )
            rss_mark = "ok" if ours["rss_mib"] < TARGET_RSS_MIB else "ABOVE TARGET"
            print(
                f"  {'':>7} peak RSS       ours {ours['rss_mib']:7.1f} MiB   "
                f"openssl {theirs['rss_mib']:7.1f} MiB  (target < {TARGET_RSS_MIB} MiB) {rss_mark}"
            )
            print(
                f"  {'':>7} decrypt+verify ours {mb / opened['seconds']:7.0f} MB/s  "
                f"peak RSS {opened['rss_mib']:.1f} MiB"
            )
            for p in (src, body, out):
                p.unlink()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
