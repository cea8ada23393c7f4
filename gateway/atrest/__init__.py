"""Encryption at rest of what the gateway keeps, and its crypto-shredding (DSP-1, OUT-1).

``chunked``: the file format (per-item AES-256-GCM, in 64 KiB chunks);
``keys``: the key-encryption keys in ``[at_rest] key_dir`` and the wrapping of
data keys; ``vault``: sealing and opening items, and the rotation after a purge.
"""

from __future__ import annotations

from gateway.atrest.keys import KeyStore
from gateway.atrest.vault import (
    Sealing,
    Vault,
    new_data_key,
    open_bytes,
    open_file,
    storing,
    storing_all,
)

__all__ = [
    "KeyStore",
    "Sealing",
    "Vault",
    "new_data_key",
    "open_bytes",
    "open_file",
    "storing",
    "storing_all",
]
