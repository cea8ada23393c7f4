"""pyas2lib's in-process AS2 round trip: the reference rate ``e2e_bench.py`` compares with.

One round trip, all in one process, no network and no disk: the lab builds a
signed and encrypted message asking for a signed synchronous MDN, the
hospital parses it (decrypts, verifies the signature and the certificate
chain) and builds the signed MDN, the lab parses the MDN (verifies it and
its MIC).  AES-256-CBC, SHA-256, RSASSA-PKCS1-v1_5, RSAES-OAEP: the closest
pyas2lib comes to what medgw does.  pyas2lib signs and encrypts with RSA
keys only (no ECDSA, no ECDH), so the reference is RSA-2048 for both of our
key types.

pyas2lib is not a dependency of medgw's bench run: it is installed, at the
versions pinned in ``bench/pyas2lib-requirements.txt``, into an environment of
the bench's own (``bench/.venv``), created on first use and rebuilt when the
pins change.  That environment also holds py-spy, for profiling the daemons.

Imported by ``e2e_bench.py`` (``rate``); run inside the bench environment as a
script it measures and prints one JSON object.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
REQUIREMENTS = BENCH / "pyas2lib-requirements.txt"
ENV = BENCH / ".venv"
LAB_AS2 = "BENCH-LAB"
HOSPITAL_AS2 = "BENCH-HOSPITAL"


def environment() -> Path:
    """The bench environment's interpreter, created or rebuilt to the pinned versions."""
    python = ENV / "bin" / "python"
    stamp = ENV / "requirements.sha256"
    wanted = hashlib.sha256(REQUIREMENTS.read_bytes()).hexdigest()
    if python.exists() and stamp.exists() and stamp.read_text() == wanted:
        return python
    base = getattr(sys, "_base_executable", sys.executable)
    subprocess.run([base, "-m", "venv", "--clear", str(ENV)], check=True)
    subprocess.run(
        [str(python), "-m", "pip", "install", "--quiet", "-r", str(REQUIREMENTS)], check=True
    )
    stamp.write_text(wanted)
    return python


def rate(lab_certs: Path, hospital_certs: Path, ca: Path, size: int, seconds: float) -> float:
    """Round trips per second of pyas2lib on one core, RSA keys of the demo PKI given."""
    out = subprocess.run(
        [
            str(environment()),
            str(Path(__file__).resolve()),
            *(str(lab_certs), str(hospital_certs), str(ca), str(size), str(seconds)),
        ],
        stdout=subprocess.PIPE,
        text=True,
        check=True,
    ).stdout
    return float(json.loads(out)["rate"])


def _load_pyas2lib() -> Any:
    """pyas2lib, with the tests' fix for oscrypto's reading of OpenSSL's version."""
    path = BENCH.parent / "tests" / "oscrypto_fix.py"
    spec = importlib.util.spec_from_file_location("oscrypto_fix", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.load_pyas2lib()


def _measure(lab: Path, hospital: Path, ca: Path, size: int, seconds: float) -> dict[str, float]:
    as2 = _load_pyas2lib()

    def pem(*paths: Path) -> bytes:
        return b"".join(p.read_bytes() for p in paths)

    def org(certs: Path, name: str) -> Any:
        return as2.Organization(
            as2_name=name,
            sign_key=pem(certs / "sign.key", certs / "sign.crt"),
            decrypt_key=pem(certs / "encrypt.key", certs / "encrypt.crt"),
        )

    lab_org, hospital_org = org(lab, LAB_AS2), org(hospital, HOSPITAL_AS2)
    hospital_as_partner = as2.Partner(
        as2_name=HOSPITAL_AS2,
        verify_cert=pem(hospital / "sign.crt"),
        verify_cert_ca=pem(ca),
        encrypt_cert=pem(hospital / "encrypt.crt"),
        encrypt_cert_ca=pem(ca),
        encrypt=True,
        enc_alg="aes_256_cbc",
        key_enc_alg="rsaes_oaep",
        sign=True,
        digest_alg="sha256",
        mdn_mode="SYNC",
        mdn_digest_alg="sha256",
    )
    lab_as_partner = as2.Partner(
        as2_name=LAB_AS2, verify_cert=pem(lab / "sign.crt"), verify_cert_ca=pem(ca), sign=True
    )
    payload = bytes(range(256)) * (size // 256) + b"x" * (size % 256)

    def round_trip() -> None:
        sent = as2.Message(lab_org, hospital_as_partner)
        sent.build(payload, filename="doc.bin", content_type="application/octet-stream")
        received = as2.Message()
        status, (error, _trace), mdn = received.parse(
            sent.headers_str + b"\r\n" + sent.content,
            find_org_cb=lambda name: hospital_org if name == HOSPITAL_AS2 else None,
            find_partner_cb=lambda name: lab_as_partner if name == LAB_AS2 else None,
        )
        if status != "processed" or received.content != payload:
            raise SystemExit(f"pyas2lib did not accept its own message: {status} {error}")
        status, detail = as2.Mdn().parse(
            mdn.headers_str + b"\r\n" + mdn.content, find_message_cb=lambda _id, _to: sent
        )
        if status != "processed":
            raise SystemExit(f"pyas2lib did not accept its own MDN: {status} {detail}")

    round_trip()  # warm up: imports, certificate loading
    count, start = 0, time.process_time()
    while (elapsed := time.process_time() - start) < seconds:
        round_trip()
        count += 1
    return {"rate": count / elapsed, "round_trips": count}


if __name__ == "__main__":
    lab_dir, hospital_dir, ca_file, size_text, seconds_text = sys.argv[1:]
    result = _measure(
        Path(lab_dir), Path(hospital_dir), Path(ca_file), int(size_text), float(seconds_text)
    )
    print(json.dumps(result))
