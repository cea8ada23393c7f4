"""What both export formats read from an audit record, and the text rules they share."""

from __future__ import annotations

import re
import shlex
from dataclasses import dataclass
from typing import Any

from gateway.audit.export.codes import COMMAND, Code, classify, outcome_indicator

_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def clean(value: object) -> str:
    """Text for an XML attribute or a syslog line: control characters (which XML 1.0
    cannot carry and which would split a collector's line) become U+FFFD."""
    return _CONTROL.sub("\ufffd", str(value))


@dataclass(frozen=True)
class Source:
    """Who reports: this gateway node (``node``, its [cluster] node_name) at ``site`` (the
    institution)."""

    node: str
    site: str


@dataclass(frozen=True)
class Participant:
    user_id: str
    requestor: bool
    address: str | None = None


# The documents one record names for export (a list's, a command's): as many as the
# trail keeps of a list (gateway.audit.events, messages.listed's first 64).
MAX_DOCUMENTS = 64


@dataclass(frozen=True)
class Command:
    """What a maintainer ran (``maintenance.command``): its words as typed, the exit
    status, and whether it showed documents or patients (a read)."""

    line: str  # the command and its arguments, quoted as a shell would
    exit_status: str
    reads: bool


@dataclass(frozen=True)
class Described:
    """One audit record, read for export."""

    record: dict[str, Any]
    event_id: Code
    action: str
    outcome: str  # EventOutcomeIndicator
    participants: tuple[Participant, ...]
    command: Command | None = None  # what a maintainer ran (maintenance.command)

    @property
    def event(self) -> str:
        return str(self.record.get("event", ""))

    @property
    def time(self) -> str:
        return str(self.record.get("time", ""))

    @property
    def reason(self) -> str | None:
        reason = self.record.get("reason")
        return None if reason is None else clean(reason)

    @property
    def patients(self) -> list[dict[str, str]]:
        found = self.record.get("patient_ids")
        if not isinstance(found, list):
            return []
        return [
            {str(k): clean(v) for k, v in p.items()}
            for p in found
            if isinstance(p, dict) and "id" in p
        ]

    @property
    def documents(self) -> list[str]:
        """The message IDs of the documents the record is about: its own, or those a list
        or a maintenance command showed."""
        own = self.record.get("message_id")
        if own is not None:
            return [clean(own)]
        detail = self.record.get("detail")
        detail = detail if isinstance(detail, dict) else {}
        found = detail.get("message_ids")  # a list's (messages.listed)
        shown = detail.get("shown")  # a maintenance command's
        if found is None and isinstance(shown, dict) and isinstance(shown.get("documents"), list):
            found = [d[0] for d in shown["documents"] if isinstance(d, list) and d]
        if not isinstance(found, list):
            return []
        return [clean(m) for m in found[:MAX_DOCUMENTS] if isinstance(m, str)]


def command_of(record: dict[str, Any]) -> Command | None:
    """What was run, for a ``maintenance.command`` record; None for any other."""
    detail = record.get("detail")
    if record.get("event") != COMMAND or not isinstance(detail, dict):
        return None
    name = clean(detail.get("command", ""))
    found = detail.get("arguments")
    arguments = [clean(a) for a in found] if isinstance(found, list) else []
    line = " ".join((name, shlex.join(arguments))) if arguments else name
    return Command(line, clean(detail.get("exit_status", "")), "reveals" in detail)


def host_of(remote: str) -> str:
    """The address of ``remote`` as the audit records it (``192.0.2.1:50000``,
    ``[2001:db8::1]:50000`` or an address alone): ATNA's NetworkAccessPointID."""
    if remote.startswith("["):
        return remote[1:].partition("]")[0]
    host, colon, port = remote.rpartition(":")
    return host if colon and port.isdigit() and ":" not in host else remote


def describe(record: dict[str, Any], source: Source) -> Described:
    event = str(record.get("event", ""))
    severity = str(record.get("severity", "info"))
    command = command_of(record)
    event_id, action = classify(event, severity, command is not None and command.reads)
    actor = record.get("actor")
    peer = record.get("peer")
    remote = record.get("remote_address")
    remote_text = host_of(clean(remote)) if remote is not None else None
    peer_id = f"peer:{clean(peer)}" if peer is not None else None
    first = clean(actor) if actor is not None else None
    if first is None:
        inbound = record.get("direction") == "inbound"
        first = peer_id if (peer_id and inbound) else source.node
    participants = [Participant(first, True, remote_text if first == peer_id else None)]
    if peer_id is not None and peer_id != first:
        participants.append(Participant(peer_id, False, remote_text))
    elif remote_text is not None and participants[0].address is None:
        participants[0] = Participant(first, True, remote_text)
    return Described(
        record,
        event_id,
        action,
        outcome_indicator(str(record.get("outcome", "success")), severity),
        tuple(participants),
        command,
    )
