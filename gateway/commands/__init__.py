"""Sub-command groups of ``medgw``; each module has ``register(subparsers)``.

``register`` adds its parser(s) and sets ``handler`` (a function taking the
parsed ``argparse.Namespace`` and returning the exit code) with
``parser.set_defaults(handler=...)``.  ``gateway.cli`` only wires them up.

One rule for every command that reads the configuration: ``--config PATH``,
default :data:`DEFAULT_CONFIG` (where the install steps put it).
"""

from __future__ import annotations

import argparse
from pathlib import Path

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
