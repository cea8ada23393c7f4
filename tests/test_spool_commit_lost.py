"""A connection to the PostgreSQL spool lost during a COMMIT, on a real server.

The server may have recorded the change before the connection went.  The spool
asks the transaction's fate on a new connection and answers by it; when it
cannot ask, it says the outcome is unknown, and the callers keep what either
outcome needs: a received document is never lost that way.
"""

from __future__ import annotations

import asyncio
import io
from collections.abc import AsyncIterator, Iterator, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from gateway.audit import AuditLog
from gateway.clock import SystemClock
from gateway.config import GatewayConfig, load_config
from gateway.errors import SpoolOutcomeUnknownError, SpoolUnreachableError
from gateway.inbound.exactly_once import InboxDelivery
from gateway.inbound.locks import InboundLocks
from gateway.intake.submit import Submission, SubmissionRefused
from gateway.logs import make_logger
from gateway.outbound import Outbound, Settings
from gateway.outbound.context import Context
from gateway.outbound.intake import OutboxIntake
from gateway.outbound.seal import Sealer
from gateway.outbound.status import MessageStatus
from gateway.outbound.submit import Submissions
from gateway.pki.demo import DemoLayout
from gateway.pki.peers import PeerTrust, assess_peers
from gateway.spool import Claimant, OutboundState
from gateway.spool.postgres import PostgresSettings, PostgresSpool
from tests.clocks import SetClock
from tests.helpers.commit_cut import CommitCut, spool_behind_a_cut

pytestmark = pytest.mark.usefixtures("postgres_server")


cut, spool = spool_behind_a_cut(connect_timeout=1)


def intake(spool: PostgresSpool, tmp_path: Path, message_id: str) -> None:
    spool.add_intake(message_id, "lab", "a.hl7", "text/plain", tmp_path, tmp_path)


def test_a_commit_whose_answer_was_lost_is_found_committed_and_reported_done(
    spool: PostgresSpool, cut: CommitCut, postgres: PostgresSettings, tmp_path: Path
) -> None:
    cut.cut("after")
    intake(spool, tmp_path, "<after@lab>")  # no error: it was recorded
    assert cut.cuts == 1
    record = spool.get("<after@lab>")
    assert record is not None and record.state is OutboundState.INTAKE


@pytest.mark.parametrize("when", ["before", "after"])
def test_a_commit_run_many_times_on_its_connection_is_lost_alike(
    spool: PostgresSpool, cut: CommitCut, tmp_path: Path, when: str
) -> None:
    """A connection that has committed a few times sends its COMMIT as a prepared
    statement (psycopg prepares what it runs often): it is lost at that COMMIT too."""
    for n in range(8):
        intake(spool, tmp_path, f"<earlier-{n}@lab>")
    cut.cut(when)
    cut.refuse = True
    with pytest.raises(SpoolOutcomeUnknownError):
        intake(spool, tmp_path, "<many@lab>")
    cut.refuse = False
    assert cut.cuts == 1
    record = spool.get("<many@lab>")
    assert (record is not None) is (when == "after")


def test_a_commit_lost_before_the_server_saw_it_fails_and_nothing_is_recorded(
    spool: PostgresSpool, cut: CommitCut, tmp_path: Path
) -> None:
    cut.cut("before")
    with pytest.raises(SpoolUnreachableError) as raised:
        intake(spool, tmp_path, "<before@lab>")
    assert not isinstance(raised.value, SpoolOutcomeUnknownError)
    assert cut.cuts == 1
    assert spool.get("<before@lab>") is None


def test_a_commit_lost_while_the_server_cannot_be_asked_is_reported_unknown(
    spool: PostgresSpool, cut: CommitCut, tmp_path: Path
) -> None:
    cut.cut("after")
    cut.refuse = True
    with pytest.raises(SpoolOutcomeUnknownError, match="not known"):
        intake(spool, tmp_path, "<unknown@lab>")
    cut.refuse = False
    record = spool.get("<unknown@lab>")
    assert record is not None  # it was committed after all


