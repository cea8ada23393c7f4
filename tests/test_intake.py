"""Outbox intake: a scan's takes all finish before the next scan starts."""

from __future__ import annotations

import asyncio
import errno
import hashlib
import io
import os
import pwd
import signal
import sys
import time
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

import gateway.outbound.intake
from gateway.atrest import KeyStore, Sealing, Vault, storing
from gateway.atrest.chunked import MAGIC
from gateway.audit.log import AuditLog, verify_chain
from gateway.clock import SystemClock
from gateway.config import Peer, load_config
from gateway.demo_run import drop_file, wait_until
from gateway.errors import SpoolError
from gateway.fsutil import FolderSync
from gateway.intake.outbox import Candidate
from gateway.logs import make_logger
from gateway.outbound import INLINE_BODY_BYTES, Settings
from gateway.outbound.context import Context
from gateway.outbound.intake import OutboxIntake
from gateway.outbound.seal import Sealer, ToSeal
from gateway.pki.demo import DemoLayout
from gateway.spool import Claimant, DataKey, OutboundRecord, SqliteSpool
from gateway.spool.records import payload_item
from tests.helpers.audit import events, wait_for_events
from tests.helpers.faults import killed_at, wait_killed
from tests.helpers.intake import drop_all, judged, lab_intake, two_peers


class SlowTakes(OutboxIntake):
    """The real outbox intake, with each batch's work replaced by a pause (the batch with
    broken.hl7 fails at once)."""

    finished: list[str]

    async def _take_batch(self, batch: Sequence[Candidate]) -> None:
        if any(candidate.path.name == "broken.hl7" for candidate in batch):
            raise SpoolError("cannot take broken.hl7")
        await asyncio.sleep(0.2)
        self.finished.extend(candidate.path.name for candidate in batch)


def accepted_as(trail: Path, documents: Mapping[str, bytes]) -> dict[str, dict[str, Any]]:
    """The ``message.accepted`` records of ``trail`` by file name, found to be one for each
    of ``documents`` (name: content), with its SHA-256."""
    records = events(trail, "message.accepted")
    assert sorted(r["detail"]["filename"] for r in records) == sorted(documents)
    accepted = {r["detail"]["filename"]: r for r in records}
    for name, data in documents.items():
        assert accepted[name]["detail"]["sha256"] == hashlib.sha256(data).hexdigest()
    return accepted


def test_a_failed_take_is_raised_only_after_every_other_take_has_finished(
    layout: DemoLayout, tmp_path: Path
) -> None:
    """Otherwise the next scan starts a second take of files still being moved: one
    document, two messages."""
    config = load_config(layout.lab.config_path)
    clock = SystemClock()
    spool = SqliteSpool(tmp_path / "spool.sqlite3", clock)
    audit = AuditLog(tmp_path / "audit.jsonl", clock, node="lab")
    context = Context(Settings(config, {}), spool, audit, make_logger(stream=io.StringIO()), clock)
    intake = SlowTakes(context, Sealer(context))
    intake.finished = []
    folder = layout.lab.outbox_dir / "hospital"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "broken.hl7").write_bytes(b"MSH|x\r")
    names = [f"result-{i}.hl7" for i in range(5)]
    for name in names:
        (folder / name).write_bytes(b"MSH|y\r")
    try:
        with pytest.raises(SpoolError, match=r"broken\.hl7"):
            asyncio.run(intake.intake_once())
        # broken.hl7 is first, and its batch fails at once; the other one finishes.
        assert intake.finished and set(intake.finished) < set(names)
        assert intake.finished == names[-len(intake.finished) :]
    finally:
        spool.close()
        audit.close()


