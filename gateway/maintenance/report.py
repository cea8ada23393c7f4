"""The review report of maintenance sessions (MNT-3, MNT-4): the audit trail's
``maintenance.*`` records of a time window, one entry per SSH connection."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

PREFIX = "maintenance."
MAX_SESSIONS = 100_000  # a window's report stays bounded in memory


def sessions(records: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """Group the records by ``detail.session``, oldest session first.  Approvals, which
    belong to no connection, are listed as their own entries."""
    found: dict[str, dict[str, Any]] = {}
    for record in records:
        event = str(record.get("event", ""))
        if not event.startswith(PREFIX):
            continue
        detail = record.get("detail") or {}
        key = str(detail.get("session") or f"approval {len(found)}")
        if key not in found:
            if len(found) >= MAX_SESSIONS:
                continue
            found[key] = {
                "session": detail.get("session"),
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
            }
        entry = found[key]
        entry["key"] = detail.get("key") or entry["key"]
        if event == "maintenance.login":
            entry["login"] = "passed"
            entry["role"] = detail.get("role")
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
            entry["commands"].append(command)
        elif event == "maintenance.request_refused":
            entry["refused"].append(detail.get("request"))
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
    return list(found.values())


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
        lines.append(
            f"{s['start']}  SESSION {s['session']} {s['person']} ({s['role'] or '-'}) from "
            f"{s['source']} key {s['key'] or '-'}: login {s['login'] or 'not completed'}"
        )
        for c in s["commands"]:
            shown = "  shown: " + str(c["shown"]) if "shown" in c else ""
            words = " ".join([str(c["command"]), *map(str, c["arguments"])])
            lines.append(f"    {c['time']}  $ {words}  -> {c['exit_status']}{shown}")
        for r in s["refused"]:
            lines.append(f"    refused: {r}")
        if s["end"]:
            lines.append(f"    ended {s['end']}" + (f": {s['logout']}" if s.get("logout") else ""))
    return "\n".join(lines) + ("\n" if lines else "")
