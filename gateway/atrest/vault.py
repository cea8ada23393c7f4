"""What the gateway keeps, encrypted at rest under per-item data keys (DSP-1, OUT-1).

Each item (an outbound AS2 body, a receipt received, a receipt sent: see
``gateway.spool.records``) has its own 256-bit data key.  The key is stored in
the spool, wrapped under the newest key-encryption key of ``[at_rest] key_dir``
(:mod:`gateway.atrest.keys`), in the same transaction as the item; the bytes
are in the :mod:`gateway.atrest.chunked` format.  Disposing of an item deletes
its data key; :meth:`Vault.rotate`, after every purge, re-wraps every surviving
data key under a new key-encryption key and destroys the old one, so that a
disk image or backup taken before the purge holds the purged items' data keys
only wrapped under a key that no longer exists.

A half-done rotation (the process killed in the middle) is finished when the
vault is opened: a data key is wrapped under exactly one key, and the old key
is destroyed only once nothing is wrapped under it any more.  Reading detects
the format: an item written before at-rest encryption (or while it was off) is
read as it is.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import secrets
import threading
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import BinaryIO, NamedTuple, cast

from gateway.atrest import chunked
from gateway.atrest.keys import KeyStore, unwrap, wrap
from gateway.errors import AtRestError, DataKeyAlteredError, DataKeyMissingError
from gateway.fsutil import FolderSync, fsync_dir, partial_name
from gateway.spool import DataKey, Spool


class Vault:
    """Seals and opens the items the gateway keeps; rotates the key-encryption key."""

    def __init__(self, store: KeyStore, spool: Spool, *, encrypt: bool = True) -> None:
        self._store = store
        self._spool = spool
        self.encrypt = encrypt  # False: new items are written as they are (reading still works)
        self._cond = threading.Condition()
        self._storing = 0  # items being sealed and stored now
        self._rotating = False
        self._current: tuple[int, bytes] | None = None
        self._collecting = 0  # backups collecting what their bundle holds
        self._disposing = 0  # purges and sweeps under way (each rotates the key at its end)

    @property
    def key_dir(self) -> Path:
        return self._store.key_dir

    def open(self) -> None:
        """At start: the key folder ready, a rotation a killed process left finished, and
        a key-encryption key to wrap new data keys under."""
        self._store.prepare()
        with self._exclusive():
            versions = self._store.versions()
            for version in self._spool.data_key_versions():
                if version not in versions:
                    for stored in self._spool.sample_data_keys(version, around=""):
                        self._check_version(stored)  # a version medgw never wrote there
                    self._store.load(version)  # the error naming the missing key
            if not versions:
                # Another node sharing the folder, started at this moment, may make it
                # first: its key is the one.
                with contextlib.suppress(FileExistsError):
                    self._store.create(1)
            self._finish_rotation()

    # -- backups and purges ---------------------------------------------------

    @contextlib.contextmanager
    def collecting(self) -> Iterator[None]:
        """A backup collects what its bundle holds inside this block: it starts once no
        purge or sweep of this process is under way, and none starts until it ends (their
        key rotation would destroy the key the bundle's data keys are wrapped under)."""
        with self._cond:
            self._cond.wait_for(lambda: self._disposing == 0)
            self._collecting += 1
        try:
            yield
        finally:
            with self._cond:
                self._collecting -= 1
                self._cond.notify_all()

    @contextlib.contextmanager
    def disposing(self) -> Iterator[bool]:
        """A purge or sweep (and the rotation that ends it) inside this block; True: it
        may go on, False: a backup is collecting now (see :meth:`collecting`), and it
        must not dispose of anything."""
        with self._cond:
            free = self._collecting == 0
            if free:
                self._disposing += 1
        try:
            yield free
        finally:
            if free:
                with self._cond:
                    self._disposing -= 1
                    self._cond.notify_all()

    # -- keys ---------------------------------------------------------------

    @contextlib.contextmanager
    def _exclusive(self) -> Iterator[None]:
        """No item is being stored meanwhile (a rotation must not destroy the key a data
        key being stored is wrapped under)."""
        with self._cond:
            self._cond.wait_for(lambda: not self._rotating)
            self._rotating = True
            self._cond.wait_for(lambda: self._storing == 0)
        try:
            yield
        finally:
            with self._cond:
                self._rotating = False
                self._current = None
                self._cond.notify_all()

    @contextlib.contextmanager
    def storing(self, item: str) -> Iterator[Sealing]:
        """Seal ``item`` and store it (with ``.key``, in the spool) inside this block: a
        rotation waits for it to end."""
        with self.storing_all([item]) as [sealing]:
            yield sealing

    @contextlib.contextmanager
    def storing_all(self, items: Sequence[str]) -> Iterator[list[Sealing]]:
        """Seal several ``items`` and store them (their keys in one spool transaction)
        inside this one block: a rotation waits for it to end.  (Blocks nested in one
        thread instead could wait forever for a rotation that waits for the outer one.)"""
        with self._cond:
            self._cond.wait_for(lambda: not self._rotating)
            self._storing += 1
        try:
            yield [Sealing(self, item) for item in items]
        finally:
            with self._cond:
                self._storing -= 1
                self._cond.notify_all()

    def _kek(self, *, newest: bool = False) -> tuple[int, bytes]:
        """The key-encryption key to wrap under (cached); ``newest``: checked against the
        key folder first, where another node sharing it may have rotated since."""
        with self._cond:
            if self._current is not None and newest:
                versions = self._store.versions()
                if not versions or versions[-1] != self._current[0]:
                    self._current = None
            if self._current is None:
                versions = self._store.versions()
                if not versions:
                    raise AtRestError(
                        f"no key-encryption key in {self._store.key_dir}",
                        fix="start medgw (it creates one), or put back this state's key folder",
                    )
                self._current = (versions[-1], self._store.load(versions[-1]))
            return self._current

    def new_key(self, item: str) -> tuple[bytes, DataKey]:
        """A fresh data key for ``item`` and its wrapped form (call inside :meth:`storing`):
        wrapped under the newest key-encryption key, never one a rotation destroys."""
        dek = secrets.token_bytes(chunked.KEY_BYTES)
        return dek, self.wrap_key(item, dek)

    def wrap_key(self, item: str, dek: bytes) -> DataKey:
        """``dek`` (of ``item``) wrapped as :meth:`new_key` wraps (call inside
        :meth:`storing`): under the key this node knows as the newest; the spool's
        transaction that stores it checks that against the key folder (see
        :meth:`_current_key`)."""
        version, kek = self._kek()
        wrapped = DataKey(item, version, wrap(kek, dek))
        return dataclasses.replace(wrapped, current=lambda: self._current_key(wrapped, dek))

    def _current_key(self, wrapped: DataKey, dek: bytes) -> DataKey:
        """The data key ``wrapped`` (``dek``) as the spool stores it: wrapped under the
        newest key-encryption key, found in the key folder under the lock of
        :meth:`rotate`'s re-wrapping.  A rotation on another node sharing the key folder
        either re-wraps it after this commits, or made its new key before, which this then
        wraps under (the older one it destroys is not used)."""
        version, kek = self._kek(newest=True)
        if version == wrapped.kek:
            return wrapped  # as wrapped before the lock: the usual case, no second wrap
        return DataKey(wrapped.item, version, wrap(kek, dek))

    def _key(self, item: str) -> bytes:
        retried = False
        while True:
            stored = self._spool.data_key(item)
            if stored is None:
                raise DataKeyMissingError(
                    f"the data key of {item} is not in the spool: the item was disposed of, "
                    "or the spool was replaced by one from elsewhere",
                    fix="restore the spool and its stored files from the same backup",
                )
            version, kek = self._kek()
            if stored.kek > version:  # another node rotated: its key is the newest
                version, kek = self._kek(newest=True)
            if stored.kek != version:
                try:
                    kek = self._store.load(stored.kek)
                except AtRestError:
                    if retried:
                        self._check_version(stored)
                        raise
                    retried = True  # a rotation re-wrapped it and destroyed that key since
                    with self._cond:
                        self._cond.wait_for(lambda: not self._rotating)
                    continue
            try:
                return unwrap(kek, stored.wrapped, item)
            except AtRestError:
                if not self._others_unwrap(stored.kek, kek, item):
                    raise
            raise _altered(
                stored,
                f"does not unwrap under its key-encryption key (version {stored.kek}), while"
                " another item's data key wrapped under the same key does",
            )

    def _others_unwrap(self, version: int, kek: bytes, item: str) -> bool:
        """Whether ``kek`` (the key-encryption key of ``version``) is the right one: a data
        key of another item wrapped under ``version`` (the nearest to ``item`` on either
        side, at most two) unwraps under it.  If so, a record of ``item`` that does not
        unwrap was changed in the spool; if none is there or all fail, the key folder may
        hold another state's key of that version (an operator's matter).  A bound, not a
        proof: whoever can write the spool can also put rows that do not unwrap beside
        the one changed, and the receipt is then "cannot be opened now" (no alert)."""
        for other in self._spool.sample_data_keys(version, around=item):
            try:
                unwrap(kek, other.wrapped, other.item)
            except AtRestError:
                continue
            return True
        return False

    def _check_version(self, stored: DataKey) -> None:
        """Raise DataKeyAlteredError if ``stored`` names a key-encryption key version
        (missing from the key folder) that medgw never wrapped it under: one below 1
        (versions are numbered from 1), or one no other data key is wrapped under while
        a data key under the key folder's newest key unwraps (the key folder is this
        state's).  A key folder not put back after a restore lacks the key of every data
        key of that version, not of one alone: that error stands (an operator's matter)."""
        if stored.kek >= 1:
            if self._spool.sample_data_keys(stored.kek, around=stored.item):
                return
            versions = self._store.versions()
            if not versions:
                return
            try:
                kek = self._store.load(versions[-1])
            except AtRestError:
                return  # that key cannot be used either: the key folder's matter
            if not self._others_unwrap(versions[-1], kek, stored.item):
                return
        raise _altered(
            stored,
            f"names key-encryption key version {stored.kek}, which is not in the key folder"
            " and under which medgw wrapped no other data key, while the key folder's own"
            " keys unwrap the other items' data keys",
        )

    # -- reading ------------------------------------------------------------

    def _in_clear(self, item: str) -> None:
        """``item`` is stored in the clear: fine for one stored before at-rest encryption
        (or while it was off), which has no data key; one with a data key was stored
        encrypted and has been replaced (AtRestTamperedError)."""
        if self._spool.data_key(item) is not None:
            raise chunked.stored_in_clear(item)

    def open_bytes(self, item: str, stored: bytes) -> bytes:
        """The plaintext of an item kept in the spool (as it is, if stored in plaintext)."""
        if not chunked.is_sealed(stored):
            self._in_clear(item)
            return stored
        return chunked.open_bytes(self._key(item), item, stored)

    def reader(self, item: str, path: Path) -> BinaryIO:
        """The stored file ``path`` of ``item``, opened for reading its plaintext."""
        handle = path.open("rb")
        try:
            if not chunked.is_sealed(handle.read(len(chunked.MAGIC))):
                self._in_clear(item)
                handle.seek(0)
                return handle
            handle.seek(0)
            raw = chunked.OpeningReader(self._key(item), item, handle)
        except BaseException:
            handle.close()
            raise
        return cast(BinaryIO, raw)  # reads whole chunks: no buffer in front

    def size(self, item: str, path: Path) -> int:
        """The plaintext size of the stored file ``path`` of ``item``."""
        with path.open("rb") as handle:
            sealed = chunked.is_sealed(handle.read(len(chunked.MAGIC)))
            size = os.fstat(handle.fileno()).st_size
        return chunked.plaintext_size(size, item) if sealed else size

    def read_file(self, item: str, path: Path) -> bytes:
        """All of a small stored file (a receipt)."""
        with self.reader(item, path) as handle:
            return handle.read()

    # -- rotation ------------------------------------------------------------

    def rotate(self) -> Rotated:
        """After a purge: a new key-encryption key, every surviving data key re-wrapped
        under it, the old key destroyed, the spool's deleted rows overwritten."""
        with self._exclusive():
            return self._finish_rotation(create=True)

    def _finish_rotation(self, *, create: bool = False) -> Rotated:
        """In one transaction of the spool, under the lock every store of a data key takes
        (of this node and of the others sharing the spool and the key folder): with
        ``create``, a new key-encryption key; what older keys wrap re-wrapped under the
        newest.  Then the spool's log of the old wrapped keys emptied, and the older keys
        destroyed (in this order: a kill at any step leaves what the next :meth:`open`
        finishes)."""
        versions = self._store.versions()
        if not create and len(versions) < 2:
            return Rotated(versions[-1], True)
        loaded: dict[int, bytes] = {}
        made: list[int] = []

        def load(version: int) -> bytes:
            if version not in loaded:
                loaded[version] = self._store.load(version)
            return loaded[version]

        def newest() -> int:
            versions = self._store.versions()
            if create and not made:  # once, if the spool runs the transaction again
                made.append((versions[-1] if versions else 0) + 1)
                self._store.create(made[0])
                return made[0]
            return versions[-1]

        def rewrap(key: DataKey, new: int) -> bytes:
            return wrap(load(new), unwrap(load(key.kek), key.wrapped, key.item))

        new = self._spool.rewrap_data_keys(newest, rewrap)
        log_emptied = self._spool.shred()
        for old in self._store.versions():
            if old < new:  # nothing is, or will be, wrapped under it
                self._store.destroy(old)
        return Rotated(new, log_emptied)


class Rotated(NamedTuple):
    """A rotation done: the newest key-encryption key's version, and whether the spool's
    write-ahead log could be emptied (see :meth:`Spool.shred`)."""

    version: int
    log_emptied: bool


class Sealing:
    """One item being sealed (see :func:`storing`); ``key`` is what the spool stores with
    it (None: there is no vault; :meth:`DataKey.cleared`: at-rest encryption is off, the
    item is stored as it is)."""

    def __init__(self, vault: Vault | None, item: str) -> None:
        self._vault = vault
        self.item = item
        self.key: DataKey | None = None
        self._dek: bytes | None = None

    @property
    def encrypting(self) -> bool:
        return self._vault is not None and self._vault.encrypt

    def begin(self) -> bytes | None:
        """The item's data key (made at the first call; None: stored as it is, ``key``
        then :meth:`DataKey.cleared`), with ``key`` set, for a caller that stores the
        key before the item."""
        if self._dek is None and self._vault is not None:
            if not self._vault.encrypt:
                self.key = DataKey.cleared(self.item)  # a key it had would call it replaced
            else:
                self._dek, self.key = self._vault.new_key(self.item)
        return self._dek

    def adopt(self, dek: bytes | None) -> None:
        """Store the item under ``dek`` (from :func:`new_data_key`), made before this
        block: a body written over a long upload, whose key is wrapped only now, so
        that no rotation waits for the upload."""
        if self._vault is None:
            return
        if dek is not None:
            self._dek, self.key = dek, self._vault.wrap_key(self.item, dek)
        elif not self._vault.encrypt:
            self.key = DataKey.cleared(self.item)

    def seal(self, plain: bytes) -> bytes:
        """``plain`` as it is to be stored in the spool."""
        dek = self.begin()
        return plain if dek is None else chunked.seal_bytes(dek, self.item, plain)

    def write(
        self, target: Path, chunks: Iterable[bytes], folders: FolderSync | None = None
    ) -> int:
        """``chunks`` stored as the file ``target`` (mode 0600): written beside it, synced,
        renamed into place (the folder's fsync shared through ``folders``, if given, with
        other files stored there at that moment).  Returns the size of what was stored
        (before encryption)."""
        dek = self.begin()
        tmp = partial_name(target)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        size = 0
        try:
            with os.fdopen(fd, "wb", buffering=chunked.CHUNK * 4) as out:
                if dek is None:
                    for chunk in chunks:
                        out.write(chunk)
                        size += len(chunk)
                else:
                    size = chunked.seal_stream(dek, self.item, chunks, out)
                out.flush()
                os.fsync(out.fileno())
            os.replace(tmp, target)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        if folders is not None:
            folders.sync(target.parent)
        else:
            fsync_dir(target.parent)
        return size


@contextlib.contextmanager
def storing(vault: Vault | None, item: str) -> Iterator[Sealing]:
    """Seal ``item`` and store it (with its key) inside this block (see
    :meth:`Vault.storing`); without a vault, it is stored as it is."""
    with storing_all(vault, [item]) as [sealing]:
        yield sealing


@contextlib.contextmanager
def storing_all(vault: Vault | None, items: Sequence[str]) -> Iterator[list[Sealing]]:
    """Seal several ``items`` and store them (with their keys) inside this one block (see
    :meth:`Vault.storing_all`); without a vault, they are stored as they are."""
    if vault is None:
        yield [Sealing(None, item) for item in items]
        return
    with vault.storing_all(items) as sealings:
        yield sealings


def new_data_key(vault: Vault | None) -> bytes | None:
    """A data key for an item written before its key can be stored (see
    :meth:`Sealing.adopt`); None when items are stored as they are."""
    if vault is None or not vault.encrypt:
        return None
    return secrets.token_bytes(chunked.KEY_BYTES)


def open_bytes(vault: Vault | None, item: str, stored: bytes) -> bytes:
    """The plaintext of an item kept in the spool (see :meth:`Vault.open_bytes`)."""
    if vault is None:
        if chunked.is_sealed(stored):
            raise _no_vault(item)
        return stored
    return vault.open_bytes(item, stored)


def open_file(vault: Vault | None, item: str, path: Path) -> BinaryIO:
    """The stored file ``path`` of ``item``, for reading its plaintext."""
    if vault is None:
        handle = path.open("rb")
        if chunked.is_sealed(handle.read(len(chunked.MAGIC))):
            handle.close()
            raise _no_vault(item)
        handle.seek(0)
        return handle
    return vault.reader(item, path)


def _no_vault(item: str) -> AtRestError:
    return AtRestError(
        f"{item} is stored encrypted at rest, and this process has no key folder to open it",
        fix="read it through the running daemon (medgw queue show), or with [at_rest] key_dir set",
    )


def _altered(stored: DataKey, how: str) -> DataKeyAlteredError:
    """The data key ``stored`` (of its item), which ``how``: changed in the spool."""
    return DataKeyAlteredError(
        f"the data key of {stored.item} in the spool {how}: the spool's record of it was"
        " changed outside medgw",
        fix="restore the spool and its stored files from the same backup; or, in a"
        " cluster, the nodes do not share one key folder: give every node the same"
        " [at_rest] key_dir",
    )
