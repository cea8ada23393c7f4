"""``medgw run`` and ``medgw check-config``."""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from pathlib import Path
from typing import Any

from gateway.clock import SystemClock
from gateway.commands import add_config_option
from gateway.errors import ConfigError, MedgwError

EXIT_OK, EXIT_FAILED = 0, 1
# A reload fetches every zone's CRLs again before it swaps: wait for it that long.
RELOAD_WAIT_SECONDS = 600


def register(commands: Any) -> None:
    run = commands.add_parser(
        "run",
        help="run the gateway daemon",
        description="Run the gateway in the foreground (as systemd does, Type=notify): "
        "listeners, senders, intake and hand-over until SIGTERM; SIGHUP reloads the "
        "configuration (an invalid one is refused and the running one kept).",
    )
    add_config_option(run)
    run.set_defaults(handler=_run)

    reload = commands.add_parser(
        "reload",
        help="reload the running daemon's configuration, recorded with who asked",
        description="Ask the running daemon, over its control socket, to read its "
        "configuration again, as SIGHUP (systemctl reload) does; the audit record names "
        "you (the account the kernel reports), where SIGHUP's can only say 'signal'. "
        "Exit 0 reloaded, 1 refused (the daemon goes on with its previous configuration; "
        "the reason is printed) or not running.",
    )
    add_config_option(reload)
    reload.set_defaults(handler=_reload)

    check = commands.add_parser(
        "check-config",
        help="validate the configuration and report",
        description="Validate gateway.toml and peers.d/ as `medgw run` would, report every "
        "problem (file, key, rule, fix) and, when valid, a summary with the network "
        "separation proof (NET-1, NET-4). Exit 0 valid, 1 errors.",
    )
    add_config_option(check)
    check.set_defaults(handler=_check_config)


def _print_problems(exc: ConfigError) -> None:
    for problem in exc.problems:
        print(problem, file=sys.stderr)


def _check_config(args: argparse.Namespace) -> int:
    from gateway.config import load_config
    from gateway.config.access import access_problems
    from gateway.fsutil import this_user
    from gateway.pki.peers import assess_peers
    from gateway.report import (
        crl_problems,
        describe_config,
        own_certificate_problems,
        trust_problems,
    )

    path: Path = args.config
    try:
        config = load_config(path)
    except ConfigError as exc:
        errors = [p for p in exc.problems if p.severity == "error"]
        _print_problems(exc)
        print(
            f"\n{path}: {len(errors)} error(s); medgw will not start with this configuration.",
            file=sys.stderr,
        )
        return EXIT_FAILED
    # Our certificates judged by the rules a peer applies to them, the zones' CRL files as
    # `pki check` judges them, every peer certificate as the daemon judges it (from local
    # files: no OCSP).
    now = SystemClock().now()
    own = asyncio.run(own_certificate_problems(config, at=now))
    trust = asyncio.run(assess_peers(config.peers, config.zones, at=now))
    found = [
        *crl_problems(config, at=now),
        *(p for peer in config.peers for p in trust_problems(peer, trust[peer.name], at=now)),
    ]
    # The folders, as the daemon finds them when it runs as this user.
    access = access_problems(config)
    errors = [p for p in found if p.severity == "error"]
    # What medgw does not start with: a certificate of ours every peer refuses, a folder.
    refused = [p for p in [*own, *access] if p.severity == "error"]
    warnings = [
        *config.warnings,
        *(p for p in [*own, *found, *access] if p.severity != "error"),
    ]
    for warning in warnings:
        print(warning)
    if refused:
        for error in [*refused, *errors]:
            print(error, file=sys.stderr)
        as_user = f" as user {this_user()}" if any(p in refused for p in access) else ""
        print(
            f"\n{path}: {len(refused) + len(errors)} error(s); medgw will not start{as_user} "
            "with this configuration.",
            file=sys.stderr,
        )
        return EXIT_FAILED
    if errors:
        for error in errors:
            print(error, file=sys.stderr)
        unusable = sorted({e.file for e in errors})
        print(
            f"\n{path}: {len(errors)} error(s): medgw starts, but exchanges nothing with the "
            f"peer(s) of {', '.join(unusable)} (shown unusable by `medgw peers list`).",
            file=sys.stderr,
        )
        return EXIT_FAILED
    print(describe_config(config))
    print(f"\n{path}: configuration is valid ({len(warnings)} warning(s)).")
    return EXIT_OK


def _reload(args: argparse.Namespace) -> int:
    from gateway.commands.queue import control_client

    answer = control_client(args.config, RELOAD_WAIT_SECONDS).call("POST", "/v1/reload")
    # As `check-config` shows them: a reload applied is not one without anything to fix.
    problems = [str(w) for w in answer.get("warnings", [])]
    for problem in problems:
        print(problem)
    print(f"configuration reloaded ({len(problems)} problem(s) found; see above)")
    return EXIT_OK


def _run(args: argparse.Namespace) -> int:
    from gateway.config import load_config
    from gateway.daemon import Daemon
    from gateway.fsutil import NOT_WRITABLE, storage_fix, this_user
    from gateway.logs import make_logger

    path: Path = args.config
    try:
        level = load_config(path).runtime.log_level
    except ConfigError as exc:
        _print_problems(exc)
        print(
            f"medgw: not starting: {path} has errors (run `sudo -u {this_user()} medgw "
            f"check-config --config {path}`, as the user medgw runs as)",
            file=sys.stderr,
        )
        return EXIT_FAILED
    log = make_logger(level)
    daemon = Daemon(path, environ=os.environ, clock=SystemClock(), log=log)
    try:
        return asyncio.run(daemon.run())
    except ConfigError as exc:
        _print_problems(exc)
        print(f"medgw: not starting: {path}: see above", file=sys.stderr)
        return EXIT_FAILED
    except MedgwError as exc:
        log.error("daemon.failed", error=exc.message, fix=exc.fix)
        print(f"medgw: {exc}", file=sys.stderr)
        return EXIT_FAILED
    except OSError as exc:
        if exc.errno not in NOT_WRITABLE or not exc.filename:
            raise
        # A file of the state folder or trail this user may not open, made so since the
        # start's check (gateway.config.access) found none.
        where = Path(os.fsdecode(exc.filename))
        message = f"cannot use {where}: {exc.strerror}; medgw stopped"
        fix = storage_fix(exc, where, daemon=True)
        log.error("daemon.failed", error=message, fix=fix)
        print(f"medgw: {message} (fix: {fix})", file=sys.stderr)
        return EXIT_FAILED
