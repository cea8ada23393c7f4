"""``openssl cms``, the reference implementation the CMS tests interoperate with: the
command, its key options for RSA-OAEP with SHA-256 and ECDH with SHA-256, and
messages it signs or encrypts for the test PKI (tests/helpers/cms_pki.py)."""

from __future__ import annotations

import subprocess
from pathlib import Path

from gateway.cms.mime import make_entity
from tests.helpers.cms_pki import Pki
from tests.helpers.openssl_keys import self_signed


def openssl(*args: str | Path, ok: bool = True) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(
        ["openssl", "cms", *(str(a) for a in args)], capture_output=True, text=True, timeout=60
    )
    if ok and proc.returncode != 0:
        raise AssertionError(f"openssl cms {' '.join(map(str, args))} failed:\n{proc.stderr}")
    return proc


RSA_OAEP_SHA256 = ["-keyopt", "rsa_padding_mode:oaep", "-keyopt", "rsa_oaep_md:sha256"]
ECDH_SHA256 = ["-keyopt", "ecdh_kdf_md:sha256"]
PAYLOAD = b"MSH|^~\\&|LAB|HOSP|||20250601||ORU^R01|1|P|2.5\rOBX|1|NM|K^Potassium||4.1|mmol/L\r"


def openssl_signed(
    pki: Pki, tmp_path: Path, signer: str, *extra: str, key: str | None = None
) -> bytes:
    src = tmp_path / "payload.bin"
    src.write_bytes(PAYLOAD)
    out = tmp_path / "signed.der"
    openssl(
        "-sign",
        "-binary",
        "-nodetach",
        "-in",
        src,
        "-signer",
        pki[signer].cert_path,
        "-inkey",
        pki[key or signer].key_path,
        "-outform",
        "DER",
        "-out",
        out,
        *extra,
    )
    return out.read_bytes()


def openssl_encrypted(pki: Pki, tmp_path: Path, recipient: str, *extra: str) -> bytes:
    src = tmp_path / "payload.bin"
    src.write_bytes(PAYLOAD)
    out = tmp_path / "env.der"
    openssl(
        "-encrypt",
        "-binary",
        "-in",
        src,
        "-outform",
        "DER",
        "-out",
        out,
        *extra,
        "-recip",
        pki[recipient].cert_path,
        *(RSA_OAEP_SHA256 if recipient.startswith("rsa") else ["-keyopt", "ecdh_kdf_md:sha256"]),
    )
    return out.read_bytes()


def unsupported_curve_signer(tmp_path: Path) -> tuple[Path, Path]:
    """A certificate and key on sect283k1: OpenSSL signs with it, `cryptography` cannot
    load its public key (UnsupportedAlgorithm)."""
    curve = ("ec", "-pkeyopt", "ec_paramgen_curve:sect283k1")
    key, cert = self_signed(tmp_path / "sect.key", tmp_path / "sect.crt", "/CN=odd curve", curve)
    return cert, key


def signed_by_openssl(tmp_path: Path, cert: Path, key: Path, payload: bytes) -> bytes:
    """A multipart/signed entity made by `openssl cms -sign` (carrying ``cert``)."""
    entity = tmp_path / "entity.mime"
    entity.write_bytes(make_entity("application/octet-stream", payload))
    done = subprocess.run(
        ["openssl", "cms", "-sign", "-binary", "-in", entity, "-signer", cert, "-inkey", key,
         "-md", "sha256", "-crlfeol"],
        check=True,
        capture_output=True,
    )  # fmt: skip
    return done.stdout
