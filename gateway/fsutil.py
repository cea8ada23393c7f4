"""Durable file operations: what is renamed into place is complete and on disk."""

from __future__ import annotations

import contextlib
import errno
import glob
import hashlib
import io
import os
import pwd
import re
import secrets
import stat
import threading
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import BinaryIO

from gateway.errors import UnsafeFileError

# Modes set explicitly, whatever the umask (0022 outside systemd gives 0755/0644):
PRIVATE_FOLDER = 0o700  # the state folder and its working folders: medgw only
PRIVATE_FILE = 0o600  # the spool database, working files (plaintext among them)
MAX_SOCKET_PATH = 107  # the longest path a unix socket can be bound to (sun_path)
# A file an administrator names (configuration, certificate, key, CRL): far above any
# real one (a large CA's CRL is a few MiB).
MAX_ADMIN_FILE_BYTES = 64 << 20


def file_identity(status: os.stat_result) -> str:
    """One file as it is now: its device and inode, size, and modification and change
    times.  A file dropped later under the same name differs (the kernel sets its change
    time when it is created or renamed there, whatever its writer sets), even where
    its inode number is reused; reading a file does not change it."""
    return (
        f"{status.st_dev}:{status.st_ino}:{status.st_size}:"
        f"{status.st_mtime_ns}:{status.st_ctime_ns}"
    )


def fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class FolderSync:
    """fsync of a folder, shared by the threads that ask for one at the same moment.

    A file renamed, linked or removed in a folder is durable once the folder is
    synced.  When several threads each change an entry of one folder (a burst
    of documents taken, delivered, settled), syncing the folder once for each
    makes every one of them wait behind the others' syncs.  Here a sync that
    begins after a caller asked covers it: the first waiting caller syncs for
    all who asked before that sync began (like group commit; see
    gateway.spool.groupcommit and gateway.audit.log).  A caller returns only
    once a sync that began after its change has completed; if that sync fails,
    its caller gets the error and the others that waited on it sync again.
    """

    def __init__(self, sync: Callable[[Path], None] = fsync_dir) -> None:
        self._sync = sync
        self._lock = threading.Lock()
        self._folders: dict[Path, _Folder] = {}  # only folders someone is syncing now

    def sync(self, folder: Path) -> None:
        """Return once every change made in ``folder`` before this call is durable."""
        with self._lock:
            entry = self._folders.get(folder)
            if entry is None:
                entry = self._folders[folder] = _Folder()
            entry.asked += 1
            entry.users += 1
            ticket = entry.asked
        try:
            with entry.syncing:
                if entry.synced >= ticket:
                    return  # a sync that began after this call has covered it
                with self._lock:
                    covers = entry.asked  # everyone who asked so far changed the folder before
                self._sync(folder)
                entry.synced = covers
        finally:
            with self._lock:
                entry.users -= 1
                if entry.users == 0:
                    del self._folders[folder]

    def waiting(self, folder: Path) -> int:
        """How many callers are in :meth:`sync` of ``folder`` now (for tests)."""
        with self._lock:
            entry = self._folders.get(folder)
            return 0 if entry is None else entry.users


class DeferredFolderSync(FolderSync):
    """The folder syncs one thread asks for while it stores a group of files, done once
    per folder at :meth:`flush` (through ``shared``, with other threads): the group's
    files are durable only once it has returned, and the thread records nothing that
    relies on them before."""

    def __init__(self, shared: FolderSync) -> None:
        super().__init__()
        self._shared = shared
        self._asked: set[Path] = set()

    def sync(self, folder: Path) -> None:
        self._asked.add(folder)

    def flush(self) -> None:
        """Return once every change made in the folders asked for so far is durable."""
        for folder in sorted(self._asked):
            self._shared.sync(folder)
        self._asked.clear()


class _Folder:
    __slots__ = ("asked", "synced", "syncing", "users")

    def __init__(self) -> None:
        self.asked = 0  # tickets handed out
        self.synced = 0  # every ticket up to this one is durable
        self.users = 0
        self.syncing = threading.Lock()  # one sync of the folder at a time


