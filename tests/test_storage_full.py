"""A full disk loses nothing and delivers nothing twice, at either end.

Receiver: the hospital's inbox is a real, small file system (tmpfs) filled to
the last byte.  A document from the lab cannot be stored: the hospital
acknowledges nothing (HTTP 503, no receipt), raises an alert that names the
cause and the fix, and leaves no partial file; the lab keeps the message and
retries.  Once space is freed the document arrives, once, with a verified
receipt.

Sender: the lab's state folder (spool) is full.  The document stays in the
outbox, the failure is logged once rather than at every poll, and once space
is freed it is sent, once, with no stray spool entry left behind.

Needs root to mount; skipped, saying why, where that is impossible.
"""

from __future__ import annotations

import os
import signal
import socket
import sqlite3
import ssl
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from gateway.delivery import inbox
from gateway.demo_run import drop_file, wait_until
from gateway.errors import StorageFullError
from gateway.fsutil import this_user
from gateway.pki.demo import DemoLayout
from tests.helpers.audit import events, wait_for_event, wait_for_events
from tests.helpers.demo import set_runtime
from tests.helpers.refused_inbox import (
    assert_delivered_once,
    assert_kept_for_a_resend,
    send_to_a_refusing_inbox,
)
from tests.helpers.storage import fill_file_system, quota_used_up, small_file_system


@pytest.fixture
def small_inbox(layout: DemoLayout) -> Iterator[Path]:
    with small_file_system(layout.hospital.inbox_dir, "256k") as inbox:
        yield inbox


@pytest.fixture
def small_lab_state(layout: DemoLayout) -> Iterator[Path]:
    with small_file_system(layout.lab.root / "state", "2m") as state:
        yield state


def test_full_inbox_answers_503_keeps_nothing_then_delivers_once(
    layout: DemoLayout, small_inbox: Path, processes: Any
) -> None:
    filler = fill_file_system(small_inbox)
    document, alert = send_to_a_refusing_inbox(layout, processes)
    assert "No space left on device" in alert["reason"], alert
    assert "answered 503" in alert["reason"]
    assert alert["detail"]["fix"].startswith(f"free disk space on the file system of {small_inbox}")
    # Nothing acknowledged, nothing half-written, nothing refused for good.
    assert_kept_for_a_resend(layout, alert)
    assert sorted(p.name for p in small_inbox.rglob("*") if p.is_file()) == ["filler.bin"]

    filler.unlink()  # the administrator frees space
    assert_delivered_once(layout, alert)
    delivered = [p for p in small_inbox.rglob("*") if p.is_file()]
    assert [p.name for p in delivered] == ["scan.bin"]
    assert delivered[0].read_bytes() == document


@pytest.mark.parametrize(
    ("leave", "error"),
    [
        (0, "spool write failed: database or disk is full"),  # not even a spool entry fits
        (100_000, "into the spool"),  # the entry fits, the document does not
    ],
)
def test_full_spool_at_the_sender_keeps_the_document_in_the_outbox_then_sends_it_once(
    layout: DemoLayout, small_lab_state: Path, processes: Any, leave: int, error: str
) -> None:
    processes.start(layout.hospital.config_path)
    lab = processes.start(layout.lab.config_path)
    filler = fill_file_system(small_lab_state, leave)
    document = os.urandom(300_000)
    source = drop_file(layout.lab.outbox_dir / "hospital", "study.bin", document)

    failed = lab.wait_for(lambda line: line.get("event") == "intake.failed", 30)
    assert error in failed["error"], failed
    assert "stay in the outbox" in failed["fix"]
    time.sleep(3)  # fifteen polls
    assert source.read_bytes() == document  # still there, untouched
    said = Counter(x["error"] for x in lab.lines if x.get("event") == "intake.failed")
    assert set(said.values()) == {1}, said  # each error said once, not at every poll
    assert not events(layout.lab.audit_log, "message.accepted")

    filler.unlink()  # the administrator frees space
    lab.wait_for(lambda line: line.get("event") == "intake.recovered", 30)
    [receipt] = wait_for_events(layout.lab.audit_log, "receipt.received")
    assert receipt["detail"]["mic_verified"]
    assert (layout.hospital.inbox_dir / "lab" / "study.bin").read_bytes() == document
    assert not source.exists()
    assert len(events(layout.lab.audit_log, "message.accepted")) == 1
    spool = sqlite3.connect(small_lab_state / "spool.sqlite3")
    try:
        rows = spool.execute("SELECT message_id, state FROM outbound").fetchall()
    finally:
        spool.close()
    assert rows == [(receipt["message_id"], "delivered")]  # no stray intake entry


