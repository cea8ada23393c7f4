"""Hand-over to an internal system over https://, verified against ``[delivery] ca``:
a DER or a PEM CA file both work, on real daemons and a real little HTTPS server."""

from __future__ import annotations

import asyncio
import hashlib
import http.server
import io
import random
import ssl
import threading
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.serialization import Encoding

from gateway.audit.log import AuditLog
from gateway.clock import SystemClock
from gateway.config import delivery as config_delivery
from gateway.config import load_config
from gateway.delivery import http as delivery_http
from gateway.delivery.http import HandOver, idempotency_key
from gateway.demo_run import drop_file, free_port, read_audit
from gateway.egress import Network
from gateway.errors import ConfigError
from gateway.logs import make_logger
from gateway.pki.demo import DemoLayout
from gateway.pki.issue import Issued, issue, make_ca, write_pem
from gateway.spool import SqliteSpool
from tests.cli import medgw
from tests.helpers.audit import events, wait_for_events


class HttpsInternalSystem:
    """A little HTTPS server on 127.0.0.1 that answers 200 to every POST."""

    def __init__(self, port: int, certificate: Path, key: Path) -> None:
        self.requests: list[tuple[str, dict[str, str], bytes]] = []
        self._lock = threading.Lock()
        system = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                with system._lock:
                    system.requests.append((self.path, dict(self.headers), body))
                self.send_response(200)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(certificate, key)
        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", port), Handler)
        self.server.socket = context.wrap_socket(self.server.socket, server_side=True)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def received(self) -> list[tuple[str, dict[str, str], bytes]]:
        with self._lock:
            return list(self.requests)

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def internal_ca() -> Issued:
    return make_ca("Internal Systems CA", now=datetime.now(UTC), organization="Sakura IT")


@pytest.fixture
def internal_tls(tmp_path: Path, internal_ca: Issued) -> tuple[Path, Path]:
    """The internal system's server certificate for 127.0.0.1, issued by ``internal_ca``."""
    leaf = issue(
        internal_ca,
        "ehr.internal",
        purpose="tls",
        now=datetime.now(UTC),
        ip_addresses=("127.0.0.1",),
    )
    certificate, key = tmp_path / "ehr.crt", tmp_path / "ehr.key"
    write_pem(certificate, leaf.certificate)
    write_pem(key, leaf.key)
    return certificate, key


def _https_delivery(layout: DemoLayout, port: int, ca: str) -> None:
    config = layout.hospital.config_path
    config.write_text(
        config.read_text()
        + f"""
[delivery]
http_url = "https://127.0.0.1:{port}/inbound"
ca = "{ca}"
timeout_seconds = 5
"""
    )


@pytest.mark.parametrize("encoding", ["der", "pem"])
def test_a_document_is_handed_over_over_https_verified_by_a_der_or_pem_ca_file(
    layout: DemoLayout,
    processes: Any,
    internal_ca: Issued,
    internal_tls: tuple[Path, Path],
    encoding: str,
) -> None:
    ca_file = layout.hospital.root / "certs" / f"internal-ca.{encoding}"
    ca_file.write_bytes(
        internal_ca.certificate.public_bytes(Encoding.DER if encoding == "der" else Encoding.PEM)
    )
    port = free_port()
    _https_delivery(layout, port, f"certs/internal-ca.{encoding}")
    checked = medgw("check-config", "--config", str(layout.hospital.config_path))
    assert checked.returncode == 0, checked.stdout + checked.stderr

    system = HttpsInternalSystem(port, *internal_tls)
    try:
        processes.start(layout.hospital.config_path)
        processes.start(layout.lab.config_path)
        drop_file(layout.lab.outbox_for("hospital"), "doc.hl7", b"MSH|tls\r")
        [handed] = wait_for_events(layout.hospital.audit_log, "message.handed_over")
        [(path, headers, body)] = system.received()
        assert path == "/inbound" and body == b"MSH|tls\r"
        assert headers["Idempotency-Key"] == idempotency_key("lab", handed["message_id"])
        assert handed["detail"]["attempt"] == 1
        assert events(layout.hospital.audit_log, "message.handover_failed") == []
        assert events(layout.hospital.audit_log, "daemon.task_failed") == []
    finally:
        system.close()


