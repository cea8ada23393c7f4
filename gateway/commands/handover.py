"""``medgw handover``: hand-overs of received documents to the internal system.

``list`` shows them (``--state failed``: those that need an operator);
``retry`` puts a failed one back, attempts reset, audited with who asked.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlencode

from gateway.commands import add_config_option, emit, record_table
from gateway.commands.queue import _client, _offline, offline_read
from gateway.control.client import NotRunningError
from gateway.operations import handover_view, listed
from gateway.spool import HandoverState

STATES = [s.value for s in HandoverState]


def register(commands: Any) -> None:
    handover = commands.add_parser(
        "handover", help="hand-overs of received documents to the internal system: list, retry"
    )
    actions = handover.add_subparsers(dest="handover_command", required=True, metavar="COMMAND")
    listing = actions.add_parser("list", help="hand-overs, newest first")
    listing.add_argument("--state", choices=STATES, help="only hand-overs in this state")
    listing.set_defaults(handler=_list)
    retry = actions.add_parser(
        "retry", help="hand a failed document over again (attempts start from 1)"
    )
    retry.add_argument("message_id", help="the Message-ID, as `handover list` shows it")
    retry.add_argument("--peer", help="the sending peer, if two sent the same Message-ID")
    retry.set_defaults(handler=_retry)
    for parser in actions.choices.values():
        add_config_option(parser)
        parser.add_argument("--json", action="store_true", help="machine-readable output")


def _table(records: list[dict[str, Any]]) -> str:
    return record_table(
        records,
        empty="no hand-overs",
        state_width=8,
        created="RECEIVED",
        file=lambda r: Path(r["inbox_file"]).name,
        notes=lambda r: (
            [f"last error: {r['last_error']}"]
            if r["state"] != HandoverState.DONE.value and r["last_error"]
            else []
        ),
    )


def _list(args: argparse.Namespace) -> int:
    try:
        query = urlencode({"state": args.state} if args.state else {})
        records = _client(args).call("GET", "/v1/handover?" + query)
    except NotRunningError:
        config, spool = _offline(args)
        try:
            state = HandoverState(args.state) if args.state else None
            records = [handover_view(r) for r in spool.handover_list(state=state)]
        finally:
            spool.close()
        filters = {"state": args.state}
        offline_read(
            config, lambda audit, actor: listed(audit, records, actor, "handover", filters)
        )
    return emit(args, records, _table(records))


def _retry(args: argparse.Namespace) -> int:
    record = _client(args).call(
        "POST",
        f"/v1/handover/{quote(args.message_id, safe='')}/retry",
        {"peer": args.peer} if args.peer else None,
    )
    return emit(
        args,
        record,
        f"{record['message_id']}: hand-over retry requested, now {record['state']}",
    )
