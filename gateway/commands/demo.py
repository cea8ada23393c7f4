"""``medgw demo`` and ``medgw pki init-demo``."""

from __future__ import annotations

import argparse
from datetime import UTC, datetime
from pathlib import Path
from typing import Any


def register(commands: Any) -> None:
    demo = commands.add_parser(
        "demo", help="run two gateways on this machine and exchange a signed, encrypted document"
    )
    demo.add_argument(
        "--dir", type=Path, default=Path("demo"), help="scratch folder (default: demo)"
    )
    demo.set_defaults(handler=_demo)


def register_pki(pki_commands: Any) -> None:
    init_demo = pki_commands.add_parser(
        "init-demo", help="write a demo CA, certificates and two institutions' configs"
    )
    init_demo.add_argument("dir", type=Path, help="folder to create (a previous demo is replaced)")
    init_demo.add_argument("--hospital-port", type=int, default=18443)
    init_demo.add_argument("--lab-port", type=int, default=18444)
    init_demo.set_defaults(handler=_init_demo)


def _demo(args: argparse.Namespace) -> int:
    from gateway.demo_run import run_demo

    return run_demo(args.dir)


def _init_demo(args: argparse.Namespace) -> int:
    from gateway.pki.demo import init_demo

    layout = init_demo(
        args.dir, now=datetime.now(UTC), hospital_port=args.hospital_port, lab_port=args.lab_port
    )
    print(f"demo PKI and configs written to {layout.root}")
    print(f"  hospital: {layout.hospital.config_path}")
    print(f"  lab:      {layout.lab.config_path}")
    return 0
