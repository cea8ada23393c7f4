"""CRLs fetched by the daemon's keeper (gateway.pki.crlfetch) from a real HTTP
distribution point on 127.0.0.1, through the zone's route of the connect path,
on an injected clock; ``openssl ca -gencrl`` makes the reference CRLs."""

from __future__ import annotations

import os
import random
import shutil
import tracemalloc
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.serialization import Encoding

from gateway.demo_run import free_port
from gateway.egress import Network, Refused
from gateway.pki import crlfetch, issue
from gateway.pki.crlfetch import CrlKeeper, Wanted, distribution_points, wanted_points
from gateway.pki.validate import Purpose, RevocationPolicy, validate
from gateway.policy import AlgorithmPolicy
from tests.clocks import SetClock
from tests.crl_server import DistributionPoint, openssl_crl
from tests.routes import zone_map

pytestmark = pytest.mark.skipif(shutil.which("openssl") is None, reason="openssl not on PATH")

START = datetime(2026, 11, 27, 3, 0, tzinfo=UTC)


@dataclass
class World:
    ca: issue.Issued
    peer: x509.Certificate
    point: DistributionPoint
    clock: SetClock
    refused: list[Refused]
    work: Path

    def keeper(self, *ranges: str, refresh_hours: int = 6) -> CrlKeeper:
        network = Network(
            lambda: zone_map(None, *(ranges or ("127.0.0.0/8",))), on_refused=self.refused.append
        )
        keeper = CrlKeeper(self.work / "crls", self.clock, network.zone, random.Random(7))
        keeper.plan(self.wanted(), {"z": refresh_hours})
        return keeper

    def wanted(self) -> list[Wanted]:
        return wanted_points("z", [self.ca.certificate], [self.peer])

    def crl(self, *, days: int = 7, revoked: tuple[x509.Certificate, ...] = (), number: int = 1):
        return issue.make_crl(
            self.ca,
            now=self.clock.now() - timedelta(minutes=1),
            days=days,
            revoked=[(c.serial_number, self.clock.now() - timedelta(minutes=2)) for c in revoked],
            number=number,
        )


@pytest.fixture
def world(tmp_path: Path) -> Iterator[World]:
    ca = issue.make_ca("Regional CA", now=START - timedelta(days=1))
    point = DistributionPoint(free_port())
    peer = issue.issue(
        ca, "LAB-01", purpose="tls", now=START - timedelta(hours=1), crl_url=point.url
    ).certificate
    try:
        yield World(ca, peer, point, SetClock(START), [], tmp_path)
    finally:
        point.stop()


async def _status(world: World, crls: tuple[x509.CertificateRevocationList, ...]):
    return await validate(
        world.peer,
        anchors=[world.ca.certificate],
        purpose=Purpose.TLS_SERVER,
        at=world.clock.now(),
        revocation=RevocationPolicy.REQUIRE,
        policy=AlgorithmPolicy(),
        crls=crls,
    )


def test_the_distribution_points_are_the_http_urls_of_the_certificate(world: World) -> None:
    assert distribution_points(world.peer) == [world.point.url]
    assert wanted_points("z", [world.ca.certificate], [world.peer]) == [
        Wanted("z", world.point.url, (world.ca.certificate,))
    ]
    # A certificate of a CA the zone does not trust names no point to fetch for it.
    other = issue.make_ca("Other CA", now=START - timedelta(days=1))
    assert wanted_points("z", [other.certificate], [world.peer]) == []


async def test_fresh_fetch_is_verified_cached_and_read_back_verified(world: World) -> None:
    crl = world.crl()
    world.point.serve(crl)
    keeper = world.keeper()
    assert keeper.crls("z") == ()
    [outcome] = await keeper.refresh_due()
    assert outcome.error is None and outcome.crl is not None
    assert keeper.crls("z")[0].public_bytes(Encoding.DER) == crl.public_bytes(Encoding.DER)
    assert world.point.clients == ["127.0.0.1"]
    [cached] = (world.work / "crls" / "z").glob("*.crl")
    assert cached.read_bytes() == crl.public_bytes(Encoding.DER)
    assert cached.stat().st_mode & 0o077 == 0
    assert not [p for p in cached.parent.iterdir() if p.name.startswith(".")]
    # A restart with the distribution point down: the cached CRL is used at once.
    world.point.stop()
    again = world.keeper()
    assert again.crls("z")[0].public_bytes(Encoding.DER) == crl.public_bytes(Encoding.DER)
    # A cache file that was tampered with is not used.
    cached.write_bytes(cached.read_bytes()[:-4] + b"\x00\x00\x00\x00")
    assert world.keeper().crls("z") == ()


