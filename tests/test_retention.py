"""Retention and disposal (DSP-1) on a real spool of each backend and real files: what finished
goes by kind, peer and service; nothing still owed ever does."""

from __future__ import annotations

import hashlib
import os
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from pathlib import Path, PosixPath
from typing import Any, cast

import pytest

from gateway.audit import DURABLE, AuditEvent, Pending
from gateway.config.retention import KEEP, RetentionRule, RetentionSettings
from gateway.outbound.status import MAX_SEALED_RECEIPT
from gateway.retention.purge import ORDER, PurgeRefused, PurgeRequest, Retention, parse_before
from gateway.spool import DataKey, Disposable, OutboundState, RetainedKind, Settled, Spool
from gateway.spool.records import receipt_item
from tests.clocks import SetClock
from tests.conftest import MakeSpool

START = datetime(2026, 1, 5, 3, 0, tzinfo=UTC)


@dataclass
class Audit:
    events: list[AuditEvent] = field(default_factory=list)

    def emit(self, event: AuditEvent) -> None:
        self.events.append(event)

    def emit_all(self, events: Sequence[AuditEvent]) -> None:
        self.events.extend(events)

    def emit_later(self, events: Sequence[AuditEvent]) -> Pending:
        self.emit_all(events)
        return DURABLE

    def named(self, name: str) -> list[AuditEvent]:
        return [e for e in self.events if e.event.value == name]


@dataclass
class Place:
    tmp: Path
    make: MakeSpool
    clock: SetClock = field(default_factory=lambda: SetClock(START))
    audit: Audit = field(default_factory=Audit)

    def __post_init__(self) -> None:
        self.spool = self.make(self.clock)
        self.retention = Retention(self.spool, self.audit, self.clock)
        (self.tmp / "receipts").mkdir()
        (self.tmp / "inbox").mkdir()

    def outbound(
        self,
        message_id: str,
        state: OutboundState,
        peer: str = "lab",
        service: str | None = None,
        *,
        receipt_at: Path | None = None,
    ) -> Path:
        """A message for ``peer`` brought to ``state`` the way the gateway does; returns
        its receipt file (there only for a settled message; ``receipt_at``: that file,
        as it is)."""
        self.spool.add_intake(
            message_id,
            peer,
            "doc.hl7",
            "application/hl7-v2",
            self.tmp / "src",
            self.tmp / "payload",
            service=service,
        )
        receipt = receipt_at or self.tmp / "receipts" / f"{message_id}.mdn"
        if state is OutboundState.INTAKE:
            return receipt
        self.spool.mark_queued(message_id, None, [], "mic", 3, body=b"sealed")
        if state is OutboundState.QUEUED:
            return receipt
        if state is OutboundState.CANCELLED:
            self.spool.operator_cancel(message_id, "operator:test")
            return receipt
        if state in (OutboundState.EXPIRED,):
            self.spool.expire_due(peer, 1e12)
        self.spool.mark_sending(message_id)
        if state is OutboundState.SENDING:
            return receipt
        if state is OutboundState.AWAITING_RECEIPT:
            assert self.spool.mark_awaiting_receipt(message_id)
            return receipt
        if state is OutboundState.DEAD:
            self.spool.mark_dead(message_id, "too many attempts")
            return receipt
        if receipt_at is None:
            receipt.write_bytes(b"signed receipt of " + message_id.encode())
        self.spool.mark_done(message_id, state, "processed", receipt)
        return receipt

    def inbound(
        self,
        message_id: str,
        peer: str = "lab",
        *,
        delivered: bool = True,
        handover: str | None = "done",
        service: str | None = None,
        at: Path | None = None,
    ) -> Path:
        """A received document in the inbox: its receipt stored (``delivered``) and its
        hand-over (None: no internal system) pending or done.  ``at``: its copy is that
        file as it is, or, if there is none, a copy since gone."""
        copy = at or self.tmp / "inbox" / f"{message_id}.hl7"
        content = b"MSH|" + message_id.encode()
        if at is None:
            copy.write_bytes(content)
        elif at.exists():
            content = at.read_bytes()
        digest = hashlib.sha256(content).hexdigest()
        self.spool.inbound_begin(peer, message_id, digest, copy, service)
        if not delivered:
            return copy
        ticket = ("text/plain", len(content)) if handover is not None else None
        self.spool.inbound_delivered(peer, message_id, [("X", "y")], b"our receipt", ticket)
        if handover == "done":
            self.spool.handover_done(peer, message_id)
        elif handover == "failed":
            self.spool.handover_failed(peer, message_id, "gave up")
        return copy

    def later(self, days: float) -> datetime:
        self.clock.at += timedelta(days=days)
        return self.clock.at


