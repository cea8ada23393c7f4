"""The restricted command set of a maintenance session: the operator CLI's actions,
each allowed per role, carried out through the same operations as the control socket
(gateway.operations).  No shell: a command line is split like a shell would, then
looked up here; anything else is refused."""

from __future__ import annotations

import asyncio
import itertools
import json
import shlex
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from gateway.audit import review
from gateway.audit.events import PatientId
from gateway.audit.query import Filters, patients_of
from gateway.emergency.actions import Emergency
from gateway.errors import InvalidValueError, MedgwError
from gateway.operations import Operations, Reloaded, ReloadRefused, record_view
from gateway.spool import OutboundState

MAX_LINE = 4096  # bytes of one command line
# How a maintainer's read is recorded (message.viewed, messages.listed: "via"), as the
# control socket's are: the same records for the same command, the person as actor.
VIA = "maintenance console"
ROLE_RANK = {"viewer": 0, "operator": 1, "admin": 2}


@dataclass
class Result:
    status: int  # the exit status the SSH client sees
    text: str
    # What the person was shown that names a document or a patient (MNT-1): audited.
    shown: dict[str, Any] = field(default_factory=dict)
    refused: str | None = None  # why it was not run at all ("stopping"): audited
    # The patients the answer named (``audit query``): the command's record names them,
    # so the patient review (`audit query --patient`, `audit patients`) finds who read it.
    patients: tuple[PatientId, ...] = ()


@dataclass(frozen=True)
class Context:
    operations: Operations
    actor: str
    reload: Callable[[str], Awaitable[Reloaded | ReloadRefused]]  # with who asks: why it failed


Handler = Callable[[Context, list[str]], Awaitable[Result]]


@dataclass(frozen=True)
class Command:
    words: tuple[str, ...]
    role: str  # the least role that may run it
    usage: str
    reveals: str | None  # "documents" when its answer names documents
    run: Handler
    # It only reads (a list, a status, the trail): still answered while the daemon stops.
    # Any other command changes or starts something and is refused then, as on the
    # control socket; a command added without saying is refused too.
    reads_only: bool = False


def _json(value: Any) -> str:
    return json.dumps(value, indent=2, ensure_ascii=False) + "\n"


def _usage(command: Command) -> Result:
    return Result(2, f"usage: {command.usage}\n")


async def _status(ctx: Context, args: list[str]) -> Result:
    peers = ctx.operations.peers()
    summary = [
        {"peer": p["name"], "suspended": p["suspended"], "messages": p["messages"]} for p in peers
    ]
    return Result(0, _json({"peers": summary}))


async def _queue_list(ctx: Context, args: list[str]) -> Result:
    state = None
    if args:
        try:
            state = OutboundState(args[0])
        except ValueError:
            names = ", ".join(s.value for s in OutboundState)
            return Result(2, f"unknown state {args[0]!r}; use one of: {names}\n")
    records = ctx.operations.spool.list_outbound(state=state)
    now = ctx.operations.clock.now()
    views = [record_view(r, now) for r in records]
    ctx.operations.listed(views, ctx.actor, "queue", {"state": args[0] if args else None})
    shown = {"documents": [[v["message_id"], v["filename"]] for v in views]}
    return Result(0, _json(views), shown)


async def _queue_show(ctx: Context, args: list[str]) -> Result:
    record = ctx.operations.spool.get(args[0])
    if record is None:
        return Result(1, "no such message; check the id with `queue list`\n")
    view = record_view(record, ctx.operations.clock.now())
    ctx.operations.viewed(view, ctx.actor, VIA)
    return Result(0, _json(view), {"documents": [[view["message_id"], view["filename"]]]})


async def _queue_retry(ctx: Context, args: list[str]) -> Result:
    return Result(
        0, _json(record_view(ctx.operations.retry(args[0], ctx.actor), ctx.operations.clock.now()))
    )


async def _queue_cancel(ctx: Context, args: list[str]) -> Result:
    return Result(
        0, _json(record_view(ctx.operations.cancel(args[0], ctx.actor), ctx.operations.clock.now()))
    )


async def _peers_list(ctx: Context, args: list[str]) -> Result:
    return Result(0, _json(ctx.operations.peers()))


async def _peers_suspend(ctx: Context, args: list[str]) -> Result:
    reason = " ".join(args[1:])[:500] or "suspended by maintainer"
    ctx.operations.suspend(args[0], reason, ctx.actor)
    return Result(0, _json({"ok": True}))


