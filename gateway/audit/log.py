"""Append-only audit log: JSON lines, each chained to the previous by SHA-256.

Each record carries ``seq`` (1, 2, ...), ``prev`` (the hash of the previous
record's line, or 64 zeros) and ``hash`` (SHA-256 over the record without the
``hash`` field, canonical JSON).  Removing, reordering or editing a line breaks
the chain, which :func:`verify_chain` reports with the line number.  Every
record is flushed and fsync'ed before :meth:`AuditLog.emit` returns: an event
that was acted upon is on disk.  A record that could not be written whole (a
full disk) is cut off again before ``emit`` raises, so it never merges with the
next one.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import threading
from pathlib import Path
from typing import Any, Protocol

from gateway.audit.events import AuditEvent
from gateway.clock import Clock
from gateway.errors import MedgwError

GENESIS = "0" * 64


class AuditSink(Protocol):
    def emit(self, event: AuditEvent) -> None: ...


def _canonical(record: dict[str, Any]) -> bytes:
    return json.dumps(record, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


class AuditLog:
    def __init__(self, path: Path, clock: Clock, *, node: str) -> None:
        self._path = path
        self._clock = clock
        self._node = node
        self._lock = threading.Lock()
        path.parent.mkdir(parents=True, exist_ok=True)
        self._seq, self._prev = self._tail(path)
        flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC
        self._fd = os.open(path, flags, 0o640)
        self._torn: int | None = None  # size to cut the file back to before the next record
        if path.stat().st_size and not _ends_with_newline(path):
            os.write(self._fd, b"\n")  # end a record torn by a crash; the chain shows it

    @staticmethod
    def _tail(path: Path) -> tuple[int, str]:
        """Sequence number and hash of the last complete record, to continue the chain."""
        if not path.exists() or path.stat().st_size == 0:
            return 0, GENESIS
        with path.open("rb") as handle:
            handle.seek(max(0, path.stat().st_size - 65536))
            lines = [line for line in handle.read().split(b"\n") if line.strip()]
        for line in reversed(lines):
            try:
                record = json.loads(line)
                return int(record["seq"]), str(record["hash"])
            except (ValueError, KeyError, TypeError):
                continue  # a torn last line after a crash: chain on from the last good one
        return 0, GENESIS

    def emit(self, event: AuditEvent) -> None:
        with self._lock:
            record = event.to_record(self._clock.now())
            record["node"] = self._node
            record["seq"] = self._seq + 1
            record["prev"] = self._prev
            digest = hashlib.sha256(_canonical(record)).hexdigest()
            record["hash"] = digest
            self._append(_canonical(record) + b"\n")
            self._seq += 1
            self._prev = digest

    def _append(self, line: bytes) -> None:
        """Write all of ``line`` and fsync it, or leave the file as it was and raise.

        A full disk (ENOSPC) or an I/O error can cut a record short; its bytes are
        cut off again so that the next record starts on a line of its own and the
        chain goes on (seq and prev are not advanced for a record not written).
        """
        if self._torn is not None:
            os.ftruncate(self._fd, self._torn)  # an earlier cut-off did not succeed
            self._torn = None
        size = os.fstat(self._fd).st_size
        try:
            view = memoryview(line)
            while view:
                written = os.write(self._fd, view)
                if written <= 0:
                    raise OSError(errno.EIO, f"wrote nothing of an audit record to {self._path}")
                view = view[written:]
            os.fsync(self._fd)
        except OSError:
            try:
                os.ftruncate(self._fd, size)
            except OSError:
                self._torn = size  # try again before the next record
            raise

    def close(self) -> None:
        with self._lock:
            if self._fd >= 0:
                os.close(self._fd)
                self._fd = -1


def _ends_with_newline(path: Path) -> bool:
    with path.open("rb") as handle:
        handle.seek(-1, os.SEEK_END)
        return handle.read(1) == b"\n"


class AuditChainError(MedgwError):
    """The audit log's hash chain is broken."""


def verify_chain(path: Path) -> int:
    """Check the whole chain; return the number of records or raise AuditChainError."""
    prev = GENESIS
    count = 0
    with path.open("rb") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
                if not isinstance(record, dict):
                    raise ValueError(f"a JSON {type(record).__name__}, not an object")
                claimed = record.pop("hash")
            except (ValueError, KeyError) as exc:
                raise AuditChainError(
                    f"{path}:{number}: not an audit record ({exc})",
                    fix="restore the audit log from backup; investigate who edited it",
                ) from exc
            if record.get("prev") != prev or record.get("seq") != count + 1:
                raise AuditChainError(
                    f"{path}:{number}: chain broken (a record before it was removed or reordered)",
                    fix="restore the audit log from backup; investigate who edited it",
                )
            if hashlib.sha256(_canonical(record)).hexdigest() != claimed:
                raise AuditChainError(
                    f"{path}:{number}: record was altered after it was written",
                    fix="restore the audit log from backup; investigate who edited it",
                )
            prev = claimed
            count += 1
    return count
