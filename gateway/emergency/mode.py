"""Emergency mode (EMG-1): declared by an administrator (the host's CLI, the maintenance
console) or by the break-glass login, always with a reason and an end.  It ends by
itself: the daemon leaves it when its time is up (or at start, when it ended while the
gateway was down) and audits that.

While it is on, every audit event about a message carries ``detail.emergency`` with
the window's id (:class:`MarkingSink`): ``medgw emergency report`` finds exactly those
messages for reconciliation (EMG-2).  The window is kept in ``emergency-mode.json``
in the state folder, so that a restart neither ends nor forgets it.  That file is
trusted only when it is the gateway user's own and nobody else's (as the break-glass
credential, :func:`gateway.fsutil.read_private`); a window read back never lasts longer
than ``[emergency] max_hours`` after its start, whatever its ``until`` says.

A reload that changes what ``[emergency]`` relaxes while the mode is on is an alert of
its own (``emergency.relaxations_changed``, old and new), and the report lists it in
its window.
"""

from __future__ import annotations

import json
import secrets
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, replace
from datetime import UTC, datetime
from pathlib import Path

from gateway.audit import AuditEvent, AuditSink, EventType, Outcome, Pending, Severity
from gateway.audit.first import record_first, recorded
from gateway.clock import Clock, iso_time
from gateway.config.emergency import EmergencySettings
from gateway.errors import AuditNotWrittenError, MedgwError, UnsafeFileError
from gateway.fsutil import fsync_dir, read_private, write_atomic

FILE_NAME = "emergency-mode.json"
MAX_REASON = 500
MARK = "emergency"  # the key of the audit mark in ``detail``
MAX_FILE_BYTES = 16 * 1024


class EmergencyError(MedgwError):
    """Emergency mode cannot be entered or left as asked."""


@dataclass(frozen=True)
class Window:
    id: str
    since: float
    until: float
    reason: str
    by: str

    def view(self) -> dict[str, object]:
        return {**asdict(self), "since": iso_time(self.since), "until": iso_time(self.until)}


def clean_reason(reason: str) -> str:
    text = "".join(c for c in reason if c.isprintable()).strip()[:MAX_REASON]
    if not text:
        raise EmergencyError("the reason is empty", fix="say why (it is audited)")
    return text


def end_of(until: str | None, hours: float | None, now: float, most_hours: float) -> float:
    """The end of a window from ``--until`` (ISO 8601 with offset) or ``--hours``."""
    if (until is None) == (hours is None):
        raise EmergencyError("give exactly one of --until and --hours", fix="e.g. --hours 4")
    if until is not None:
        try:
            end = datetime.fromisoformat(until)
        except ValueError:
            raise EmergencyError(
                f"--until {until!r} is not a date and time",
                fix="write it as ISO 8601 with its offset, e.g. 2026-12-05T18:00+09:00",
            ) from None
        if end.tzinfo is None:
            raise EmergencyError(f"--until {until!r} has no UTC offset", fix="add it, e.g. +09:00")
        at = end.timestamp()
    else:
        at = now + float(hours or 0) * 3600
    if not now < at <= now + most_hours * 3600:
        raise EmergencyError(
            f"the end {iso_time(at)} is not within the next {most_hours:g} hours",
            fix="end it in the future, at most [emergency] max_hours ahead (declare it again "
            "when it ends, if the emergency goes on)",
        )
    return at


