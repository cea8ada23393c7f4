"""``medgw purge``: dispose of what finished before a date (DSP-1), through the running
daemon's control socket, audited with the operator and the counts per kind."""

from __future__ import annotations

import argparse
from typing import Any

from gateway.commands import add_config_option, emit
from gateway.commands.queue import control_client
from gateway.spool import RetainedKind

KINDS = [*(k.value for k in RetainedKind), "audit"]


def register(commands: Any) -> None:
    purge = commands.add_parser(
        "purge",
        help="dispose of kept copies, receipts and records of messages finished before a date",
        description="Dispose of what the gateway keeps of messages finished before DATE: "
        "inbox copies already handed over (received), receipts, hand-over records, records "
        "of finished messages (spool), and, asked for by name, closed audit files (audit). "
        "Nothing still owed is "
        "touched: unsent, awaiting a receipt, not handed over, or a receipt not yet given to "
        "the peer. A kind takes "
        "what it holds with it (spool: its receipts, hand-over records and copies).",
    )
    purge.add_argument(
        "--before",
        required=True,
        metavar="DATE",
        help="ISO 8601: 2026-04-01 (midnight UTC) or 2026-04-01T00:00:00+09:00",
    )
    purge.add_argument("--peer", help="only this peer's (its name in peers.d/)")
    purge.add_argument("--service", help="only this service's")
    purge.add_argument(
        "--kind",
        action="append",
        choices=KINDS,
        help="only this kind (and what it holds); repeat for several; default all but "
        "audit (audit: closed audit files closed before DATE, only when named, never "
        "younger than [retention] audit_days or, unset, 5 years; not with --peer or "
        "--service)",
    )
    purge.add_argument(
        "--dry-run", action="store_true", help="count what would go; dispose of nothing"
    )
    add_config_option(purge)
    purge.add_argument("--json", action="store_true", help="machine-readable output")
    purge.set_defaults(handler=_purge)


PURGE_ANSWER_SECONDS = 6 * 3600


def _purge(args: argparse.Namespace) -> int:
    body = {
        "before": args.before,
        "kinds": args.kind or [],  # the daemon's default: every kind that applies
        "peer": args.peer,
        "service": args.service,
        "dry_run": args.dry_run,
    }
    # The daemon answers once everything went and the key is rotated: minutes for a
    # large spool.
    result = control_client(args.config, timeout=PURGE_ANSWER_SECONDS).call(
        "POST", "/v1/purge", body
    )
    verb = "would dispose of" if result["dry_run"] else "disposed of"
    counts = ", ".join(f"{kind} {n}" for kind, n in result["counts"].items()) or "nothing"
    return emit(args, result, f"{verb}: {counts}")
