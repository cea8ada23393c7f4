"""Inbox folder delivery: ``inbox/<peer>/[<service>/]<file name>``, exactly once.

Internal systems watching the inbox see a document only once it is complete
and on disk, and never see it written twice.  A document is written to a
hidden *work file* beside its target (created, and its name made durable, before
the spool records the delivery, so that the record always names an existing work
file, even after a power loss), synced, and then hard-linked to its target name,
which never replaces anything: a name that exists is never overwritten.  The
work name is then removed.  Whether an interrupted delivery reached the inbox is
therefore known from the work file alone (:func:`landed`): gone, or the same
file as the target, means the document is in the inbox (even if an internal
system has already taken it away); otherwise it is not.

A name sent by a peer is reduced to a safe base name: a peer can never choose
where in the file system a document lands, nor which existing file it meets.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import re
import secrets
from collections.abc import Callable, Collection, Iterable
from pathlib import Path

from gateway.errors import DeliveryError, InboxNotWritableError, StorageFullError
from gateway.fsutil import (
    HARD_LINK_RULE,
    NO_HARD_LINKS,
    NO_SPACE,
    NOT_WRITABLE,
    FolderSync,
    fsync_dir,
    hard_link_fix,
    safe_name,
    shared_folder,
    storage_fix,
)

FILE_MODE = 0o640
# A clash gets a random suffix, tried again until free: nobody can predict the
# name a document will take, so nobody can put something there first.
_SUFFIX_TRIES = 16
WORK = re.compile(r"^\..+\.([0-9a-f]{12})\.delivering$")


def choose_target(
    inbox_dir: Path,
    peer: str,
    filename: str | None,
    message_id: str,
    claimed: Callable[[Path], bool] = lambda _path: False,
    service: str | None = None,
    services: Collection[str] = (),
) -> Path:
    """Where a new document goes: never a name that exists (file, folder or link), nor
    one another delivery claimed, nor in ``inbox/<peer>/`` the name of one of the
    peer's ``services`` (their folders live there).

    ``service`` must be one configured for the peer (a checked folder name).
    On a clash the name gets a random suffix.
    """
    folder = inbox_dir / peer if service is None else inbox_dir / peer / service
    kept = {s.casefold() for s in services} if service is None else set()

    def free(candidate: Path) -> bool:
        return (
            candidate.name.casefold() not in kept
            and not os.path.lexists(candidate)
            and not claimed(candidate)
        )

    name = safe_name(filename, message_id)
    if free(folder / name):
        return folder / name
    stem, dot, ext = name.partition(".")
    for _ in range(_SUFFIX_TRIES):
        target = folder / f"{stem}-{secrets.token_hex(6)}{dot}{ext}"
        if free(target):
            return target
    raise DeliveryError(
        f"no free name for a document named {name!r} in {folder}",
        fix=f"check {folder}: something else creates files there",
    )


def node_tag(node: str) -> str:
    """What a work file's name tells of the node that made it (see :func:`work_name`)."""
    return hashlib.sha256(node.encode()).hexdigest()[:6]


def work_name(target: Path, node: str) -> Path:
    """A hidden work name beside ``target``, telling which node made it (the first half
    of its hex part): at start a node removes its own unrecorded work files at once,
    and waits a lease for those of other nodes sharing the inbox."""
    return target.with_name(f".{target.name}.{node_tag(node)}{secrets.token_hex(3)}.delivering")


class WorkFile:
    """A work file just created (see :func:`prepare`), held open until it is filled
    (:func:`fill`) or given up (:meth:`close`): one ``open`` per document."""

    def __init__(self, path: Path, fd: int, made: tuple[Path, ...] = ()) -> None:
        self.path = path
        self._fd = fd
        self.made = made  # the folders created for it, deepest first

    def fileno(self) -> int:
        return self._fd

    def close(self) -> None:
        """Let go of the open file (the name stays); a second call does nothing."""
        fd, self._fd = self._fd, -1
        if fd >= 0:
            os.close(fd)


def prepare(target: Path, node: str) -> WorkFile:
    """Create the target's folder and an empty hidden work file beside it, made by
    ``node``: held open, for :func:`fill` to write without opening it again.

    Raises InboxUnavailableError or DeliveryError (see :func:`delivery_error`).
    """
    work = work_name(target, node)
    try:
        made = shared_folder(target.parent)
        fd = os.open(work, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, FILE_MODE)
    except OSError as exc:
        raise delivery_error(exc, target) from exc
    return WorkFile(work, fd, tuple(made))


def fill(work: WorkFile, payload: Iterable[bytes]) -> None:
    """Write the document (bytes, or chunks of it) to the work file, sync and close it.

    Raises OSError; the work file stays (closed), for the caller to discard."""
    chunks = [payload] if isinstance(payload, bytes) else payload
    try:
        fd = work.fileno()
        for chunk in chunks:
            view = memoryview(chunk)
            while view:
                written = os.write(fd, view)
                if written <= 0:
                    raise OSError(errno.EIO, f"wrote nothing of a document to {work.path}")
                view = view[written:]
        os.fsync(fd)
    finally:
        work.close()


def sync_work_name(work: WorkFile, folders: FolderSync) -> None:
    """Make the work file's name durable (its folder synced, the fsync shared through
    ``folders`` with other deliveries at that moment): before the spool records a
    delivery naming it, for a record whose work file is gone reads as "in the inbox"
    (see :func:`landed`), and a power loss must not take the name away unlinked.
    A folder :func:`prepare` created for it is synced in its parent too, up to the
    first that existed: the work file's name is durable only with theirs.
    Raises OSError; the work file stays, for the caller to discard."""
    folders.sync(work.path.parent)
    for made in work.made:
        folders.sync(made.parent)


