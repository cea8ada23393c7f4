"""The backup bundle: what goes in, how it is sealed, and how it is opened again.

A bundle is one S/MIME object, as an AS2 body is: a tar archive as a MIME entity,
signed (multipart/signed) with the ``[backup]`` signing key (backups' own, never the
AS2 key) and encrypted
(AuthEnvelopedData, AES-GCM by default: ``[backup] cipher``) to the ``[backup]
recipient`` certificate, whose private key stays off the gateway.  ``openssl
cms -decrypt`` and ``openssl smime -verify`` open it as well as medgw does.

Inside::

    medgw-backup.json        manifest: who, when, the places it came from, each file's SHA-256
    config/gateway.toml      the configuration, and config/peers.d/*.toml
    state/spool.sqlite3      the spool, copied with SQLite's online backup (consistent)
    state/spool.pgdump       or, with the spool in PostgreSQL, pg_dump's (one snapshot)
    state/<folder>/<file>    the bodies, documents and receipts the spool names
    bodies/<file>            those in ``[cluster] bodies_dir`` (shared by the nodes)
    inbox/<peer>/...         received documents whose hand-over is owed, or kept
    audit/<file>             every file of the audit trail (the current one up to its last
                             whole record)
    audit/<file>.order       the writer's notes for reviews (gateway.audit.order), if kept

The spool is copied first; every file it names is copied after.  A file that
is gone by then belongs to a message that moved on (sent, delivered; its receipt
removed by retention): its row is taken again from the live spool, so the bundle
names no file it lacks that the live spool no longer names (with PostgreSQL: into
``state/spool-refreshed.json``, which restore puts in place of the dump's rows; see
:mod:`gateway.backup.pgspool`).
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import os
import shutil
import sqlite3
import tarfile
import tomllib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, NamedTuple

import psycopg
from cryptography import x509
from psycopg.rows import tuple_row

from gateway.atrest.keys import KeyStore, kek_name
from gateway.atrest.vault import Vault
from gateway.audit import AuditEvent, EventType, Outcome, Severity
from gateway.audit.files import trail_files
from gateway.audit.order import order_path
from gateway.backup import pgspool
from gateway.cms.stream import open_and_verify_file, sign_and_envelope_file
from gateway.config import GatewayConfig
from gateway.errors import (
    DecryptionError,
    MedgwError,
    SignatureError,
    SignerNotTrustedError,
)
from gateway.fsutil import fsync_dir, partial_name, private_folder
from gateway.pki.keypair import PrivateKey
from gateway.policy import AlgorithmPolicy
from gateway.spool.postgres import PostgresSettings
from gateway.spool.records import RetainedKind, items_of
from gateway.spool.sqlite.database import database_error

MANIFEST = "medgw-backup.json"
FORMAT = 2  # 2: a spool in PostgreSQL (a dump), the shared bodies folder (bodies/)
FORMATS = (1, 2)  # what restore reads
DUMP = "state/spool.pgdump"  # pg_dump's custom format, of a spool in PostgreSQL
REFRESHED = "state/spool-refreshed.json"  # rows taken again after the dump (see collect)
# base64 in CRLF lines: canonical text that every S/MIME reader (openssl's line-based
# multipart parser included) verifies byte for byte.
ENTITY_HEAD = b"Content-Type: application/x-tar\r\nContent-Transfer-Encoding: base64\r\n\r\n"
_LINE = 57  # bytes per base64 line of 76 characters
_TAIL_BLOCK = 1 << 16  # read backwards from a trail file's end, this much at a time
# Outbound rows whose files are still needed to send them (or for an operator to).
_OWED = ("intake", "queued", "sending", "awaiting-receipt", "failed", "expired", "dead")
# The work folder of a backup being written, in the state folder, and its archive and
# entity beside it: they hold the inbox documents, payloads and audit trail as they are.
WORK_PREFIX = ".backup-"


class BackupError(MedgwError):
    """A backup could not be written, or a bundle cannot be restored."""


class RestoreRefused(BackupError):
    """``medgw restore`` refused a bundle, or refused to restore here; ``reason`` is the
    rule, one short name (the ``reason`` of the ``backup.restore_refused`` audit event)."""

    def __init__(self, message: str, *, reason: str, fix: str) -> None:
        super().__init__(message, fix=fix)
        self.reason = reason


# Why a bundle cannot be opened, by the error the CMS layer raised.
_NOT_OPENED = (
    (SignerNotTrustedError, "bundle-signer"),
    (SignatureError, "bundle-signature"),
    (DecryptionError, "bundle-decryption"),
)


@dataclass(frozen=True)
class Written:
    path: Path
    size: int
    files: int
    messages: int  # outbound messages in the spool copy
    key_versions: tuple[int, ...] = ()  # the key-encryption keys a restore of it needs

    def view(self) -> dict[str, Any]:
        """What the backup's caller is told (and the ``backup.created`` record holds)."""
        return {
            "file": str(self.path),
            "size": self.size,
            "files": self.files,
            "outbound_messages": self.messages,
            "key_encryption_keys": [kek_name(v) for v in self.key_versions],
        }


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def _peers_dir(config: GatewayConfig) -> Path:
    with config.source.open("rb") as handle:
        value = tomllib.load(handle).get("gateway", {}).get("peers_dir", "peers.d")
    path = Path(str(value)).expanduser()
    return path if path.is_absolute() else config.source.parent / path


