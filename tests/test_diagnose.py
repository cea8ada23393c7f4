"""``medgw diagnose``: real daemons, real mutual TLS on 127.0.0.1; one test per NET-6 case.

The lab diagnoses its path to the hospital; each test breaks one segment and
checks that exactly that step fails, with a meaning an administrator can act on.
"""

from __future__ import annotations

import contextlib
import http.server
import re
import socket
import ssl
import subprocess
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from gateway.config import load_config
from gateway.demo_run import wait_until
from gateway.diagnose import Diagnoser, Status
from gateway.pki.demo import DemoInstitution, DemoLayout
from gateway.pki.issue import Issued, issue, make_ca, make_crl, write_pem
from tests import as2client
from tests.cli import medgw
from tests.clocks import SetClock
from tests.helpers.audit import events, wait_for_events
from tests.helpers.demo import demo_ca, lab_post
from tests.helpers.diagnose import diagnose, failure_at, steps


def inbox(layout: DemoLayout) -> list[Path]:
    folder = layout.hospital.inbox_dir / "lab"
    return sorted(folder.glob("*")) if folder.exists() else []


def set_key(toml: Path, key: str, value: str) -> None:
    """Replace the line ``key = ...`` of a config file (which must have one)."""
    text = toml.read_text()
    new, count = re.subn(rf"(?m)^{key} = .*$", lambda _: f"{key} = {value}", text)
    assert count == 1, f"{key} not in {toml}"
    toml.write_text(new)


def write_cert(folder: Path, name: str, issued: Issued) -> Path:
    write_pem(folder / f"{name}.crt", issued.certificate)
    write_pem(folder / f"{name}.key", issued.key)
    (folder / f"{name}.key").chmod(0o600)
    return folder / f"{name}.crt"


def pin(site: DemoInstitution, peer: str, key: str, name: str, issued: Issued) -> None:
    """``site`` expects ``peer``'s ``key`` (tls_certificates, ...) to be ``issued`` alone,
    kept as certs/peers/<peer>/<name>."""
    write_pem(site.root / "certs" / "peers" / peer / name, issued.certificate)
    set_key(site.root / "peers.d" / f"{peer}.toml", key, f'["certs/peers/{peer}/{name}"]')


# -- the path works ------------------------------------------------------------------


def test_all_steps_pass_and_the_probe_is_audited_not_delivered(layout, processes):
    processes.start(layout.hospital.config_path)
    code, report = diagnose(layout)
    assert code == 0, report
    assert report["ok"] and report["failed_step"] is None
    assert [s["status"] for s in report["steps"]] == ["ok"] * 5
    by_name = steps(report)
    assert "TLSv1.3" in by_name["tls"]["detail"] and "accepted ours" in by_name["tls"]["detail"]
    assert "processed, MIC matches" in by_name["as2"]["detail"]
    probes = wait_for_events(layout.hospital.audit_log, "probe.received")
    assert len(probes) == 1 and probes[0]["peer"] == "lab"
    assert probes[0]["message_id"] in by_name["as2"]["detail"]
    assert re.fullmatch(r"medgw-diagnose-\d{8}T\d{6}Z\.txt", probes[0]["detail"]["filename"])
    # Verified and answered, but never delivered: nothing in the inbox, no delivery event.
    assert inbox(layout) == []
    assert events(layout.hospital.audit_log, "message.delivered") == []
    assert events(layout.hospital.audit_log, "message.received") == []
    # Diagnosing a healthy peer leaves no false alarm in its audit trail.
    assert events(layout.hospital.audit_log, "tls.handshake_failed") == []

    text = medgw("diagnose", "hospital", "--config", str(layout.lab.config_path))
    assert text.returncode == 0
    assert text.stdout.count("[ ok ]") == 5 and "What it means" not in text.stdout


def test_the_probe_header_alone_never_diverts_a_real_document(layout, processes):
    """Only a small medgw-diagnose-*.txt is a probe; any other document is delivered."""
    processes.start(layout.hospital.config_path)
    lab = load_config(layout.lab.config_path)
    recipient = lab.require_peer("hospital").encryption_certificates[0]
    documents = {
        "result.hl7": b"MSH|^~\\&|real document\r",
        "medgw-diagnose-20260101T000000Z.txt": b"x" * 5000,  # probe name, but too large
    }
    for name, payload in documents.items():
        built = as2client.build(
            payload,
            sender_as2="KITA-LAB",
            receiver_as2="SAKURA-HOSPITAL",
            signing=lab.smime.signing,
            recipient=recipient,
            filename=name,
        )
        answer = lab_post(layout, (*built.headers, ("X-Medgw-Probe", "1")), built.body)
        assert answer.status == 200
    assert {p.name: p.read_bytes() for p in inbox(layout)} == documents
    assert events(layout.hospital.audit_log, "probe.received") == []


