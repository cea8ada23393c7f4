"""Key-encryption keys (KEKs): versioned files in ``[at_rest] key_dir``, outside the
state folder, and the wrapping of data keys under them (AES key wrap, RFC 3394).

``key_dir`` holds ``kek-<n>`` files of 32 random bytes, mode 0600, in a folder of
mode 0700, read without following symbolic links and only when this user owns
them and no other user may read them.  The newest version wraps new data keys.
A rotation writes ``kek-<n+1>``, the caller re-wraps what ``kek-<n>`` wrapped,
then :meth:`KeyStore.destroy` overwrites and removes ``kek-<n>``: whatever a copy
of the state folder or a backup still holds wrapped under it can no longer be
unwrapped by anyone.
"""

from __future__ import annotations

import contextlib
import os
import re
import secrets
import stat
from collections.abc import Iterable
from pathlib import Path

from cryptography.hazmat.primitives.keywrap import (
    InvalidUnwrap,
    aes_key_unwrap,
    aes_key_wrap,
)

from gateway.atrest.chunked import KEY_BYTES
from gateway.errors import AtRestError, UnsafeFileError
from gateway.fsutil import PRIVATE_FILE, PRIVATE_FOLDER, fsync_dir, read_private

_NAME = re.compile(r"^kek-([1-9][0-9]{0,8})$")
MAX_VERSIONS = 64  # more files than a crash mid-rotation can leave: a wrong folder
_WRITING = ".new"  # a key file being written
STALE_WRITE_SECONDS = 3600  # a key file is written in milliseconds


def kek_name(version: int) -> str:
    return f"kek-{version}"


