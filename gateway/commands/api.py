"""``medgw api token``: a new bearer token for an internal client of the local API."""

from __future__ import annotations

import argparse
from typing import Any

from gateway.intake.api import new_token


def register(commands: Any) -> None:
    api = commands.add_parser("api", help="the local submission API: client tokens")
    api_cmds = api.add_subparsers(dest="api_command", required=True, metavar="COMMAND")
    token = api_cmds.add_parser(
        "token",
        help="make a new client token (shown once) and the token_sha256 line for gateway.toml",
    )
    token.set_defaults(handler=_token)


def _token(args: argparse.Namespace) -> int:
    token, digest = new_token()
    print("New API token -- give it to the internal system; it is shown only this once:")
    print(f"  {token}")
    print("Put this line into the client's [[api.clients]] entry in gateway.toml, then")
    print("systemctl reload medgw (only the SHA-256 is stored, never the token):")
    print(f'  token_sha256 = "{digest}"')
    return 0