_UNSAFE = re.compile(r"[^A-Za-z0-9._+-]")
MAX_NAME = 200


def safe_name(filename: str | None, message_id: str) -> str:
    """A safe base name derived from a sender's file name: a peer can never choose
    where in the file system a document lands (used by the inbox and by the sender,
    which names the document the same way the receiving side will)."""
    base = (filename or "").replace("\\", "/").rsplit("/", 1)[-1]
    base = _UNSAFE.sub("_", base).lstrip(".-")[:MAX_NAME]
    if not base:
        base = "document-" + hashlib.sha256(message_id.encode()).hexdigest()[:16]
    return base


PARTIAL = re.compile(r"^\..+\.[0-9a-f]{12}\.partial$")


def private_folder(path: Path) -> None:
    """``path`` (and any missing parent) as a folder of mode 0700, an existing one
    included: it holds what no other user may read."""
    path.mkdir(parents=True, exist_ok=True, mode=PRIVATE_FOLDER)
    os.chmod(path, PRIVATE_FOLDER)


def shared_folder(path: Path) -> list[Path]:
    """``path`` (and any missing parent) as a folder for medgw and the internal systems:
    the owner's and the group's permissions as the umask or a default ACL make them
    (so that an ACL granting an internal system access keeps working), never any for
    other users (on the folders medgw owns).  Returns the folders it created, deepest
    first (their names are durable once their parents are synced)."""
    try:
        info = os.stat(path)
    except FileNotFoundError:
        pass
    else:
        if stat.S_ISDIR(info.st_mode):  # the common case (each document delivered): one stat
            _no_access_for_others(path, info)
            return []
    missing = []
    folder = path
    while not os.path.lexists(folder):
        missing.append(folder)
        folder = folder.parent
    path.mkdir(parents=True, exist_ok=True, mode=0o770)  # a file in the way: an OSError
    for folder in (*missing, path):
        _no_access_for_others(folder, os.stat(folder))
    return missing


def _no_access_for_others(folder: Path, info: os.stat_result) -> None:
    mode = stat.S_IMODE(info.st_mode)
    # A folder another user owns (an inbox the internal system's account made, a
    # share) keeps the mode its owner gave it: only the owner may change it.
    if mode & 0o007 and info.st_uid == os.geteuid():
        os.chmod(folder, mode & ~0o007)


def private_file(path: Path) -> None:
    """``path`` exists as a file of mode 0600 (created empty if missing)."""
    with contextlib.suppress(FileExistsError):
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, PRIVATE_FILE))
    os.chmod(path, PRIVATE_FILE)


