"""Outbox intake fairness: one peer's backlog holds another peer's documents back by a
round at most (gateway/intake/outbox.py), and a backlog is taken without waiting polls."""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from gateway.audit.log import AuditLog
from gateway.clock import SystemClock
from gateway.config import load_config
from gateway.demo_run import drop_file
from gateway.intake.outbox import Outbox
from gateway.outbound.intake import ROUND_PER_PEER
from gateway.pki.demo import DemoLayout
from gateway.spool import SqliteSpool
from tests.helpers.audit import events, wait_for_events
from tests.helpers.intake import lab_outbound, two_peers

BACKLOG = 2000  # the busy peer's waiting documents: many rounds' worth


def _busy_names(count: int) -> list[str]:
    return [f"order-{i:05}.hl7" for i in range(count)]


def _fill(folder: Path, names: list[str]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for name in names:
        (folder / name).write_bytes(b"MSH|^~\\&|" + name.encode() + b"\r")


@pytest.fixture
def spool(tmp_path: Path) -> Iterator[SqliteSpool]:
    opened = SqliteSpool(tmp_path / "spool.sqlite3", SystemClock())
    try:
        yield opened
    finally:
        opened.close()


@pytest.fixture
def audit(tmp_path: Path) -> Iterator[AuditLog]:
    opened = AuditLog(tmp_path / "audit.jsonl", SystemClock(), node="lab")
    try:
        yield opened
    finally:
        opened.close()


@pytest.mark.parametrize("dropped", ["before", "while taking"])
async def test_a_quiet_peers_document_waits_a_round_of_a_busy_peers_backlog_not_all_of_it(
    layout: DemoLayout, tmp_path: Path, spool: SqliteSpool, audit: AuditLog, dropped: str
) -> None:
    """2000 lab orders wait for the hospital; one prescription for the pharmacy is dropped
    before the intake starts, or once it is taking the orders.  The prescription is taken
    after at most two rounds of orders (one under way, its own), not after all 2000; the
    orders are taken in name order, and the rest wait in the outbox, untouched."""
    config = two_peers(layout)
    outbound = await lab_outbound(config, spool, audit, SystemClock())
    busy = layout.lab.outbox_dir / "hospital"
    names = _busy_names(BACKLOG)
    _fill(busy, names)
    if dropped == "before":
        drop_file(layout.lab.outbox_dir / "pharmacy", "rx.hl7", b"MSH|rx\r")
    else:
        assert await outbound.intake_once() > 0  # a round of orders is taken
        assert len(events(tmp_path / "audit.jsonl", "message.accepted")) < BACKLOG
        drop_file(layout.lab.outbox_dir / "pharmacy", "rx.hl7", b"MSH|rx\r")

    def accepted() -> list[dict[str, Any]]:
        return events(tmp_path / "audit.jsonl", "message.accepted")

    rounds = 0
    while not any(r["peer"] == "pharmacy" for r in accepted()):
        rounds += 1
        assert rounds <= 3, "the pharmacy's document was not taken within three rounds"
        await outbound.intake_once()

    records = accepted()
    position = next(i for i, r in enumerate(records) if r["peer"] == "pharmacy")
    orders_before = [r for r in records[:position] if r["peer"] == "hospital"]
    bound = ROUND_PER_PEER if dropped == "before" else 2 * ROUND_PER_PEER
    assert len(orders_before) <= bound, (
        f"{len(orders_before)} of the hospital's {BACKLOG} documents were taken before the "
        f"pharmacy's (at most {bound} expected)"
    )
    # The orders taken so far are the first ones by name, each once; the others wait.
    taken = [r["detail"]["filename"] for r in records if r["peer"] == "hospital"]
    assert sorted(taken) == names[: len(taken)]
    assert len(taken) <= 2 * ROUND_PER_PEER < BACKLOG
    assert sorted(p.name for p in busy.iterdir()) == names[len(taken) :]
    assert not (layout.lab.outbox_dir / "pharmacy" / "rx.hl7").exists()
    rows = Counter(r.peer for r in spool.all_outbound())
    assert rows == {"hospital": len(taken), "pharmacy": 1}


async def test_a_service_folder_takes_turns_with_its_peers_own_folder(
    layout: DemoLayout, tmp_path: Path, spool: SqliteSpool, audit: AuditLog
) -> None:
    """outbox/hospital/ holds a backlog; one document waits in the hospital's service
    folder: it is taken in the first round, and the round stays within the peer's share."""
    config = load_config(layout.lab.config_path)
    [hospital] = config.peers
    config = replace(config, peers=(replace(hospital, services=("pharmacy-orders",)),))
    outbound = await lab_outbound(config, spool, audit, SystemClock())
    names = _busy_names(ROUND_PER_PEER * 3)
    _fill(layout.lab.outbox_dir / "hospital", names)
    drop_file(layout.lab.outbox_dir / "hospital" / "pharmacy-orders", "rx.hl7", b"MSH|rx\r")

    assert await outbound.intake_once() == ROUND_PER_PEER
    records = events(tmp_path / "audit.jsonl", "message.accepted")
    assert len(records) == ROUND_PER_PEER
    assert [r.get("service") for r in records if r["detail"]["filename"] == "rx.hl7"] == [
        "pharmacy-orders"
    ]
    taken = sorted(r["detail"]["filename"] for r in records if "service" not in r)
    assert taken == names[: ROUND_PER_PEER - 1]
    assert outbound.outbox_waiting == len(names) - len(taken)


async def test_a_listed_document_replaced_by_a_link_before_its_round_is_not_taken(
    layout: DemoLayout, tmp_path: Path, spool: SqliteSpool, audit: AuditLog
) -> None:
    """A listing outlives its round: a document listed, then replaced by a symbolic link
    before its round comes, is not taken (the link could name a file its writer may not
    read); the others are, and the link stays in the outbox."""
    config = load_config(layout.lab.config_path)
    outbound = await lab_outbound(config, spool, audit, SystemClock())
    busy = layout.lab.outbox_dir / "hospital"
    names = _busy_names(ROUND_PER_PEER + 2)
    _fill(busy, names)
    assert await outbound.intake_once() == ROUND_PER_PEER  # all listed, a round taken
    secret = tmp_path / "secret.txt"
    secret.write_bytes(b"not the writer's to send")
    swapped = busy / names[ROUND_PER_PEER]
    swapped.unlink()
    swapped.symlink_to(secret)
    await outbound.intake_once()

    taken = [r["detail"]["filename"] for r in events(tmp_path / "audit.jsonl", "message.accepted")]
    assert sorted(taken) == sorted(n for n in names if n != swapped.name)
    assert swapped.name not in {r.filename for r in spool.all_outbound()}
    assert swapped.is_symlink()


def test_a_backlogged_folder_is_listed_once_for_its_documents_not_once_a_round(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Rounds of a 1000-file folder read it once (and once more when it is done), while
    an idle peer's folder is read every round, so a new document there is seen at once.
    Each document is offered once, in name order, the peers in turn."""
    outbox = tmp_path / "outbox"
    names = _busy_names(1000)
    _fill(outbox / "hospital", names)
    (outbox / "pharmacy").mkdir()
    listed: Counter[str] = Counter()
    scandir = os.scandir

    def counted(path: Any) -> Any:
        listed[Path(path).name] += 1
        return scandir(path)

    monkeypatch.setattr(os, "scandir", counted)
    peers = {"hospital": (), "pharmacy": ()}
    box = Outbox()
    offered: list[str] = []
    rounds = 0
    while True:
        found = box.next_round(outbox, peers, ROUND_PER_PEER)
        if not found.candidates:
            break
        rounds += 1
        assert [c.peer for c in found.candidates[:2]] == (
            ["hospital", "pharmacy"] if rounds == 5 else ["hospital", "hospital"]
        )
        for candidate in found.candidates:
            offered.append(candidate.path.name)
            candidate.path.unlink()  # taken
        assert found.waiting == box.waiting == len(os.listdir(outbox / "hospital"))
        if rounds == 4:
            drop_file(outbox / "pharmacy", "rx.hl7", b"MSH|rx\r")  # seen at the next round
    assert rounds == -(-len(names) // ROUND_PER_PEER)
    assert offered.index("rx.hl7") == 4 * ROUND_PER_PEER + 1
    offered.remove("rx.hl7")
    assert offered == names
    assert listed["hospital"] == 2  # at the first round, and at the end to see it empty
    assert listed["pharmacy"] == rounds + 1


def test_a_backlog_is_taken_round_after_round_without_waiting_for_the_next_poll(
    layout: DemoLayout, processes: Any
) -> None:
    """A real ``medgw run`` polling its outbox once an hour takes a backlog of several
    rounds at its start, round after round, not a round an hour."""
    config = layout.lab.config_path
    text = config.read_text()
    assert "outbox_poll_seconds = 0.2" in text
    config.write_text(text.replace("outbox_poll_seconds = 0.2", "outbox_poll_seconds = 3600"))
    count = ROUND_PER_PEER * 3 + 1
    _fill(layout.lab.outbox_dir / "hospital", _busy_names(count))
    processes.start(config)
    accepted = wait_for_events(layout.lab.audit_log, "message.accepted", count=count)
    assert sorted(r["detail"]["filename"] for r in accepted) == _busy_names(count)
    assert not list((layout.lab.outbox_dir / "hospital").iterdir())
