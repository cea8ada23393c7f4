"""Maintenance work approved in advance: who may log in, until when, why, approved by
whom.  Kept as JSON lines in the state folder, appended and synced; the daemon reads
them at every login."""

from __future__ import annotations

import json
import os
from datetime import datetime
from pathlib import Path
from typing import Any

from gateway.audit import AuditEvent, EventType
from gateway.audit.first import recorded
from gateway.clock import Clock, iso_time
from gateway.errors import MedgwError
from gateway.operations import Operations

FILE_NAME = "maintenance-approvals.jsonl"
MAX_SPAN_SECONDS = 31 * 86400  # an approval longer than a month is a standing permission
MAX_REASON = 500


class ApprovalError(MedgwError):
    """An approval that cannot be given."""


class Approvals:
    def __init__(self, state_dir: Path, clock: Clock) -> None:
        self.path = state_dir / FILE_NAME
        self._clock = clock

    def _entries(self) -> list[dict[str, Any]]:
        try:
            text = self.path.read_text(encoding="utf-8")
        except FileNotFoundError:
            return []
        found = []
        for line in text.splitlines():
            try:
                entry = json.loads(line)
            except ValueError:
                continue  # a line torn by a crash: never an approval
            if isinstance(entry, dict):
                found.append(entry)
        return found

    def approved(self, person: str, now: float) -> bool:
        return any(
            e.get("person") == person
            and isinstance(e.get("from"), float | int)
            and isinstance(e.get("until"), float | int)
            and e["from"] <= now < e["until"]
            for e in self._entries()
        )

    def approve(self, person: str, until: str, reason: str, actor: str) -> dict[str, Any]:
        entry = self.entry(person, until, reason, actor)
        self.append(entry)
        return entry

    def entry(self, person: str, until: str, reason: str, actor: str) -> dict[str, Any]:
        """The approval :meth:`approve` would add (not added yet: :meth:`append`)."""
        now = self._clock.now()
        try:
            end = datetime.fromisoformat(until)
        except ValueError:
            raise ApprovalError(
                f"--until {until!r} is not a date and time",
                fix="write it as ISO 8601 with its offset, e.g. 2026-12-05T18:00+09:00",
            ) from None
        if end.tzinfo is None:
            raise ApprovalError(
                f"--until {until!r} has no UTC offset",
                fix="add the offset, e.g. 2026-12-05T18:00+09:00",
            )
        span = end.timestamp() - now.timestamp()
        if not 0 < span <= MAX_SPAN_SECONDS:
            raise ApprovalError(
                f"--until {until!r} is not in the next {MAX_SPAN_SECONDS // 86400} days",
                fix="approve a window that ends in the future, at most a month ahead",
            )
        reason = "".join(c for c in reason if c.isprintable()).strip()[:MAX_REASON]
        if not reason:
            raise ApprovalError("--reason is empty", fix="say what work is approved")
        return {
            "person": person,
            "from": now.timestamp(),
            "until": end.timestamp(),
            "reason": reason,
            "approved_by": actor,
        }

    def append(self, entry: dict[str, Any]) -> None:
        """Add ``entry`` to the file, synced."""
        line = (json.dumps(entry) + "\n").encode()
        fd = os.open(self.path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o600)
        try:
            size = os.fstat(fd).st_size
            if size and os.pread(fd, 1, size - 1) != b"\n":
                # A line a kill left unfinished: ended first, so that this approval is a
                # line of its own and not read as part of that one (and lost).
                line = b"\n" + line
            view = memoryview(line)
            while view:
                view = view[os.write(fd, view) :]
            os.fsync(fd)
        finally:
            os.close(fd)


def approve(
    operations: Operations, person: str, until: str, reason: str, actor: str
) -> dict[str, Any]:
    """Approve ``person``'s maintenance work until ``until``, audited with who approved."""
    settings = operations.config.maintenance
    if settings is None or settings.maintainer(person) is None:
        known = ", ".join(m.person for m in settings.maintainers) if settings else ""
        raise ApprovalError(
            f"no maintainer named {person!r}",
            fix=f"use one of: {known or '(none: add one with medgw maintainer add)'}",
        )
    approvals = Approvals(operations.config.storage.state_dir, operations.clock)
    entry = approvals.entry(person, until, reason, actor)
    event = AuditEvent(
        EventType.MAINTENANCE_APPROVED,
        actor=actor,
        reason=entry["reason"],
        detail={"person": person, "until": iso_time(entry["until"])},
    )
    # Recorded first: no approval lets anyone in without its record (gateway.audit.first).
    trail = operations.config.storage.audit_log
    what = f"approving maintenance work of {person}"
    recorded(operations.audit, trail, what, event, lambda: approvals.append(entry))
    return {**entry, "from": iso_time(entry["from"]), "until": iso_time(entry["until"])}
