"""Sub-command groups of ``medgw``; each module has ``register(subparsers)``.

``register`` adds its parser(s) and sets ``handler`` (a function taking the
parsed ``argparse.Namespace`` and returning the exit code) with
``parser.set_defaults(handler=...)``.  ``gateway.cli`` only wires them up.

One rule for every command that reads the configuration: ``--config PATH``,
default :data:`DEFAULT_CONFIG` (where the install steps put it).
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from gateway.clock import iso_seconds

DEFAULT_CONFIG = Path("/etc/medgw/gateway.toml")


def add_config_option(parser: argparse.ArgumentParser, purpose: str = "") -> None:
    """``--config PATH``, defaulting to :data:`DEFAULT_CONFIG`, the same on every command."""
    parser.add_argument(
        "--config",
        type=Path,
        default=DEFAULT_CONFIG,
        metavar="PATH",
        help=f"gateway.toml{purpose} (default {DEFAULT_CONFIG})",
    )


def emit(args: argparse.Namespace, data: Any, text: str) -> int:
    """Print ``data`` as JSON with ``--json``, else ``text`` for a person; exit code 0."""
    print(json.dumps(data, indent=2) if args.json else text)
    return 0


def record_table(
    records: list[dict[str, Any]],
    *,
    empty: str,
    state_width: int,
    created: str,
    file: Callable[[dict[str, Any]], str],
    notes: Callable[[dict[str, Any]], list[str]] = lambda _record: [],
) -> str:
    """Queued records (messages, hand-overs) one a line: state, peer, tries, when, file,
    Message-ID; ``notes`` gives lines shown under a record."""
    if not records:
        return empty
    lines = [
        f"{'STATE':<{state_width}} {'PEER':<14} {'TRIES':>5}  {created:<25} {'FILE':<28} MESSAGE-ID"
    ]
    for r in records:
        lines.append(
            f"{r['state']:<{state_width}} {r['peer']:<14} {r['attempts']:>5}  "
            f"{iso_seconds(r['created_at']):<25} {file(r)[:28]:<28} {r['message_id']}"
        )
        lines += [f"{'':<{state_width}} {note}" for note in notes(r)]
    return "\n".join(lines)