def test_sender_stopped_by_a_full_spool_starts_again_and_delivers_once_space_is_freed(
    layout: DemoLayout, small_lab_state: Path, processes: Any
) -> None:
    set_runtime(layout.lab.config_path, "retry_initial_seconds", "0.2")
    set_runtime(layout.lab.config_path, "retry_max_seconds", "1")
    lab = processes.start(layout.lab.config_path)  # the hospital is not up yet
    drop_file(layout.lab.outbox_dir / "hospital", "late.hl7", b"MSH|late\r")
    wait_for_event(layout.lab.audit_log, "message.send_failed")

    filler = fill_file_system(small_lab_state)  # now the sender cannot record its next retry
    failed = lab.wait_for(lambda line: line.get("event") == "daemon.task_failed", 30)
    assert failed["task"] == "sender for peer hospital"
    assert "database or disk is full" in failed["error"]
    # The log line comes first; the audit record follows it.
    alert = wait_for_event(layout.lab.audit_log, "daemon.task_failed")
    assert alert["severity"] == "alert" and "sender for peer hospital" in alert["reason"]

    filler.unlink()
    processes.start(layout.hospital.config_path)
    [receipt] = wait_for_events(layout.lab.audit_log, "receipt.received", timeout=90)
    assert receipt["detail"]["mic_verified"]
    assert (layout.hospital.inbox_dir / "lab" / "late.hl7").read_bytes() == b"MSH|late\r"
    assert len(wait_for_events(layout.hospital.audit_log, "message.delivered")) == 1


UPLOAD_SIZE = 2_000_000  # spooled to state/incoming as it arrives, not held in memory


def _start_upload(layout: DemoLayout, message_id: str) -> ssl.SSLSocket:
    """A message from the lab whose body has only begun to arrive (10 of UPLOAD_SIZE)."""
    certs = layout.lab.root / "certs"
    context = ssl.create_default_context(cafile=str(layout.ca_certificate))
    context.load_cert_chain(str(certs / "tls.crt"), str(certs / "tls.key"))
    raw = socket.create_connection(("127.0.0.1", layout.hospital.port), timeout=10)
    conn = context.wrap_socket(raw, server_hostname="localhost")
    conn.sendall(
        b"POST /as2 HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/pkcs7-mime\r\n"
        + f"Message-ID: {message_id}\r\n".encode()
        + b"AS2-From: KITA-LAB\r\nAS2-To: SAKURA-HOSPITAL\r\n"
        + f"Content-Length: {UPLOAD_SIZE}\r\n\r\n".encode()
        + b"A" * 10
    )
    return conn


def _wait_for_bodies(incoming: Path, count: int) -> None:
    """Until the daemon spools ``count`` bodies in ``incoming``: their requests are being
    received, under the trust they began with."""
    wait_until(lambda: len(list(incoming.iterdir())) >= count, 60, f"{count} bodies in {incoming}")


def test_a_peer_hanging_up_mid_upload_is_not_a_storage_alarm(
    layout: DemoLayout, processes: Any
) -> None:
    hospital = processes.start(layout.hospital.config_path)
    incoming = layout.hospital.root / "state" / "incoming"
    with _start_upload(layout, "<hangup@KITA-LAB>"):
        _wait_for_bodies(incoming, 1)  # the daemon is receiving it: now the peer hangs up
    aborted = hospital.wait_for(lambda line: line.get("event") == "inbound.aborted", 60)
    assert aborted["peer"] == "lab"
    assert not events(layout.hospital.audit_log, "storage.unavailable")
    # The partial body is removed right after the log line is written.
    wait_until(lambda: not list(incoming.iterdir()), 30, "the partial body removed")


