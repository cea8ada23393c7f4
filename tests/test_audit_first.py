"""No accountable action without its audit record: with the disk under the audit log
full, emergency mode is not entered, no maintenance work is approved and the break-glass
credential is not spent; the command says why (the audit log's folder, the rule, the fix),
the daemon logs it, and once space is freed each works and is recorded.

A real ``medgw run`` whose audit log lives on a real, small file system (tmpfs) filled
to the last byte; real ``medgw`` commands and a real SSH client."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import asyncssh
import pytest

from gateway.control import SOCKET_NAME
from gateway.control.client import ControlClient
from gateway.demo_run import drop_file
from gateway.emergency.credential import CredentialStore
from gateway.errors import MedgwError
from gateway.maintenance.approvals import FILE_NAME as APPROVALS_FILE
from gateway.pki.demo import DemoLayout
from gateway.spool.postgres import PostgresSettings
from tests.cli import medgw
from tests.helpers.audit import events, wait_for_events
from tests.helpers.demo import set_runtime
from tests.helpers.internal_system import enable_delivery
from tests.helpers.maintenance import Site
from tests.helpers.postgres import spool_section
from tests.helpers.storage import fill_file_system, small_file_system

RULE = "no action without its audit record"
REASON = "planned work on the line to the hospital, agreed with its IT department " * 2
# Audited reads asked at most this many times to use up the audit file's last page.
MAX_READS = 64


class FullTrail:
    """A running lab gateway whose audit log's file system is full."""

    def __init__(self, site: Site, proc: Any, folder: Path) -> None:
        self.site = site
        self.proc = proc
        self.folder = folder
        self.state = site.root / "state"
        self.filler = fill_file_system(folder)
        # The file's last page may still take a record or two: audited reads use it up,
        # until one is refused for want of room.  Each lists no message: a record smaller
        # than any an action tested here writes, so none of those fits either.
        client = ControlClient(self.state / SOCKET_NAME)
        for _ in range(MAX_READS):
            try:
                client.call("GET", "/v1/queue?state=delivered")
            except MedgwError:
                break
        else:
            raise AssertionError(f"the audit log in {folder} never filled up")

    def free(self) -> None:
        self.filler.unlink()

    def refused(self, done: Any) -> None:
        """``done`` (a finished medgw command) was refused, naming where, why and the fix."""
        assert done.returncode != 0, done.stdout
        said = " ".join(done.stderr.split())
        assert str(self.folder) in said, said
        assert RULE in said and "ENOSPC" in said, said
        assert f"free disk space on the file system of {self.folder}" in said, said

    def logged(self) -> None:
        """The daemon's error line naming the audit file and ENOSPC."""
        line = self.proc.wait_for(lambda line: line.get("event") == "audit.not_written", 30)
        assert line["level"] == "error"
        assert line["file"] == str(self.site.audit) and line["errno"] == "ENOSPC"

    def events(self, name: str) -> list[dict[str, Any]]:
        return self.site.events(name)


def _running(
    site: Site, processes: Any, before: Callable[[], None] = lambda: None
) -> Iterator[FullTrail]:
    """The daemon started, ``before()`` done while there is room, then the disk filled."""
    site.add("taro", "operator")  # an account the daemon reads at its start
    with small_file_system(site.audit.parent, "1m") as folder:
        proc = processes.start(site.config)
        before()
        yield FullTrail(site, proc, folder)
        proc.kill()


@pytest.fixture
def full(layout: DemoLayout, processes: Any) -> Iterator[FullTrail]:
    yield from _running(Site(layout), processes)


@pytest.fixture(params=["sqlite", "postgresql"])
def full_spool(
    request: pytest.FixtureRequest, layout: DemoLayout, processes: Any
) -> Iterator[FullTrail]:
    """As ``full``, with the spool in SQLite, then in PostgreSQL; a document for the
    hospital (which is down) queued before the disk fills."""
    site = Site(layout)
    if request.param == "postgresql":
        settings: PostgresSettings = request.getfixturevalue("postgres")
        with site.config.open("a") as handle:
            handle.write(spool_section(settings))

    # Its first send fails; the next would be ten minutes later: it stays queued.
    text = site.config.read_text()
    for slow in ("retry_initial_seconds = 600", "retry_max_seconds = 900"):
        key = slow.split(" = ")[0]
        [line] = [line for line in text.splitlines() if line.startswith(f"{key} = ")]
        text = text.replace(f"{line}\n", f"{slow}\n")
    site.config.write_text(text)

    def queued() -> None:
        drop_file(layout.lab.outbox_dir / "hospital", "held.hl7", b"MSH|held\r")
        wait_for_events(site.audit, "message.send_failed")

    yield from _running(site, processes, queued)


