"""Restoring a bundle onto a host: checked, then put where this host's configuration says.

The bundle is opened (decrypted with the backup recipient's key, signature and every
file's SHA-256 checked) before anything is written.  A state folder or audit trail
that is not empty is refused unless ``force``: a restore never mixes two histories
by accident.  The spool's file names are moved from the places of the host that
wrote the bundle to this host's; the configuration in the bundle is put beside the
state (``<state_dir>/restored-config/``) for the administrator to compare, never
over this host's.  No daemon may run meanwhile (the state folder's lock).
"""

from __future__ import annotations

import shutil
import sqlite3
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography import x509

from gateway.audit.files import trail_files
from gateway.backup.bundle import BackupError, open_bundle
from gateway.config import GatewayConfig
from gateway.fsutil import private_folder, shared_folder
from gateway.instance import LOCK_NAME, InstanceLock
from gateway.pki.keypair import PrivateKey

RESTORED_CONFIG = "restored-config"
_PATH_COLUMNS = {
    "outbound": ("source_path", "payload_path", "body_path", "receipt_path"),
    "inbound": ("target_path", "work_path"),
    "handover": ("path",),
}


@dataclass(frozen=True)
class Restored:
    manifest: dict[str, Any]
    files: int


def _occupied(config: GatewayConfig) -> list[str]:
    state = config.storage.state_dir
    found = []
    if state.exists():
        found += [str(p) for p in state.iterdir() if p.name != LOCK_NAME]
    found += [str(p) for p in trail_files(config.storage.audit_log) if p.stat().st_size]
    return found


def _moved(text: str | None, places: list[tuple[str, str]]) -> str | None:
    if not text:
        return text
    for old, new in places:
        if text == old or text.startswith(old.rstrip("/") + "/"):
            return new + text[len(old) :]
    return text


def _move_paths(spool: Path, places: list[tuple[str, str]]) -> None:
    db = sqlite3.connect(spool)
    try:
        for table, columns in _PATH_COLUMNS.items():
            present = {r[1] for r in db.execute(f"PRAGMA table_info({table})")}
            wanted = [c for c in columns if c in present]
            rows = db.execute(f"SELECT rowid, {', '.join(wanted)} FROM {table}").fetchall()  # noqa: S608
            for rowid, *values in rows:
                moved = [_moved(v, places) for v in values]
                if moved != values:
                    sets = ", ".join(f"{c}=?" for c in wanted)
                    db.execute(f"UPDATE {table} SET {sets} WHERE rowid=?", (*moved, rowid))  # noqa: S608
        db.commit()
    finally:
        db.close()


def _audit_name(name: str, old: str, new: str) -> str:
    """A trail file's name under this host's audit log name (closed files keep their stamp)."""
    old_path, new_path = Path(old), Path(new)
    if name == old:
        return new
    if name.startswith(old_path.stem + "-") and name.endswith(old_path.suffix):
        stamp = name[len(old_path.stem) : len(name) - len(old_path.suffix)]
        return f"{new_path.stem}{stamp}{new_path.suffix}"
    return name


def _destinations(
    config: GatewayConfig, manifest: dict[str, Any], work: Path
) -> list[tuple[Path, Path]]:
    """Where each file of the unpacked bundle in ``work`` goes on this host."""
    state = config.storage.state_dir
    moves = []
    for name in manifest["files"]:
        part, _, rest = name.partition("/")
        if part == "state":
            spool = rest == config.storage.spool_path.name
            dst = config.storage.spool_path if spool else state / rest
        elif part == "inbox":
            dst = config.storage.inbox_dir / rest
        elif part == "audit":
            audit = config.storage.audit_log
            dst = audit.parent / _audit_name(rest, manifest["audit_log"], audit.name)
        elif part == "config":
            dst = state / RESTORED_CONFIG / rest
        else:
            continue
        moves.append((work / name, dst))
    return moves


def restore(
    config: GatewayConfig,
    bundle: Path,
    *,
    cert: x509.Certificate,
    key: PrivateKey,
    force: bool = False,
    restored: Callable[[dict[str, Any]], None] = lambda _manifest: None,
) -> Restored:
    """Restore ``bundle`` into the places of ``config``; ``restored`` is called once it is
    in place, before the state folder's lock is released (to audit it)."""
    occupied = _occupied(config)
    if occupied and not force:
        shown = ", ".join(occupied[:3]) + (" ..." if len(occupied) > 3 else "")
        raise BackupError(
            f"the state folder or audit trail of {config.source} is not empty ({shown}): a "
            "restore would mix two histories",
            fix="restore onto a fresh host (empty [storage] state_dir and audit log), or add "
            "--force to replace what is there",
        )
    state = config.storage.state_dir
    shared_folder(state)
    lock = InstanceLock(state)
    lock.acquire()  # no daemon runs on this state folder meanwhile
    work = state / ".restore"
    shutil.rmtree(work, ignore_errors=True)
    private_folder(work)
    try:
        manifest = open_bundle(
            bundle, work, cert=cert, key=key, signers=[config.smime.signing.certificate]
        )
        places = [
            (manifest["state_dir"], str(state)),
            (manifest["inbox_dir"], str(config.storage.inbox_dir)),
        ]
        moves = _destinations(config, manifest, work)
        taken = [str(dst) for _src, dst in moves if dst.exists()]
        if taken and not force:
            raise BackupError(
                f"{len(taken)} files of the bundle are there already ({', '.join(taken[:3])}"
                + (" ..." if len(taken) > 3 else "")
                + "): a restore never replaces them by accident (a received document in the "
                "inbox is never written twice)",
                fix="move them away, or add --force to replace them",
            )
        for src, dst in moves:
            if src.name == config.storage.spool_path.name and dst == config.storage.spool_path:
                _move_paths(src, places)
                for suffix in ("-wal", "-shm"):
                    dst.with_name(dst.name + suffix).unlink(missing_ok=True)
            dst.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            shutil.move(src, dst)  # the inbox or audit folder may be on another file system
        restored(manifest)
    finally:
        shutil.rmtree(work, ignore_errors=True)
        lock.release()
    return Restored(manifest, len(manifest["files"]))
