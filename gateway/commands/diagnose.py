"""``medgw diagnose PEER``: which segment of the path to a peer fails, and what to do."""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from collections.abc import Sequence
from typing import Any

from gateway.clock import SystemClock
from gateway.commands import add_config_option
from gateway.commands.queue import offline_spool
from gateway.config import GatewayConfig, Responsible, load_config, who_to_call
from gateway.diagnose import STEP_AREAS, Diagnoser, Diagnosis, Status
from gateway.errors import MedgwError
from gateway.spool import PeerControl

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2

DESCRIPTION = """\
Check, in order, each segment of the path to PEER and stop at the first that
fails: 1 name resolution, 2 TCP connect, 3 TLS handshake (which side rejected
whose certificate), 4 certificate validity (ours and the peer's), 5 an AS2 test
message and its signed receipt.  For the failing step it says what it means and
what to do.  Exit code 0: every step passed (warnings included); 1: a step failed.
"""

EPILOG = """\
The test message is a small signed and encrypted text document named
medgw-diagnose-<UTC time>.txt, sent with the HTTP header "X-Medgw-Probe: 1".
A medgw peer verifies it fully, records it in its audit trail (probe.received)
and answers with a signed receipt, but does not put it in its inbox.  Other AS2
products deliver the file to their inbox like any document; it holds no
patient data and can be deleted there.
"""

MARKS = {Status.OK: "[ ok ]", Status.WARN: "[warn]", Status.FAIL: "[FAIL]", Status.SKIP: "[skip]"}


def register(commands: Any) -> None:
    parser = commands.add_parser(
        "diagnose",
        help="check each segment of the path to a peer and name the one that fails",
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("peer", help="the peer's name: its file name in peers.d/ without .toml")
    add_config_option(parser)
    parser.add_argument("--json", action="store_true", help="machine-readable output")
    parser.set_defaults(handler=_diagnose)


def suspended_here(config: GatewayConfig, peer: str) -> PeerControl | None:
    """Our own suspension of ``peer`` (``medgw peers suspend``), read from the spool: the
    path may work while nothing is exchanged on purpose."""
    path = config.storage.spool_path
    if config.spool.postgres is None and not path.is_file():
        return None
    try:
        spool = offline_spool(config)
    except (MedgwError, OSError):
        return None  # not readable by this account: the steps say what they can
    try:
        control = spool.peer_controls().get(peer)
    finally:
        spool.close()
    return control if control is not None and control.suspended else None


def render(
    diagnosis: Diagnosis,
    suspension: PeerControl | None = None,
    responsible: Sequence[Responsible] = (),
) -> str:
    lines = [f"medgw diagnose {diagnosis.peer} ({diagnosis.as2_id}, {diagnosis.url})"]
    for step in diagnosis.steps:
        lines.append(f"{MARKS[step.status]} {step.number} {step.title:<29} {step.detail}")
    failure = diagnosis.first_failure
    if failure is not None:
        lines += [
            "",
            f"Step {failure.number} ({failure.title}) failed.",
            f"What it means: {failure.meaning}",
            f"What to do:    {failure.action}",
        ]
        lines += [f"Who to call:   {line}" for line in _calls(responsible, failure.name)]
    for step in diagnosis.steps:
        if step.status is Status.WARN:
            lines += ["", f"Warning, step {step.number} ({step.title}): {step.meaning}"]
            lines.append(f"What to do:    {step.action}")
    if suspension is not None:
        lines += [
            "",
            f"Note: the exchange with {diagnosis.peer} is suspended here (by "
            f"{suspension.actor}: {suspension.reason}): nothing is sent to it and what it "
            f"sends is refused with 503 until `medgw peers resume {diagnosis.peer}`.",
        ]
    if diagnosis.ok:
        works = "works" if suspension is None else "works, but is suspended here (see above)"
        lines += ["", f"All steps passed: the exchange with {diagnosis.peer} {works}."]
    return "\n".join(lines)


def _calls(responsible: Sequence[Responsible], step: str) -> list[str]:
    """Who answers for the failing step's area ([[responsible]] in gateway.toml)."""
    people = who_to_call(responsible, STEP_AREAS.get(step, "communication"))
    if not people:
        return ["no one is named: add [[responsible]] tables to gateway.toml (NET-6b)"]
    return [person.describe() for person in people]


def _diagnose(args: argparse.Namespace) -> int:
    config = load_config(args.config)
    peer = config.peer(args.peer)
    if peer is None:
        known = ", ".join(p.name for p in config.peers) or "none"
        print(
            f"medgw diagnose: no peer {args.peer!r} in the configuration {args.config} "
            f"(configured peers: {known}); a peer's name is its file name in peers.d/ "
            "without .toml",
            file=sys.stderr,
        )
        return EXIT_USAGE
    diagnosis = asyncio.run(Diagnoser(config, peer, SystemClock()).run())
    suspension = suspended_here(config, peer.name)
    if args.json:
        report = diagnosis.to_json()
        report["suspended_here"] = (
            {"by": suspension.actor, "reason": suspension.reason} if suspension else None
        )
        failure = diagnosis.first_failure
        report["who_to_call"] = (
            [p.describe() for p in who_to_call(config.responsible, STEP_AREAS[failure.name])]
            if failure is not None
            else []
        )
        print(json.dumps(report, indent=2))
    else:
        print(render(diagnosis, suspension, config.responsible))
    return EXIT_OK if diagnosis.ok else EXIT_FAILED