@pytest.mark.parametrize("copy", ["encrypted", "clear", "row"])
def test_killed_between_copying_into_the_spool_and_removing_from_the_outbox_sends_once(
    layout: DemoLayout, processes: Any, copy: str
) -> None:
    """The document is copied into the spool (encrypted at rest, into a file or, a small
    one, into its row; or, before at-rest encryption, as it is, from an outbox on another
    file system), then removed from the outbox.  A kill between the two leaves both; the
    restart must send it once, not once for the spool entry and again for the outbox
    file."""
    config = load_config(layout.lab.config_path)
    assert config.at_rest is not None
    source = layout.lab.outbox_dir / "hospital" / "copied.hl7"
    source.parent.mkdir(parents=True, exist_ok=True)
    source.write_bytes(b"MSH|copied\r")
    payload = config.storage.state_dir / "payloads" / "0123456789abcdef01234567"
    payload.parent.mkdir(parents=True, exist_ok=True)
    spool = SqliteSpool(config.storage.state_dir / "spool.sqlite3", SystemClock())
    vault = Vault(KeyStore(config.at_rest.key_dir), spool) if copy != "clear" else None
    if vault is not None:
        vault.open()
    try:
        with storing(vault, payload_item("<copied@KITA-LAB>")) as sealing:
            sealing.begin()
            spool.add_intake(
                "<copied@KITA-LAB>",
                "hospital",
                source.name,
                "application/octet-stream",
                source,
                payload,
                expires_at=datetime.now(UTC).timestamp() + 3600,
                zone="loopback",
                data_key=sealing.key,
                payload=sealing.seal(source.read_bytes()) if copy == "row" else None,
            )
            # The copy was complete; the unlink never came.
            if copy != "row":
                sealing.write(payload, [source.read_bytes()])
    finally:
        spool.close()
    if copy == "row":
        assert not payload.exists()
    else:
        assert payload.read_bytes().startswith(MAGIC) == (copy == "encrypted")

    processes.start(layout.hospital.config_path)
    processes.start(layout.lab.config_path)
    [receipt] = wait_for_events(layout.lab.audit_log, "receipt.received")

    assert receipt["message_id"] == "<copied@KITA-LAB>"
    assert not source.exists()
    time.sleep(2)  # ten outbox polls: nothing more is sent
    delivered = sorted(p.name for p in (layout.hospital.inbox_dir / "lab").iterdir())
    assert delivered == ["copied.hl7"]


def test_a_file_name_that_is_not_utf8_is_reported_once_and_the_others_go_on(
    layout: DemoLayout, processes: Any
) -> None:
    processes.start(layout.hospital.config_path)
    lab = processes.start(layout.lab.config_path)
    folder = os.fsencode(layout.lab.outbox_dir / "hospital")
    hidden = os.path.join(folder, b".writing")
    with open(hidden, "wb") as handle:
        handle.write(b"MSH|sjis\r")
    shift_jis = os.path.join(folder, "検査.hl7".encode("shift_jis"))
    os.rename(hidden, shift_jis)
    drop_file(layout.lab.outbox_dir / "hospital", "plain.hl7", b"MSH|plain\r")

    warned = lab.wait_for(lambda line: line.get("event") == "outbox.bad_file_name", 30)
    assert warned["folder"] == "hospital" and "not UTF-8" in warned["fix"]
    wait_until(lambda: (layout.hospital.inbox_dir / "lab" / "plain.hl7").exists(), 60, "delivery")
    time.sleep(1)  # five more polls
    assert os.path.exists(shift_jis)  # left alone, not lost
    said = [x for x in lab.lines if x.get("event") == "outbox.bad_file_name"]
    assert len(said) == 1
    assert not [x for x in lab.lines if x.get("event") in ("daemon.task_failed", "intake.failed")]


async def test_an_outbox_document_is_recorded_with_its_sha256_and_its_owner(
    layout: DemoLayout, tmp_path: Path
) -> None:
    """A reviewer links a document re-sent by a local user to the one received, by its
    SHA-256 (message.delivered records it at the receiver), and to who dropped it."""
    config = load_config(layout.lab.config_path)
    [peer] = config.peers
    documents = {
        "small.hl7": b"MSH|^~\\&|small\r",
        "large.dcm": os.urandom(INLINE_BODY_BYTES + 1000),  # sealed file to file
    }
    drop_all(layout.lab.outbox_dir / peer.name, documents)
    async with lab_intake(config, tmp_path, SystemClock(), SqliteSpool) as lab:
        assert await lab.outbound.intake_once() == 2
        me = f"outbox:{pwd.getpwuid(os.getuid()).pw_name} (uid {os.getuid()})"
        for record in accepted_as(lab.trail, documents).values():
            assert record["detail"]["submitted_by"] == me
            assert lab.spool.submitter(record["message_id"]) == me


