"""Disposal of what the gateway keeps after a message is finished (DSP-1).

Two ways in, one path: the daemon's sweep applies the ``[retention]`` rules
every ``sweep_interval_seconds``; ``medgw purge --before DATE`` disposes of
everything finished before a date on an operator's request.  Both remove only
what nothing is owed on any more (the spool decides that, in the transaction
that disposes of it: see gateway.spool.sqlite.retention), a batch at a time,
and both are audited: one ``retention.disposed`` per batch naming each message,
and one ``retention.purged`` with the counts per kind.

A batch's rows are cleared first, in one transaction, and then the files of
exactly the rows cleared are removed: a status read in between finds the row as
it is now, without the file, never a row naming a file already gone (which it
reports as altered).  A process killed in between leaves files: a receipt file no
row names any more, removed by the receipts folder's sweep (at start, and while
running once an hour old: gateway.outbound.sweep); an inbox copy its hand-over
record says is still to be removed, removed at the start of the next sweep (the
daemon's first is at its start) or purge, before its record may go.  An inbox copy
is removed, either way, only if the file at its path is still the copy handed over
(the size and SHA-256 its hand-over record keeps): the inbox is shared, and another
file written there since under that name is not the gateway's.  Every file disposed
of is gone once a purge or sweep returns.
"""

from __future__ import annotations

import errno
import hashlib
import hmac
import os
import stat
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from gateway.atrest import Vault
from gateway.audit import AuditEvent, AuditSink, EventType, Outcome, Severity
from gateway.clock import Clock
from gateway.config.retention import AUDIT_GUIDELINE_DAYS, HOLDS, RetentionSettings
from gateway.errors import MedgwError
from gateway.fsutil import fsync_dir
from gateway.retention.audit_files import AuditFiles
from gateway.spool import Disposable, RetainedKind, Spool
from gateway.textbounds import MAX_ITEMS

# Kinds in the order they go: what a record holds before the record.
ORDER = (RetainedKind.RECEIVED, RetainedKind.RECEIPTS, RetainedKind.HANDOVER, RetainedKind.SPOOL)


AUDIT = "audit"  # closed audit files: not in the spool


class PurgeRefused(MedgwError):
    """A purge request that cannot be carried out as asked."""


@dataclass(frozen=True)
class PurgeRequest:
    before: datetime  # what finished before this time
    kinds: tuple[RetainedKind, ...] = ORDER  # with what they hold (see settings.HOLDS)
    peer: str | None = None
    service: str | None = None  # None: any service
    dry_run: bool = False
    audit_files: bool = False  # also closed audit files (see gateway.retention.audit_files)

    def closure(self) -> tuple[RetainedKind, ...]:
        """The kinds asked for and what they hold, in the order they go."""
        wanted = set(self.kinds)
        for kind in self.kinds:
            wanted.update(HOLDS[kind])
        return tuple(k for k in ORDER if k in wanted)


def parse_before(text: str, now: datetime) -> datetime:
    """``--before``: an ISO 8601 date (midnight UTC) or time with its offset, not later
    than now."""
    try:
        when = datetime.fromisoformat(text)
    except ValueError:
        raise PurgeRefused(
            f"--before {text!r} is not an ISO 8601 date or time",
            fix="write it as 2026-04-01 (midnight UTC) or 2026-04-01T00:00:00+09:00",
        ) from None
    if when.tzinfo is None:
        if len(text) > 10:
            raise PurgeRefused(
                f"--before {text!r} has no UTC offset",
                fix="add the offset, for example 2026-04-01T00:00:00+09:00",
            )
        when = when.replace(tzinfo=now.tzinfo)
    if when > now:
        raise PurgeRefused(
            f"--before {text!r} is in the future",
            fix="give a date in the past: only what finished before it is disposed of",
        )
    return when


