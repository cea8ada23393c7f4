"""The local submission API and ``medgw send``, on real daemons and real sockets (NET-3)."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import pty
import socket
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from gateway.audit import DURABLE, AuditEvent, EventType, Pending
from gateway.config import ApiClient, load_config
from gateway.demo_run import free_port, wait_until
from gateway.errors import ConfigError
from gateway.intake.api import LocalApi
from gateway.pki.demo import DemoLayout
from tests.cli import medgw
from tests.clocks import SecondsClock
from tests.helpers.audit import events, wait_for_events
from tests.helpers.local_api import LIS_SHA, LIS_TOKEN, RIS_TOKEN, UnixConnection, enable_api
from tests.helpers.memory import peak_rss_kib
from tests.helpers.storage import fill_file_system, small_file_system
from tests.helpers.waiting import until

MIB = 1 << 20


def test_api_submission_is_delivered_and_its_receipt_shown(
    layout: DemoLayout, processes: Any
) -> None:
    api = enable_api(layout)
    processes.start(layout.hospital.config_path)
    processes.start(layout.lab.config_path)
    document = b"MSH|^~\\&|LIS|KITA|EHR|SAKURA|20260101||ORU^R01|API-1|P|2.5\rOBX|1|NM|x||7\r"
    status, view = api.request(
        "POST",
        "/v1/messages?to=hospital&filename=result.hl7",
        token=LIS_TOKEN,
        body=document,
        headers={"Content-Type": "application/hl7-v2"},
    )
    assert status == 202, view
    message_id = view["message_id"]
    assert view["submitted_by"] == "api:lis" and view["state"] in ("queued", "sending")

    final = api.wait_final(message_id, LIS_TOKEN)
    assert final["state"] == "delivered"
    receipt = final["receipt"]
    assert receipt["verified"] and receipt["disposition"] == "processed"
    assert receipt["mic_matches"] and receipt["mic"] == final["mic"]
    assert receipt["original_message_id"] == message_id
    assert "Sakura" in receipt["signer"] or layout.hospital.as2_id in receipt["signer"], receipt
    assert (layout.hospital.inbox_dir / "lab" / "result.hl7").read_bytes() == document
    # Where the gateway keeps things is its own business, not a client's.
    assert not {"receipt_file", "receipt_kept"} & (set(final) | set(view))

    # The same view over the unix socket; the other client cannot even see it exists.
    status, same = api.request("GET", f"/v1/messages/{message_id}", token=LIS_TOKEN, unix=True)
    assert status == 200 and same["state"] == "delivered"
    status, hidden = api.request("GET", f"/v1/messages/{message_id}", token=RIS_TOKEN)
    assert status == 404 and hidden["error"] == "no such message"
    status, _ = api.request("GET", "/v1/messages/%3Cnot-there%3E", token=LIS_TOKEN)
    assert status == 404

    accepted = wait_for_events(layout.lab.audit_log, "message.accepted")
    assert [a["detail"].get("submitted_by") for a in accepted] == ["api:lis"]
    # The document is linked across both audit trails by its SHA-256.
    [delivered] = wait_for_events(layout.hospital.audit_log, "message.delivered")

    assert accepted[0]["detail"]["sha256"] == hashlib.sha256(document).hexdigest()
    assert delivered["detail"]["sha256"] == accepted[0]["detail"]["sha256"]
    # The administrator sees every message and who submitted it (control socket, no token).
    control = UnixConnection(layout.lab.root / "state" / "control.sock")
    control.request("GET", f"/v1/messages/{message_id}")
    admin_view = json.loads(control.getresponse().read())
    control.close()
    assert admin_view["submitted_by"] == "api:lis" and admin_view["state"] == "delivered"
    assert admin_view["receipt_kept"] == "spool"  # the administrator's view has it


def test_api_refuses_bad_tokens_foreign_peers_and_services(
    layout: DemoLayout, processes: Any
) -> None:
    api = enable_api(layout)
    processes.start(layout.lab.config_path)
    for token, unix in ((None, False), ("not-a-token", False), (LIS_TOKEN + "x", True)):
        status, answer = api.request(
            "POST", "/v1/messages?to=hospital", token=token, body=b"MSH|x\r", unix=unix
        )
        assert status == 401, answer
        assert "Bearer" in answer["fix"]
    status, _ = api.request("GET", "/v1/messages/x", token="wrong")
    assert status == 401
    refused = wait_for_events(layout.lab.audit_log, "api.authentication_failed", count=4)
    assert len(refused) == 4
    assert {r["severity"] for r in refused} == {"alert"}
    assert {r["remote_address"] for r in refused} >= {"127.0.0.1", "local socket"}

    status, answer = api.request(
        "POST", "/v1/messages?to=pharmacy", token=LIS_TOKEN, body=b"MSH|x\r"
    )
    assert status == 403 and "pharmacy" in answer["error"] and "peers" in answer["fix"]
    [audited] = wait_for_events(layout.lab.audit_log, "api.request_refused")
    assert audited["peer"] == "pharmacy" and audited["detail"]["client"] == "lis"

    status, answer = api.request(
        "POST", "/v1/messages?to=hospital&service=results", token=LIS_TOKEN, body=b"MSH|x\r"
    )
    # The demo peers agree on no services: a service is refused, naming what there is.
    assert status == 400 and "has no service 'results'" in answer["error"], answer
    assert "its services: none" in answer["error"] and "services" in answer["fix"]
    status, answer = api.request(
        "POST", "/v1/messages?to=hospital&service=../x", token=LIS_TOKEN, body=b"MSH|x\r"
    )
    assert status == 400 and "not a service name" in answer["error"], answer
    status, answer = api.request("POST", "/v1/messages?to=hospital", token=LIS_TOKEN, body=b"")
    assert status == 400 and "empty" in answer["error"]
    status, answer = api.request(
        "POST",
        "/v1/messages?to=hospital",
        token=LIS_TOKEN,
        body=b"x",
        headers={"Content-Type": "not a type"},
    )
    assert status == 400 and "media type" in answer["error"]
    # Names an admin will read in `medgw queue list`: no control or formatting
    # characters (an escape sequence, a right-to-left override that shows
    # "result\u202egpj.exe" as "resultexe.jpg"), nothing that was not UTF-8.
    for name in ("a%1Bb.hl7", "a%7Fb.hl7", "a%C2%9Bb.hl7", "result%E2%80%AEgpj.exe", "x%FF.hl7"):
        status, answer = api.request(
            "POST", f"/v1/messages?to=hospital&filename={name}", token=LIS_TOKEN, body=b"x"
        )
        assert status == 400 and "control or formatting" in answer["error"], (name, answer)
    status, answer = api.request("POST", "/v1/messages?to=" + "p" * 300, token=LIS_TOKEN, body=b"x")
    assert status == 400 and "is not a peer name" in answer["error"], answer
    assert len(events(layout.lab.audit_log, "api.request_refused")) == 1  # not audited again
    # Nothing of all that reached the spool.
    listed = medgw("queue", "list", "--config", str(layout.lab.config_path), "--json")
    assert listed.returncode == 0 and json.loads(listed.stdout) == []


def test_a_20_mib_body_streams_without_growing_the_daemon(
    layout: DemoLayout, processes: Any
) -> None:
    api = enable_api(layout)
    processes.start(layout.hospital.config_path)
    lab = processes.start(layout.lab.config_path)
    # Warm up the paths (imports, TLS, thread pool) with a small document first.
    status, small = api.request(
        "POST", "/v1/messages?to=hospital&filename=warm.bin", token=LIS_TOKEN, body=b"w" * 4096
    )
    assert status == 202, small
    assert api.wait_final(small["message_id"], LIS_TOKEN)["state"] == "delivered"
    before = peak_rss_kib(lab.proc.pid)

    block = os.urandom(MIB)
    digest = hashlib.sha256()

    def body() -> Iterator[bytes]:
        for index in range(20):
            chunk = block[index:] + block[:index]
            digest.update(chunk)
            yield chunk

    status, view = api.request(
        "POST",
        "/v1/messages?to=hospital&filename=study.dcm",
        token=LIS_TOKEN,
        body=body(),
        headers={"Content-Type": "application/dicom", "Content-Length": str(20 * MIB)},
        unix=True,
    )
    assert status == 202, view
    final = api.wait_final(view["message_id"], LIS_TOKEN)
    assert final["state"] == "delivered" and final["size"] == 20 * MIB
    after = peak_rss_kib(lab.proc.pid)
    delivered = layout.hospital.inbox_dir / "lab" / "study.dcm"
    assert hashlib.sha256(delivered.read_bytes()).hexdigest() == digest.hexdigest()
    # Held in memory, the body alone would raise the peak by 20 MiB.
    assert after - before < 12 * 1024, f"peak RSS grew by {(after - before) / 1024:.1f} MiB"


def test_medgw_send_prints_the_receipt_and_exits_0(
    layout: DemoLayout, processes: Any, tmp_path: Path
) -> None:
    processes.start(layout.hospital.config_path)
    processes.start(layout.lab.config_path)
    document = tmp_path / "scan.dcm"
    document.write_bytes(os.urandom(5 * MIB))  # above the progress-bar threshold
    # stderr on a terminal: the progress bar is drawn there.
    master, slave = pty.openpty()
    drawn: list[bytes] = []

    def drain() -> None:
        while True:
            try:
                data = os.read(master, 65536)
            except OSError:
                return
            if not data:
                return
            drawn.append(data)

    reader = threading.Thread(target=drain, daemon=True)
    reader.start()
    try:
        result = subprocess.run(
            [
                sys.executable,
                "-m",
                "gateway",
                "send",
                str(document),
                "--to",
                "hospital",
                "--config",
                str(layout.lab.config_path),
            ],
            stdout=subprocess.PIPE,
            stderr=slave,
            text=True,
            timeout=120,
            check=False,
        )
    finally:
        os.close(slave)
        reader.join(60)
        os.close(master)
    terminal = b"".join(drawn).decode()
    assert result.returncode == 0, terminal
    assert "uploading [" in terminal and "100%" in terminal
    out = result.stdout
    assert out.startswith("delivered ")
    assert "disposition  processed" in out and "(matches what was sent)" in out
    assert "signed by" in out
    message_id = out.split()[1]
    assert (layout.hospital.inbox_dir / "lab" / "scan.dcm").read_bytes() == document.read_bytes()

    # Recorded as the operator who ran it, from the kernel's view of the socket.
    [mine] = wait_for_events(
        layout.lab.audit_log, "message.accepted", where=lambda a: a["message_id"] == message_id
    )
    assert mine["detail"]["submitted_by"].startswith("operator:")
    assert f"(uid {os.getuid()})" in mine["detail"]["submitted_by"]

    # A small file, stderr not a terminal: no bar; --no-wait prints just the id.
    small = tmp_path / "note.hl7"
    small.write_bytes(b"MSH|small\r")
    quick = medgw(
        "send", str(small), "--to", "hospital", "--no-wait", "--config", str(layout.lab.config_path)
    )
    assert quick.returncode == 0, quick.stderr
    assert quick.stdout.strip().startswith("<") and "uploading" not in quick.stderr


def test_medgw_send_exits_1_with_the_reason_when_the_peer_refuses(
    layout: DemoLayout, processes: Any, tmp_path: Path
) -> None:
    # The lab encrypts for a certificate the hospital has no key for (the lab's own).
    peer_file = layout.lab.root / "peers.d" / "hospital.toml"
    text = peer_file.read_text()
    assert "certs/peers/hospital/encrypt.crt" in text
    peer_file.write_text(text.replace("certs/peers/hospital/encrypt.crt", "certs/encrypt.crt"))
    processes.start(layout.hospital.config_path)
    processes.start(layout.lab.config_path)
    document = tmp_path / "secret.hl7"
    document.write_bytes(b"MSH|secret\r")
    result = medgw(
        "send", str(document), "--to", "hospital", "--config", str(layout.lab.config_path)
    )
    assert result.returncode == 1, result.stdout + result.stderr
    assert result.stdout.startswith("failed ")
    assert "decryption-failed" in result.stdout
    assert "not delivered (failed)" in result.stderr and "decryption-failed" in result.stderr
    assert not (layout.hospital.inbox_dir / "lab" / "secret.hl7").exists()


def test_medgw_send_usage_errors_exit_2(layout: DemoLayout, tmp_path: Path) -> None:
    config = str(layout.lab.config_path)
    document = tmp_path / "a.hl7"
    document.write_bytes(b"MSH|a\r")
    service = medgw("send", str(document), "--to", "hospital", "--service", "x", "--config", config)
    assert service.returncode == 2 and "has no service 'x'" in service.stderr
    missing = medgw("send", str(tmp_path / "nope.hl7"), "--to", "hospital", "--config", config)
    assert missing.returncode == 2 and "not a readable regular file" in missing.stderr
    unknown = medgw("send", str(document), "--to", "pharmacy", "--config", config)
    assert unknown.returncode == 2 and "use one of: hospital" in unknown.stderr
    no_peer = medgw("send", str(document), "--config", config)
    assert no_peer.returncode == 2
    # The daemon is not running: that is a failure, not a usage error.
    down = medgw("send", str(document), "--to", "hospital", "--config", config)
    assert down.returncode == 1 and "not running" in down.stderr


def test_api_token_prints_a_token_and_its_hash() -> None:
    result = medgw("api", "token")
    assert result.returncode == 0
    lines = [line.strip() for line in result.stdout.splitlines()]
    token = lines[1]
    assert f'token_sha256 = "{hashlib.sha256(token.encode()).hexdigest()}"' in lines
    again = medgw("api", "token")
    assert again.stdout.splitlines()[1].strip() != token


# --- configuration ------------------------------------------------------------------------


def _with_api(layout: DemoLayout, table: str) -> Path:
    config = layout.lab.config_path
    config.write_text(config.read_text() + "\n" + table)
    return config


def _problems(config: Path) -> list[tuple[str, str, str]]:
    with pytest.raises(ConfigError) as info:
        load_config(config)
    return [(p.key, p.message, p.fix) for p in info.value.problems]


CLIENT = f'[[api.clients]]\nname = "lis"\ntoken_sha256 = "{LIS_SHA}"\npeers = ["hospital"]\n'


@pytest.mark.parametrize(
    "listen",
    ["0.0.0.0:8470", "192.0.2.10:8470", "[2001:db8::1]:8470", "[::]:8470"],
)
def test_config_refuses_a_non_loopback_listen_address(layout: DemoLayout, listen: str) -> None:
    config = _with_api(layout, f'[api]\nlisten = "{listen}"\n{CLIENT}')
    [(key, message, fix)] = _problems(config)
    assert key == "api.listen"
    assert "not a loopback address" in message and "NET-3" in message
    assert "127.0.0.1" in fix


def test_config_accepts_loopback_and_reads_clients(layout: DemoLayout) -> None:
    config = _with_api(layout, f'[api]\nlisten = "[::1]:8470"\nsocket = "api.sock"\n{CLIENT}')
    api = load_config(config).api
    assert api is not None
    assert (api.address, api.port) == ("::1", 8470)
    assert api.socket == layout.lab.config_path.parent / "api.sock"
    assert [(c.name, c.token_sha256, c.peers) for c in api.clients] == [
        ("lis", LIS_SHA, ("hospital",))
    ]
    assert load_config(layout.hospital.config_path).api is None


def test_config_api_mistakes_name_key_and_fix(layout: DemoLayout) -> None:
    config = _with_api(
        layout,
        '[api]\nlisten = "localhost:8470"\nport = 1\n'
        '[[api.clients]]\nname = "lis"\ntoken_sha256 = "abc"\npeers = ["pharmacy"]\n'
        f'[[api.clients]]\nname = "lis"\ntoken_sha256 = "{LIS_SHA}"\npeers = ["hospital"]\n',
    )
    problems = {key: (message, fix) for key, message, fix in _problems(config)}
    assert "host names are not accepted" in problems["api.listen"][0]
    assert problems["api.port"][0] == "unknown key" and "listen" in problems["api.port"][1]
    assert "64 hex digits" in problems["api.clients[0].token_sha256"][0]
    assert "medgw api token" in problems["api.clients[0].token_sha256"][1]
    assert "no peer named 'pharmacy'" in problems["api.clients[0].peers"][0]
    assert "listed twice" in problems["api.clients[1].name"][0]


def test_config_api_without_endpoint_or_clients(layout: DemoLayout) -> None:
    problems = {key: message for key, message, _fix in _problems(_with_api(layout, "[api]\n"))}
    assert "neither socket nor listen" in problems["api.socket"]
    assert "missing" in problems["api.clients"]


def test_the_api_replaces_a_stale_socket_but_never_another_file(
    layout: DemoLayout, processes: Any
) -> None:
    api = enable_api(layout)
    # A socket left by a killed run is replaced.
    api.socket_path.parent.mkdir(parents=True, exist_ok=True)
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(str(api.socket_path))
    stale.close()
    lab = processes.start(layout.lab.config_path)
    status, _ = api.request("GET", "/v1/messages/x", token=LIS_TOKEN, unix=True)
    assert status == 404
    assert lab.stop() == 0
    # A file that is not a socket stays as it is, and medgw says why it does not start.
    api.socket_path.write_bytes(b"someone's notes")
    proc = processes.start(layout.lab.config_path, wait=False)
    assert proc.wait_exit() == 1
    output = "\n".join(proc.raw)
    assert str(api.socket_path) in output and "is not a socket" in output, output
    assert "[api] socket" in output
    assert api.socket_path.read_bytes() == b"someone's notes"


def test_failed_tokens_cannot_flood_the_audit_trail(layout: DemoLayout, processes: Any) -> None:
    api = enable_api(layout)
    processes.start(layout.lab.config_path)
    long_path = "/v1/messages/" + "x" * 5000
    for _ in range(25):
        status, _ = api.request("GET", long_path, token="wrong")
        assert status == 401
    for _ in range(3):  # another address keeps its own count
        status, _ = api.request("GET", "/v1/messages/y", token="wrong", unix=True)
        assert status == 401
    # Ten from the address that sent 25, three from the other: all there is to wait for.
    refused = wait_for_events(layout.lab.audit_log, "api.authentication_failed", count=13)
    by_tcp = [r for r in refused if r["remote_address"] == "127.0.0.1"]

    assert len(by_tcp) == 10, [r["detail"] for r in by_tcp]
    assert all(len(r["detail"]["path"]) <= 203 for r in by_tcp)
    assert by_tcp[0]["detail"]["path"].startswith("/v1/messages/xxx")
    assert by_tcp[0]["detail"]["path_length"] == len(long_path)
    assert len([r for r in refused if r["remote_address"] == "local socket"]) == 3
    # A correct token still works at once.
    status, _ = api.request("GET", "/v1/messages/x", token=LIS_TOKEN)
    assert status == 404


class ListSink:
    def __init__(self) -> None:
        self.events: list[AuditEvent] = []

    def emit(self, event: AuditEvent) -> None:
        self.events.append(event)

    def emit_all(self, events: Sequence[AuditEvent]) -> None:
        self.events.extend(events)

    def emit_later(self, events: Sequence[AuditEvent]) -> Pending:
        self.emit_all(events)
        return DURABLE


async def never(*_args: Any) -> Any:
    raise AssertionError("no submission expected")


async def test_beyond_ten_a_minute_one_record_a_minute_counts_the_failures() -> None:
    clock = SecondsClock()
    sink = ListSink()

    client = ApiClient("lis", LIS_SHA, ("hospital",))
    local = LocalApi(lambda: (client,), never, never, sink, clock=clock, flush_seconds=0.05)
    port = free_port()
    await local.start(socket_path=None, address="127.0.0.1", port=port)
    try:
        async with aiohttp.ClientSession(f"http://127.0.0.1:{port}") as session:

            async def fail(times: int) -> None:
                for _ in range(times):
                    async with session.get("/v1/messages/x", headers={"Authorization": "x"}) as r:
                        assert r.status == 401

            def failures() -> list[AuditEvent]:
                return [e for e in sink.events if e.event == EventType.API_AUTHENTICATION_FAILED]

            await fail(14)
            assert len(failures()) == 10
            clock.seconds += 30
            await fail(3)  # still the same minute: counted, not recorded
            await asyncio.sleep(0.3)
            assert len(failures()) == 10
            clock.seconds += 31  # the minute is over: one record says how many more
            await until(lambda: len(failures()) >= 11, "the minute's summary record")
            summary = failures()[10]
            assert summary.detail["not_recorded_one_by_one"] == 7
            assert "7 more failed" in (summary.reason or "")
            assert summary.remote_address == "127.0.0.1"
            await fail(10)  # a new minute: recorded one by one again
            assert len(failures()) == 21
            await fail(2)
        await asyncio.sleep(0.2)
        assert len(failures()) == 21
    finally:
        await local.stop()
    # Stopping does not lose the count of the last minute.
    assert len(failures()) == 22 and failures()[21].detail["not_recorded_one_by_one"] == 2


async def test_the_api_socket_gets_its_mode_without_touching_the_umask(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The umask is the whole process's: while other tasks and threads create inbox and
    # spool files, changing it for the socket would give those files wrong modes.
    calls: list[int] = []
    real_umask = os.umask

    def umask(mask: int) -> int:
        calls.append(mask)
        return real_umask(mask)

    previous = real_umask(0o077)
    monkeypatch.setattr(os, "umask", umask)
    local = LocalApi(lambda: (), never, never, ListSink())
    path = tmp_path / "run" / "api.sock"
    try:
        await local.start(socket_path=path, address=None, port=None)
        mode = path.stat().st_mode
        assert stat.S_ISSOCK(mode) and stat.S_IMODE(mode) == 0o660, oct(mode)
        assert calls == []
        reader, writer = await asyncio.open_unix_connection(str(path))
        writer.write(b"GET /v1/messages/x HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        assert (await reader.read()).startswith(b"HTTP/1.1 401")
        writer.close()
    finally:
        await local.stop()
        real_umask(previous)
    assert not path.exists()


def test_the_daemons_api_socket_is_for_the_medgw_user_and_group(
    layout: DemoLayout, processes: Any
) -> None:
    api = enable_api(layout)
    processes.start(layout.lab.config_path)
    mode = api.socket_path.stat().st_mode
    assert stat.S_ISSOCK(mode) and stat.S_IMODE(mode) == 0o660, oct(mode)


async def test_a_token_that_is_not_utf8_is_refused_and_audited_like_any_other() -> None:
    # Header bytes that are not UTF-8 reach the handler as surrogate escapes; hashing
    # them must not fail (a 500 that leaves no record), the answer is 401 and audited.
    sink = ListSink()
    client = ApiClient("lis", LIS_SHA, ("hospital",))
    local = LocalApi(lambda: (client,), never, never, sink)
    port = free_port()
    await local.start(socket_path=None, address="127.0.0.1", port=port)
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(
            b"GET /v1/messages/x HTTP/1.1\r\nHost: x\r\n"
            b"Authorization: Bearer \xff\xfe" + LIS_TOKEN.encode() + b"\r\n"
            b"Connection: close\r\n\r\n"
        )
        answer = await reader.read()
        writer.close()
    finally:
        await local.stop()
    assert answer.startswith(b"HTTP/1.1 401"), answer
    assert b"Bearer" in answer
    [failed] = [e for e in sink.events if e.event == EventType.API_AUTHENTICATION_FAILED]
    assert failed.remote_address == "127.0.0.1"


def _stall_mid_body(sock: socket.socket, token: str | None) -> None:
    """Send a submission's head and ten of its 1000 bytes, then nothing more."""
    auth = f"Authorization: Bearer {token}\r\n" if token else ""
    sock.sendall(
        f"POST /v1/messages?to=hospital&filename=a.hl7 HTTP/1.1\r\nHost: x\r\n{auth}"
        "Content-Length: 1000\r\n\r\n".encode()
        + b"MSH|stall"
    )


