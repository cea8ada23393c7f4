"""The ``medgw`` command: argument parsing and exit codes only.

Exit codes: 0 success; 1 the operation failed (invalid configuration, a check
that did not pass, a daemon error); 2 usage error.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path

from gateway import __version__
from gateway.clock import SystemClock
from gateway.errors import ConfigError, MedgwError

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="medgw",
        description="Secure medical data exchange gateway (AS2 over mutual TLS, S/MIME).",
    )
    parser.add_argument("--version", action="version", version=f"medgw {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    run = commands.add_parser("run", help="run the gateway daemon")
    run.add_argument("--config", required=True, type=Path, help="path to gateway.toml")

    check = commands.add_parser("check-config", help="validate the configuration and report")
    check.add_argument("--config", required=True, type=Path, help="path to gateway.toml")

    pki = commands.add_parser("pki", help="certificate tools")
    pki_commands = pki.add_subparsers(dest="pki_command", required=True, metavar="PKI_COMMAND")
    init_demo = pki_commands.add_parser(
        "init-demo", help="write a demo CA, certificates and two institutions' configs"
    )
    init_demo.add_argument("dir", type=Path, help="folder to create (a previous demo is replaced)")
    init_demo.add_argument("--hospital-port", type=int, default=18443)
    init_demo.add_argument("--lab-port", type=int, default=18444)

    demo = commands.add_parser(
        "demo", help="run two gateways on this machine and exchange a signed, encrypted document"
    )
    demo.add_argument(
        "--dir", type=Path, default=Path("demo"), help="scratch folder (default: demo)"
    )
    return parser


def _check_config(path: Path) -> int:
    from gateway.config import load_config
    from gateway.report import describe_config

    try:
        config = load_config(path)
    except ConfigError as exc:
        errors = [p for p in exc.problems if p.severity == "error"]
        for problem in exc.problems:
            print(problem, file=sys.stderr)
        print(
            f"\n{path}: {len(errors)} error(s); medgw will not start with this configuration.",
            file=sys.stderr,
        )
        return EXIT_FAILED
    for warning in config.warnings:
        print(warning)
    print(describe_config(config))
    print(f"\n{path}: configuration is valid ({len(config.warnings)} warning(s)).")
    return EXIT_OK


def _run(path: Path) -> int:
    from gateway.config import load_config
    from gateway.daemon import Daemon
    from gateway.logs import make_logger

    level = "info"
    try:
        level = load_config(path).runtime.log_level
    except ConfigError as exc:
        for problem in exc.problems:
            print(problem, file=sys.stderr)
        print(
            f"medgw: not starting: {path} has errors (run `medgw check-config --config {path}`)",
            file=sys.stderr,
        )
        return EXIT_FAILED
    log = make_logger(level)
    daemon = Daemon(path, environ=os.environ, clock=SystemClock(), log=log)
    try:
        return asyncio.run(daemon.run())
    except ConfigError as exc:
        for problem in exc.problems:
            print(problem, file=sys.stderr)
        return EXIT_FAILED
    except MedgwError as exc:
        log.error("daemon.failed", error=exc.message, fix=exc.fix)
        print(f"medgw: {exc}", file=sys.stderr)
        return EXIT_FAILED


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.command == "run":
            return _run(args.config)
        if args.command == "check-config":
            return _check_config(args.config)
        if args.command == "pki" and args.pki_command == "init-demo":
            from gateway.pki.demo import init_demo

            layout = init_demo(
                args.dir,
                now=datetime.now(UTC),
                hospital_port=args.hospital_port,
                lab_port=args.lab_port,
            )
            print(f"demo PKI and configs written to {layout.root}")
            print(f"  hospital: {layout.hospital.config_path}")
            print(f"  lab:      {layout.lab.config_path}")
            return EXIT_OK
        if args.command == "demo":
            from gateway.demo_run import run_demo

            return run_demo(args.dir)
    except MedgwError as exc:
        print(f"medgw: {exc}", file=sys.stderr)
        return EXIT_FAILED
    return EXIT_USAGE
