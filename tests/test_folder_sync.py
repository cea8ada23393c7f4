"""FolderSync: threads that change entries of one folder at the same moment share its
fsync, and none returns before a sync that began after its change has completed."""

from __future__ import annotations

import functools
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from gateway.fsutil import DeferredFolderSync, FolderSync, fsync_dir, write_atomic

DEADLINE = 30.0


def wait_for(condition: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + DEADLINE
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.001)


class GatedSync:
    """The real folder fsync, counted; the first call waits until the test opens the gate."""

    def __init__(self) -> None:
        self.calls: list[Path] = []
        self.first_entered = threading.Event()
        self.gate = threading.Event()
        self.fail_first = False

    def __call__(self, folder: Path) -> None:
        self.calls.append(folder)
        if len(self.calls) == 1:
            self.first_entered.set()
            assert self.gate.wait(DEADLINE)
            if self.fail_first:
                raise OSError(5, "Input/output error")
        fsync_dir(folder)


def start(target: Callable[[], object]) -> tuple[threading.Thread, list[BaseException]]:
    errors: list[BaseException] = []

    def run() -> None:
        try:
            target()
        except BaseException as exc:
            errors.append(exc)

    thread = threading.Thread(target=run)
    thread.start()
    return thread, errors


def test_callers_waiting_behind_one_sync_share_the_next(tmp_path: Path) -> None:
    gated = GatedSync()
    folders = FolderSync(gated)
    names = [tmp_path / f"doc-{i}" for i in range(8)]
    first, first_errors = start(lambda: write_atomic(names[0], [b"0"], folder_sync=folders))
    assert gated.first_entered.wait(DEADLINE)
    others = [
        start(functools.partial(write_atomic, name, [name.name.encode()], folder_sync=folders))
        for name in names[1:]
    ]
    wait_for(lambda: folders.waiting(tmp_path) == 8, "the other seven to ask")
    gated.gate.set()
    for thread, _ in [(first, first_errors), *others]:
        thread.join(DEADLINE)
    assert not first_errors and not any(errors for _, errors in others)
    # The first sync began before the others renamed their files: it cannot cover
    # them.  One more covers all seven, instead of seven one after the other.
    assert gated.calls == [tmp_path, tmp_path]
    assert sorted(p.name for p in tmp_path.iterdir()) == [p.name for p in names]
    assert folders.waiting(tmp_path) == 0


def test_a_sync_that_began_before_the_change_does_not_cover_it(tmp_path: Path) -> None:
    gated = GatedSync()
    folders = FolderSync(gated)
    first, _ = start(lambda: folders.sync(tmp_path))
    assert gated.first_entered.wait(DEADLINE)
    returned = threading.Event()

    def later() -> None:
        os.rename(_make(tmp_path / "new.tmp"), tmp_path / "new")
        folders.sync(tmp_path)
        returned.set()

    second, errors = start(later)
    wait_for(lambda: folders.waiting(tmp_path) == 2, "the second caller to ask")
    assert not returned.is_set()  # still waiting: the sync under way began before its rename
    gated.gate.set()
    first.join(DEADLINE)
    second.join(DEADLINE)
    assert not errors and returned.is_set()
    assert len(gated.calls) == 2


def _make(path: Path) -> Path:
    path.write_bytes(b"x")
    return path


def test_a_failed_sync_fails_its_caller_and_the_others_sync_again(tmp_path: Path) -> None:
    gated = GatedSync()
    gated.fail_first = True
    folders = FolderSync(gated)
    first, first_errors = start(lambda: folders.sync(tmp_path))
    assert gated.first_entered.wait(DEADLINE)
    others = [start(lambda: folders.sync(tmp_path)) for _ in range(3)]
    wait_for(lambda: folders.waiting(tmp_path) == 4, "three more callers")
    gated.gate.set()
    first.join(DEADLINE)
    for thread, _ in others:
        thread.join(DEADLINE)
    [error] = first_errors
    assert isinstance(error, OSError) and "Input/output error" in str(error)
    assert not any(errors for _, errors in others)  # covered by a sync that succeeded
    assert len(gated.calls) == 2


def test_a_missing_folder_is_an_error_of_its_caller(tmp_path: Path) -> None:
    folders = FolderSync()
    with pytest.raises(FileNotFoundError):
        folders.sync(tmp_path / "gone")
    assert folders.waiting(tmp_path / "gone") == 0
    folders.sync(tmp_path)  # and the folder that exists is synced as usual


def test_a_group_stored_by_one_thread_syncs_each_folder_once_when_flushed(
    tmp_path: Path,
) -> None:
    """Receipts settled in a group: their files written one after another by one thread,
    their folder synced once for them all, at the flush, through the shared FolderSync."""
    synced: list[Path] = []

    def counted(folder: Path) -> None:
        synced.append(folder)
        fsync_dir(folder)

    deferred = DeferredFolderSync(FolderSync(counted))
    (tmp_path / "a").mkdir()
    for n in range(5):
        write_atomic(tmp_path / "a" / f"r{n}.mdn", [b"receipt"], folder_sync=deferred)
    write_atomic(tmp_path / "other.mdn", [b"receipt"], folder_sync=deferred)
    assert synced == []  # nothing relies on them yet
    deferred.flush()
    assert sorted(synced) == sorted([tmp_path / "a", tmp_path])
    deferred.flush()  # nothing asked since
    assert len(synced) == 2