async def test_a_small_document_is_taken_into_its_row_and_a_large_one_into_a_file(
    layout: DemoLayout, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Encrypted at rest, a small document's copy is committed with its intake row (no
    file, no fsync of its own); a large one is encrypted into state/payloads.  Neither
    is left behind once queued."""
    config = load_config(layout.lab.config_path)
    [peer] = config.peers
    documents = {
        "small.hl7": b"MSH|^~\\&|SMALL-Q7Z|" + b"x" * (INLINE_BODY_BYTES - 20),
        "large.dcm": b"LARGE-Q7Z" + os.urandom(INLINE_BODY_BYTES + 1000),
    }
    folder = drop_all(layout.lab.outbox_dir / peer.name, documents)
    seen: dict[str, tuple[bytes | None, bool]] = {}
    seal_and_queue_all = Sealer.seal_and_queue_all

    def spy(self: Sealer, documents: Sequence[ToSeal]) -> list[ToSeal]:
        for document in documents:
            record = document.record
            # As the sealer finds it: the copy in the row, or its file.
            seen[record.filename] = (record.payload, record.payload_path.exists())
            if record.payload_path.exists():
                assert record.payload_path.read_bytes().startswith(MAGIC)
        return seal_and_queue_all(self, documents)

    monkeypatch.setattr(Sealer, "seal_and_queue_all", spy)
    async with lab_intake(config, tmp_path, SystemClock(), SqliteSpool, at_rest=True) as lab:
        assert await lab.outbound.intake_once() == 2
        kept, in_file = seen["small.hl7"]
        assert kept is not None and kept.startswith(MAGIC) and not in_file
        assert b"SMALL-Q7Z" not in kept
        assert seen["large.dcm"] == (None, True)
        for accepted in accepted_as(lab.trail, documents).values():
            record = lab.spool.get(accepted["message_id"])
            assert record is not None and record.state.value == "queued"
            assert record.payload is None and not record.payload_path.exists()
            assert lab.spool.data_key(payload_item(record.message_id)) is None
        assert not list(folder.iterdir())


class FullSpool(SqliteSpool):
    """A spool whose disk has no room left while ``full`` is set: removing a row fails
    as SQLite fails then (tests/test_storage_full.py fills real file systems; the moment
    a full disk refuses one statement and not the one before cannot be timed there)."""

    full = False

    def abandon_intake(self, message_id: str) -> bool:
        if self.full:
            raise SpoolError("spool write failed: database or disk is full")
        return super().abandon_intake(message_id)


async def test_a_failed_take_whose_row_cannot_be_removed_is_removed_before_the_next_take(
    layout: DemoLayout, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The document could not be moved into the spool and its row could not be removed
    either: no second row is made for the document while that one stays (a restart would
    act on both), and once there is room again the document is taken once."""
    config = load_config(layout.lab.config_path)
    [peer] = config.peers
    document = drop_file(layout.lab.outbox_dir / peer.name, "late.hl7", b"MSH|late\r")
    move = gateway.outbound.intake.move_into_spool

    def no_room(source: Path, target: Path, folders: FolderSync, sealing: Sealing) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(gateway.outbound.intake, "move_into_spool", no_room)
    async with lab_intake(config, tmp_path, SystemClock(), FullSpool) as lab:
        spool, outbound = lab.spool, lab.outbound
        spool.full = True
        with pytest.raises(SpoolError, match="into the spool"):
            await outbound.intake_once()
        [stray] = spool.all_outbound()
        assert stray.state.value == "intake"
        monkeypatch.setattr(gateway.outbound.intake, "move_into_spool", move)
        # The spool is still full: nothing is taken beside the row that stays.

        with pytest.raises(SpoolError, match="database or disk is full"):
            await outbound.intake_once()
        assert [r.message_id for r in spool.all_outbound()] == [stray.message_id]
        assert document.exists()

        spool.full = False  # room again
        assert await outbound.intake_once() == 1
        [taken] = spool.all_outbound()
        assert taken.message_id != stray.message_id and taken.state.value == "queued"
        assert not document.exists()


def test_a_preparation_the_spool_cut_short_is_done_again_without_a_restart(
    layout: DemoLayout, processes: Any
) -> None:
    """The spool fails once while a taken document is queued (as a PostgreSQL spool
    restarting would): the running daemon prepares it again at its next scan and
    sends it, once."""
    faultpoint = Path(__file__).with_name("faultpoint.py")
    point = "gateway.spool.sqlite.outbound:OutboundQueue.mark_queued_all"
    prefix = (sys.executable, str(faultpoint), "--fail-once", point, "--")
    processes.start(layout.hospital.config_path)
    processes.start(layout.lab.config_path, prefix=prefix)
    drop_file(layout.lab.outbox_dir / "hospital", "late.hl7", b"MSH|late\r")
    [receipt] = wait_for_events(layout.lab.audit_log, "receipt.received")
    assert receipt["detail"]["disposition"] == "processed"
    assert [p.name for p in (layout.hospital.inbox_dir / "lab").iterdir()] == ["late.hl7"]
    assert len(events(layout.lab.audit_log, "message.accepted")) == 1


