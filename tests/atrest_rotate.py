"""``python -m tests.atrest_rotate SPOOL KEY_DIR``: open the vault and rotate its key, as a
purge does (the crash tests of gateway.atrest kill it at one step: tests/faultpoint.py)."""

from __future__ import annotations

import sys
from pathlib import Path

from gateway.atrest import KeyStore, Vault
from gateway.clock import SystemClock
from gateway.spool import SqliteSpool


def main(spool_path: str, key_dir: str) -> None:
    spool = SqliteSpool(Path(spool_path), SystemClock())
    vault = Vault(KeyStore(Path(key_dir)), spool)
    vault.open()
    print(vault.rotate().version, flush=True)
    spool.close()


if __name__ == "__main__":
    main(*sys.argv[1:3])