async def _peers_resume(ctx: Context, args: list[str]) -> Result:
    ctx.operations.resume(args[0], ctx.actor)
    return Result(0, _json({"ok": True}))


AUDIT_OPTIONS = ("--since", "--until", "--patient", "--peer", "--actor", "--event")
MAX_AUDIT_RECORDS = 1000  # one answer's records; narrow the window for more
AUDIT_SOURCE = "audit"  # a patient id read from the trail (PatientId.source)


def _audit_filters(args: list[str]) -> Filters | str:
    """The filters ``audit query`` was given, or why they cannot be read."""
    if len(args) % 2:
        return f"options come in pairs: {' '.join(AUDIT_OPTIONS)} VALUE"
    given = dict(zip(args[::2], args[1::2], strict=True))
    unknown = set(given) - set(AUDIT_OPTIONS)
    if unknown:
        return f"unknown option {sorted(unknown)[0]}; use {', '.join(AUDIT_OPTIONS)}"
    times: dict[str, datetime | None] = {}
    for key, read in (("--since", review.since), ("--until", review.until)):
        text = given.get(key)
        try:
            times[key] = read(text) if text else None
        except InvalidValueError as exc:
            return f"{key}: {exc}"
    return Filters(
        times["--since"],
        times["--until"],
        given.get("--patient"),
        given.get("--peer"),
        given.get("--actor"),
        given.get("--event"),
    )


async def _audit_query(ctx: Context, args: list[str]) -> Result:
    filters = _audit_filters(args)
    if isinstance(filters, str):
        return Result(2, filters + "\n")
    path = ctx.operations.config.storage.audit_log
    notes: list[str] = []

    def read() -> list[dict[str, Any]]:
        found = review.records(review.trail(path), filters, note=notes.append)
        return list(itertools.islice(found, MAX_AUDIT_RECORDS + 1))

    found = await asyncio.to_thread(read)
    more = len(found) > MAX_AUDIT_RECORDS
    found = found[:MAX_AUDIT_RECORDS]
    named = sorted({(p, a) for r in found for p, a in patients_of(r)})
    shown: dict[str, Any] = {"records": len(found)}
    if named:
        shown["patients"] = [f"{a}^{p}" if a else p for p, a in named]
    text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in found)
    if more:
        text += f"(more than {MAX_AUDIT_RECORDS} records: narrow --since/--until)\n"
    text += "".join(f"(note: {note})\n" for note in notes)
    patients = tuple(PatientId(p, AUDIT_SOURCE, a or None) for p, a in named)
    return Result(0, text, shown, patients=patients)


def _emergency(ctx: Context) -> Emergency:
    if ctx.operations.emergency is None:
        raise MedgwError("emergencies are not handled here")
    return ctx.operations.emergency


async def _emergency_status(ctx: Context, args: list[str]) -> Result:
    return Result(0, _json(_emergency(ctx).status()))


async def _emergency_enter(ctx: Context, args: list[str]) -> Result:
    try:
        hours = float(args[0])
    except ValueError:
        return Result(2, f"{args[0]!r} is not a number of hours\n")
    return Result(0, _json(_emergency(ctx).enter(" ".join(args[1:]), None, hours, ctx.actor)))


async def _emergency_leave(ctx: Context, args: list[str]) -> Result:
    return Result(0, _json(_emergency(ctx).leave(" ".join(args), ctx.actor)))


async def _unlock(ctx: Context, args: list[str]) -> Result:
    return Result(0, _json(ctx.operations.unlock(args[0], ctx.actor)))


async def _reload(ctx: Context, args: list[str]) -> Result:
    refused = await ctx.reload(ctx.actor)
    if isinstance(refused, Reloaded):
        return Result(0, _json({"reloaded": True, "warnings": list(refused.warnings)}))
    if refused.for_stop:  # under way when the stop began: audited as refused, as one after
        text = f"reload not applied: {refused.error}\nfix: {refused.fix}\n"
        return Result(1, text, refused="stopping")
    return Result(1, f"reload failed: {refused.error}\nfix: {refused.fix}\n")