def test_a_stalled_submission_does_not_hold_the_daemon_past_its_shutdown_deadline(
    layout: DemoLayout, processes: Any
) -> None:
    api = enable_api(layout)
    config = layout.lab.config_path
    text = config.read_text()
    assert "shutdown_deadline_seconds = 10" in text
    config.write_text(
        text.replace("shutdown_deadline_seconds = 10", "shutdown_deadline_seconds = 2")
    )
    lab = processes.start(config)
    over_tcp = socket.create_connection(("127.0.0.1", api.port))
    over_control = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    over_control.connect(str(layout.lab.root / "state" / "control.sock"))
    try:
        _stall_mid_body(over_tcp, LIS_TOKEN)
        _stall_mid_body(over_control, None)
        payloads = layout.lab.root / "state" / "payloads"
        wait_until(lambda: len(list(payloads.iterdir())) == 2 or None, 30, "two partial bodies")
        started = time.monotonic()
        assert lab.stop(timeout=30) == 0  # what systemd allows (TimeoutStopSec)
        took = time.monotonic() - started
    finally:
        over_tcp.close()
        over_control.close()
    # Within the deadline (and well within systemd's TimeoutStopSec=30), not a minute later.
    assert took < 10, f"stopping took {took:.1f} s"
    assert list(payloads.iterdir()) == []
    assert events(layout.lab.audit_log, "daemon.stopped")