@dataclass(frozen=True)
class Lab:
    """The lab's sending side in this process: its configuration, trail and peers."""

    config: GatewayConfig
    clock: SystemClock
    audit: AuditLog
    trust: Mapping[str, PeerTrust]

    def context(self, on: PostgresSpool) -> Context:
        log = make_logger(stream=io.StringIO())
        return Context(Settings(self.config, self.trust), on, self.audit, log, self.clock)

    def submissions(self, on: PostgresSpool) -> Submissions:
        context = self.context(on)
        return Submissions(context, Sealer(context), MessageStatus(context))

    def outbound(self, on: PostgresSpool) -> Outbound:
        log = make_logger(stream=io.StringIO())
        return Outbound(Settings(self.config, self.trust), on, self.audit, log, self.clock)


@pytest.fixture
def lab(layout: DemoLayout, tmp_path: Path) -> Iterator[Lab]:
    config = load_config(layout.lab.config_path)
    clock = SystemClock()
    audit = AuditLog(tmp_path / "audit.jsonl", clock, node="lab")
    trust = asyncio.run(assess_peers(config.peers, config.zones, at=clock.now()))
    try:
        yield Lab(config, clock, audit, trust)
    finally:
        audit.close()


def keyed(key: str | None, filename: str = "result.hl7") -> Submission:
    return Submission("hospital", filename, "application/hl7-v2", "api:lis", idempotency_key=key)


async def body() -> AsyncIterator[bytes]:
    yield b"MSH|submitted\r"


@pytest.fixture
def other(postgres: PostgresSettings, spool: PostgresSpool) -> Iterator[PostgresSpool]:
    """Another node on the same database as ``spool``, not behind the cut."""
    node = PostgresSpool(postgres, SystemClock(), Claimant("node-2"))
    try:
        yield node
    finally:
        node.close()


def _delivery(layout: DemoLayout, spool: PostgresSpool) -> InboxDelivery:
    config = load_config(layout.hospital.config_path)
    audit = AuditLog(layout.hospital.root / "audit.jsonl", SystemClock(), node=spool.node)
    return InboxDelivery(config, spool, audit, make_logger(stream=io.StringIO()), InboundLocks())


@pytest.mark.parametrize("when", ["before", "after"])
def test_a_received_document_whose_claim_commit_was_lost_is_delivered_on_the_resend(
    layout: DemoLayout, spool: PostgresSpool, cut: CommitCut, when: str
) -> None:
    """The claim of a delivery (its record, naming the work file) is committed, or not,
    while the database cannot be asked: the work file must stay, for a record without
    it reads as "in the inbox" and the resend would be answered as a duplicate of a
    document nobody has."""
    delivery = _delivery(layout, spool)
    peer = load_config(layout.hospital.config_path).require_peer("lab")
    document = b"MSH|lost commit\r"
    digest = "c" * 64
    cut.cut(when)
    cut.refuse = True
    with pytest.raises(SpoolUnreachableError):
        delivery.deliver_once(peer, "<c@lab>", "doc.hl7", lambda: [document], 16, digest, None)
    cut.refuse = False
    target = delivery.deliver_once(peer, "<c@lab>", "doc.hl7", lambda: [document], 16, digest, None)
    assert target.read_bytes() == document
    inbox = layout.hospital.inbox_dir / "lab"
    assert [p.name for p in inbox.iterdir() if not p.name.startswith(".")] == ["doc.hl7"]


def test_a_document_whose_intake_commit_was_lost_is_taken_once(
    layout: DemoLayout, lab: Lab, spool: PostgresSpool, cut: CommitCut
) -> None:
    """The intake row of a document is committed while the database cannot be asked;
    the document is still in the outbox.  The next scan must not take it a second time
    beside that row (two messages for one document)."""
    context = lab.context(spool)
    intake = OutboxIntake(context, Sealer(context))
    folder = layout.lab.outbox_dir / "hospital"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "result.hl7").write_bytes(b"MSH|result\r")
    cut.cut("after")
    cut.refuse = True
    with pytest.raises(SpoolOutcomeUnknownError):
        asyncio.run(intake.intake_once())
    cut.refuse = False
    while (folder / "result.hl7").exists():
        asyncio.run(intake.intake_once())
    records = [r for r in spool.all_outbound() if r.filename == "result.hl7"]
    assert len(records) == 1, [(r.message_id, r.state) for r in records]
    assert records[0].state is OutboundState.QUEUED


