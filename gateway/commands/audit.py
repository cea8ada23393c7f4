"""``medgw audit``: check the audit trail (``verify``) and review it (``query``, ``patients``)."""

from __future__ import annotations

import argparse
import csv
import json
import sys
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

from cryptography import x509

from gateway.audit import index, review
from gateway.audit.files import is_closed_name
from gateway.audit.index import AuditIndexError
from gateway.audit.order import CLOCK_MARGIN
from gateway.audit.query import DOCUMENTS_REMEMBERED, Filters, actor_of, patients_of, records
from gateway.audit.seal import CheckpointKeys
from gateway.audit.verify import (
    AuditChainError,
    TrailReport,
    files_removed,
    parse_checkpoint,
    verify_trail,
)
from gateway.clock import iso_seconds
from gateway.commands import DEFAULT_CONFIG
from gateway.commands.queue import control_client, offline_read
from gateway.config import GatewayConfig, load_config
from gateway.control.client import NotRunningError
from gateway.errors import InvalidValueError, MedgwError
from gateway.maintenance import report
from gateway.operations import audit_verification_failed


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

    query = actions.add_parser(
        "query",
        help="the records of a time window, oldest first, filtered by patient, peer, actor or "
        "event (MNT-5)",
    )
    _review_options(query)
    query.add_argument("--patient", metavar="ID", help="records naming this patient identifier")
    query.add_argument("--peer", help="records about this peer (its name in peers.d)")
    query.add_argument("--actor", help="records caused by this actor, e.g. 'api:ris'")
    query.add_argument("--event", help="records of this event type, e.g. message.received")
    _index_option(query)
    query.set_defaults(handler=_query)
    patients = actions.add_parser(
        "patients",
        help="how many records name each patient in a time window, in all and per actor (MNT-5)",
    )
    _review_options(patients)
    _index_option(patients)
    patients.set_defaults(handler=_patients)
    sessions = actions.add_parser(
        "sessions",
        help="the remote maintenance sessions of a time window: who, from where, with which "
        "key, every command and its result, refusals, approvals (MNT-3, MNT-4)",
    )
    _review_options(sessions)
    sessions.set_defaults(handler=_sessions)


def _review_options(parser: argparse.ArgumentParser) -> None:
    source = parser.add_mutually_exclusive_group()
    source.add_argument(
        "--config",
        type=Path,
        metavar="PATH",
        default=DEFAULT_CONFIG,
        help=f"gateway.toml to read the audit log path from (default {DEFAULT_CONFIG})",
    )
    source.add_argument(
        "--file",
        type=Path,
        action="append",
        help="an audit log file (e.g. an archived copy); several in order, oldest first",
    )
    parser.add_argument(
        "--since",
        type=_time,
        metavar="TIME",
        help="from this time on (ISO 8601: 2026-11-01 or 2026-11-01T09:00+09:00; UTC if no "
        "offset is given)",
    )
    parser.add_argument(
        "--until",
        type=_until,
        metavar="TIME",
        help="before this time; a date alone includes that whole day",
    )
    parser.add_argument(
        "--format", choices=("table", "json", "csv"), default="table", help="default table"
    )


def _index_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--no-index",
        action="store_true",
        help="read the log alone, without the index kept beside it (<log>.index: built, "
        "brought up to date and used otherwise)",
    )


def _note(text: str) -> None:
    print(f"medgw: note: {text}", file=sys.stderr)


def _index_failed(exc: AuditIndexError) -> int:
    print(f"medgw: {exc}", file=sys.stderr)
    return 1


def _time(text: str) -> datetime:
    try:
        return review.since(text)
    except InvalidValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from exc


def _until(text: str) -> datetime:
    try:
        return review.until(text)
    except InvalidValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from exc


def _trail(args: argparse.Namespace) -> list[Path]:
    if args.file:
        return list(args.file)
    return review.trail(load_config(args.config).storage.audit_log)


def _unreadable(exc: OSError, paths: list[Path]) -> int:
    print(
        f"medgw: cannot read audit log {exc.filename or paths[0]}: {exc.strerror or exc} "
        "(fix: check --file or [storage] audit_log, readable by this user, e.g. sudo -u "
        "medgw medgw audit ...)",
        file=sys.stderr,
    )
    return 1


NO_ACTOR = "(none)"  # a record that names no actor: the gateway's own work, or an old record
QUERY_COLUMNS = ("time", "seq", "event", "outcome", "actor", "peer", "patients", "message_id")
CSV_COLUMNS = (
    "time", "seq", "node", "event", "outcome", "severity", "actor", "peer", "service",
    "direction", "message_id", "patients", "remote_address", "reason",
)  # fmt: skip


