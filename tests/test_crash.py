"""Nothing is lost and nothing is doubled while both daemons are SIGKILLed at random.

Most documents are small (sealed in memory, their body kept in the spool row);
every tenth is larger, so that its body goes through a file in state/outgoing.
The hospital's inbox is watched all along (inode, size, modification time
every few milliseconds), as an internal system taking files from it would:
no document may be written there twice, and the audit trail records each
delivery once.
"""

from __future__ import annotations

import hashlib
import os
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from gateway.clock import SystemClock
from gateway.demo_run import read_audit
from gateway.outbound.status import MAX_SEALED_RECEIPT
from gateway.pki.demo import DemoLayout
from gateway.spool import OutboundState, Spool, SqliteSpool
from gateway.spool.postgres import PostgresSpool
from tests.helpers.crash import LIMIT_BEYOND_DELIVERIES, drop_while_killing
from tests.helpers.postgres import spool_section

MESSAGES = 200
DELIVERED_WITHIN = 300  # seconds, once every document is dropped


@pytest.mark.long
# pytest's limit of a test (300 s) would end the run before its own deadline: it allows
# the drops, the restarts and the stops beyond the wait for the deliveries.
@pytest.mark.timeout(LIMIT_BEYOND_DELIVERIES + DELIVERED_WITHIN)
@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_random_sigkills_of_both_daemons_deliver_every_message_exactly_once(
    layout: DemoLayout, processes: Any, backend: str, request: pytest.FixtureRequest
) -> None:
    configs = {"hospital": layout.hospital.config_path, "lab": layout.lab.config_path}
    lab_spool_path = layout.lab.root / "state" / "spool.sqlite3"

    def lab_spool() -> Spool:
        return SqliteSpool(lab_spool_path, SystemClock())

    if backend == "postgresql":  # each daemon's spool a database on a real server
        server = request.getfixturevalue("postgres_server")
        databases = {name: server.new_database() for name in configs}
        for name, path in configs.items():
            with path.open("a") as config:
                config.write(spool_section(databases[name]))

        def lab_spool() -> Spool:
            return PostgresSpool(databases["lab"], SystemClock())

    outbox = layout.lab.outbox_dir / "hospital"

    def all_delivered() -> bool:
        spool = lab_spool()
        try:
            records = spool.all_outbound()
            return len(records) >= MESSAGES and all(
                r.state is OutboundState.DELIVERED for r in records
            )
        finally:
            spool.close()

    run = drop_while_killing(
        processes,
        configs,
        [outbox],
        layout.hospital.inbox_dir,
        all_delivered,
        messages=MESSAGES,
        timeout=DELIVERED_WITHIN,
    )
    seed, sent = run.seed, run.sent

    inbox = layout.hospital.inbox_dir / "lab"
    files = sorted(p for p in inbox.iterdir())
    assert [p.name for p in files] == sorted(sent), f"seed {seed}: inbox differs"
    for path in files:
        assert hashlib.sha256(path.read_bytes()).hexdigest() == sent[path.name], path.name

    spool = lab_spool()
    try:
        records = spool.all_outbound()
        assert len(records) == MESSAGES, f"seed {seed}: a file became two messages"
        for record in records:
            assert record.state is OutboundState.DELIVERED
            assert record.disposition == "processed"
            assert record.receipt_kept and spool.stored_receipt(
                record.message_id, MAX_SEALED_RECEIPT
            )
    finally:
        spool.close()
    state = layout.lab.root / "state"
    assert list((state / "payloads").iterdir()) == []  # no plaintext left behind
    assert list(outbox.iterdir()) == []
    assert _leftovers(layout.root) == []  # no half-written file anywhere
    # On PostgreSQL, no SQLite spool was made beside it.
    assert (backend == "sqlite") == lab_spool_path.exists()
    assert run.kills >= 5
    # The audit trail: one delivery per document, whatever the resends.
    delivered = Counter(
        r["message_id"]
        for r in read_audit(layout.hospital.audit_log)
        if r["event"] == "message.delivered"
    )
    assert len(delivered) == MESSAGES and set(delivered.values()) == {1}, f"seed {seed}"
    print(f"{MESSAGES} messages, {run.kills} SIGKILLs, all delivered exactly once")


def _leftovers(folder: Path) -> list[Path]:
    return list(folder.rglob("*.partial"))


@pytest.mark.daemon
def test_a_start_removes_what_killed_writes_left_in_the_state_and_crl_folders(
    layout: DemoLayout, processes: Any
) -> None:
    """A kill while the CRL cache, the emergency window or the break-glass credential
    was being written leaves a hidden partial file beside it.  A start removes those an
    hour old; a younger one may be a `medgw` command's write in progress."""
    state = layout.lab.root / "state"
    (state / "crls").mkdir(parents=True, exist_ok=True)
    two_hours_ago = time.time() - 7200
    old = [
        state / ".emergency.json.0123456789ab.partial",
        state / "crls" / ".ca.crl.0123456789ab.partial",
    ]
    for path in old:
        path.write_bytes(b"cut short")
        os.utime(path, (two_hours_ago, two_hours_ago))
    young = state / ".credential.json.ba9876543210.partial"
    young.write_bytes(b"being written")
    processes.start(layout.lab.config_path)  # ready once its recovery is done
    assert [p for p in old if p.exists()] == []
    assert young.exists()
