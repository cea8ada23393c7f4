"""The readiness's folder checks run off the event loop: a folder on a network mount that
hangs holds neither the daemon nor its answers.

* A real folder mounted read-only: the readiness says so, and stops saying so once the
  folder is writable again and a check has run since.
* A check that hangs (the check is the readiness's own, given a function that blocks
  until the test lets it go): ``not_ready()`` answers at once with the last answer,
  and no second check starts while it hangs; once it has hung for twice the check's
  interval, the answer also says the checks do not answer (not ready).
"""

from __future__ import annotations

import asyncio
import threading

from gateway.config import GatewayConfig, load_config
from gateway.daemon.observe import FOLDER_CHECK_SECONDS, Observer
from gateway.logs import make_logger
from gateway.pki.demo import DemoLayout
from tests.clocks import SetClock
from tests.helpers.storage import read_only_folder


def observer_of(config: GatewayConfig, clock: SetClock, **kwargs: object) -> Observer:
    observer = Observer(
        clock,
        make_logger(),
        config=lambda: config,
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

    def check(checked: GatewayConfig) -> list[str]:
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