class KeyStore:
    """The KEK files of one ``key_dir``."""

    def __init__(self, key_dir: Path) -> None:
        self.key_dir = key_dir

    def prepare(self) -> None:
        """``key_dir`` exists as a real folder of mode 0700 owned by this user."""
        try:
            if not os.path.lexists(self.key_dir):
                self.key_dir.parent.mkdir(parents=True, exist_ok=True)
                # exist_ok: another node sharing the folder may create it at this moment;
                # whoever made it, the checks below hold.
                self.key_dir.mkdir(mode=PRIVATE_FOLDER, exist_ok=True)
            info = os.lstat(self.key_dir)
            if not stat.S_ISDIR(info.st_mode):
                raise self._unsafe("is not a folder (a symbolic link or a file)")
            if info.st_uid != os.geteuid():
                raise self._unsafe(f"is owned by uid {info.st_uid}, not by the gateway's user")
            if stat.S_IMODE(info.st_mode) != PRIVATE_FOLDER:
                os.chmod(self.key_dir, PRIVATE_FOLDER, follow_symlinks=False)
        except OSError as exc:
            raise AtRestError(
                f"cannot prepare the key folder {self.key_dir} ([at_rest] key_dir): "
                f"{exc.strerror or exc}",
                fix=f"create {self.key_dir} as a folder owned by the medgw user, mode 0700",
            ) from exc

    def _unsafe(self, what: str) -> AtRestError:
        return AtRestError(
            f"the key folder {self.key_dir} ([at_rest] key_dir) {what}; medgw keeps its "
            "key-encryption keys only in a private folder of its own",
            fix=f"make {self.key_dir} a folder (not a link) owned by the medgw user, mode 0700",
        )

    def versions(self) -> list[int]:
        """The KEK versions present, oldest first."""
        try:
            names = os.listdir(self.key_dir)
        except FileNotFoundError:
            return []
        except OSError as exc:
            raise AtRestError(
                f"cannot list the key folder {self.key_dir}: {exc.strerror or exc}",
                fix=f"make {self.key_dir} readable by the medgw user",
            ) from exc
        found = sorted(int(m.group(1)) for n in names if (m := _NAME.match(n)))
        if len(found) > MAX_VERSIONS:
            raise self._unsafe(f"holds {len(found)} key files, more than medgw ever keeps")
        return found

    def missing(self, versions: Iterable[int]) -> list[int]:
        """Those of ``versions`` whose key is not in the folder, in their order."""
        present = set(self.versions())
        return [v for v in versions if v not in present]

    def load(self, version: int) -> bytes:
        path = self.key_dir / kek_name(version)
        try:
            data = read_private(path, KEY_BYTES)
        except UnsafeFileError as exc:
            raise AtRestError(
                f"the key-encryption key {path} is not private: {exc.message}",
                fix=f"chmod 600 {path}, owned by the medgw user (and find out who changed it)",
            ) from None
        if data is None:
            raise AtRestError(
                f"the key-encryption key version {version} ({path}) is missing: what was "
                f"wrapped under it can no longer be read (it was destroyed by a purge, or "
                f"{self.key_dir} is not the key folder of this state)",
                fix=f"put back the {kek_name(version)} file kept with this state's keys, or "
                "restore a backup taken after the last purge together with the key folder "
                "as it was then",
            )
        if len(data) != KEY_BYTES:
            raise AtRestError(
                f"the key-encryption key {path} is {len(data)} bytes, not {KEY_BYTES}",
                fix=f"put back the {kek_name(version)} file kept with this state's keys",
            )
        return data

    def create(self, version: int) -> bytes:
        """Write ``kek-<version>`` (new random bytes), durable before this returns;
        FileExistsError if another process (a node sharing the folder) made it first."""
        path = self.key_dir / kek_name(version)
        # A kill mid-write leaves no kek-<n>; a name of its own, as another node may be
        # writing the same version at this moment (see remove_stale_writes).
        tmp = self.key_dir / f".{kek_name(version)}.{secrets.token_hex(8)}{_WRITING}"
        key = secrets.token_bytes(KEY_BYTES)
        fd = os.open(
            tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, PRIVATE_FILE
        )
        try:
            try:
                os.write(fd, key)
                os.fsync(fd)
                written = os.fstat(fd).st_mtime  # the file system's time, as others' files
            finally:
                os.close(fd)
            os.link(tmp, path)  # never replaces an existing key: FileExistsError
        finally:
            tmp.unlink()
        self._remove_stale_writes(written)
        fsync_dir(self.key_dir)
        return key

    def _remove_stale_writes(self, now: float) -> None:
        """Remove what a process killed in :meth:`create` left (random bytes that wrap
        nothing): files older than any write still in progress can be."""
        try:
            entries = list(os.scandir(self.key_dir))
        except OSError:
            return  # versions() names the folder's problem
        for entry in entries:
            if not (entry.name.startswith(".kek-") and entry.name.endswith(_WRITING)):
                continue
            with contextlib.suppress(OSError):  # another node removed it first
                if now - entry.stat(follow_symlinks=False).st_mtime > STALE_WRITE_SECONDS:
                    os.unlink(entry.path)

    def destroy(self, version: int) -> None:
        """Overwrite ``kek-<version>``, then remove it (both on disk when this returns)."""
        path = self.key_dir / kek_name(version)
        try:
            fd = os.open(path, os.O_WRONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except FileNotFoundError:
            return
        try:
            os.pwrite(fd, secrets.token_bytes(KEY_BYTES), 0)
            os.fsync(fd)
            os.pwrite(fd, bytes(KEY_BYTES), 0)
            os.fsync(fd)
        finally:
            os.close(fd)
        path.unlink(missing_ok=True)
        fsync_dir(self.key_dir)


def wrap(kek: bytes, dek: bytes) -> bytes:
    return aes_key_wrap(kek, dek)


def unwrap(kek: bytes, wrapped: bytes, item: str) -> bytes:
    try:
        return aes_key_unwrap(kek, wrapped)
    except (InvalidUnwrap, ValueError):
        raise AtRestError(
            f"the data key of {item} does not unwrap under its key-encryption key: the "
            "spool's record of it was changed, or the key folder is another state's",
            fix="restore the spool and the key folder from the same backup",
        ) from None