@pytest.mark.parametrize(
    ("key", "taken_over"), [(None, False), ("order-1", False), ("order-1", True)]
)
def test_a_submission_whose_commit_was_lost_is_answered_503_and_not_sent(
    lab: Lab,
    spool: PostgresSpool,
    cut: CommitCut,
    postgres: PostgresSettings,
    key: str | None,
    taken_over: bool,
) -> None:
    """The local API's submission is recorded while the database cannot be asked; the
    submitter is answered 503 and sends it again (with its Idempotency-Key, if it sent
    one): that must be the one message, not the resend beside a row of the first.
    ``taken_over``: meanwhile another node took the recorded intake over (this one was
    cut off longer than its lease), so its row cannot be removed: the resend under the
    same key is answered with that message."""
    context = lab.context(spool)
    submissions = Submissions(context, Sealer(context), MessageStatus(context))
    cut.cut("after")
    cut.refuse = True
    with pytest.raises(SubmissionRefused) as refused:
        asyncio.run(submissions.submit(keyed(key), body()))
    assert refused.value.status == 503
    assert "same Idempotency-Key" in (refused.value.fix or "")
    cut.refuse = False
    if taken_over:
        # A lease past by a day: the other node judges it by its own clock, set ahead.
        later = SetClock(datetime.now(UTC) + timedelta(days=1))
        other = PostgresSpool(postgres, later, Claimant("node-2"), server_time=False)
        try:
            [held] = other.intake_interrupted()
        finally:
            other.close()
    again = asyncio.run(submissions.submit(keyed(key), body()))
    assert [r.message_id for r in spool.all_outbound()] == [again["message_id"]]
    if key is not None:  # the first one was recorded after all: named, never lost
        assert again["resent"] is True
    else:
        assert "resent" not in again
    if taken_over:
        assert again["message_id"] == held.message_id
    assert len(list(context.payloads.iterdir())) <= 1


def test_a_resend_answered_by_another_node_is_the_document_sent(
    lab: Lab, spool: PostgresSpool, other: PostgresSpool, cut: CommitCut
) -> None:
    """A node answers 503 without knowing that its intake was committed; the submitter's
    resend under the same Idempotency-Key reaches another node, which answers 200 with
    that message.  The first node's next submission must not remove it then (a document
    acknowledged and never sent): it prepares it, from the copy it kept."""
    first, second = lab.submissions(spool), lab.submissions(other)
    cut.cut("after")
    cut.refuse = True
    with pytest.raises(SubmissionRefused) as refused:
        asyncio.run(first.submit(keyed("order-1"), body()))
    assert refused.value.status == 503
    cut.refuse = False
    again = asyncio.run(second.submit(keyed("order-1"), body()))
    assert again["resent"] is True
    # The first node takes its next document.
    asyncio.run(first.submit(keyed("order-2", "next.hl7"), body()))
    kept = spool.get(again["message_id"])
    assert kept is not None, "the message a resend was answered with is gone"
    assert kept.state is OutboundState.QUEUED, kept.state
    assert len(spool.all_outbound()) == 2


def test_a_keyed_submission_recorded_after_all_is_sent_by_the_next_intake_round(
    lab: Lab, spool: PostgresSpool, other: PostgresSpool, cut: CommitCut
) -> None:
    """As above, the resend answered 200 by another node; the first node then takes no
    submission for hours.  Its outbox intake's next round (every poll) prepares the
    message from the copy it kept: an acknowledged document does not wait for the next
    submission."""
    first, second = lab.outbound(spool), lab.outbound(other)
    cut.cut("after")
    cut.refuse = True
    with pytest.raises(SubmissionRefused) as refused:
        asyncio.run(first.submit(keyed("order-1"), body()))
    assert refused.value.status == 503
    cut.refuse = False
    again = asyncio.run(second.submit(keyed("order-1"), body()))
    assert again["resent"] is True
    assert asyncio.run(first.intake_once()) == 0  # its outbox is empty
    [kept] = spool.all_outbound()
    assert (kept.message_id, kept.state) == (again["message_id"], OutboundState.QUEUED)
    assert kept.queued_by == spool.node