def test_emergency_mode_is_not_entered_without_its_record(full: FullTrail) -> None:
    config = full.site.config
    done = medgw("emergency", "enter", "--reason", "disk full", "--hours", "1", "--config", config)
    full.refused(done)
    full.logged()
    status = medgw("emergency", "status", "--config", config)
    assert status.returncode == 0, status.stderr
    assert json.loads(status.stdout)["emergency_mode"] is None
    assert not (full.state / "emergency-mode.json").exists()

    full.free()
    done = medgw("emergency", "enter", "--reason", "freed", "--hours", "1", "--config", config)
    assert done.returncode == 0, done.stderr
    [entered] = full.events("emergency.entered")
    assert entered["reason"] == "freed"


def test_maintenance_work_is_not_approved_without_its_record(full: FullTrail) -> None:
    until = time.strftime("%Y-%m-%dT%H:%M:%S+00:00", time.gmtime(time.time() + 3600))
    command = ["maintenance", "approve", "taro", "--until", until, "--reason", REASON]
    done = medgw(*command, "--config", full.site.config)
    full.refused(done)
    full.logged()
    approvals = full.state / APPROVALS_FILE
    assert not approvals.exists() or "taro" not in approvals.read_text()

    full.free()
    done = medgw(*command, "--config", full.site.config)
    assert done.returncode == 0, done.stderr
    assert "taro" in approvals.read_text()
    [approved] = full.events("maintenance.approved")
    assert approved["detail"]["person"] == "taro"


def _seal(site: Site) -> str:
    key_file = site.root / "emergency_id"
    done = medgw("emergency", "seal", "--key-file", str(key_file), "--config", site.config)
    assert done.returncode == 0, done.stderr
    [code] = [line.split()[-1] for line in done.stdout.splitlines() if "code:" in line]
    return code


def test_a_break_glass_login_is_refused_and_the_envelope_kept_without_its_alert(
    layout: DemoLayout, processes: Any
) -> None:
    site = Site(layout)
    with small_file_system(site.audit.parent, "1m") as folder:
        proc = processes.start(site.config)
        code = _seal(site)  # sealed while there is room: its record is written
        full = FullTrail(site, proc, folder)
        store = CredentialStore(full.state)

        async def refused() -> str:
            with pytest.raises(asyncssh.Error) as raised:
                conn = await site.connect("emergency", code)
                conn.close()
            return str(raised.value)

        said = asyncio.run(refused())
        assert "audit trail" in said, said
        full.logged()
        sealed = store.current()
        assert sealed is not None and sealed.used_at is None  # the envelope still works
        assert not (full.state / "emergency-mode.json").exists()

        full.free()

        async def works() -> None:
            async with await site.connect("emergency", code) as conn:
                answer = await conn.run("emergency status")
                assert answer.exit_status == 0, answer.stderr

        asyncio.run(works())
        sealed = store.current()
        assert sealed is not None and sealed.used_at is not None
        [used] = events(site.audit, "emergency.break_glass_used")
        assert used["severity"] == "alert"
        proc.wait_for(
            lambda line: (
                line.get("event") == "audit.alert"
                and line.get("audit_event") == "emergency.break_glass_used"
            ),
            30,
        )
        assert events(site.audit, "emergency.entered")
        proc.kill()


def test_a_peer_is_not_suspended_without_its_record(full_spool: FullTrail) -> None:
    full = full_spool
    config = full.site.config
    done = medgw("peers", "suspend", "hospital", "--reason", REASON, "--config", config)
    full.refused(done)
    full.logged()
    listing = medgw("peers", "list", "--json", "--config", config)
    assert listing.returncode == 0, listing.stderr
    assert not json.loads(listing.stdout)[0]["suspended"]

    full.free()
    done = medgw("peers", "suspend", "hospital", "--reason", REASON, "--config", config)
    assert done.returncode == 0, done.stderr
    [suspended] = full.events("peer.suspended")
    assert suspended["peer"] == "hospital"


