"""The received documents ready at one moment are made durable together: one spool
transaction and one audit write for their receipts, not one per document.

The hospital's real inbound pipeline, spool (each backend) and audit trail receive
the lab's signed and encrypted documents from several threads at once, as the
daemon's worker threads do.  The first group's spool transaction is held until every
other document waits for its receipt to be stored, which real requests cannot be made
to do at an exact moment: those must then be stored in one more group.
"""

from __future__ import annotations

import errno
import os
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from gateway.as2.headers import check_message_id
from gateway.audit import AuditEvent
from gateway.clock import Clock
from gateway.demo_run import drop_file
from gateway.errors import SpoolOutcomeUnknownError, SpoolUnreachableError
from gateway.inbound import InboundRequest, InboundResponse
from gateway.pki.demo import DemoLayout
from gateway.spool import InboundDelivered, Spool
from gateway.spool.postgres import PostgresSettings, PostgresSpool
from tests.conftest import MakeSpool
from tests.helpers.atrest import kept_receipt, sent_receipt
from tests.helpers.audit import events, wait_for_events
from tests.helpers.commit_cut import CommitCut, commit_cut
from tests.helpers.faults import killed_at, wait_killed
from tests.helpers.receiving import Receiver, receiver
from tests.helpers.spooldisk import BACKENDS, SpoolDisk, spool_disk
from tests.inboxwatch import InboxWatch

DEADLINE = 60.0
DOCUMENTS = 6
DELIVERY = """
[delivery]
http_url = "http://127.0.0.1:9/inbound"
timeout_seconds = 5
"""

Store = Callable[[Sequence[InboundDelivered]], None]


class Noted:
    """The spool's receipt transactions and the trail's writes, the first transaction
    held until ``release`` is set; ``fail``: the second one fails with it; ``second``:
    runs as the second one begins, before it is stored; ``instead``: runs the second
    one instead, given the spool's own transaction."""

    def __init__(self, hospital: Receiver, monkeypatch: pytest.MonkeyPatch) -> None:
        self.transactions: list[list[str]] = []
        self.writes: list[list[str]] = []
        self.entered = threading.Event()
        self.release = threading.Event()
        self.fail: Exception | None = None
        self.second: Callable[[], None] | None = None
        self.instead: Callable[[Store, Sequence[InboundDelivered]], None] | None = None
        store, emit_all = hospital.spool.inbound_delivered_all, hospital.audit.emit_all

        def stored(delivered: Sequence[InboundDelivered]) -> None:
            self.transactions.append([one.message_id for one in delivered])
            if len(self.transactions) == 1:
                self.entered.set()
                if not self.release.wait(DEADLINE):
                    raise AssertionError("the test never let the first group go")
            if len(self.transactions) == 2 and self.fail is not None:
                raise self.fail
            if len(self.transactions) == 2 and self.second is not None:
                self.second()
            if len(self.transactions) == 2 and self.instead is not None:
                self.instead(store, delivered)
                return
            store(delivered)

        def written(events: Sequence[AuditEvent]) -> None:
            self.writes.append([str(event.event) for event in events])
            emit_all(events)

        monkeypatch.setattr(hospital.spool, "inbound_delivered_all", stored)
        monkeypatch.setattr(hospital.audit, "emit_all", written)


@pytest.fixture
def hospital(tmp_path: Path, make_spool: MakeSpool) -> Iterator[Receiver]:
    with receiver(tmp_path, spool=make_spool) as opened:
        yield opened


def _until(condition: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + DEADLINE
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.005)