def purge_request(
    body: Mapping[str, Any], now: datetime, audit_days: int | None = None
) -> PurgeRequest:
    """A purge as the control socket receives it: ``before`` (required), ``kinds``,
    ``peer``, ``service``, ``dry_run``.  ``audit_days``: ``[retention] audit_days`` in
    force (None: not set).

    Closed audit files go only when asked for by name (``kinds`` holding ``audit``), and
    only those older than the time they are kept (see :func:`_audit_files_kept`): the
    trail is the evidence of who did what, and a purge of "everything finished before"
    a recent date must not take it with the messages."""
    peer, service = body.get("peer"), body.get("service")
    kinds_text = body.get("kinds") or [k.value for k in ORDER]
    names = ", ".join([*(k.value for k in ORDER), AUDIT])
    if not isinstance(kinds_text, list):
        raise PurgeRefused("kinds must be a list", fix=f"name kinds of: {names}")
    kinds = []
    for text in kinds_text:
        if text == AUDIT:
            continue
        try:
            kinds.append(RetainedKind(str(text)))
        except ValueError:
            raise PurgeRefused(
                f"unknown kind {str(text)[:64]!r}", fix=f"use one of: {names}"
            ) from None
    before = parse_before(str(body.get("before") or ""), now)
    if AUDIT in kinds_text:
        _audit_files_kept(before, now, audit_days)
    return PurgeRequest(
        before=before,
        kinds=tuple(kinds),
        peer=str(peer) if peer else None,
        service=str(service) if service else None,
        dry_run=bool(body.get("dry_run")),
        audit_files=AUDIT in kinds_text,
    )


def _audit_files_kept(before: datetime, now: datetime, audit_days: int | None) -> None:
    """Refuse a purge of audit files closed after the time they are kept: ``audit_days``
    if set, else the 5 years medical records are kept (the trail of who accessed a record
    does not go before the record)."""
    days = audit_days if audit_days is not None else AUDIT_GUIDELINE_DAYS
    latest = now - timedelta(days=days)
    if before <= latest:
        return
    kept = (
        f"[retention] audit_days keeps audit files {days} days"
        if audit_days is not None
        else f"audit files are kept at least {days} days (5 years, as medical records are; "
        "[retention] audit_days is not set)"
    )
    raise PurgeRefused(
        f"--before {before.isoformat()} would dispose of audit files closed less than "
        f"{days} days ago: {kept}; nothing was disposed of",
        fix=f"for --kind audit give a --before of {latest.date().isoformat()} or earlier; "
        "purge the other kinds without --kind audit",
    )


