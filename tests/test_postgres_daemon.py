"""Real ``medgw run`` daemons on a real PostgreSQL spool.

Two gateways exchange documents with their spools in PostgreSQL (send,
receive, signed receipts, a restart with documents waiting), and a gateway
whose database server is stopped in the middle of the run keeps running,
asks its peer to resend (503, as when a SQLite spool cannot be written), says
so in its log and audit trail, and delivers every document exactly once when
the server is back.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest

from gateway.config import load_config
from gateway.demo_run import drop_file, wait_until
from gateway.pki.demo import DemoLayout
from gateway.spool import OutboundState
from gateway.spool.postgres import PostgresSettings, PostgresSpool
from tests.clocks import TickingClock
from tests.conftest import Processes
from tests.helpers.audit import events, wait_for_events
from tests.helpers.postgres import PostgresServer, spool_section

pytestmark = pytest.mark.daemon


def use_postgres(config_path: Path, settings: PostgresSettings) -> None:
    """Point a demo gateway's spool at ``settings``' database."""
    with config_path.open("a") as config:
        config.write(spool_section(settings))


def inbox(layout: DemoLayout) -> dict[str, bytes]:
    folder = layout.hospital.inbox_dir / "lab"
    if not folder.exists():
        return {}
    return {p.name: p.read_bytes() for p in folder.iterdir() if not p.name.startswith(".")}


def test_two_gateways_on_postgresql_deliver_settle_and_survive_a_restart(
    layout: DemoLayout, processes: Processes, postgres_server: PostgresServer
) -> None:
    hospital_db, lab_db = postgres_server.new_database(), postgres_server.new_database()
    use_postgres(layout.hospital.config_path, hospital_db)
    use_postgres(layout.lab.config_path, lab_db)
    assert load_config(layout.lab.config_path).spool.postgres == lab_db
    processes.start(layout.hospital.config_path)
    lab = processes.start(layout.lab.config_path)
    documents = {f"doc-{i}.hl7": f"MSH|^~\\&|LAB|{i}\r".encode() * (i + 1) for i in range(5)}
    first = dict(list(documents.items())[:3])
    for name, data in first.items():
        drop_file(layout.lab.outbox_dir / "hospital", name, data)
    wait_for_events(layout.lab.audit_log, "receipt.received", count=3, timeout=120)

    assert lab.stop() == 0  # documents put in the outbox meanwhile wait there
    for name, data in list(documents.items())[3:]:
        drop_file(layout.lab.outbox_dir / "hospital", name, data)
    processes.start(layout.lab.config_path)
    receipts = wait_for_events(layout.lab.audit_log, "receipt.received", count=5, timeout=120)

    assert inbox(layout) == documents
    assert all(r["detail"]["disposition"] == "processed" for r in receipts)
    assert all(r["detail"]["mic_verified"] for r in receipts)
    assert len({r["message_id"] for r in receipts}) == 5
    lab_spool = PostgresSpool(lab_db, TickingClock())
    hospital_spool = PostgresSpool(hospital_db, TickingClock())
    try:
        sent = lab_spool.all_outbound()
        assert sorted(r.filename for r in sent) == sorted(documents)
        assert {r.state for r in sent} == {OutboundState.DELIVERED}
        for record in sent:
            received = hospital_spool.inbound_get("lab", record.message_id)
            assert received is not None and received.state == "delivered"
    finally:
        lab_spool.close()
        hospital_spool.close()
    for side in (layout.lab, layout.hospital):  # no SQLite spool was made beside it
        assert not (side.root / "state" / "spool.sqlite3").exists()


def test_a_database_stopped_mid_run_refuses_for_now_and_loses_nothing(
    layout: DemoLayout, processes: Processes, postgres_server: PostgresServer
) -> None:
    hospital_db = postgres_server.new_database()
    use_postgres(layout.hospital.config_path, hospital_db)
    hospital = processes.start(layout.hospital.config_path)
    processes.start(layout.lab.config_path)  # its own spool is SQLite
    drop_file(layout.lab.outbox_dir / "hospital", "before.hl7", b"MSH|before\r")
    wait_for_events(layout.lab.audit_log, "receipt.received", count=1, timeout=120)

    postgres_server.stop("immediate")  # as if the database server crashed
    try:
        drop_file(layout.lab.outbox_dir / "hospital", "during.hl7", b"MSH|during\r")
        # The hospital asks the lab to resend (nothing stored, nothing acknowledged) ...
        refused = wait_for_events(layout.hospital.audit_log, "storage.unavailable", timeout=120)
        assert "is unreachable" in refused[0]["reason"]
        alert = wait_for_events(layout.hospital.audit_log, "spool.unreachable")
        assert alert[0]["severity"] == "alert" and hospital_db.dbname in alert[0]["reason"]
        wait_for_events(
            layout.lab.audit_log,
            "message.send_failed",
            where=lambda r: "503" in str(r.get("reason", "")) + str(r.get("detail", "")),
        )
        # ... and its own outbox keeps what it cannot take now.
        drop_file(layout.hospital.outbox_dir / "lab", "reply.hl7", b"MSH|reply\r")
        assert hospital.proc.poll() is None  # the daemon keeps running
        assert "during.hl7" not in inbox(layout)
    finally:
        postgres_server.start()

    wait_for_events(layout.hospital.audit_log, "spool.reachable", timeout=120)
    wait_for_events(layout.lab.audit_log, "receipt.received", count=2, timeout=120)
    wait_for_events(layout.hospital.audit_log, "receipt.received", count=1, timeout=120)
    assert inbox(layout) == {"before.hl7": b"MSH|before\r", "during.hl7": b"MSH|during\r"}
    delivered = events(layout.hospital.audit_log, "message.delivered")
    assert len(delivered) == 2 and len({r["message_id"] for r in delivered}) == 2  # once each
    # One alert for the outage, not one per loop that waited for the database.
    assert events(layout.hospital.audit_log, "daemon.task_failed") == []
    wait_until(
        lambda: (layout.lab.inbox_dir / "hospital" / "reply.hl7").exists(),
        60,
        "the hospital's reply delivered once its spool answers again",
    )
    assert not list((layout.hospital.outbox_dir / "lab").iterdir())


def test_a_gateway_whose_database_does_not_answer_at_start_says_so_and_stops(
    layout: DemoLayout, processes: Processes, postgres: PostgresSettings, tmp_path: Path
) -> None:
    """At start the spool must be there (its tables checked, interrupted work taken
    back): medgw run stops with the database and the fix named, for systemd to start
    it again, and leaves no SQLite spool behind as if it were one."""
    nowhere = replace(postgres, socket_dir=tmp_path / "no-server-here")
    use_postgres(layout.hospital.config_path, nowhere)
    proc = processes.start(layout.hospital.config_path, wait=False)
    assert proc.wait_exit(60) != 0
    output = "\n".join(proc.raw)
    assert f"database '{postgres.dbname}'" in output and "is unreachable" in output, output
    assert "check that PostgreSQL is running" in output
    assert "Traceback" not in output
    assert not (layout.hospital.root / "state" / "spool.sqlite3").exists()
