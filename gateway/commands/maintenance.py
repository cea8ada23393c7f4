"""``medgw maintenance approve``: work approved in advance, through the running daemon."""

from __future__ import annotations

import argparse
import json
from typing import Any

from gateway.commands import add_config_option
from gateway.commands.queue import control_client


def register(commands: Any) -> None:
    maintenance = commands.add_parser("maintenance", help="remote maintenance over SSH")
    actions = maintenance.add_subparsers(
        dest="maintenance_command", required=True, metavar="COMMAND"
    )
    approve = actions.add_parser(
        "approve", help="let a maintainer log in until a time, for a stated reason"
    )
    approve.add_argument("person", help="the maintainer (file name in maintainers.d/)")
    approve.add_argument("--until", required=True, help="end of the window, ISO 8601 with offset")
    approve.add_argument("--reason", required=True, help="the work approved (audited)")
    add_config_option(approve)
    approve.set_defaults(handler=_approve)
    unlock = actions.add_parser(
        "unlock", help="lift a maintainer's lockout after too many wrong one-time codes"
    )
    unlock.add_argument("person", help="the maintainer (file name in maintainers.d/)")
    add_config_option(unlock)
    unlock.set_defaults(handler=_unlock)


def _unlock(args: argparse.Namespace) -> int:
    answer = control_client(args.config).call(
        "POST", "/v1/maintenance/unlock", {"person": args.person}
    )
    print(json.dumps(answer, indent=2))
    return 0


def _approve(args: argparse.Namespace) -> int:
    entry = control_client(args.config).call(
        "POST",
        "/v1/maintenance/approve",
        {"person": args.person, "until": args.until, "reason": args.reason},
    )
    print(json.dumps(entry, indent=2))
    return 0