def create_private(path: Path) -> BinaryIO:
    """A new file at ``path``, mode 0600, open for writing and reading."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, PRIVATE_FILE)
    return os.fdopen(fd, "w+b")


@contextlib.contextmanager
def private_work_file(dst: Path) -> Iterator[BinaryIO]:
    """A file that takes the name ``dst`` (mode 0600) only when the block ends without
    an exception.  Meanwhile it has no name at all where the system allows it (Linux
    O_TMPFILE): a process killed while writing it leaves nothing behind, not even
    plaintext for the next start to remove.  Elsewhere it is a hidden partial file
    (see :func:`remove_stale_partials`)."""
    try:
        fd = os.open(dst.parent, os.O_TMPFILE | os.O_RDWR | os.O_CLOEXEC, PRIVATE_FILE)
    except (AttributeError, OSError):  # no O_TMPFILE here, or not on this file system
        fd = -1
    if fd < 0:
        tmp = partial_name(dst)
        try:
            with create_private(tmp) as out:
                yield out
            os.replace(tmp, dst)
        finally:
            tmp.unlink(missing_ok=True)
        return
    with os.fdopen(fd, "w+b") as out:
        yield out
        out.flush()
        try:  # gives the unnamed file its name (linkat through /proc: no privilege needed)
            os.link(f"/proc/self/fd/{out.fileno()}", dst, follow_symlinks=True)
        except OSError:  # no /proc: copy it to a named file
            out.seek(0)
            tmp = partial_name(dst)
            try:
                with create_private(tmp) as named:
                    while chunk := out.read(1 << 20):
                        named.write(chunk)
                os.replace(tmp, dst)
            finally:
                tmp.unlink(missing_ok=True)


def partial_name(path: Path) -> Path:
    """A hidden temporary name beside ``path`` for a file being written (or a working
    file): the start-up cleanup (:func:`remove_stale_partials`) knows it."""
    return path.with_name(f".{path.name}.{secrets.token_hex(6)}.partial")


def remove_stale_partials(
    folder: Path, *, older_than: float | None = None, recursive: bool = True
) -> list[Path]:
    """Delete temporary files a killed process left behind (only our own naming pattern)
    in ``folder`` (and, ``recursive``, the folders in it); given ``older_than`` (seconds
    since the epoch), only those last changed before it."""
    removed = []
    if folder.is_dir():
        for path in (folder.rglob if recursive else folder.glob)(".*.partial"):
            if (
                PARTIAL.match(path.name)
                and path.is_file()
                and (older_than is None or path.stat().st_mtime < older_than)
            ):
                path.unlink(missing_ok=True)
                removed.append(path)
    return removed


def remove_partials_of(path: Path) -> list[Path]:
    """Delete the temporary files earlier writes of ``path`` left behind (see
    :func:`partial_name`), whatever their age: for the caller that alone writes ``path``
    and is about to write it again, so that any such file is a killed write's."""
    pattern = re.compile(rf"\.{re.escape(path.name)}\.[0-9a-f]{{12}}\.partial")
    removed = []
    for tmp in path.parent.glob(f".{glob.escape(path.name)}.*.partial"):
        if pattern.fullmatch(tmp.name) and tmp.is_file():
            tmp.unlink(missing_ok=True)
            removed.append(tmp)
    return removed


def write_atomic(
    path: Path,
    chunks: Iterable[bytes],
    *,
    mode: int = 0o640,
    overwrite: bool = True,
    folder_sync: FolderSync | None = None,
) -> int:
    """Write to a hidden temporary file beside ``path``, fsync, rename, fsync the folder
    (through ``folder_sync`` when given: shared with other writers in that folder).

    Readers of the folder see either no file or the complete file.  With
    ``overwrite=False`` an existing ``path`` is never replaced (FileExistsError).
    Returns the number of bytes written.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = partial_name(path)
    size = 0
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, mode)
    try:
        with os.fdopen(fd, "wb", closefd=True) as handle:
            for chunk in chunks:
                handle.write(chunk)
                size += len(chunk)
            handle.flush()
            os.fsync(handle.fileno())
        if overwrite:
            os.replace(tmp, path)
        else:
            os.link(tmp, path)  # fails with FileExistsError instead of clobbering
            os.unlink(tmp)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    if folder_sync is not None:
        folder_sync.sync(path.parent)
    else:
        fsync_dir(path.parent)
    return size


def open_source(source: Path | bytes) -> BinaryIO:
    """A file, or a small document held in memory, opened for reading: the code that
    reads MIME and CMS structures works the same on both."""
    return source.open("rb") if isinstance(source, Path) else io.BytesIO(source)


def read_admin_file(path: Path, limit: int = MAX_ADMIN_FILE_BYTES) -> bytes:
    """The bytes of the regular file ``path``, which an administrator named.

    A device, pipe or socket, or a file over ``limit`` bytes, is an ``OSError``
    whose ``strerror`` says so: a wrong path (``/dev/zero``, a FIFO) must neither
    hang nor exhaust the reader (``check-config``, a reload).
    """
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)  # a FIFO: no wait
    with open(fd, "rb") as handle:
        mode = os.fstat(fd).st_mode
        if stat.S_ISDIR(mode):
            raise IsADirectoryError(errno.EISDIR, os.strerror(errno.EISDIR), str(path))
        if not stat.S_ISREG(mode):
            raise OSError(errno.EINVAL, "not a regular file (a device, pipe or socket)", str(path))
        data = handle.read(limit + 1)
    if len(data) > limit:
        raise OSError(
            errno.EFBIG, f"larger than {limit >> 20} MiB, more than any such file", str(path)
        )
    return data


def read_private(path: Path, limit: int) -> bytes | None:
    """A private state file of this user (None when missing), at most ``limit`` + 1
    bytes.  One that is not a regular file, that others may read or write, or that
    another user owns is an UnsafeFileError: never trusted."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise UnsafeFileError(f"cannot read {path}: {exc.strerror}") from None
    with open(fd, "rb") as handle:
        found = os.fstat(fd)
        if not stat.S_ISREG(found.st_mode) or found.st_mode & 0o077:
            raise UnsafeFileError(
                f"{path} is accessible by other users (mode {stat.S_IMODE(found.st_mode):o})"
            )
        if found.st_uid != os.geteuid():
            raise UnsafeFileError(
                f"{path} is owned by uid {found.st_uid}, not by the gateway's user "
                f"(uid {os.geteuid()})"
            )
        return handle.read(limit + 1)


