"""What every spool backend keeps the same (run on SQLite and on PostgreSQL): the
inbound record of a delivery, the hand-over queue and the operator's peer controls."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from gateway.audit import EventType
from gateway.errors import ClaimHeldError, InvalidValueError, SpoolError
from gateway.spool import (
    Claimant,
    HandoverState,
    Intake,
    OutboundState,
    Prepared,
    Settled,
    Spool,
    SqliteSpool,
)
from gateway.spool.records import DataKey
from tests.clocks import TickingClock
from tests.conftest import MakeSpool


def test_a_released_delivery_starts_afresh_and_a_delivered_one_is_answered_again(
    tmp_path: Path, make_spool: MakeSpool
) -> None:
    spool = make_spool(TickingClock())
    spool.inbound_begin("lab", "<m@lab>", "aa", tmp_path / "a.hl7", "orders", size=3)
    assert spool.inbound_target_claimed(tmp_path / "a.hl7")
    assert [r.message_id for r in spool.inbound_unfinished()] == ["<m@lab>"]
    spool.inbound_retarget("lab", "<m@lab>", tmp_path / "a-1.hl7")
    spool.inbound_release("lab", "<m@lab>")
    assert spool.inbound_get("lab", "<m@lab>") is None
    spool.inbound_begin("lab", "<m@lab>", "bb", tmp_path / "b.hl7", work_path=tmp_path / ".b")
    spool.inbound_delivered("lab", "<m@lab>", [("A", "1")], b"receipt", ("text/plain", 3))
    record = spool.inbound_get("lab", "<m@lab>")
    assert record is not None and record.state == "delivered" and record.sha256 == "bb"
    assert record.receipt_headers == (("A", "1"),) and record.receipt_body == b"receipt"
    assert spool.inbound_unfinished() == []
    # A resend answered again does not queue a second hand-over.
    spool.inbound_delivered("lab", "<m@lab>", [("A", "1")], b"receipt", ("text/plain", 3))
    assert [h.message_id for h in spool.handover_list()] == ["<m@lab>"]
    # Begun again over a finished record (a request that looked before it was finished),
    # it is left as it is: its document is in the inbox and must not be written again.
    with pytest.raises(ClaimHeldError, match="was received by"):
        spool.inbound_begin("lab", "<m@lab>", "cc", tmp_path / "c.hl7")
    again = spool.inbound_get("lab", "<m@lab>")
    assert again is not None and again.state == "delivered" and again.sha256 == "bb"
    assert again.receipt_body == b"receipt"


def test_hand_overs_are_due_retried_failed_and_retried_by_an_operator(
    tmp_path: Path, make_spool: MakeSpool
) -> None:
    spool = make_spool(TickingClock())
    spool.inbound_begin("lab", "<m@lab>", "aa", tmp_path / "a.hl7")
    spool.inbound_delivered("lab", "<m@lab>", [], b"r", ("text/plain", 3))
    assert spool.handover_next_at() == 0.0
    spool.handover_retry("lab", "<m@lab>", "503", 50.0)
    assert spool.handover_due(10.0) == [] and spool.handover_next_at() == 50.0
    (due,) = spool.handover_due(60.0)
    assert due.attempts == 1 and due.last_error == "503"
    with pytest.raises(SpoolError, match="only a failed hand-over can be retried"):
        spool.handover_operator_retry("lab", "<m@lab>", "alice", 2e9)
    spool.handover_failed("lab", "<m@lab>", "gone")
    assert spool.handover_next_at() is None
    retried = spool.handover_operator_retry("lab", "<m@lab>", "alice", 2e9)
    assert retried.state is HandoverState.PENDING and retried.attempts == 0
    spool.handover_done("lab", "<m@lab>")
    assert [h.state for h in spool.handover_list(HandoverState.DONE)] == [HandoverState.DONE]


def test_a_peer_suspended_and_resumed_keeps_the_last_word(make_spool: MakeSpool) -> None:
    spool = make_spool(TickingClock())
    assert not spool.is_suspended("lab")
    spool.set_suspended("lab", True, "maintenance window", "alice")
    spool.set_suspended("lab", False, "back", "bob")
    spool.set_suspended("pharmacy", True, "certificate expired", "alice")
    controls = spool.peer_controls()
    assert not spool.is_suspended("lab") and spool.is_suspended("pharmacy")
    assert (controls["lab"].reason, controls["lab"].actor) == ("back", "bob")


def test_a_duplicate_message_id_is_refused_and_changes_nothing(
    tmp_path: Path, make_spool: MakeSpool
) -> None:
    spool = make_spool(TickingClock())
    spool.add_intake("<m@h>", "lab", "a", "text/plain", tmp_path, tmp_path, submitted_by="api:x")
    with pytest.raises(SpoolError, match="spool write failed"):
        spool.add_intake("<m@h>", "lab", "b", "text/plain", tmp_path, tmp_path, submitted_by="y")
    assert spool.submitter("<m@h>") == "api:x" and len(spool.all_outbound()) == 1


def test_data_keys_are_stored_replaced_and_rewrapped_in_one_transaction(
    make_spool: MakeSpool,
) -> None:
    spool = make_spool(TickingClock())
    spool.put_data_key(DataKey("body:<a@h>", 1, b"wrapped-a"))
    spool.put_data_key(DataKey("body:<b@h>", 1, b"wrapped-b"))
    spool.put_data_key(DataKey("body:<b@h>", 2, b"wrapped-b2"))  # the item's key replaced
    assert sorted(spool.data_key_versions()) == [1, 2]
    rewrapped = spool.rewrap_data_keys(lambda: 2, lambda key, new: key.wrapped + b"@%d" % new)
    assert rewrapped == 2
    assert spool.data_key("body:<a@h>") == DataKey("body:<a@h>", 2, b"wrapped-a@2")
    assert spool.data_key("body:<b@h>") == DataKey("body:<b@h>", 2, b"wrapped-b2")
    spool.shred()
    assert spool.data_key("body:<none@h>") is None


def test_a_second_preparation_of_a_document_does_not_replace_the_first_ones_key(
    tmp_path: Path, make_spool: MakeSpool
) -> None:
    """Two preparations of one interrupted document (two nodes): only the one whose state
    change moved it out of intake stores its data key; the other's key, wrapping a data key
    the stored body is not encrypted under, is not stored."""
    first, second = make_spool(TickingClock()), make_spool(TickingClock())
    first.add_intake("<m@h>", "lab", "a", "text/plain", tmp_path, tmp_path)
    item = "outbound-body:<m@h>"
    first.mark_queued("<m@h>", None, [], "mic", 1, body=b"1", data_key=DataKey(item, 1, b"one"))
    second.mark_queued("<m@h>", None, [], "mic", 1, body=b"2", data_key=DataKey(item, 1, b"two"))
    assert first.data_key(item) == DataKey(item, 1, b"one")
    assert second.get("<m@h>").body == b"1"  # type: ignore[union-attr]


def test_a_preparation_that_fails_fails_only_a_document_still_in_intake(
    tmp_path: Path, make_spool: MakeSpool
) -> None:
    """A node whose preparation of a document failed marks it failed, kept for `queue
    retry`, only while it is in intake: one another node has queued meanwhile (and sent,
    and settled) stays as that node left it."""
    first, second = make_spool(TickingClock()), make_spool(TickingClock())
    for message_id in ("<kept@h>", "<other@h>"):
        first.add_intake(message_id, "lab", "a", "text/plain", tmp_path, tmp_path)
    assert first.fail_intake("<kept@h>", "no acceptable encryption certificate")
    kept = second.get("<kept@h>")
    assert kept is not None and kept.state is OutboundState.FAILED
    assert (kept.disposition, kept.last_error) == (
        "not-sent",
        "no acceptable encryption certificate",
    )
    assert second.mark_queued("<other@h>", None, [], "mic", 1, body=b"sealed")
    assert not first.fail_intake("<other@h>", "its data key is gone")
    other = first.get("<other@h>")
    assert other is not None and other.state is OutboundState.QUEUED and other.last_error is None
    assert not first.fail_intake("<kept@h>", "again")  # failed already: left as it is


def _sending(spool: Spool, tmp_path: Path, *ids: str) -> None:
    for message_id in ids:
        spool.add_intake(message_id, "lab", "a", "text/plain", tmp_path, tmp_path)
        spool.mark_queued(message_id, None, [], "mic", 1, body=b"sealed")
    claimed, _ = spool.claim_due("lab", 2e9, len(ids))
    assert {r.message_id for r in claimed} == set(ids)


def test_rows_changed_since_a_time_are_this_nodes_changed_at_or_after_it(
    tmp_path: Path, make_spool: MakeSpool
) -> None:
    """What recovery compares with the audit trail: only this node's rows, only those
    changed since the given time."""
    clock = TickingClock()
    mine, theirs = make_spool(clock, Claimant("a")), make_spool(clock, Claimant("b"))
    _sending(mine, tmp_path, "<old@h>", "<settled@h>")
    since = clock.now().isoformat()
    mine.mark_settled(
        [Settled("<settled@h>", OutboundState.DELIVERED, "processed", tmp_path / "r.mdn")]
    )
    mine.add_intake("<new@h>", "lab", "a", "text/plain", tmp_path, tmp_path)
    mine.mark_queued("<new@h>", None, [], "mic", 1, body=b"sealed")
    theirs.add_intake("<other@h>", "lab", "a", "text/plain", tmp_path, tmp_path)
    theirs.mark_queued("<other@h>", None, [], "mic", 1, body=b"sealed")
    changed = {r.message_id: r for r in mine.outbound_changed_since(since)}
    assert sorted(changed) == ["<new@h>", "<settled@h>"]
    assert changed["<new@h>"].state is OutboundState.QUEUED
    assert changed["<settled@h>"].receipt_path == tmp_path / "r.mdn"
    assert [r.message_id for r in theirs.outbound_changed_since(since)] == ["<other@h>"]
    assert mine.outbound_changed_since(clock.now().isoformat()) == []


def test_rows_changed_since_are_those_whose_last_audited_change_this_node_made(
    tmp_path: Path, make_spool: MakeSpool
) -> None:
    """A message this node queued stays this node's to look at (its message.accepted)
    whichever node sends it; its last step is the node's that made it (another node
    giving it up, an operator on this one cancelling it), whichever node held it last:
    each record belongs in one trail."""
    clock = TickingClock()
    mine, theirs = make_spool(clock, Claimant("a")), make_spool(clock, Claimant("b"))
    since = clock.now().isoformat()
    mine.add_intake("<m@h>", "lab", "a", "text/plain", tmp_path, tmp_path)
    mine.mark_queued("<m@h>", None, [], "mic", 1, body=b"sealed")
    claimed, _ = theirs.claim_due("lab", 2e9, 1)
    assert [r.message_id for r in claimed] == ["<m@h>"]  # held by b now
    assert [r.message_id for r in mine.outbound_changed_since(since)] == ["<m@h>"]
    assert theirs.outbound_changed_since(since) == []

    [held] = mine.outbound_changed_since(since)
    assert (held.queued_by, held.audited_by, held.node) == ("a", "a", "b")

    theirs.mark_dead("<m@h>", "1 attempts failed")
    [dead] = theirs.outbound_changed_since(since)
    assert (dead.queued_by, dead.audited_by, dead.state) == ("a", "b", OutboundState.DEAD)
    assert [r.audited_by for r in mine.outbound_changed_since(since)] == ["b"]

    mine.operator_cancel("<m@h>", "operator:root (uid 0)")
    [cancelled] = mine.outbound_changed_since(since)
    assert (cancelled.audited_by, cancelled.node) == ("a", "b")
    assert theirs.outbound_changed_since(since) == []
    assert mine.outbound_changed_since(clock.now().isoformat()) == []


def test_a_change_an_audit_record_follows_names_that_record_and_when_it_was_made(
    tmp_path: Path, make_spool: MakeSpool
) -> None:
    """Each change a record follows keeps, with its node, which record and the change's
    time (the record's is that or later); a change no record follows (a send parked by
    a shutdown, a claim) leaves them as they were: the start-up check is exact."""
    clock = TickingClock()
    mine, theirs = make_spool(clock, Claimant("a")), make_spool(clock, Claimant("b"))

    def owed() -> tuple[str | None, str | None, bool]:
        row = mine.get("<m@h>")
        assert row is not None
        return row.audited_by, row.audit_owed, row.audit_owed_at == row.updated_at

    mine.add_intake("<m@h>", "lab", "a", "text/plain", tmp_path, tmp_path)
    assert owed() == (None, None, False)
    mine.mark_queued("<m@h>", None, [], "mic", 1, body=b"sealed")
    assert owed() == ("a", "message.accepted", True)
    theirs.claim_due("lab", 2e9, 1)
    assert owed()[:2] == ("a", "message.accepted")  # claimed: no record follows
    assert theirs.mark_retry("<m@h>", "refused", 0, owed=EventType.MESSAGE_SEND_FAILED)
    assert owed() == ("b", "message.send_failed", True)
    mine.claim_due("lab", 2e9, 1)
    assert mine.mark_retry("<m@h>", "interrupted by shutdown", 0)
    assert owed()[:2] == ("b", "message.send_failed")  # still b's record, of b's change
    mine.claim_due("lab", 2e9, 1)
    assert mine.mark_done(
        "<m@h>",
        OutboundState.FAILED,
        "not-sent",
        None,
        error="unreadable",
        owed=EventType.AT_REST_INTEGRITY_FAILED,
    )
    assert owed() == ("a", "atrest.integrity_failed", True)
    theirs.operator_retry("<m@h>", "operator:root (uid 0)", 0)
    assert owed() == ("b", "message.retried", True)


def test_a_send_stopped_before_its_request_went_out_gives_its_attempt_back(
    tmp_path: Path, make_spool: MakeSpool
) -> None:
    """A claim counts an attempt; giving the message back unsent uncounts it, in the same
    statement; a send that failed or was stopped mid-request keeps it; and a message left
    "sending" by a crash keeps it too (nothing tells whether its request went out)."""
    spool = make_spool(TickingClock())
    spool.add_intake("<m@h>", "lab", "a", "text/plain", tmp_path, tmp_path)
    spool.mark_queued("<m@h>", None, [], "mic", 1, body=b"sealed")

    def attempts() -> int:
        record = spool.get("<m@h>")
        assert record is not None and record.state is OutboundState.QUEUED
        return record.attempts

    for _ in range(3):  # stopped three times before its POST
        ([claimed], _) = spool.claim_due("lab", 2e9, 1)
        assert claimed.attempts == 0
        assert spool.mark_retry("<m@h>", "interrupted", 0, unsent=True)
        assert attempts() == 0
    spool.claim_due("lab", 2e9, 1)
    assert spool.mark_retry("<m@h>", "refused", 0, owed=EventType.MESSAGE_SEND_FAILED)
    assert attempts() == 1
    spool.claim_due("lab", 2e9, 1)
    assert spool.mark_retry("<m@h>", "interrupted mid-request", 0)
    assert attempts() == 2
    spool.claim_due("lab", 2e9, 1)
    assert spool.requeue_interrupted() == ["<m@h>"]  # at the start after a crash
    assert attempts() == 3
    # Given back only by the node that holds the claim: another's late give-back is void.
    other = make_spool(TickingClock(), Claimant("b"))
    spool.claim_due("lab", 2e9, 1)
    assert not other.mark_retry("<m@h>", "interrupted", 0, unsent=True)
    assert spool.mark_retry("<m@h>", "interrupted", 0, unsent=True)
    assert attempts() == 3


def test_a_received_messages_and_a_hand_overs_audited_changes_name_their_records(
    tmp_path: Path, make_spool: MakeSpool
) -> None:
    """The receipt stored (receipt.sent), the hand-over failed for good and retried by
    an operator on another node: each change keeps its node, its record and its time,
    and is found by that node's start-up check, not the other's."""
    clock = TickingClock()
    mine, theirs = make_spool(clock, Claimant("a")), make_spool(clock, Claimant("b"))
    since = clock.now().isoformat()
    mine.inbound_begin("lab", "<r@l>", "ab" * 32, tmp_path / "r.hl7")
    assert mine.inbound_changed_since(since) == []  # nothing recorded is owed yet
    mine.inbound_delivered("lab", "<r@l>", [], b"receipt", handover=("text/plain", 3))
    [received] = mine.inbound_changed_since(since)
    assert (received.audited_by, received.audit_owed) == ("a", "receipt.sent")
    assert received.audit_owed_at is not None and received.audit_owed_at >= since
    assert theirs.inbound_changed_since(since) == []
    assert mine.inbound_changed_since(clock.now().isoformat()) == []

    assert mine.handover_failed("lab", "<r@l>", "gone")
    [failed] = mine.handover_changed_since(since)
    assert (failed.audited_by, failed.audit_owed) == ("a", "message.handover_failed")
    theirs.handover_operator_retry("lab", "<r@l>", "operator:root (uid 0)", 0)
    assert mine.handover_changed_since(since) == []
    [retried] = theirs.handover_changed_since(since)
    assert (retried.audit_owed, retried.updated_at) == (
        "message.handover_retried",
        retried.audit_owed_at,
    )


def test_messages_answered_together_are_settled_in_one_transaction(
    tmp_path: Path, make_spool: MakeSpool
) -> None:
    """Delivered, failed and awaiting their receipt at once: each as mark_done and
    mark_awaiting_receipt would leave it, with the receipts' data keys."""
    spool = make_spool(TickingClock())
    _sending(spool, tmp_path, "<ok@h>", "<bad@h>", "<later@h>")
    ok_key = DataKey("outbound-receipt:<ok@h>", 1, b"k-ok")
    awaited = spool.mark_settled(
        [
            Settled(
                "<ok@h>", OutboundState.DELIVERED, "processed", tmp_path / "ok.mdn", None, ok_key
            ),
            Settled("<bad@h>", OutboundState.FAILED, "mic-mismatch", tmp_path / "bad.mdn", "MIC"),
        ],
        ["<later@h>", "<unknown@h>"],
    )
    assert awaited == ["<ok@h>", "<bad@h>", "<later@h>"]
    ok, bad, later = (spool.get(m) for m in ("<ok@h>", "<bad@h>", "<later@h>"))
    assert ok is not None and ok.state is OutboundState.DELIVERED and ok.body is None
    assert ok.receipt_path == tmp_path / "ok.mdn" and ok.disposition == "processed"
    assert bad is not None and bad.state is OutboundState.FAILED and bad.last_error == "MIC"
    assert bad.body == b"sealed"  # a failed message may be retried: its body stays
    assert later is not None and later.state is OutboundState.AWAITING_RECEIPT
    assert spool.data_key(ok_key.item) == ok_key
    # Its receipt settled it first: no longer awaiting one.
    assert spool.mark_settled([], ["<ok@h>"]) == []


