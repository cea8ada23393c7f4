"""Hand-overs that run out of attempts, and the operator's ``medgw handover`` commands,
on real daemons and a real little HTTP server as the internal system."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import http.server
import io
import json
import random
import sqlite3
import threading
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from gateway.audit.log import AuditLog
from gateway.clock import SystemClock
from gateway.config import load_config
from gateway.delivery.http import HandOver, idempotency_key
from gateway.demo_run import drop_file, read_audit, wait_until
from gateway.egress import Network
from gateway.errors import SpoolError
from gateway.logs import make_logger
from gateway.operations import Operations
from gateway.pki.demo import DemoLayout
from gateway.spool import HandoverState, SqliteSpool
from tests.cli import medgw
from tests.clocks import SetClock
from tests.helpers.audit import events, wait_for_events
from tests.helpers.demo import set_runtime
from tests.helpers.internal_system import InternalSystem, enable_delivery


@pytest.mark.long
def test_an_exhausted_hand_over_fails_and_an_operator_retry_hands_it_over_once(
    layout: DemoLayout, processes: Any, internal_port: int
) -> None:
    enable_delivery(layout, internal_port)  # the internal system is down: nothing listens
    config_path = layout.hospital.config_path
    set_runtime(config_path, "max_attempts", "3")
    set_runtime(config_path, "retry_initial_seconds", "0.2")
    set_runtime(config_path, "retry_max_seconds", "1")
    config = str(config_path)
    processes.start(config_path)
    processes.start(layout.lab.config_path)
    drop_file(layout.lab.outbox_for("hospital"), "doc.hl7", b"MSH|doc\r")

    [gave_up] = wait_for_events(
        layout.hospital.audit_log,
        "message.handover_failed",
        where=lambda e: e["detail"].get("final"),
    )
    message_id = gave_up["message_id"]
    assert gave_up["severity"] == "alert" and gave_up["outcome"] == "failure"
    assert gave_up["detail"]["host"] == "127.0.0.1"
    assert gave_up["detail"]["inbox_file"].endswith("/lab/doc.hl7")
    assert gave_up["detail"]["attempt"] == 3
    assert "ClientConnector" in gave_up["detail"]["last_error"]
    assert "gave up after 3 attempts" in gave_up["reason"]
    assert "max_attempts" in gave_up["reason"] and "not retried" in gave_up["reason"]
    failures = events(layout.hospital.audit_log, "message.handover_failed")
    assert len(failures) == 3  # two retried, one final

    system = InternalSystem(internal_port)  # the internal system is back
    try:
        listed = medgw("handover", "list", "--state", "failed", "--json", "--config", config)
        assert listed.returncode == 0, listed.stderr
        [row] = json.loads(listed.stdout)
        assert (row["message_id"], row["state"], row["attempts"]) == (message_id, "failed", 3)
        assert row["peer"] == "lab" and "gave up after 3 attempts" in row["last_error"]
        table = medgw("handover", "list", "--state", "failed", "--config", config)
        assert message_id in table.stdout and "doc.hl7" in table.stdout
        assert "last error: gave up after 3 attempts" in table.stdout
        pending = medgw("handover", "list", "--state", "pending", "--config", config)
        assert pending.stdout.strip() == "no hand-overs"
        # Failed is final: not tried again by itself, though the system is up.
        time.sleep(6)
        assert system.requests == []

        retried = medgw("handover", "retry", message_id, "--config", config)
        assert retried.returncode == 0, retried.stderr
        assert f"{message_id}: hand-over retry requested, now pending" in retried.stdout
        wait_until(system.ok, 30, "the hand-over after the operator's retry")
        [handed] = wait_for_events(layout.hospital.audit_log, "message.handed_over")
        assert handed["message_id"] == message_id and handed["detail"]["attempt"] == 1
        [(path, headers, body, _)] = system.ok()
        assert path == "/inbound" and body == b"MSH|doc\r"
        assert headers["Idempotency-Key"] == idempotency_key("lab", message_id)
        [audited] = wait_for_events(layout.hospital.audit_log, "message.handover_retried")
        assert audited["message_id"] == message_id and audited["severity"] == "warning"
        assert audited["detail"]["previous_state"] == "failed"
        assert "(uid " in audited["actor"]

        done = medgw("handover", "list", "--state", "done", "--json", "--config", config)
        [row] = json.loads(done.stdout)
        assert (row["state"], row["attempts"], row["last_error"]) == ("done", 1, None)

        again = medgw("handover", "retry", message_id, "--config", config)
        assert again.returncode == 1
        assert f"the hand-over of message {message_id} is done" in again.stderr
        assert "only a failed hand-over can be retried" in again.stderr
        unknown = medgw("handover", "retry", "<nope@x>", "--config", config)
        assert unknown.returncode == 1 and "no hand-over of message <nope@x>" in unknown.stderr
        assert "medgw handover list" in unknown.stderr
        bad = medgw("handover", "list", "--state", "lost", "--config", config)
        assert bad.returncode == 2 and "pending" in bad.stderr
        time.sleep(1)
        assert len(system.requests) == 1  # handed over exactly once
    finally:
        system.close()


def test_a_hand_over_older_than_message_expiry_fails_at_its_next_failed_attempt(
    layout: DemoLayout, tmp_path: Path, internal_port: int
) -> None:
    """message_expiry_seconds (3600 in the demo) counts from arrival, then from a retry."""
    enable_delivery(layout, internal_port)  # nothing listens there
    config = load_config(layout.hospital.config_path)
    now = datetime.now(UTC)
    spool = SqliteSpool(tmp_path / "spool.sqlite3", SetClock(now - timedelta(hours=2)))
    inbox_file = tmp_path / "a.hl7"
    inbox_file.write_bytes(b"MSH|a\r")
    sha = hashlib.sha256(b"MSH|a\r").hexdigest()
    audit = AuditLog(tmp_path / "audit.jsonl", SystemClock(), node="hospital")
    worker = HandOver(
        spool, lambda: audit, make_logger(stream=io.StringIO()), SystemClock(),
        lambda: config, random.Random(1), Network.fixed(config.network_map).internal(),
    )  # fmt: skip

    async def attempt() -> None:
        [record] = spool.handover_due(now.timestamp() + 1)
        async with worker.session() as session:
            await worker.hand_over(session, record)

    try:
        for message_id in ("<old@x>", "<retried@x>"):
            spool.inbound_begin("lab", message_id, sha, inbox_file)
            spool.inbound_delivered("lab", message_id, [], b"mdn", handover=("x/y", 6))
            asyncio.run(attempt())
            record = spool.handover_get("lab", message_id)
            assert record is not None and record.state.value == "failed"
            assert record.attempts == 1 and "gave up after 1 attempt " in str(record.last_error)
        # After an operator's retry the expiry runs from the retry: a failure is retried.
        operations = Operations(config, spool, audit, SystemClock())
        operations.handover_retry("<retried@x>", "alice (uid 1000)")
        asyncio.run(attempt())
        record = spool.handover_get("lab", "<retried@x>")
        assert record is not None and record.state.value == "pending" and record.attempts == 1
        with pytest.raises(SpoolError, match="is pending; only a failed hand-over"):
            operations.handover_retry("<retried@x>", "alice (uid 1000)")
        [expired] = [
            e
            for e in read_audit(tmp_path / "audit.jsonl")
            if e["detail"].get("final") and e["message_id"] == "<old@x>"
        ]
        assert expired["detail"]["host"] == "127.0.0.1" and expired["severity"] == "alert"
    finally:
        spool.close()
        audit.close()


def test_an_old_hand_over_table_gains_its_expiry_column(tmp_path: Path) -> None:
    path = tmp_path / "spool.sqlite3"
    SqliteSpool(path, SystemClock()).close()
    with sqlite3.connect(path) as db:  # what a spool from before expiry looks like
        db.execute("DROP TRIGGER handover_displaced_owed")  # (nor had it triggers)
        db.execute("ALTER TABLE handover DROP COLUMN expires_at")
        db.execute(
            "INSERT INTO handover (peer, message_id, path, content_type, sha256, size, state,"
            " created_at, updated_at) VALUES ('lab', '<m@x>', '/i/a', 'x/y', 'ab', 1, 'failed',"
            " 't', 't')"
        )
    spool = SqliteSpool(path, SystemClock())
    try:
        [record] = spool.handover_list(state=HandoverState.FAILED)
        assert record.expires_at == 0.0
        retried = spool.handover_operator_retry("lab", "<m@x>", "alice", 123.0)
        assert (retried.state.value, retried.expires_at, retried.attempts) == ("pending", 123.0, 0)
    finally:
        spool.close()


class _EndlessAnswer:
    """An internal system that takes the document and answers 200 with a body that never
    ends (a misbehaving proxy, a debug endpoint echoing forever)."""

    def __init__(self, port: int) -> None:
        self.posts = 0
        system = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_POST(self) -> None:
                self.rfile.read(int(self.headers["Content-Length"]))
                system.posts += 1
                self.send_response(200)
                self.send_header("Transfer-Encoding", "chunked")
                self.end_headers()
                chunk = b"x" * 65536
                with contextlib.suppress(OSError):  # until the gateway hangs up
                    while True:
                        self.wfile.write(b"%x\r\n%s\r\n" % (len(chunk), chunk))

            def log_message(self, *args: Any) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", port), Handler)
        self.server.daemon_threads = True
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def test_an_answer_that_never_ends_is_read_only_up_to_a_bound(
    layout: DemoLayout, tmp_path: Path, internal_port: int
) -> None:
    """The internal system's 2xx is what counts; its body is read up to MAX_ANSWER_BYTES and
    no further: an endless one neither holds the hand-over until its timeout nor fills the
    gateway's memory."""
    enable_delivery(layout, internal_port)
    system = _EndlessAnswer(internal_port)
    config = load_config(layout.hospital.config_path)
    spool = SqliteSpool(tmp_path / "spool.sqlite3", SystemClock())
    inbox_file = tmp_path / "a.hl7"
    inbox_file.write_bytes(b"MSH|a\r")
    audit = AuditLog(tmp_path / "audit.jsonl", SystemClock(), node="hospital")
    worker = HandOver(
        spool, lambda: audit, make_logger(stream=io.StringIO()), SystemClock(),
        lambda: config, random.Random(1), Network.fixed(config.network_map).internal(),
    )  # fmt: skip

    async def attempt() -> float:
        [record] = spool.handover_due(time.time() + 1)
        async with worker.session() as session:
            return await worker.hand_over(session, record)

    try:
        sha = hashlib.sha256(b"MSH|a\r").hexdigest()
        spool.inbound_begin("lab", "<endless@x>", sha, inbox_file)
        spool.inbound_delivered("lab", "<endless@x>", [], b"mdn", handover=("x/y", 6))
        assert asyncio.run(attempt()) == 0.0
        record = spool.handover_get("lab", "<endless@x>")
        assert record is not None and record.state.value == "done", record
        assert system.posts == 1
        [handed] = [
            e for e in read_audit(tmp_path / "audit.jsonl") if e["event"] == "message.handed_over"
        ]
        assert handed["message_id"] == "<endless@x>"
    finally:
        system.close()
        spool.close()
        audit.close()