def read_chunks(path: Path, chunk_size: int = 1 << 20) -> Iterable[bytes]:
    with path.open("rb") as handle:
        while chunk := handle.read(chunk_size):
            yield chunk


NO_SPACE = (errno.ENOSPC, errno.EDQUOT)  # the file system (or the user's quota) is full
# This user may not write there (modes, owner, an immutable attribute), or the file
# system is mounted read-only.
NOT_WRITABLE = (errno.EACCES, errno.EPERM, errno.EROFS)


# link() refused by the file system: it has no hard links (vfat, some CIFS and FUSE
# mounts: EPERM, EOPNOTSUPP; an immutable file: EPERM too), or the two names are on two
# file systems (EXDEV).
NO_HARD_LINKS = (errno.EPERM, errno.EOPNOTSUPP, errno.EXDEV)
HARD_LINK_RULE = "medgw delivers a document with a hard link, so that it appears whole and once"


def hard_link_fix(folder: Path) -> str:
    """What an administrator does about an inbox ``folder`` where a hard link fails."""
    return (
        f"put the inbox on a file system with hard links, such as ext4 or xfs (findmnt -T "
        f"{folder} shows the one it is on; vfat and some CIFS or FUSE mounts have none); on "
        f"one that has them, look for files made immutable there (lsattr -a {folder}; "
        "chattr -i)"
    )


def no_hard_links(folder: Path) -> OSError | None:
    """The error (one of :data:`NO_HARD_LINKS`) the file system of ``folder`` gives a
    hard link made as a delivery makes one: a file created in ``folder``, linked to a
    second name beside it (both hidden, both removed); None if it links, or if the file
    cannot be made (the folder's access check says why)."""
    # Named as the inbox's work files: any a killed process leaves are swept with them.
    token = secrets.token_hex(6)
    made = folder / f".medgw-link-check.{token}.delivering"
    linked = folder / f".medgw-link-check-2.{token}.delivering"
    try:
        os.close(os.open(made, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600))
    except OSError:
        return None
    try:
        os.link(made, linked, follow_symlinks=False)
    except OSError as exc:
        return exc if exc.errno in NO_HARD_LINKS else None
    finally:
        for name in (linked, made):
            with contextlib.suppress(OSError):
                name.unlink(missing_ok=True)
    return None


ROOM_PROBE_BYTES = 64 * 1024  # what no_room() asks of the file system