@pytest.fixture
def place(tmp_path: Path, make_spool: MakeSpool) -> Place:
    return Place(tmp_path, make_spool)


def test_nothing_still_owed_is_purged_whatever_the_date(place: Place) -> None:
    owed_out = [
        OutboundState.INTAKE,  # not signed and encrypted yet
        OutboundState.QUEUED,  # unsent
        OutboundState.SENDING,
        OutboundState.AWAITING_RECEIPT,  # its receipt still to come
        OutboundState.FAILED,  # an operator decides: retry or cancel
        OutboundState.DEAD,
        OutboundState.EXPIRED,
    ]
    receipts = {s: place.outbound(f"<{s.value}@h>", s) for s in owed_out}
    assert place.spool.get("<expired@h>").state is OutboundState.EXPIRED  # type: ignore[union-attr]
    assert receipts[OutboundState.FAILED].exists()
    not_answered = place.inbound("<in-delivering@l>", delivered=False)  # receipt owed to peer
    pending = place.inbound("<in-pending@l>", handover="pending")  # not handed over
    failed = place.inbound("<in-failed@l>", handover="failed")  # hand-over failed: owed
    place.later(10_000)

    counts = place.retention.purge(PurgeRequest(before=place.clock.at), "operator:test")

    assert counts == {k.value: 0 for k in ORDER}
    for state in owed_out:
        record = place.spool.get(f"<{state.value}@h>")
        assert record is not None and record.state is state
    assert receipts[OutboundState.FAILED].exists()
    assert place.spool.get("<failed@h>").receipt_path is not None  # type: ignore[union-attr]
    for copy, mid, inbound_state in (
        (not_answered, "<in-delivering@l>", "delivering"),
        (pending, "<in-pending@l>", "delivered"),
        (failed, "<in-failed@l>", "delivered"),
    ):
        assert copy.exists()
        received = place.spool.inbound_get("lab", mid)
        assert received is not None and received.state == inbound_state
    assert place.spool.inbound_get("lab", "<in-pending@l>").receipt_body == b"our receipt"  # type: ignore[union-attr]
    assert len(place.spool.handover_list()) == 2
    assert place.audit.named("retention.disposed") == []
    [summary] = place.audit.named("retention.purged")
    assert summary.actor == "operator:test" and summary.detail["counts"] == counts


def test_a_purge_disposes_of_finished_messages_files_first_and_audits_each(
    place: Place,
) -> None:
    receipt = place.outbound("<sent@h>", OutboundState.DELIVERED)
    place.outbound("<withdrawn@h>", OutboundState.CANCELLED)
    copy = place.inbound("<got@l>")  # answered and handed over
    own = place.inbound("<inbox-only@l>", handover=None)  # no internal system: not ours
    before = place.later(1)
    place.outbound("<newer@h>", OutboundState.DELIVERED)  # finished after the date: kept

    dry = place.retention.purge(PurgeRequest(before=before, dry_run=True), "operator:test")
    assert receipt.exists() and copy.exists() and place.spool.get("<sent@h>") is not None
    counts = place.retention.purge(PurgeRequest(before=before), "operator:test")

    assert counts == dry == {"received": 1, "receipts": 3, "handover": 1, "spool": 4}
    assert not receipt.exists() and not copy.exists()
    assert own.exists()  # the inbox copy no hand-over took over is the internal side's
    for mid in ("<sent@h>", "<withdrawn@h>"):
        assert place.spool.get(mid) is None
    assert place.spool.submitter("<sent@h>") is None
    assert place.spool.inbound_get("lab", "<got@l>") is None
    assert place.spool.inbound_get("lab", "<inbox-only@l>") is None
    assert place.spool.handover_list() == []
    assert place.spool.get("<newer@h>").receipt_path.exists()  # type: ignore[union-attr]
    disposed = place.audit.named("retention.disposed")
    by_kind = {e.detail["kind"]: e.detail["messages"] for e in disposed}
    assert [m["message_id"] for m in by_kind["received"]] == ["<got@l>"]
    assert {m["message_id"] for m in by_kind["spool"]} == {
        "<sent@h>",
        "<withdrawn@h>",
        "<got@l>",
        "<inbox-only@l>",
    }
    assert all(e.actor == "operator:test" for e in disposed)
    [dry_event, real] = place.audit.named("retention.purged")
    assert dry_event.detail["dry_run"] is True and real.detail["dry_run"] is False
    assert real.detail["counts"] == counts and real.severity.value == "warning"


