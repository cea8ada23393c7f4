"""A start removes the files of this node's payloads and receipts folders no row names,
asking the spool about the files it finds, a batch at a time: more files than one batch,
and rows the folders hold no file of, change nothing of what is kept."""

from __future__ import annotations

import asyncio
from pathlib import Path

from gateway.audit.log import AuditLog
from gateway.config import load_config
from gateway.outbound.context import Context
from gateway.outbound.recover import Recovery
from gateway.outbound.seal import Sealer
from gateway.outbound.sweep import SWEEP_BATCH
from gateway.pki.demo import DemoLayout
from gateway.spool import Intake, OutboundState, Settled, SqliteSpool
from tests.helpers.recovery import lab_starting, logged_files


def _start(context: Context, audit: AuditLog) -> None:
    asyncio.run(Recovery(context, Sealer(context)).recover())
    audit.close()


def _shared_bodies(layout: DemoLayout) -> None:
    """The lab configured as node lab-b of a cluster, its copies of documents in the
    shared bodies folder."""
    with layout.lab.config_path.open("a") as config:
        config.write('\n[cluster]\nnode_name = "lab-b"\nbodies_dir = "shared-bodies"\n')


def _failed_and_queued(spool: SqliteSpool, source: Path, failed: Path, queued: Path) -> None:
    """Two documents taken in, their copies ``failed`` and ``queued``: the first one's
    preparation failed (its copy stays for an operator's retry), the second queued (its
    copy no longer needed)."""
    spool.add_intakes(
        [
            Intake("<failed@lab>", "hospital", "a.hl7", "text/plain", source, failed),
            Intake("<queued@lab>", "hospital", "b.hl7", "text/plain", source, queued),
        ]
    )
    assert spool.fail_intake("<failed@lab>", "the peer's certificate expired")
    spool.mark_queued("<queued@lab>", None, [], "mic", 3, body=b"sealed")


def _documents(folder: Path, *names: str) -> None:
    for name in names:
        (folder / name).write_bytes(b"document")


def test_a_start_removes_unrecorded_submissions_and_plaintext_copies_no_longer_needed(
    layout: DemoLayout, tmp_path: Path
) -> None:
    spool, audit, context, log = lab_starting(layout, tmp_path)
    payloads = context.payloads
    # Rows of a state folder moved since: their paths are elsewhere, their names here.
    elsewhere = Path("/var/lib/medgw-old/state/payloads")
    _failed_and_queued(spool, tmp_path, elsewhere / "a", payloads / "b")
    _documents(payloads, "a", "b", "unrecorded", ".hidden")
    (payloads / "folder").mkdir()

    _start(context, audit)

    assert {p.name for p in payloads.iterdir()} == {"a", ".hidden", "folder"}
    assert logged_files(log, "recovery.removed_unrecorded_submission") == ["unrecorded"]
    assert logged_files(log, "recovery.removed_plaintext_copy") == ["b"]
    spool.close()


def test_a_start_removes_the_spent_copies_another_node_left_in_the_shared_folder(
    layout: DemoLayout, tmp_path: Path
) -> None:
    """With the copies of documents in the shared bodies folder, a start removes, in the
    other nodes' folders there, only the copies no longer needed (a node that took one
    over was killed before removing it): a copy no row names yet may be another node's
    submission in progress, and one still needed is another node's to prepare."""
    _shared_bodies(layout)
    spool, audit, context, log = lab_starting(layout, tmp_path)
    assert context.shared_payloads is not None
    assert context.payloads == context.shared_payloads / "lab-b"
    other = context.shared_payloads / "lab-a"
    other.mkdir()
    # One kept for a retry (still needed), one taken over and sent (spent).
    _failed_and_queued(spool, tmp_path, failed=other / "needed", queued=other / "spent")
    _documents(other, "spent", "needed", "uploading")
    _documents(context.payloads, "mine")  # this node's, unrecorded

    _start(context, audit)

    assert {p.name for p in other.iterdir()} == {"needed", "uploading"}
    assert list(context.payloads.iterdir()) == []
    assert logged_files(log, "recovery.removed_plaintext_copy") == ["spent"]
    assert logged_files(log, "recovery.removed_unrecorded_submission") == ["mine"]
    spool.close()


def test_a_start_sweeps_the_copies_kept_in_the_state_folder_before_the_folder_was_shared(
    layout: DemoLayout, tmp_path: Path
) -> None:
    """A node whose copies of documents moved to the shared bodies folder (``[cluster]
    bodies_dir`` set on an upgrade) sweeps the state folder's payloads folder, where a
    kill before that left copies, by the same rules as before: what no row names, the
    copies no longer needed and partial writes go; a copy still needed stays."""
    config = load_config(layout.lab.config_path)
    old = config.storage.state_dir / "payloads"
    old.mkdir(parents=True, exist_ok=True)
    _shared_bodies(layout)
    spool, audit, context, log = lab_starting(layout, tmp_path)
    assert context.payloads != old
    _failed_and_queued(spool, tmp_path, old / "a", old / "b")
    _documents(old, "a", "b", "unrecorded", ".c.0123456789ab.partial")

    _start(context, audit)

    assert {p.name for p in old.iterdir()} == {"a"}
    assert logged_files(log, "recovery.removed_unrecorded_submission") == ["unrecorded"]
    assert logged_files(log, "recovery.removed_plaintext_copy") == ["b"]
    spool.close()


def test_a_start_asks_about_more_receipt_files_than_one_batch_and_keeps_every_named_one(
    layout: DemoLayout, tmp_path: Path
) -> None:
    """Files of several batches, rows with no file here (another node's receipts): each
    named file is kept, each unnamed one removed, once."""
    spool, audit, context, log = lab_starting(layout, tmp_path)
    receipts = context.receipts
    count = 2 * SWEEP_BATCH + 7
    ids = [f"<{i}@lab>" for i in range(count + 50)]
    spool.add_intakes(
        [Intake(m, "hospital", "m.hl7", "text/plain", tmp_path, tmp_path / m) for m in ids]
    )
    for message_id in ids:
        spool.mark_queued(message_id, None, [], "mic", 3, body=b"sealed")
        spool.mark_sending(message_id)
    named = [f"r{i}.{i:012x}.mdn" for i in range(count + 50)]
    # The last 50 rows' receipts are on another node's disk.
    here = [receipts / n for n in named[:count]] + [
        Path("/other-node/receipts") / n for n in named[count:]
    ]
    assert spool.mark_settled(
        [
            Settled(m, OutboundState.DELIVERED, "processed", p)
            for m, p in zip(ids, here, strict=True)
        ]
    )
    unnamed = [f"cut-off-{i}.{i:012x}.mdn" for i in range(0, count, 3)]
    for name in [*named[:count], *unnamed]:
        (receipts / name).write_bytes(b"receipt")

    _start(context, audit)

    assert {p.name for p in receipts.iterdir()} == set(named[:count])
    assert logged_files(log, "recovery.removed_unrecorded_receipt") == sorted(unnamed)
    spool.close()