def _receive_together(
    hospital: Receiver, noted: Noted, requests: Sequence[InboundRequest] | None = None
) -> tuple[list[Any], list[str]]:
    """DOCUMENTS documents (``requests``, else new ones) processed in threads of their
    own: the first one's group held until all the others, started then, wait for theirs;
    each one's answer (or error), and the documents' Message-IDs."""
    if requests is None:
        requests = [hospital.request(b"MSH|together %d\r" % n) for n in range(DOCUMENTS)]
    answers: list[Any] = [None] * DOCUMENTS

    def process(index: int) -> None:
        try:
            answers[index] = hospital.inbound.process(requests[index])
        except Exception as exc:
            answers[index] = exc

    threads = [threading.Thread(target=process, args=(n,)) for n in range(DOCUMENTS)]
    threads[0].start()
    assert noted.entered.wait(DEADLINE), "no group stored its receipts"
    assert len(noted.transactions[0]) == 1
    for thread in threads[1:]:
        thread.start()
    _until(
        lambda: hospital.inbound.receipts_waiting == DOCUMENTS - 1,
        "every other document waits for its receipt to be stored",
    )
    noted.release.set()
    for thread in threads:
        thread.join(DEADLINE)
        assert not thread.is_alive(), "a document's processing did not end"
    return answers, [check_message_id(request.headers["message-id"]) for request in requests]


def _each_settled_once(
    hospital: Receiver,
    answers: Sequence[Any],
    message_ids: list[str],
    document: bytes = b"MSH|together %d\r",
) -> None:
    """Every document (``document`` % its number) answered with its receipt, in the
    inbox once, delivered with its receipt in the spool and, where the hospital hands
    documents over, one hand-over, with one ``message.delivered`` and one
    ``receipt.sent`` record in the trail."""
    assert all(isinstance(a, InboundResponse) and a.status == 200 for a in answers), answers
    assert all(b"processed" in a.body for a in answers)
    [peer] = hospital.config.peers
    inbox = hospital.config.storage.inbox_dir / peer.name
    assert sorted(p.read_bytes() for p in inbox.iterdir()) == sorted(
        document % n for n in range(DOCUMENTS)
    )
    handovers = 0 if hospital.config.delivery is None else 1
    for message_id in message_ids:
        record = hospital.spool.inbound_get(peer.name, message_id)
        assert record is not None and record.state == "delivered" and record.receipt_body
        assert len(hospital.spool.handover_list(message_id=message_id)) == handovers, message_id
    for name in ("message.delivered", "receipt.sent"):
        recorded = [r["message_id"] for r in events(hospital.config.storage.audit_log, name)]
        assert sorted(recorded) == sorted(message_ids), (name, recorded)


def test_documents_delivered_together_are_stored_in_one_group(
    hospital: Receiver, monkeypatch: pytest.MonkeyPatch
) -> None:
    noted = Noted(hospital, monkeypatch)
    answers, message_ids = _receive_together(hospital, noted)
    # The documents that waited while the first one was stored: one transaction ...
    first, *rest = noted.transactions
    assert first == message_ids[:1] and len(rest) == 1, noted.transactions
    assert sorted(rest[0]) == sorted(message_ids[1:])
    # ... and one audit write of their receipt.sent records.
    sent = [write for write in noted.writes if "receipt.sent" in write]
    assert [len(write) for write in sent] == [1, DOCUMENTS - 1], noted.writes
    _each_settled_once(hospital, answers, message_ids)


