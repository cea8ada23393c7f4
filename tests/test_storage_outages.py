"""An outage of the storage, as the operator hears of it: while a disk is full or the
spool's database does not answer, every document a peer sends (and each resend) is
answered 503; the operator gets one alert per cause and outage, and the record of
its end says how many documents were answered 503 during it.

Real ``medgw run`` daemons, a real small file system (tmpfs, as root) for the full
inbox, the real PostgreSQL server the tests start, stopped and started again.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from gateway.demo_run import GatewayProcess, drop_file, wait_until
from gateway.pki.demo import DemoLayout
from tests.conftest import Processes
from tests.helpers.audit import events, wait_for_events
from tests.helpers.demo import lab_message, lab_post, receipt_of
from tests.helpers.internal_system import set_services
from tests.helpers.metrics import get, scrape, value, wait_scrape, with_metrics
from tests.helpers.postgres import PostgresServer, spool_section
from tests.helpers.storage import (
    files_capped,
    fill_file_system,
    read_only_folder,
    small_file_system,
)

pytestmark = pytest.mark.daemon

DOCUMENTS = 3


@pytest.fixture
def small_inbox(layout: DemoLayout) -> Iterator[Path]:
    with small_file_system(layout.hospital.inbox_dir, "256k") as inbox:
        yield inbox


def refusals(node: GatewayProcess) -> list[dict[str, Any]]:
    """The node's log lines of documents answered 503."""
    return [line for line in node.lines if line.get("event") == "storage.unavailable"]


def drop_documents(layout: DemoLayout) -> None:
    for n in range(DOCUMENTS):
        drop_file(layout.lab.outbox_dir / "hospital", f"doc-{n}.hl7", f"MSH|{n}\r".encode())


def test_a_full_inbox_is_alerted_once_and_its_end_counts_the_documents_refused(
    layout: DemoLayout, small_inbox: Path, processes: Processes
) -> None:
    filler = fill_file_system(small_inbox)
    hospital = processes.start(layout.hospital.config_path)
    processes.start(layout.lab.config_path)
    drop_documents(layout)
    # Each document, and the lab's resends of them, answered 503.
    wait_until(lambda: len(refusals(hospital)) >= DOCUMENTS + 2, 120, "resends refused")
    [alert] = events(layout.hospital.audit_log, "storage.unavailable")
    assert alert["severity"] == "alert" and "No space left on device" in alert["reason"]
    first, *counted = refusals(hospital)
    assert first["level"] == "error" and first["fix"] == alert["detail"]["fix"]
    assert [line["level"] for line in counted] == ["warning"] * len(counted)
    assert [line["refused_during_outage"] for line in counted] == list(range(2, len(counted) + 2))

    filler.unlink()  # the administrator frees space
    wait_for_events(layout.hospital.audit_log, "message.delivered", count=DOCUMENTS)
    [ended] = wait_for_events(layout.hospital.audit_log, "storage.available")
    refused = ended["detail"]["refused"]
    assert refused >= DOCUMENTS + 2, ended
    assert f"{refused} documents were answered 503 during the outage" in ended["reason"]
    assert "No space left on device" in ended["reason"]
    assert len(events(layout.hospital.audit_log, "storage.unavailable")) == 1


def test_only_a_document_stored_again_ends_an_outage(
    layout: DemoLayout, small_inbox: Path, spool_backend: str, processes: Processes
) -> None:
    """While the inbox's disk is full, the lab's resend of a document delivered before is
    answered with its kept receipt, and a document with a forged AS2-From with a negative
    receipt: neither is stored, so the outage goes on (its end would say storage works
    again while the disk is still full), and the next refusal is counted in it."""
    processes.start(layout.hospital.config_path)
    audit = layout.hospital.audit_log
    delivered = lab_message(layout, b"MSH|before\r", filename="before.hl7")
    assert receipt_of(layout, lab_post(layout, *delivered)).processed
    filler = fill_file_system(small_inbox)
    refused = lab_message(layout, b"MSH|during\r", filename="during.hl7")
    assert lab_post(layout, *refused).status == 503

    # Each record is written before its answer is sent.
    forged = lab_message(layout, b"MSH|forged\r", sender_as2="SOME-OTHER-LAB")
    negative = receipt_of(layout, lab_post(layout, *forged))
    assert negative.disposition == "processed/error: authentication-failed"
    assert events(audit, "storage.available") == []
    resent = lab_post(layout, *delivered)  # answered from the spool
    assert receipt_of(layout, resent).processed
    assert len(events(audit, "message.duplicate")) == 1
    assert events(audit, "storage.available") == []
    assert lab_post(layout, *refused).status == 503  # the lab's resend: counted
    assert len(events(audit, "storage.unavailable")) == 1  # one outage

    filler.unlink()  # the administrator frees space
    assert receipt_of(layout, lab_post(layout, *refused)).processed
    [ended] = events(audit, "storage.available")
    assert ended["detail"]["refused"] == 2, ended