async def test_a_body_that_stops_arriving_is_given_up_and_nothing_kept() -> None:
    # A client that sends part of a document and then nothing (hung, or stopped) must
    # not hold its connection, its handler and a partial spool file for ever.
    sink = ListSink()
    client = ApiClient("lis", LIS_SHA, ("hospital",))
    received: list[bytes] = []
    outcome: list[BaseException] = []

    async def spool(_submission: Any, chunks: Any) -> Any:
        try:
            async for chunk in chunks:
                received.append(chunk)
        except BaseException as exc:  # what Outbound.submit sees: it removes the partial file
            outcome.append(exc)
            raise
        raise AssertionError("the body cannot be complete")

    local = LocalApi(lambda: (client,), spool, never, sink, body_idle_seconds=0.5)
    port = free_port()
    await local.start(socket_path=None, address="127.0.0.1", port=port)
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(
            f"POST /v1/messages?to=hospital HTTP/1.1\r\nHost: x\r\n"
            f"Authorization: Bearer {LIS_TOKEN}\r\nContent-Length: 1000\r\n\r\n".encode()
            + b"MSH|part"
        )
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
        length = int(head.lower().partition(b"content-length:")[2].split(b"\r\n")[0])
        answer = json.loads(await reader.readexactly(length))
        writer.close()
    finally:
        await local.stop(0.5)  # aiohttp lingers on what is left of the connection
    assert head.startswith(b"HTTP/1.1 408"), head
    assert "stopped arriving" in answer["error"] and answer["fix"]
    assert b"".join(received) == b"MSH|part" and len(outcome) == 1