class Retention:
    """Disposes of kept things in ``spool``, audited to ``audit``."""

    def __init__(
        self,
        spool: Spool,
        audit: AuditSink,
        clock: Clock,
        audit_files: AuditFiles | None = None,
        vault: Vault | None = None,
    ) -> None:
        self._spool = spool
        self._audit = audit
        self._clock = clock
        self._audit_files = audit_files  # None: closed audit files are not disposed of here
        self._vault = vault  # encryption at rest: its key rotated after each disposal
        self._alerted: set[Path] = set()  # files not removed, alerted once each

    def purge(self, request: PurgeRequest, actor: str) -> dict[str, int]:
        """An operator's purge: counts per kind (of what would go, for a dry run).
        Refused while a backup collects (its key rotation would leave that backup
        impossible to restore)."""
        if request.dry_run or self._vault is None:
            return self._purge(request, actor)
        with self._vault.disposing() as free:
            if not free:
                raise PurgeRefused(
                    "medgw backup is collecting a bundle now: this purge would rotate the "
                    "key-encryption key and leave that backup impossible to restore; nothing "
                    "was disposed of",
                    fix="run medgw purge again once medgw backup has finished",
                )
            return self._purge(request, actor)

    def _purge(self, request: PurgeRequest, actor: str) -> dict[str, int]:
        if request.audit_files and (self._audit_files is None or request.peer or request.service):
            raise PurgeRefused(
                "audit files belong to no peer or service"
                if self._audit_files
                else "audit files are purged only by the running daemon",
                fix="purge the kind audit without --peer and --service",
            )
        before = request.before.isoformat()
        if not request.dry_run:
            self._remove_pending(actor)
        counts: dict[str, int] = {}
        for kind in request.closure():
            if request.dry_run:
                counts[kind.value] = self._spool.count_disposable(
                    kind,
                    before,
                    peer=request.peer,
                    service=request.service,
                    any_service=request.service is None,
                )
            else:
                counts[kind.value] = self._dispose(
                    kind,
                    before,
                    actor,
                    peer=request.peer,
                    service=request.service,
                    any_service=request.service is None,
                )
        if request.audit_files and self._audit_files is not None:
            counts[AUDIT] = self._audit_files.dispose(
                request.before, actor, self._audit, dry_run=request.dry_run
            )
        emptied = None if request.dry_run else self._shred(counts, actor)
        self._audit.emit(
            AuditEvent(
                EventType.RETENTION_PURGED,
                severity=Severity.INFO if request.dry_run else Severity.WARNING,
                peer=request.peer,
                service=request.service,
                actor=actor,
                detail={
                    "trigger": "operator",
                    "dry_run": request.dry_run,
                    "before": before,
                    "kinds": [k.value for k in request.kinds]
                    + ([AUDIT] if request.audit_files else []),
                    "counts": counts,
                    **_log_emptied(emptied),
                },
            )
        )
        return counts

    def sweep(
        self, settings: RetentionSettings, actor: str = "medgw retention sweep"
    ) -> dict[str, int]:
        """Apply ``settings`` now: each kind, for each peer and service, by its own limit.
        Audited only when something went.  While a backup collects, nothing: the next
        sweep applies them (its key rotation would leave that backup impossible to
        restore)."""
        if self._vault is None:
            return self._sweep(settings, actor)
        with self._vault.disposing() as free:
            return self._sweep(settings, actor) if free else {}

    def _sweep(self, settings: RetentionSettings, actor: str) -> dict[str, int]:
        now = self._clock.now()
        self._remove_pending(actor)
        counts: dict[str, int] = {}
        for kind in ORDER:
            for peer, service in self._spool.retained_groups(kind):
                cutoff = settings.cutoff(kind, peer, service, now)
                if cutoff is None:
                    continue
                gone = self._dispose(
                    kind, cutoff.isoformat(), actor, peer=peer, service=service, any_service=False
                )
                if gone:
                    counts[kind.value] = counts.get(kind.value, 0) + gone
        emptied = self._shred(counts, actor)
        if settings.audit_days is not None and self._audit_files is not None:
            before = now - timedelta(days=settings.audit_days)
            if gone := self._audit_files.dispose(before, actor, self._audit):
                counts[AUDIT] = gone
        if counts:
            self._audit.emit(
                AuditEvent(
                    EventType.RETENTION_PURGED,
                    actor=actor,
                    detail={
                        "trigger": "sweep",
                        "dry_run": False,
                        "counts": counts,
                        **_log_emptied(emptied),
                    },
                )
            )
        return counts

    def _shred(self, counts: Mapping[str, int], actor: str) -> bool | None:
        """After something went from the spool: its deleted rows overwritten, and the
        key-encryption key rotated, so that no earlier copy of the state folder or backup
        can open what went (gateway.atrest).  Whether the spool's write-ahead log could
        be emptied (None: nothing went)."""
        if not any(counts.get(kind.value) for kind in ORDER):
            return None
        if self._vault is None:
            return self._spool.shred()
        rotated = self._vault.rotate()
        self._audit.emit(
            AuditEvent(
                EventType.AT_REST_KEY_ROTATED,
                actor=actor,
                reason="what was purged can no longer be read from any earlier copy of the "
                "state folder or backup: take a new backup, and replace the offline copy of "
                "the key folder",
                detail={
                    "kek_version": rotated.version,
                    "key_dir": str(self._vault.key_dir),
                    SPOOL_LOG_EMPTIED: rotated.log_emptied,
                },
            )
        )
        return rotated.log_emptied

    def _dispose(
        self,
        kind: RetainedKind,
        before: str,
        actor: str,
        *,
        peer: str | None,
        service: str | None,
        any_service: bool,
    ) -> int:
        total = 0
        while True:
            batch = self._spool.disposable(
                kind,
                before,
                peer=peer,
                service=service,
                any_service=any_service,
                limit=MAX_ITEMS,
            )
            if not batch:
                return total
            done = self._spool.dispose(batch)
            if done:
                self._audit.emit(
                    AuditEvent(
                        EventType.RETENTION_DISPOSED,
                        actor=actor,
                        detail={
                            "kind": kind.value,
                            "before": before,
                            "count": len(done),
                            "messages": [_name(item) for item in done],
                        },
                    )
                )
                self._remove(done, actor)
            total += len(done)
            if len(done) < len(batch):
                # Something changed under us (a late receipt); the rest waits for next time.
                return total

    def _remove(self, done: Sequence[Disposable], actor: str) -> _Removal:
        """The files of ``done`` (disposed of, committed) removed, each only if it is
        still the file its row records (:func:`_remove_files`), then told the spool.  A
        file that is another now is kept and said so, and no longer owed; one that cannot
        be checked or removed, or whose folder's sync fails, is alerted once and left owed
        (retried at the next sweep or purge); the others are removed all the same."""
        removal = _remove_files(done)
        for item, exc in removal.failed:
            self._alert_not_removed(item, exc, actor)
        for item, exc in removal.unsynced:
            self._alert_not_removed(item, exc, actor, unsynced=True)
        for item in removal.others:
            self._audit.emit(
                _not_removed(
                    item,
                    actor,
                    Severity.WARNING,
                    f"the file {item.file} is not the {item.kind.value} copy disposed of "
                    "(its size or SHA-256 is not its record's, or another file took its "
                    "place as it was checked): kept",
                    "none for retention: the copy it was is gone; the file now there was "
                    "written by another program, which owns it",
                )
            )
        if cleared := [*removal.removed, *removal.gone, *removal.others]:
            self._spool.files_removed(cleared)  # nothing of theirs left to remove
        return removal

    def _alert_not_removed(
        self, item: Disposable, exc: OSError, actor: str, *, unsynced: bool = False
    ) -> None:
        """One alert per file not removed (or not read; ``unsynced``: gone, but its
        folder's sync failed), until the daemon restarts."""
        if item.file is None or item.file in self._alerted:
            return
        self._alerted.add(item.file)
        why = exc.strerror or type(exc).__name__
        folder = item.file.parent
        if unsynced:
            reason = (
                f"is gone, but its folder {folder} could not be synced ({why}): its removal "
                "may not survive a power loss"
            )
            fix = f"check the file system of {folder}"
        else:
            reason = f"could not be removed: {why}"
            fix = f"remove {item.file} (or let the gateway's user remove it, and its folder "
            fix += "be written)"
        if item.kind is RetainedKind.RECEIPTS:
            # No row names a receipt file once it is disposed of: nothing here retries it.
            fix += (
                "; no record names the receipt any more: the receipts folder's sweep removes "
                "a receipt file no record names at the next start, and while the daemon runs "
                "once it is an hour old"
            )
        elif unsynced:
            fix += (
                "; the next sweep or purge syncs the folder again, and its record stays, "
                "still owing the removal, until a sync succeeds"
            )
        else:
            fix += "; the next sweep or purge retries it, and its record stays until it is gone"
        self._audit.emit(
            _not_removed(
                item,
                actor,
                Severity.ALERT,
                f"the file {item.file} of a {item.kind.value} item disposed of {reason}",
                fix,
            )
        )

    def _remove_pending(self, actor: str) -> None:
        """The files of things disposed of that a process killed before it removed them
        left (gateway.spool.sqlite.retention), removed now.  Only files the spool names
        as disposed of, and each only if it is still that file: never a document being
        written (no such row names it), nor one of the inbox the gateway does not own.
        One that cannot be removed stays owed, and stops nothing else."""
        stuck: set[tuple[str, str, str]] = set()
        while True:
            pending = self._spool.files_pending(MAX_ITEMS + len(stuck))
            batch = [i for i in pending if (i.table, i.peer, i.message_id) not in stuck]
            if not batch:
                return
            removal = self._remove(batch, actor)
            stuck.update(
                (i.table, i.peer, i.message_id) for i, _ in [*removal.failed, *removal.unsynced]
            )
            self._audit_left(removal.removed, actor, already_gone=False)
            self._audit_left(removal.gone, actor, already_gone=True)

    def _audit_left(self, items: Sequence[Disposable], actor: str, *, already_gone: bool) -> None:
        """One ``retention.disposed`` per kind naming the files left by a killed run that
        were removed now (its own record may not have been written before it died), or
        that were ``already_gone`` (removed by that run before it died, or by another
        program): no longer owed either way, their folders synced."""
        for kind in ORDER:
            of_kind = [i for i in items if i.kind is kind]
            if of_kind:
                self._audit.emit(
                    AuditEvent(
                        EventType.RETENTION_DISPOSED,
                        actor=actor,
                        detail={
                            "kind": kind.value,
                            "left_by_earlier_run": True,
                            "already_gone": already_gone,
                            "count": len(of_kind),
                            "messages": [_name(item) for item in of_kind],
                            "files": [str(item.file) for item in of_kind if item.file],
                        },
                    )
                )


