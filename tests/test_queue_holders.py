"""What ``medgw queue list`` and ``queue show`` say of the nodes sharing a spool, on both
backends: a claim that ran out is not said to be held, an intake let go for the node
that took it in waits for that node (no claim time it does not have), and a delivered
message names the node that sent it, apart from the one whose audit trail settled it."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from gateway.config import load_config
from gateway.pki.demo import DemoLayout
from gateway.spool import Claimant, OutboundState, Settled, Spool, SqliteSpool
from gateway.spool.postgres import PostgresSpool
from tests.cli import medgw
from tests.clocks import SetClock

LEASE = 30.0
THEN = datetime(2020, 1, 1, tzinfo=UTC)  # the claims below were made then: long run out
RAN_OUT = "2020-01-01T00:00:30+00:00"  # THEN and a lease


def _spool(config: Path, node: str, clock: SetClock) -> Spool:
    """The spool of gateway.toml ``config``, as node ``node`` on ``clock`` (its leases
    too: a PostgreSQL spool's on the test's clock, not the server's)."""
    loaded = load_config(config)
    claimant = Claimant(node, LEASE)
    if loaded.spool.postgres is not None:
        return PostgresSpool(loaded.spool.postgres, clock, claimant, server_time=False)
    return SqliteSpool(loaded.storage.spool_path, clock, claimant)


def _take_in(spool: Spool, tmp_path: Path, message_id: str) -> None:
    spool.add_intake(
        message_id, "lab", "f.hl7", "text/plain", tmp_path / "src", tmp_path / "payload"
    )


def _queue(spool: Spool, tmp_path: Path, message_id: str) -> None:
    _take_in(spool, tmp_path, message_id)
    spool.mark_queued(message_id, None, [("AS2-To", "lab")], "mic", 3, body=b"abc")


def _json(config: Path, *args: str) -> Any:
    result = medgw("queue", *args, "--config", str(config), "--json")
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def test_queue_views_say_what_the_nodes_claims_are_now(
    layout: DemoLayout, spool_backend: str, tmp_path: Path
) -> None:
    config = layout.hospital.config_path
    clock = SetClock(THEN)
    b, c = _spool(config, "hosp-b", clock), _spool(config, "hosp-c", clock)
    try:
        _take_in(b, tmp_path, "<intake@x>")  # taken in by hosp-b, which stopped
        _queue(b, tmp_path, "<sending@x>")
        [claimed], _ = b.claim_due("lab", THEN.timestamp(), 1)  # hosp-b sends it, then stops
        assert claimed.message_id == "<sending@x>"
        _take_in(b, tmp_path, "<let-go@x>")  # left for hosp-a, whose folder has it
        assert b.intake_release("<let-go@x>", "hosp-a")
        _queue(b, tmp_path, "<delivered@x>")
        b.claim_due("lab", THEN.timestamp(), 1)
        # Its asynchronous receipt came to hosp-c, which settled it.
        settled = Settled(
            "<delivered@x>",
            OutboundState.DELIVERED,
            "processed",
            None,
            found=OutboundState.SENDING,
            held=False,
            receipt=b"receipt",
            receipt_sha256="00" * 32,
        )
        assert c.mark_settled([settled]) == ["<delivered@x>"]
    finally:
        b.close()
        c.close()

    listed = medgw("queue", "list", "--config", str(config))
    assert listed.returncode == 0, listed.stderr
    text = listed.stdout
    assert "held by" not in text and "None" not in text, text
    assert (
        f"node hosp-b was sending; its claim ran out at {RAN_OUT} (that node may have "
        "stopped): another node takes it over, or node hosp-b when it starts again"
    ) in text, text
    assert (
        f"node hosp-b was taking it in; its claim ran out at {RAN_OUT} (that node may have "
        "stopped): another node takes it over if it can read its document, or node hosp-b "
        "when it starts again"
    ) in text, text
    assert (
        "waits for node hosp-a, which took it in: its document is in that node's state "
        "folder, and that node prepares it when it starts again"
    ) in text, text
    assert "sent by node hosp-b" in text, text

    views = {v["message_id"]: v for v in _json(config, "list")}
    assert views["<sending@x>"]["node"] == "hosp-b"
    assert views["<sending@x>"]["claim"] == "ran out"
    assert views["<sending@x>"]["lease_until"] == RAN_OUT
    assert views["<intake@x>"]["claim"] == "ran out"
    let_go = views["<let-go@x>"]
    assert (let_go["node"], let_go["claim"], let_go["lease_until"]) == ("hosp-a", "let go", None)
    shown = _json(config, "show", "<delivered@x>")
    assert (shown["node"], shown["sent_by"], shown["audited_by"]) == (None, "hosp-b", "hosp-c")
    detail = medgw("queue", "show", "<delivered@x>", "--config", str(config))
    assert "sent_by          hosp-b" in detail.stdout, detail.stdout
    # Nothing that was not sent is said to be: a message only taken in names no sender.
    assert {v["sent_by"] for k, v in views.items() if k != "<delivered@x>"} == {None}