def test_emergency_mode_is_left_without_its_record_which_follows_once_written(
    layout: DemoLayout, processes: Any
) -> None:
    """Leaving gives the gateway its protections back: with the audit disk full it is
    done all the same, the command says its record could not be written, and
    ``emergency.left`` is written as soon as the trail takes records again."""
    site = Site(layout)
    site.add("taro", "operator")
    config = site.config
    with small_file_system(site.audit.parent, "1m") as folder:
        proc = processes.start(config)
        entered = medgw(
            "emergency", "enter", "--reason", "flood", "--hours", "1", "--config", config
        )
        assert entered.returncode == 0, entered.stderr
        full = FullTrail(site, proc, folder)
        left = medgw("emergency", "leave", "--reason", "over", "--config", config)
        assert left.returncode == 0, left.stderr
        warning = " ".join(json.loads(left.stdout)["warning"].split())
        assert "emergency mode was left" in warning
        assert f"could not be written to the audit log in {folder} (ENOSPC" in warning
        assert f"free disk space on the file system of {folder}" in warning
        assert not (full.state / "emergency-mode.json").exists()
        full.logged()
        assert full.events("emergency.left") == []

        full.free()
        [record] = wait_for_events(site.audit, "emergency.left")
        assert record["reason"] == "over" and "ended" in record["detail"]
        proc.kill()


def test_a_cancel_done_without_its_record_says_so_and_its_record_follows(
    full_spool: FullTrail,
) -> None:
    """A change committed in the spool owes its record (written later, or at the next
    start): the command says it was done and its record follows, not an internal error."""
    full = full_spool
    config = full.site.config
    [accepted] = full.events("message.accepted")
    message_id = accepted["message_id"]
    done = medgw("queue", "cancel", message_id, "--config", config)
    assert done.returncode != 0, done.stdout
    said = " ".join(done.stderr.split())
    assert f"the cancel of message {message_id} was done" in said, said
    assert str(full.folder) in said and "ENOSPC" in said, said
    assert "do not do it again" in said, said
    full.logged()

    full.free()
    listing = medgw("queue", "list", "--config", config)  # the next record: the owed first
    assert listing.returncode == 0, listing.stderr
    [cancelled] = full.events("message.cancelled")
    assert cancelled["message_id"] == message_id
    assert "first_tried_at" in cancelled["detail"]


def test_a_session_ends_on_time_though_its_logout_record_cannot_be_written(
    layout: DemoLayout, processes: Any
) -> None:
    """The maintenance server's once-a-second sweep ends a break-glass session when its
    emergency is left; with the audit disk full its logout record fails: the connection
    is closed all the same, the daemon logs the record it lost, and the sweep goes on."""
    site = Site(layout)
    with small_file_system(site.audit.parent, "1m") as folder:
        proc = processes.start(site.config)
        code = _seal(site)

        async def ended() -> FullTrail:
            conn = await site.connect("emergency", code)  # declares an emergency
            try:
                full = FullTrail(site, proc, folder)
                left = await asyncio.to_thread(
                    medgw, "emergency", "leave", "--reason", "over", "--config", site.config
                )
                assert left.returncode == 0, left.stderr
                await asyncio.wait_for(conn.wait_closed(), 60)
            finally:
                conn.close()
            return full

        full = asyncio.run(ended())
        lost = proc.wait_for(
            lambda line: (
                line.get("event") == "audit.write_failed"
                and line.get("audit_event") == "maintenance.logout"
            ),
            30,
        )
        assert lost["person"] == "emergency" and "emergency" in lost["reason"]
        full.free()
        # Still sweeping: emergency.left, owed since the leave, is written by the daemon.
        wait_for_events(site.audit, "emergency.left")
        assert not any(line.get("event") == "maintenance.sweep_failed" for line in proc.lines)


def test_a_hand_over_retry_done_without_its_record_has_its_record_follow(
    layout: DemoLayout, processes: Any, internal_port: int
) -> None:
    """As a cancel: the retry is committed before its record, so the record, refused by
    the full audit disk, is kept and written with the next record once there is room."""
    enable_delivery(layout, internal_port)  # the internal system is down: nothing listens
    config = layout.hospital.config_path
    set_runtime(config, "max_attempts", "1")
    site = Site(layout, layout.hospital)
    with small_file_system(site.audit.parent, "1m") as folder:
        proc = processes.start(config)
        processes.start(layout.lab.config_path)
        drop_file(layout.lab.outbox_for("hospital"), "doc.hl7", b"MSH|doc\r")
        [gave_up] = wait_for_events(
            site.audit, "message.handover_failed", where=lambda e: e["detail"].get("final")
        )
        message_id = gave_up["message_id"]
        full = FullTrail(site, proc, folder)
        done = medgw("handover", "retry", message_id, "--config", config)
        assert done.returncode != 0, done.stdout
        said = " ".join(done.stderr.split())
        assert "was done" in said and "do not do it again" in said, said
        full.free()
        listing = medgw("queue", "list", "--config", config)  # the next record: the owed first
        assert listing.returncode == 0, listing.stderr
        [retried] = wait_for_events(site.audit, "message.handover_retried")
        assert retried["message_id"] == message_id
        assert "first_tried_at" in retried["detail"]
