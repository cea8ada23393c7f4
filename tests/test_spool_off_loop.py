"""The event loop keeps answering while the PostgreSQL spool does not.

A path to the database that has gone silent makes every new connection wait its
connect timeout.  The spool's calls of the loops that run on the event loop (the
hand-over worker, the AS2 handler's suspension check, the metrics scrape's
counts) must not wait there: the loop must answer everything else meanwhile.
"""

from __future__ import annotations

import asyncio
import io
import random
import subprocess
import sys
import threading
import time
from collections.abc import Awaitable, Callable
from dataclasses import replace
from pathlib import Path

import pytest

from gateway.audit import AuditLog
from gateway.clock import SystemClock
from gateway.config import load_config
from gateway.daemon.spoolview import SUSPENSIONS_SECONDS, SpoolView
from gateway.delivery.http import HandOver
from gateway.demo_run import wait_until
from gateway.egress import Network
from gateway.errors import SpoolError
from gateway.logs import make_logger
from gateway.pki.demo import DemoLayout
from gateway.spool import PeerControl, SqliteSpool
from gateway.spool.postgres import PostgresSettings, PostgresSpool
from tests.clocks import SecondsClock
from tests.conftest import Processes
from tests.helpers.commit_cut import CommitCut, spool_behind_a_cut
from tests.helpers.metrics import get, with_metrics
from tests.helpers.postgres import spool_section

pytestmark = pytest.mark.usefixtures("postgres_server")

CONNECT_TIMEOUT = 5
# A loop that waits for the silent database stands still a whole connect timeout; one
# that does not answers within a small part of it, even on a busy machine (a page once
# took 1.07 s here with five commands starting beside it, at a load of 5).  Half of it
# tells the two apart without taking a slow machine for a blocked loop.
BLOCKED = CONNECT_TIMEOUT / 2


cut, spool = spool_behind_a_cut(connect_timeout=CONNECT_TIMEOUT)


async def longest_stall(
    start: Callable[[], object], work: Awaitable[object], until: float
) -> float:
    """While a ticker measures the event loop: ``start()`` (once it ticks), then await
    ``work`` (which fails, the database not answering) for at most ``until`` seconds.
    The longest the loop went without running the ticker (seconds)."""
    longest = 0.0
    ticks = 0

    async def ticker() -> None:
        nonlocal longest, ticks
        last = time.monotonic()
        while True:
            await asyncio.sleep(0.02)
            now = time.monotonic()
            longest, ticks = max(longest, now - last), ticks + 1
            last = now

    ticking = asyncio.create_task(ticker())
    while ticks < 3:
        await asyncio.sleep(0.02)
    start()
    with pytest.raises((SpoolError, TimeoutError)):
        await asyncio.wait_for(work, timeout=until)
    await asyncio.sleep(0.1)  # the ticker's turn after a stall, if there was one
    ticking.cancel()
    return longest


def test_the_hand_over_worker_waits_for_the_database_off_the_event_loop(
    layout: DemoLayout, spool: PostgresSpool, cut: CommitCut
) -> None:
    config = load_config(layout.hospital.config_path)
    clock = SystemClock()
    audit = AuditLog(layout.hospital.root / "audit.jsonl", clock, node=spool.node)
    handover = HandOver(
        spool, lambda: audit, make_logger(stream=io.StringIO()), clock, lambda: config,
        random.Random(1), Network.fixed(config.network_map).internal(),
    )  # fmt: skip

    async def run() -> float:
        worker = asyncio.create_task(handover.run())
        await asyncio.sleep(0.5)  # a first look at the queue, on a live database
        assert not worker.done()

        def silence() -> None:
            cut.hang = True
            cut.drop()
            handover.wake()

        return await longest_stall(silence, worker, until=CONNECT_TIMEOUT * 3)

    stall = asyncio.run(run())
    assert stall < BLOCKED, f"the event loop stood still {stall:.1f} s"
    audit.close()


def silenced_gateway(
    layout: DemoLayout, processes: Processes, postgres: PostgresSettings, cut: CommitCut
) -> int:
    """The hospital's daemon on the spool behind the proxy, ready, then the path to the
    database made silent; its metrics port."""
    with layout.hospital.config_path.open("a") as config:
        config.write(
            spool_section(replace(postgres, socket_dir=cut.socket_dir))
            + f"connect_timeout_seconds = {CONNECT_TIMEOUT}\n"
        )
    port = with_metrics(layout.hospital)
    processes.start(layout.hospital.config_path)
    wait_until(lambda: get(port, "/health/ready")[0] == 200, 60, "the gateway ready")
    cut.hang = True
    cut.drop()
    return port


def slowest_page(port: int, going_on: Callable[[], bool]) -> float:
    """The status and metrics pages asked for again and again while ``going_on()``: the
    longest one took to be answered (seconds); each must be answered 200."""
    slowest = 0.0
    while going_on():
        for path in ("/health/live", "/metrics"):
            began = time.monotonic()
            status, _ = get(port, path)
            slowest = max(slowest, time.monotonic() - began)
            assert status == 200, path
        time.sleep(0.05)
    return slowest


