"""Checking an audit trail: the hash chain, the checkpoints' signatures, their continuity.

The trail is one file or several in order (rotation: each file goes on from the
last hash of the one before).  What is reported names the first bad record by
file, line and sequence number:

- an edited record: its hash no longer matches;
- a removed, inserted or reordered record: the chain breaks at the record after;
- a chain rewritten without the audit key (records changed and every hash computed
  again): the first checkpoint after the change no longer verifies;
- a trail cut short: found against the last checkpoint seen outside the box
  (``last_checkpoint``); records after the last checkpoint are "not yet sealed".

Records stamped more than CLOCK_MARGIN before the latest record before them (the clock
was set back) are counted and the first few named: not a fault of the chain, but what
an admin must know of the trail's times (gateway.audit.order).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from gateway.audit.chain import GENESIS, canonical
from gateway.audit.order import CLOCK_MARGIN, order_path, read_notes
from gateway.audit.seal import CHECKPOINT_EVENT, CheckpointKeys
from gateway.errors import InvalidValueError, MedgwError

# Closed files disposed of by retention (gateway.retention.audit_files): where the trail starts.
AUDIT_DISPOSED_EVENT = "retention.audit_disposed"
FIX = "restore the audit log from backup; investigate who edited it"
STEPS_NAMED = 5  # steps back named in a report (all are counted)


class AuditChainError(MedgwError):
    """The audit log's hash chain is broken, a checkpoint fails, or the trail was cut short."""


@dataclass(frozen=True)
class Checkpoint:
    seq: int
    hash: str
    where: str  # file:line


@dataclass(frozen=True)
class StepBack:
    """A record stamped more than CLOCK_MARGIN before the latest record before it."""

    seq: int
    where: str  # file:line
    time: str
    latest: str  # the latest time before it


@dataclass(frozen=True)
class TrailReport:
    records: int
    first_seq: int  # 0 for an empty trail
    last_seq: int
    checkpoints: int
    last_checkpoint: Checkpoint | None
    signatures_checked: bool
    # The record that says the files before first_seq were disposed of (retention)
    # and names first_seq's predecessor; None: no such record.
    disposal_record: int | None = None
    # Bytes of an unfinished last line of the newest file, not ended by its newline: a
    # record being written as the trail was read, or one a kill left (the next start
    # cuts it off and records audit.record_cut_short).  Not a record: not checked.
    unfinished: int = 0
    steps_back: int = 0  # records stamped before the latest one by more than CLOCK_MARGIN
    first_steps_back: tuple[StepBack, ...] = ()  # the first STEPS_NAMED of them

    @property
    def unsealed(self) -> int:
        """Records after the last checkpoint: no signature covers them yet."""
        sealed = self.last_checkpoint.seq if self.last_checkpoint else self.first_seq - 1
        return max(0, self.last_seq - sealed) if self.records else 0


def files_removed(current: Path, report: TrailReport) -> None:
    """Raise AuditChainError if the trail whose current file is ``current`` (verified:
    ``report``) starts after a file this medgw wrote, by its notes beside it
    (gateway.audit.order), and no record says retention disposed of it: a closed file
    was removed outside medgw.  Without the notes nothing is known (files begun before
    they were kept, a trail restored without them) and nothing is said."""
    if report.first_seq <= 1 or report.disposal_record is not None:
        return
    begun = sorted(seq for seq, _ in read_notes(current).firsts if seq < report.first_seq)
    if not begun:
        return
    raise AuditChainError(
        f"{current}: the trail starts at record {report.first_seq}, but its notes "
        f"({order_path(current)}) say this gateway wrote a file beginning at record "
        f"{begun[-1]}, and no retention.audit_disposed record says the files before "
        f"record {report.first_seq} were disposed of: a closed audit file was removed "
        "outside medgw",
        fix="put the missing file back from a backup (medgw backup bundles hold the trail) "
        "or ask the audit export's collector for its records, and find out who removed it",
    )


def parse_checkpoint(text: str) -> tuple[int, str]:
    """``SEQ:HASH`` as given on the command line."""
    seq, _, digest = text.partition(":")
    if not seq.isdigit() or len(digest) != 64 or any(c not in "0123456789abcdef" for c in digest):
        raise InvalidValueError(
            f"{text!r} is not SEQ:HASH (a record number and its 64-hex hash)",
            fix="copy it from the checkpoint record's seq and hash",
        )
    return int(seq), digest


