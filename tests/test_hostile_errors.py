"""A broken or hostile peer's input is refused, audited, and never answered with a 500.

Two real gateways on 127.0.0.1; the hostile requests are sent by hand with the
lab's real TLS client certificate, as a configured peer gone bad would.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import os
import socket
import ssl
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from asn1crypto import cms
from cryptography import x509

from gateway.as2.headers import check_message_id
from gateway.as2.mdn import parse_receipt
from gateway.audit import DURABLE, AuditEvent, EventType, Pending
from gateway.clock import SystemClock
from gateway.cms import decrypt
from gateway.cms.decrypting import decrypt_bytes
from gateway.cms.smime import envelope_entity
from gateway.config import load_config
from gateway.demo_run import free_port, read_audit, wait_until
from gateway.errors import DecryptionError, PolicyError, ProtocolError
from gateway.fsutil import shared_folder
from gateway.httpfront import FrontDoor
from gateway.intake.api import new_token
from gateway.logs import make_logger
from gateway.pki.demo import DemoLayout
from gateway.policy import AlgorithmPolicy, certificate_key
from tests import as2client
from tests.helpers.audit import wait_for_events
from tests.helpers.demo import lab_post
from tests.helpers.openssl_cms import signed_by_openssl, unsupported_curve_signer
from tests.routes import zone_route


def _message(layout: DemoLayout, payload: bytes = b"MSH|hostile\r") -> Any:
    lab = load_config(layout.lab.config_path)
    return as2client.build(
        payload,
        sender_as2="KITA-LAB",
        receiver_as2="SAKURA-HOSPITAL",
        signing=lab.smime.signing,
        recipient=lab.require_peer("hospital").encryption_certificates[0],
    )


def _output(layout: DemoLayout, processes: Any) -> str:
    return "\n".join(processes.started[0].raw)


def test_message_signed_on_an_unsupported_curve_is_refused_not_a_500(
    layout: DemoLayout, processes: Any, tmp_path: Path
) -> None:
    processes.start(layout.hospital.config_path)
    cert, key = unsupported_curve_signer(tmp_path)
    signed = signed_by_openssl(tmp_path, cert, key, b"MSH|odd curve\r")
    lab = load_config(layout.lab.config_path)
    content_type, body = envelope_entity(
        signed,
        lab.require_peer("hospital").encryption_certificates,
        cipher="aes-256-gcm",
        policy=AlgorithmPolicy(),
    )
    reference = _message(layout)
    headers = tuple((k, content_type if k == "Content-Type" else v) for k, v in reference.headers)
    answer = lab_post(layout, headers, body)
    assert answer.status == 200, answer.body
    assert b"integrity-check-failed" in answer.body or b"authentication-failed" in answer.body
    [failed] = wait_for_events(layout.hospital.audit_log, "signature.failed")
    assert "1.3.132.0.16" in failed["reason"] and "not supported" in failed["reason"]
    assert "Traceback" not in _output(layout, processes)


def test_message_id_with_a_byte_that_is_not_utf8_is_a_400_every_time(
    layout: DemoLayout, processes: Any
) -> None:
    processes.start(layout.hospital.config_path)
    built = _message(layout)
    headers = tuple(
        (k, "<bad\xff@lab>" if k.lower() == "message-id" else v) for k, v in built.headers
    )
    for _ in range(2):  # the resend is refused the same way, not with a 500
        answer = lab_post(layout, headers, built.body)
        assert answer.status == 400, answer.body
        assert answer.body == b"bad request\n"
    wait_for_events(
        layout.hospital.audit_log,
        "message.rejected",
        where=lambda r: "message-id" in r["reason"].lower(),
        count=2,
    )
    assert "Traceback" not in _output(layout, processes)


def test_async_receipt_with_a_content_type_that_is_not_utf8_is_refused_and_audited(
    layout: DemoLayout, processes: Any
) -> None:
    processes.start(layout.hospital.config_path)
    headers = (
        ("AS2-Version", "1.2"),
        ("AS2-From", "KITA-LAB"),
        ("AS2-To", "SAKURA-HOSPITAL"),
        ("Message-ID", "<receipt-1@lab>"),
        ("Content-Type", 'multipart/signed; boundary="\xff"; protocol="pkcs7-signature"'),
    )
    answer = lab_post(layout, headers, b"--\xff--\r\n")
    assert answer.status < 500, answer.body
    [refused] = wait_for_events(layout.hospital.audit_log, "receipt.invalid")
    assert refused["peer"] == "lab"
    assert "Traceback" not in _output(layout, processes)


def test_a_synchronous_receipt_with_a_content_type_that_is_not_ascii_is_a_protocol_error() -> None:
    # aiohttp's client keeps a byte that is not UTF-8 as a lone surrogate, as its server does
    with pytest.raises(ProtocolError, match="not US-ASCII"):
        parse_receipt(
            'multipart/signed; boundary="\udcff"', b"", trusted_signers=(), policy=AlgorithmPolicy()
        )


@pytest.mark.parametrize("value", ["<a\udcff@b>", "<caf\u00e9@lab>", "<a\x7f@b>"])
def test_a_message_id_must_be_printable_ascii(value: str) -> None:
    with pytest.raises(ProtocolError, match="Message-ID"):
        check_message_id(value)
    assert check_message_id("<ok-1.2_3@lab.example>") == "<ok-1.2_3@lab.example>"


def test_a_certificate_on_an_unsupported_curve_is_a_policy_error(tmp_path: Path) -> None:
    cert_path, _ = unsupported_curve_signer(tmp_path)
    cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
    with pytest.raises(PolicyError, match=r"1\.3\.132\.0\.16 is not supported"):
        certificate_key(cert, "signature key")


def _altered_cbc(body: bytes, delta: int) -> bytes:
    """``body`` with the last byte of the second-to-last ciphertext block XORed with
    ``delta``: the last plaintext byte (the padding) changes by ``delta``, the block
    before it turns to noise."""
    ci = cms.ContentInfo.load(body)
    info = ci["content"]["encrypted_content_info"]
    ct = bytearray(info["encrypted_content"].native)
    ct[-17] ^= delta
    info["encrypted_content"] = bytes(ct)
    return bytes(ci.dump(force=True))


def test_cbc_padding_is_no_oracle(layout: DemoLayout, processes: Any) -> None:
    """Altered CBC content gets one answer and one audit event type whether or not its
    padding happens to be valid (before: decryption-failed for 15 of 16 values,
    integrity-check-failed for the one that made valid padding)."""
    _accept_cbc(layout)
    processes.start(layout.hospital.config_path)
    lab = load_config(layout.lab.config_path)
    hospital = load_config(layout.hospital.config_path)
    built = as2client.build(
        b"MSH|" + b"x" * 200 + b"\r",
        sender_as2="KITA-LAB",
        receiver_as2="SAKURA-HOSPITAL",
        signing=lab.smime.signing,
        recipient=lab.require_peer("hospital").encryption_certificates[0],
        cipher="aes-256-cbc",
    )
    plain = decrypt(
        built.body,
        hospital.smime.encryption.certificate,
        hospital.smime.encryption.key,
        policy=AlgorithmPolicy(),
    ).content
    ciphertext = cms.ContentInfo.load(built.body)["content"]["encrypted_content_info"]
    pad = len(ciphertext["encrypted_content"].native) - len(plain)
    assert 1 <= pad <= 16
    valid = pad ^ 0x01  # the last byte becomes 0x01: valid padding
    invalid = [d for d in (0x80, 0x40, 0x20, 0x10) if (pad ^ d) > 16]
    answers = {}
    for delta in (valid, *invalid):
        headers = tuple(
            (k, f"<cbc-{delta}@lab>" if k.lower() == "message-id" else v) for k, v in built.headers
        )
        answer = lab_post(layout, headers, _altered_cbc(built.body, delta))
        assert answer.status == 200, answer.body
        answers[delta] = _disposition(answer.body)
    assert set(answers.values()) == {"processed/error: integrity-check-failed"}, answers
    refused = wait_until(
        lambda: [
            r
            for r in read_audit(layout.hospital.audit_log)
            if r.get("message_id", "").startswith("<cbc-")
            and r["outcome"] == "failure"
            and r["event"] != "receipt.sent"
        ][len(answers) - 1 :],
        30,
        "every refusal",
    )
    assert refused
    failures = [
        r
        for r in read_audit(layout.hospital.audit_log)
        if r.get("message_id", "").startswith("<cbc-") and r["event"] != "receipt.sent"
    ]
    assert {r["event"] for r in failures} == {"signature.failed"}, failures
    assert len(failures) == len(answers)
    assert not (layout.hospital.inbox_dir / "lab").exists() or not any(
        (layout.hospital.inbox_dir / "lab").iterdir()
    )


def _accept_cbc(layout: DemoLayout) -> None:
    peer = layout.hospital.root / "peers.d" / "lab.toml"
    text = peer.read_text()
    assert "accept_cbc = false" in text
    peer.write_text(text.replace("accept_cbc = false", "accept_cbc = true"))


def test_cbc_is_accepted_only_from_a_peer_configured_for_it(
    layout: DemoLayout, processes: Any
) -> None:
    processes.start(layout.hospital.config_path)
    lab = load_config(layout.lab.config_path)
    built = as2client.build(
        b"MSH|cbc\r",
        sender_as2="KITA-LAB",
        receiver_as2="SAKURA-HOSPITAL",
        signing=lab.smime.signing,
        recipient=lab.require_peer("hospital").encryption_certificates[0],
        cipher="aes-256-cbc",
    )
    answer = lab_post(layout, built.headers, built.body)
    assert _disposition(answer.body) == "processed/error: decryption-failed"
    [failed] = wait_for_events(layout.hospital.audit_log, "decryption.failed")
    assert "accept_cbc" in failed["reason"] and "aes-256-gcm" in failed["reason"]
    assert not (layout.hospital.inbox_dir / "lab").exists() or not any(
        (layout.hospital.inbox_dir / "lab").iterdir()
    )


def _disposition(receipt: bytes) -> str:
    for line in receipt.replace(b"\r\n", b"\n").split(b"\n"):
        if line.lower().startswith(b"disposition:"):
            return line.split(b";", 1)[1].strip().decode()
    raise AssertionError(f"no disposition in {receipt[:400]!r}")


def test_bad_cbc_padding_is_reported_after_the_content_not_raised(layout: DemoLayout) -> None:
    lab = load_config(layout.lab.config_path)
    hospital = load_config(layout.hospital.config_path)
    built = as2client.build(
        b"MSH|padding\r",
        sender_as2="KITA-LAB",
        receiver_as2="SAKURA-HOSPITAL",
        signing=lab.smime.signing,
        recipient=lab.require_peer("hospital").encryption_certificates[0],
        cipher="aes-128-cbc",
    )
    pair = hospital.smime.encryption
    intact, opened = decrypt_bytes(built.body, pair.certificate, pair.key, policy=AlgorithmPolicy())
    assert opened.intact
    # the last plaintext byte becomes 0x11: invalid padding whatever it was (1..16)
    info = cms.ContentInfo.load(built.body)["content"]["encrypted_content_info"]
    pad = len(info["encrypted_content"].native) - len(intact)
    altered = _altered_cbc(built.body, pad ^ 0x11)
    content, opened = decrypt_bytes(altered, pair.certificate, pair.key, policy=AlgorithmPolicy())
    assert not opened.intact
    assert len(content) == len(intact) + pad  # the padding block is passed on whole
    with pytest.raises(DecryptionError, match="invalid padding"):
        decrypt(altered, pair.certificate, pair.key, policy=AlgorithmPolicy())


MALFORMED = {
    "header byte": b"POST {path} HTTP/1.1\r\nHost: x\r\nX-Bad: a\x01b\r\nContent-Length: 0\r\n\r\n",
    "folded header": b"POST {path} HTTP/1.1\r\nHost: x\r\nX-F: a\r\n  folded\r\n"
    b"Content-Length: 0\r\n\r\n",
    "length and chunked": b"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n"
    b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
    "chunk size": b"POST {path} HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
    b"zz\r\nhello\r\n0\r\n\r\n",
}


def _exchange(sock: socket.socket, request: bytes) -> tuple[int, dict[str, str], bytes]:
    sock.settimeout(30)
    sock.sendall(request)
    answer = b""
    while b"\r\n\r\n" not in answer or len(answer.split(b"\r\n\r\n", 1)[1]) < _length(answer):
        chunk = sock.recv(65536)
        if not chunk:
            break
        answer += chunk
    head, _, body = answer.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = {k.lower(): v.strip() for k, _, v in (x.partition(":") for x in lines[1:])}
    return int(lines[0].split()[1]), headers, body


def _length(answer: bytes) -> int:
    for line in answer.split(b"\r\n\r\n", 1)[0].split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            return int(line.split(b":", 1)[1])
    return 1 << 30


def _tls_to_hospital(layout: DemoLayout) -> socket.socket:
    certs = layout.lab.root / "certs"
    context = ssl.create_default_context(cafile=str(layout.ca_certificate))
    context.load_cert_chain(str(certs / "tls.crt"), str(certs / "tls.key"))
    raw = socket.create_connection(("127.0.0.1", layout.hospital.port), timeout=30)
    return context.wrap_socket(raw, server_hostname="127.0.0.1")


def _only_json_lines(output: str) -> None:
    for line in output.splitlines():
        if line.strip():
            json.loads(line)  # a traceback or any other text is not a JSON line


def test_malformed_http_gets_a_generic_400_a_json_log_line_and_an_audit_record(
    layout: DemoLayout, processes: Any
) -> None:
    api_port = free_port()
    config = layout.hospital.config_path
    _, sha = new_token()
    config.write_text(
        config.read_text()
        + f'\n[api]\nlisten = "127.0.0.1:{api_port}"\n\n[[api.clients]]\nname = "his"\n'
        + f'token_sha256 = "{sha}"\npeers = ["lab"]\n'
    )
    daemon = processes.start(layout.hospital.config_path)
    answers = []
    for what, template in MALFORMED.items():
        with _tls_to_hospital(layout) as sock:
            answers.append((what, "as2", _exchange(sock, template.replace(b"{path}", b"/as2"))))
        with socket.create_connection(("127.0.0.1", api_port), timeout=30) as sock:
            request = template.replace(b"{path}", b"/v1/messages?to=lab")
            answers.append((what, "api", _exchange(sock, request)))
    for what, where, (status, headers, body) in answers:
        assert status == 400, (what, where, status, body)
        assert body == b"bad request\n", (what, where, body)
        assert headers.get("server") == "medgw", (what, where, headers)
    records = wait_for_events(layout.hospital.audit_log, "http.request_refused", count=len(answers))
    assert {r["detail"]["listener"] for r in records} == {"loopback", "api"}
    assert all(r["reason"].startswith("malformed HTTP request refused (400)") for r in records)
    # on the AS2 listener, who sent it: the TLS client certificate of the connection
    for record in records:
        if record["detail"]["listener"] == "loopback":
            assert "KITA-LAB" in record["detail"]["client_certificate"]["subject"], record
        else:
            assert "client_certificate" not in record["detail"]
    _only_json_lines("\n".join(daemon.raw))


def test_a_well_formed_answer_names_no_versions(layout: DemoLayout, processes: Any) -> None:
    processes.start(layout.hospital.config_path)
    with _tls_to_hospital(layout) as sock:
        status, headers, _ = _exchange(sock, b"GET /as2 HTTP/1.1\r\nHost: x\r\n\r\n")
    assert status == 405
    assert headers.get("server") == "medgw"


class _Sink:
    def __init__(self) -> None:
        self.events: list[AuditEvent] = []

    def emit(self, event: AuditEvent) -> None:
        self.events.append(event)

    def emit_all(self, events: Sequence[AuditEvent]) -> None:
        self.events.extend(events)

    def emit_later(self, events: Sequence[AuditEvent]) -> Pending:
        self.emit_all(events)
        return DURABLE


async def test_an_exception_in_a_handler_is_a_generic_500_logged_and_audited() -> None:
    async def broken(request: web.Request) -> web.Response:
        raise UnicodeEncodeError("utf-8", "\udcff", 0, 1, "surrogates not allowed")

    app = web.Application()
    app.router.add_get("/x", broken)
    out, sink = io.StringIO(), _Sink()
    front = FrontDoor("test", make_logger(stream=out), lambda: sink, SystemClock())
    runner = front.runner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"GET /x HTTP/1.1\r\nHost: x\r\n\r\n")
        answer = await reader.read()
        writer.close()
    finally:
        await runner.cleanup()
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 500") and body == b"internal error\n"
    assert b"Server: medgw\r\n" in head
    [line] = [json.loads(x) for x in out.getvalue().splitlines()]
    assert line["event"] == "http.internal_error" and "UnicodeEncodeError" in line["error"]
    [event] = sink.events
    assert event.event is EventType.HTTP_REQUEST_REFUSED and "UnicodeEncodeError" in (
        event.reason or ""
    )


def _others(path: Path) -> int:
    return path.stat().st_mode & 0o007


def test_folders_and_the_spool_take_explicit_modes_whatever_the_umask(
    layout: DemoLayout, processes: Any
) -> None:
    old = os.umask(0o022)  # as outside systemd: the daemon inherits it
    try:
        processes.start(layout.hospital.config_path)
    finally:
        os.umask(old)
    built = _message(layout, b"MSH|modes\r")
    assert lab_post(layout, built.headers, built.body).status == 200
    state = layout.hospital.root / "state"
    delivered = wait_until(
        lambda: [p for p in (layout.hospital.inbox_dir / "lab").glob("*") if p.is_file()],
        30,
        "the delivered document",
    )
    spool = state / "spool.sqlite3"
    for path in (spool, *(spool.with_name(spool.name + s) for s in ("-wal", "-shm"))):
        if path.exists():
            assert path.stat().st_mode & 0o777 == 0o600, path
    assert (state / "incoming").stat().st_mode & 0o777 == 0o700
    for path in (
        state,
        layout.hospital.inbox_dir,
        layout.hospital.inbox_dir / "lab",
        layout.hospital.outbox_dir,
        layout.hospital.outbox_dir / "lab",
        layout.hospital.audit_log.parent,
        layout.hospital.audit_log,
        *delivered,
    ):
        assert _others(path) == 0, (path, oct(path.stat().st_mode))


# Decrypts a message whose source stalls (as a slow disk or a client would) once
# half of it is read: the test looks at the work file meanwhile, then kills it.
DECRYPT_SLOWLY = """
import signal, sys
from pathlib import PosixPath
from gateway.cms.decrypting import decrypt_file
from gateway.config import load_config
from gateway.policy import AlgorithmPolicy

