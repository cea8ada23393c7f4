"""``medgw audit``: check the audit trail (``verify``) and review it (``query``, ``patients``)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from cryptography import x509

from gateway.audit.seal import CheckpointKeys
from gateway.audit.verify import AuditChainError, TrailReport, parse_checkpoint, verify_trail
from gateway.commands import DEFAULT_CONFIG
from gateway.config import load_config


def register(commands: Any) -> None:
    audit = commands.add_parser("audit", help="the audit trail")
    actions = audit.add_subparsers(dest="audit_command", required=True, metavar="COMMAND")
    verify = actions.add_parser(
        "verify",
        help="check that no record was removed, reordered, edited or cut off, and the signed "
        "checkpoints (exit 0 intact, 1 broken or unreadable)",
    )
    source = verify.add_mutually_exclusive_group()
    source.add_argument(
        "--config",
        type=Path,
        metavar="PATH",
        help=f"gateway.toml to read the audit log path and certificate from (default "
        f"{DEFAULT_CONFIG})",
    )
    source.add_argument(
        "--file",
        type=Path,
        action="append",
        help="an audit log file (e.g. an archived copy); several in order, oldest first",
    )
    verify.add_argument(
        "--certificate",
        type=Path,
        action="append",
        help="the audit certificate whose key signs the checkpoints ([audit] certificate); "
        "several for a trail that spans a key change",
    )
    verify.add_argument(
        "--last-checkpoint",
        metavar="SEQ:HASH",
        help="the last checkpoint seen outside the gateway (e.g. in the hospital's log "
        "collector): the trail must reach it unchanged, or it was cut short or rewritten",
    )
    verify.set_defaults(handler=_verify)


def _verify(args: argparse.Namespace) -> int:
    certificates: list[Path] = list(args.certificate or [])
    keys: CheckpointKeys | None = None
    if args.file:
        paths: list[Path] = args.file
    else:
        config = load_config(args.config or DEFAULT_CONFIG)
        paths = [config.storage.audit_log]
        if config.audit is not None and not certificates:
            keys = CheckpointKeys([config.audit.certificate])
    try:
        outside = parse_checkpoint(args.last_checkpoint) if args.last_checkpoint else None
    except ValueError as exc:
        print(
            f"medgw: --last-checkpoint: {exc} (fix: copy it from the checkpoint record's seq "
            "and hash)",
            file=sys.stderr,
        )
        return 1
    if certificates:
        try:
            keys = CheckpointKeys([_certificate(p) for p in certificates])
        except (OSError, ValueError) as exc:
            print(
                f"medgw: --certificate: {exc} (fix: give the audit certificate, PEM)",
                file=sys.stderr,
            )
            return 1
    shown = ", ".join(str(p) for p in paths)
    try:
        report = verify_trail(paths, keys, outside)
    except FileNotFoundError as exc:
        print(
            f"medgw: audit log {exc.filename} not found (fix: check --file or [storage] audit_log)",
            file=sys.stderr,
        )
        return 1
    except OSError as exc:  # a folder, no permission, an I/O error
        reason = exc.strerror or str(exc)
        print(
            f"medgw: cannot read audit log {exc.filename or shown}: {reason} (fix: give the "
            "audit log file itself with --file, readable by this user, e.g. sudo -u medgw "
            "medgw audit verify)",
            file=sys.stderr,
        )
        return 1
    except AuditChainError as exc:
        print(f"BROKEN: {exc}", file=sys.stderr)
        return 1
    for line in _describe(shown, report):
        print(line)
    return 0


def _certificate(path: Path) -> x509.Certificate:
    data = path.read_bytes()
    try:
        return x509.load_pem_x509_certificate(data)
    except ValueError:
        return x509.load_der_x509_certificate(data)


def _describe(shown: str, report: TrailReport) -> list[str]:
    lines = [f"{shown}: {report.records} records, hash chain intact"]
    if report.first_seq > 1:
        lines.append(f"starts at record {report.first_seq}: the files before it were not given")
    if report.checkpoints:
        signed = (
            "signatures valid"
            if report.signatures_checked
            else "signatures NOT checked (give --certificate, or [audit] certificate)"
        )
        lines.append(f"{report.checkpoints} checkpoints, {signed}")
    last = report.last_checkpoint
    if last is not None:
        lines.append(
            f"last checkpoint: record {last.seq} ({last.where}), {last.seq}:{last.hash} "
            "(compare with the last one seen outside: --last-checkpoint)"
        )
    if report.unsealed:
        lines.append(
            f"not yet sealed: {report.unsealed} records after "
            f"{f'record {last.seq}' if last else 'the start'} (no checkpoint covers them yet)"
        )
    return lines