def test_a_ca_file_without_a_certificate_is_refused_at_load_naming_the_file(
    layout: DemoLayout,
) -> None:
    ca_file = layout.hospital.root / "certs" / "internal-ca.pem"
    ca_file.write_text("-----BEGIN NOTHING-----\n-----END NOTHING-----\n")
    _https_delivery(layout, free_port(), "certs/internal-ca.pem")
    with pytest.raises(ConfigError) as info:
        load_config(layout.hospital.config_path)
    problems = "\n".join(str(p) for p in info.value.problems)
    assert str(ca_file) in problems and "ca" in problems


def test_certificates_openssl_refuses_are_a_config_problem_not_a_hand_over_failure(
    layout: DemoLayout, internal_ca: Issued, monkeypatch: pytest.MonkeyPatch
) -> None:
    """load_config builds the hand-over's TLS context once, so that whatever would fail
    there is reported by check-config and at start, naming the file and the fix."""
    ca_file = layout.hospital.root / "certs" / "internal-ca.der"
    ca_file.write_bytes(internal_ca.certificate.public_bytes(Encoding.DER))
    _https_delivery(layout, free_port(), "certs/internal-ca.der")

    def refused(*args: Any, **kwargs: Any) -> ssl.SSLContext:
        raise ssl.SSLError(ssl.SSL_ERROR_SSL, "[X509] unsupported certificate")

    monkeypatch.setattr(config_delivery, "delivery_tls_context", refused)
    with pytest.raises(ConfigError) as info:
        load_config(layout.hospital.config_path)
    [problem] = [p for p in info.value.problems if str(ca_file) in str(p)]
    assert "cannot be used to verify an https:// internal system" in str(problem)
    assert "unsupported certificate" in str(problem)
    assert "PEM or DER" in problem.fix


def test_a_tls_context_that_cannot_be_built_fails_one_attempt_with_an_alert(
    layout: DemoLayout,
    tmp_path: Path,
    internal_ca: Issued,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Whatever the config check could not foresee: the attempt fails and is retried,
    the worker's loop goes on."""
    ca_file = layout.hospital.root / "certs" / "internal-ca.der"
    ca_file.write_bytes(internal_ca.certificate.public_bytes(Encoding.DER))
    _https_delivery(layout, free_port(), "certs/internal-ca.der")
    config = load_config(layout.hospital.config_path)

    def broken(*args: Any, **kwargs: Any) -> ssl.SSLContext:
        raise ssl.SSLError(ssl.SSL_ERROR_SSL, "[X509] no certificate or crl found")

    monkeypatch.setattr(delivery_http, "delivery_tls_context", broken)
    spool = SqliteSpool(tmp_path / "spool.sqlite3", SystemClock())
    inbox_file = tmp_path / "a.hl7"
    inbox_file.write_bytes(b"MSH|a\r")
    sha = hashlib.sha256(b"MSH|a\r").hexdigest()
    audit = AuditLog(tmp_path / "audit.jsonl", SystemClock(), node="hospital")
    worker = HandOver(
        spool, lambda: audit, make_logger(stream=io.StringIO()), SystemClock(),
        lambda: config, random.Random(1), Network.fixed(config.network_map).internal(),
    )  # fmt: skip

    async def attempt() -> float:
        [record] = spool.handover_due(datetime.now(UTC).timestamp() + 1)
        async with worker.session() as session:
            return await worker.hand_over(session, record)

    try:
        spool.inbound_begin("lab", "<m@x>", sha, inbox_file)
        spool.inbound_delivered("lab", "<m@x>", [], b"mdn", handover=("x/y", 6))
        assert asyncio.run(attempt()) > 0
        record = spool.handover_get("lab", "<m@x>")
        assert record is not None and record.state.value == "pending" and record.attempts == 1
        assert "no certificate or crl found" in str(record.last_error)
        audited = read_audit(tmp_path / "audit.jsonl")
        [alert] = [e for e in audited if e["event"] == "message.handover_failed"]
        assert alert["severity"] == "alert" and alert["outcome"] == "failure"
        assert str(ca_file) in alert["reason"]
    finally:
        spool.close()
        audit.close()
