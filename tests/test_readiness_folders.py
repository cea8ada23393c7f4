"""The readiness's folder checks run off the event loop: a folder on a network mount that
hangs holds neither the daemon nor its answers.

* A real folder mounted read-only: the readiness says so, and stops saying so once the
  folder is writable again and a check has run since.
* A check that hangs (the check is the readiness's own, given a function that blocks
  until the test lets it go): ``not_ready()`` answers at once with the last answer,
  and no second check starts while it hangs; once it has hung for twice the check's
  interval, the answer also says the checks do not answer (not ready).
* That limit is per folder: a check of many folders on a slow mount, each answering,
  takes longer than it and is no hang; one folder that does not answer is, named.
* An inbox folder's hard links are tried (files made in it, seen by inotify) once per
  configuration in force, not at every check; after a failure, at the next check again.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from pathlib import Path

from gateway.config import GatewayConfig, load_config
from gateway.config.access import access_problems
from gateway.daemon.observe import FOLDER_CHECK_SECONDS, Observer
from gateway.logs import make_logger
from gateway.pki.demo import DemoLayout
from tests.clocks import SetClock
from tests.helpers.inotify import Created
from tests.helpers.linkless import linkless_folder
from tests.helpers.storage import read_only_folder


def observer_of(
    config: GatewayConfig,
    clock: SetClock,
    in_force: Callable[[], GatewayConfig] | None = None,
    **kwargs: object,
) -> Observer:
    """An observer of the readiness, ``config`` in force (or what ``in_force`` gives)."""
    observer = Observer(
        clock,
        make_logger(),
        config=in_force or (lambda: config),
        spool=lambda: None,
        export_backlog=lambda: None,
        **kwargs,  # type: ignore[arg-type]
    )
    observer.readiness.started = True
    return observer


async def test_a_read_only_inbox_folder_is_not_ready_until_writable_and_checked_again(
    layout: DemoLayout,
) -> None:
    config = load_config(layout.hospital.config_path)
    clock = SetClock()
    observer = observer_of(config, clock)
    folder = layout.hospital.inbox_dir / "lab"
    with read_only_folder(folder) as inbox:
        await observer.check_folders()
        [reason] = observer.not_ready()
        assert f"the inbox's folder {folder} is on a file system mounted read-only" in reason
        assert f"(fix: {folder} is on a file system mounted read-only" in reason
        inbox.release()
        assert observer.not_ready() == [reason]  # the answer of the last check, still fresh
        clock.advance(FOLDER_CHECK_SECONDS)
        await observer.check_folders()
        assert observer.not_ready() == []


async def test_a_folder_check_that_hangs_holds_neither_the_loop_nor_the_answer(
    layout: DemoLayout,
) -> None:
    config = load_config(layout.hospital.config_path)
    clock = SetClock()
    hang, entered, release = threading.Event(), threading.Event(), threading.Event()
    hung_in: list[threading.Thread] = []

    def check(checked: GatewayConfig, _visit: Callable[[Path], None]) -> list[str]:
        assert checked is config
        if not hang.is_set():
            return ["the first answer"]
        hung_in.append(threading.current_thread())
        entered.set()
        release.wait()  # a folder on a mount that does not answer
        return ["a later answer"]

    observer = observer_of(config, clock, folder_check=check)
    await observer.check_folders()
    assert observer.not_ready() == ["the first answer"]
    hang.set()
    assert observer.not_ready() == ["the first answer"]  # fresh: not checked again
    assert not entered.is_set()
    clock.advance(FOLDER_CHECK_SECONDS)
    try:
        assert observer.not_ready() == ["the first answer"]  # a check starts; no wait
        await asyncio.to_thread(entered.wait)
        assert observer.not_ready() == ["the first answer"]  # it hangs: the last answer
        assert len(hung_in) == 1 and hung_in[0] is not threading.current_thread()
        clock.advance(2 * FOLDER_CHECK_SECONDS)  # and hangs on: not ready, saying why
        first, hanging = observer.not_ready()
        assert first == "the first answer"
        assert hanging.startswith(
            f"the folder checks have not answered for {2 * FOLDER_CHECK_SECONDS:.0f} s"
        ), hanging
        assert len(hung_in) == 1  # still the one check
    finally:
        release.set()
    await observer.check_folders()  # after the one that hung, not beside it
    assert observer.not_ready() == ["a later answer"]
    assert len(hung_in) == 2


async def test_the_hang_limit_is_per_folder_not_for_a_long_check_of_many(
    layout: DemoLayout, tmp_path: Path
) -> None:
    config = load_config(layout.hospital.config_path)
    clock = SetClock()
    folders = [tmp_path / f"peer-{n}" for n in range(40)]
    hung = tmp_path / "hung"
    midway, go_on, hanging, release = (threading.Event() for _ in range(4))

    def check(_checked: GatewayConfig, visit: Callable[[Path], None]) -> list[str]:
        for n, folder in enumerate(folders):
            visit(folder)
            clock.advance(1)  # each folder answers, in a second: a slow network mount
            if n == 3 * int(FOLDER_CHECK_SECONDS) * 2 - 1:
                midway.set()
                go_on.wait()
        visit(hung)
        hanging.set()
        release.wait()  # this one does not answer
        return []

    observer = observer_of(config, clock, folder_check=check)
    checking = asyncio.ensure_future(observer.check_folders())
    try:
        at_midway = asyncio.ensure_future(asyncio.to_thread(midway.wait))
        await asyncio.wait([checking, at_midway], return_when=asyncio.FIRST_COMPLETED)
        assert midway.is_set(), observer.not_ready()  # not a check that ended at once
        # Three times the limit since the check began, every folder answering: ready.
        assert observer.not_ready() == []
        go_on.set()
        await asyncio.to_thread(hanging.wait)
        assert observer.not_ready() == []
        clock.advance(2 * FOLDER_CHECK_SECONDS)
        [reason] = observer.not_ready()
        assert reason == (
            f"the folder {hung} has not answered its check for "
            f"{2 * FOLDER_CHECK_SECONDS:.0f} s (fix: a network mount that does not answer? "
            f"findmnt -T {hung}, and the mount's server)"
        ), reason
    finally:
        for event in (midway, go_on, release):
            event.set()
    await checking
    assert observer.not_ready() == []


def test_the_folder_checks_name_each_inbox_folder_before_its_calls(layout: DemoLayout) -> None:
    """What the per-folder limit relies on: the checks say which folder they are at."""
    config = load_config(layout.hospital.config_path)
    inbox = layout.hospital.inbox_dir
    (inbox / "lab").mkdir(parents=True, exist_ok=True)
    visited: list[Path] = []
    access_problems(config, daemon=True, visit=visited.append)
    assert {inbox, inbox / "lab", config.storage.state_dir} <= set(visited), visited


def _probes(created: Created) -> list[Path]:
    """The folders the hard-link probe made its first file in since the last look."""
    return sorted(p.parent for p in created.names() if p.name.startswith(".medgw-link-check."))


async def test_an_inbox_folders_hard_links_are_tried_once_a_configuration(
    layout: DemoLayout,
) -> None:
    in_force = [load_config(layout.hospital.config_path)]
    clock = SetClock()
    inbox = layout.hospital.inbox_dir
    (inbox / "lab").mkdir(parents=True, exist_ok=True)
    folders = sorted([inbox, inbox / "lab"])
    with Created(*folders) as created:
        # Watched from before the observer is made: it may start a check at once.
        observer = observer_of(in_force[0], clock, lambda: in_force[-1])
        await observer.check_folders()  # the start
        assert _probes(created) == folders
        for _ in range(3):  # a readiness probe every 5 s, an inbox tool watching
            clock.advance(FOLDER_CHECK_SECONDS)
            await observer.check_folders()
            assert observer.not_ready() == []
        assert _probes(created) == []
        in_force.append(load_config(layout.hospital.config_path))  # a reload
        await observer.check_folders()
        assert _probes(created) == folders
        clock.advance(FOLDER_CHECK_SECONDS)
        await observer.check_folders()
        assert _probes(created) == []

    # A folder whose links fail is tried again at each check until they pass.
    folder = inbox / "lab"
    with linkless_folder(folder) as linkless:
        clock.advance(FOLDER_CHECK_SECONDS)
        await observer.check_folders()
        [reason] = observer.not_ready()
        assert f"{folder} is on a file system that refuses hard links" in reason, reason
        linkless.release()
        with Created(folder) as created:
            clock.advance(FOLDER_CHECK_SECONDS)
            await observer.check_folders()
            assert observer.not_ready() == []
            assert _probes(created) == [folder]
            clock.advance(FOLDER_CHECK_SECONDS)
            await observer.check_folders()
            assert _probes(created) == []