def _cells(record: dict[str, Any]) -> dict[str, str]:
    patients = " ".join(f"{a}^{p}" if a else p for p, a in patients_of(record))
    cells = {k: "" if record.get(k) is None else str(record[k]) for k in CSV_COLUMNS}
    return {**cells, "actor": actor_of(record) or "", "patients": patients}


def _query(args: argparse.Namespace) -> int:
    filters = Filters(args.since, args.until, args.patient, args.peer, args.actor, args.event)
    paths = _trail(args)
    try:
        _show(args.format, review.records(paths, filters, use_index=not args.no_index, note=_note))
    except OSError as exc:
        return _unreadable(exc, paths)
    except AuditIndexError as exc:
        return _index_failed(exc)
    return 0


def _show(form: str, found: Iterator[dict[str, Any]]) -> None:
    if form == "json":
        for record in found:
            print(json.dumps(record, ensure_ascii=False))
    elif form == "csv":
        writer = csv.writer(sys.stdout, lineterminator="\n")
        writer.writerow(CSV_COLUMNS)
        for record in found:
            cells = _cells(record)
            writer.writerow([cells[k] for k in CSV_COLUMNS])
    else:
        widths = (25, 8, 28, 7, 24, 14, 24, 0)
        print(_row([c.upper() for c in QUERY_COLUMNS], widths))
        for record in found:
            cells = _cells(record)
            cells["time"] = iso_seconds(cells["time"])
            print(_row([cells[k] for k in QUERY_COLUMNS], widths))


def _row(cells: list[str], widths: tuple[int, ...]) -> str:
    return " ".join(f"{c:<{w}}" if w else c for c, w in zip(cells, widths, strict=True)).rstrip()


def _sessions(args: argparse.Namespace) -> int:
    paths = _trail(args)
    try:
        found = report.sessions(records(paths, Filters(args.since, args.until)))
    except OSError as exc:
        return _unreadable(exc, paths)
    if args.format == "json":
        for entry in found:
            print(json.dumps(entry, ensure_ascii=False))
    elif args.format == "csv":  # one row per session, its commands in one cell
        writer = csv.writer(sys.stdout, lineterminator="\n")
        columns = ("start", "end", "session", "person", "role", "source", "key", "login")
        writer.writerow([*columns, "commands", "refused"])
        for entry in found:
            commands = "; ".join(
                " ".join([str(c["command"]), *map(str, c["arguments"])]) + f" -> {c['exit_status']}"
                for c in entry["commands"]
            )
            cells = ["" if entry[k] is None else str(entry[k]) for k in columns]
            writer.writerow([*cells, commands, "; ".join(map(str, entry["refused"]))])
    else:
        sys.stdout.write(report.text(found))
    return 0


def _patients(args: argparse.Namespace) -> int:
    paths = _trail(args)
    try:
        window = Filters(args.since, args.until)
        rows, forgot = review.accesses(paths, window, use_index=not args.no_index, note=_note)
    except OSError as exc:
        return _unreadable(exc, paths)
    except AuditIndexError as exc:
        return _index_failed(exc)
    if args.format == "json":
        for row in rows:
            actors = [{"actor": a, "accesses": n} for a, n in row.by_actor]
            line = {"patient": row.patient, "authority": row.authority}
            print(json.dumps({**line, "accesses": row.total, "actors": actors}, ensure_ascii=False))
    elif args.format == "csv":
        writer = csv.writer(sys.stdout, lineterminator="\n")
        writer.writerow(("patient", "authority", "actor", "accesses"))
        for row in rows:  # one row per patient and actor: a spreadsheet sums them
            for actor, count in row.by_actor:
                writer.writerow((row.patient, row.authority, actor or NO_ACTOR, count))
    else:
        widths = (24, 28, 9, 0)
        print(_row(["PATIENT", "AUTHORITY", "ACCESSES", "BY ACTOR"], widths))
        for row in rows:
            by = ", ".join(f"{a or NO_ACTOR} {n}" for a, n in row.by_actor)
            print(_row([row.patient, row.authority, str(row.total), by], widths))
    if forgot:
        print(
            f"medgw: note: more than {DOCUMENTS_REMEMBERED} documents named patients; records "
            "about the oldest ones that do not name the patient themselves were not counted "
            "(fix: give a --since closer to the window, or --file the recent files only)",
            file=sys.stderr,
        )
    return 0