class EmergencyMode:
    """The one emergency window of a gateway, on or off."""

    def __init__(
        self,
        state_dir: Path,
        clock: Clock,
        audit: Callable[[], AuditSink],
        settings: Callable[[], EmergencySettings],
        *,
        trail: Path | None = None,
    ) -> None:
        """``trail``: the audit log, named when a record cannot be written there."""
        self.path = state_dir / FILE_NAME
        self._trail = trail
        self._clock = clock
        self._audit = audit
        self._settings = settings
        self._window: Window | None = None
        self._loaded = False  # read at first use: the audit trail is open by then
        self._owed: AuditEvent | None = None  # a leave's record not written then
        self.on_change: Callable[[], None] = lambda: None  # what it relaxes changed

    def _now_window(self) -> Window | None:
        if not self._loaded:
            self._loaded = True
            self._window = self._load()
        return self._window

    def _load(self) -> Window | None:
        try:
            data = read_private(self.path, MAX_FILE_BYTES)
        except UnsafeFileError as exc:
            self._audit().emit(
                AuditEvent(
                    EventType.EMERGENCY_STATE_REFUSED,
                    Outcome.FAILURE,
                    Severity.ALERT,
                    actor="medgw",
                    reason=f"{exc.message}: emergency mode is off, the file is not trusted",
                    detail={
                        "path": str(self.path),
                        "fix": "find out who changed it; remove it, and declare the "
                        "emergency again (medgw emergency enter) if it is still on",
                    },
                )
            )
            return None
        if data is None:
            return None
        try:
            window = Window(**json.loads(data))
        except (ValueError, TypeError):
            # Unreadable (edited, torn): the mode is off; the reason is audited at start.
            return Window("unreadable", 0.0, 0.0, f"{self.path} could not be read", "medgw")
        # An ``until`` edited far ahead never keeps the mode on past what may be declared.
        most = window.since + self._settings().max_hours * 3600
        return replace(window, until=min(float(window.until), most))

    def current(self) -> Window | None:
        """The window in force now, or None: off, or past its end."""
        window = self._now_window()
        if window is None:
            return None  # off: no need to read the clock (asked for every audit record)
        now = self._clock.now().timestamp()
        if not window.since <= now < window.until:
            return None
        return window

    def enter(self, reason: str, until: float, actor: str) -> Window:
        now = self._clock.now().timestamp()
        on = self.current()
        if on is not None:
            raise EmergencyError(
                f"emergency mode is already on (window {on.id}, until {iso_time(on.until)})",
                fix="leave it first (medgw emergency leave) to declare it anew",
            )
        self.expire()
        stamp = datetime.fromtimestamp(now, UTC).strftime("%Y%m%d%H%M%S")
        window = Window(
            f"emg-{stamp}-{secrets.token_hex(3)}",
            now,
            until,
            clean_reason(reason),
            actor,
        )
        entered = AuditEvent(
            EventType.EMERGENCY_ENTERED,
            severity=Severity.ALERT,
            actor=actor,
            reason=window.reason,
            detail={
                MARK: window.id,
                "until": iso_time(until),
                "relaxed": self._settings().relaxations(),
            },
        )

        def write() -> None:
            write_atomic(self.path, [json.dumps(asdict(window)).encode()], mode=0o600)

        # Recorded first: the mode is never on without its record (gateway.audit.first).
        recorded(self._audit(), self._trail, "entering emergency mode", entered, write)
        self._window = window
        self.on_change()
        return window

    def leave(self, actor: str, reason: str) -> tuple[Window, AuditNotWrittenError | None]:
        """Leave the window in force.  Leaving gives the gateway its protections back, so
        it is done even when its record cannot be written (then also returned: the record
        is written by :meth:`expire`, each tick of the daemon, once the trail takes it)."""
        window = self.current()
        if window is None:
            raise EmergencyError("emergency mode is off", fix="nothing to leave")
        left = self._left(window, actor, clean_reason(reason), self._clock.now().timestamp())
        try:
            # Recorded first where it can be (gateway.audit.first).
            recorded(self._audit(), self._trail, "leaving emergency mode", left, self._remove)
        except AuditNotWrittenError as exc:
            self._remove()
            self._owed = left
            unrecorded: AuditNotWrittenError | None = exc
        else:
            unrecorded = None
        self._window = None
        self.on_change()
        return window, unrecorded

    def expire(self) -> None:
        """Write the record of a leave that could not be written then; leave a window
        whose time is up (also one that ended while the gateway was down), audited as
        ended by its time bound (its relaxations ended with it: :meth:`current`; its file
        goes with its record).  Raises AuditNotWrittenError while the trail takes none."""
        if self._owed is not None:
            record_first(self._audit(), self._trail, "leaving emergency mode", self._owed)
            self._owed = None
        window = self._now_window()
        if window is None or self.current() is not None:
            return
        left = self._left(window, "medgw", "its time bound was reached", window.until)
        recorded(self._audit(), self._trail, "ending emergency mode", left, self._remove)
        self._window = None
        self.on_change()

    def relaxations_changed(
        self, old: EmergencySettings, new: EmergencySettings, actor: str
    ) -> None:
        """A reload changed ``[emergency]``: while the mode is on, a change of what it
        relaxes is an alert of its own, with the old and the new relaxations."""
        window = self.current()
        before, after = old.relaxations(), new.relaxations()
        if window is None or before == after:
            return
        self._audit().emit(
            AuditEvent(
                EventType.EMERGENCY_RELAXATIONS_CHANGED,
                severity=Severity.ALERT,
                actor=actor,
                reason="a reload changed what emergency mode relaxes while it is on",
                detail={MARK: window.id, "old": before, "new": after},
            )
        )

    def _left(self, window: Window, actor: str, reason: str, at: float) -> AuditEvent:
        return AuditEvent(
            EventType.EMERGENCY_LEFT,
            severity=Severity.WARNING,
            actor=actor,
            reason=reason,
            detail={MARK: window.id, "since": iso_time(window.since), "ended": iso_time(at)},
        )

    def _remove(self) -> None:
        self.path.unlink(missing_ok=True)
        fsync_dir(self.path.parent)


class MarkingSink:
    """Every event about a message while emergency mode is on carries the window's id."""

    def __init__(self, inner: AuditSink, mode: Callable[[], EmergencyMode | None]) -> None:
        self._inner = inner
        self._mode = mode

    def emit(self, event: AuditEvent) -> None:
        self.emit_all((event,))

    def emit_all(self, events: Sequence[AuditEvent]) -> None:
        self._inner.emit_all(self._marked(events))

    def emit_later(self, events: Sequence[AuditEvent]) -> Pending:
        return self._inner.emit_later(self._marked(events))

    def _marked(self, events: Sequence[AuditEvent]) -> Sequence[AuditEvent]:
        mode = self._mode()
        window = mode.current() if mode is not None else None
        if window is None:
            return events
        return [
            replace(event, detail={**event.detail, MARK: window.id})
            if event.message_id is not None
            else event
            for event in events
        ]