def test_a_kind_takes_only_itself_and_what_it_holds(place: Place) -> None:
    receipt = place.outbound("<sent@h>", OutboundState.DELIVERED)
    copy = place.inbound("<got@l>")
    before = place.later(1)

    counts = place.retention.purge(
        PurgeRequest(before=before, kinds=(RetainedKind.RECEIVED,)), "operator:test"
    )
    assert counts == {"received": 1}
    assert not copy.exists() and receipt.exists()
    assert len(place.spool.handover_list()) == 1

    counts = place.retention.purge(
        PurgeRequest(before=before, kinds=(RetainedKind.RECEIPTS,)), "operator:test"
    )
    assert counts == {"receipts": 2}
    assert not receipt.exists() and place.spool.get("<sent@h>") is not None
    kept = place.spool.inbound_get("lab", "<got@l>")
    assert kept is not None and kept.receipt_body is None  # still detects a resend


def test_a_receipt_kept_in_its_row_goes_with_its_key_and_the_record_waits_for_it(
    place: Place,
) -> None:
    """Receipts disposal clears the row's receipt and deletes its data key in one
    transaction (nothing readable is left); the record itself goes only after that."""
    message_id = "<row@h>"
    place.spool.add_intake(
        message_id, "lab", "doc.hl7", "application/hl7-v2", place.tmp / "s", place.tmp / "p"
    )
    place.spool.mark_queued(message_id, None, [], "mic", 3, body=b"sealed")
    place.spool.mark_sending(message_id)
    key = DataKey(receipt_item(message_id), 1, b"wrapped data key")
    done = Settled(message_id, OutboundState.DELIVERED, "processed", None, None, key)
    sha256 = hashlib.sha256(b"sealed receipt").hexdigest()
    assert place.spool.mark_settled(
        [replace(done, receipt=b"sealed receipt", receipt_sha256=sha256)]
    )
    # Records kept a day, receipts ten: the record waits for its receipt.
    settings = RetentionSettings(days={RetainedKind.SPOOL: 1, RetainedKind.RECEIPTS: 10}, rules=())
    before = place.later(2)
    assert place.retention.sweep(settings) == {}
    assert place.spool.stored_receipt(message_id, MAX_SEALED_RECEIPT) == b"sealed receipt"

    receipts_only = PurgeRequest(before=before, kinds=(RetainedKind.RECEIPTS,))
    assert place.retention.purge(receipts_only, "operator:test") == {"receipts": 1}
    record = place.spool.get(message_id)
    assert record is not None and not record.has_receipt
    assert place.spool.stored_receipt(message_id, MAX_SEALED_RECEIPT) is None
    assert place.spool.data_key(receipt_item(message_id)) is None
    [disposed] = place.audit.named("retention.disposed")
    assert disposed.detail["messages"][0]["message_id"] == message_id

    assert place.retention.sweep(settings) == {"spool": 1}
    assert place.spool.get(message_id) is None


def test_a_resend_after_its_receipt_was_disposed_of_is_not_handed_over_again(
    place: Place,
) -> None:
    place.inbound("<got@l>")
    kinds = (RetainedKind.RECEIPTS, RetainedKind.HANDOVER)
    counts = place.retention.purge(PurgeRequest(place.later(1), kinds), "operator:test")
    assert counts == {"received": 1, "receipts": 1, "handover": 1}
    record = place.spool.inbound_get("lab", "<got@l>")
    assert record is not None and record.state == "delivered"  # the resend detection stays
    # The receiver answers the resend again, as gateway.inbound does for a known record.
    place.spool.inbound_delivered("lab", "<got@l>", [], b"new receipt", ("text/plain", 10))
    assert place.spool.handover_list() == []  # not queued a second time


def test_the_sweep_applies_each_peers_and_services_own_limit(place: Place) -> None:
    place.outbound("<lab-a@h>", OutboundState.DELIVERED, "lab", "results")
    place.outbound("<lab-b@h>", OutboundState.DELIVERED, "lab")
    place.outbound("<clinic@h>", OutboundState.DELIVERED, "clinic")
    settings = RetentionSettings(
        days={RetainedKind.SPOOL: 100, RetainedKind.RECEIPTS: 100},
        rules=(
            RetentionRule("lab", "results", {RetainedKind.SPOOL: 10, RetainedKind.RECEIPTS: 10}),
            RetentionRule("lab", None, {RetainedKind.SPOOL: None, RetainedKind.RECEIPTS: None}),
        ),
    )
    place.later(9)
    assert place.retention.sweep(settings) == {}
    assert place.audit.events == []  # a sweep that disposes of nothing is not audited
    place.later(2)
    assert place.retention.sweep(settings) == {"receipts": 1, "spool": 1}
    assert place.spool.get("<lab-a@h>") is None
    assert place.spool.get("<clinic@h>") is not None
    place.later(100)
    assert place.retention.sweep(settings) == {"receipts": 1, "spool": 1}
    assert place.spool.get("<clinic@h>") is None
    assert place.spool.get("<lab-b@h>") is not None  # the lab's rule: kept for ever
    assert [e.detail["trigger"] for e in place.audit.named("retention.purged")] == ["sweep"] * 2
    assert {e.actor for e in place.audit.events} == {"medgw retention sweep"}


