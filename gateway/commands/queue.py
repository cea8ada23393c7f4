"""``medgw queue`` and ``medgw peers``: look at and act on the running gateway.

Talking to the running daemon needs only its control socket,
``<state_dir>/control.sock``: :func:`state_dir` reads just ``[storage]
state_dir`` from gateway.toml, so a mistake elsewhere in the configuration
(which the daemon, running on its previous valid configuration, does not
use) never stops an operator from suspending a peer or retrying a message.
Only reading the spool directly, while the daemon is stopped, loads and
validates the whole configuration.
"""

from __future__ import annotations

import argparse
import os
import sys
import tomllib
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlencode

from gateway.audit import AuditLog, AuditSink
from gateway.clock import SystemClock
from gateway.commands import add_config_option, emit, record_table
from gateway.config import GatewayConfig, load_config
from gateway.control import SOCKET_NAME
from gateway.control.client import ControlClient, NotRunningError, claimed_operator
from gateway.control.server import operator
from gateway.errors import MedgwError
from gateway.instance import AlreadyRunningError, InstanceLock
from gateway.operations import listed, peers_view, record_view, viewed
from gateway.spool import Claimant, OutboundState, Spool, open_spool


def register(commands: Any) -> None:
    queue = commands.add_parser("queue", help="outbound messages: list, show, retry, cancel")
    queue_cmds = queue.add_subparsers(dest="queue_command", required=True, metavar="COMMAND")
    listing = queue_cmds.add_parser("list", help="messages, newest first")
    listing.add_argument(
        "--state", choices=[s.value for s in OutboundState], help="only messages in this state"
    )
    listing.add_argument("--peer", help="only messages for this peer (its name in peers.d/)")
    listing.set_defaults(handler=_queue_list)
    for name, helptext, handler in (
        ("show", "one message in detail", _queue_show),
        ("retry", "put a failed, expired or dead message back in the queue", _queue_retry),
        ("cancel", "withdraw a message that was not delivered", _queue_cancel),
    ):
        sub = queue_cmds.add_parser(name, help=helptext)
        sub.add_argument("message_id", help="the Message-ID, as `queue list` shows it")
        sub.set_defaults(handler=handler)

    peers = commands.add_parser("peers", help="peer institutions: list, suspend, resume")
    peer_cmds = peers.add_subparsers(dest="peers_command", required=True, metavar="COMMAND")
    peer_cmds.add_parser("list", help="peers, their state and queue").set_defaults(
        handler=_peers_list
    )
    suspend = peer_cmds.add_parser("suspend", help="stop the exchange with a peer (both ways)")
    suspend.add_argument("peer", help="the peer's name (its file name in peers.d/)")
    suspend.add_argument("--reason", required=True, help="why; recorded in the audit trail")
    suspend.set_defaults(handler=_peers_suspend)
    resume = peer_cmds.add_parser("resume", help="resume the exchange with a peer")
    resume.add_argument("peer", help="the peer's name (its file name in peers.d/)")
    resume.set_defaults(handler=_peers_resume)

    for parser in (*queue_cmds.choices.values(), *peer_cmds.choices.values()):
        add_config_option(parser)
        parser.add_argument("--json", action="store_true", help="machine-readable output")


def state_dir(config: Path) -> Path:
    """``[storage] state_dir`` of ``config``, resolved as :func:`load_config` resolves it
    (``~`` expanded; relative to the folder of gateway.toml), nothing else read or checked.

    When that one key cannot be read (no file, not TOML, no such key), the full
    load runs instead, so the :class:`ConfigError` names the problem and its fix.
    """
    source = Path(config).absolute()
    try:
        with source.open("rb") as handle:
            value = tomllib.load(handle)["storage"]["state_dir"]
    except (OSError, tomllib.TOMLDecodeError, KeyError, TypeError):
        value = None
    if not isinstance(value, str) or not value:
        return load_config(config).storage.state_dir
    candidate = Path(value).expanduser()
    return candidate if candidate.is_absolute() else source.parent / candidate


def control_client(config: Path, timeout: float = 30) -> ControlClient:
    """A client of the running daemon's control socket (see :func:`state_dir`)."""
    return ControlClient(state_dir(config) / SOCKET_NAME, timeout)