class Stalling:
    def __init__(self, f, limit):
        self.f, self.limit = f, limit
    def read(self, n=-1):
        if self.f.tell() >= self.limit:
            signal.pause()  # until killed
        return self.f.read(n)
    def tell(self):
        return self.f.tell()
    def seek(self, *args):
        return self.f.seek(*args)
    def __enter__(self):
        return self
    def __exit__(self, *exc):
        self.f.close()

class SlowPath(PosixPath):
    def open(self, *args, **kwargs):
        return Stalling(super().open(*args, **kwargs), self.stat().st_size // 2)

pair = load_config(PosixPath(sys.argv[1])).smime.encryption
decrypt_file(SlowPath(sys.argv[2]), PosixPath(sys.argv[3]), pair.certificate, pair.key,
             policy=AlgorithmPolicy())
"""


def test_a_kill_during_decryption_leaves_no_plaintext_behind(
    layout: DemoLayout, tmp_path: Path
) -> None:
    built = _message(layout, b"MSH|" + b"secret " * 200_000 + b"\r")
    body, work = tmp_path / "body.as2", tmp_path / "work"
    body.write_bytes(built.body)
    work.mkdir()
    old = os.umask(0o022)
    try:
        proc = subprocess.Popen(
            [sys.executable, "-c", DECRYPT_SLOWLY, str(layout.hospital.config_path), str(body),
             str(work / "signed")],
            cwd=Path(__file__).resolve().parents[1],
        )  # fmt: skip
    finally:
        os.umask(old)
    try:

        def plaintext_file() -> list[Path]:  # the work file, open in the decryptor, written to
            found = []
            for fd in Path(f"/proc/{proc.pid}/fd").iterdir():
                with contextlib.suppress(FileNotFoundError):  # closed meanwhile
                    if os.readlink(fd).startswith(str(work) + "/") and fd.stat().st_size:
                        found.append(fd)
            return found

        [open_file] = wait_until(plaintext_file, 60, "plaintext in the decryption's work file")
        assert open_file.stat().st_mode & 0o777 == 0o600
        assert list(work.iterdir()) == []  # it has no name in the folder
        proc.kill()
        proc.wait(30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert list(work.iterdir()) == []


def test_check_config_warns_when_we_send_cbc_to_a_peer_whose_cbc_we_refuse(
    layout: DemoLayout,
) -> None:
    peer = layout.hospital.root / "peers.d" / "lab.toml"
    peer.write_text(peer.read_text().replace('cipher = "aes-256-gcm"', 'cipher = "aes-256-cbc"'))
    [warning] = [
        w for w in load_config(layout.hospital.config_path).warnings if "accept_cbc" in str(w)
    ]
    assert "lab.toml" in str(warning) and "accept_cbc = true" in str(warning)
    _accept_cbc(layout)
    config = load_config(layout.hospital.config_path)
    assert not [w for w in config.warnings if "accept_cbc" in str(w)]
    assert config.require_peer("lab").policy.accept_cbc


def test_a_receipt_signed_on_an_unsupported_curve_is_refused_and_audited(
    layout: DemoLayout, processes: Any, tmp_path: Path
) -> None:
    processes.start(layout.hospital.config_path)
    cert, key = unsupported_curve_signer(tmp_path)
    report = tmp_path / "report.mime"
    report.write_bytes(
        b'Content-Type: multipart/report; report-type=disposition-notification; boundary="b"'
        b"\r\n\r\n--b\r\nContent-Type: text/plain\r\n\r\nreceipt\r\n--b--\r\n"
    )
    signed = subprocess.run(
        ["openssl", "smime", "-sign", "-binary", "-in", report, "-signer", cert, "-inkey", key,
         "-md", "sha256", "-crlfeol"],
        check=True,
        capture_output=True,
    ).stdout  # fmt: skip
    head, _, body = signed.partition(b"\r\n\r\n")
    content_type = next(
        line.split(b":", 1)[1].strip().decode()
        for line in head.replace(b"\r\n\t", b" ").replace(b"\r\n ", b" ").split(b"\r\n")
        if line.lower().startswith(b"content-type:")
    )
    headers = (
        ("AS2-Version", "1.2"),
        ("AS2-From", "KITA-LAB"),
        ("AS2-To", "SAKURA-HOSPITAL"),
        ("Message-ID", "<receipt-curve@lab>"),
        ("Content-Type", content_type),
    )
    answer = lab_post(layout, headers, body)
    assert answer.status == 200 and answer.body == b"receipt refused\n", answer
    [refused] = wait_for_events(layout.hospital.audit_log, "receipt.invalid")
    assert "1.3.132.0.16 is not supported" in refused["reason"]


async def test_our_requests_name_no_versions() -> None:
    seen: list[str] = []

    async def record(request: web.Request) -> web.Response:
        seen.append(request.headers.get("User-Agent", ""))
        return web.Response(text="ok")

    app = web.Application()
    app.router.add_get("/", record)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    try:
        route = zone_route(None, "127.0.0.0/8")
        session = route.session(timeout=aiohttp.ClientTimeout(total=30))
        async with session, session.get(f"http://127.0.0.1:{port}/") as answer:
            assert answer.status == 200
    finally:
        await runner.cleanup()
    assert seen == ["medgw"]


def test_shared_folders_lose_other_users_permissions_only_where_medgw_owns_them(
    tmp_path: Path,
) -> None:
    mine, theirs = tmp_path / "mine", tmp_path / "theirs"
    for folder in (mine, theirs):
        folder.mkdir()
        os.chmod(folder, 0o755)
    if os.geteuid() == 0:
        os.chown(theirs, 65534, 65534)  # an internal system's account made it
    old = os.umask(0o022)
    try:
        shared_folder(mine / "lab" / "results")  # made here: mine/lab and mine/lab/results
    finally:
        os.umask(old)
    for made in (mine / "lab", mine / "lab" / "results"):
        assert made.stat().st_mode & 0o777 == 0o750, made
    shared_folder(mine)  # an existing folder of ours is corrected too
    assert mine.stat().st_mode & 0o777 == 0o750
    if os.geteuid() == 0:
        shared_folder(theirs)  # not ours to change: no error, mode kept
        assert theirs.stat().st_mode & 0o777 == 0o755
