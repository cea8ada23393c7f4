"""Restoring a bundle onto a host: checked, then put where this host's configuration says.

The bundle is opened (decrypted with the backup recipient's key, signature and every
file's SHA-256 checked) before anything is written, and every file name its spool
holds must lead into this host's state folder or inbox (the outbox, for a document
still being taken in).  A state folder or audit trail that is not empty is refused
unless ``force``: a restore never mixes two histories by accident.  The spool's file
names are moved from the places of the host that wrote the bundle to this host's;
the configuration in the bundle is put beside the state
(``<state_dir>/restored-config/``) for the administrator to compare, never over this
host's.  No daemon may run meanwhile (the state folder's lock, held from the first
check to the last file).  A spool in PostgreSQL is restored only while no node uses its
database, with or without ``force``: no session of a node may be connected to it (checked
first, and again right before ``pg_restore``), and the restore holds the lock every
node's start takes, so that none starts meanwhile.  A node that runs but cannot reach
the database (so has no session) is not seen: the restore gives the spool a new
generation (gateway.spool.postgres.generation), and that node stops when it reaches
the database again.

Every refusal is a :class:`RestoreRefused` naming its rule, handed to the caller's
``refused`` (to audit it as ``backup.restore_refused``) before it is raised.  A trail
that holds nothing but such refusals (earlier attempts on this fresh host) does not
make the host "not empty": the restore keeps it, under a name of its own beside the
restored trail (:data:`REFUSALS_KEPT`), with the writer's notes for reviews that are its
(gateway.audit.order: never left to pair with the restored trail), and says so to
``restored``.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import sqlite3
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import psycopg
from cryptography import x509

from gateway.atrest.keys import KeyStore, kek_name, unwrap
from gateway.audit import AuditEvent, EventType, Outcome, Severity
from gateway.audit.export.cursor import MAX_LINE
from gateway.audit.files import STAMP, trail_files
from gateway.audit.order import order_path
from gateway.backup import pgspool
from gateway.backup.bundle import DUMP, REFRESHED, BackupError, RestoreRefused, open_bundle
from gateway.config import GatewayConfig
from gateway.errors import AtRestError
from gateway.fsutil import private_folder, shared_folder, storage_fix
from gateway.instance import LOCK_NAME, AlreadyRunningError, InstanceLock
from gateway.pki.keypair import PrivateKey
from gateway.spool.records import OutboundState
from gateway.spool.schema import create_or_upgrade
from gateway.textbounds import MAX_ITEMS

RESTORED_CONFIG = "restored-config"
WORK = ".restore"  # the unpacked bundle, inside the state folder, removed when done
CHECKED = "spool-check.sqlite3"  # a dump's rows, in WORK, for the checks of file names
REFUSALS_KEPT = "{stem}-refused-restores-{stamp}{suffix}"  # never a closed file's name
_PATH_COLUMNS = {
    "outbound": ("source_path", "payload_path", "body_path", "receipt_path"),
    "inbound": ("target_path", "work_path"),
    "handover": ("path",),
}
# Receipt files missing from a bundle named one by one, at most: as many as a list in an
# audit record holds (gateway.textbounds), so the record names the same ones as the output.
MAX_LISTED = MAX_ITEMS


@dataclass(frozen=True)
class MissingReceipts:
    """The receipt files the restored spool names as settled by this node into its own
    receipts folder, with their SHA-256 recorded, that neither the bundle holds nor this
    host has: their status will report each receipt altered (see :func:`_missing_receipts`)."""

    count: int
    first: tuple[tuple[str, str], ...]  # (message id, file), at most MAX_LISTED
    receipts_dir: Path

    @property
    def warning(self) -> str:
        return (
            f"{self.count} receipt file(s) that the restored spool names as settled by this "
            f"node into {self.receipts_dir} are not in the bundle (gone from the backed-up "
            "node before the backup, or kept on another host under this node's name): the "
            "status of each of these messages (local API, medgw send) will report its "
            "receipt altered, with an atrest.integrity_failed alert, because a receipt file "
            "whose SHA-256 the spool records cannot be told, once gone, from one removed "
            "outside medgw; restoring this bundle again does not bring them back"
        )

    @property
    def fix(self) -> str:
        return (
            f"copy each file, under the same name, into {self.receipts_dir} from the host "
            "or an older backup that still has it (the status then verifies it again); "
            "for one that no copy holds, accept its receipt as lost and record that "
            "decision, with its message's Message-ID, where this gateway's incidents are "
            "recorded: its alerts are then expected"
        )

    def detail(self) -> dict[str, Any]:
        """What the audit record and ``--json`` say of them."""
        return {
            "count": self.count,
            "first": [{"message_id": m, "file": f} for m, f in self.first],
            "warning": self.warning,
            "fix": self.fix,
        }


@dataclass(frozen=True)
class Restored:
    manifest: dict[str, Any]
    files: int
    kept_refusals: tuple[Path, ...] = ()  # this host's earlier refusals, kept aside
    # How pg_restore ended after its load had committed (failing, killed, interrupted):
    # the restore finished all the same.  None when it ended well (or no spool dump).
    load_ended: str | None = None
    missing_receipts: MissingReceipts | None = None  # None: none missing


def _refusals_only(audit_log: Path) -> list[Path]:
    """The files of a trail holding records, every one a refused restore (earlier
    attempts on this host); [] when the trail is empty or holds anything else."""
    files = [p for p in trail_files(audit_log) if p.stat().st_size]
    for path in files:
        with path.open("rb") as handle:
            while line := handle.readline(MAX_LINE):
                try:
                    record = json.loads(line)
                except ValueError:
                    return []
                if (
                    not isinstance(record, dict)
                    or record.get("event") != EventType.BACKUP_RESTORE_REFUSED
                ):
                    return []
    return files


def _occupied(config: GatewayConfig, refusals: list[Path]) -> list[str]:
    """What makes this host "not empty": the state folder's files, and the trail's files
    holding records other than earlier refusals.  The trail may be directly in the state
    folder: its files (closed ones, the writer's order notes) count only as the trail's."""
    state = config.storage.state_dir
    audit = config.storage.audit_log
    trail = {*trail_files(audit), order_path(audit)}
    found = []
    if state.exists():
        found += [
            str(p)
            for p in state.iterdir()
            if p.name not in (LOCK_NAME, WORK) and not audit.is_relative_to(p) and p not in trail
        ]
    found += [str(p) for p in _trail_held(audit, refusals)]
    return found


def _trail_held(audit: Path, refusals: list[Path]) -> list[Path]:
    """The files of this host's trail holding records other than earlier refusals."""
    return [p for p in trail_files(audit) if p.stat().st_size and p not in refusals]


def _moved(text: str | None, places: list[tuple[str, str]]) -> str | None:
    if not text:
        return text
    for old, new in places:
        if text == old or text.startswith(old.rstrip("/") + "/"):
            return new + text[len(old) :]
    return text


def _places(config: GatewayConfig, manifest: dict[str, Any]) -> list[tuple[str, str]]:
    """(the bundle's folder, this host's), the deepest first (one may be inside another)."""
    storage = config.storage
    places = [
        (manifest["state_dir"], str(storage.state_dir)),
        (manifest["inbox_dir"], str(storage.inbox_dir)),
    ]
    if manifest.get("outbox_dir"):  # bundles written before it was recorded lack it
        places.append((manifest["outbox_dir"], str(storage.outbox_dir)))
    if manifest.get("bodies_dir") and config.cluster.bodies_dir is not None:
        places.append((manifest["bodies_dir"], str(config.cluster.bodies_dir)))
    return sorted(places, key=lambda p: len(p[0]), reverse=True)


def _inside(text: str, folders: list[Path]) -> bool:
    path = Path(os.path.normpath(text))  # a ``..`` counts where it leads
    return path.is_absolute() and any(path.is_relative_to(f) for f in folders)


def _used_paths(db: sqlite3.Connection) -> Iterator[tuple[str, str, str, str]]:
    """(table, column, message id, file name) of every file the restored gateway would
    read, write or remove.  The outbox name of a message past intake is only a record of
    where it came from (never opened): not one of them."""
    for table, columns in _PATH_COLUMNS.items():
        present = {r[1] for r in db.execute(f"PRAGMA table_info({table})")}
        wanted = [c for c in columns if c in present]
        state = "state" if "state" in present else "NULL"
        query = f"SELECT message_id, {state}, {', '.join(wanted)} FROM {table}"  # noqa: S608
        for key, row_state, *values in db.execute(query):
            for column, value in zip(wanted, values, strict=True):
                if value and (column != "source_path" or row_state == "intake"):
                    yield table, column, str(key), str(value)


def _check_spool_paths(
    config: GatewayConfig, bundle: Path, spool: Path, places: list[tuple[str, str]]
) -> None:
    """Every file name of the bundle's spool, moved to this host's places, leads into the
    state folder or the inbox; a document still in intake may also name the outbox it
    is taken from."""
    storage = config.storage
    kept = [storage.state_dir, storage.inbox_dir]
    if config.cluster.bodies_dir is not None:
        kept.append(config.cluster.bodies_dir)
    folders = [Path(os.path.normpath(f.absolute())) for f in kept]
    with_outbox = [*folders, Path(os.path.normpath(storage.outbox_dir.absolute()))]
    with _bundle_spool(bundle, spool) as db:
        for table, column, key, value in _used_paths(db):
            moved = _moved(value, places) or value
            intake = column == "source_path"
            if _inside(moved, with_outbox if intake else folders):
                continue
            where = (
                "state folder, inbox, bodies_dir or outbox"
                if intake
                else "state folder, inbox or bodies_dir"
            )
            raise RestoreRefused(
                f"{bundle}: its spool names {value!r} ({table}.{column} of message {key}), "
                f"which leads to {moved!r}, outside this host's {where}; nothing was "
                "restored",
                reason="spool-path-outside",
                fix="restore a bundle written by medgw backup: it records no file outside "
                "these folders, so find out where this one came from",
            )


@contextlib.contextmanager
def _bundle_spool(bundle: Path, spool: Path) -> Iterator[sqlite3.Connection]:
    """The bundle's spool database, open for reading; any SQLite error while it is read
    refuses the restore as a damaged bundle."""
    try:
        db = sqlite3.connect(spool)
        try:
            yield db
        finally:
            db.close()
    except sqlite3.Error as exc:
        raise _damaged(bundle, f"its spool cannot be read ({exc})") from exc


def _damaged(bundle: Path, what: str) -> RestoreRefused:
    """The refusal of a bundle whose spool, or what it holds of it, is not what medgw
    backup writes: ``what`` is wrong with it."""
    return RestoreRefused(
        f"{bundle}: {what}; nothing was restored",
        reason="spool-unreadable",
        fix="the bundle was damaged: restore another one",
    )


def _check_keys(config: GatewayConfig, bundle: Path, spool: Path) -> None:
    """Every key-encryption key the bundle's data keys are wrapped under is in this
    host's ``[at_rest] key_dir`` (the bundle never carries them): else what the bundle
    keeps encrypted could not be read (a bundle taken before a purge's key rotation)."""
    if config.at_rest is None:
        return
    key_dir = config.at_rest.key_dir
    with _bundle_spool(bundle, spool) as db:
        tables = {r[0] for r in db.execute("SELECT name FROM sqlite_master")}
        # One data key per version: enough to tell this gateway's key from another's.
        samples = (
            {
                int(r[0]): (str(r[1]), bytes(r[2]))
                # (SQLite: the bare column is the MIN() row's)
                for r in db.execute("SELECT kek, MIN(item), wrapped FROM data_keys GROUP BY kek")
            }
            if "data_keys" in tables
            else {}
        )
    store = KeyStore(key_dir)
    if missing := store.missing(sorted(samples)):
        names = ", ".join(kek_name(v) for v in missing)
        raise RestoreRefused(
            f"{bundle}: what it keeps encrypted at rest is wrapped under the key-encryption "
            f"key version {', '.join(map(str, missing))} ({names}), which is not in {key_dir} "
            "([at_rest] key_dir): it was destroyed by a purge after this backup was taken, "
            "or the key folder was not copied to this host; nothing was restored",
            reason="key-missing",
            fix=f"copy the key folder kept with this gateway's keys to {key_dir} (it must hold "
            f"{names}), or restore a backup taken after the last purge",
        )
    for version, (item, wrapped) in samples.items():
        try:
            unwrap(store.load(version), wrapped, item)
        except AtRestError:
            path = key_dir / kek_name(version)
            raise RestoreRefused(
                f"{bundle}: what it keeps encrypted at rest does not open with the "
                f"key-encryption key version {version} in {key_dir} ([at_rest] key_dir): "
                f"{path} is another gateway's key (or not a private file of the medgw "
                "user), so nothing the bundle keeps encrypted could be read; nothing was "
                "restored",
                reason="key-mismatch",
                fix=f"copy the key folder kept with the backed-up gateway's keys to {key_dir} "
                f"(its {kek_name(version)}), or restore a bundle of the gateway whose key "
                "folder this is",
            ) from None


def _missing_receipts(
    config: GatewayConfig,
    bundle: Path,
    spool: Path,
    places: list[tuple[str, str]],
    moves: list[tuple[Path, Path]],
) -> MissingReceipts | None:
    """The receipt files the status of the restored spool will find gone and report
    altered: named by a delivered or failed message's row settled by this node (its
    ``audited_by``, ``[cluster] node_name``) into this host's receipts folder once
    moved there, its SHA-256 recorded, and neither in the bundle nor on this host.  A
    bundle lacks such a file when it was gone from the backed-up node while its row
    still named it (removed outside medgw: that node reports it altered too), or when
    this node's name settled it on another host (a node rebuilt from another node's
    bundle).  Nothing in the spool marks them (a mark in the spool could be set by
    anyone who can write it, and would hide a removal): the restore says so, once."""
    receipts = config.storage.receipts_dir
    placed = {dst for _src, dst in moves}
    with _bundle_spool(bundle, spool) as db:
        present = {r[1] for r in db.execute("PRAGMA table_info(outbound)")}
        if not {"receipt_sha256", "audited_by"} <= present:  # an older medgw's bundle
            return None
        rows = db.execute(
            "SELECT message_id, receipt_path FROM outbound"
            " WHERE receipt_path IS NOT NULL AND receipt_sha256 IS NOT NULL"
            " AND audited_by=? AND state IN (?, ?) ORDER BY message_id",
            (config.cluster.node_name, OutboundState.DELIVERED, OutboundState.FAILED),
        )
        count, first = 0, list[tuple[str, str]]()
        for message_id, text in rows:
            path = Path(_moved(str(text), places) or str(text))
            if path.parent != receipts or path in placed or path.exists():
                continue
            count += 1
            if len(first) < MAX_LISTED:
                first.append((str(message_id), str(path)))
    return MissingReceipts(count, tuple(first), receipts) if count else None


def _move_paths(spool: Path, places: list[tuple[str, str]]) -> None:
    db = sqlite3.connect(spool)
    try:
        for table, columns in _PATH_COLUMNS.items():
            present = {r[1] for r in db.execute(f"PRAGMA table_info({table})")}
            wanted = [c for c in columns if c in present]
            rows = db.execute(f"SELECT rowid, {', '.join(wanted)} FROM {table}").fetchall()  # noqa: S608
            for rowid, *values in rows:
                moved = [_moved(v, places) for v in values]
                if moved != values:
                    sets = ", ".join(f"{c}=?" for c in wanted)
                    db.execute(f"UPDATE {table} SET {sets} WHERE rowid=?", (*moved, rowid))  # noqa: S608
        db.commit()
    finally:
        db.close()


def _audit_name(name: str, old: str, new: str) -> str:
    """A trail file's name under this host's audit log name (closed files keep their stamp)."""
    old_path, new_path = Path(old), Path(new)
    if name == old:
        return new
    if name == order_path(old_path).name:
        return order_path(new_path).name
    if name.startswith(old_path.stem + "-") and name.endswith(old_path.suffix):
        stamp = name[len(old_path.stem) : len(name) - len(old_path.suffix)]
        return f"{new_path.stem}{stamp}{new_path.suffix}"
    return name


def _destinations(
    config: GatewayConfig, manifest: dict[str, Any], work: Path
) -> list[tuple[Path, Path]]:
    """Where each file of the unpacked bundle in ``work`` goes on this host."""
    state = config.storage.state_dir
    moves = []
    for name in manifest["files"]:
        part, _, rest = name.partition("/")
        if name in (DUMP, REFRESHED):  # into the database, not a folder
            continue
        if part == "state":
            spool = rest == config.storage.spool_path.name
            dst = config.storage.spool_path if spool else state / rest
        elif part == "inbox":
            dst = config.storage.inbox_dir / rest
        elif part == "bodies" and config.cluster.bodies_dir is not None:
            dst = config.cluster.bodies_dir / rest
        elif part == "audit":
            audit = config.storage.audit_log
            dst = audit.parent / _audit_name(rest, manifest["audit_log"], audit.name)
        elif part == "config":
            dst = state / RESTORED_CONFIG / rest
        else:
            continue
        moves.append((work / name, dst))
    return moves


def _signers(config: GatewayConfig) -> list[x509.Certificate]:
    """Whose signature on a bundle is accepted: ``[backup]``'s signing certificate and its
    earlier ones, exactly (pinned); never any other key of this gateway."""
    if config.backup is None:
        raise RestoreRefused(
            f"{config.source} has no [backup] section, which names the certificate whose "
            "signature a bundle must carry; nothing was restored",
            reason="not-configured",
            fix="put this gateway's [backup] section (recipient, signing_certificate, "
            "signing_key) and its files in place first (see README, Backups)",
        )
    return config.backup.restore_signers


def _refused_here(config: GatewayConfig, occupied: list[str]) -> RestoreRefused:
    shown = ", ".join(occupied[:3]) + (" ..." if len(occupied) > 3 else "")
    where = "state folder or audit trail"
    if config.spool.postgres is not None:
        where = "state folder, audit trail or spool database"
    return RestoreRefused(
        f"the {where} of {config.source} is not empty ({shown}): a "
        "restore would mix two histories; nothing was restored",
        reason="not-empty",
        fix="restore onto a fresh host (empty [storage] state_dir and audit log, and for a "
        "spool in PostgreSQL an empty database), or add --force to replace what is there",
    )


def _database(config: GatewayConfig, exc: psycopg.Error) -> RestoreRefused:
    assert config.spool.postgres is not None
    return RestoreRefused(
        pgspool.database_error(config.spool.postgres, exc) + "; nothing was restored",
        reason="database-unreachable",
        fix="check that the database answers and the [spool] settings, then restore again",
    )


@contextlib.contextmanager
def _spool_held(config: GatewayConfig) -> Iterator[Callable[[], None]]:
    """While it lasts, no node starts on this host's spool database (none to hold: the
    spool is in SQLite); yields the check that no node uses it, made once at once."""
    settings = config.spool.postgres
    if settings is None:
        yield lambda: None
        return
    with contextlib.ExitStack() as stack:
        try:
            conn = stack.enter_context(pgspool.held(settings))
        except psycopg.Error as exc:
            raise _database(config, exc) from exc

        def unused() -> None:
            try:
                nodes = pgspool.nodes_connected(conn)
            except psycopg.Error as exc:
                raise _database(config, exc) from exc
            if nodes:
                raise _in_use(config, nodes)

        unused()
        yield unused


def _in_use(config: GatewayConfig, nodes: list[str]) -> RestoreRefused:
    assert config.spool.postgres is not None
    shown = ", ".join(nodes[:3]) + (" ..." if len(nodes) > 3 else "")
    return RestoreRefused(
        f"the spool {config.spool.postgres.where} is in use by {shown}: a restore would "
        "replace the spool under a running node and lose what it writes, with or without "
        "--force; nothing was restored",
        reason="database-in-use",
        fix="stop every node that uses this database (systemctl stop medgw on each host, "
        "and any medgw command still running on it), then restore again",
    )


def _spool_rows(config: GatewayConfig) -> list[str]:
    """The spool database's tables that hold rows (none: the spool is in SQLite)."""
    settings = config.spool.postgres
    if settings is None:
        return []
    try:
        return [f"{settings.where}: {t}" for t in pgspool.rows_in(settings)]
    except psycopg.Error as exc:
        raise _database(config, exc) from exc


def _tool(config: GatewayConfig, name: str) -> str:
    assert config.backup is not None
    try:
        return pgspool.tool(name, config.backup.pg_bin_dir)
    except pgspool.ToolError as exc:
        raise RestoreRefused(
            exc.message + "; nothing was restored", reason="tool-missing", fix=exc.fix or ""
        ) from exc


def _check_spool_kind(config: GatewayConfig, bundle: Path, manifest: dict[str, Any]) -> None:
    """The bundle's spool goes where this host keeps its spool: a dump into PostgreSQL,
    an SQLite file into the state folder; its bodies into this host's bodies_dir."""
    kind = manifest.get("spool", "sqlite")
    here = "sqlite" if config.spool.postgres is None else "postgresql"
    if kind != here:
        raise RestoreRefused(
            f"{bundle} holds a spool of {kind}, and this host's [spool] keeps it in {here}: "
            "nothing was restored",
            reason="spool-backend",
            fix=f"restore it onto a host configured as the one that wrote it ([spool] "
            f'backend = "{kind}")',
        )
    bodies = any(name.startswith("bodies/") for name in manifest["files"])
    if bodies and config.cluster.bodies_dir is None:
        raise RestoreRefused(
            f"{bundle} holds the bodies of queued messages kept in [cluster] bodies_dir "
            f"({manifest.get('bodies_dir')}), which {config.source} does not set; nothing "
            "was restored",
            reason="no-bodies-dir",
            fix="set [cluster] bodies_dir (the folder the nodes share) in gateway.toml, "
            "then restore again",
        )


def _refreshed(bundle: Path, work: Path, manifest: dict[str, Any]) -> list[dict[str, Any]]:
    """The rows the backup took again from the live database after its dump."""
    if REFRESHED not in manifest["files"]:
        return []
    try:
        items = json.loads((work / REFRESHED).read_text())
        if not isinstance(items, list) or not all(
            isinstance(i, dict)
            and i.get("table") in pgspool.KEYS
            and isinstance(i.get("key"), dict)
            and isinstance(i.get("row"), dict | None)
            for i in items
        ):
            raise ValueError("not a list of rows")
    except (OSError, ValueError) as exc:
        raise _damaged(bundle, f"its {REFRESHED} cannot be read ({exc})") from exc
    return list(items)


def _dump_copy(
    config: GatewayConfig, bundle: Path, work: Path, refreshed: list[dict[str, Any]]
) -> Path:
    """The dump's rows (and the rows taken again after it) in an SQLite spool in
    ``work``, for the checks an SQLite spool of a bundle gets."""
    pg_restore = _tool(config, "pg_restore")
    path = work / CHECKED
    try:
        db = sqlite3.connect(path)
        try:
            create_or_upgrade(db)
            pgspool.read_into(pg_restore, work / DUMP, db)
            for item in refreshed:
                table, key, row = item["table"], item["key"], item["row"]
                present = {r[1] for r in db.execute(f"PRAGMA table_info({table})")}
                if not {*key, *(row or {})} <= present:
                    raise ValueError(f"a row of {table} with columns no spool has")
                where = " AND ".join(f"{c}=?" for c in key)
                db.execute(f"DELETE FROM {table} WHERE {where}", tuple(key.values()))  # noqa: S608
                if row is not None:
                    values = pgspool.from_json(row)
                    marks = ", ".join("?" * len(values))
                    columns = ", ".join(values)
                    db.execute(
                        f"INSERT INTO {table} ({columns}) VALUES ({marks})",  # noqa: S608
                        tuple(values.values()),
                    )
            db.commit()
        finally:
            db.close()
    except pgspool.ToolError as exc:
        raise RestoreRefused(
            f"{bundle}: {exc.message}; nothing was restored",
            reason="spool-unreadable",
            fix=exc.fix or "",
        ) from exc
    except (sqlite3.Error, ValueError, KeyError, TypeError, UnicodeDecodeError) as exc:
        raise _damaged(bundle, f"its spool's dump is not a medgw spool ({exc})") from exc
    return path


def _keep_refusals(refusals: list[Path], audit: Path, at: datetime) -> tuple[Path, ...]:
    """Move the trail of earlier refusals aside, under a name that is no file of the trail;
    the notes among ``refusals`` (``audit``'s) go with its current file, under its name."""
    kept = []
    stamp = at.astimezone(UTC).strftime(STAMP)

    def aside(path: Path) -> Path:
        return path.with_name(REFUSALS_KEPT.format(stem=path.stem, stamp=stamp, suffix=path.suffix))

    for path in refusals:
        target = order_path(aside(audit)) if path == order_path(audit) else aside(path)
        path.rename(target)
        kept.append(target)
    return tuple(kept)


def _restore_locked(
    config: GatewayConfig,
    bundle: Path,
    recipient: Callable[[], tuple[x509.Certificate, PrivateKey]],
    *,
    force: bool,
    now: datetime,
) -> Restored:
    """Check everything, then put the bundle in place, while no node starts on the spool
    database."""
    with _spool_held(config) as unused:
        return _restore_held(config, bundle, recipient, unused, force=force, now=now)


def _restore_held(
    config: GatewayConfig,
    bundle: Path,
    recipient: Callable[[], tuple[x509.Certificate, PrivateKey]],
    unused: Callable[[], None],
    *,
    force: bool,
    now: datetime,
) -> Restored:
    try:
        refusals = _refusals_only(config.storage.audit_log)
    except OSError as exc:
        raise RestoreRefused(
            f"cannot read this host's audit trail {config.storage.audit_log}: "
            f"{exc.strerror or exc}; nothing was restored",
            reason="trail-unreadable",
            fix="run it as the medgw user (sudo -u medgw medgw restore ...)",
        ) from exc
    occupied = _occupied(config, refusals)
    if not force:
        occupied += _spool_rows(config)
    if occupied and not force:
        raise _refused_here(config, occupied)
    state = config.storage.state_dir
    work = state / WORK
    shutil.rmtree(work, ignore_errors=True)
    private_folder(work)
    try:
        cert, key = recipient()
    except RestoreRefused:
        raise
    except BackupError as exc:
        raise RestoreRefused(exc.message, reason="recipient-unreadable", fix=exc.fix or "") from exc
    manifest = open_bundle(bundle, work, cert=cert, key=key, signers=_signers(config))
    _check_spool_kind(config, bundle, manifest)
    places = _places(config, manifest)
    spool = work / "state" / config.storage.spool_path.name
    refreshed = _refreshed(bundle, work, manifest)
    if DUMP in manifest["files"]:
        spool = _dump_copy(config, bundle, work, refreshed)
    if spool.exists():
        _check_spool_paths(config, bundle, spool, places)
        _check_keys(config, bundle, spool)
    moves = _destinations(config, manifest, work)
    missing = _missing_receipts(config, bundle, spool, places, moves) if spool.exists() else None
    # The notes of a trail that held nothing (or only refusals, moved aside) name no file
    # the host keeps: the bundle's replace them.
    audit = config.storage.audit_log
    spare = None if _trail_held(audit, refusals) else order_path(audit)
    taken = [
        str(dst) for _src, dst in moves if dst.exists() and dst not in refusals and dst != spare
    ]
    if taken and not force:
        raise RestoreRefused(
            f"{len(taken)} files of the bundle are there already ({', '.join(taken[:3])}"
            + (" ..." if len(taken) > 3 else "")
            + "): a restore never replaces them by accident (a received document in the "
            "inbox is never written twice); nothing was restored",
            reason="files-exist",
            fix="move them away, or add --force to replace them",
        )
    unused()  # again, before anything is written
    trail = len(refusals)
    if spare is not None and spare.exists():
        # They go with the refusals, whatever the bundle holds: the restored trail is never
        # paired with notes of another trail.
        refusals = [*refusals, spare]
    kept = _keep_refusals(refusals, audit, now)
    placed = _Placed()
    dst = config.storage.state_dir
    try:
        for src, dst in moves:
            if src.name == config.storage.spool_path.name and dst == config.storage.spool_path:
                _move_paths(src, places)
                for suffix in ("-wal", "-shm"):
                    dst.with_name(dst.name + suffix).unlink(missing_ok=True)
            placed.parents(dst)
            shutil.move(src, dst)  # the inbox or audit folder may be on another file system
            placed.files.append(dst)
    except OSError as exc:
        raise _undone(config, force, placed, refusals, kept, dst, exc) from exc
    ended = None
    if DUMP in manifest["files"]:
        try:
            unused()  # again, right before pg_restore replaces the tables
            ended = _load_database(config, bundle, work / DUMP, refreshed, places, force=force)
        except RestoreRefused as exc:
            if not force:  # a fresh host stays fresh: restore again once the cause is fixed
                _take_back(placed, refusals, kept)
                assert config.spool.postgres is not None
                if exc.reason != "database-in-use":  # the tables are a node's now
                    with contextlib.suppress(psycopg.Error):
                        pgspool.drop(config.spool.postgres)
            raise
    return Restored(manifest, len(manifest["files"]), kept[:trail], ended, missing)


def _undone(
    config: GatewayConfig,
    force: bool,
    placed: _Placed,
    refusals: list[Path],
    kept: tuple[Path, ...],
    dst: Path,
    exc: OSError,
) -> RestoreRefused:
    """A file could not be put in place: take back what was written (on a fresh host)."""
    if not force:  # with it, what was there is replaced already: nothing to go back to
        _take_back(placed, refusals, kept)
    return RestoreRefused(
        f"cannot write {dst}: {exc.strerror or exc}; {_outcome(force)}",
        reason="write-failed",
        fix=f"{storage_fix(exc, dst.parent)}, then restore again",
    )


def _take_back(placed: _Placed, refusals: list[Path], kept: tuple[Path, ...]) -> None:
    """A fresh host made fresh again: what the restore wrote removed, and the trail of
    earlier refusals (``refusals``, moved aside to ``kept``) put back."""
    placed.undo()
    for original, moved in zip(refusals, kept, strict=True):
        moved.rename(original)


def _outcome(force: bool) -> str:
    """What a restore that fails once it has begun to write leaves: taken back on a fresh
    host, incomplete with ``force`` (what was there is replaced already)."""
    if force:
        return "the restore is incomplete (--force replaced files already)"
    return "what it had written is removed again; nothing was restored"


def _load_database(
    config: GatewayConfig,
    bundle: Path,
    dump: Path,
    refreshed: list[dict[str, Any]],
    places: list[tuple[str, str]],
    *,
    force: bool,
) -> str | None:
    """The dump into this host's spool database (pg_restore, one transaction), then the
    rows taken again after it and the file names moved to this host's folders.  Returns
    how pg_restore ended after its load committed, if not well (the restore finished)."""
    settings = config.spool.postgres
    assert settings is not None
    pg_restore = _tool(config, "pg_restore")
    outcome = _outcome(force)
    loaded = False
    try:
        # A node that ran on the spool before stops when it reaches it again, unless the
        # dump was not loaded at all.  No node passes that check before the lock this
        # restore holds is released.
        ended = pgspool.replace_spool(settings, pg_restore, dump)
        loaded = True
        pgspool.rewrite(settings, refreshed, _PATH_COLUMNS, lambda v: _moved(v, places))
    except (pgspool.ToolError, psycopg.Error, ValueError) as exc:
        said = exc.message if isinstance(exc, pgspool.ToolError) else str(exc)
        if isinstance(exc, psycopg.Error):
            said = pgspool.database_error(settings, exc)
        raise RestoreRefused(
            f"{bundle}: the spool could not be put into the {settings.where}: {said}; " + outcome,
            reason="database-failed",
            fix="check that the database answers and that the [spool] user may create tables "
            "in it, then restore again",
        ) from exc
    except KeyboardInterrupt as exc:  # Ctrl-C: said, and a fresh host made fresh again
        step = (
            "after the spool was replaced, before its file names were moved to this host's folders"
            if loaded
            else "while pg_restore ran, its load not known to have committed"
        )
        if force and loaded:
            outcome = (
                "the spool is replaced but its file names are not moved to this host's "
                "folders, and --force replaced files already: the restore is incomplete"
            )
        raise RestoreRefused(
            f"{bundle}: the restore was interrupted (Ctrl-C) {step}; {outcome}",
            reason="interrupted",
            fix="restore again"
            + (" with --force (nodes must not start before it is done)" if force else ""),
        ) from exc
    return ended


@dataclass
class _Placed:
    """What a restore wrote so far (files, and the folders it made for them), to remove
    again if it cannot finish on a fresh host."""

    files: list[Path] = field(default_factory=list)
    folders: list[Path] = field(default_factory=list)

    def parents(self, dst: Path) -> None:
        missing = [p for p in reversed(dst.parents) if not p.exists()]
        for folder in missing:
            folder.mkdir(mode=0o700)
            self.folders.append(folder)

    def undo(self) -> None:
        for path in self.files:
            path.unlink(missing_ok=True)
        for folder in reversed(self.folders):
            with contextlib.suppress(OSError):
                folder.rmdir()


def restore(
    config: GatewayConfig,
    bundle: Path,
    *,
    recipient: Callable[[], tuple[x509.Certificate, PrivateKey]],
    now: datetime,
    force: bool = False,
    restored: Callable[[Restored], None] = lambda _done: None,
    refused: Callable[[RestoreRefused], None] = lambda _exc: None,
) -> Restored:
    """Restore ``bundle`` into the places of ``config``.  ``recipient`` gives the backup
    recipient's certificate and key (read once the state folder is locked: a failure to
    read them is a refusal like any other).  ``restored`` is called once the bundle is
    in place, ``refused`` with every refusal before it is raised; both while the state
    folder's lock is held (to audit), except for the refusal ``daemon-running`` (the
    running daemon holds the lock and the trail: record it through the daemon)."""
    state = config.storage.state_dir
    lock = InstanceLock(state)
    try:
        shared_folder(state)
        lock.acquire()  # no daemon runs on this state folder meanwhile
    except OSError as exc:
        refusal = RestoreRefused(
            f"cannot take the lock of the state folder {state}: {exc.strerror or exc}; "
            "nothing was restored",
            reason="state-unwritable",
            fix="run it as the medgw user (sudo -u medgw medgw restore ...); "
            + storage_fix(exc, state),
        )
        refused(refusal)
        raise refusal from exc
    except AlreadyRunningError as exc:
        refusal = RestoreRefused(
            f"{exc.message.split(';')[0]}: a restore would pull the state from under it; "
            "nothing was restored",
            reason="daemon-running",
            fix="stop it first (systemctl stop medgw), then restore onto its empty state "
            "folder, or restore onto a fresh host",
        )
        refused(refusal)
        raise refusal from exc
    work = state / WORK
    try:
        try:
            done = _restore_locked(config, bundle, recipient, force=force, now=now)
        except RestoreRefused as exc:
            refused(exc)
            raise
        restored(done)
    finally:
        shutil.rmtree(work, ignore_errors=True)
        lock.release()
    return done


def refused_event(
    bundle: Path, reason: str, message: str, actor: str, *, forced: bool
) -> AuditEvent:
    """``backup.restore_refused``: which bundle, the rule (``reason``), what was said, who."""
    return AuditEvent(
        EventType.BACKUP_RESTORE_REFUSED,
        Outcome.FAILURE,
        Severity.WARNING,
        reason=reason,
        actor=actor,
        detail={"file": str(bundle), "error": message, "forced": forced},
    )


def restored_event(bundle: Path, done: Restored, actor: str, *, forced: bool) -> AuditEvent:
    """``backup.restored``: which bundle, of when, from whom, how many files, who; where
    this host's earlier refused attempts were kept; and the receipt files the restored
    spool names that will be reported altered (see :class:`MissingReceipts`)."""
    manifest = done.manifest
    detail: dict[str, Any] = {
        "file": str(bundle),
        "created_at": manifest.get("created_at"),
        "from_as2_id": manifest.get("as2_id"),
        "files": done.files,
        "forced": forced,
    }
    if done.load_ended is not None:
        detail["pg_restore_after_commit"] = done.load_ended
    if done.kept_refusals:
        detail["refusals_kept_in"] = [str(p) for p in done.kept_refusals]
    if done.missing_receipts is not None:
        detail["receipt_files_not_in_bundle"] = done.missing_receipts.detail()
    return AuditEvent(
        EventType.BACKUP_RESTORED, severity=Severity.WARNING, actor=actor, detail=detail
    )