def _client(args: argparse.Namespace) -> ControlClient:
    return control_client(args.config)


def _offline(args: argparse.Namespace) -> tuple[GatewayConfig, Spool]:
    # No daemon vouches for this configuration: validate all of it before opening its spool.
    config = load_config(args.config)
    print("(medgw is not running: reading its spool directly)", file=sys.stderr)
    return config, offline_spool(config)


def offline_spool(config: GatewayConfig) -> Spool:
    """The spool, opened by a command as the node ``config`` is, by its ``[cluster]
    node_name`` (its sessions on a shared spool, named ``medgw command <node_name>``; the
    node named in the spool's schema), which holds no name: it takes up no node's
    interrupted work."""
    cluster = config.cluster
    return open_spool(
        config.storage.spool_path,
        SystemClock(),
        config.spool.postgres,
        Claimant(cluster.node_name, cluster.lease_seconds),
        command=True,
    )


def offline_trail(config: GatewayConfig) -> AuditLog:
    """The audit trail's writer for a command run while the daemon is stopped, the
    state folder's lock (gateway.instance) held by the caller: it closes the current file
    by size and by day under the same ``[audit]`` rules as the daemon's writer (its
    checkpoints are the daemon's to write)."""
    return AuditLog(
        config.storage.audit_log,
        SystemClock(),
        node=config.cluster.node_name,
        rotation=config.audit_rotation,
    )


def offline_actor() -> str:
    """Who runs this command, as the audit trail's actor when it writes the record itself
    (the daemon stopped): the same as the control socket would record."""
    return operator(os.getuid(), claimed_operator())


def offline_read(config: GatewayConfig, record: Callable[[AuditSink, str], None]) -> None:
    """Audit a read of the spool made with the daemon stopped (MNT-1): ``record`` writes
    the event, given the audit log and the actor (this process's account, and the name
    sudo passes).  Raises MedgwError if it cannot be written: then nothing is shown."""
    actor = offline_actor()
    # The daemon's lock on the state folder, held while this writes: a daemon starting or
    # stopping writes the trail without answering on its socket yet (or any more), and
    # two writers would fork the chain, or one cut off what the other is writing.
    lock = InstanceLock(config.storage.state_dir)
    try:
        lock.acquire()
    except AlreadyRunningError:
        raise MedgwError(
            f"medgw is starting or stopping (it holds {lock.path}) and does not answer on "
            "its control socket yet; this read was not recorded and nothing is shown",
            fix="run the command again in a moment",
        ) from None
    except OSError as exc:
        raise MedgwError(
            f"cannot open the state folder's lock {lock.path}: {exc.strerror or exc}; "
            "this read was not recorded and nothing is shown",
            fix="run it as the medgw user (sudo -u medgw medgw ...), or start the daemon",
        ) from exc
    try:
        audit = offline_trail(config)
        try:
            record(audit, actor)
        finally:
            audit.close()
    except OSError as exc:
        raise MedgwError(
            f"cannot record this read in the audit trail {config.storage.audit_log}: "
            f"{exc.strerror or exc}; nothing is shown",
            fix="run it as the medgw user (sudo -u medgw medgw ...), or start the daemon",
        ) from exc
    finally:
        lock.release()


def _table(records: list[dict[str, Any]]) -> str:
    return record_table(
        records,
        empty="no messages",
        state_width=10,
        created="CREATED",
        file=lambda r: str(r["filename"]),
        notes=_held,
    )


def _held(record: dict[str, Any]) -> list[str]:
    """Where nodes share the spool: the node holding a message (preparing or sending it)
    and what its claim is now, or the node that sent a message awaiting its receipt or
    delivered."""
    node, until = record.get("node"), record.get("lease_until")
    if node:
        claim = record.get("claim")
        if claim == "let go":
            return [
                f"waits for node {node}, which took it in: its document is in that "
                "node's state folder, and that node prepares it when it starts again"
            ]
        if claim == "ran out":
            doing = "sending" if record["state"] == OutboundState.SENDING else "taking it in"
            ran_out = f" at {until}" if until else ""
            return [
                f"node {node} was {doing}; its claim ran out{ran_out} (that node may have "
                "stopped): another node takes it over"
                + ("" if doing == "sending" else " if it can read its document")
                + f", or node {node} when it starts again"
            ]
        return [f"held by node {node} (claim until {until})"]
    if record.get("sent_by"):
        return [f"sent by node {record['sent_by']}"]
    return []