async def test_a_revoked_peer_is_refused_once_the_openssl_crl_arrives(world: World) -> None:
    world.clock.at = datetime.now(UTC)  # openssl dates its CRLs by the real clock
    world.point.serve(openssl_crl(world.work / "ca1", world.ca, revoked={}, valid=(world.peer,)))
    keeper = world.keeper()
    await keeper.refresh_due()
    assert (await _status(world, keeper.crls("z"))).valid
    revoked = openssl_crl(
        world.work / "ca2",
        world.ca,
        revoked={world.peer: world.clock.now() - timedelta(minutes=5)},
        number=2,
    )
    world.point.serve(revoked)
    world.clock.at = keeper.next_due() or world.clock.at
    [outcome] = await keeper.refresh_due()
    assert outcome.crl is not None
    result = await _status(world, keeper.crls("z"))
    assert not result.valid and "revoked" in (result.reason or "")


async def test_refresh_comes_before_next_update_with_jitter_and_takes_the_new_crl(
    world: World,
) -> None:
    world.point.serve(world.crl(days=1))
    keeper = world.keeper(refresh_hours=48)
    await keeper.refresh_due()
    first = keeper.crls("z")[0]
    due = keeper.next_due()
    assert due is not None and first.next_update_utc is not None
    # Half to three fifths of the day left: well before nextUpdate, not at once.
    assert (
        world.clock.now() + timedelta(hours=11) < due < first.next_update_utc - timedelta(hours=9)
    )
    world.clock.at = due - timedelta(seconds=1)
    assert await keeper.refresh_due() == []  # not due yet: nothing asked
    assert world.point.requests == 1
    newer = world.crl(days=1, number=2)
    world.point.serve(newer)
    world.clock.at = due
    [outcome] = await keeper.refresh_due()
    assert outcome.crl is not None
    assert keeper.crls("z")[0].public_bytes(Encoding.DER) == newer.public_bytes(Encoding.DER)


async def test_a_long_lived_crl_is_fetched_again_within_refresh_hours(world: World) -> None:
    world.point.serve(world.crl(days=30))
    keeper = world.keeper(refresh_hours=6)
    await keeper.refresh_due()
    due = keeper.next_due()
    now = world.clock.now()
    assert due is not None and now + timedelta(hours=5.4) <= due <= now + timedelta(hours=6)


async def test_server_down_backs_off_and_alerts_once_the_cached_crl_goes_stale(
    world: World,
) -> None:
    world.point.serve(world.crl(days=2))
    keeper = world.keeper()
    await keeper.refresh_due()
    assert keeper.findings("z", warn_days=7) == []  # refreshing well: nothing to act on
    world.point.stop()
    waits = []
    for _ in range(5):
        world.clock.at = keeper.next_due() or world.clock.at
        [outcome] = await keeper.refresh_due()
        assert outcome.error is not None and "unreachable" in outcome.error.message
        assert outcome.next_attempt is not None
        waits.append((outcome.next_attempt - world.clock.now()).total_seconds())
    assert 40 <= waits[0] <= 80 and waits[1] > waits[0] and waits[4] > waits[2]
    [warning] = keeper.findings("z", warn_days=7)
    assert warning.severity == "warning" and "unreachable" in warning.message
    # The held CRL is still used while it is fresh ...
    assert len(keeper.crls("z")) == 1
    # ... and once its nextUpdate has passed, the finding is an error (the alert).
    world.clock.at = START + timedelta(days=2, minutes=1)
    [stale] = keeper.findings("z", warn_days=7)
    assert stale.severity == "error" and "stale" in stale.message


async def test_a_point_that_never_answered_is_an_error_finding(world: World) -> None:
    world.point.stop()
    keeper = world.keeper()
    await keeper.refresh_due()
    [finding] = keeper.findings("z", warn_days=7)
    assert finding.severity == "error" and world.point.url in finding.message


@pytest.mark.parametrize("same_name", [True, False], ids=["same-name-other-key", "other-ca"])
async def test_a_crl_signed_by_another_ca_is_refused(world: World, same_name: bool) -> None:
    other = issue.make_ca("Regional CA" if same_name else "Other CA", now=START - timedelta(days=1))
    world.point.serve(issue.make_crl(other, now=START - timedelta(minutes=1)))
    keeper = world.keeper()
    [outcome] = await keeper.refresh_due()
    assert outcome.error is not None and "not used" in outcome.error.message
    assert keeper.crls("z") == ()
    assert not (world.work / "crls" / "z").exists() or not list(
        (world.work / "crls" / "z").glob("*.crl")
    )