# -- name resolution and TCP --------------------------------------------------------


def test_unresolvable_name_fails_at_name_resolution(layout):
    peer_file = layout.lab.root / "peers.d" / "hospital.toml"
    set_key(peer_file, "url", '"https://no-such-gateway.invalid:18443/as2"')
    failed = failure_at(layout, "resolve")
    assert "no-such-gateway.invalid" in failed["detail"]
    assert "peers.d/hospital.toml" in failed["action"]


def test_name_resolving_outside_the_zones_egress_fails_at_name_resolution(layout, processes):
    # The hospital's name resolves to 127.0.0.1, but its zone is a network the gateway
    # reaches only within 10.0.0.0/8: the daemon does not connect there.
    now = datetime.now(UTC)
    tls = issue(
        demo_ca(layout), "SAKURA-HOSPITAL", purpose="tls", now=now,
        dns_names=["localhost"], ip_addresses=["127.0.0.1"],
    )  # fmt: skip
    write_cert(layout.hospital.root / "certs", "tls", tls)
    write_pem(layout.lab.root / "certs" / "peers" / "hospital" / "tls.crt", tls.certificate)
    set_key(
        layout.lab.root / "peers.d" / "hospital.toml",
        "url",
        f'"https://localhost:{layout.hospital.port}/as2"',
    )
    set_key(layout.lab.config_path, "egress", '["10.0.0.0/8"]')
    processes.start(layout.hospital.config_path)
    failed = failure_at(layout, "resolve")
    assert "none inside the egress of zone 'loopback' (10.0.0.0/8)" in failed["detail"]
    assert "getent hosts localhost" in failed["action"]


def test_peer_down_fails_at_tcp_connect_with_refused(layout):
    failed = failure_at(layout, "tcp")  # the hospital's gateway is not started
    assert "connection refused" in failed["detail"]
    assert "not running" in failed["meaning"]
    assert "retried" in failed["action"]

    text = medgw("diagnose", "hospital", "--config", str(layout.lab.config_path))
    assert text.returncode == 1
    lines = text.stdout.splitlines()
    assert lines[1].startswith("[ ok ] 1 name resolution")
    assert lines[2].startswith("[FAIL] 2 TCP connect")
    assert all(line.startswith("[skip]") for line in lines[3:6])
    assert any(line.startswith("What it means: ") for line in lines)
    assert any(line.startswith("What to do: ") for line in lines)


def test_diagnose_leaves_from_the_zones_source_address(layout, processes):
    # The daemon sends to the hospital from its zone's source address; a peer's
    # firewall lets only that one through, so diagnose must test that path too.
    set_key(layout.lab.config_path, "source_address", '"127.0.0.2"')
    processes.start(layout.hospital.config_path)
    code, report = diagnose(layout)
    assert code == 0, report
    probes = wait_for_events(layout.hospital.audit_log, "probe.received")
    assert [p["remote_address"] for p in probes] == ["127.0.0.2"]


def test_unusable_source_address_fails_at_tcp_connect(layout, processes):
    set_key(layout.lab.config_path, "source_address", '"192.0.2.1"')  # on no interface here
    processes.start(layout.hospital.config_path)
    failed = failure_at(layout, "tcp")
    assert "cannot send from 192.0.2.1" in failed["detail"]
    assert "source_address" in failed["action"] and "'loopback'" in failed["action"]


# -- TLS: who rejected whom ---------------------------------------------------------


def test_peer_certificate_not_pinned_is_we_rejected(layout, processes):
    # The lab expects another certificate from the hospital (from the same CA).
    other = issue(
        demo_ca(layout), "SAKURA-HOSPITAL", purpose="tls", now=datetime.now(UTC),
        ip_addresses=["127.0.0.1"],
    )  # fmt: skip
    pin(layout.lab, "hospital", "tls_certificates", "other-tls.crt", other)
    processes.start(layout.hospital.config_path)
    failed = failure_at(layout, "tls")
    assert failed["detail"].startswith("we rejected the peer's certificate: not pinned")
    assert "tls_certificates" in failed["detail"]
    assert "CN=SAKURA-HOSPITAL" in failed["meaning"]  # what it presented, for the phone call
    assert "fingerprint" in failed["action"]