def test_purge_dates_are_checked() -> None:
    now = datetime(2026, 5, 1, tzinfo=UTC)
    assert parse_before("2026-04-01", now) == datetime(2026, 4, 1, tzinfo=UTC)
    assert parse_before("2026-04-01T09:00:00+09:00", now) == datetime(2026, 4, 1, tzinfo=UTC)
    with pytest.raises(PurgeRefused, match="in the future"):
        parse_before("2026-06-01", now)
    with pytest.raises(PurgeRefused, match="no UTC offset"):
        parse_before("2026-04-01T00:00:00", now)
    with pytest.raises(PurgeRefused, match="not an ISO 8601"):
        parse_before("last week", now)


# Real files that fail retention's removal where no mode can (the tests run as root, whom
# no folder's permissions stop), with no mount: the kernel's /proc.
# A file no one, root included, can unlink (EPERM), that reads the same each time: a copy
# or receipt that cannot be removed (its folder not the gateway's to write) and is still
# the file its record names.
UNREMOVABLE = Path("/proc/version")
# A folder whose sync fails (/proc refuses fsync: EINVAL, as some network file systems
# do); a path in it that is no file stands for a copy already gone there.
UNSYNCABLE = Path("/proc") / "medgw-copy-gone.hl7"


class _Killed(Exception):
    """Where the process disposing of things would be killed."""


class _KilledAfterTheCommit:
    """The spool of a retention killed just after its first disposal's commit, before it
    removes the files of what that disposed of."""

    def __init__(self, spool: Spool) -> None:
        self._spool = spool

    def dispose(self, items: Sequence[Disposable]) -> list[Disposable]:
        self._spool.dispose(items)
        raise _Killed

    def __getattr__(self, name: str) -> Any:
        return getattr(self._spool, name)


def _killed(place: Place, request: PurgeRequest) -> None:
    """``request`` purged by a process killed after its first commit."""
    killed = Retention(cast(Spool, _KilledAfterTheCommit(place.spool)), place.audit, place.clock)
    with pytest.raises(_Killed):
        killed.purge(request, "operator:test")


def test_an_inbox_copy_a_killed_purge_left_goes_at_the_next_sweep_before_its_record(
    place: Place,
) -> None:
    """Both backends: a purge clears the copy's hand-over record first, then removes the
    file.  Killed in between, the record says the copy went and that its file is still
    to be removed; the record cannot go before it is.  The next sweep (the daemon's
    first is at its start) removes the file, then the record may go."""
    copy = place.inbound("<got@l>")
    before = place.later(1)
    _killed(place, PurgeRequest(before=before, kinds=(RetainedKind.RECEIVED,)))
    assert copy.exists()
    [left] = place.spool.files_pending()
    assert (left.kind, left.message_id, left.file) == (RetainedKind.RECEIVED, "<got@l>", copy)
    assert place.spool.disposable(RetainedKind.HANDOVER, before.isoformat()) == []

    assert place.retention.sweep(KEEP) == {}  # nothing else to dispose of
    assert not copy.exists()
    assert place.spool.files_pending() == []
    counts = place.retention.purge(PurgeRequest(before=before), "operator:test")
    assert counts == {"received": 0, "receipts": 1, "handover": 1, "spool": 1}
    assert place.spool.handover_list() == []


def test_a_purge_first_removes_the_inbox_copies_a_killed_one_left(place: Place) -> None:
    """Both backends: an operator's purge after a killed one removes the copies it left
    before it disposes of anything, so their records go in the same purge."""
    copy = place.inbound("<got@l>")
    before = place.later(1)
    _killed(place, PurgeRequest(before=before, kinds=(RetainedKind.RECEIVED,)))
    assert copy.exists()

    dry = place.retention.purge(PurgeRequest(before=before, dry_run=True), "operator:test")
    assert copy.exists() and len(place.spool.files_pending()) == 1  # a dry run removes nothing
    counts = place.retention.purge(PurgeRequest(before=before), "operator:test")
    assert counts == dry == {"received": 0, "receipts": 1, "handover": 1, "spool": 1}
    assert not copy.exists() and place.spool.handover_list() == []


