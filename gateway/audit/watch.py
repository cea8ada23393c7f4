"""The daemon's own check of its audit trail, so that tampering raises an alert (EMG-4).

At start the daemon reads the newest two files of its trail, and after each
timed checkpoint what was written since, checking every record's chain link and
hash (as the export does: gateway.audit.export.cursor) and every checkpoint's
signature.  A record that fails is one ``audit.verification_failed`` alert,
naming the file and the record; the export carries it to the monitoring with
syslog severity alert.  ``medgw audit verify`` is the full check over the whole
trail; this one is incremental, so it costs the records written, not the trail.
"""

from __future__ import annotations

import json
from pathlib import Path

from gateway.audit.events import AuditEvent, EventType, Outcome, Severity
from gateway.audit.export.cursor import Broken, Position, read_forward
from gateway.audit.files import trail_files
from gateway.audit.log import AuditSink
from gateway.audit.seal import CHECKPOINT_EVENT, CheckpointKeys
from gateway.logs import Logger

BATCH = 4096  # records read at once
FILES_AT_START = 2  # the newest files read at start: across the last rotation


class TrailWatch:
    def __init__(
        self, path: Path, keys: CheckpointKeys | None, audit: AuditSink, log: Logger
    ) -> None:
        self._path = path
        self._keys = keys
        self._audit = audit
        self._log = log
        self._position = _start_of(trail_files(path)[-FILES_AT_START:])
        self._reported: set[str] = set()  # file:offset:seq of what was alerted on

    def check(self) -> int:
        """Read what was written since the last check; alert on each bad record. Returns
        how many records were read."""
        read = 0
        while True:
            reads = read_forward(self._path, self._position, BATCH, self._broken)
            for item in reads:
                record = item.record
                if self._keys and record.get("event") == CHECKPOINT_EVENT:
                    problem = self._keys.problem(record)
                    if problem is not None:
                        seq = record.get("seq")
                        self._alert(f"record {seq}: {problem}", seq, str(self._path), None)
            if reads:
                self._position = reads[-1].after
            read += len(reads)
            if len(reads) < BATCH:
                return read

    def _broken(self, broken: Broken) -> None:
        why = f"{broken.why} (byte {broken.offset})"
        self._alert(why, broken.seq, str(broken.path), broken.offset)

    def _alert(self, why: str, seq: object, file: str, offset: int | None) -> None:
        key = f"{file}:{offset}:{seq}"
        if key in self._reported:
            return
        self._reported.add(key)
        self._log.error("audit.verification_failed", seq=seq, file=file)
        self._audit.emit(
            AuditEvent(
                EventType.AUDIT_VERIFICATION_FAILED,
                Outcome.FAILURE,
                Severity.ALERT,
                reason=f"{file}: {why}: the audit trail was changed after it was written "
                "(run medgw audit verify to see the first bad record)",
                detail={"seq": seq, "file": file, "checked_by": "daemon"},
            )
        )


def _start_of(files: list[Path]) -> Position:
    """The cursor before the first record of ``files[0]`` (its link before is not checked)."""
    if not files:
        return Position()
    try:
        with files[0].open("rb") as handle:
            first = json.loads(handle.readline(1 << 20))
        seq = int(first["seq"])
        return Position(seq - 1, 0, str(first["prev"]), seq)
    except (OSError, ValueError, KeyError, TypeError):
        return Position()  # unreadable or torn: read from the oldest file the watch finds
