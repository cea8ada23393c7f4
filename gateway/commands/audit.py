"""``medgw audit verify``: check the audit trail's hash chain."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from gateway.audit.log import AuditChainError, verify_chain
from gateway.commands import DEFAULT_CONFIG
from gateway.config import load_config


def register(commands: Any) -> None:
    audit = commands.add_parser("audit", help="the audit trail")
    actions = audit.add_subparsers(dest="audit_command", required=True, metavar="COMMAND")
    verify = actions.add_parser(
        "verify",
        help="check that no record was removed, reordered or edited (exit 0 intact, 1 broken "
        "or unreadable)",
    )
    source = verify.add_mutually_exclusive_group()
    source.add_argument(
        "--config",
        type=Path,
        metavar="PATH",
        help=f"gateway.toml to read the audit log path from (default {DEFAULT_CONFIG})",
    )
    source.add_argument("--file", type=Path, help="an audit log file (e.g. an archived copy)")
    verify.set_defaults(handler=_verify)


def _verify(args: argparse.Namespace) -> int:
    path: Path = args.file or load_config(args.config or DEFAULT_CONFIG).storage.audit_log
    try:
        count = verify_chain(path)
    except FileNotFoundError:
        print(
            f"medgw: audit log {path} not found (fix: check --file or [storage] audit_log)",
            file=sys.stderr,
        )
        return 1
    except OSError as exc:  # a folder, no permission, an I/O error
        reason = exc.strerror or str(exc)
        print(
            f"medgw: cannot read audit log {path}: {reason} (fix: give the audit log file "
            "itself with --file, readable by this user, e.g. sudo -u medgw medgw audit verify)",
            file=sys.stderr,
        )
        return 1
    except AuditChainError as exc:
        print(f"BROKEN: {exc}", file=sys.stderr)
        return 1
    print(f"{path}: {count} records, hash chain intact")
    return 0
