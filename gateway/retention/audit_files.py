"""Disposal of closed audit files older than ``[retention] audit_days`` (DSP-1).

Only closed files go (never the one being written), only the oldest ones (a
file from the middle would break the chain), and never one the export to the
hospital's monitoring has not read past.  Before a file is removed, one
``retention.audit_disposed`` record names each file going (its first and last
record, the last record's hash, the file's SHA-256) and where the trail now
starts, and a checkpoint seals it: ``medgw audit verify`` over the remaining
files checks the first remaining record against it and says where the trail
starts and why.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from gateway.audit import AuditEvent, AuditSink, EventType, Severity
from gateway.audit.files import backwards, closed_at, closed_files, first_seq
from gateway.audit.index import index_path


@dataclass(frozen=True)
class ClosedFile:
    path: Path
    closed_at: datetime
    first_seq: int
    last_seq: int
    last_hash: str
    sha256: str

    def view(self) -> dict[str, Any]:
        return {
            "file": self.path.name,
            "closed_at": self.closed_at.isoformat(),
            "first_seq": self.first_seq,
            "last_seq": self.last_seq,
            "last_hash": self.last_hash,
            "sha256": self.sha256,
        }


def _last_record(path: Path) -> dict[str, Any] | None:
    for line in backwards(path):
        if line.strip():
            try:
                record = json.loads(line)
            except ValueError:
                return None
            return record if isinstance(record, dict) else None
    return None


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


class AuditFiles:
    """The closed files of the audit trail at ``current`` and their disposal.

    ``checkpoint`` seals what was written (the audit log's); ``exported`` is the last
    record the export has sent (None: no export)."""

    def __init__(
        self,
        current: Path,
        checkpoint: Callable[[str], bool],
        exported: Callable[[], int | None] = lambda: None,
    ) -> None:
        self._current = current
        self._checkpoint = checkpoint
        self._exported = exported

    def closed_before(self, before: datetime) -> list[ClosedFile]:
        """The oldest closed files, each closed before ``before`` and exported, in order;
        stops at the first that is not (or cannot be read whole)."""
        exported = self._exported()
        found = []
        for path in closed_files(self._current):
            when = closed_at(self._current, path)
            first = first_seq(path)
            last = _last_record(path)
            if when is None or when >= before or first is None or last is None:
                break
            seq, digest = last.get("seq"), last.get("hash")
            if not isinstance(seq, int) or not isinstance(digest, str):
                break
            if exported is not None and seq > exported:
                break
            found.append(ClosedFile(path, when, first, seq, digest, _sha256(path)))
        return found

    def dispose(
        self, before: datetime, actor: str, audit: AuditSink, *, dry_run: bool = False
    ) -> int:
        """Remove the closed files :meth:`closed_before` finds, recorded and sealed first;
        returns how many (would) go."""
        going = self.closed_before(before)
        if dry_run or not going:
            return len(going)
        audit.emit(
            AuditEvent(
                EventType.RETENTION_AUDIT_DISPOSED,
                severity=Severity.WARNING,
                actor=actor,
                detail={
                    "before": before.isoformat(),
                    "files": [f.view() for f in going],
                    "trail_starts_at": going[-1].last_seq + 1,
                    "prev": going[-1].last_hash,
                },
            )
        )
        self._checkpoint("retention")  # signed (with [audit] signing) before anything goes
        for item in going:
            item.path.unlink(missing_ok=True)
            index_path(item.path).unlink(missing_ok=True)  # names patients: goes with it
        return len(going)