def _verify(args: argparse.Namespace) -> int:
    certificates: list[Path] = list(args.certificate or [])
    keys: CheckpointKeys | None = None
    config: GatewayConfig | None = None  # the installation's own trail (not --file)
    if args.file:
        paths: list[Path] = args.file
        # The last file given may be a trail's current file, being written: not a closed one.
        live: Path | None = None if is_closed_name(paths[-1]) else paths[-1]
    else:
        config = load_config(args.config or DEFAULT_CONFIG)
        paths = review.trail(config.storage.audit_log)
        live = config.storage.audit_log
        if config.audit is not None and not certificates:
            keys = CheckpointKeys([config.audit.certificate])
    try:
        outside = parse_checkpoint(args.last_checkpoint) if args.last_checkpoint else None
    except ValueError as exc:  # the message names the fix
        print(f"medgw: --last-checkpoint: {exc}", file=sys.stderr)
        return 1
    if certificates:
        try:
            keys = CheckpointKeys([_certificate(p) for p in certificates])
        except InvalidValueError as exc:  # the message names the fix
            print(f"medgw: --certificate: {exc}", file=sys.stderr)
            return 1
        except (OSError, ValueError) as exc:
            print(
                f"medgw: --certificate: {exc} (fix: give the audit certificate, PEM)",
                file=sys.stderr,
            )
            return 1
    shown = ", ".join(str(p) for p in paths)
    try:
        report = verify_trail(paths, keys, outside, live)
        if config is not None:  # the installation's trail: all of it, with its notes
            files_removed(config.storage.audit_log, report)
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
        if config is not None:
            _record_broken(args.config or DEFAULT_CONFIG, config, exc.message)
        return 1
    for line in _describe(shown, report):
        print(line)
    _check_indexes(paths)
    return 0


def _record_broken(config_path: Path, config: GatewayConfig, why: str) -> None:
    """The installation's trail is broken: an audit.verification_failed alert, recorded by
    the running daemon (exported at once), or directly if it is stopped (EMG-4)."""
    reason = f"medgw audit verify: {why}"
    try:
        control_client(config_path).call(
            "POST", "/v1/audit/verification-failed", {"reason": reason}
        )
        said = "recorded as an alert by the running daemon (audit.verification_failed)"
    except NotRunningError:
        try:
            offline_read(
                config, lambda audit, actor: audit.emit(audit_verification_failed(reason, actor))
            )
            said = (
                "recorded in the audit trail as an alert (audit.verification_failed); the "
                "daemon is stopped: it is exported when the daemon starts"
            )
        except MedgwError as exc:
            said = f"NOT recorded in the audit trail: {exc.message} (fix: {exc.fix})"
    except MedgwError as exc:
        said = f"NOT recorded in the audit trail: {exc.message} (fix: {exc.fix})"
    print(f"medgw: {said}", file=sys.stderr)


def _check_indexes(paths: list[Path]) -> None:
    """Compare each file's review index (if any) with the log just verified: one that
    differs was edited or damaged; it is removed and built again by the next review."""
    for path in paths:
        try:
            problem = index.check(path)
        except (OSError, AuditIndexError) as exc:
            print(f"medgw: note: the index of {path} was not checked: {exc}", file=sys.stderr)
            continue
        if problem is not None:
            print(
                f"WARNING: the review index {index.index_path(path)} did not match the log: "
                f"{problem}; it was removed (the log is what counts: the next review builds "
                "the index again from it; if no crash explains it, find out who edited it)",
                file=sys.stderr,
            )
        elif index.index_path(path).exists():
            print(f"{index.index_path(path)}: review index matches the log")


def _certificate(path: Path) -> x509.Certificate:
    data = path.read_bytes()
    try:
        return x509.load_pem_x509_certificate(data)
    except ValueError:
        return x509.load_der_x509_certificate(data)


def _describe(shown: str, report: TrailReport) -> list[str]:
    lines = [f"{shown}: {report.records} records, hash chain intact"]
    if report.first_seq > 1 and report.disposal_record is not None:
        lines.append(
            f"starts at record {report.first_seq}: the files before it were disposed of by "
            f"retention (record {report.disposal_record} names them and the last hash, which "
            "this record goes on from)"
        )
    elif report.first_seq > 1:
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
    if report.steps_back:
        named = "; ".join(
            f"record {s.seq} ({s.where}) stamped {s.time}, after {s.latest}"
            for s in report.first_steps_back
        )
        more = report.steps_back - len(report.first_steps_back)
        lines.append(
            f"WARNING: the clock was set back: {report.steps_back} record(s) stamped more "
            f"than {CLOCK_MARGIN.seconds // 60} minutes before the latest record before them "
            f"(the chain is intact; times are as the host's clock gave them): {named}"
            + (f"; and {more} more" if more > 0 else "")
            + ". Reviews read the files holding them whole (fix: check the host's clock "
            "and its time source, NTP: timedatectl, chronyc tracking)"
        )
    if report.unfinished:
        lines.append(
            f"the last line ({report.unfinished} bytes) is unfinished, not a record: being "
            "written as the trail was read, or left by a kill or a power cut (the next start "
            "cuts it off and records audit.record_cut_short)"
        )
    return lines
