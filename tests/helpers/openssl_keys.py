"""A key and a self-signed certificate made by ``openssl req -x509``, as the README's
commands make them (the backup recipient and signer) and as tests make keys of kinds
the gateway must refuse."""

from __future__ import annotations

import subprocess
from collections.abc import Sequence
from pathlib import Path

RSA_3072 = ("rsa:3072",)
P256 = ("ec", "-pkeyopt", "ec_paramgen_curve:P-256")


def self_signed(
    key: Path, cert: Path, subject: str, new_key: Sequence[str] = RSA_3072, days: int = 30
) -> tuple[Path, Path]:
    """A new key (``new_key``: the ``-newkey`` argument and its options) written to
    ``key`` (mode 0600, unencrypted) and its certificate for ``subject`` (``/CN=...``),
    valid ``days``, to ``cert``; returns both paths."""
    subprocess.run(
        [
            *("openssl", "req", "-x509", "-newkey", *new_key, "-nodes"),
            *("-keyout", str(key), "-out", str(cert), "-days", str(days), "-subj", subject),
        ],
        check=True,
        capture_output=True,
    )
    key.chmod(0o600)
    return key, cert