def no_room(folder: Path) -> OSError | None:
    """The error (ENOSPC, or EDQUOT: this user's quota) the file system of ``folder``
    gives a file of :data:`ROOM_PROBE_BYTES` made there for a moment, if it has no room
    for it; None if it has room (or fails otherwise).  For a write that failed without
    saying why (SQLite's "disk I/O error" for a quota used up)."""
    probe = partial_name(folder / "room")
    try:
        fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    except OSError as exc:
        return exc if exc.errno in NO_SPACE else None
    try:
        os.posix_fallocate(fd, 0, ROOM_PROBE_BYTES)
    except OSError as exc:
        return exc if exc.errno in NO_SPACE else None
    finally:
        os.close(fd)
        probe.unlink(missing_ok=True)
    return None


def this_user() -> str:
    """The user this process reads and writes files as: its name, or its uid when the
    host has no name for it."""
    return _user_name(os.geteuid())


def _user_name(uid: int) -> str:
    """The host's name for ``uid``, or the uid when it has none."""
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return str(uid)


def storage_fix(exc: OSError, folder: Path, *, daemon: bool = False) -> str:
    """What an administrator does about ``exc``, raised while writing into ``folder``
    (``daemon``: by the daemon, see :func:`writable_fix`)."""
    if exc.errno == errno.EDQUOT:
        user = this_user()
        return (
            f"free space in the disk quota of user {user} on the file system of {folder}, "
            f"or have the quota raised (quota -u {user} shows it)"
        )
    if exc.errno in NO_SPACE:
        return f"free disk space on the file system of {folder} (df -h {folder})"
    if exc.errno == errno.EROFS:
        return (
            f"{folder} is on a file system mounted read-only (findmnt -T {folder} shows "
            "it): mount it read-write; under systemd, name the folder in ReadWritePaths= "
            "of the medgw unit (the unit's ProtectSystem=strict leaves every folder outside "
            "/var/lib/medgw, /var/log/medgw and ReadWritePaths= read-only to medgw)"
        )
    if exc.errno in NOT_WRITABLE:
        return writable_fix(folder, daemon=daemon)
    return f"check {folder} and the disk under it (dmesg may show I/O errors)"


def writable_fix(folder: Path, *, daemon: bool = False) -> str:
    """How to let this user write into ``folder``: into the nearest of it and its
    parents that exists (where medgw creates the rest).

    ``daemon``: asked by the daemon, which is medgw running as its own user; otherwise by
    a command, which an administrator may have run as another user than the daemon's."""
    where = next((p for p in (folder, *folder.parents) if os.path.lexists(p)), folder)
    user = this_user()
    try:
        owner_uid = os.lstat(where).st_uid
    except OSError:
        owner_uid = os.geteuid()
    if owner_uid not in (0, os.geteuid()) and daemon:
        owner = _user_name(owner_uid)
        return (
            f"{where} is owned by user {owner}: let user {user}, whom medgw runs as, write "
            f"it too (ls -ld {where}; for example setfacl -m u:{user}:rwX {where}), or give "
            f"it to user {user} (chown {user} {where}) if nothing needs it to stay {owner}'s"
        )
    if owner_uid not in (0, os.geteuid()):
        # Most likely the user the service runs as, and this command run as another:
        # giving the folder to this user would take it from the daemon.
        owner = _user_name(owner_uid)
        return (
            f"{where} is owned by user {owner}: if medgw runs as {owner}, run this command "
            f"as that user (sudo -u {owner} medgw ...) and leave {where} as it is; "
            f"otherwise let user {user}, whom this command runs as, write it too "
            f"(ls -ld {where}; for example setfacl -m u:{user}:rwX {where})"
        )
    if owner_uid == os.geteuid() != 0:
        # Its own: the mode lacks a permission (a chown would change nothing).
        wanted = "rwx" if os.path.isdir(where) else "rw"
        return (
            f"{where} is user {user}'s own: give that user the permissions it lacks "
            f"(ls -ld {where}; for example chmod u+{wanted} {where})"
        )
    whom = "medgw" if daemon else "this command"
    return (
        f"make {where} writable by user {user}, whom {whom} runs as "
        f"(ls -ld {where}; for example chown {user} {where})"
    )