class CountedKeys(SqliteSpool):
    """The real spool; counts the reads of the data keys of documents taken in."""

    payload_keys_read = 0

    def data_key(self, item: str) -> DataKey | None:
        if item.startswith(payload_item("")):
            self.payload_keys_read += 1
        return super().data_key(item)


async def test_small_documents_are_sealed_as_taken_not_read_back_from_their_rows(
    layout: DemoLayout, tmp_path: Path
) -> None:
    """A small document's copy is sealed into its row and, in the same trip, the
    document is signed and encrypted from the bytes that copy was sealed from: its
    data key is not looked up and the copy is not decrypted again.  What it seals is
    that document (its SHA-256 in ``message.accepted``)."""
    config = load_config(layout.lab.config_path)
    [peer] = config.peers
    documents = {f"result-{i}.hl7": b"MSH|^~\\&|%d\r" % i for i in range(4)}
    drop_all(layout.lab.outbox_dir / peer.name, documents)
    async with lab_intake(config, tmp_path, SystemClock(), CountedKeys, at_rest=True) as lab:
        assert await lab.outbound.intake_once() == len(documents)
        assert lab.spool.payload_keys_read == 0  # (read back: one per document)
        accepted_as(lab.trail, documents)


class CountedDisk:
    """os.fsync, counted: how many the audit log asked for."""

    def __init__(self) -> None:
        self.calls = 0

    def __call__(self, fd: int) -> None:
        self.calls += 1
        os.fsync(fd)


async def test_documents_are_taken_in_batches_with_a_transaction_and_an_audit_write_each(
    layout: DemoLayout, tmp_path: Path
) -> None:
    """Forty documents dropped at once: their rows recorded, their queueing and their
    ``message.accepted`` records each written for a batch at a time, not per document."""
    config = load_config(layout.lab.config_path)
    [peer] = config.peers
    documents = {f"result-{i:02}.hl7": b"MSH|^~\\&|%d\r" % i for i in range(40)}
    folder = drop_all(layout.lab.outbox_dir / peer.name, documents)
    disk = CountedDisk()
    async with lab_intake(
        config, tmp_path, SystemClock(), SqliteSpool, at_rest=True, sync=disk
    ) as lab:
        commits, syncs = lab.spool._writer.commits, disk.calls
        assert await lab.outbound.intake_once() == 40
        batches = len(gateway.outbound.intake.batches([Candidate("x", folder)] * 40))
        assert batches == 2
        # One transaction for the rows of a batch, one to queue them; one audit write.
        assert lab.spool._writer.commits - commits <= 2 * batches  # (per document: 80)
        assert disk.calls - syncs <= batches  # (per document: 40)
        for record in accepted_as(lab.trail, documents).values():
            queued = lab.spool.get(record["message_id"])
            assert queued is not None and queued.state.value == "queued"
        assert not list(folder.iterdir())
        assert verify_chain(lab.trail) == 40


async def test_a_document_that_cannot_be_sealed_is_kept_and_its_batch_mates_are_queued(
    layout: DemoLayout, tmp_path: Path
) -> None:
    """A second peer whose encryption certificate is not acceptable (its trust was never
    judged): its document, in a batch with others, is kept unsent with an alert; the
    others of the batch are queued."""
    config = two_peers(layout)
    hospital = config.peers[0]
    for peer_name, name in [("hospital", "a.hl7"), ("hospital", "b.hl7"), ("hospital", "c.hl7")]:
        drop_file(layout.lab.outbox_dir / peer_name, name, b"MSH|" + name.encode() + b"\r")
    drop_file(layout.lab.outbox_dir / "pharmacy", "d.hl7", b"MSH|d\r")
    async with lab_intake(config, tmp_path, SystemClock(), SqliteSpool, peers=(hospital,)) as lab:
        assert await lab.outbound.intake_once() == 4  # raises nothing: the document is kept
        by_name = {r.filename: r for r in lab.spool.all_outbound()}
        assert {n: r.state.value for n, r in by_name.items()} == {
            "a.hl7": "queued",
            "b.hl7": "queued",
            "c.hl7": "queued",
            "d.hl7": "failed",
        }
        kept = by_name["d.hl7"]
        assert kept.payload_path.read_bytes() == b"MSH|d\r"  # kept, to retry once corrected
        [failed] = events(lab.trail, "message.failed")
        assert failed["message_id"] == kept.message_id and failed["severity"] == "alert"
        assert "no acceptable encryption certificate" in failed["reason"]
        accepted = events(lab.trail, "message.accepted")
        assert sorted(r["detail"]["filename"] for r in accepted) == ["a.hl7", "b.hl7", "c.hl7"]


