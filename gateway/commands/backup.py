"""``medgw backup`` and ``medgw restore``: an encrypted, signed bundle of the gateway
(OUT-1).  A backup is written by the running daemon (through its control socket,
audited with the operator), or, when it is stopped, by this command; a restore
runs with the daemon stopped, onto an empty state folder."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from gateway.audit import AuditEvent
from gateway.backup.bundle import (
    BackupError,
    RestoreRefused,
    created_event,
    refused_backup_event,
    remove_leftovers,
    write_bundle,
)
from gateway.backup.restore import Restored, refused_event, restore, restored_event
from gateway.clock import SystemClock
from gateway.commands import add_config_option, emit
from gateway.commands.queue import control_client, offline_actor, offline_trail
from gateway.config import GatewayConfig, load_config
from gateway.control.client import NotRunningError
from gateway.errors import MedgwError
from gateway.instance import InstanceLock
from gateway.pki.keypair import PrivateKey

# The daemon answers a backup once the bundle is written: minutes for a large state.
BACKUP_ANSWER_SECONDS = 6 * 3600


def register(commands: Any) -> None:
    backup = commands.add_parser(
        "backup",
        help="write an encrypted, signed bundle of configuration, spool, audit trail and kept "
        "files (while the daemon runs)",
    )
    backup.add_argument("--to", required=True, type=Path, metavar="FILE", help="the bundle")
    add_config_option(backup)
    backup.add_argument("--json", action="store_true", help="machine-readable output")
    backup.set_defaults(handler=_backup)
    restore_cmd = commands.add_parser(
        "restore",
        help="check a bundle and restore it onto this host (daemon stopped, empty state)",
    )
    restore_cmd.add_argument(
        "--from",
        dest="source",
        required=True,
        type=Path,
        metavar="FILE",
        help="the bundle medgw backup wrote",
    )
    restore_cmd.add_argument(
        "--cert", required=True, type=Path, help="the backup recipient's certificate"
    )
    restore_cmd.add_argument(
        "--key", required=True, type=Path, help="the backup recipient's private key (PEM)"
    )
    restore_cmd.add_argument(
        "--force", action="store_true", help="replace a state folder and audit trail in use"
    )
    add_config_option(restore_cmd)
    restore_cmd.add_argument("--json", action="store_true", help="machine-readable output")
    restore_cmd.set_defaults(handler=_restore)


def _backup(args: argparse.Namespace) -> int:
    to = args.to.absolute()
    try:
        client = control_client(args.config, timeout=BACKUP_ANSWER_SECONDS)
        result = client.call("POST", "/v1/backup", {"to": str(to)})
    except NotRunningError:
        config = load_config(args.config)
        lock = InstanceLock(config.storage.state_dir)
        lock.acquire()  # the daemon does not start meanwhile
        try:
            remove_leftovers(config.storage.state_dir)  # of a backup killed half-way
            try:
                written = write_bundle(config, to, SystemClock().now())
            except MedgwError as exc:
                _record_said(config, refused_backup_event(to, exc, offline_actor()))
                raise
            _record(config, created_event(written, offline_actor()))
        finally:
            lock.release()
        result = written.view()
    text = (
        f"{result['file']}: {result['size']} bytes, {result['files']} files, "
        f"{result['outbound_messages']} outbound messages; signed and encrypted"
    )
    if keys := result.get("key_encryption_keys"):
        text += (
            f"\nrestoring it needs {', '.join(keys)} from the key folder ([at_rest] key_dir): "
            "copy the key folder now, before the next purge or retention sweep rotates it"
        )
    return emit(args, result, text)


def _recipient(args: argparse.Namespace) -> tuple[x509.Certificate, PrivateKey]:
    try:
        data = args.cert.read_bytes()
        cert = (
            x509.load_pem_x509_certificate(data)
            if b"-----BEGIN" in data
            else x509.load_der_x509_certificate(data)
        )
        key = serialization.load_pem_private_key(args.key.read_bytes(), None)
    except (OSError, ValueError, TypeError) as exc:
        raise BackupError(
            f"cannot read the backup recipient's certificate {args.cert} or key {args.key}: "
            f"{exc}; nothing was restored",
            fix="give the certificate of [backup] recipient and its unencrypted PEM key",
        ) from exc
    return cert, key  # type: ignore[return-value]


def _record(config: GatewayConfig, event: AuditEvent) -> None:
    """Write ``event`` to the trail (the state folder's lock is held: no daemon writes it)."""
    audit = offline_trail(config)
    try:
        audit.emit(event)
    finally:
        audit.close()


def _record_said(config: GatewayConfig, refusal: AuditEvent) -> None:
    """Write ``refusal`` to the trail (as :func:`_record`); if it cannot be written, say so
    on stderr (the refusal stands)."""
    try:
        _record(config, refusal)
    except (MedgwError, OSError) as error:
        _not_recorded(error)


def _not_recorded(error: Exception) -> None:
    print(f"medgw: this refusal is NOT recorded in the audit trail: {error}", file=sys.stderr)


def _record_refusal(args: argparse.Namespace, config: GatewayConfig, exc: RestoreRefused) -> None:
    """Audit a refused restore: in the trail, or through the daemon that runs and holds it.
    A refusal that cannot be recorded is said on stderr (the refusal stands)."""
    bundle = args.source.absolute()
    if exc.reason != "daemon-running":
        event = refused_event(bundle, exc.reason, exc.message, offline_actor(), forced=args.force)
        _record_said(config, event)
        return
    body = {"file": str(bundle), "reason": exc.reason, "error": exc.message}
    try:
        control_client(args.config).call(
            "POST", "/v1/backup/restore-refused", {**body, "forced": args.force}
        )
    except (MedgwError, OSError) as error:
        _not_recorded(error)


def _restore(args: argparse.Namespace) -> int:
    config = load_config(args.config)
    bundle = args.source.absolute()

    def restored(done: Restored) -> None:
        _record(config, restored_event(bundle, done, offline_actor(), forced=args.force))

    done = restore(
        config,
        args.source,
        recipient=lambda: _recipient(args),
        now=SystemClock().now(),
        force=args.force,
        restored=restored,
        refused=lambda exc: _record_refusal(args, config, exc),
    )
    manifest = done.manifest
    result = {"files": done.files, "created_at": manifest.get("created_at")}
    text = (
        f"restored {done.files} files from the backup of {manifest.get('created_at')} "
        f"(configuration of then in {config.storage.state_dir / 'restored-config'})"
    )
    if done.load_ended is not None:
        result["pg_restore_after_commit"] = done.load_ended
        text += (
            f"; pg_restore ended badly after its load had committed ({done.load_ended}): "
            "the spool was replaced all the same, and the restore finished"
        )
    if done.kept_refusals:
        result["refusals_kept_in"] = [str(p) for p in done.kept_refusals]
        text += "; the earlier refused attempts' audit records are kept in " + ", ".join(
            str(p) for p in done.kept_refusals
        )
    missing = done.missing_receipts
    if missing is not None:
        result["receipt_files_not_in_bundle"] = missing.detail()
        text += f"\n\nWARNING: {missing.warning}.\nFix: {missing.fix}.\n" + "\n".join(
            f"  {message_id}  {file}" for message_id, file in missing.first
        )
        if missing.count > len(missing.first):
            text += (
                f"\n  ... and {missing.count - len(missing.first)} more, not named: only the "
                f"first {len(missing.first)} are, here and in the backup.restored audit record"
            )
    return emit(args, result, text)
