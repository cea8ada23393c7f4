"""Emergency mode (EMG-1): declared by an administrator (the host's CLI, the maintenance
console) or by the break-glass login, always with a reason and an end.  It ends by
itself: the daemon leaves it when its time is up (or at start, when it ended while the
gateway was down) and audits that.

While it is on, every audit event about a message carries ``detail.emergency`` with
the window's id (:class:`MarkingSink`): ``medgw emergency report`` finds exactly those
messages for reconciliation (EMG-2).  The window is kept in ``emergency-mode.json``
in the state folder, so that a restart neither ends nor forgets it.
"""

from __future__ import annotations

import json
import secrets
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from datetime import UTC, datetime
from pathlib import Path

from gateway.audit import AuditEvent, AuditSink, EventType, Severity
from gateway.clock import Clock, iso_time
from gateway.config.emergency import EmergencySettings
from gateway.errors import MedgwError
from gateway.fsutil import fsync_dir, write_atomic

FILE_NAME = "emergency-mode.json"
MAX_REASON = 500
MARK = "emergency"  # the key of the audit mark in ``detail``


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
    ) -> None:
        self.path = state_dir / FILE_NAME
        self._clock = clock
        self._audit = audit
        self._settings = settings
        self._window = self._load()
        self.on_change: Callable[[], None] = lambda: None  # what it relaxes changed

    def _load(self) -> Window | None:
        try:
            return Window(**json.loads(self.path.read_text(encoding="utf-8")))
        except FileNotFoundError:
            return None
        except (ValueError, TypeError, OSError):
            # Unreadable (edited, torn): the mode is off; the reason is audited at start.
            return Window("unreadable", 0.0, 0.0, f"{self.path} could not be read", "medgw")

    def current(self) -> Window | None:
        """The window in force now, or None: off, or past its end."""
        window = self._window
        now = self._clock.now().timestamp()
        if window is None or not window.since <= now < window.until:
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
        write_atomic(self.path, [json.dumps(asdict(window)).encode()], mode=0o600)
        self._window = window
        self.on_change()
        self._audit().emit(
            AuditEvent(
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
        )
        return window

    def leave(self, actor: str, reason: str) -> Window:
        window = self.current()
        if window is None:
            raise EmergencyError("emergency mode is off", fix="nothing to leave")
        self._end(window, actor, clean_reason(reason), self._clock.now().timestamp())
        return window

    def expire(self) -> None:
        """Leave a window whose time is up (also one that ended while the gateway was
        down), and audit it as ended by its time bound."""
        window = self._window
        if window is None or self.current() is not None:
            return
        self._end(window, "medgw", "its time bound was reached", window.until)

    def _end(self, window: Window, actor: str, reason: str, at: float) -> None:
        self.path.unlink(missing_ok=True)
        fsync_dir(self.path.parent)
        self._window = None
        self.on_change()
        self._audit().emit(
            AuditEvent(
                EventType.EMERGENCY_LEFT,
                severity=Severity.WARNING,
                actor=actor,
                reason=reason,
                detail={MARK: window.id, "since": iso_time(window.since), "ended": iso_time(at)},
            )
        )


class MarkingSink:
    """Every event about a message while emergency mode is on carries the window's id."""

    def __init__(self, inner: AuditSink, mode: Callable[[], EmergencyMode | None]) -> None:
        self._inner = inner
        self._mode = mode

    def emit(self, event: AuditEvent) -> None:
        mode = self._mode()
        window = mode.current() if mode is not None else None
        if window is not None and event.message_id is not None:
            event = replace(event, detail={**event.detail, MARK: window.id})
        self._inner.emit(event)