async def test_other_loopback_source_addresses_do_not_multiply_the_audit_bound() -> None:
    # Any local user can connect from any of 127.0.0.0/8: counted per source address,
    # ten failures a minute would become ten per address, without bound.
    clock = SecondsClock()
    sink = ListSink()
    client = ApiClient("lis", LIS_SHA, ("hospital",))
    local = LocalApi(lambda: (client,), never, never, sink, clock=clock, flush_seconds=0.05)
    port = free_port()
    await local.start(socket_path=None, address="127.0.0.1", port=port)
    try:
        for source in ("127.0.0.1", "127.0.0.2", "127.0.0.3", "127.1.2.3"):
            for _ in range(10):
                reader, writer = await asyncio.open_connection(
                    "127.0.0.1", port, local_addr=(source, 0)
                )
                writer.write(b"GET /v1/messages/x HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
                assert (await reader.read()).startswith(b"HTTP/1.1 401")
                writer.close()
    finally:
        await local.stop()

    failures = [e for e in sink.events if e.event == EventType.API_AUTHENTICATION_FAILED]
    one_by_one = [e for e in failures if "not_recorded_one_by_one" not in e.detail]
    assert len(one_by_one) == 10, [e.remote_address for e in one_by_one]
    assert {e.remote_address for e in one_by_one} == {"127.0.0.1"}  # what each one came from
    [summary] = [e for e in failures if "not_recorded_one_by_one" in e.detail]
    assert summary.detail["not_recorded_one_by_one"] == 30
    assert summary.remote_address == "loopback"
    assert "loopback" in (summary.reason or "")


def test_a_full_spool_answers_503_with_a_fix_and_keeps_nothing(
    layout: DemoLayout, processes: Any
) -> None:
    api = enable_api(layout)
    state = layout.lab.root / "state"
    with small_file_system(state, "2m"):
        lab = processes.start(layout.lab.config_path)
        filler = fill_file_system(state)
        status, answer = api.request(
            "POST",
            "/v1/messages?to=hospital&filename=a.hl7",
            token=LIS_TOKEN,
            body=b"MSH|x\r" * 1000,
        )
        # Clear for the internal system (send again later), without the gateway's insides.
        assert status == 503, answer
        assert "cannot store" in answer["error"] and "again" in answer["fix"]
        assert str(state) not in json.dumps(answer)
        # The administrator is told the cause and the fix.
        said = lab.wait_for(lambda line: line.get("event") == "submission.not_stored", 30)
        assert "No space left" in said["error"] and "free disk space" in said["fix"]
        assert [p.name for p in (state / "payloads").iterdir()] == []
        filler.unlink()
        status, view = api.request(
            "POST", "/v1/messages?to=hospital&filename=a.hl7", token=LIS_TOKEN, body=b"MSH|x\r"
        )
        assert status == 202, view
        assert lab.stop() == 0
        listed = medgw("queue", "list", "--config", str(layout.lab.config_path), "--json")
        assert [m["message_id"] for m in json.loads(listed.stdout)] == [view["message_id"]]


async def test_an_idle_connection_is_closed_by_the_gateway() -> None:
    # Any local user can connect without a token; a connection that sends nothing
    # must not be held for aiohttp's default hour (thousands of them would use up the
    # daemon's file descriptors, AS2 listeners included).
    client = ApiClient("lis", LIS_SHA, ("hospital",))
    local = LocalApi(lambda: (client,), never, never, ListSink(), idle_connection_seconds=0.5)
    port = free_port()
    await local.start(socket_path=None, address="127.0.0.1", port=port)
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        started = asyncio.get_running_loop().time()
        assert await asyncio.wait_for(reader.read(), 10) == b""  # closed by the gateway
        assert asyncio.get_running_loop().time() - started < 5
        writer.close()
    finally:
        await local.stop()


class LogLines:
    """Collects what the API logs (structlog-style: event name and fields)."""

    def __init__(self) -> None:
        self.lines: list[tuple[str, dict[str, Any]]] = []

    def warning(self, event: str, **fields: Any) -> None:
        self.lines.append((event, fields))


@pytest.mark.parametrize("where", ["tcp", "unix"])
async def test_connections_beyond_the_cap_are_closed_at_once_and_logged_once(
    tmp_path: Path, where: str
) -> None:
    """A local client opening connections in a loop cannot take every file descriptor:
    past the cap a new connection is closed at once, one log line says why, and a
    client is served again as soon as connections end."""
    client = ApiClient("lis", LIS_SHA, ("hospital",))
    log = LogLines()
    local = LocalApi(lambda: (client,), never, never, ListSink(), max_connections=3, log=log)
    port = free_port()
    sock_path = tmp_path / "api.sock"
    if where == "tcp":
        await local.start(socket_path=None, address="127.0.0.1", port=port)
    else:
        await local.start(socket_path=sock_path, address=None, port=None)

    async def connect() -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        if where == "tcp":
            return await asyncio.open_connection("127.0.0.1", port)
        return await asyncio.open_unix_connection(str(sock_path))

    async def ask(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bytes:
        """The answer; empty if the connection was closed without one."""
        try:
            writer.write(b"GET /v1/messages/x HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            return await asyncio.wait_for(reader.read(), 10)
        except ConnectionError:  # closed before or while we wrote (a unix socket says so)
            return b""

    try:
        held = [await connect() for _ in range(3)]
        for reader, writer in held:  # all three are served (and stay open: keep-alive)
            writer.write(b"GET /v1/messages/x HTTP/1.1\r\nHost: x\r\n\r\n")
            assert (await asyncio.wait_for(reader.readline(), 10)).startswith(b"HTTP/1.1 401")
        for _ in range(5):
            reader, writer = await connect()
            assert await ask(reader, writer) == b""  # closed at once, nothing answered
            writer.close()
        assert [event for event, _ in log.lines] == ["api.busy"]  # said once, not per try
        assert log.lines[0][1]["connections"] == 3 and "fix" in log.lines[0][1]
        for _, writer in held:
            writer.close()
            await writer.wait_closed()

        async def served_again() -> bool:
            reader, writer = await connect()
            answer = await ask(reader, writer)
            writer.close()
            return answer.startswith(b"HTTP/1.1 401")

        await until(served_again, "a connection served again once the held ones ended")
    finally:
        await local.stop()


def test_check_config_and_the_ready_line_show_the_local_api(
    layout: DemoLayout, processes: Any
) -> None:
    api = enable_api(layout)
    socket_path = layout.lab.root / "state" / "api.sock"
    shown = medgw("check-config", "--config", str(layout.lab.config_path))
    assert shown.returncode == 0, shown.stderr
    line = next(x for x in shown.stdout.splitlines() if x.strip().startswith("local API"))
    assert f"unix:{socket_path}" in line and f"http://127.0.0.1:{api.port}" in line
    assert "client lis: may send to hospital" in shown.stdout
    assert "hand-over        off" in shown.stdout

    lab = processes.start(layout.lab.config_path)
    ready = next(x for x in lab.lines if x.get("event") == "daemon.ready")
    assert ready["local_api"] == [f"unix:{socket_path}", f"http://127.0.0.1:{api.port}"]
    started = wait_until(
        lambda: events(layout.lab.audit_log, "daemon.started"), 30, "daemon.started"
    )
    assert started[-1]["detail"]["local_api"] == ready["local_api"]