def test_a_folders_outage_ends_only_with_a_document_stored_in_that_folder(
    layout: DemoLayout, spool_backend: str, processes: Processes
) -> None:
    """The lab's two services: while its orders folder is read-only, a result stored in
    the results folder proves nothing of it.  The outage goes on (its end would say the
    documents are stored again while the orders are still refused), the next order
    refused is counted in it, not alerted again, and it ends with an order stored."""
    services = '["orders", "results"]'
    set_services(layout, hospital_accepts=services, lab_sends=services)
    processes.start(layout.hospital.config_path)
    audit = layout.hospital.audit_log
    orders = layout.hospital.inbox_dir / "lab" / "orders"
    with read_only_folder(orders) as folder:
        order = lab_message(layout, b"MSH|order\r", filename="order.hl7", service="orders")
        assert lab_post(layout, *order).status == 503
        result = lab_message(layout, b"MSH|result\r", filename="result.hl7", service="results")
        # Each record is written before its answer is sent.
        assert receipt_of(layout, lab_post(layout, *result)).processed
        assert (orders.parent / "results" / "result.hl7").read_bytes() == b"MSH|result\r"
        assert events(audit, "storage.available") == []
        assert lab_post(layout, *order).status == 503  # the lab's resend: counted
        [alert] = events(audit, "storage.unavailable")  # one outage
        assert f"cannot write the received document to {orders}/" in alert["reason"], alert

        folder.release()  # the administrator makes the folder writable
        assert receipt_of(layout, lab_post(layout, *order)).processed
    [ended] = events(audit, "storage.available")
    assert ended["detail"]["refused"] == 2, ended
    assert (orders / "order.hl7").read_bytes() == b"MSH|order\r"


def test_an_alert_the_audit_log_could_not_take_is_written_at_the_next_refusal(
    layout: DemoLayout, processes: Processes, postgres_server: PostgresServer
) -> None:
    """The database stops while the audit log's disk refuses writes: the outage's alert
    is lost, and is not taken as written.  The next document refused once the disk
    takes writes again writes it, once; the ones after are counted."""
    with layout.hospital.config_path.open("a") as config:
        config.write(spool_section(postgres_server.new_database()))
    audit = layout.hospital.audit_log
    hospital = processes.start(layout.hospital.config_path)
    documents = [lab_message(layout, f"MSH|{n}\r".encode()) for n in range(3)]
    postgres_server.stop("immediate")
    try:
        with files_capped(hospital.proc.pid, audit.stat().st_size) as audit_disk:
            assert lab_post(layout, *documents[0]).status == 503
            hospital.wait_for(
                lambda line: (
                    line.get("event") == "audit.write_failed"
                    and line.get("audit_event") == "storage.unavailable"
                ),
                60,
            )
            audit_disk.release()  # the administrator frees space
            assert lab_post(layout, *documents[1]).status == 503
            [alert] = events(audit, "storage.unavailable")  # written before the answer
            assert alert["severity"] == "alert" and "is unreachable" in alert["reason"]
            assert alert["message_id"] == dict(documents[1][0])["Message-ID"]
            assert lab_post(layout, *documents[2]).status == 503
            assert len(events(audit, "storage.unavailable")) == 1  # once
    finally:
        postgres_server.start()
    [back] = wait_for_events(audit, "spool.reachable", timeout=120)
    assert back["detail"]["refused"] == 3, back
    hospital.wait_for(lambda line: line.get("event") == "spool.reachable", 60)  # read up to it
    said = [line for line in refusals(hospital) if line["level"] == "error"]
    assert [line.get("refused_during_outage") for line in said] == [None, 2]