def test_a_group_whose_transaction_fails_stores_its_documents_one_by_one(
    hospital: Receiver, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A failed group transaction fails none of its documents by itself: each is
    stored again in a transaction of its own (each succeeds here: the failure was the
    group's), and every document is answered with its receipt."""
    noted = Noted(hospital, monkeypatch)
    noted.fail = OSError("disk I/O error")
    answers, message_ids = _receive_together(hospital, noted)
    _, failed, *alone = noted.transactions
    assert sorted(failed) == sorted(message_ids[1:]), noted.transactions
    assert alone == [[message_id] for message_id in failed]
    _each_settled_once(hospital, answers, message_ids)


def test_a_group_that_cannot_reach_the_spool_is_not_tried_again_document_by_document(
    hospital: Receiver, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The spool unreachable fails every transaction: the group's documents are answered
    at once (the peer sends them again), not after one more attempt, and its timeout, each,
    while the documents behind them wait."""
    noted = Noted(hospital, monkeypatch)
    noted.fail = SpoolUnreachableError("the spool's database server does not answer")
    answers, message_ids = _receive_together(hospital, noted)
    assert len(noted.transactions) == 2, noted.transactions
    assert isinstance(answers[0], InboundResponse) and answers[0].status == 200, answers
    assert all(not (isinstance(a, InboundResponse) and a.status == 200) for a in answers[1:])
    [peer] = hospital.config.peers
    for message_id in message_ids[1:]:
        record = hospital.spool.inbound_get(peer.name, message_id)
        assert record is None or record.state != "delivered", record


class _Pausing(threading.Condition):
    """The receipt groups' condition, for a leader whose own document is not in its
    group: after the first ``skip`` documents handed in, the next ``pausing`` ones'
    threads wait for ``go`` once they have let it go, before they try to lead; those
    after them wait to lead."""

    def __init__(self, skip: int, pausing: int) -> None:
        super().__init__()
        self.skip = skip
        self.pausing = pausing
        self.go = threading.Event()
        self._handed_in = threading.local()

    def notify_all(self) -> None:  # a document handed in (or given up)
        super().notify_all()
        self._handed_in.now = True

    def __exit__(self, *args: Any) -> None:
        super().__exit__(*args)
        if getattr(self._handed_in, "now", False):
            self._handed_in.now = False
            with self:
                if self.skip > 0:
                    self.skip, pause = self.skip - 1, False
                else:
                    pause, self.pausing = self.pausing > 0, self.pausing - 1
            if pause and not self.go.wait(DEADLINE):
                raise AssertionError("the test never let the paused documents go")


def test_a_leader_whose_document_is_not_in_its_group_stores_the_next_one_too(
    hospital: Receiver, monkeypatch: pytest.MonkeyPatch
) -> None:
    """More documents wait than a group holds (here two: as when more threads than a
    group's limit receive at once), and the first ones handed in are slow to try to lead:
    the leader's group is the documents handed in first, without its own.  It stores that
    group, then leads again until its own document is stored: each document is stored
    and audited before it is answered, none left behind."""
    groups = hospital.inbound._receipt_groups
    pausing = _Pausing(skip=1, pausing=2)  # not the first document: the two after it
    monkeypatch.setattr(groups, "_limit", 2)
    monkeypatch.setattr(groups, "_changed", pausing)
    [peer] = hospital.config.peers
    trail = hospital.config.storage.audit_log
    stored_when_answered: dict[str, bool] = {}
    process = hospital.inbound.process

    def answered(request: InboundRequest) -> InboundResponse:
        answer = process(request)
        message_id = check_message_id(request.headers["message-id"])
        record = hospital.spool.inbound_get(peer.name, message_id)
        sent = [r for r in events(trail, "receipt.sent") if r["message_id"] == message_id]
        stored_when_answered[message_id] = bool(record and record.state == "delivered" and sent)
        return answer

    monkeypatch.setattr(hospital.inbound, "process", answered)
    noted = Noted(hospital, monkeypatch)
    noted.second = pausing.go.set  # the paused documents' group is being stored
    answers, message_ids = _receive_together(hospital, noted)
    first, *rest = noted.transactions
    assert first == message_ids[:1] and [len(group) for group in rest] == [2, 2, 1], rest
    assert sorted(one for group in rest for one in group) == sorted(message_ids[1:])
    assert all(isinstance(a, InboundResponse) and a.status == 200 for a in answers), answers
    assert stored_when_answered == dict.fromkeys(message_ids, True), stored_when_answered
    sent = [r["message_id"] for r in events(trail, "receipt.sent")]
    assert sorted(sent) == sorted(message_ids)


@pytest.fixture
def hospital_sqlite(tmp_path: Path) -> Iterator[Receiver]:
    with receiver(tmp_path) as opened:  # its spool: SQLite in its state folder
        yield opened


@pytest.fixture(params=BACKENDS)
def disk(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[SpoolDisk]:
    with spool_disk(request, tmp_path) as opened:
        yield opened


def test_a_group_whose_spool_disk_is_full_is_not_tried_again_document_by_document(
    disk: SpoolDisk, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The spool's disk full (the spool's real error: SQLite's on a full file system,
    PostgreSQL's SQLSTATE 53100) fails every transaction: the group's documents are
    answered 503 at once, not each after one more attempt, the operator told why and
    what to do, the peer nothing; its resends, once space is freed, are delivered once."""
    with receiver(tmp_path, spool=disk.open) as hospital:
        requests = [hospital.request(b"MSH|full %d\r" % n) for n in range(DOCUMENTS)]
        noted = Noted(hospital, monkeypatch)
        noted.second = disk.fill
        answers, message_ids = _receive_together(hospital, noted, requests)
        assert len(noted.transactions) == 2, noted.transactions
        assert isinstance(answers[0], InboundResponse) and answers[0].status == 200, answers
        for answer in answers[1:]:
            assert isinstance(answer, InboundResponse) and answer.status == 503, answers
            assert b"spool" not in answer.body and b"space" not in answer.body, answer
        # One alert for the outage (the next refusals of its cause are counted).
        refused = events(hospital.config.storage.audit_log, "storage.unavailable")
        assert len(refused) == 1 and refused[0]["message_id"] in message_ids[1:], refused
        for alert in refused:
            assert "spool write failed" in alert["reason"], alert
            assert "no disk space is left for the spool" in alert["reason"], alert
            assert disk.where in alert["reason"], alert
            assert alert["detail"]["fix"].startswith("free disk space on the"), alert

        disk.free()  # the administrator frees space; the peer resends
        resent = [hospital.inbound.process(request) for request in requests[1:]]
        _each_settled_once(hospital, [answers[0], *resent], message_ids, b"MSH|full %d\r")


def test_a_group_whose_sqlite_spool_another_process_holds_is_not_tried_again_one_by_one(
    hospital_sqlite: Receiver, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Another process holding the SQLite spool (a sqlite3 shell left in a transaction)
    makes every transaction wait for it, then fail: the group's documents are answered
    503 after one wait, not one wait each."""
    hospital = hospital_sqlite
    path = hospital.config.storage.state_dir / "spool.sqlite3"
    other = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    try:
        noted = Noted(hospital, monkeypatch)

        def hold() -> None:
            other.execute("BEGIN IMMEDIATE")

        noted.second = hold
        answers, message_ids = _receive_together(hospital, noted)
        assert len(noted.transactions) == 2, noted.transactions
        assert isinstance(answers[0], InboundResponse) and answers[0].status == 200, answers
        assert all(isinstance(a, InboundResponse) and a.status == 503 for a in answers[1:])
        # One alert for the outage (the next refusals of its cause are counted).
        refused = events(hospital.config.storage.audit_log, "storage.unavailable")
        assert len(refused) == 1 and refused[0]["message_id"] in message_ids[1:], refused
        for alert in refused:
            assert f"another process held the spool database {path}" in alert["reason"], alert
            assert f"fuser -v {path}" in alert["detail"]["fix"], alert
    finally:
        if other.in_transaction:
            other.execute("ROLLBACK")
        other.close()


@pytest.fixture
def handing_over(tmp_path: Path, make_spool: MakeSpool) -> Iterator[Receiver]:
    """The hospital also handing each document over to its internal system: the
    hand-over is queued in the spool with the document's receipt."""
    with receiver(tmp_path, gateway_extra=DELIVERY, spool=make_spool) as opened:
        yield opened


cut = commit_cut()


@pytest.fixture
def behind_a_cut(tmp_path: Path, postgres: PostgresSettings, cut: CommitCut) -> Iterator[Receiver]:
    """The hospital handing over (as ``handing_over``) on a PostgreSQL spool reached
    through ``cut``."""
    settings = replace(postgres, socket_dir=cut.socket_dir, connect_timeout=1)

    def spool(clock: Clock) -> Spool:
        return PostgresSpool(settings, clock)

    with receiver(tmp_path, gateway_extra=DELIVERY, spool=spool) as opened:
        yield opened


class _FailingRows(list[InboundDelivered]):
    """A group's rows whose transaction fails part-way: as it comes to the row at ``at``,
    once the rows before it are changed."""

    def __init__(self, rows: Sequence[InboundDelivered], at: int) -> None:
        super().__init__(rows)
        self._at = at

    def __iter__(self) -> Iterator[InboundDelivered]:
        for index, row in enumerate(super().__iter__()):
            if index == self._at:
                raise OSError(errno.EIO, "Input/output error")
            yield row


def test_a_group_whose_transaction_fails_part_way_settles_each_document_once(
    handing_over: Receiver, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The group's transaction fails once it has changed some of its documents' rows (it
    is rolled back): each document is stored again alone, and is answered, delivered,
    handed over and audited once."""
    noted = Noted(handing_over, monkeypatch)
    spool = handing_over.spool
    left: list[list[object]] = []  # what the failed transaction left of its first rows

    def failing(store: Store, delivered: Sequence[InboundDelivered]) -> None:
        try:
            store(_FailingRows(delivered, at=2))
        finally:  # before any document is stored again alone
            for row in delivered[:2]:
                record = spool.inbound_get(row.peer, row.message_id)
                left.append(
                    [record and record.state, spool.handover_list(message_id=row.message_id)]
                )

    noted.instead = failing
    answers, message_ids = _receive_together(handing_over, noted)
    assert len(left) == 2 and all(state != "delivered" and not handed for state, handed in left)
    _, group, *alone = noted.transactions
    assert sorted(group) == sorted(message_ids[1:]), noted.transactions
    assert alone == [[message_id] for message_id in group]
    _each_settled_once(handing_over, answers, message_ids)


@pytest.mark.parametrize("when", ["before", "after"])
def test_a_group_whose_commit_outcome_is_unknown_settles_each_document_once(
    behind_a_cut: Receiver, cut: CommitCut, monkeypatch: pytest.MonkeyPatch, when: str
) -> None:
    """The connection to PostgreSQL is lost at the group's COMMIT, ``before`` the server
    sees it (rolled back) or ``after`` (committed), and the server cannot be asked which:
    each document is stored again alone, and is answered, delivered, handed over and
    audited once either way."""
    noted = Noted(behind_a_cut, monkeypatch)
    raised: list[BaseException] = []

    def lost(store: Store, delivered: Sequence[InboundDelivered]) -> None:
        cut.cut(when)
        cut.refuse = True  # nor can the server be asked what became of it
        try:
            store(delivered)
        except BaseException as exc:
            raised.append(exc)
            raise
        finally:
            cut.refuse = False

    noted.instead = lost
    answers, message_ids = _receive_together(behind_a_cut, noted)
    assert cut.cuts == 1 and [type(exc) for exc in raised] == [SpoolOutcomeUnknownError], raised
    _, group, *alone = noted.transactions
    assert sorted(group) == sorted(message_ids[1:]), noted.transactions
    assert alone == [[message_id] for message_id in group]
    _each_settled_once(behind_a_cut, answers, message_ids)


GROUP_STEP = "gateway.spool.sqlite:SqliteSpool.inbound_delivered_all"


def _lab_sends(layout: DemoLayout, processes: Any) -> dict[str, bytes]:
    """The lab started, and its documents (by file name) put in its outbox for the
    hospital."""
    processes.start(layout.lab.config_path)
    documents = {f"order-{n}.hl7": os.urandom(20_000) for n in range(5)}
    for name, data in documents.items():
        drop_file(layout.lab.outbox_for("hospital"), name, data)
    return documents


def _restarted(
    layout: DemoLayout, processes: Any, documents: dict[str, bytes], landed: list[str]
) -> None:
    """The killed hospital started again: the lab's resends of ``documents`` are each
    answered with a verified receipt, each document is in the inbox once, those that
    ``landed`` there before the kill never written again, and each is recorded
    delivered, and its receipt sent, once."""
    inbox = layout.hospital.inbox_dir / "lab"
    before = {name: os.stat(inbox / name) for name in landed}
    with InboxWatch(layout.hospital.inbox_dir) as watch:
        processes.start(layout.hospital.config_path)
        receipts = wait_for_events(layout.lab.audit_log, "receipt.received", count=len(documents))
    assert all(r["detail"]["disposition"] == "processed" for r in receipts)
    assert all(r["detail"]["mic_verified"] for r in receipts)
    assert watch.rewritten == [] and watch.looks > 10
    assert {p.name: p.read_bytes() for p in inbox.iterdir()} == documents
    for name, stat in before.items():
        after = os.stat(inbox / name)
        assert (after.st_ino, after.st_mtime_ns) == (stat.st_ino, stat.st_mtime_ns)
    trail = layout.hospital.audit_log
    delivered = events(trail, "message.delivered")
    assert len(delivered) == len(documents) == len({r["message_id"] for r in delivered})
    sent = wait_for_events(trail, "receipt.sent", count=len(documents))
    assert sorted(r["message_id"] for r in sent) == sorted(r["message_id"] for r in delivered)


def test_a_kill_while_a_group_is_stored_leaves_every_document_delivered_once(
    layout: DemoLayout, processes: Any, tmp_path: Path
) -> None:
    """A real ``medgw run`` hospital is killed as its first group's transaction begins,
    with the lab's documents in its inbox, recorded delivered and waiting for their
    receipts to be stored: after the restart the lab's resends are each answered with a
    verified receipt, and no document is written into the inbox twice."""
    go = tmp_path / "go"
    hold = ("--hold-before", GROUP_STEP, "--until-file", str(go))
    hospital = processes.start(
        layout.hospital.config_path, prefix=killed_at("--kill-before", GROUP_STEP, *hold)
    )
    documents = _lab_sends(layout, processes)
    # The peer's share of the workers (two documents) in the inbox, recorded delivered:
    # one in the held group, the other in it or waiting for the next.
    waiting = wait_for_events(layout.hospital.audit_log, "message.delivered", count=2)
    go.touch()
    wait_killed(hospital)
    assert not events(layout.hospital.audit_log, "receipt.sent")
    inbox = layout.hospital.inbox_dir / "lab"
    landed = sorted(Path(record["detail"]["inbox_file"]).name for record in waiting)
    assert sorted(p.name for p in inbox.iterdir()) == landed
    _restarted(layout, processes, documents, landed)


def test_a_kill_after_a_group_is_committed_leaves_each_document_delivered_once(
    layout: DemoLayout, processes: Any
) -> None:
    """A real ``medgw run`` hospital is killed right after its first group's transaction
    commits, the group holding two of the lab's documents (the lab's share of the
    workers): their receipts are stored, not yet audited as sent nor answered.  After the
    restart each of the lab's documents is in the inbox once, written once, with one
    receipt.sent record, and the lab's resends of the two are answered with the receipts
    stored before the kill."""
    group = 2
    hospital = processes.start(
        layout.hospital.config_path,
        prefix=killed_at("--group-of", str(group), "--kill-after", GROUP_STEP),
    )
    documents = _lab_sends(layout, processes)
    wait_killed(hospital)
    trail = layout.hospital.audit_log
    delivered = events(trail, "message.delivered")
    assert len(delivered) == group and not events(trail, "receipt.sent"), delivered
    assert not events(layout.lab.audit_log, "receipt.received")
    inbox = layout.hospital.inbox_dir / "lab"
    landed = sorted(Path(record["detail"]["inbox_file"]).name for record in delivered)
    assert sorted(p.name for p in inbox.iterdir()) == landed
    # Committed before the kill: each document of the group with its receipt.
    config = layout.hospital.config_path
    receipts = {r["message_id"]: sent_receipt(config, "lab", r["message_id"]) for r in delivered}
    assert all(receipts.values()), receipts
    _restarted(layout, processes, documents, landed)
    # The lab's resends of the group's documents answered with the receipts stored then.
    for message_id, receipt in receipts.items():
        assert kept_receipt(layout.lab.config_path, message_id) == receipt, message_id