def _order_taken_in(
    spool: SqliteSpool, peer: Peer, folder: Path, payload: bytes, data_key: DataKey | None = None
) -> OutboundRecord:
    """The row of ``<order@KITA-LAB>`` (``order.hl7`` in ``folder``), taken in by
    ``spool``'s node with its copy ``payload`` in the row (sealed under ``data_key``)."""
    spool.add_intake(
        "<order@KITA-LAB>",
        peer.name,
        "order.hl7",
        "application/hl7-v2",
        folder / "order.hl7",
        folder / "payload",
        zone=peer.zone,
        data_key=data_key,
        payload=payload,
    )
    record = spool.get("<order@KITA-LAB>")
    assert record is not None
    return record


async def test_a_document_another_node_queued_first_is_not_recorded_as_accepted_here(
    layout: DemoLayout, tmp_path: Path
) -> None:
    """Two nodes prepare one interrupted document (this one's claim ran out meanwhile):
    the one whose queueing did not find it in intake any more records nothing."""
    config = load_config(layout.lab.config_path)
    [peer] = config.peers
    clock = SystemClock()
    mine = SqliteSpool(tmp_path / "spool.sqlite3", clock, Claimant("lab-1"))
    other = SqliteSpool(tmp_path / "spool.sqlite3", clock, Claimant("lab-2"))
    audit = AuditLog(tmp_path / "audit.jsonl", clock, node="lab-1")
    context = Context(
        await judged(config, clock), mine, audit, make_logger(stream=io.StringIO()), clock
    )
    record = _order_taken_in(mine, peer, tmp_path, b"MSH|order\r")
    # This node's claim ran out: the other node holds the intake now, and queues it.
    assert mine.intake_release("<order@KITA-LAB>", "lab-2")
    assert other.mark_queued("<order@KITA-LAB>", None, [], "mic", 10, body=b"by the other")
    try:
        assert not Sealer(context).seal_and_queue(record, peer, "outbox:lab")
        assert events(tmp_path / "audit.jsonl", "message.accepted") == []
        queued = mine.get("<order@KITA-LAB>")
        assert queued is not None and queued.body == b"by the other"
    finally:
        mine.close()
        other.close()
        audit.close()


async def test_a_document_another_node_queued_first_is_not_marked_failed_here(
    layout: DemoLayout, tmp_path: Path
) -> None:
    """As above, with the document encrypted at rest: the queueing of the other node
    dropped its data key, so this node can no longer read it.  That is the other
    node's preparation, not a failure: the message stays queued, with no alert."""
    config = load_config(layout.lab.config_path)
    [peer] = config.peers
    clock = SystemClock()
    nodes = {
        name: SqliteSpool(tmp_path / "spool.sqlite3", clock, Claimant(name))
        for name in ("lab-1", "lab-2")
    }
    vaults = {name: Vault(KeyStore(tmp_path / "keys"), spool) for name, spool in nodes.items()}
    for vault in vaults.values():
        vault.open()
    audit = AuditLog(tmp_path / "audit.jsonl", clock, node="lab")
    settings = await judged(config, clock)
    sealers = {
        name: Sealer(
            Context(
                settings,
                spool,
                audit,
                make_logger(stream=io.StringIO()),
                clock,
                vaults[name],
            )
        )
        for name, spool in nodes.items()
    }
    message_id = "<order@KITA-LAB>"
    with storing(vaults["lab-1"], payload_item(message_id)) as sealing:
        sealing.begin()
        # As this node read it, before the other's turn.
        sealed = sealing.seal(b"MSH|order\r")
        record = _order_taken_in(nodes["lab-1"], peer, tmp_path, sealed, sealing.key)
    # This node's claim ran out: the other node holds the intake now.
    assert nodes["lab-1"].intake_release(message_id, "lab-2")
    try:
        assert sealers["lab-2"].seal_and_queue(record, peer, "outbox:lab")
        assert not sealers["lab-1"].seal_and_queue(record, peer, "outbox:lab")
        queued = nodes["lab-1"].get(message_id)
        assert queued is not None and queued.state.value == "queued"
        assert events(tmp_path / "audit.jsonl", "message.failed") == []
        assert len(events(tmp_path / "audit.jsonl", "message.accepted")) == 1
    finally:
        for spool in nodes.values():
            spool.close()
        audit.close()


