"""Inbox folder delivery: ``inbox/<peer>/[<service>/]<file name>``, written atomically.

Internal systems watching the inbox see a document only once it is complete
and on disk (hidden temporary file, fsync, rename, fsync of the folder).  A
name sent by a peer is reduced to a safe base name: a peer can never choose
where in the file system a document lands.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Callable, Iterable
from pathlib import Path

from gateway.errors import DeliveryError, StorageFullError
from gateway.fsutil import NO_SPACE, storage_fix, write_atomic

_UNSAFE = re.compile(r"[^A-Za-z0-9._+-]")
MAX_NAME = 200


def safe_name(filename: str | None, message_id: str) -> str:
    """A file name that is safe to create in the inbox, derived from the sender's name."""
    base = (filename or "").replace("\\", "/").rsplit("/", 1)[-1]
    base = _UNSAFE.sub("_", base).lstrip(".-")[:MAX_NAME]
    if not base:
        base = "document-" + hashlib.sha256(message_id.encode()).hexdigest()[:16]
    return base


def choose_target(
    inbox_dir: Path,
    peer: str,
    filename: str | None,
    message_id: str,
    claimed: Callable[[Path], bool] = lambda _path: False,
    service: str | None = None,
) -> Path:
    """Where a new document goes: never an existing file, nor one another delivery claimed.

    ``service`` must be one configured for the peer (a checked folder name).
    On a clash the name gets a suffix derived from the Message-ID.
    """
    folder = inbox_dir / peer if service is None else inbox_dir / peer / service
    name = safe_name(filename, message_id)
    target = folder / name
    if target.exists() or claimed(target):
        stem, dot, ext = name.partition(".")
        tag = hashlib.sha256(message_id.encode()).hexdigest()[:12]
        target = folder / f"{stem}-{tag}{dot}{ext}"
    return target


def deliver(target: Path, payload: Iterable[bytes]) -> None:
    """Write the document (bytes, or chunks of it) to ``target`` atomically."""
    chunks = [payload] if isinstance(payload, bytes) else payload
    try:
        write_atomic(target, chunks, overwrite=True)
    except OSError as exc:
        full = exc.errno in NO_SPACE
        raise (StorageFullError if full else DeliveryError)(
            f"cannot write the received document to {target}: {exc.strerror or exc}",
            fix=storage_fix(exc, target.parent),
        ) from exc
