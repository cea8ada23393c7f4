"""Messages left for a peer, or for a peer certificate, that is no longer configured.

Removing a peer's file ends the exchange with it, but documents may still wait
in the queue for it. No sender runs for a peer that is not configured, so they
would be neither sent nor expired, and nothing would say so. The daemon raises
an alert naming the peer, the count and the fix after every reload and at
every start, until the peer is configured again or the messages are withdrawn.
"""

from __future__ import annotations

import json
import signal
import time
from datetime import UTC, datetime, timedelta
from typing import Any

from cryptography import x509

from gateway.demo_run import drop_file
from gateway.pki.demo import DemoLayout
from gateway.pki.issue import issue, write_pem
from gateway.pki.tls import certificate_fingerprint
from tests.cli import medgw
from tests.helpers.audit import events, wait_for_events
from tests.helpers.demo import demo_ca, edit, reload


def test_messages_waiting_for_a_removed_peer_raise_an_alert_until_withdrawn(
    layout: DemoLayout, processes: Any
) -> None:
    audit = layout.lab.audit_log
    lab = processes.start(layout.lab.config_path)  # the hospital is down: it stays queued
    drop_file(layout.lab.outbox_dir / "hospital", "pending.hl7", b"MSH|pending\r")
    wait_for_events(audit, "message.send_failed")
    assert not events(audit, "queue.peer_not_configured")  # the peer is configured

    (layout.lab.root / "peers.d" / "hospital.toml").unlink()  # the exchange has ended
    lab.signal(signal.SIGHUP)
    [alert] = wait_for_events(audit, "queue.peer_not_configured")
    assert alert["severity"] == "alert" and alert["peer"] == "hospital"
    assert alert["detail"]["states"] == {"queued": 1}
    assert "1 message(s) for peer 'hospital'" in alert["reason"]
    assert "neither sent nor expired" in alert["reason"]
    assert "medgw queue cancel" in alert["detail"]["fix"]

    # `peers list` shows it too, among the configured peers.
    listing = medgw("peers", "list", "--config", str(layout.lab.config_path), "--json")
    assert listing.returncode == 0, listing.stderr
    [removed] = [p for p in json.loads(listing.stdout) if p["name"] == "hospital"]
    assert removed["configured"] is False and removed["messages"] == {"queued": 1}
    shown = medgw("peers", "list", "--config", str(layout.lab.config_path))
    assert "REMOVED" in shown.stdout and "medgw queue cancel" in shown.stdout

    lab.stop()  # said again at the next start
    processes.start(layout.lab.config_path)
    wait_for_events(audit, "queue.peer_not_configured", count=2)

    listed = medgw(
        "queue", "list", "--peer", "hospital", "--state", "queued", "--json",
        "--config", str(layout.lab.config_path),
    )  # fmt: skip
    assert listed.returncode == 0, listed.stderr
    [record] = json.loads(listed.stdout)
    cancelled = medgw(
        "queue", "cancel", record["message_id"], "--config", str(layout.lab.config_path)
    )
    assert cancelled.returncode == 0, cancelled.stderr
    processes.started[-1].signal(signal.SIGHUP)
    wait_for_events(audit, "config.reloaded", count=2)

    assert len(events(audit, "queue.peer_not_configured")) == 2  # nothing waits any more


def test_messages_encrypted_to_a_peer_certificate_that_was_removed_raise_an_alert(
    layout: DemoLayout, processes: Any
) -> None:
    """The peer rotated its encryption certificate and the old one was removed from its
    file while a document encrypted to it still waits: the admin is told, with the fix
    (the peer must keep the old key until the queue is empty)."""
    audit = layout.lab.audit_log
    lab = processes.start(layout.lab.config_path)  # the hospital is down: it stays queued
    drop_file(layout.lab.outbox_dir / "hospital", "before.hl7", b"MSH|before\r")
    wait_for_events(audit, "message.send_failed")
    certs = layout.lab.root / "certs" / "peers" / "hospital"
    old = x509.load_pem_x509_certificate((certs / "encrypt.crt").read_bytes())
    # Certificate times have whole seconds: the new one must start in a later second to be
    # the newest, the one documents go to.
    while datetime.now(UTC) < old.not_valid_before_utc + timedelta(seconds=1):
        time.sleep(0.05)
    new = issue(
        demo_ca(layout),
        "SAKURA-HOSPITAL",
        purpose="smime-encrypt",
        now=datetime.now(UTC),  # newer than the demo's: the one documents go to
        organization="Sakura General Hospital 2027",
    )
    write_pem(certs / "encrypt-new.crt", new.certificate)
    peer_file = layout.lab.root / "peers.d" / "hospital.toml"
    both = 'encryption_certificates = ["certs/peers/hospital/encrypt.crt", ' + (
        '"certs/peers/hospital/encrypt-new.crt"]'
    )
    edit(peer_file, 'encryption_certificates = ["certs/peers/hospital/encrypt.crt"]', both)
    reload(lab, audit)  # the overlap: both listed, nothing to say
    drop_file(layout.lab.outbox_dir / "hospital", "after.hl7", b"MSH|after\r")
    wait_for_events(audit, "message.accepted", count=2)
    assert not events(audit, "queue.recipient_certificate_removed")  # (said by now if at all)

    edit(peer_file, both, 'encryption_certificates = ["certs/peers/hospital/encrypt-new.crt"]')
    reload(lab, audit)  # the old certificate is gone; "before.hl7" is still encrypted to it
    [alert] = wait_for_events(audit, "queue.recipient_certificate_removed")
    assert alert["severity"] == "alert" and alert["peer"] == "hospital"
    assert alert["detail"]["messages"] == 1  # "after.hl7" went to the new certificate
    assert alert["detail"]["certificate_sha256"] == certificate_fingerprint(old)
    assert "keep the decryption key" in alert["detail"]["fix"]
