"""CRLs kept fresh by a real daemon: the hospital's zone has no CRL files, only
``fetch_crls = true``; the lab's certificates name a real distribution point on
127.0.0.1 serving CRLs of the demo CA."""

from __future__ import annotations

import shutil
import signal
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from cryptography.x509.oid import NameOID

from gateway.demo_run import drop_file, free_port, wait_until
from gateway.pki.demo import DemoLayout
from gateway.pki.issue import make_ca, make_crl
from tests.cli import medgw
from tests.crl_server import DistributionPoint, openssl_crl
from tests.helpers.audit import events, wait_for_events
from tests.helpers.crl_world import CrlWorld
from tests.helpers.demo import wait_handshake_refused

pytestmark = pytest.mark.skipif(shutil.which("openssl") is None, reason="openssl not on PATH")


def _delivered(layout: DemoLayout, name: str) -> Path:
    return layout.hospital.inbox_dir / "lab" / name


def test_fetched_crl_admits_the_peer_and_a_new_one_revokes_it(
    layout: DemoLayout, processes: Any, tmp_path: Path
) -> None:
    point = DistributionPoint(free_port())
    try:
        world = CrlWorld(layout, point.url)
        point.serve(make_crl(world.ca, now=datetime.now(UTC) - timedelta(minutes=1), days=7))
        hospital = processes.start(layout.hospital.config_path)
        processes.start(layout.lab.config_path)
        [fetched] = wait_for_events(layout.hospital.audit_log, "pki.crl_fetched")
        assert fetched["detail"]["url"] == point.url and fetched["detail"]["zone"] == "loopback"
        assert set(point.clients) == {"127.0.0.1"}  # from the zone's source address
        assert len(list(world.cache.glob("*.crl"))) == 1
        assert not events(layout.hospital.audit_log, "peer.certificate_rejected")

        # `medgw pki check` shows the CRL the daemon keeps, verified from its cache.
        check = medgw("pki", "check", "--config", str(layout.hospital.config_path))
        assert check.returncode == 0, check.stdout + check.stderr
        assert "zone loopback fetched CRL" in check.stdout, check.stdout

        drop_file(layout.lab.outbox_dir / "hospital", "before.hl7", b"MSH|before\r")
        wait_for_events(layout.lab.audit_log, "receipt.received")
        assert _delivered(layout, "before.hl7").read_bytes() == b"MSH|before\r"

        # The CA revokes the lab's TLS and signing certificates (openssl ca -gencrl).
        when = datetime.now(UTC) - timedelta(minutes=5)
        point.serve(
            openssl_crl(
                tmp_path / "ca",
                world.ca,
                revoked={world.certificate("tls"): when, world.certificate("sign"): when},
                valid=(world.certificate("encrypt"),),
                number=2,
            )
        )
        hospital.signal(signal.SIGHUP)  # a reload fetches every CRL again
        wait_for_events(layout.hospital.audit_log, "pki.crl_fetched", count=2)
        rejected = wait_for_events(
            layout.hospital.audit_log,
            "peer.certificate_rejected",
            where=lambda r: r["peer"] == "lab",
            count=2,
        )
        assert all("revoked" in r["reason"].lower() for r in rejected), rejected
        drop_file(layout.lab.outbox_dir / "hospital", "after.hl7", b"MSH|after\r")
        wait_handshake_refused(layout)
        assert not _delivered(layout, "after.hl7").exists()
    finally:
        point.stop()


def test_a_crl_that_cannot_be_had_is_an_alert(layout: DemoLayout, processes: Any) -> None:
    """A distribution point outside the zone's egress is not asked (audited by the connect
    path), and with no CRL at all the zone's CRL is reported stale."""
    world = CrlWorld(layout, "http://192.0.2.10/ca.crl")
    processes.start(layout.hospital.config_path)
    refused = wait_for_events(layout.hospital.audit_log, "zone.egress_refused")
    assert refused[0]["remote_address"] == "192.0.2.10"
    failed = wait_for_events(layout.hospital.audit_log, "pki.crl_fetch_failed")
    assert "not asked" in failed[0]["reason"]
    stale = wait_for_events(
        layout.hospital.audit_log, "pki.crl_stale", where=lambda r: r["severity"] == "alert"
    )
    assert "192.0.2.10" in stale[0]["reason"]
    check = medgw("pki", "check", "--config", str(layout.hospital.config_path))
    assert "not fetched yet" in check.stdout and "192.0.2.10" in check.stdout, check.stdout
    assert not list(world.cache.glob("*.crl")) if world.cache.exists() else True


def test_a_crl_signed_by_another_ca_is_refused_by_the_daemon(
    layout: DemoLayout, processes: Any
) -> None:
    point = DistributionPoint(free_port())
    try:
        world = CrlWorld(layout, point.url)
        subject = world.ca.certificate.subject
        [cn] = subject.get_attributes_for_oid(NameOID.COMMON_NAME)
        [org] = subject.get_attributes_for_oid(NameOID.ORGANIZATION_NAME)
        # The demo CA's name, another key: only the signature tells them apart.
        impostor = make_ca(
            str(cn.value), organization=str(org.value), now=datetime.now(UTC) - timedelta(days=1)
        )
        assert impostor.certificate.subject == subject
        point.serve(make_crl(impostor, now=datetime.now(UTC) - timedelta(minutes=1)))
        processes.start(layout.hospital.config_path)
        failed = wait_for_events(layout.hospital.audit_log, "pki.crl_fetch_failed")
        assert "signature" in failed[0]["reason"]
        wait_until(
            lambda: events(layout.hospital.audit_log, "peer.certificate_rejected"),
            60,
            "the lab's certificates refused for want of a CRL",
        )
        assert not world.cache.exists() or not list(world.cache.glob("*.crl"))
    finally:
        point.stop()


def test_the_daemon_fetches_the_next_crl_before_the_one_it_holds_lapses(
    layout: DemoLayout, processes: Any, tmp_path: Path
) -> None:
    """A real daemon on the real clock: the distribution point serves a CRL (made by
    ``openssl ca -gencrl``) that lapses a minute from now; the daemon asks again before it
    does, and takes the next one.  Asserted on what the distribution point saw."""
    point = DistributionPoint(free_port())
    try:
        world = CrlWorld(layout, point.url)
        short = openssl_crl(tmp_path / "ca1", world.ca, revoked={}, hours=0, seconds=60)
        lapses = short.next_update_utc
        assert lapses is not None
        point.serve(short)
        processes.start(layout.hospital.config_path)
        wait_until(lambda: point.requests >= 1, 60, "the daemon's first fetch")
        first = point.times[0]
        assert first < lapses - timedelta(seconds=10), "the daemon started too late to tell"
        following = openssl_crl(tmp_path / "ca2", world.ca, revoked={}, hours=24, number=2)
        point.serve(following)
        wait_until(lambda: point.requests >= 2, 120, "the daemon's second fetch")
        second = point.times[1]
        assert second < lapses, (first, second, lapses)
        assert second >= first + (lapses - first) * 0.45  # not at once: half the time left
        fetched = wait_for_events(layout.hospital.audit_log, "pki.crl_fetched", count=2)
        taken = following.next_update_utc
        assert taken is not None
        assert fetched[-1]["detail"]["next_update"] == taken.isoformat(timespec="seconds")
    finally:
        point.stop()
