"""The daemon's own check of its audit trail, so that tampering raises an alert (EMG-4).

At start the daemon reads the newest two files of its trail, and after each
timed checkpoint what was written since the check before the last, checking
every record's chain link and hash (as the export does:
gateway.audit.export.cursor) and every checkpoint's signature.  A record that
fails is one ``audit.verification_failed`` alert, naming the file and the
record; the export carries it to the monitoring with syslog severity alert.
``medgw audit verify`` is the full check over the whole trail; this one is
incremental, so it costs the records written, not the trail.

The export reads the same records and checks them too; both report through one
:class:`BrokenRecords`, so a bad record is one alert, whoever finds it first.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

from gateway.audit.events import AuditEvent, EventType, Outcome, Severity
from gateway.audit.export.cursor import Broken, Position, read_forward
from gateway.audit.files import trail_files
from gateway.audit.log import AuditSink
from gateway.audit.seal import CHECKPOINT_EVENT, CheckpointKeys
from gateway.logs import Logger

BATCH = 4096  # records read at once
FILES_AT_START = 2  # the newest files read at start: across the last rotation


class BrokenRecords:
    """Alerts on bad records of the trail, once each, whoever finds them."""

    def __init__(self, audit: AuditSink, log: Logger) -> None:
        self._audit = audit
        self._log = log
        self._reported: set[str] = set()  # where each record alerted on is

    def reporter(self, checked_by: str) -> Callable[[Broken], None]:
        """What a reader calls with each record whose chain link does not hold."""

        def report(broken: Broken) -> None:
            why = f"{broken.why} (byte {broken.offset})"
            self.alert(why, broken.seq, broken.path, f"{broken.offset}", checked_by)

        return report

    def alert(self, why: str, seq: object, file: Path, where: str, checked_by: str) -> None:
        key = f"{file}:{where}"
        if key in self._reported:
            return
        self._reported.add(key)
        self._log.error("audit.verification_failed", seq=seq, file=str(file))
        self._audit.emit(
            AuditEvent(
                EventType.AUDIT_VERIFICATION_FAILED,
                Outcome.FAILURE,
                Severity.ALERT,
                reason=f"{file}: {why}: the audit trail was changed after it was written "
                "(run medgw audit verify to see the first bad record)",
                detail={"seq": seq, "file": str(file), "checked_by": checked_by},
            )
        )


class TrailWatch:
    def __init__(
        self,
        path: Path,
        keys: CheckpointKeys | None,
        broken: BrokenRecords,
        durable: Callable[[], int] | None = None,
    ) -> None:
        """``durable``: the seq of the writer's last durable record (as the export's)."""
        self._path = path
        self._durable = durable
        self._keys = keys
        self._records = broken
        self._broken = broken.reporter("daemon")
        self._position = _start_of(trail_files(path)[-FILES_AT_START:])
        self._previous = self._position  # where the last check began

    def check(self) -> int:
        """Read what was written since the check before the last one (each record is read
        twice: an edit made soon after a check is found by the next); alert on each bad
        record, once.  Returns how many records were read."""
        read = 0
        position, self._previous = self._previous, self._position
        while True:
            through = self._durable() if self._durable is not None else None
            reads = read_forward(self._path, position, BATCH, self._broken, through)
            for item in reads:
                record = item.record
                if self._keys and record.get("event") == CHECKPOINT_EVENT:
                    problem = self._keys.problem(record)
                    if problem is not None:
                        seq = record.get("seq")
                        why = f"record {seq}: {problem}"
                        self._records.alert(why, seq, self._path, f"seq {seq}", "daemon")
            if reads:
                position = self._position = reads[-1].after
            read += len(reads)
            if len(reads) < BATCH:
                return read


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