def link(work: Path, target: Path) -> None:
    """Give the complete work file its name in the inbox: from here on the document is
    delivered.  FileExistsError if anything has that name (nothing is replaced);
    InboxNotWritableError if the file system refuses the link."""
    try:
        os.link(work, target, follow_symlinks=False)
    except OSError as exc:
        if exc.errno not in NO_HARD_LINKS:
            raise
        raise InboxNotWritableError(
            f"cannot link the received document into {target.parent}: "
            f"{exc.strerror or exc}; {HARD_LINK_RULE}: the file system refuses hard links, "
            "or the document's work file was made immutable",
            fix=hard_link_fix(target.parent),
            folder=target.parent,
        ) from exc


def finish(work: Path, target: Path, folders: FolderSync | None = None) -> None:
    """After :func:`link`: remove the work name and make both changes durable (the
    folder's fsync shared through ``folders`` with other deliveries at that moment).

    Raises OSError; the document is in the inbox all the same (see :func:`landed`)."""
    os.unlink(work)
    sync_folder(target, folders)


def sync_folder(target: Path, folders: FolderSync | None = None) -> None:
    """Make ``target``'s folder durable as it is now: its name, and the work name's
    removal (the fsync shared through ``folders``).  A folder that is gone leaves
    nothing to make durable: the document was taken away with it.  Raises OSError."""
    try:
        if folders is not None:
            folders.sync(target.parent)
        else:
            fsync_dir(target.parent)
    except FileNotFoundError:
        if os.path.lexists(target.parent):
            raise


def landed(work: Path | None, target: Path) -> bool:
    """Whether an interrupted delivery put its document in the inbox: its work file is
    gone, or is the target itself (then the work name is removed now; the caller makes
    that durable, with :func:`sync_folder`, before it records the delivery).

    ``work`` None: a delivery recorded before work files (by an older version),
    which wrote the target in one rename: landed if the target is there.
    """
    if work is None:
        return os.path.lexists(target)
    try:
        held = os.stat(work, follow_symlinks=False)
    except FileNotFoundError:
        return True
    try:
        named = os.stat(target, follow_symlinks=False)
    except FileNotFoundError:
        return False
    if (held.st_dev, held.st_ino) != (named.st_dev, named.st_ino):
        return False
    os.unlink(work)
    return True


def discard(work: Path) -> None:
    """Remove a work file given up.  One that cannot be removed now (made immutable)
    stays, unrecorded: the sweep of such files removes it once it can; the error that
    made the caller give up is the one to tell."""
    with contextlib.suppress(OSError):
        work.unlink(missing_ok=True)


def remove_stale_work_files(
    inbox_dir: Path,
    keep: Collection[Path],
    *,
    older_than: float | None = None,
    own: str | None = None,
) -> list[Path]:
    """Delete work files a killed process left behind before recording them (our own
    naming pattern only), except those in ``keep`` and, given ``older_than`` (seconds
    since the epoch), those last changed after it (another node sharing the inbox may
    be about to record one) unless made by node ``own`` (at start: it has none in
    progress, so a young one of its own is a killed process's too)."""
    removed = []
    mine = None if own is None else node_tag(own)
    if inbox_dir.is_dir():
        for path in inbox_dir.rglob(".*.delivering"):
            matched = WORK.match(path.name)
            if (
                matched
                and path not in keep
                and path.is_file()
                and (
                    older_than is None
                    or (mine is not None and matched.group(1).startswith(mine))
                    or _changed_before(path, older_than)
                )
            ):
                path.unlink(missing_ok=True)
                removed.append(path)
    return removed


def _changed_before(path: Path, when: float) -> bool:
    try:
        return path.stat(follow_symlinks=False).st_mtime < when
    except FileNotFoundError:
        return False


def delivery_error(exc: OSError, target: Path) -> DeliveryError:
    """``exc``, raised while delivering to ``target``, for the administrator."""
    if exc.errno in NO_SPACE:
        return StorageFullError(
            f"cannot write the received document to {target}: {exc.strerror or exc}",
            fix=storage_fix(exc, target.parent, daemon=True),
            folder=target.parent,
        )
    if exc.errno in NOT_WRITABLE:
        return InboxNotWritableError(
            f"cannot write the received document to {target}: {exc.strerror or exc}",
            fix=storage_fix(exc, target.parent, daemon=True),
            folder=target.parent,
        )
    blocker = _file_in_the_way(target.parent)
    if blocker is not None and exc.errno in (errno.EEXIST, errno.ENOTDIR):
        return DeliveryError(
            f"cannot write the received document to {target}: {blocker} is a file, "
            "where medgw keeps a folder",
            fix=f"move {blocker} out of the way (look at it first: it may be a document "
            "delivered under that name by an older version); medgw then creates the "
            "folder and the peer's resends are delivered",
        )
    return DeliveryError(
        f"cannot write the received document to {target}: {exc.strerror or exc}",
        fix=storage_fix(exc, target.parent, daemon=True),
    )


def _file_in_the_way(folder: Path) -> Path | None:
    """The nearest of ``folder`` and its parents that exists and is not a folder."""
    for candidate in (folder, *folder.parents):
        if os.path.lexists(candidate):
            return None if candidate.is_dir() else candidate
    return None