class _Collector:
    """Copies files into the work folder under their name in the bundle."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.files: dict[str, str] = {}

    def copy(self, src: Path, name: str, *, upto: int | None = None) -> bool:
        """Copy ``src`` (its first ``upto`` bytes) as ``name``; False if it is gone."""
        dst = self.root / name
        dst.parent.mkdir(parents=True, exist_ok=True)
        try:
            with src.open("rb") as reader, dst.open("wb") as writer:
                if upto is None:
                    shutil.copyfileobj(reader, writer, 1 << 20)
                else:
                    writer.write(reader.read(upto))
        except FileNotFoundError:
            dst.unlink(missing_ok=True)
            return False
        self.files[name] = _sha256(dst)
        return True


def _complete_records(path: Path) -> int:
    """The length of ``path`` up to the end of its last whole line (a record being written
    by the running daemon is left out: the chain of the copy stays whole).  Read from the
    end, a block at a time: a trail file may be far larger than memory."""
    with path.open("rb") as handle:
        end = handle.seek(0, os.SEEK_END)
        while end > 0:
            start = max(0, end - _TAIL_BLOCK)
            handle.seek(start)
            found = handle.read(end - start).rfind(b"\n")
            if found >= 0:
                return start + found + 1
            end = start
    return 0


def _place(path_text: str | None, config: GatewayConfig) -> str | None:
    """A spooled file's name in the bundle (None: outside the state folder, the inbox and
    ``[cluster] bodies_dir``)."""
    if not path_text:
        return None
    path = Path(path_text)
    folders = [(config.storage.state_dir, "state"), (config.storage.inbox_dir, "inbox")]
    if config.cluster.bodies_dir is not None:
        folders.insert(0, (config.cluster.bodies_dir, "bodies"))
    for folder, prefix in folders:
        if path.is_relative_to(folder):
            return f"{prefix}/{path.relative_to(folder).as_posix()}"
    return None


_OUTBOUND_FILES = (
    "message_id",
    "state",
    "mic",
    "payload_path",
    "body_path",
    "body",
    "receipt_path",
    "payload",
)
_HANDOVER_FILES = ("peer", "message_id", "path", "state", "copy_purged_at")


# (table, key, path, needed, again): a file a spool row names; ``needed`` to send the
# message (its absence stops the backup), or taken ``again`` from the live spool when it
# is gone (a receipt file: retention removes it, then clears the row that names it).
Named = tuple[str, str, str, bool, bool]


def _outbound_files(row: Sequence[Any]) -> Iterator[Named]:
    message_id, state, mic, payload, body_path, body, receipt, kept = row
    owed = state in _OWED
    document = owed and (mic is None or state == "intake") and kept is None
    yield "outbound", message_id, payload, document, document
    body_needed = owed and state != "intake" and body is None
    yield "outbound", message_id, body_path, body_needed, body_needed
    yield "outbound", message_id, receipt, False, True


def _handover_files(row: Sequence[Any]) -> Iterator[Named]:
    peer, message_id, path, state, purged = row
    if purged is None:
        needed = state != "done"
        yield "handover", f"{peer}\0{message_id}", path, needed, needed


def _spooled_files(db: Any) -> Iterator[Named]:
    """(table, key, path, needed, again) for each file the spool copy names (``db``: an
    SQLite connection, or a cursor of PostgreSQL's giving tuples)."""
    for row in db.execute(f"SELECT {', '.join(_OUTBOUND_FILES)} FROM outbound"):  # noqa: S608
        yield from _outbound_files(row)
    for row in db.execute(f"SELECT {', '.join(_HANDOVER_FILES)} FROM handover"):  # noqa: S608
        yield from _handover_files(row)


def row_keys(table: str, key: str) -> tuple[str, ...]:
    """The data keys (items) a row taken again from the live spool takes with it: those
    of what an outbound row holds.  The row may hold what was stored after the copy (its
    receipt, settled meanwhile), under a key the copy does not have."""
    return items_of("outbound", "", key, RetainedKind.SPOOL) if table == "outbound" else ()


def _refresh(snapshot: sqlite3.Connection, live: Path, table: str, key: str) -> None:
    """Take the row ``key`` of ``table`` again from the live spool (it moved on), with
    its data keys (:func:`row_keys`), in one read of the live spool."""
    source = sqlite3.connect(f"file:{live}?mode=ro", uri=True)
    try:
        source.row_factory = sqlite3.Row
        source.execute("BEGIN")  # the row and its keys as of one moment
        params: tuple[str, ...] = (key,)
        where = "message_id=?"
        if table != "outbound":
            peer, _, message_id = key.partition("\0")
            where, params = "peer=? AND message_id=?", (peer, message_id)
        rows = [
            (
                table,
                where,
                params,
                source.execute(f"SELECT * FROM {table} WHERE {where}", params).fetchone(),  # noqa: S608
            )
        ]
        for item in row_keys(table, key):
            found = source.execute("SELECT * FROM data_keys WHERE item=?", (item,)).fetchone()
            rows.append(("data_keys", "item=?", (item,), found))
        source.rollback()
    finally:
        source.close()
    for name, match, values, row in rows:
        snapshot.execute(f"DELETE FROM {name} WHERE {match}", values)  # noqa: S608
        if row is not None:
            columns = ", ".join(row.keys())
            marks = ", ".join("?" * len(row))
            snapshot.execute(f"INSERT INTO {name} ({columns}) VALUES ({marks})", tuple(row))  # noqa: S608
    snapshot.commit()


def _collect_sqlite(config: GatewayConfig, files: _Collector) -> tuple[int, list[int]]:
    """The SQLite spool (its online backup) and the files it names; the number of
    outbound messages, and the key-encryption key versions its data keys are wrapped
    under.  A spool database that is missing, damaged or unreadable is a
    :class:`BackupError` naming it and the fix (as the spool's own reads say it)."""
    live = config.storage.spool_path
    try:
        return _copy_sqlite(config, files, live)
    except sqlite3.ProgrammingError:
        raise  # a bug in medgw (a closed connection, a wrong statement): not the file's
    except sqlite3.Error as exc:
        raise _spool_unreadable(config, live, exc) from exc


def _spool_unreadable(config: GatewayConfig, live: Path, exc: sqlite3.Error) -> BackupError:
    """``exc``, raised while the SQLite spool database ``live`` was read (or its copy,
    which holds what the live file held), for the operator."""
    if not live.exists():
        return BackupError(
            f"cannot back up the spool: the spool database {live} does not exist; nothing "
            "was written",
            fix=f"check [storage] state_dir in {config.source} (the spool is {live.name} in "
            "it); a gateway never started has no spool to back up, and one whose spool was "
            "lost is restored from its last backup (medgw restore --from BUNDLE --force; see "
            "Backups in the admin guide)",
        )
    error = database_error(live, exc, "read")
    return BackupError(
        f"cannot back up the spool: {error.message}; nothing was written", fix=error.fix
    )


def _copy_sqlite(config: GatewayConfig, files: _Collector, live: Path) -> tuple[int, list[int]]:
    """:func:`_collect_sqlite`'s work; sqlite3 errors left to it."""
    snapshot_path = files.root / "state" / live.name
    snapshot_path.parent.mkdir(parents=True)
    source = sqlite3.connect(f"file:{live}?mode=ro", uri=True)
    snapshot = sqlite3.connect(snapshot_path)
    try:
        source.backup(snapshot)  # SQLite's online backup: one consistent state
        source.close()
        refreshed: set[tuple[str, str]] = set()
        for table, key, path_text, _needed, again in list(_spooled_files(snapshot)):
            name = _place(path_text, config)
            if name is None or path_text is None or files.copy(Path(path_text), name):
                continue
            if again:  # moved on since the copy: take its row as it is now
                _refresh(snapshot, live, table, key)
                refreshed.add((table, key))
        for table, key, path_text, needed, _again in list(_spooled_files(snapshot)):
            name = _place(path_text, config)
            if (table, key) in refreshed and not needed and name is not None and path_text:
                # A file the row took since (a receipt settled again): as the PostgreSQL
                # spool's backup does, copied if still there.
                if name not in files.files:
                    files.copy(Path(path_text), name)
                continue
            missing = needed and name is not None and name not in files.files
            if missing and (path_text is None or not files.copy(Path(path_text), name or "")):
                raise _gone(path_text, key)
        messages = int(snapshot.execute("SELECT COUNT(*) FROM outbound").fetchone()[0])
        versions = _key_versions(snapshot)
    finally:
        source.close()  # closed already, unless the copy failed
        snapshot.close()
    files.files[f"state/{live.name}"] = _sha256(snapshot_path)
    return messages, versions


def _gone(path_text: str | None, key: str) -> BackupError:
    return BackupError(
        f"{path_text}, which the spool needs to send message {key}, is gone",
        fix="run medgw backup again; if it happens again, see medgw queue show",
    )


def _unreachable(config: GatewayConfig, path_text: str, key: str) -> BackupError:
    """A file the spool needs that this node cannot copy: gone, or in another node's own
    state folder (the nodes share bodies only through ``[cluster] bodies_dir``)."""
    if config.cluster.bodies_dir is not None:
        return _gone(path_text, key)
    return BackupError(
        f"{path_text}, which the spool needs to send message {key}, is not in this node's "
        "state folder: it is gone, or kept in another node's own state folder, which a "
        "backup taken on this node cannot read",
        fix="set [cluster] bodies_dir, the folder the nodes share, on every node (see "
        "README, Running several nodes); then run medgw backup again",
    )


def _collect_postgres(
    config: GatewayConfig, settings: PostgresSettings, files: _Collector
) -> tuple[int, list[int]]:
    """The spool's tables, dumped by pg_dump (one snapshot), and the files that snapshot
    names; the number of outbound messages, and the key-encryption key versions the
    data keys of the snapshot and of the rows taken again are wrapped under.

    A file the snapshot names that is gone by the time it is copied belongs to a message
    that moved on (sent, delivered, its receipt removed by retention): if it was needed,
    or is a receipt file of this node's, its row as it is now is taken from the live
    database into :data:`REFRESHED` (restore puts it in place of the dump's), and the
    files that row needs are copied, as the SQLite spool's row is taken again."""
    assert config.backup is not None
    pg_dump = pgspool.tool("pg_dump", config.backup.pg_bin_dir)
    dump = files.root / DUMP
    dump.parent.mkdir(parents=True)
    with pgspool.snapshot(settings, pg_dump, dump) as conn:
        cursor = conn.cursor(row_factory=tuple_row)
        named = list(_spooled_files(cursor))
        counted = cursor.execute("SELECT count(*) FROM outbound").fetchone()
        messages = int(counted[0]) if counted else 0
        versions = set(_key_versions(cursor))
    files.files[DUMP] = _sha256(dump)
    refreshed: dict[tuple[str, str], dict[str, Any]] = {}
    for table, key, path_text, needed, again in named:
        name = _place(path_text, config)
        if path_text is None or (name is not None and files.copy(Path(path_text), name)):
            continue
        if name is None and not needed:  # another node's receipt file: no row brings it
            continue
        if again and (table, key) not in refreshed:
            peer, _, message_id = key.rpartition("\0")
            where = {"message_id": message_id}
            if table != "outbound":
                where = {"peer": peer, "message_id": message_id}
            keys = [("data_keys", {"item": item}) for item in row_keys(table, message_id)]
            row, *found = pgspool.live_rows(settings, [(table, where), *keys])
            refreshed[(table, key)] = {"table": table, "key": where, "row": pgspool.to_json(row)}
            for (_, item), kept in zip(keys, found, strict=True):
                if kept is not None:
                    versions.add(int(kept["kek"]))
                refreshed[("data_keys", item["item"])] = {
                    "table": "data_keys",
                    "key": item,
                    "row": pgspool.to_json(kept),
                }
            if row is None:
                continue
            wanted = _OUTBOUND_FILES if table == "outbound" else _HANDOVER_FILES
            rows = _outbound_files if table == "outbound" else _handover_files
            for _table, _key, now, need, _again in rows(tuple(row[c] for c in wanted)):
                place = _place(now, config)
                if now is None or place in files.files:
                    continue
                copied = place is not None and files.copy(Path(now), place)
                if need and not copied:
                    raise _unreachable(config, now, key)
    if refreshed:
        target = files.root / REFRESHED
        target.write_text(json.dumps(list(refreshed.values())))
        files.files[REFRESHED] = _sha256(target)
    return messages, sorted(versions)


def _key_versions(db: Any) -> list[int]:
    """The key-encryption key versions the data keys of a spool copy (``db``: an SQLite
    connection, or a cursor of PostgreSQL's giving tuples) are wrapped under."""
    return sorted(int(row[0]) for row in db.execute("SELECT DISTINCT kek FROM data_keys"))


def _check_key_versions(config: GatewayConfig, versions: Sequence[int]) -> None:
    """Every key-encryption key the bundle's data keys are wrapped under is the newest in
    the key folder.  One destroyed, or a newer one beside it, means a purge's rotation
    (of another node, or one left unfinished) ran or is running: it destroys the key the
    bundle needs, and the bundle could never be restored (restore would refuse it).  An
    older key beside the newest one, which the bundle does not need, is no matter."""
    if config.at_rest is None or not versions:
        return
    key_dir = config.at_rest.key_dir
    present = KeyStore(key_dir).versions()
    if not present:
        raise BackupError(
            f"the key folder {key_dir} ([at_rest] key_dir) holds no key-encryption key, "
            "but the spool keeps items encrypted at rest: the bundle could never be "
            "restored; nothing was written",
            fix=f"put back the key folder kept with this gateway's keys at {key_dir}, then "
            "back up again",
        )
    if any(v != present[-1] for v in versions):
        needed = ", ".join(kek_name(v) for v in versions)
        raise BackupError(
            f"a key rotation was under way while this backup was being taken (a purge or "
            f"retention sweep, here or on another node, or one a medgw killed during a "
            f"purge left unfinished): what the bundle keeps encrypted is wrapped under "
            f"{needed}, and {key_dir} ([at_rest] key_dir) holds "
            f"{', '.join(kek_name(v) for v in present)}, so the bundle could not be restored "
            "once the rotation ends; nothing was written",
            fix="run medgw backup again once the purge has finished; if none is running, "
            "start (or restart) a medgw of this spool: its start finishes a rotation left "
            "unfinished. Then copy the key folder, as README's Backups says",
        )


def collect(config: GatewayConfig, work: Path) -> dict[str, Any]:
    """Put everything the bundle holds into ``work``; returns the manifest."""
    files = _Collector(work)
    settings = config.spool.postgres
    if settings is None:
        messages, versions = _collect_sqlite(config, files)
    else:
        try:
            messages, versions = _collect_postgres(config, settings, files)
        except pgspool.ToolError as exc:
            raise BackupError(exc.message, fix=exc.fix) from exc
        except psycopg.Error as exc:
            raise BackupError(
                pgspool.database_error(settings, exc),
                fix="check that the database answers ([spool] settings), then back up again",
            ) from exc
    files.copy(config.source, "config/gateway.toml")
    peers_dir = _peers_dir(config)
    for peer_file in sorted(peers_dir.glob("*.toml")):
        files.copy(peer_file, f"config/peers.d/{peer_file.name}")
    for audit_file in trail_files(config.storage.audit_log):
        upto = None
        if audit_file == config.storage.audit_log:
            upto = _complete_records(audit_file)
        files.copy(audit_file, f"audit/{audit_file.name}", upto=upto)
    # The writer's notes for reviews, after the files: a note is durable before its record,
    # so every step back among the records copied is in it (a note of a record written
    # since is of no file copied).  Without it the restored trail is read whole: slower.
    notes = order_path(config.storage.audit_log)
    with contextlib.suppress(FileNotFoundError):
        files.copy(notes, f"audit/{notes.name}", upto=_complete_records(notes))
    bodies = config.cluster.bodies_dir
    return {
        "format": FORMAT,
        "as2_id": config.as2_id,
        "node": config.cluster.node_name,
        "spool": "sqlite" if settings is None else "postgresql",
        "state_dir": str(config.storage.state_dir),
        "inbox_dir": str(config.storage.inbox_dir),
        "outbox_dir": str(config.storage.outbox_dir),
        "bodies_dir": str(bodies) if bodies is not None else None,
        "audit_log": config.storage.audit_log.name,
        "outbound_messages": messages,
        "key_versions": versions,
        "files": files.files,
    }


def _refuse_own_folder(config: GatewayConfig, dst: Path) -> None:
    """The bundle is written by a rename that replaces what is there: never into the
    folders of the state, the inbox, the audit trail, the configuration or the
    key-encryption keys (a typo would lose the spool, the trail or the key that opens
    what is kept encrypted at rest; a bundle there would be in the next one)."""
    target = dst.expanduser().resolve()
    storage = config.storage
    folders = [
        storage.state_dir,
        storage.inbox_dir,
        storage.audit_log.parent,
        config.source.parent,
        _peers_dir(config),
    ]
    if config.cluster.bodies_dir is not None:
        folders.append(config.cluster.bodies_dir)
    if config.at_rest is not None:
        folders.append(config.at_rest.key_dir)
    for folder in folders:
        if target.is_relative_to(folder.expanduser().resolve()):
            raise BackupError(
                f"--to {dst} is inside {folder}, a folder of this gateway's state, inbox, "
                "audit trail, configuration or keys: the bundle could replace a file medgw "
                "keeps",
                fix="write the backup to a folder of its own, e.g. /var/backups/medgw/",
            )


def write_bundle(
    config: GatewayConfig, dst: Path, now: datetime, vault: Vault | None = None
) -> Written:
    """Write the sealed bundle of ``config``'s gateway to ``dst`` (atomically, durably);
    ``vault``: the running daemon's, whose purges and sweeps do not run while it collects."""
    if config.backup is None:
        raise BackupError(
            "no [backup] section: there is no one to encrypt the bundle to",
            fix='add [backup] with recipient = "/etc/medgw/backup/recipient.crt" and its '
            "signing_certificate and signing_key to gateway.toml (see README, Backups)",
        )
    _refuse_own_folder(config, dst)
    state = config.storage.state_dir
    work = state / f"{WORK_PREFIX}{os.getpid()}-{now.strftime('%Y%m%dT%H%M%S%f')}"
    private_folder(work)
    entity = work.with_name(work.name + ".entity")
    sealed_here = partial_name(dst)  # renamed to dst once its keys are checked again
    try:
        with vault.collecting() if vault is not None else contextlib.nullcontext():
            sealed = _seal(config, work, entity, sealed_here, now)
            # Checked again: another node's rotation may have begun while it was sealed.
            _check_key_versions(config, sealed.manifest["key_versions"])
        os.replace(sealed_here, dst)
        fsync_dir(dst.parent)
    except OSError as exc:
        raise BackupError(
            f"cannot write the backup {dst}: {exc.strerror or exc}",
            fix="check that the medgw user may write there and the disk is not full",
        ) from exc
    finally:
        shutil.rmtree(work, ignore_errors=True)
        work.with_name(work.name + ".tar").unlink(missing_ok=True)
        entity.unlink(missing_ok=True)
        sealed_here.unlink(missing_ok=True)
    manifest = sealed.manifest
    return Written(
        dst,
        sealed.size,
        len(manifest["files"]),
        manifest["outbound_messages"],
        tuple(manifest["key_versions"]),
    )


class _Sealed(NamedTuple):
    manifest: dict[str, Any]
    size: int


def _seal(config: GatewayConfig, work: Path, entity: Path, dst: Path, now: datetime) -> _Sealed:
    """Collect the bundle's files into ``work``, check their keys, and seal them (through
    ``entity``, a MIME entity of their tar archive) into ``dst``."""
    assert config.backup is not None
    manifest = collect(config, work)
    _check_key_versions(config, manifest["key_versions"])
    manifest["created_at"] = now.isoformat()
    (work / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True))
    archive = work.with_name(work.name + ".tar")
    with archive.open("wb") as handle:
        os.fchmod(handle.fileno(), 0o600)
        with tarfile.open(fileobj=handle, mode="w|", format=tarfile.PAX_FORMAT) as tar:
            tar.add(work / MANIFEST, arcname=MANIFEST)
            for name in sorted(manifest["files"]):
                tar.add(work / name, arcname=name)
    shutil.rmtree(work, ignore_errors=True)  # its files are in the archive now
    with entity.open("wb") as handle, archive.open("rb") as tar_file:
        os.fchmod(handle.fileno(), 0o600)
        handle.write(ENTITY_HEAD)
        while chunk := tar_file.read(_LINE * 1024):
            for start in range(0, len(chunk), _LINE):
                handle.write(base64.b64encode(chunk[start : start + _LINE]) + b"\r\n")
    signing = config.backup.signing  # backups' own key, never the AS2 one
    sealed = sign_and_envelope_file(
        entity,
        dst,
        signer_cert=signing.certificate,
        signer_key=signing.key,
        recipients=[config.backup.recipient],
        digest=config.smime.digest,
        cipher=config.backup.cipher,
        signing_time=now,
        policy=AlgorithmPolicy(),
        durable=True,
    )
    return _Sealed(manifest, sealed.size)