def _detail(record: dict[str, Any]) -> str:
    return "\n".join(f"{key:<16} {value}" for key, value in record.items() if value is not None)


def _queue_list(args: argparse.Namespace) -> int:
    query = {k: v for k, v in (("state", args.state), ("peer", args.peer)) if v}
    try:
        records = _client(args).call("GET", "/v1/queue?" + urlencode(query))
    except NotRunningError:
        config, spool = _offline(args)
        try:
            state = OutboundState(args.state) if args.state else None
            now = SystemClock().now()
            records = [
                record_view(r, now) for r in spool.list_outbound(state=state, peer=args.peer)
            ]
        finally:
            spool.close()
        offline_read(config, lambda audit, actor: listed(audit, records, actor, "queue", query))
    return emit(args, records, _table(records))


def _queue_show(args: argparse.Namespace) -> int:
    try:
        record = _client(args).call("GET", f"/v1/queue/{quote(args.message_id, safe='')}")
    except NotRunningError:
        config, spool = _offline(args)
        try:
            found = spool.get(args.message_id)
        finally:
            spool.close()
        if found is None:
            print(f"medgw: no message {args.message_id}", file=sys.stderr)
            return 1
        record = record_view(found, SystemClock().now())
        offline_read(config, lambda audit, actor: viewed(audit, record, actor, "spool"))
    return emit(args, record, _detail(record))


def _queue_action(args: argparse.Namespace, action: str) -> int:
    record = _client(args).call("POST", f"/v1/queue/{quote(args.message_id, safe='')}/{action}")
    text = f"{record['message_id']}: {action} done, now {record['state']}"
    if action == "retry" and record["state"] == "intake":
        text += " (its kept document is being signed and encrypted again; see medgw queue show)"
    return emit(args, record, text)


def _queue_retry(args: argparse.Namespace) -> int:
    return _queue_action(args, "retry")


def _queue_cancel(args: argparse.Namespace) -> int:
    return _queue_action(args, "cancel")


def _peers_list(args: argparse.Namespace) -> int:
    try:
        peers = _client(args).call("GET", "/v1/peers")
    except NotRunningError:
        config, spool = _offline(args)
        try:
            peers = peers_view(config, spool)
        finally:
            spool.close()
    lines = [f"{'PEER':<14} {'STATE':<10} {'AS2 ID':<20} QUEUE"]
    for p in peers:
        state = "SUSPENDED" if p["suspended"] else "active"
        if p.get("unusable"):
            state = "UNUSABLE"
        if not p.get("configured", True):
            state = "REMOVED"
        queue = ", ".join(f"{k} {v}" for k, v in sorted(p["messages"].items())) or "-"
        lines.append(f"{p['name']:<14} {state:<10} {p['as2_id'] or '-':<20} {queue}")
        if p.get("unusable"):
            lines.append(
                f"{'':<14} unusable: {p['unusable']}; nothing is sent to it (its messages "
                "wait) until its certificates are corrected and medgw reloaded"
            )
        if p["suspended"]:
            lines.append(f"{'':<14} by {p['suspended_by']}: {p['suspended_reason']}")
        if state == "REMOVED":
            lines.append(
                f"{'':<14} not configured any more: these are neither sent nor expired; "
                f"configure it again, or: medgw queue list --peer {p['name']} --state queued, "
                "then medgw queue cancel ID"
            )
    return emit(args, peers, "\n".join(lines))


def _peers_suspend(args: argparse.Namespace) -> int:
    _client(args).call(
        "POST", f"/v1/peers/{quote(args.peer, safe='')}/suspend", {"reason": args.reason}
    )
    return emit(
        args,
        {"peer": args.peer, "suspended": True},
        f"{args.peer}: exchange suspended (outbound held, inbound refused with 503)",
    )


def _peers_resume(args: argparse.Namespace) -> int:
    _client(args).call("POST", f"/v1/peers/{quote(args.peer, safe='')}/resume")
    return emit(args, {"peer": args.peer, "suspended": False}, f"{args.peer}: exchange resumed")
