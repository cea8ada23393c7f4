"""The ``medgw`` command: argument parsing and exit codes only.

Each command group lives in ``gateway.commands.<group>`` and registers its
parsers there.  Exit codes: 0 success; 1 the operation failed (invalid
configuration, a check that did not pass, a daemon error); 2 usage error.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from gateway import __version__
from gateway.commands import (
    api,
    audit,
    backup,
    daemon,
    demo,
    diagnose,
    emergency,
    handover,
    maintainer,
    maintenance,
    queue,
    retention,
    send,
    smime,
)
from gateway.commands import pki as pki_cmds
from gateway.errors import MedgwError

EXIT_FAILED = 1


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="medgw",
        description="Secure medical data exchange gateway (AS2 over mutual TLS, S/MIME).",
    )
    parser.add_argument("--version", action="version", version=f"medgw {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    daemon.register(commands)
    demo.register(commands)
    queue.register(commands)
    handover.register(commands)
    retention.register(commands)
    backup.register(commands)
    audit.register(commands)
    send.register(commands)
    api.register(commands)
    diagnose.register(commands)
    smime.register(commands)
    maintenance.register(commands)
    maintainer.register(commands)
    emergency.register(commands)
    pki = commands.add_parser(
        "pki",
        help="certificate tools",
        description="Certificate tools: a demo PKI, path validation as medgw does it, "
        "a check of every configured certificate and CRL, keys and CSRs for a real CA.",
    )
    pki_commands = pki.add_subparsers(dest="pki_command", required=True, metavar="COMMAND")
    demo.register_pki(pki_commands)
    pki_cmds.register(pki_commands)
    _describe(parser)
    return parser


def _describe(parser: argparse.ArgumentParser) -> None:
    """Every command's ``--help`` opens with a description: its one-line help where
    the command has no longer text of its own."""
    for action in parser._actions:
        if not isinstance(action, argparse._SubParsersAction):
            continue
        helps = {choice.dest: choice.help for choice in action._choices_actions}
        for name, sub in action.choices.items():
            if not sub.description and helps.get(name):
                text = str(helps[name])
                sub.description = text[0].upper() + text[1:] + "."
            _describe(sub)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.handler(args))
    except MedgwError as exc:
        print(f"medgw: {exc}", file=sys.stderr)
        return EXIT_FAILED
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        return EXIT_FAILED