def test_the_sweep_of_copies_left_removes_no_other_file(place: Place) -> None:
    """Both backends: the sweep removes only the files of copies whose disposal was
    committed: not a copy a hand-over record still keeps, nor one waiting for its
    hand-over, nor a document being delivered (written, not yet recorded as
    delivered), nor the inbox's documents no hand-over takes (the internal system's),
    nor a file no row names."""
    left = place.inbound("<left@c>", peer="clinic")
    kept = place.inbound("<kept@l>")  # handed over, kept for its retention
    waiting = place.inbound("<waiting@l>", handover="pending")
    writing = place.inbound("<writing@l>", delivered=False)
    own = place.inbound("<inbox-only@l>", handover=None)
    stray = place.tmp / "inbox" / "dropped.hl7"
    stray.write_bytes(b"MSH|dropped")
    before = place.later(1)
    _killed(place, PurgeRequest(before=before, kinds=(RetainedKind.RECEIVED,), peer="clinic"))
    assert left.exists()

    assert place.retention.sweep(KEEP) == {}
    assert not left.exists()
    assert all(f.exists() for f in (kept, waiting, writing, own, stray))


def test_an_inbox_copy_that_cannot_be_removed_stops_no_other_disposal(place: Place) -> None:
    """Both backends: a copy left by a killed purge, still the copy, that cannot be
    unlinked is alerted once, naming it and why, with a fix, and stays owed, its record
    kept and retried at each sweep; the other copies left are removed, and purges of
    other kinds and sweeps go on."""
    stuck = place.inbound("<stuck@l>", at=UNREMOVABLE)
    other = place.inbound("<other@l>")
    before = place.later(1)
    _killed(place, PurgeRequest(before=before, kinds=(RetainedKind.RECEIVED,)))

    counts = place.retention.purge(
        PurgeRequest(before=before, kinds=(RetainedKind.RECEIPTS,)), "operator:test"
    )
    assert counts == {"receipts": 2}
    assert place.retention.sweep(KEEP) == {}
    assert not other.exists() and stuck.exists()
    [left] = place.spool.files_pending()
    assert (left.message_id, left.file) == ("<stuck@l>", stuck)
    [alert] = [e for e in place.audit.named("retention.disposed") if e.outcome == "failure"]
    assert alert.message_id == "<stuck@l>" and alert.severity.value == "alert"
    assert f"{stuck} of a received item disposed of could not be removed: Operation not" in (
        alert.reason or ""
    )
    assert alert.detail["file"] == str(stuck) and str(stuck) in alert.detail["fix"]
    assert "the next sweep or purge retries it" in alert.detail["fix"]
    assert place.spool.disposable(RetainedKind.HANDOVER, before.isoformat()) == [
        Disposable(RetainedKind.HANDOVER, "handover", "lab", "<other@l>", None, None)
    ]


def _open_files() -> set[str]:
    """What this process holds open, by path."""
    found = set()
    for fd in os.listdir("/proc/self/fd"):
        try:
            found.add(os.readlink(f"/proc/self/fd/{fd}"))
        except FileNotFoundError:  # the listing's own, closed since
            continue
    return found


def test_a_folder_where_a_copy_was_left_stays_owed_until_it_is_removed(place: Place) -> None:
    """Both backends: a folder put where a killed purge left a copy is not read (nor
    removed, nor left open): the copy stays owed, alerted; once an administrator removes
    the folder, the next sweep clears what is owed."""
    stuck = place.inbound("<stuck@l>")
    before = place.later(1)
    _killed(place, PurgeRequest(before=before, kinds=(RetainedKind.RECEIVED,)))
    stuck.unlink()
    stuck.mkdir()
    (stuck / "x").write_bytes(b"")

    assert place.retention.sweep(KEEP) == {}
    assert stuck.is_dir() and len(place.spool.files_pending()) == 1
    assert str(stuck) not in _open_files()  # read no more than it is removed
    [alert] = [e for e in place.audit.named("retention.disposed") if e.outcome == "failure"]
    assert "not a regular file (a folder" in (alert.reason or "")

    (stuck / "x").unlink()
    stuck.rmdir()  # the administrator's fix: the next sweep clears what is owed
    assert place.retention.sweep(KEEP) == {}
    assert place.spool.files_pending() == []


