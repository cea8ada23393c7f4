"""OCSP on real daemons: the hospital's zone checks revocation by OCSP only (no
CRLs, ``revocation = "require"``), against a real ``openssl ocsp`` responder
on 127.0.0.1 named in the lab's certificates."""

from __future__ import annotations

import shutil
import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from gateway.demo_run import drop_file, wait_until
from gateway.pki.demo import DemoLayout
from tests.helpers.audit import events, wait_for_events
from tests.helpers.demo import wait_handshake_refused
from tests.helpers.ocsp_world import OcspWorld
from tests.ocsp_responder import Responder

pytestmark = pytest.mark.skipif(shutil.which("openssl") is None, reason="openssl not on PATH")


@pytest.fixture
def world(layout: DemoLayout) -> OcspWorld:
    return OcspWorld(layout)


@pytest.fixture
def responder(world: OcspWorld) -> Iterator[Responder]:
    server = world.responder()
    try:
        yield server
    finally:
        server.stop()


def _delivered(layout: DemoLayout, name: str) -> Path:
    return layout.hospital.inbox_dir / "lab" / name


def test_good_by_ocsp_delivered_then_revoked_refused_after_reload(
    world: OcspWorld, responder: Responder, processes: Any
) -> None:
    layout = world.layout
    hospital = processes.start(layout.hospital.config_path)
    processes.start(layout.lab.config_path)
    # Start-up judged the lab's three certificates by asking the responder, from
    # the zone's source address.
    assert responder.requests >= 3
    assert set(responder.clients) == {"127.0.0.1"}
    assert not events(layout.hospital.audit_log, "peer.certificate_rejected")

    drop_file(layout.lab.outbox_dir / "hospital", "before.hl7", b"MSH|before\r")
    wait_for_events(layout.lab.audit_log, "receipt.received")
    assert _delivered(layout, "before.hl7").read_bytes() == b"MSH|before\r"

    world.set_status(revoked=("tls", "sign"))
    asked = responder.requests
    hospital.signal(signal.SIGHUP)
    wait_for_events(layout.hospital.audit_log, "config.reloaded")
    assert responder.requests > asked  # asked again, not answered from a cache
    rejected = wait_for_events(
        layout.hospital.audit_log,
        "peer.certificate_rejected",
        where=lambda r: r["peer"] == "lab",
        count=2,
    )
    assert len(rejected) == 2, rejected
    assert all("revoked" in r["reason"].lower() for r in rejected)

    drop_file(layout.lab.outbox_dir / "hospital", "after.hl7", b"MSH|after\r")
    wait_handshake_refused(layout)
    assert not _delivered(layout, "after.hl7").exists()


def test_responder_unreachable_under_require_refuses_the_peer(
    world: OcspWorld, processes: Any
) -> None:
    """No responder answers: under ``require`` the lab's certificates are not accepted."""
    layout = world.layout
    processes.start(layout.hospital.config_path)
    rejected = wait_for_events(
        layout.hospital.audit_log,
        "peer.certificate_rejected",
        where=lambda r: r["peer"] == "lab",
        count=3,
    )
    assert len(rejected) == 3, rejected

    assert all("unreachable" in r["reason"] for r in rejected), rejected
    assert all(f"127.0.0.1:{world.port}" in r["reason"] for r in rejected), rejected

    # Once the responder is back, a reload accepts the lab and its message arrives.
    server = world.responder()
    try:
        processes.start(layout.lab.config_path)
        drop_file(layout.lab.outbox_dir / "hospital", "late.hl7", b"MSH|late\r")
        hospital = processes.started[0]
        hospital.signal(signal.SIGHUP)
        wait_for_events(layout.hospital.audit_log, "config.reloaded")
        wait_until(lambda: _delivered(layout, "late.hl7").exists(), 90, "delivery after the reload")
        assert server.requests >= 3
    finally:
        server.stop()