def verify_trail(
    paths: Sequence[Path],
    keys: CheckpointKeys | None = None,
    last_checkpoint: tuple[int, str] | None = None,
    live: Path | None = None,
) -> TrailReport:
    """Check the files of one trail, oldest first; raise AuditChainError at the first fault.

    ``live``: the file a writer may be appending to.  When it is the last of ``paths``,
    its last line not ended by a newline and not a JSON object is a record still being
    written, or one a kill left unfinished (the next start cuts it off): not checked,
    counted in ``unfinished``.  Anywhere else such a line is a fault; one that is an
    object is checked as any record."""
    prev: str | None = None  # None: take the first record's prev (earlier files not given)
    expected = 0
    first = 0
    count = 0
    checkpoints = 0
    last: Checkpoint | None = None
    outside_seen = False
    before: Path | None = None  # the file before this one
    first_prev: str | None = None
    disposal: int | None = None
    unfinished = 0
    latest: datetime | None = None  # the latest time so far (that of a step back after one)
    steps: list[StepBack] = []
    stepped = 0
    for index, path in enumerate(paths):
        starting = before is not None
        writing = index == len(paths) - 1 and live is not None and path == live
        with path.open("rb") as handle:
            for number, line in enumerate(handle, start=1):
                if writing and not line.endswith(b"\n") and not _an_object(line):
                    unfinished = len(line)  # the end of the file: not a record (yet)
                    break
                if not line.strip():
                    continue
                where = f"{path}:{number}"
                try:
                    record = json.loads(line)
                    if not isinstance(record, dict):
                        raise ValueError(f"a JSON {type(record).__name__}, not an object")
                    claimed = record.pop("hash")
                    seq = record["seq"]
                    if not isinstance(seq, int):
                        raise ValueError("seq is not a number")
                except (ValueError, KeyError) as exc:
                    raise AuditChainError(f"{where}: not an audit record ({exc})", fix=FIX) from exc
                if prev is None:
                    prev = GENESIS if seq == 1 else record.get("prev")
                    first_prev = prev
                    expected = seq
                    first = seq
                if record.get("prev") != prev or seq != expected:
                    why = "a record before it was removed, inserted or reordered"
                    if starting:
                        why = (
                            f"the first record of this file does not go on from the last of "
                            f"{before}: a file between them is missing, or records were cut "
                            "off the end of that one"
                        )
                    raise AuditChainError(
                        f"{where}: record {seq}: chain broken: record {expected} expected "
                        f"here ({why})",
                        fix=FIX,
                    )
                starting = False
                if hashlib.sha256(canonical(record)).hexdigest() != claimed:
                    raise AuditChainError(
                        f"{where}: record {seq} was altered after it was written", fix=FIX
                    )
                if _explains_start(record, first, first_prev):
                    disposal = seq
                if record.get("event") == CHECKPOINT_EVENT:
                    _check_checkpoint(record, where, keys, last, first)
                    last = Checkpoint(seq, claimed, where)
                    checkpoints += 1
                if last_checkpoint is not None and seq == last_checkpoint[0]:
                    outside_seen = True
                    if record.get("event") != CHECKPOINT_EVENT or claimed != last_checkpoint[1]:
                        raise AuditChainError(
                            f"{where}: record {seq} is not the checkpoint seen outside "
                            f"({last_checkpoint[1]}): the trail was rewritten up to it",
                            fix=FIX,
                        )
                at = _time(record)
                if at is not None and latest is not None and at < latest - CLOCK_MARGIN:
                    stepped += 1
                    if len(steps) < STEPS_NAMED:
                        steps.append(StepBack(seq, where, str(record["time"]), latest.isoformat()))
                    latest = at  # the records after it are compared with it, as the writer does
                elif at is not None and (latest is None or at > latest):
                    latest = at
                prev = claimed
                expected = seq + 1
                count += 1
        before = path
    if last_checkpoint is not None and not outside_seen:
        end = f"ends at record {expected - 1}" if count else "is empty"
        raise AuditChainError(
            f"TRUNCATED: the trail {end}, but checkpoint {last_checkpoint[0]} was seen outside: "
            "records were cut off the end (or the file holding them was not given)",
            fix=FIX,
        )
    return TrailReport(
        count,
        first,
        expected - 1,
        checkpoints,
        last,
        bool(keys),
        disposal,
        unfinished,
        stepped,
        tuple(steps),
    )


def _time(record: dict[str, Any]) -> datetime | None:
    try:
        at = datetime.fromisoformat(record["time"])
    except (KeyError, TypeError, ValueError):
        return None
    return at if at.tzinfo is not None else None


def _an_object(line: bytes) -> bool:
    try:
        return isinstance(json.loads(line), dict)
    except ValueError:
        return False


def _explains_start(record: dict[str, Any], first: int, first_prev: str | None) -> bool:
    """A retention record saying the files before record ``first`` (whose prev is
    ``first_prev``) were disposed of."""
    detail = record.get("detail")
    return (
        record.get("event") == AUDIT_DISPOSED_EVENT
        and isinstance(detail, dict)
        and detail.get("trail_starts_at") == first
        and detail.get("prev") == first_prev
    )


def _check_checkpoint(
    record: dict[str, object],
    where: str,
    keys: CheckpointKeys | None,
    last: Checkpoint | None,
    first: int,
) -> None:
    seq = record["seq"]
    since = f"after checkpoint {last.seq} ({last.where})" if last else "before it"
    if keys:
        problem = keys.problem(record)
        if problem is not None:
            raise AuditChainError(
                f"{where}: record {seq}: {problem}; the records {since} were changed, "
                "removed or inserted, and the chain computed again",
                fix=FIX,
            )
    detail = record.get("detail")
    previous = detail.get("previous_checkpoint") if isinstance(detail, dict) else None
    if last is not None and previous != last.seq:
        raise AuditChainError(
            f"{where}: record {seq}: checkpoint says the one before it was record "
            f"{previous}, but it is record {last.seq} ({last.where}): a checkpoint was removed",
            fix=FIX,
        )
    if last is None and first == 1 and previous != 0:
        raise AuditChainError(
            f"{where}: record {seq}: checkpoint says the one before it was record {previous}, "
            "but there is none: a checkpoint was removed",
            fix=FIX,
        )


def verify_chain(path: Path) -> int:
    """Check one file's chain; return the number of records or raise AuditChainError."""
    return verify_trail([path]).records
