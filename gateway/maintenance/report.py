"""The review report of maintenance sessions (MNT-3, MNT-4): the audit trail's
``maintenance.*`` records of a time window, one entry per SSH connection; with a
break-glass session, the ``emergency.*`` records of its use and of the emergency it
declared or joined.  What an administrator did outside any connection (an approval,
an unlock) is an entry of its own."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

PREFIX = "maintenance."
EMERGENCY_PREFIX = "emergency."
MAX_SESSIONS = 100_000  # a window's report stays bounded in memory
MAX_EMERGENCY_RECORDS = 10_000  # emergency records waiting for their session, bounded


def sessions(records: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """Group the records by ``detail.session``, oldest session first.  Approvals and
    other actions, which belong to no connection, are listed as their own entries."""
    found: dict[str, dict[str, Any]] = {}
    by_window: dict[str, list[dict[str, Any]]] = {}  # emergency records of no session
    kept = 0
    for record in records:
        event = str(record.get("event", ""))
        detail = record.get("detail") or {}
        session = detail.get("session")
        if event.startswith(EMERGENCY_PREFIX) and session is None:
            if detail.get("emergency") and kept < MAX_EMERGENCY_RECORDS:
                by_window.setdefault(str(detail["emergency"]), []).append(_emergency(record))
                kept += 1
            continue
        if not event.startswith((PREFIX, EMERGENCY_PREFIX)):
            continue
        key = str(session or f"record {len(found)}")
        if key not in found:
            if len(found) >= MAX_SESSIONS:
                continue
            found[key] = {
                "session": session,
                "person": str(record.get("actor", "")).removeprefix("maintainer:") or None,
                "source": record.get("remote_address"),
                "start": record.get("time"),
                "end": None,
                "key": None,
                "role": None,
                "login": None,
                "commands": [],
                "refused": [],
                "approved": None,
                "action": None,
                "locked": None,
                "break_glass": None,
                "emergency": [],
            }
        entry = found[key]
        entry["key"] = detail.get("key") or entry["key"]
        if event.startswith(EMERGENCY_PREFIX):  # the break-glass credential's use
            entry["emergency"].append(_emergency(record))
        elif event == "maintenance.login":
            entry["login"] = "passed"
            entry["role"] = detail.get("role")
            if detail.get("break_glass") is not None:
                entry["break_glass"] = {
                    "serial": detail.get("break_glass"),
                    "emergency": detail.get("emergency"),
                }
        elif event == "maintenance.login_failed":
            entry["login"] = f"refused: {record.get('reason')}"
            entry["end"] = record.get("time")
        elif event == "maintenance.command":
            command = {
                "time": record.get("time"),
                "command": detail.get("command"),
                "arguments": detail.get("arguments", []),
                "exit_status": detail.get("exit_status"),
            }
            if "shown" in detail:
                command["shown"] = detail["shown"]
            if "refused" in detail:
                command["refused"] = detail["refused"]
            entry["commands"].append(command)
        elif event == "maintenance.request_refused":
            entry["refused"].append(detail.get("request"))
        elif event == "maintenance.locked":
            entry["locked"] = {"time": record.get("time"), "reason": record.get("reason")}
        elif event == "maintenance.logout":
            entry["end"] = record.get("time")
            entry["logout"] = record.get("reason")
        elif event == "maintenance.approved":
            entry["person"] = detail.get("person")
            entry["approved"] = {
                "by": record.get("actor"),
                "until": detail.get("until"),
                "reason": record.get("reason"),
            }
        elif session is None:  # an action on a person, not a connection (an unlock)
            entry["person"] = detail.get("person") or entry["person"]
            entry["action"] = {
                "event": event,
                "by": record.get("actor"),
                "reason": record.get("reason"),
                "detail": {k: v for k, v in detail.items() if k != "person"},
            }
    for entry in found.values():
        window = (entry["break_glass"] or {}).get("emergency")
        if window is not None:
            entry["emergency"] = sorted(
                [*entry["emergency"], *by_window.get(str(window), [])],
                key=lambda e: str(e["time"]),
            )
    return list(found.values())


def _emergency(record: dict[str, Any]) -> dict[str, Any]:
    return {
        "time": record.get("time"),
        "event": record.get("event"),
        "by": record.get("actor"),
        "reason": record.get("reason"),
    }


def readable(value: Any) -> str:
    """A value of a record's detail as a person reads it, not as Python writes it: a
    list as ``a, b``, a list of lists as ``a b, c d``, a mapping as ``key value; ...``."""
    if isinstance(value, dict):
        return "; ".join(f"{k} {readable(v)}" for k, v in value.items())
    if isinstance(value, list | tuple):
        items = [
            " ".join(map(str, v)) if isinstance(v, list | tuple) else readable(v) for v in value
        ]
        return ", ".join(items) or "(none)"
    return str(value)


def text(found: list[dict[str, Any]]) -> str:
    """The report as an administrator reads it."""
    lines: list[str] = []
    for s in found:
        if s["approved"] is not None:
            a = s["approved"]
            lines.append(
                f"{s['start']}  APPROVED {s['person']} until {a['until']} by {a['by']}: "
                f"{a['reason']}"
            )
            continue
        if s["action"] is not None:
            a = s["action"]
            what = str(a["event"]).removeprefix(PREFIX).upper()
            facts = readable(a["detail"])
            lines.append(
                f"{s['start']}  {what} {s['person'] or '-'} by {a['by']}"
                + (f" ({facts})" if facts else "")
                + (f": {a['reason']}" if a["reason"] else "")
            )
            continue
        glass = s["break_glass"]
        lines.append(
            f"{s['start']}  SESSION {s['session']} {s['person']} ({s['role'] or '-'}) from "
            f"{s['source']} key {s['key'] or '-'}: login {s['login'] or 'not completed'}"
            + (
                f" with the break-glass credential {glass['serial']} (emergency "
                f"{glass['emergency']})"
                if glass
                else ""
            )
        )
        body: list[tuple[str, str]] = []
        for c in s["commands"]:
            shown = "  shown: " + readable(c["shown"]) if "shown" in c else ""
            refused = f"  refused: {c['refused']}" if "refused" in c else ""
            words = " ".join([str(c["command"]), *map(str, c["arguments"])])
            body.append(
                (
                    str(c["time"]),
                    f"    {c['time']}  $ {words}  -> {c['exit_status']}{shown}{refused}",
                )
            )
        for e in s["emergency"]:
            reason = f": {e['reason']}" if e["reason"] else ""
            body.append((str(e["time"]), f"    {e['time']}  {e['event']} by {e['by']}{reason}"))
        if s["locked"] is not None:
            locked = s["locked"]
            body.append((str(locked["time"]), f"    {locked['time']}  LOCKED: {locked['reason']}"))
        lines.extend(line for _, line in sorted(body, key=lambda b: b[0]))
        for r in s["refused"]:
            lines.append(f"    refused: {r}")
        if s["end"]:
            lines.append(f"    ended {s['end']}" + (f": {s['logout']}" if s.get("logout") else ""))
    return "\n".join(lines) + ("\n" if lines else "")