def test_the_receipts_recorded_are_asked_by_file_name(
    tmp_path: Path, make_spool: MakeSpool
) -> None:
    """Names only, wherever each was stored (another node's state folder, one moved since);
    a receipt an operator's retry cleared is no longer among them."""
    spool = make_spool(TickingClock())
    assert spool.receipts_recorded(["ok.1f.mdn"]) == set()
    _sending(spool, tmp_path, "<ok@h>", "<bad@h>", "<later@h>")
    spool.mark_settled(
        [
            Settled("<ok@h>", OutboundState.DELIVERED, "processed", tmp_path / "a/ok.1f.mdn"),
            Settled("<bad@h>", OutboundState.FAILED, "mic-mismatch", Path("/elsewhere/bad.mdn")),
        ],
        ["<later@h>"],
    )
    found = ["ok.1f.mdn", "bad.mdn", "a", "elsewhere", "ok.1f", "unknown.mdn", "OK.1F.MDN"]
    assert spool.receipts_recorded(found) == {"ok.1f.mdn", "bad.mdn"}
    spool.operator_retry("<bad@h>", "operator:root (uid 0)", 2e9)
    assert spool.receipts_recorded(found) == {"ok.1f.mdn"}
    assert spool.receipts_recorded([]) == set()


def test_the_payloads_recorded_are_asked_by_file_name_many_at_a_time(
    tmp_path: Path, make_spool: MakeSpool
) -> None:
    """More names than one statement asks about; each name found once, with whether its
    plaintext is still needed (in intake, or not yet signed and encrypted)."""
    spool = make_spool(TickingClock())
    many = 1200
    spool.add_intakes(
        [
            Intake(f"<{i}@h>", "lab", "a", "text/plain", tmp_path, tmp_path / "moved" / f"p{i}")
            for i in range(many)
        ]
    )
    spool.mark_queued("<7@h>", None, [], "mic", 1, body=b"sealed")
    names = [f"p{i}" for i in range(0, many, 2)] + ["unknown", "moved", "p7.mdn"]
    recorded = spool.payloads_recorded(names)
    assert set(recorded) == {f"p{i}" for i in range(0, many, 2)}
    assert all(recorded.values())
    assert spool.payloads_recorded(["p7", "p8"]) == {"p7": False, "p8": True}