def remove_leftovers(state: Path, prefixes: tuple[str, ...] = (WORK_PREFIX,)) -> int:
    """Remove what a backup (or, given its prefix, a restore) killed half-way left in the
    state folder ``state``: its work folder, archive and entity, documents and the audit
    trail unencrypted; returns how many.  Call only where none can be running: with the
    state folder's lock held, before the daemon serves."""
    try:
        names = [n for n in os.listdir(state) if n.startswith(prefixes)]
    except FileNotFoundError:
        return 0
    for name in names:
        path = state / name
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink(missing_ok=True)
    return len(names)


_PARTS = ("state", "inbox", "bodies", "audit", "config")  # the folders a bundle's files are in
MAX_MANIFEST_BYTES = 256 << 20  # a name and a digest per file: millions of files


def _check_name(src: Path, name: object, where: str = "the manifest names") -> None:
    """A file name of the manifest (or the archive) stays inside its folder of the bundle:
    relative, in one of :data:`_PARTS`, without an empty, ``.`` or ``..`` part (restore
    joins it to this host's folders, where ``//`` or ``..`` would lead anywhere)."""
    parts = name.split("/") if isinstance(name, str) else []
    if len(parts) < 2 or parts[0] not in _PARTS or any(p in ("", ".", "..") for p in parts):
        raise RestoreRefused(
            f"{src}: {where} {name!r}, which is not a file inside one of the bundle's "
            f"folders ({', '.join(_PARTS)}); nothing was restored",
            reason="unsafe-name",
            fix="restore a bundle written by medgw backup",
        )