OUTBOUND = "gateway.spool.sqlite.outbound:OutboundQueue"


@pytest.mark.parametrize(
    "point",
    [
        # The batch's rows are committed; its documents are still in the outbox.
        ("--kill-after", f"{OUTBOUND}.add_intakes"),
        # Taken out of the outbox and signed and encrypted; none of them is queued.
        ("--kill-before", f"{OUTBOUND}.mark_queued_all"),
        # Queued together; their message.accepted records not written yet.
        ("--kill-after", f"{OUTBOUND}.mark_queued_all"),
    ],
    ids=["rows-recorded", "sealed-not-queued", "queued-not-audited"],
)
def test_a_kill_inside_a_batch_sends_each_of_its_documents_once(
    layout: DemoLayout, processes: Any, point: tuple[str, str]
) -> None:
    faultpoint = Path(__file__).with_name("faultpoint.py")
    outbox = layout.lab.outbox_dir / "hospital"
    documents = {f"batch-{i}.hl7": b"MSH|batch %d|" % i + os.urandom(200) for i in range(6)}
    for name, data in documents.items():
        drop_file(outbox, name, data)  # all there before the first scan: taken in batches
    processes.start(layout.hospital.config_path)
    lab = processes.start(
        layout.lab.config_path, prefix=(sys.executable, str(faultpoint), *point, "--")
    )
    assert lab.wait_exit() == -signal.SIGKILL, "\n".join(lab.raw[-20:])

    processes.start(layout.lab.config_path)
    receipts = wait_for_events(layout.lab.audit_log, "receipt.received", count=len(documents))
    assert len(receipts) == len(documents)
    assert all(r["detail"]["disposition"] == "processed" for r in receipts)
    inbox = layout.hospital.inbox_dir / "lab"
    assert {p.name: p.read_bytes() for p in inbox.iterdir()} == documents
    assert not list(outbox.iterdir())
    accepted = [r["detail"]["filename"] for r in events(layout.lab.audit_log, "message.accepted")]
    # Exactly one record of each document queued: none taken twice, and none whose record
    # the kill cut off (written at the next start).
    assert sorted(accepted) == sorted(documents)
    delivered = events(layout.hospital.audit_log, "message.delivered")
    assert len({r["message_id"] for r in delivered}) == len(documents)


def test_a_kill_between_settling_and_its_records_writes_them_at_the_next_start(
    layout: DemoLayout, processes: Any
) -> None:
    """Receipts settled in the spool, their ``receipt.received`` records not written yet:
    the next start writes them, once each, marked as written at recovery."""
    outbox = layout.lab.outbox_dir / "hospital"
    documents = {f"settle-{i}.hl7": b"MSH|settle %d|" % i + os.urandom(200) for i in range(4)}
    for name, data in documents.items():
        drop_file(outbox, name, data)
    processes.start(layout.hospital.config_path)
    lab = processes.start(
        layout.lab.config_path, prefix=killed_at("--kill-after", f"{OUTBOUND}.mark_settled")
    )
    wait_killed(lab)
    assert not events(layout.lab.audit_log, "receipt.received")  # cut off by the kill

    lab = processes.start(layout.lab.config_path)
    wait_for_events(layout.lab.audit_log, "receipt.received", count=len(documents))
    assert lab.stop() == 0
    receipts = events(layout.lab.audit_log, "receipt.received")
    accepted = events(layout.lab.audit_log, "message.accepted")
    assert len(accepted) == len(documents)
    # One each: those settled before the kill, recorded at the start after it.
    assert sorted(r["message_id"] for r in receipts) == sorted(r["message_id"] for r in accepted)
    recovered = [r for r in receipts if r["detail"].get("recorded_at_recovery")]
    assert recovered, "no record was written at recovery"
    assert all("recorded at recovery" in r["reason"] for r in recovered)
    assert all(r["detail"]["disposition"] == "processed" for r in receipts)
    inbox = layout.hospital.inbox_dir / "lab"
    assert {p.name: p.read_bytes() for p in inbox.iterdir()} == documents