def test_one_peer_receives_at_most_eight_messages_at_once(
    layout: DemoLayout, processes: Any
) -> None:
    """Bodies beyond that wait for their turn: one peer cannot fill the disk with
    parallel uploads or take every worker."""
    processes.start(layout.hospital.config_path)
    incoming = layout.hospital.root / "state" / "incoming"
    uploads = [_start_upload(layout, f"<upload-{i}@KITA-LAB>") for i in range(12)]
    try:
        _wait_for_bodies(incoming, 8)
        time.sleep(1)  # the other four stay waiting
        assert len(list(incoming.iterdir())) == 8
        first = set(incoming.iterdir())
        uploads.pop(0).close()  # one ends: one waiting upload takes its place
        wait_until(
            lambda: (now := set(incoming.iterdir())) != first and len(now) == 8,
            60,
            "the next in line, in place of the upload that ended",
        )
    finally:
        for conn in uploads:
            conn.close()
    wait_until(lambda: not list(incoming.iterdir()), 30, "every body removed")


def test_no_room_to_encrypt_keeps_the_document_until_an_operator_retry(
    layout: DemoLayout, small_lab_state: Path, processes: Any
) -> None:
    processes.start(layout.hospital.config_path)
    processes.start(layout.lab.config_path)
    # Room for the spool entry and the document, not for its signed, encrypted form.
    filler = fill_file_system(small_lab_state, leave=450_000)
    document = os.urandom(300_000)
    drop_file(layout.lab.outbox_dir / "hospital", "large.bin", document)
    [failed] = wait_for_events(layout.lab.audit_log, "message.failed")
    assert "No space left on device" in failed["reason"]
    assert "the document is kept" in failed["reason"]
    assert failed["detail"]["fix"].startswith("free disk space on the file system of")

    filler.unlink()
    retry = subprocess.run(
        [
            *(sys.executable, "-m", "gateway", "queue", "retry", failed["message_id"]),
            *("--config", str(layout.lab.config_path)),
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert retry.returncode == 0, retry.stderr
    [receipt] = wait_for_events(layout.lab.audit_log, "receipt.received")
    assert receipt["message_id"] == failed["message_id"]
    assert (layout.hospital.inbox_dir / "lab" / "large.bin").read_bytes() == document


def test_a_message_still_arriving_when_trust_changes_is_not_judged_by_the_old_trust(
    layout: DemoLayout, processes: Any
) -> None:
    """A reload (say, a signing certificate revoked) while a body arrives: the message is
    not checked against the trust of before; nothing is acknowledged and the peer is
    asked to resend, to be judged anew."""
    hospital = processes.start(layout.hospital.config_path)
    with _start_upload(layout, "<straddling@KITA-LAB>") as conn:
        # The body has begun to arrive under the trust of before: now it changes.
        _wait_for_bodies(layout.hospital.root / "state" / "incoming", 1)
        hospital.signal(signal.SIGHUP)
        hospital.wait_for(lambda line: line.get("event") == "config.reloaded", 60)
        conn.sendall(b"A" * (UPLOAD_SIZE - 10))
        answer = conn.recv(200)
    assert answer.startswith(b"HTTP/1.1 503"), answer
    assert (
        hospital.wait_for(
            lambda line: line.get("event") == "inbound.trust_changed_during_upload", 60
        )["peer"]
        == "lab"
    )
    assert not events(layout.hospital.audit_log, "message.rejected")


def test_a_used_up_disk_quota_on_the_inbox_is_a_full_inbox_said_to_be_the_quota(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The inbox's file system refuses the medgw user's write for its disk quota
    (EDQUOT): the same as a full disk for the administrator (answered 503, the peer
    resends), and the fix names the quota, not the file system's free space."""
    target = tmp_path / "inbox" / "lab" / "scan.hl7"
    work = inbox.prepare(target, "node-a")
    write = os.write

    def refused(fd: int, data: memoryview) -> int:
        return quota_used_up() if fd == work.fileno() else write(fd, data)

    monkeypatch.setattr(os, "write", refused)
    with pytest.raises(OSError) as raised:
        inbox.fill(work, [b"MSH|scan\r"])
    monkeypatch.undo()
    error = inbox.delivery_error(raised.value, target)
    assert isinstance(error, StorageFullError)
    assert error.message == f"cannot write the received document to {target}: Disk quota exceeded"
    user = this_user()
    assert error.fix == (
        f"free space in the disk quota of user {user} on the file system of {target.parent}, "
        f"or have the quota raised (quota -u {user} shows it)"
    )