def test_the_messages_taken_from_outbox_files_are_asked_by_path_many_at_a_time(
    tmp_path: Path, make_spool: MakeSpool
) -> None:
    """More paths than one statement asks about; a path used again for a later document
    names both messages, each with the identity of the file it was taken from."""
    spool = make_spool(TickingClock())
    outbox = tmp_path / "outbox" / "hospital"
    many = 120
    spool.add_intakes(
        [
            Intake(
                f"<{i}@h>",
                "hospital",
                f"{i}.hl7",
                "text/plain",
                outbox / f"{i % 100}.hl7",
                tmp_path / f"p{i}",
                source_file=f"1:{i}:10:20:30",
            )
            for i in range(many)
        ]
        + [Intake("<api@h>", "hospital", "a", "text/plain", tmp_path / "p-api", tmp_path / "p-api")]
    )
    spool.mark_queued("<7@h>", None, [], "mic", 1, body=b"sealed")
    asked = [str(outbox / f"{i}.hl7") for i in range(0, 100, 2)]
    found = spool.outbound_by_source([*asked, str(outbox), str(outbox / "unknown.hl7")])
    assert sorted((str(r.source_path), r.message_id, r.source_file) for r in found) == sorted(
        (str(outbox / f"{i % 100}.hl7"), f"<{i}@h>", f"1:{i}:10:20:30")
        for i in range(many)
        if i % 2 == 0
    )
    states = {
        (r.message_id, r.state, r.source_file)
        for r in spool.outbound_by_source([str(outbox / "7.hl7")])
    }
    assert states == {
        ("<7@h>", OutboundState.QUEUED, "1:7:10:20:30"),
        ("<107@h>", OutboundState.INTAKE, "1:107:10:20:30"),
    }
    assert spool.get("<api@h>").source_file is None  # type: ignore[union-attr]
    assert spool.outbound_by_source([]) == []


