"""``medgw backup`` and ``medgw restore``: an encrypted, signed bundle of the gateway
(OUT-1).  A backup is written by the running daemon (through its control socket,
audited with the operator), or, when it is stopped, by this command; a restore
runs with the daemon stopped, onto an empty state folder."""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from gateway.audit import AuditEvent, AuditLog, EventType, Severity
from gateway.backup.bundle import BackupError, created_event, write_bundle
from gateway.backup.restore import restore
from gateway.clock import SystemClock
from gateway.commands import add_config_option, emit
from gateway.commands.queue import control_client
from gateway.config import load_config
from gateway.control.client import NotRunningError
from gateway.control.server import operator
from gateway.instance import InstanceLock
from gateway.pki.keypair import PrivateKey


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


def _actor() -> str:
    return operator(os.getuid(), os.environ.get("SUDO_USER") or os.environ.get("USER") or "")


def _backup(args: argparse.Namespace) -> int:
    to = args.to.absolute()
    try:
        result = control_client(args.config).call("POST", "/v1/backup", {"to": str(to)})
    except NotRunningError:
        config = load_config(args.config)
        lock = InstanceLock(config.storage.state_dir)
        lock.acquire()  # the daemon does not start meanwhile
        try:
            written = write_bundle(config, to, SystemClock().now())
            audit = AuditLog(config.storage.audit_log, SystemClock(), node=config.as2_id)
            try:
                audit.emit(created_event(written, _actor()))
            finally:
                audit.close()
        finally:
            lock.release()
        result = {
            "file": str(written.path),
            "size": written.size,
            "files": written.files,
            "outbound_messages": written.messages,
        }
    text = (
        f"{result['file']}: {result['size']} bytes, {result['files']} files, "
        f"{result['outbound_messages']} outbound messages; signed and encrypted"
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
            f"cannot read the backup recipient's certificate {args.cert} or key {args.key}: {exc}",
            fix="give the certificate of [backup] recipient and its unencrypted PEM key",
        ) from exc
    return cert, key  # type: ignore[return-value]


def _restore(args: argparse.Namespace) -> int:
    config = load_config(args.config)
    cert, key = _recipient(args)

    def audited(manifest: dict[str, Any]) -> None:
        audit = AuditLog(config.storage.audit_log, SystemClock(), node=config.as2_id)
        try:
            audit.emit(
                AuditEvent(
                    EventType.BACKUP_RESTORED,
                    severity=Severity.WARNING,
                    actor=_actor(),
                    detail={
                        "file": str(args.source.absolute()),
                        "created_at": manifest.get("created_at"),
                        "from_as2_id": manifest.get("as2_id"),
                        "files": len(manifest["files"]),
                        "forced": args.force,
                    },
                )
            )
        finally:
            audit.close()

    done = restore(config, args.source, cert=cert, key=key, force=args.force, restored=audited)
    manifest = done.manifest
    result = {"files": done.files, "created_at": manifest.get("created_at")}
    text = (
        f"restored {done.files} files from the backup of {manifest.get('created_at')} "
        f"(configuration of then in {config.storage.state_dir / 'restored-config'})"
    )
    return emit(args, result, text)