async def test_an_older_crl_is_not_taken_over_the_one_held(world: World) -> None:
    old = world.crl(number=1)
    world.clock.at = START + timedelta(hours=1)
    new = world.crl(number=2)
    world.point.serve(new)
    keeper = world.keeper()
    await keeper.refresh_due()
    world.point.serve(old)  # a replay of an earlier CRL, which did not list a revocation
    world.clock.at = keeper.next_due() or world.clock.at
    [outcome] = await keeper.refresh_due()
    assert outcome.error is not None and "older" in outcome.error.message
    assert keeper.crls("z")[0].public_bytes(Encoding.DER) == new.public_bytes(Encoding.DER)


async def test_a_distribution_point_outside_the_zone_is_not_asked(world: World) -> None:
    world.point.serve(world.crl())
    keeper = world.keeper("10.0.0.0/8")
    [outcome] = await keeper.refresh_due()
    assert outcome.error is not None and "not asked" in outcome.error.message
    assert "outside the egress" in outcome.error.message
    assert world.point.requests == 0
    assert [r.address for r in world.refused] == ["127.0.0.1"]


async def test_a_crl_larger_than_the_bound_is_not_read_whole(
    world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    world.point.body = b"\x30" * 4096
    monkeypatch.setattr(crlfetch, "MAX_CRL_BYTES", 1024)
    keeper = world.keeper()
    [outcome] = await keeper.refresh_due()
    assert outcome.error is not None and "larger than 1024 bytes" in outcome.error.message


def test_a_cache_file_is_read_up_to_the_limit_never_whole(world: World) -> None:
    """The cache is in the state folder: a file grown far past MAX_CRL_BYTES (a full disk's
    worth, or a device put in its place) is refused after reading at most the limit, never
    read whole into memory."""
    world.point.serve(world.crl())
    keeper = world.keeper()
    [wanted] = world.wanted()
    cached = keeper._cache_path(wanted)
    cached.parent.mkdir(parents=True, mode=0o700)
    with cached.open("wb") as handle:
        os.fchmod(handle.fileno(), 0o600)
        handle.truncate(16 * crlfetch.MAX_CRL_BYTES)  # sparse: costs no disk
    tracemalloc.start()
    try:
        assert world.keeper().crls("z") == ()
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 2 * crlfetch.MAX_CRL_BYTES
    # In place of the file, a device that never ends: refused, not read.
    cached.unlink()
    cached.symlink_to("/dev/zero")
    assert world.keeper().crls("z") == ()


def _short_crl(world: World, seconds: float, number: int = 1) -> x509.CertificateRevocationList:
    """A CRL of ``world``'s CA whose nextUpdate is ``seconds`` from the clock's now."""
    now = world.clock.now()
    return (
        x509.CertificateRevocationListBuilder()
        .issuer_name(world.ca.certificate.subject)
        .last_update(now - timedelta(seconds=1))
        .next_update(now + timedelta(seconds=seconds))
        .add_extension(x509.CRLNumber(number), critical=False)
        .sign(world.ca.key, hashes.SHA256())
    )


async def test_a_crl_lapsing_within_a_minute_is_still_refreshed_before_its_next_update(
    world: World,
) -> None:
    """The minute between two fetches gives way to nextUpdate: a CRL with 40 seconds left is
    fetched again at half of them, never after it lapses; one already lapsed waits the
    minute (no tight loop against the distribution point)."""
    world.point.serve(_short_crl(world, 40))
    keeper = world.keeper()
    await keeper.refresh_due()
    due = keeper.next_due()
    now = world.clock.now()
    assert due is not None and now + timedelta(seconds=20) <= due < now + timedelta(seconds=25)
    # Nearly lapsed: at most once a second.
    world.clock.at = due
    world.point.serve(_short_crl(world, 1.2, number=2))
    await keeper.refresh_due()
    assert keeper.next_due() == world.clock.now() + timedelta(seconds=1)
    # Lapsed, and the distribution point still serves it: the minute again.
    world.clock.at += timedelta(seconds=5)
    await keeper.refresh_due()
    assert keeper.next_due() == world.clock.now() + timedelta(seconds=crlfetch.MIN_REFRESH_SECONDS)