def test_a_settlement_that_fails_changes_none_of_its_messages(
    tmp_path: Path, make_spool: MakeSpool
) -> None:
    spool = make_spool(TickingClock())
    _sending(spool, tmp_path, "<a@h>", "<b@h>", "<c@h>")

    def broken() -> DataKey:
        raise SpoolError("the key could not be stored", fix="none")

    with pytest.raises(SpoolError, match="could not be stored"):
        spool.mark_settled(
            [
                Settled("<a@h>", OutboundState.DELIVERED, "processed", tmp_path / "a.mdn"),
                Settled(
                    "<b@h>",
                    OutboundState.DELIVERED,
                    "processed",
                    tmp_path / "b.mdn",
                    data_key=DataKey("outbound-receipt:<b@h>", 1, b"k", current=broken),
                ),
            ],
            ["<c@h>"],
        )
    for message_id in ("<a@h>", "<b@h>", "<c@h>"):
        record = spool.get(message_id)
        assert record is not None and record.state is OutboundState.SENDING
    assert spool.data_key("outbound-receipt:<b@h>") is None


def test_documents_taken_together_are_recorded_all_or_none_and_queued_in_one_go(
    tmp_path: Path, make_spool: MakeSpool
) -> None:
    spool = make_spool(TickingClock())

    def intake(n: int, key: bytes | None = None) -> Intake:
        item = f"outbound-payload:<{n}@h>"
        return Intake(
            f"<{n}@h>",
            "lab",
            f"{n}.hl7",
            "text/plain",
            tmp_path / f"{n}.hl7",
            tmp_path / f"p{n}",
            submitted_by=f"outbox:u{n}",
            data_key=DataKey(item, 1, key) if key else None,
            payload=b"copy %d" % n,
        )

    spool.add_intakes([intake(1, b"k1"), intake(2, b"k2"), intake(3)])
    assert [r.message_id for r in spool.all_outbound()] == ["<1@h>", "<2@h>", "<3@h>"]
    assert spool.submitter("<2@h>") == "outbox:u2" and spool.get("<3@h>").payload == b"copy 3"  # type: ignore[union-attr]
    assert spool.data_key("outbound-payload:<1@h>") == DataKey("outbound-payload:<1@h>", 1, b"k1")
    # One of them cannot be recorded (its Message-ID is taken): none of them is.
    with pytest.raises(SpoolError, match="spool write failed"):
        spool.add_intakes([intake(4, b"k4"), intake(1)])
    assert spool.get("<4@h>") is None and spool.data_key("outbound-payload:<4@h>") is None

    # Another node queued <2@h> first: it is left out, its key stays that node's.
    other = make_spool(TickingClock())
    body_key = "outbound-body:<2@h>"
    assert other.mark_queued(
        "<2@h>", None, [], "mic", 1, body=b"b2", data_key=DataKey(body_key, 1, b"theirs")
    )
    queued = spool.mark_queued_all(
        [
            Prepared(
                f"<{n}@h>",
                None,
                (("AS2-To", "lab"),),
                "mic",
                7,
                "cert",
                b"body %d" % n,
                DataKey(f"outbound-body:<{n}@h>", 1, b"mine"),
            )
            for n in (1, 2, 3)
        ]
    )
    assert queued == ["<1@h>", "<3@h>"]
    assert spool.data_key(body_key) == DataKey(body_key, 1, b"theirs")
    for n in (1, 3):
        record = spool.get(f"<{n}@h>")
        assert record is not None and record.state is OutboundState.QUEUED
        assert record.body == b"body %d" % n and record.payload is None
        assert record.headers == (("AS2-To", "lab"),)
        assert spool.data_key(f"outbound-payload:<{n}@h>") is None  # the document's key goes
    assert spool.mark_queued_all([]) == []
    with pytest.raises(InvalidValueError, match="exactly one of them"):
        spool.mark_queued_all([Prepared("<9@h>", None, (), "mic", 1)])


def test_a_shred_a_reader_keeps_from_emptying_the_log_says_so(tmp_path: Path) -> None:
    """A reader in the middle of a read (another process) keeps SQLite's write-ahead log
    busy: shred says it could not empty it (the log still holds what was written), and
    empties it once the reader is done."""
    spool = SqliteSpool(tmp_path / "spool.db", TickingClock())
    spool.put_data_key(DataKey("body:<a@h>", 1, b"wrapped-a"))
    reader = sqlite3.connect(tmp_path / "spool.db", isolation_level=None)
    reader.execute("BEGIN")
    reader.execute("SELECT * FROM data_keys").fetchall()
    spool.put_data_key(DataKey("body:<b@h>", 1, b"wrapped-b"))
    wal = tmp_path / "spool.db-wal"
    assert spool.shred() is False
    assert wal.stat().st_size > 0
    reader.execute("COMMIT")
    reader.close()
    assert spool.shred() is True
    assert wal.stat().st_size == 0
    spool.close()