def test_a_pipe_where_a_copy_was_left_holds_no_sweep(place: Place) -> None:
    """Both backends: a FIFO put where a killed purge left a copy is not opened for a
    writer that never comes: the sweep goes on, the copy stays owed and is alerted."""
    piped = place.inbound("<piped@l>")
    before = place.later(1)
    _killed(place, PurgeRequest(before=before, kinds=(RetainedKind.RECEIVED,)))
    piped.unlink()
    os.mkfifo(piped)
    outcome: list[object] = []
    sweep = threading.Thread(target=lambda: outcome.append(place.retention.sweep(KEEP)))
    sweep.start()
    sweep.join(60)
    if sweep.is_alive():  # the sweep waits for a writer: be one, so the test can end
        os.close(os.open(piped, os.O_WRONLY | os.O_NONBLOCK))
        sweep.join(60)
        raise AssertionError("the sweep waited on the pipe")
    assert outcome == [{}]
    [left] = place.spool.files_pending()
    assert left.file == piped
    [alert] = [e for e in place.audit.named("retention.disposed") if e.outcome == "failure"]
    assert alert.detail["file"] == str(piped) and "not a regular file" in (alert.reason or "")


def test_a_file_that_is_not_the_copy_left_is_kept_and_no_longer_owed(place: Place) -> None:
    """Both backends: where a killed purge left a copy, a file of another size or SHA-256
    (another program's, written there since) is not the copy disposed of: the sweep keeps
    it, says so, and its record no longer owes its removal (nor is it retried)."""
    same_size = place.inbound("<same-size@l>")
    other_size = place.inbound("<other-size@l>")
    left = place.inbound("<left@l>")
    before = place.later(1)
    _killed(place, PurgeRequest(before=before, kinds=(RetainedKind.RECEIVED,)))
    same_size.write_bytes(b"MSH|<SAME-SIZE@l>")
    other_size.write_bytes(b"MSH|another document")

    assert place.retention.sweep(KEEP) == {}
    assert same_size.read_bytes() == b"MSH|<SAME-SIZE@l>"
    assert other_size.read_bytes() == b"MSH|another document"
    assert not left.exists()
    assert place.spool.files_pending() == []
    kept = [e for e in place.audit.named("retention.disposed") if e.outcome == "failure"]
    assert sorted(e.detail["file"] for e in kept) == sorted(map(str, (same_size, other_size)))
    counts = place.retention.purge(PurgeRequest(before=before), "operator:test")
    assert counts["handover"] == 3 and same_size.exists() and other_size.exists()


def test_the_removal_of_a_copy_a_killed_purge_left_is_audited(place: Place) -> None:
    """Both backends: a purge killed after its commit may not have written its
    ``retention.disposed``; the sweep that removes the copy it left names it in one."""
    copy = place.inbound("<got@l>")
    before = place.later(1)
    _killed(place, PurgeRequest(before=before, kinds=(RetainedKind.RECEIVED,)))
    place.audit.events.clear()  # as if killed before its record was written

    assert place.retention.sweep(KEEP, actor="medgw retention sweep") == {}
    assert not copy.exists()
    [record] = place.audit.named("retention.disposed")
    assert record.outcome == "success" and record.actor == "medgw retention sweep"
    assert record.detail["kind"] == "received" and record.detail["left_by_earlier_run"]
    assert record.detail["files"] == [str(copy)]
    assert [m["message_id"] for m in record.detail["messages"]] == ["<got@l>"]


def test_a_purge_keeps_a_file_that_is_no_longer_the_copy_handed_over(place: Place) -> None:
    """Both backends: where a copy was handed over, a file of another size or SHA-256
    under its name (the internal system's or an operator's, written there since) is not
    the copy: the purge that disposes of the copy keeps that file and says so, the
    record no longer owes its removal, and the copies still there go."""
    same_size = place.inbound("<same-size@l>")
    other_size = place.inbound("<other-size@l>")
    copy = place.inbound("<got@l>")
    same_size.write_bytes(b"MSH|<SAME-SIZE@l>")
    other_size.write_bytes(b"MSH|the internal system's own document")
    before = place.later(1)

    received = PurgeRequest(before=before, kinds=(RetainedKind.RECEIVED,))
    assert place.retention.purge(received, "operator:test") == {"received": 3}
    assert same_size.read_bytes() == b"MSH|<SAME-SIZE@l>"
    assert other_size.read_bytes() == b"MSH|the internal system's own document"
    assert not copy.exists()
    assert place.spool.files_pending() == []
    kept = [e for e in place.audit.named("retention.disposed") if e.outcome == "failure"]
    assert sorted(e.detail["file"] for e in kept) == sorted(map(str, (same_size, other_size)))
    assert {e.severity.value for e in kept} == {"warning"}
    assert all("is not the received copy" in (e.reason or "") for e in kept)
    counts = place.retention.purge(PurgeRequest(before=before), "operator:test")
    assert counts["handover"] == 3 and same_size.exists() and other_size.exists()


