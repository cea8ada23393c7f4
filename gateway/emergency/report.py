"""The reconciliation report (EMG-2): the emergency windows and every message exchanged
while one was on, from the audit trail's marks (``detail.emergency``)."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from gateway.emergency.mode import MARK

MAX_MESSAGES = 100_000  # one report stays bounded in memory
MAX_EVENTS = 64  # events listed per message; the audit query shows all


def collect(records: Iterable[dict[str, Any]]) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """The windows (oldest first) and the marked messages of ``records``."""
    windows: dict[str, dict[str, Any]] = {}
    messages: dict[tuple[str, str, str], dict[str, Any]] = {}
    for record in records:
        detail = record.get("detail") or {}
        mark = detail.get(MARK)
        if not isinstance(mark, str):
            continue
        event = str(record.get("event", ""))
        if event == "emergency.entered":
            windows[mark] = {
                "window": mark,
                "since": record.get("time"),
                "until": detail.get("until"),
                "ended": None,
                "reason": record.get("reason"),
                "by": record.get("actor"),
                "relaxed": detail.get("relaxed", {}),
                "relaxation_changes": windows.get(mark, {}).get("relaxation_changes", []),
                "messages": 0,
            }
        elif event == "emergency.relaxations_changed":
            found = windows.setdefault(mark, {"window": mark, "messages": 0})
            changes = found.setdefault("relaxation_changes", [])
            if len(changes) < MAX_EVENTS:
                changes.append(
                    {
                        "time": record.get("time"),
                        "by": record.get("actor"),
                        "old": detail.get("old", {}),
                        "new": detail.get("new", {}),
                    }
                )
        elif event == "emergency.left":
            found = windows.setdefault(mark, {"window": mark, "messages": 0})
            found["ended"] = detail.get("ended") or record.get("time")
            found["left_by"] = record.get("actor")
            found["left_because"] = record.get("reason")
        message_id = record.get("message_id")
        if not isinstance(message_id, str):
            continue
        key = (mark, str(record.get("peer", "")), message_id)
        entry = messages.get(key)
        if entry is None:
            if len(messages) >= MAX_MESSAGES:
                continue
            entry = messages[key] = {
                "window": mark,
                "message_id": message_id,
                "peer": record.get("peer"),
                "direction": record.get("direction"),
                "service": record.get("service"),
                "first": record.get("time"),
                "last": None,
                "events": [],
            }
            windows.setdefault(mark, {"window": mark, "messages": 0})["messages"] += 1
        entry["last"] = record.get("time")
        entry["direction"] = entry["direction"] or record.get("direction")
        if len(entry["events"]) < MAX_EVENTS:
            entry["events"].append(f"{event}:{record.get('outcome', '')}")
    return list(windows.values()), list(messages.values())


def only_last(
    windows: list[dict[str, Any]], messages: list[dict[str, Any]]
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """The last window declared, and its messages."""
    declared = [w for w in windows if w.get("since")]
    if not declared:
        return [], []
    last = declared[-1]["window"]
    return [declared[-1]], [m for m in messages if m["window"] == last]


def text(windows: list[dict[str, Any]], messages: list[dict[str, Any]]) -> str:
    lines: list[str] = []
    for w in windows:
        lines.append(
            f"WINDOW {w['window']}  {w.get('since') or '(before the report)'} .. "
            f"{w.get('ended') or 'still on, until ' + str(w.get('until'))}  by {w.get('by')}: "
            f"{w.get('reason')}  ({w['messages']} message(s))"
        )
        lines.append(f"    relaxed at entry: {_relaxed(w.get('relaxed'))}")
        for change in w.get("relaxation_changes", []):
            lines.append(
                f"    {change['time']}  relaxations changed by {change['by']}: "
                f"{_relaxed(change['old'])} -> {_relaxed(change['new'])}"
            )
        if w.get("left_because"):
            lines.append(f"    left by {w.get('left_by')}: {w['left_because']}")
        for m in messages:
            if m["window"] != w["window"]:
                continue
            lines.append(
                f"    {m['first']}  {m['direction'] or '-':8} {m['peer'] or '-':16} "
                f"{m['message_id']}  last: {m['events'][-1] if m['events'] else '-'}"
            )
    return "\n".join(lines) + ("\n" if lines else "")


def _relaxed(found: object) -> str:
    if not isinstance(found, dict) or not found:
        return "nothing"
    return ", ".join(f"{key}={value}" for key, value in found.items())