COMMANDS = (
    Command(("status",), "viewer", "status", None, _status, reads_only=True),
    Command(
        ("queue", "list"), "viewer", "queue list [STATE]", "documents", _queue_list, reads_only=True
    ),
    Command(
        ("queue", "show"),
        "viewer",
        "queue show MESSAGE_ID",
        "documents",
        _queue_show,
        reads_only=True,
    ),
    Command(("queue", "retry"), "operator", "queue retry MESSAGE_ID", None, _queue_retry),
    Command(("queue", "cancel"), "operator", "queue cancel MESSAGE_ID", None, _queue_cancel),
    Command(("peers", "list"), "viewer", "peers list", None, _peers_list, reads_only=True),
    Command(("peers", "suspend"), "operator", "peers suspend PEER [REASON]", None, _peers_suspend),
    Command(("peers", "resume"), "operator", "peers resume PEER", None, _peers_resume),
    Command(
        ("audit", "query"),
        "admin",
        "audit query [--since T] [--until T] [--patient ID] [--peer P] [--actor A] [--event E]",
        "patient identifiers",
        _audit_query,
        reads_only=True,
    ),
    Command(("reload",), "admin", "reload", None, _reload),
    Command(("maintenance", "unlock"), "admin", "maintenance unlock PERSON", None, _unlock),
    Command(
        ("emergency", "status"),
        "admin",
        "emergency status",
        None,
        _emergency_status,
        reads_only=True,
    ),
    Command(
        ("emergency", "enter"), "admin", "emergency enter HOURS REASON", None, _emergency_enter
    ),
    Command(("emergency", "leave"), "admin", "emergency leave REASON", None, _emergency_leave),
)
# How many words after the command each takes: (least, most).
ARITY = {
    "status": (0, 0),
    "queue list": (0, 1),
    "queue show": (1, 1),
    "queue retry": (1, 1),
    "queue cancel": (1, 1),
    "peers list": (0, 0),
    "peers suspend": (1, 64),
    "peers resume": (1, 1),
    "reload": (0, 0),
    "maintenance unlock": (1, 1),
    "emergency status": (0, 0),
    "emergency enter": (2, 64),
    "emergency leave": (1, 64),
    "audit query": (0, 2 * len(AUDIT_OPTIONS)),
}


def allowed(role: str) -> list[Command]:
    return [c for c in COMMANDS if ROLE_RANK[role] >= ROLE_RANK[c.role]]


def help_text(role: str) -> str:
    lines = [f"commands for role {role}:"]
    for command in allowed(role):
        note = f"  (shows {command.reveals}: audited)" if command.reveals else ""
        lines.append(f"  {command.usage}{note}")
    return "\n".join(lines) + "\n"


def lookup(line: str) -> tuple[Command | None, list[str], str]:
    """The command a line names, its arguments, and why not when it names none."""
    if len(line.encode()) > MAX_LINE:
        return None, [], f"the command line is longer than {MAX_LINE} bytes"
    try:
        words = shlex.split(line)
    except ValueError as exc:
        return None, [], f"cannot read the command line ({exc})"
    for command in COMMANDS:
        n = len(command.words)
        if tuple(words[:n]) == command.words:
            return command, words[n:], ""
    return None, words, "unknown command"


STOPPING = (
    "medgw is stopping: while the transfers in progress finish it answers only the"
    " commands that read, and did nothing\n"
    "fix: run the command again once medgw runs again (systemctl start medgw)\n"
)


async def execute(
    ctx: Context, role: str, line: str, stopping: bool = False
) -> tuple[Command | None, list[str], Result]:
    """Run one command line for a person of ``role``; while the daemon is ``stopping``,
    only a command that reads."""
    command, args, why = lookup(line)
    if command is None:
        if line.strip() in ("", "help"):
            return None, [], Result(0, help_text(role))
        return None, args, Result(127, f"{why}: {line[:80]!r}\n{help_text(role)}")
    name = " ".join(command.words)
    if ROLE_RANK[role] < ROLE_RANK[command.role]:
        text = f"{name} needs the role {command.role} (you are {role})\n"
        return command, args, Result(126, text)
    least, most = ARITY[name]
    if not least <= len(args) <= most:
        return command, args, _usage(command)
    if stopping and not command.reads_only:
        return command, args, Result(1, STOPPING, refused="stopping")
    try:
        return command, args, await command.run(ctx, args)
    except MedgwError as exc:  # an unknown message or peer, a state that does not allow it
        fix = f"fix: {exc.fix}\n" if exc.fix else ""
        return command, args, Result(1, f"{exc.message}\n{fix}")
