"""Shared fixtures: a demo PKI with two institutions, and real ``medgw run`` processes."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Iterator, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Protocol

import pytest
from hypothesis import settings

from gateway.clock import Clock
from gateway.demo_run import GatewayProcess, free_port, free_ports
from gateway.pki.demo import DemoLayout
from gateway.spool import Claimant, Spool, SqliteSpool
from gateway.spool.postgres import PostgresSettings, PostgresSpool
from tests.helpers.demo import new_demo
from tests.helpers.listener import SilentPeer, silent_peer
from tests.helpers.postgres import (
    SKIP_REASON,
    PostgresServer,
    running_server,
    server_binaries,
    spool_section,
)
from tests.helpers.zones import World, two_zone_world
from tests.rsyslog import Collector
from tests.testdata import OUTSIDE

# No property test has a wall-clock deadline per example: on a loaded machine a
# correct example can take longer than hypothesis' default 200 ms, and how fast
# the code is is measured in bench/, not asserted by a test.
settings.register_profile("medgw", deadline=None)
settings.load_profile("medgw")

# Set by CI (.ci/run), which installs everything the suite needs: there a test that
# skips (no PostgreSQL, openssl, root, a namespace...) is a failure, so a missing part
# can never pass for a check that ran.  Except test data from outside the project
# (tests/testdata.py), which no installation brings.
EVERY_TEST_RUNS = "MEDGW_EVERY_TEST_RUNS"


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    outcome = yield
    report = outcome.get_result()  # type: ignore[attr-defined]
    if report.skipped and os.environ.get(EVERY_TEST_RUNS):
        reason = report.longrepr[-1] if isinstance(report.longrepr, tuple) else report.longrepr
        if OUTSIDE in str(reason):
            return
        report.outcome = "failed"
        report.longrepr = f"skipped where every test must run ({EVERY_TEST_RUNS} is set): {reason}"


@pytest.hookimpl(hookwrapper=True)
def pytest_make_collect_report(collector: pytest.Collector) -> Iterator[None]:
    """A whole module skipped while being collected (`pytest.skip(allow_module_level=True)`,
    `pytest.importorskip`) is a failure there too."""
    outcome = yield
    report = outcome.get_result()  # type: ignore[attr-defined]
    if report.skipped and os.environ.get(EVERY_TEST_RUNS):
        reason = report.longrepr[-1] if isinstance(report.longrepr, tuple) else report.longrepr
        if OUTSIDE in str(reason):
            return
        report.outcome = "failed"
        report.longrepr = f"skipped where every test must run ({EVERY_TEST_RUNS} is set): {reason}"


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[PostgresServer]:
    """One real PostgreSQL server for the session (skipped where none is installed)."""
    bin_dir = server_binaries()
    if bin_dir is None:
        pytest.skip(SKIP_REASON)
    with running_server(bin_dir) as server:
        yield server


@pytest.fixture
def postgres(postgres_server: PostgresServer) -> PostgresSettings:
    """A new empty database on the session's server, for this test alone."""
    return postgres_server.new_database()


class MakeSpool(Protocol):
    def __call__(self, clock: Clock, claimant: Claimant | None = None) -> Spool: ...


@pytest.fixture(params=["sqlite", "postgresql"])
def make_spool(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[MakeSpool]:
    """Opens a spool of each backend in turn (a test that uses it runs on both): a file
    in tmp_path, or a database of its own on the session's PostgreSQL server."""
    opened: list[Spool] = []
    settings: PostgresSettings | None = None
    if request.param == "postgresql":
        settings = request.getfixturevalue("postgres")

    def make(clock: Clock, claimant: Claimant | None = None) -> Spool:
        """Another handle on the same spool each time (``claimant``: as that node)."""
        spool: Spool = (
            SqliteSpool(tmp_path / "spool.db", clock, claimant)
            if settings is None
            # Leases on the test's clock, which it moves to make them run out.
            else PostgresSpool(settings, clock, claimant, server_time=False)
        )
        opened.append(spool)
        return spool

    yield make
    for spool in opened:
        spool.close()


@pytest.fixture
async def silent() -> AsyncIterator[SilentPeer]:
    """A peer that accepts connections and never answers (tests/helpers/listener.py)."""
    async with silent_peer() as peer:
        yield peer


@pytest.fixture
def layout(tmp_path: Path) -> DemoLayout:
    return new_demo(tmp_path / "demo")


@pytest.fixture
def internal_port() -> Iterator[int]:
    """A free port for the internal system of the HTTP hand-over."""
    yield free_port()


@pytest.fixture
def world(tmp_path: Path) -> World:
    """Two zones on loopback addresses: 127.0.1.0/24 (zone A), 127.0.2.0/24 (zone B)."""
    ports = free_ports(4)
    return two_zone_world(
        tmp_path,
        hospital_a="127.0.1.1",
        hospital_b="127.0.2.1",
        lab_ip="127.0.1.2",
        pharmacy_ip="127.0.2.2",
        net_a="127.0.1.0/24",
        net_b="127.0.2.0/24",
        ports=(ports[0], ports[1], ports[2], ports[3]),
    )


@pytest.fixture
def collector(tmp_path: Path) -> Iterator[Collector]:
    """A real syslog-over-TLS collector (tests/rsyslog.py), not yet started."""
    found = Collector(tmp_path / "collector", now=datetime.now(UTC))
    try:
        yield found
    finally:
        found.stop()


class Processes:
    """Starts gateways and guarantees they are gone when the test ends."""

    def __init__(self) -> None:
        self.started: list[GatewayProcess] = []

    def start(
        self,
        config: Path,
        *,
        env: dict[str, str] | None = None,
        wait: bool = True,
        prefix: Sequence[str] = (),
    ) -> GatewayProcess:
        """``prefix`` wraps the command (see GatewayProcess), e.g. tests/faultpoint.py."""
        proc = GatewayProcess(config, env=env, prefix=prefix)
        self.started.append(proc)
        if wait:
            proc.wait_ready()
        return proc

    def cleanup(self) -> None:
        for proc in self.started:
            if proc.proc.poll() is None:
                proc.kill()
            # Shown by pytest only when the test failed: the daemon's own account.
            print(f"--- output of medgw run --config {proc.config}")
            print("\n".join(proc.raw))


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Every test that runs real ``medgw run`` processes is marked ``daemon``: such a test
    waits for what one process writes and reads what it or another writes, which is where
    a wrong wait shows up only now and then (``pytest -m daemon`` runs them alone)."""
    for item in items:
        if "processes" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.daemon)


@pytest.fixture
def processes() -> Iterator[Processes]:

    procs = Processes()
    try:
        yield procs
    finally:
        procs.cleanup()


@pytest.fixture(params=["sqlite", "postgresql"])
def spool_backend(request: pytest.FixtureRequest, layout: DemoLayout) -> str:
    """The hospital's spool: SQLite in its state folder, or a PostgreSQL database."""
    if request.param == "postgresql":
        with layout.hospital.config_path.open("a") as config:
            config.write(spool_section(request.getfixturevalue("postgres")))
    return str(request.param)