def _not_a_backup(src: Path, why: str) -> RestoreRefused:
    return RestoreRefused(
        f"{src} is not a medgw backup: {why}; nothing was restored",
        reason="not-a-backup",
        fix="give a bundle written by medgw backup",
    )


def _decrypt_and_verify(
    src: Path,
    entity: Path,
    *,
    cert: x509.Certificate,
    key: PrivateKey,
    signers: list[x509.Certificate],
) -> None:
    try:
        open_and_verify_file(
            src, entity, cert=cert, key=key, trusted_signers=signers, policy=AlgorithmPolicy()
        )
    except OSError as exc:
        raise RestoreRefused(
            f"cannot read the bundle {src}: {exc.strerror or exc}; nothing was restored",
            reason="bundle-unreadable",
            fix="give the path of the bundle medgw backup wrote, readable by this user",
        ) from exc
    except MedgwError as exc:
        reason = next((r for kind, r in _NOT_OPENED if isinstance(exc, kind)), "bundle-malformed")
        raise RestoreRefused(
            f"{src} cannot be opened: {exc.message}; nothing was restored",
            reason=reason,
            fix="give the backup recipient's certificate and key (--cert, --key), and a "
            "bundle signed by [backup] signing_certificate (or one of trusted_signers); a "
            "bundle that was changed after it was written is never restored",
        ) from exc