class _RenamedAway(PosixPath):
    """An inbox copy's path whose copy another program renames away, putting a file of
    the same content in its place, right after the removal has read it: at the path's
    second use (the look just before the unlink)."""

    def __fspath__(self) -> str:
        text = super().__fspath__()
        self.__dict__["uses"] = uses = self.__dict__.get("uses", 0) + 1
        if uses == 2:
            os.rename(text, f"{text}.moved")
            Path(text).write_bytes(Path(f"{text}.moved").read_bytes())
        return text


class _CopiesRenamedAway:
    """The spool, the paths of the inbox copies it finds disposable :class:`_RenamedAway`."""

    def __init__(self, spool: Spool) -> None:
        self._spool = spool

    def disposable(self, *args: Any, **kwargs: Any) -> list[Disposable]:
        return [
            replace(i, file=_RenamedAway(i.file))
            if i.kind is RetainedKind.RECEIVED and i.file
            else i
            for i in self._spool.disposable(*args, **kwargs)
        ]

    def __getattr__(self, name: str) -> Any:
        return getattr(self._spool, name)


def test_a_copy_renamed_away_as_it_is_removed_leaves_the_file_put_in_its_place(
    place: Place,
) -> None:
    """Both backends: a copy checked (its size and SHA-256 are its record's) and then
    renamed away before the unlink, another file put under its name: that file, not the
    one read, is at the path, and is kept (even with the same content), and said so."""
    copy = place.inbound("<got@l>")
    content = copy.read_bytes()
    before = place.later(1)
    retention = Retention(cast(Spool, _CopiesRenamedAway(place.spool)), place.audit, place.clock)

    received = PurgeRequest(before=before, kinds=(RetainedKind.RECEIVED,))
    assert retention.purge(received, "operator:test") == {"received": 1}
    assert copy.read_bytes() == content
    assert Path(f"{copy}.moved").read_bytes() == content
    assert place.spool.files_pending() == []
    [kept] = [e for e in place.audit.named("retention.disposed") if e.outcome == "failure"]
    assert kept.detail["file"] == str(copy) and kept.severity.value == "warning"


def test_a_copy_left_that_is_already_gone_is_recorded_so_not_as_removed(place: Place) -> None:
    """Both backends: a copy a killed purge left that is gone when the next sweep comes
    (that purge removed it before it died, or another program did) is named in a record
    of its own, ``already_gone``, not among the copies the sweep removed."""
    gone = place.inbound("<gone@l>")
    left = place.inbound("<left@l>")
    before = place.later(1)
    _killed(place, PurgeRequest(before=before, kinds=(RetainedKind.RECEIVED,)))
    place.audit.events.clear()
    gone.unlink()

    assert place.retention.sweep(KEEP) == {}
    assert not left.exists() and place.spool.files_pending() == []
    records = place.audit.named("retention.disposed")
    by_state = {e.detail["already_gone"]: e.detail for e in records}
    assert len(records) == 2 and all(e.outcome == "success" for e in records)
    assert by_state[True]["files"] == [str(gone)] and by_state[False]["files"] == [str(left)]
    assert [m["message_id"] for m in by_state[True]["messages"]] == ["<gone@l>"]
    assert all(d["left_by_earlier_run"] and d["count"] == 1 for d in by_state.values())