# In the purge's audit record: False when the spool's write-ahead log could not be emptied
# (a reader kept it busy), so deleted rows' bytes may stay in it until later writes.
SPOOL_LOG_EMPTIED = "spool_log_emptied"


def _log_emptied(emptied: bool | None) -> dict[str, bool]:
    return {} if emptied is None else {SPOOL_LOG_EMPTIED: emptied}


def _name(item: Disposable) -> dict[str, str | None]:
    return {
        "peer": item.peer,
        "message_id": item.message_id,
        "service": item.service,
        "direction": "outbound" if item.table == "outbound" else "inbound",
    }


@dataclass(frozen=True)
class _Removal:
    """What the removal of the files of things disposed of came to."""

    removed: list[Disposable]  # removed now, their folders synced
    gone: list[Disposable]  # already gone (or none), their folders synced
    others: list[Disposable]  # another file at the path: kept, not the gateway's
    failed: list[tuple[Disposable, OSError]]  # not read or removed: still owed
    unsynced: list[tuple[Disposable, OSError]]  # gone, their folders' sync failed: owed


def _remove_files(items: Iterable[Disposable]) -> _Removal:
    """The files of ``items``, disposed of, removed (:func:`_remove_file`) and their
    folders synced, also where a file was gone already (removed by a run killed before
    it synced): gone for good, even after a power loss, once this returns."""
    folders: dict[Path, list[tuple[Disposable, bool]]] = {}
    removal = _Removal([], [], [], [], [])
    for item in items:
        if item.file is None:
            removal.gone.append(item)
            continue
        try:
            removed = _remove_file(item.file, item.sha256, item.size)
        except OSError as exc:
            removal.failed.append((item, exc))
            continue
        if removed is None:
            removal.others.append(item)
        else:
            folders.setdefault(item.file.parent, []).append((item, removed))
    for folder in sorted(folders):
        try:
            fsync_dir(folder)
        except FileNotFoundError:
            pass  # the folder itself is gone: nothing of the file is left to sync
        except OSError as exc:
            removal.unsynced.extend((item, exc) for item, _ in folders[folder])
            continue
        for item, removed in folders[folder]:
            (removal.removed if removed else removal.gone).append(item)
    return removal