def test_peer_certificate_from_unknown_ca_is_we_rejected(layout, processes):
    now = datetime.now(UTC)
    rogue = issue(
        make_ca("Rogue CA", now=now), "SAKURA-HOSPITAL", purpose="tls", now=now,
        ip_addresses=["127.0.0.1"],
    )  # fmt: skip
    write_cert(layout.hospital.root / "certs", "tls", rogue)  # the hospital now presents it
    processes.start(layout.hospital.config_path)
    failed = failure_at(layout, "tls")
    assert failed["detail"].startswith("we rejected the peer's certificate")
    assert "trust_anchors" in failed["meaning"] and "Rogue CA" in failed["meaning"]


def test_peer_does_not_accept_our_certificate_is_peer_rejected(layout, processes):
    # The hospital lists another certificate for the lab, so ours is refused: medgw's
    # listener answers with the bad_certificate alert, as a standard TLS server does.
    other = issue(
        demo_ca(layout), "KITA-LAB", purpose="tls", now=datetime.now(UTC),
        ip_addresses=["127.0.0.1"],
    )  # fmt: skip
    pin(layout.hospital, "lab", "tls_certificates", "other-tls.crt", other)
    processes.start(layout.hospital.config_path)
    failed = failure_at(layout, "tls")
    assert failed["detail"].startswith("the peer rejected our certificate: TLS alert")
    assert "bad certificate" in failed["detail"]
    assert "rejected our TLS certificate" in failed["meaning"]
    assert "KITA-LAB" in failed["action"] and "sha256" in failed["action"]
    # And the hospital's audit trail says the same from its side.
    wait_for_events(layout.hospital.audit_log, "tls.handshake_failed")


def rogue_lab_identity(layout: DemoLayout, tmp_path: Path) -> None:
    """The lab presents a certificate from a CA the hospital does not know; the lab
    trusts both CAs, so its own check of the hospital's certificate still passes."""
    now = datetime.now(UTC)
    rogue_ca = make_ca("Rogue CA", now=now)
    rogue = issue(rogue_ca, "KITA-LAB", purpose="tls", now=now, ip_addresses=["127.0.0.1"])
    write_cert(layout.lab.root / "certs", "tls", rogue)
    write_pem(tmp_path / "rogue-ca.crt", rogue_ca.certificate)
    set_key(
        layout.lab.config_path,
        "trust_anchors",
        f'["certs/trust/loopback.crt", "{tmp_path / "rogue-ca.crt"}"]',
    )


def test_peer_that_does_not_trust_our_ca_rejects_ours(layout, processes, tmp_path):
    rogue_lab_identity(layout, tmp_path)
    processes.start(layout.hospital.config_path)
    failed = failure_at(layout, "tls")
    assert failed["detail"].startswith("the peer rejected our certificate: TLS alert")
    assert "unknown ca" in failed["detail"]  # medgw's listener says why, as openssl does
    assert "does not trust the CA that issued our TLS certificate" in failed["meaning"]


@contextmanager
def openssl_server(port: int, *args: str) -> Iterator[None]:
    """``openssl s_server``: a TLS server nobody here wrote, which sends real TLS alerts."""
    proc = subprocess.Popen(
        ["openssl", "s_server", "-accept", f"127.0.0.1:{port}", "-www", *args],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )

    def listening() -> bool:
        with socket.socket() as probe:
            return probe.connect_ex(("127.0.0.1", port)) == 0

    try:
        wait_until(listening, 30, "openssl s_server to listen")
        yield
    finally:
        proc.kill()
        proc.wait()


def test_tls_alert_from_the_peer_is_named_peer_rejected_ours(layout, tmp_path):
    rogue_lab_identity(layout, tmp_path)
    certs = layout.hospital.root / "certs"
    with openssl_server(
        layout.hospital.port,
        *("-cert", str(certs / "tls.crt"), "-key", str(certs / "tls.key")),
        *("-CAfile", str(layout.ca_certificate), "-Verify", "1", "-verify_return_error"),
    ):
        failed = failure_at(layout, "tls")
    assert failed["detail"].startswith("the peer rejected our certificate: TLS alert")
    assert "unknown ca" in failed["detail"]
    assert failed["meaning"].startswith("the peer does not trust the CA")


def test_no_common_tls_version_is_a_protocol_mismatch(layout):
    certs = layout.hospital.root / "certs"
    with openssl_server(
        layout.hospital.port,
        *("-cert", str(certs / "tls.crt"), "-key", str(certs / "tls.key"), "-tls1_2"),
    ):
        failed = failure_at(layout, "tls")
    assert failed["detail"].startswith("no common TLS protocol or cipher")
    assert "protocol version" in failed["detail"]
    assert 'min_version = "1.2"' in failed["action"]