def test_the_folder_of_a_copy_left_already_gone_is_synced_before_it_is_no_longer_owed(
    place: Place,
) -> None:
    """Both backends: a copy a killed purge left may be gone without its folder synced
    (the purge died between the two): the next sweep syncs its folder; while that sync
    fails the copy stays owed (its record kept, retried at each sweep), alerted once,
    and is not recorded as gone; the other copies go."""
    assert not UNSYNCABLE.exists()
    place.inbound("<unsynced@l>", at=UNSYNCABLE)
    other = place.inbound("<other@l>")
    before = place.later(1)
    _killed(place, PurgeRequest(before=before, kinds=(RetainedKind.RECEIVED,)))

    assert place.retention.sweep(KEEP) == {}
    assert place.retention.sweep(KEEP) == {}
    assert not other.exists()
    [left] = place.spool.files_pending()
    assert (left.message_id, left.file) == ("<unsynced@l>", UNSYNCABLE)
    failed = [e for e in place.audit.named("retention.disposed") if e.outcome == "failure"]
    [alert] = failed
    assert alert.severity.value == "alert" and alert.detail["file"] == str(UNSYNCABLE)
    assert "/proc could not be synced" in (alert.reason or "")
    assert "the next sweep or purge syncs the folder again" in alert.detail["fix"]
    gone = [e for e in place.audit.named("retention.disposed") if e.outcome == "success"]
    assert [f for e in gone for f in e.detail.get("files", [])] == [str(other)]
    counts = place.retention.purge(PurgeRequest(before=before), "operator:test")
    assert counts["handover"] == 1  # the other's; this one's record waits


def test_a_receipt_file_that_cannot_be_removed_is_left_to_the_receipts_sweep(
    place: Place,
) -> None:
    """Both backends: a receipt file disposed of that cannot be removed is alerted with a
    fix of its own: no record names it any more (no sweep or purge retries it, unlike a
    copy): the receipts folder's sweep removes it."""
    place.outbound("<sent@h>", OutboundState.DELIVERED, receipt_at=UNREMOVABLE)
    before = place.later(1)

    receipts = PurgeRequest(before=before, kinds=(RetainedKind.RECEIPTS,))
    assert place.retention.purge(receipts, "operator:test") == {"receipts": 1}
    assert not place.spool.get("<sent@h>").has_receipt  # type: ignore[union-attr]
    [alert] = [e for e in place.audit.named("retention.disposed") if e.outcome == "failure"]
    assert alert.detail["file"] == str(UNREMOVABLE) and alert.severity.value == "alert"
    assert "could not be removed: Operation not permitted" in (alert.reason or "")
    fix = alert.detail["fix"]
    assert fix.startswith(f"remove {UNREMOVABLE}") and "receipts folder's sweep" in fix
    assert "record stays" not in fix and "retries" not in fix


def test_a_copy_that_cannot_be_removed_as_its_batch_is_disposed_of_stays_owed(
    place: Place,
) -> None:
    """Both backends: a copy that cannot be unlinked as the purge that disposes of it
    removes its batch's files is alerted once and stays owed (its hand-over record
    kept); the batch's other copies go, and each later sweep retries it, without
    alerting again."""
    stuck = place.inbound("<stuck@l>", at=UNREMOVABLE)
    other = place.inbound("<other@l>")
    before = place.later(1)

    received = PurgeRequest(before=before, kinds=(RetainedKind.RECEIVED,))
    assert place.retention.purge(received, "operator:test") == {"received": 2}
    assert stuck.exists() and not other.exists()
    [left] = place.spool.files_pending()
    assert (left.message_id, left.file) == ("<stuck@l>", stuck)
    assert place.retention.sweep(KEEP) == {} and len(place.spool.files_pending()) == 1
    failed = [e for e in place.audit.named("retention.disposed") if e.outcome == "failure"]
    [alert] = failed
    assert alert.detail["file"] == str(stuck) and alert.severity.value == "alert"
    assert "could not be removed: Operation not permitted" in (alert.reason or "")
    counts = place.retention.purge(PurgeRequest(before=before), "operator:test")
    assert counts["handover"] == 1 and place.spool.handover_list()[0].message_id == "<stuck@l>"


def test_a_copy_whose_folder_sync_fails_as_its_batch_is_disposed_of_stays_owed(
    place: Place,
) -> None:
    """Both backends: where the folder of a copy a purge disposes of cannot be synced
    (here the copy was gone already: the internal system took it), the removal is not
    taken as done: the copy stays owed, alerted once, and each later sweep syncs again."""
    place.inbound("<unsynced@l>", at=UNSYNCABLE)
    before = place.later(1)

    received = PurgeRequest(before=before, kinds=(RetainedKind.RECEIVED,))
    assert place.retention.purge(received, "operator:test") == {"received": 1}
    assert place.retention.sweep(KEEP) == {}
    [left] = place.spool.files_pending()
    assert (left.message_id, left.file) == ("<unsynced@l>", UNSYNCABLE)
    [alert] = [e for e in place.audit.named("retention.disposed") if e.outcome == "failure"]
    assert alert.detail["file"] == str(UNSYNCABLE) and alert.severity.value == "alert"
    assert "is gone, but its folder /proc could not be synced" in (alert.reason or "")
    assert not any(e.detail.get("left_by_earlier_run") for e in place.audit.events)
