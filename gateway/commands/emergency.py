"""``medgw emergency``: seal the break-glass credential, enter and leave emergency mode
(through the running daemon, audited), see where things stand, and the reconciliation
report of what was exchanged while it was on (read from the audit trail)."""

from __future__ import annotations

import argparse
import csv
import json
import os
import sys
from pathlib import Path
from typing import Any

import asyncssh

from gateway.audit.query import Filters, records
from gateway.commands import add_config_option
from gateway.commands.audit import _review_options, _trail, _unreadable
from gateway.commands.queue import control_client
from gateway.config import load_config
from gateway.emergency import report
from gateway.emergency.credential import USER, new_code, new_salt, verifier_of
from gateway.errors import MedgwError

KEY_TYPE = "ecdsa-sha2-nistp384"  # CRYPTREC: ECDSA P-384


def register(commands: Any) -> None:
    emergency = commands.add_parser("emergency", help="break-glass access and emergency mode")
    actions = emergency.add_subparsers(dest="emergency_command", required=True, metavar="COMMAND")
    seal = actions.add_parser(
        "seal",
        help="make a new break-glass credential, shown once for the sealed envelope; the "
        "previous one stops working",
    )
    seal.add_argument(
        "--key-file",
        type=Path,
        help="also write the private key to this new file (mode 600), e.g. to print it",
    )
    add_config_option(seal)
    seal.set_defaults(handler=_seal)
    status = actions.add_parser("status", help="emergency mode and the sealed credential")
    add_config_option(status)
    status.set_defaults(handler=_status)
    enter = actions.add_parser(
        "enter", help="declare an emergency: relax what [emergency] lists, until a time"
    )
    enter.add_argument("--reason", required=True, help="why (audited)")
    end = enter.add_mutually_exclusive_group(required=True)
    end.add_argument("--until", help="when it ends by itself, ISO 8601 with offset")
    end.add_argument("--hours", type=float, help="how many hours from now it ends by itself")
    add_config_option(enter)
    enter.set_defaults(handler=_enter)
    leave = actions.add_parser("leave", help="return to normal operation")
    leave.add_argument("--reason", required=True, help="why now (audited)")
    add_config_option(leave)
    leave.set_defaults(handler=_leave)
    listing = actions.add_parser(
        "report",
        help="the messages exchanged while emergency mode was on, per window, for "
        "reconciliation (EMG-2)",
    )
    _review_options(listing)
    listing.add_argument(
        "--last", action="store_true", help="the last emergency declared (and its messages)"
    )
    listing.set_defaults(handler=_report)


def _seal(args: argparse.Namespace) -> int:
    key = asyncssh.generate_private_key(KEY_TYPE, comment=f"medgw break-glass {USER}")
    code = new_code()
    salt = new_salt()
    public = key.export_public_key().decode("ascii").strip()
    private = key.export_private_key().decode("ascii")
    if args.key_file is not None:
        try:
            fd = os.open(args.key_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except OSError as exc:
            raise MedgwError(
                f"cannot create {args.key_file}: {exc.strerror}",
                fix="name a new file in a folder only you can read",
            ) from None
        with os.fdopen(fd, "w", encoding="ascii") as handle:
            handle.write(private)
    sealed = control_client(args.config).call(
        "POST",
        "/v1/emergency/seal",
        {"public_key": public, "salt": salt.hex(), "verifier": verifier_of(code, salt)},
    )
    sys.stdout.write(
        f"Break-glass credential no. {sealed['serial']}, sealed {sealed['sealed_at']}; any "
        "earlier one no longer works.\n"
        "Print or copy what follows, seal it in the envelope, and keep it in the safe.  It is "
        "not shown again and not stored on this host.\n\n"
        f"  user name: {USER}\n"
        f"  key:       {sealed['fingerprint']}\n"
        f"  code:      {code}\n\n"
        f"{private}\n"
        "To use it: save the key above to a file (chmod 600), then\n"
        f"  ssh -i KEYFILE {_maintenance_target(args.config)} status\n"
        "and answer the prompt with the code.  Using it raises an alert, declares an "
        "emergency, and it works once.\n"
    )
    return 0


def _maintenance_target(config: Path) -> str:
    """``-p PORT emergency@ADDRESS`` of the maintenance listener ``config`` names, for
    the envelope; placeholders if it cannot be read here (the credential is sealed
    anyway)."""
    try:
        settings = load_config(config).maintenance
    except MedgwError:
        settings = None
    if settings is None:
        return f"-p PORT {USER}@MAINTENANCE_ADDRESS"
    return f"-p {settings.port} {USER}@{settings.address}"


def _show(answer: Any) -> int:
    print(json.dumps(answer, indent=2, ensure_ascii=False))
    return 0


def _status(args: argparse.Namespace) -> int:
    return _show(control_client(args.config).call("GET", "/v1/emergency"))


def _enter(args: argparse.Namespace) -> int:
    body = {"reason": args.reason, "until": args.until, "hours": args.hours}
    return _show(control_client(args.config).call("POST", "/v1/emergency/enter", body))


def _leave(args: argparse.Namespace) -> int:
    body = {"reason": args.reason}
    return _show(control_client(args.config).call("POST", "/v1/emergency/leave", body))


def _report(args: argparse.Namespace) -> int:
    if args.last and (args.since or args.until):
        raise MedgwError("--last goes without --since/--until", fix="give one or the other")
    if not (args.last or args.since or args.until):
        raise MedgwError("which emergency?", fix="give --last, or --since and/or --until")
    paths = _trail(args)
    try:
        windows, messages = report.collect(records(paths, Filters(args.since, args.until)))
    except OSError as exc:
        return _unreadable(exc, paths)
    if args.last:
        windows, messages = report.only_last(windows, messages)
    if args.format == "json":
        for message in messages:
            print(json.dumps(message, ensure_ascii=False))
    elif args.format == "csv":
        writer = csv.writer(sys.stdout, lineterminator="\n")
        columns = ("window", "first", "last", "direction", "peer", "service", "message_id")
        writer.writerow([*columns, "events"])
        for m in messages:
            writer.writerow(
                [*("" if m[k] is None else str(m[k]) for k in columns), " ".join(m["events"])]
            )
    else:
        sys.stdout.write(report.text(windows, messages))
    return 0