@pytest.mark.daemon
def test_a_gateway_whose_database_went_silent_answers_its_status_page_meanwhile(
    layout: DemoLayout, processes: Processes, postgres: PostgresSettings, cut: CommitCut
) -> None:
    """A real daemon on the spool behind the proxy: once the path to the database goes
    silent, its loops wait for it in worker threads, and the status and metrics pages
    (served on the event loop) are answered at once, with the last counts."""
    port = silenced_gateway(layout, processes, postgres, cut)
    until = time.monotonic() + CONNECT_TIMEOUT * 4
    slowest = slowest_page(port, lambda: time.monotonic() < until)
    assert slowest < BLOCKED, f"a page took {slowest:.1f} s to answer"


@pytest.mark.daemon
def test_operator_commands_wait_for_a_silent_database_off_the_event_loop(
    layout: DemoLayout, processes: Processes, postgres: PostgresSettings, cut: CommitCut
) -> None:
    """``medgw peers`` and ``medgw queue`` commands, answered over the control socket,
    wait for the silent database in worker threads: the pages are answered meanwhile,
    and each command ends with the spool's error (what failed and what to do) once the
    database's connect timeout passes."""
    port = silenced_gateway(layout, processes, postgres, cut)
    commands = [
        subprocess.Popen(
            [sys.executable, "-m", "gateway", *args, "--config", str(layout.hospital.config_path)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        for args in (
            ("peers", "list"),
            ("peers", "suspend", "lab", "--reason", "planned work"),
            ("peers", "resume", "lab"),
            ("queue", "list"),
            ("handover", "list"),
        )
    ]
    deadline = time.monotonic() + 120
    slowest = slowest_page(
        port,
        lambda: time.monotonic() < deadline and any(c.poll() is None for c in commands),
    )
    for command in commands:
        _, error = command.communicate(timeout=1)
        assert command.returncode != 0 and "spool database" in error, (command.args, error)
        assert "is unreachable" in error and "Traceback" not in error, (command.args, error)
    assert slowest < BLOCKED, f"a page took {slowest:.1f} s to answer"


def test_the_spool_view_answers_from_memory_and_keeps_a_suspension_made_meanwhile(
    postgres: PostgresSettings, spool: PostgresSpool, cut: CommitCut, tmp_path: Path
) -> None:
    """Suspensions made on another node are seen at the next read; one made on this node
    at once, and a read that began before it does not undo it.  With the database
    silent, both answers stand, without waiting."""
    other = PostgresSpool(postgres, SystemClock())  # another node, straight to the server
    view = SpoolView(spool, SystemClock())
    view.load()
    assert not view.is_suspended("lab") and view.counts() == {}
    other.set_suspended("lab", True, "maintenance at the lab", "operator:b")
    other.add_intake("<m@hospital>", "lab", "a.hl7", "text/plain", tmp_path, tmp_path)
    assert not view.is_suspended("lab")  # not read yet
    view.load()
    assert view.is_suspended("lab") and view.counts() == {("lab", "intake"): 1}

    stale = spool.peer_controls()

    def read_while_resumed() -> dict[str, PeerControl]:
        view.suspension_changed("lab", False)  # this node's operator, during the read
        return stale

    spool.peer_controls = read_while_resumed  # type: ignore[method-assign]
    view.read_suspensions()
    del spool.peer_controls
    assert not view.is_suspended("lab")

    cut.hang = True
    cut.drop()
    began = time.monotonic()
    assert not view.is_suspended("lab") and view.counts() == {("lab", "intake"): 1}
    # A read of the silent database would wait its connect timeout; a busy machine may
    # hold this process a while between two reads of the clock (see BLOCKED).
    assert time.monotonic() - began < BLOCKED
    other.close()


async def test_a_suspension_on_another_node_is_seen_while_a_long_count_goes_on(
    tmp_path: Path,
) -> None:
    """The README's bound (about a second) holds while the queue is being counted: a
    count that takes long (a very large spool, a slow database) does not hold up the
    reading of the suspensions."""
    clock = SecondsClock()
    spool = SqliteSpool(tmp_path / "spool.sqlite3", clock)
    other = SqliteSpool(tmp_path / "spool.sqlite3", clock)  # another node
    view = SpoolView(spool, clock)
    view.load()
    clock.seconds += 3600  # the next count is due
    counting, counted = threading.Event(), threading.Event()
    count = spool.counts

    def long_count() -> dict[tuple[str, str], int]:
        counting.set()
        counted.wait(30)
        return count()

    spool.counts = long_count  # type: ignore[method-assign]
    running = asyncio.create_task(view.run())
    try:
        assert await asyncio.to_thread(counting.wait, 30)
        other.set_suspended("lab", True, "maintenance at the lab", "operator:b")
        deadline = time.monotonic() + 5 * SUSPENSIONS_SECONDS
        while not view.is_suspended("lab") and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        assert view.is_suspended("lab")
        assert not counted.is_set()  # still counting
    finally:
        counted.set()
        running.cancel()
        await asyncio.gather(running, return_exceptions=True)
        spool.close()
        other.close()