def test_plain_http_server_is_named_not_tls(layout):
    class Handler(http.server.BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            self.send_response(200)
            self.end_headers()

        def log_message(self, *args: Any) -> None:
            pass

    server = http.server.HTTPServer(("127.0.0.1", layout.hospital.port), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        failed = failure_at(layout, "tls")
    finally:
        server.shutdown()
        server.server_close()
    assert "does not speak TLS" in failed["detail"]
    assert "plain HTTP" in failed["meaning"]
    # Lowering our TLS version would not help, and is not what to do.
    assert "min_version" not in failed["action"]
    assert "`url` in peers.d/hospital.toml" in failed["action"]


# -- certificates -------------------------------------------------------------------


def test_expired_peer_certificate_fails_at_certificate_validity(layout, processes):
    past = datetime.now(UTC) - timedelta(days=400)
    expired = issue(demo_ca(layout), "SAKURA-HOSPITAL", purpose="smime-encrypt", now=past, days=30)
    pin(layout.lab, "hospital", "encryption_certificates", "expired-encrypt.crt", expired)
    processes.start(layout.hospital.config_path)
    failed = failure_at(layout, "certificates")
    assert "peer's encryption certificate" in failed["detail"] and "expired on" in failed["detail"]
    assert "encryption_certificates in peers.d/hospital.toml" in failed["action"]


def test_revoked_peer_certificate_fails_at_certificate_validity(layout, processes):
    # The hospital's CA revoked its TLS certificate; the lab's CRL says so, and the
    # lab's gateway refuses the certificate, so the exchange cannot work.
    hospital_tls = x509.load_pem_x509_certificate(
        (layout.lab.root / "certs" / "peers" / "hospital" / "tls.crt").read_bytes()
    )
    now = datetime.now(UTC)
    crl = make_crl(
        demo_ca(layout),
        now=now - timedelta(hours=1),
        revoked=[(hospital_tls.serial_number, now - timedelta(minutes=30))],
    )
    (layout.lab.root / "certs" / "crls" / "loopback" / "ca.crl").write_bytes(
        crl.public_bytes(serialization.Encoding.PEM)
    )
    processes.start(layout.hospital.config_path)
    failed = failure_at(layout, "certificates")
    assert "peer's TLS certificate CN=SAKURA-HOSPITAL" in failed["detail"]
    assert "revoked" in failed["detail"] and "revoked" in failed["meaning"]
    assert "tls_certificates in peers.d/hospital.toml" in failed["action"]


def test_certificate_step_follows_the_injected_clock(layout):
    config = load_config(layout.lab.config_path)
    peer = config.require_peer("hospital")
    issued = config.tls.identity.certificate.not_valid_before_utc
    expires = config.tls.identity.certificate.not_valid_after_utc

    def at(when: datetime):
        return Diagnoser(config, peer, SetClock(when)).certificates()

    assert at(issued + timedelta(days=1)).status is Status.OK
    soon = at(expires - timedelta(days=10))
    assert soon.status is Status.WARN and soon.ok
    assert "expires in 10 day(s)" in soon.detail
    early = at(issued - timedelta(days=1))
    assert early.status is Status.FAIL and "not valid before" in early.detail
    late = at(expires + timedelta(days=1))
    assert late.status is Status.FAIL and "expired on" in late.detail
    assert "our TLS certificate" in late.detail and "get a new certificate" in late.action


# -- the AS2 test message and its receipt ----------------------------------------------


def test_wrong_encryption_certificate_is_decryption_failed(layout, processes):
    # The lab encrypts for a certificate whose key the hospital does not have.
    stranger = issue(
        demo_ca(layout), "SAKURA-HOSPITAL", purpose="smime-encrypt", now=datetime.now(UTC)
    )
    folder = layout.lab.root / "certs" / "peers" / "hospital"
    write_pem(folder / "wrong-encrypt.crt", stranger.certificate)
    set_key(
        layout.lab.root / "peers.d" / "hospital.toml",
        "encryption_certificates",
        '["certs/peers/hospital/wrong-encrypt.crt"]',
    )
    processes.start(layout.hospital.config_path)
    failed = failure_at(layout, "as2")
    assert "decryption-failed" in failed["detail"]
    assert failed["meaning"].startswith("the peer cannot decrypt")
    assert "peers.d/hospital.toml encryption_certificates" in failed["meaning"]
    wait_for_events(layout.hospital.audit_log, "decryption.failed")
    assert inbox(layout) == []


def test_peer_distrusting_our_signing_certificate_is_authentication_failed(layout, processes):
    other = issue(demo_ca(layout), "KITA-LAB", purpose="smime-sign", now=datetime.now(UTC))
    write_pem(
        layout.hospital.root / "certs" / "peers" / "lab" / "other-sign.crt", other.certificate
    )
    set_key(
        layout.hospital.root / "peers.d" / "lab.toml",
        "signing_certificates",
        '["certs/peers/lab/other-sign.crt"]',
    )
    processes.start(layout.hospital.config_path)
    failed = failure_at(layout, "as2")
    assert "authentication-failed" in failed["detail"]
    assert "does not accept us as the sender" in failed["meaning"]
    assert "signing certificate" in failed["action"]
    wait_for_events(layout.hospital.audit_log, "signature.failed")


def test_peer_suspended_us_is_503_suspended_by_the_peer(layout, processes):
    processes.start(layout.hospital.config_path)
    hospital = str(layout.hospital.config_path)
    suspended = medgw("peers", "suspend", "lab", "--reason", "x", "--config", hospital)
    assert suspended.returncode == 0, suspended.stderr
    failed = failure_at(layout, "as2")
    assert "HTTP 503" in failed["detail"]
    assert "suspended by the peer" in failed["meaning"]
    assert "resume" in failed["action"]
    wait_for_events(layout.hospital.audit_log, "peer.suspended_refusal")

    # Resumed, the same path passes again.
    assert medgw("peers", "resume", "lab", "--config", hospital).returncode == 0
    assert diagnose(layout)[0] == 0


def test_our_own_suspension_of_the_peer_is_said_even_when_the_path_works(layout, processes):
    """At 3 a.m. "why is nothing sent?": the path works, but we suspended the exchange."""
    processes.start(layout.hospital.config_path)
    processes.start(layout.lab.config_path)
    lab = str(layout.lab.config_path)
    suspended = medgw("peers", "suspend", "hospital", "--reason", "planned work", "--config", lab)
    assert suspended.returncode == 0, suspended.stderr
    code, report = diagnose(layout)
    assert code == 0 and report["ok"]  # the path itself works
    assert report["suspended_here"]["reason"] == "planned work"
    text = medgw("diagnose", "hospital", "--config", lab)
    assert "is suspended here" in text.stdout and "medgw peers resume hospital" in text.stdout
    assert "works, but is suspended here" in text.stdout
    assert medgw("peers", "resume", "hospital", "--config", lab).returncode == 0
    code, report = diagnose(layout)
    assert code == 0 and report["suspended_here"] is None


# -- usage --------------------------------------------------------------------------


def test_unknown_peer_is_a_usage_error_naming_the_configured_peers(layout):
    result = medgw("diagnose", "nobody", "--config", str(layout.lab.config_path))
    assert result.returncode == 2
    assert "'nobody'" in result.stderr and "hospital" in result.stderr


def test_help_says_what_other_as2_products_do_with_the_probe():
    result = medgw("diagnose", "--help")
    assert result.returncode == 0
    text = " ".join(result.stdout.split())
    assert "X-Medgw-Probe: 1" in text and "Other AS2 products deliver the file" in text


def test_a_peer_silent_after_the_handshake_is_named_hung_without_a_long_wait(layout):
    """A gateway that completes the TLS handshake and then reads nothing (hung, or
    overloaded): the step says so after connect_timeout_seconds, and diagnose does not
    then sit out TLS's own 30-second wait for the peer's goodbye (close_notify)."""
    certs = layout.hospital.root / "certs"
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(certs / "tls.crt", certs / "tls.key")
    listener = socket.create_server(("127.0.0.1", layout.hospital.port))
    held: list[ssl.SSLSocket] = []

    def serve() -> None:
        with contextlib.suppress(OSError):
            while True:
                conn, _ = listener.accept()
                tls = context.wrap_socket(conn, server_side=True)  # handshake, then silence
                held.append(tls)

    threading.Thread(target=serve, daemon=True).start()
    set_key(layout.lab.config_path, "connect_timeout_seconds", "1")
    try:
        started = time.monotonic()
        failed = failure_at(layout, "tls")
        took = time.monotonic() - started
    finally:
        listener.close()
        for tls in held:
            tls.close()
    assert "handshake done, but no HTTP answer within 1 s" in failed["detail"]
    assert "hung" in failed["meaning"]
    assert took < 20, f"diagnose took {took:.0f} s"  # was over 30 s