def _unpack(src: Path, entity: Path, archive: Path, work: Path) -> None:
    """The verified entity's tar archive, decoded, unpacked into ``work``."""
    with entity.open("rb") as handle, archive.open("wb") as tar_file:
        os.fchmod(tar_file.fileno(), 0o600)
        if handle.read(len(ENTITY_HEAD)) != ENTITY_HEAD:
            raise _not_a_backup(src, "the signed content is not a base64 tar archive")
        while lines := handle.readlines(1 << 20):
            try:
                tar_file.write(base64.b64decode(b"".join(lines), validate=False))
            except ValueError as exc:
                raise _not_a_backup(src, "the archive is not base64") from exc
    try:
        with tarfile.open(archive, mode="r:") as tar:
            for member in tar:  # medgw backup writes regular files only, under their names
                if member.name != MANIFEST:
                    _check_name(src, member.name, "the archive holds")
                if not member.isfile():
                    raise _not_a_backup(src, f"{member.name!r} in the archive is not a file")
            tar.extractall(work, filter="data")
    except (tarfile.TarError, OSError) as exc:
        raise _not_a_backup(src, f"the archive cannot be unpacked ({exc})") from exc


def _manifest(src: Path, work: Path) -> dict[str, Any]:
    """The unpacked bundle's manifest, its shape checked (bounded: it came with the bundle)."""
    try:
        with (work / MANIFEST).open("rb") as handle:
            manifest = json.loads(handle.read(MAX_MANIFEST_BYTES + 1))
    except (OSError, ValueError) as exc:
        raise RestoreRefused(
            f"{src} has no readable manifest ({MANIFEST}); nothing was restored",
            reason="manifest-unreadable",
            fix="give a bundle written by medgw backup",
        ) from exc
    if not isinstance(manifest, dict) or manifest.get("format") not in FORMATS:
        found = manifest.get("format") if isinstance(manifest, dict) else None
        raise RestoreRefused(
            f"{src} is a backup of format {found!r}, this medgw reads format {FORMAT}; "
            "nothing was restored",
            reason="format-version",
            fix="restore it with the medgw version that wrote it",
        )
    files = manifest.get("files")
    texts = ("state_dir", "inbox_dir", "audit_log")
    if (
        not isinstance(files, dict)
        or not all(isinstance(d, str) for d in files.values())
        or not all(isinstance(manifest.get(k), str) for k in texts)
        or not isinstance(manifest.get("outbox_dir", ""), str)
        or not isinstance(manifest.get("bodies_dir") or "", str)
        or manifest.get("spool", "sqlite") not in ("sqlite", "postgresql")
    ):
        raise RestoreRefused(
            f"{src}: the manifest lacks the files' digests or the places they came from "
            f"({', '.join(texts)}); nothing was restored",
            reason="manifest-unreadable",
            fix="give a bundle written by medgw backup",
        )
    return manifest