def test_a_database_outage_is_alerted_once_and_its_return_counts_the_documents_refused(
    layout: DemoLayout, processes: Processes, postgres_server: PostgresServer
) -> None:
    with layout.hospital.config_path.open("a") as config:
        config.write(spool_section(postgres_server.new_database()))
    hospital = processes.start(layout.hospital.config_path)
    processes.start(layout.lab.config_path)  # its own spool is SQLite
    postgres_server.stop("immediate")
    try:
        drop_documents(layout)
        wait_until(lambda: len(refusals(hospital)) >= DOCUMENTS + 2, 120, "resends refused")
        [alert] = events(layout.hospital.audit_log, "storage.unavailable")
        assert "is unreachable" in alert["reason"]
        assert len(events(layout.hospital.audit_log, "spool.unreachable")) == 1
    finally:
        postgres_server.start()
    [back] = wait_for_events(layout.hospital.audit_log, "spool.reachable", timeout=120)
    refused = back["detail"]["refused"]
    assert refused >= DOCUMENTS + 2, back
    assert f"{refused} received documents were answered 503 during its outage" in back["reason"]
    wait_for_events(layout.hospital.audit_log, "message.delivered", count=DOCUMENTS)
    assert len(events(layout.hospital.audit_log, "storage.unavailable")) == 1
    assert events(layout.hospital.audit_log, "storage.available") == []  # said by its return


def test_the_readiness_says_the_spool_database_is_down_and_is_ready_again_with_it(
    layout: DemoLayout, processes: Processes, postgres_server: PostgresServer
) -> None:
    """Not ready from the moment the node finds its database gone, naming it, the cause
    and the fix; ready again as soon as it answers, not a minute after the last
    document it refused (a load balancer would drop every node of a cluster at once).
    The spool's size is the database's, not that of a SQLite file that is not there."""
    with layout.hospital.config_path.open("a") as config:
        config.write(spool_section(spool := postgres_server.new_database()))
    port = with_metrics(layout.hospital)
    hospital = processes.start(layout.hospital.config_path)
    processes.start(layout.lab.config_path)
    assert get(port, "/health/ready") == (200, "ready\n")
    samples = wait_scrape(port, "the spool's size", lambda s: value(s, "medgw_spool_bytes"))
    size = value(samples, "medgw_spool_bytes")
    assert size is not None and size > 1 << 20  # pg_database_size: MiBs

    postgres_server.stop("immediate")
    try:
        wait_for_events(layout.hospital.audit_log, "spool.unreachable")
        status, text = get(port, "/health/ready")
        assert status == 503, text
        assert f"the spool {spool.where} is unreachable: " in text
        assert "(fix: check that the PostgreSQL server is running" in text
        assert value(scrape(port), "medgw_ready") == 0
        drop_documents(layout)
        wait_until(lambda: len(refusals(hospital)) >= DOCUMENTS, 120, "documents refused")
        status, text = get(port, "/health/ready")
        assert status == 503 and "is unreachable" in text
        assert "could not be stored" not in text  # said once, by its cause
    finally:
        postgres_server.start()
    wait_for_events(layout.hospital.audit_log, "spool.reachable", timeout=120)
    assert get(port, "/health/ready") == (200, "ready\n")
    assert value(scrape(port), "medgw_ready") == 1
    wait_for_events(layout.hospital.audit_log, "message.delivered", count=DOCUMENTS)


def test_a_node_is_ready_again_when_its_database_answers_whatever_its_back_off(
    layout: DemoLayout, processes: Processes, postgres_server: PostgresServer
) -> None:
    """While the database is down, the node's loops try it again after a back-off that
    grows to half a minute; its watch tries it every second (gateway.daemon.spoolwatch).
    The database back, the node is ready again (its health page, which a load balancer
    reads) without waiting for its loops; the nodes of a cluster come back together."""
    with layout.hospital.config_path.open("a") as config:
        config.write(spool_section(postgres_server.new_database()))
    port = with_metrics(layout.hospital)
    hospital = processes.start(layout.hospital.config_path)
    postgres_server.stop("immediate")
    try:
        hospital.wait_for(lambda line: backed_off(line) >= 8, 120)  # a loop told to wait
        assert get(port, "/health/ready")[0] == 503
    finally:
        postgres_server.start()
    wait_until(lambda: get(port, "/health/ready") == (200, "ready\n"), 120, "ready again")
    [back] = wait_for_events(layout.hospital.audit_log, "spool.reachable")
    assert back["detail"]["refused"] == 0


def backed_off(line: dict[str, Any]) -> int:
    """The seconds a log line says the node waits before it tries the database again."""
    found = re.search(r"tries again by itself \(next in (\d+) s\)", str(line.get("error", "")))
    return int(found.group(1)) if found else 0
