"""OCSP on real daemons: the hospital's zone checks revocation by OCSP only (no
CRLs, ``revocation = "require"``), against a real ``openssl ocsp`` responder
on 127.0.0.1 named in the lab's certificates."""

from __future__ import annotations

import shutil
import signal
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from gateway.demo_run import drop_file, free_port, wait_until
from gateway.pki.demo import DemoLayout
from gateway.pki.issue import Issued, issue, issue_ocsp_responder, write_pem
from tests.audit_trail import events, wait_for_events
from tests.ocsp_responder import Responder, index_line
from tests.test_pki_e2e import demo_ca, wait_handshake_refused

pytestmark = pytest.mark.skipif(shutil.which("openssl") is None, reason="openssl not on PATH")


class OcspWorld:
    """The demo, with the lab's certificates re-issued to name an OCSP responder."""

    def __init__(self, layout: DemoLayout) -> None:
        self.layout = layout
        self.port = free_port()
        self.work = layout.root / "ocsp"
        self.work.mkdir()
        ca = demo_ca(layout)
        self.ca = ca
        start = datetime.now(UTC) - timedelta(hours=1)
        self.responder_cert = issue_ocsp_responder(ca, "Demo OCSP Responder", now=start)
        self.lab: dict[str, Issued] = {}
        lab_certs = layout.lab.root / "certs"
        seen_by_hospital = layout.hospital.root / "certs" / "peers" / "lab"
        for role, purpose, dns, ips in (
            ("tls", "tls", ("localhost",), ("127.0.0.1",)),
            ("sign", "smime-sign", (), ()),
            ("encrypt", "smime-encrypt", (), ()),
        ):
            issued = issue(
                ca,
                layout.lab.as2_id,
                purpose=purpose,
                now=start,
                organization=layout.lab.display_name,
                dns_names=dns,
                ip_addresses=ips,
                ocsp_url=f"http://127.0.0.1:{self.port}/",
            )
            write_pem(lab_certs / f"{role}.key", issued.key)
            write_pem(lab_certs / f"{role}.crt", issued.certificate)
            write_pem(seen_by_hospital / f"{role}.crt", issued.certificate)
            self.lab[role] = issued
        self.set_status(revoked=())
        (self.work / "index.txt.attr").write_text("unique_subject = no\n")
        # The hospital's zone: no CRLs, OCSP required.
        config = layout.hospital.config_path
        text = config.read_text()
        assert 'crls = ["certs/crls/loopback"]' in text and "ocsp = false" in text
        config.write_text(
            text.replace('crls = ["certs/crls/loopback"]', "crls = []").replace(
                "ocsp = false", "ocsp = true"
            )
        )

    def set_status(self, *, revoked: tuple[str, ...]) -> None:
        """Write the responder's index: the lab's certificates, ``revoked`` ones revoked."""
        when = datetime.now(UTC) - timedelta(minutes=5)
        lines = [index_line(self.responder_cert.certificate)]
        for role, issued in self.lab.items():
            lines.append(index_line(issued.certificate, when if role in revoked else None))
        (self.work / "index.txt").write_text("".join(lines))

    def responder(self) -> Responder:
        # No nextUpdate: nothing is cached, every judgement asks again.
        return Responder(
            self.work,
            self.ca.certificate,
            self.responder_cert,
            self.port,
            next_update_minutes=None,
        )


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