def open_bundle(
    src: Path,
    work: Path,
    *,
    cert: x509.Certificate,
    key: PrivateKey,
    signers: list[x509.Certificate],
) -> dict[str, Any]:
    """Decrypt ``src``, verify its signature (by one of ``signers``) and every file's
    SHA-256, and unpack it into ``work``; returns the manifest.  Every refusal is a
    :class:`RestoreRefused` naming its rule."""
    entity = work.with_name(work.name + ".entity")
    archive = work.with_name(work.name + ".tar")
    try:
        _decrypt_and_verify(src, entity, cert=cert, key=key, signers=signers)
        _unpack(src, entity, archive, work)
    finally:
        entity.unlink(missing_ok=True)
        archive.unlink(missing_ok=True)
    manifest = _manifest(src, work)
    for name, digest in manifest["files"].items():
        _check_name(src, name)
        path = work / name
        if path.is_symlink() or not path.is_file() or _sha256(path) != digest:
            raise RestoreRefused(
                f"{src}: {name} does not match its SHA-256 in the manifest; nothing was restored",
                reason="checksum",
                fix="the bundle was damaged: restore another one",
            )
    return dict(manifest)


def refused_backup_event(dst: Path, error: MedgwError, actor: str) -> AuditEvent:
    """``backup.refused``: the bundle that was not written (``dst``), why (the error the
    command said), its fix, and who asked."""
    return AuditEvent(
        EventType.BACKUP_REFUSED,
        Outcome.FAILURE,
        Severity.WARNING,
        reason=error.message,
        actor=actor,
        detail={"file": str(dst), "fix": error.fix},
    )


def created_event(written: Written, actor: str) -> AuditEvent:
    """``backup.created``: where, how big, how many files and messages, and who asked."""
    return AuditEvent(
        EventType.BACKUP_CREATED,
        severity=Severity.WARNING,  # data leaves the gateway's folders, encrypted
        actor=actor,
        detail=written.view(),
    )