def _remove_file(path: Path, sha256: str | None, size: int | None) -> bool | None:
    """The file at ``path`` unlinked if it is the file its row records (``size`` and
    ``sha256``, read at most that size and one byte more; any file when the row records
    neither): True.  False when it is gone; None, and kept, when another file is there,
    or takes its place between the check and the unlink (the path's device and inode
    are those of the file read, held open until it is unlinked).  Raises OSError when
    it cannot be read (a folder, a link, a pipe in its place) or removed."""
    if sha256 is None or size is None:
        return _unlink(path)
    try:
        # O_NONBLOCK: a FIFO put in its place must not hold retention (and the stop) for ever.
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        return False
    digest = hashlib.sha256()
    seen = 0
    try:
        read = os.fstat(fd)
        if not stat.S_ISREG(read.st_mode):
            raise OSError(
                errno.EINVAL, "not a regular file (a folder, pipe, device or socket)", path
            )
        handle = os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)  # not yet the handle's to close: none is left open, sweep after sweep
        raise
    with handle:
        while seen <= size and (chunk := handle.read(min(_CHUNK, size + 1 - seen))):
            digest.update(chunk)
            seen += len(chunk)
        if seen != size or not hmac.compare_digest(digest.hexdigest(), sha256):
            return None
        try:
            there = os.lstat(path)
        except FileNotFoundError:
            return False
        if (there.st_dev, there.st_ino) != (read.st_dev, read.st_ino):
            return None  # renamed away meanwhile: what is there now is another file
        return _unlink(path)


def _unlink(path: Path) -> bool:
    """``path`` unlinked: True, or False when it is gone."""
    try:
        path.unlink()
    except FileNotFoundError:
        return False
    return True


_CHUNK = 1 << 20


def _not_removed(
    item: Disposable, actor: str, severity: Severity, reason: str, fix: str
) -> AuditEvent:
    """``retention.disposed`` (failure) of an item whose file was not removed: why, and
    what to do."""
    return AuditEvent(
        EventType.RETENTION_DISPOSED,
        outcome=Outcome.FAILURE,
        severity=severity,
        peer=item.peer,
        message_id=item.message_id,
        service=item.service,
        direction=_name(item)["direction"],
        actor=actor,
        reason=reason,
        detail={"kind": item.kind.value, "file": str(item.file), "fix": fix},
    )
