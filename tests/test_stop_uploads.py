"""What SIGTERM does to an upload in progress, with a real ``medgw run`` and a body sent
by hand (over real TLS to the AS2 listener; to the local API and the control socket): a
request already started runs to its answer within ``shutdown_deadline_seconds``; one
that does not end by then is cut, and its resend is answered once."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import ssl
import threading
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from gateway.config import load_config
from gateway.demo_run import GatewayProcess, free_port, wait_until
from gateway.pki.demo import DemoLayout
from gateway.pki.issue import make_crl
from tests import as2client
from tests.cli import medgw
from tests.crl_server import DistributionPoint
from tests.helpers.audit import events, wait_for_events
from tests.helpers.crl_world import CrlWorld
from tests.helpers.demo import lab_post, receipt_of, set_runtime
from tests.helpers.faults import killed_at
from tests.helpers.local_api import LIS_TOKEN, enable_api
from tests.helpers.maintenance import Site
from tests.helpers.notify import NotifySocket

# Larger than what the listener holds in memory (as2_handler.SMALL_BODY): its body is
# written to <state_dir>/incoming/ from the first byte, which says the request started.
PAYLOAD_BYTES = 3 << 20
# What the listener's file buffer may hold back of the bytes it has received (a
# buffered file: one block of the file system, 4 KiB on ext4): the file shows the rest.
HELD_BACK = 16 * 1024
# Every wait of a test is bounded: a wrong behaviour fails, it does not hang.
WAIT = 30.0
# The stop's deadline of a test whose request ends before it (above WAIT: a stop that
# waited for it would fail the test, not hold it).
LONG_DEADLINE = 60


def _lab_message(layout: DemoLayout, filename: str) -> Any:
    lab = load_config(layout.lab.config_path)
    return as2client.build(
        os.urandom(PAYLOAD_BYTES),
        sender_as2="KITA-LAB",
        receiver_as2="SAKURA-HOSPITAL",
        signing=lab.smime.signing,
        recipient=lab.require_peer("hospital").encryption_certificates[0],
        filename=filename,
    )


def _lab_connection(layout: DemoLayout) -> ssl.SSLSocket:
    """A TLS connection to the hospital's listener with the lab's client certificate."""
    certs = layout.lab.root / "certs"
    context = ssl.create_default_context(cafile=str(layout.ca_certificate))
    context.load_cert_chain(str(certs / "tls.crt"), str(certs / "tls.key"))
    raw = socket.create_connection(("127.0.0.1", layout.hospital.port), timeout=WAIT)
    return context.wrap_socket(raw, server_hostname="localhost")


def _head(headers: tuple[tuple[str, str], ...], length: int) -> bytes:
    lines = ["POST /as2 HTTP/1.1", "Host: localhost"]
    lines += [f"{name}: {value}" for name, value in headers]
    lines.append(f"Content-Length: {length}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def _incoming(layout: DemoLayout) -> Path:
    return layout.hospital.root / "state" / "incoming"


def _upload_started(layout: DemoLayout, at_least: int) -> bool:
    """The listener has taken the request and written ``at_least`` bytes of its body."""
    folder = _incoming(layout)
    return folder.is_dir() and any(p.stat().st_size >= at_least for p in folder.iterdir())


def _refused(port: int) -> bool:
    """Nothing listens on ``port`` of 127.0.0.1 any more.

    A reset is not an answer yet: the listener closed with this connection still in its
    queue (the kernel had completed it), and the next try is refused."""
    try:
        socket.create_connection(("127.0.0.1", port), timeout=WAIT).close()
    except ConnectionRefusedError:
        return True
    except ConnectionResetError:
        return False
    return False


def _stop_during_upload(
    layout: DemoLayout, hospital: GatewayProcess, conn: ssl.SSLSocket, sent: int
) -> None:
    """SIGTERM once the listener has the first ``sent`` bytes of the body (all but what
    its file buffer holds back); back once the daemon is stopping and its listener takes
    no new connection."""
    has_them = sent - HELD_BACK
    wait_until(lambda: _upload_started(layout, has_them), WAIT, "the body's first part spooled")
    hospital.signal(signal.SIGTERM)
    hospital.wait_for(lambda line: line.get("event") == "daemon.stopping", WAIT)
    wait_until(lambda: _refused(layout.hospital.port), WAIT, "the listener to close")


def _trickle(conn: ssl.SSLSocket, rest: bytes, stop: threading.Event) -> None:
    """Send ``rest`` 4 KiB every 0.1 s until it is sent, ``stop`` is set or the
    connection is gone."""
    for start in range(0, len(rest), 4096):
        if stop.wait(0.1):
            return
        try:
            conn.sendall(rest[start : start + 4096])
        except OSError:  # cut by the listener
            return


def _rest_of(conn: ssl.SSLSocket) -> bytes:
    """What the listener still sends on ``conn`` before it ends (cut or closed)."""
    data = b""
    try:
        while chunk := conn.recv(65536):
            data += chunk
    except (ConnectionResetError, ssl.SSLError):
        pass
    return data


def _answer(conn: socket.socket) -> tuple[int, dict[str, str], bytes]:
    """The HTTP answer read from ``conn`` to its end (the server closes the connection)."""
    data = b""
    while chunk := conn.recv(65536):
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    status_line, *header_lines = head.decode("latin-1").split("\r\n")
    headers = {}
    for line in header_lines:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    return int(status_line.split()[1]), headers, body


def test_a_body_half_sent_at_sigterm_is_received_and_answered_with_its_receipt(
    layout: DemoLayout, processes: Any
) -> None:
    # Ample on a loaded machine: the stop ends as soon as the answer is out.
    set_runtime(layout.hospital.config_path, "shutdown_deadline_seconds", str(LONG_DEADLINE))
    hospital = processes.start(layout.hospital.config_path)
    built = _lab_message(layout, "half-sent.bin")
    half = len(built.body) // 2
    with _lab_connection(layout) as conn:
        conn.sendall(_head(built.headers, len(built.body)) + built.body[:half])
        _stop_during_upload(layout, hospital, conn, half)
        conn.sendall(built.body[half:])
        status, headers, body = _answer(conn)
    assert status == 200
    assert headers.get("connection") == "close"  # no next request on this connection
    answer = as2client.Answer(status, headers["content-type"], body)
    assert receipt_of(layout, answer).processed
    assert hospital.wait_exit(WAIT) == 0
    delivered = layout.hospital.inbox_dir / "lab" / "half-sent.bin"
    assert delivered.stat().st_size == PAYLOAD_BYTES
    assert len(events(layout.hospital.audit_log, "message.delivered")) == 1


def test_a_body_still_trickling_at_the_deadline_is_cut_and_its_resend_answered_once(
    layout: DemoLayout, processes: Any
) -> None:
    # Long enough for the test to see the body read on after SIGTERM on a loaded machine;
    # the trickle would take five times as long.
    set_runtime(layout.hospital.config_path, "shutdown_deadline_seconds", "8")
    hospital = processes.start(layout.hospital.config_path)
    built = _lab_message(layout, "trickled.bin")
    half = len(built.body) // 2
    stop = threading.Event()
    with _lab_connection(layout) as conn:
        conn.sendall(_head(built.headers, len(built.body)) + built.body[:half])
        _stop_during_upload(layout, hospital, conn, half)
        # The rest comes at 40 KiB/s, above [runtime] body_min_bytes_per_second: a body
        # that would take some 40 s, longer than any wait of this test.
        trickle = threading.Thread(
            target=_trickle, args=(conn, built.body[half:], stop), daemon=True
        )
        trickle.start()
        try:
            # The listener goes on reading it while the daemon stops...
            more = half + HELD_BACK
            wait_until(lambda: _upload_started(layout, more), WAIT, "the body read on")
            # ...and cuts it at the deadline, without an answer.
            assert hospital.wait_exit(WAIT) == 0
        finally:
            stop.set()
            trickle.join(WAIT)
        assert not trickle.is_alive()
        assert _rest_of(conn) == b""  # read once the sending thread is done with conn
    assert any(line.get("event") == "daemon.stopped" for line in hospital.lines)
    [cut] = [line for line in hospital.lines if line.get("event") == "http.request_cut"]
    assert cut["remote"] == "127.0.0.1" and "shutdown_deadline_seconds" in cut["reason"]
    assert list(_incoming(layout).iterdir()) == []  # the partial body is not left behind
    assert not events(layout.hospital.audit_log, "message.received")
    processes.start(layout.hospital.config_path)
    answer = lab_post(layout, built.headers, built.body, timeout=WAIT)
    assert receipt_of(layout, answer).processed
    again = lab_post(layout, built.headers, built.body, timeout=WAIT)
    assert again.body == answer.body  # the resend of the resend: its receipt, once
    [delivered] = (layout.hospital.inbox_dir / "lab").iterdir()
    assert delivered.name == "trickled.bin" and delivered.stat().st_size == PAYLOAD_BYTES
    wait_for_events(layout.hospital.audit_log, "message.duplicate")
    assert len(events(layout.hospital.audit_log, "message.delivered")) == 1


def test_a_document_received_but_not_answered_by_the_deadline_is_answered_once_on_resend(
    layout: DemoLayout, processes: Any, tmp_path: Path
) -> None:
    set_runtime(layout.hospital.config_path, "shutdown_deadline_seconds", "3")
    release = tmp_path / "release"
    # The whole body has arrived; its processing (decrypt, verify, deliver, receipt)
    # waits in its worker thread until the test lets it go on.
    held = killed_at(
        "--hold-before",
        "gateway.inbound.pipeline:InboundProcessor.process",
        "--until-file",
        str(release),
    )
    hospital = processes.start(layout.hospital.config_path, prefix=held)
    built = _lab_message(layout, "held.bin")
    outcome: list[object] = []

    def post() -> None:
        try:
            outcome.append(lab_post(layout, built.headers, built.body, timeout=WAIT))
        except OSError as exc:  # http.client's RemoteDisconnected is one
            outcome.append(exc)

    poster = threading.Thread(target=post, daemon=True)
    poster.start()
    wait_until(lambda: (tmp_path / "release.reached").exists(), WAIT, "processing held")
    hospital.signal(signal.SIGTERM)
    hospital.wait_for(lambda line: line.get("event") == "http.request_cut", WAIT)
    poster.join(WAIT)
    assert not poster.is_alive()
    [cut] = outcome
    assert isinstance(cut, OSError), cut  # no answer: the sender will send it again
    release.touch()  # the work handed to the thread is finished before the daemon exits
    assert hospital.wait_exit(WAIT) == 0
    [delivered] = (layout.hospital.inbox_dir / "lab").iterdir()
    assert delivered.name == "held.bin" and delivered.stat().st_size == PAYLOAD_BYTES
    assert not events(layout.hospital.audit_log, "storage.unavailable")
    assert list(_incoming(layout).iterdir()) == []
    processes.start(layout.hospital.config_path)
    answer = lab_post(layout, built.headers, built.body, timeout=WAIT)
    assert receipt_of(layout, answer).processed  # from the duplicate check
    [duplicate] = wait_for_events(layout.hospital.audit_log, "message.duplicate")
    assert duplicate["message_id"] == dict(built.headers)["Message-ID"]
    assert len(events(layout.hospital.audit_log, "message.delivered")) == 1
    assert [p.name for p in (layout.hospital.inbox_dir / "lab").iterdir()] == ["held.bin"]


def _submission_head(filename: str, length: int, token: str | None) -> bytes:
    auth = f"Authorization: Bearer {token}\r\n" if token else ""
    return (
        f"POST /v1/messages?to=hospital&filename={filename} HTTP/1.1\r\nHost: x\r\n{auth}"
        f"Content-Type: application/octet-stream\r\nContent-Length: {length}\r\n\r\n"
    ).encode()


def test_documents_half_uploaded_to_the_local_api_at_sigterm_are_taken_and_sent_later(
    layout: DemoLayout, processes: Any
) -> None:
    api = enable_api(layout)
    set_runtime(layout.lab.config_path, "shutdown_deadline_seconds", str(LONG_DEADLINE))
    lab = processes.start(layout.lab.config_path)  # the hospital is down for now
    documents = {"over-tcp.bin": os.urandom(256 * 1024), "over-control.bin": os.urandom(256 * 1024)}
    over_tcp = socket.create_connection(("127.0.0.1", api.port), timeout=WAIT)
    over_control = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    over_control.settimeout(WAIT)
    over_control.connect(str(layout.lab.root / "state" / "control.sock"))
    uploads = {"over-tcp.bin": (over_tcp, LIS_TOKEN), "over-control.bin": (over_control, None)}
    try:
        for name, (sock, token) in uploads.items():
            document = documents[name]
            sock.sendall(_submission_head(name, len(document), token) + document[:1000])
        payloads = layout.lab.root / "state" / "payloads"
        wait_until(lambda: len(list(payloads.iterdir())) == 2 or None, WAIT, "two partial bodies")
        lab.signal(signal.SIGTERM)
        lab.wait_for(lambda line: line.get("event") == "daemon.stopping", WAIT)
        wait_until(lambda: _refused(api.port), WAIT, "the local API to stop listening")
        for name, (sock, _) in uploads.items():
            sock.sendall(documents[name][1000:])
        answers = [_answer(sock) for sock, _ in uploads.values()]
    finally:
        over_tcp.close()
        over_control.close()
    for status, _, body in answers:
        assert status == 202, body
        assert json.loads(body)["state"] == "queued"
    # The local API takes no next request; the control socket answers until the stop's
    # transfers are done (it closes this connection then, as the test's read shows).
    assert answers[0][1].get("connection") == "close"
    assert lab.wait_exit(WAIT) == 0
    processes.start(layout.hospital.config_path)
    processes.start(layout.lab.config_path)
    wait_for_events(layout.lab.audit_log, "receipt.received", count=2)
    inbox = layout.hospital.inbox_dir / "lab"
    assert {p.name: p.read_bytes() for p in inbox.iterdir()} == documents


def test_while_uploads_finish_the_control_socket_answers_and_refuses_a_reload(
    layout: DemoLayout, processes: Any
) -> None:
    """An admin who stopped medgw and looks while a transfer finishes is told it is
    still there (not "not running"); a command that would change or start something
    then (a reload, a document sent, a backup) is refused, saying why, and does
    nothing: a backup would hold the stop past its deadline."""
    set_runtime(layout.hospital.config_path, "shutdown_deadline_seconds", str(LONG_DEADLINE))
    hospital = processes.start(layout.hospital.config_path)
    built = _lab_message(layout, "while-looking.bin")
    half = len(built.body) // 2
    config = layout.hospital.config_path
    with _lab_connection(layout) as conn:
        conn.sendall(_head(built.headers, len(built.body)) + built.body[:half])
        _stop_during_upload(layout, hospital, conn, half)
        listed = medgw("queue", "list", "--config", config, timeout=WAIT)
        assert listed.returncode == 0, listed.stderr
        reload = medgw("reload", "--config", config, timeout=WAIT)
        assert reload.returncode != 0 and "medgw is stopping" in reload.stderr
        document = layout.hospital.root / "late.hl7"
        document.write_bytes(b"MSH|late\r")
        sent = medgw("send", "--config", config, "--to", "lab", document, timeout=WAIT)
        assert sent.returncode == 1 and "medgw is stopping" in sent.stderr, sent.stderr
        backup = medgw(
            "backup", "--config", config, "--to", layout.hospital.root / "b", timeout=WAIT
        )
        assert backup.returncode != 0 and "medgw is stopping" in backup.stderr, backup.stderr
        conn.sendall(built.body[half:])
        status, _, _ = _answer(conn)
    assert status == 200
    assert hospital.wait_exit(WAIT) == 0
    assert not events(layout.hospital.audit_log, "config.reloaded")
    assert not events(layout.hospital.audit_log, "backup.created")
    assert not list((layout.hospital.root / "state" / "payloads").glob("*"))


def test_while_uploads_finish_a_maintenance_session_reads_and_changes_nothing(
    layout: DemoLayout, processes: Any
) -> None:
    """The control socket's sibling: a maintainer logged in over SSH while medgw stops
    still sees the queue and the peers, and a command that would change something then
    (a suspension, a reload, an emergency) is refused, saying why, does nothing, and is
    audited as refused."""
    site = Site(layout, layout.hospital)
    site.add("ada", "admin")
    set_runtime(layout.hospital.config_path, "shutdown_deadline_seconds", str(LONG_DEADLINE))
    hospital = processes.start(layout.hospital.config_path)
    site.approve("ada")
    built = _lab_message(layout, "while-maintained.bin")
    half = len(built.body) // 2
    answers: dict[str, Any] = {}

    async def session() -> None:
        conn = await site.connect("ada", site.code("ada"))
        async with conn:
            for line in ("queue list", "peers list", "peers suspend lab", "reload"):
                answers[line] = await conn.run(line)
            answers["emergency enter"] = await conn.run("emergency enter 1 drill")

    with _lab_connection(layout) as conn:
        conn.sendall(_head(built.headers, len(built.body)) + built.body[:half])
        _stop_during_upload(layout, hospital, conn, half)
        asyncio.run(session())
        conn.sendall(built.body[half:])
        status, _, _ = _answer(conn)
    assert status == 200
    assert hospital.wait_exit(WAIT) == 0
    for line in ("queue list", "peers list"):
        assert answers[line].exit_status == 0, answers[line].stderr
    for line in ("peers suspend lab", "reload", "emergency enter"):
        assert answers[line].exit_status == 1, (line, answers[line].stderr)
        assert "medgw is stopping" in str(answers[line].stderr), line
    assert not events(layout.hospital.audit_log, "peer.suspended")
    assert not events(layout.hospital.audit_log, "config.reloaded")
    assert not events(layout.hospital.audit_log, "emergency.entered")
    commands = [
        (
            c["detail"]["command"],
            c["outcome"],
            c["detail"]["exit_status"],
            c["detail"].get("refused"),
        )
        for c in events(layout.hospital.audit_log, "maintenance.command")
    ]
    assert commands == [
        ("queue list", "success", 0, None),
        ("peers list", "success", 0, None),
        ("peers suspend", "failure", 1, "stopping"),
        ("reload", "failure", 1, "stopping"),
        ("emergency enter", "failure", 1, "stopping"),
    ]


def test_reloads_under_way_at_sigterm_are_not_applied_while_uploads_finish(
    layout: DemoLayout, processes: Any, tmp_path: Path
) -> None:
    """`medgw reload` asked before SIGTERM and still fetching the CRLs when the drain
    begins, and a SIGHUP's reload queued behind it: the transfers finishing keep the
    configuration they started with, the admin is told the reload was not applied, and
    systemd, told STOPPING, hears of no reload or readiness after it."""
    point = DistributionPoint(free_port())
    notify = NotifySocket(tmp_path / "notify.sock")
    try:
        world = CrlWorld(layout, point.url)
        point.serve(make_crl(world.ca, now=datetime.now(UTC) - timedelta(minutes=1), days=7))
        set_runtime(layout.hospital.config_path, "shutdown_deadline_seconds", str(LONG_DEADLINE))
        env = {"NOTIFY_SOCKET": str(notify.path)}
        hospital = processes.start(layout.hospital.config_path, env=env)
        wait_for_events(layout.hospital.audit_log, "pki.crl_fetched")
        point.hold()  # the reload's CRL fetch waits for the test
        asked = point.requests
        reloaded: list[Any] = []
        config = layout.hospital.config_path
        reloader = threading.Thread(
            target=lambda: reloaded.append(medgw("reload", "--config", config, timeout=WAIT)),
            daemon=True,
        )
        reloader.start()
        assert point.waiting.wait(WAIT), "the reload's CRL fetch"
        # Handled before the SIGTERM sent after it: it waits for the reload under way.
        hospital.signal(signal.SIGHUP)
        built = _lab_message(layout, "during-reload.bin")
        half = len(built.body) // 2
        with _lab_connection(layout) as conn:
            conn.sendall(_head(built.headers, len(built.body)) + built.body[:half])
            _stop_during_upload(layout, hospital, conn, half)
            point.release()
            reloader.join(WAIT)
            assert not reloader.is_alive()
            [reload] = reloaded
            wait_for_events(
                layout.hospital.audit_log, "config.reload_failed", count=2, timeout=WAIT
            )
            conn.sendall(built.body[half:])
            status, headers, body = _answer(conn)
        assert reload.returncode == 1, reload.stdout + reload.stderr
        assert "medgw is stopping" in reload.stderr and "not applied" in reload.stderr
        assert status == 200
        answer = as2client.Answer(status, headers["content-type"], body)
        assert receipt_of(layout, answer).processed
        assert hospital.wait_exit(WAIT) == 0
    finally:
        point.release()
        point.stop()
        notify.close()
    assert point.requests == asked + 1  # the queued reload fetched nothing
    assert point.held_too_long == 0  # the fetch was released, not answered 503
    assert not events(layout.hospital.audit_log, "config.reloaded")
    failed = events(layout.hospital.audit_log, "config.reload_failed")
    assert sorted(f["actor"].split(":")[0] for f in failed) == ["operator", "signal"], failed
    for record in failed:
        assert record["reason"].startswith("medgw is stopping"), record
        assert record["detail"] == {"refused": "stopping"}
    skipped = [line for line in hospital.lines if line.get("event") == "config.reload_skipped"]
    assert len(skipped) == 2
    states = notify.states()
    after = states[states.index("STOPPING=1") :]
    assert "READY=1" not in after and "RELOADING=1" not in after, states
    delivered = layout.hospital.inbox_dir / "lab" / "during-reload.bin"
    assert delivered.stat().st_size == PAYLOAD_BYTES


@pytest.mark.parametrize("files", ["refused", "right"])
@pytest.mark.parametrize("asked", ["medgw reload", "maintenance reload"])
def test_a_reload_under_way_at_sigterm_is_answered_by_why_it_was_refused(
    layout: DemoLayout, processes: Any, tmp_path: Path, asked: str, files: str
) -> None:
    """A reload asked (over the control socket, or in an SSH maintenance session) before
    SIGTERM, still fetching the CRLs when the drain begins.  If the files are right, it
    is not applied because of the stop: starting medgw again reads them.  If the files
    are refused (the TLS key file broken meanwhile), starting again would refuse them
    too: the answer names their error and its fix, and says medgw is stopping."""
    site = Site(layout, layout.hospital)
    site.add("ada", "admin")
    point = DistributionPoint(free_port())
    try:
        world = CrlWorld(layout, point.url)
        point.serve(make_crl(world.ca, now=datetime.now(UTC) - timedelta(minutes=1), days=7))
        set_runtime(layout.hospital.config_path, "shutdown_deadline_seconds", str(LONG_DEADLINE))
        hospital = processes.start(layout.hospital.config_path)
        wait_for_events(layout.hospital.audit_log, "pki.crl_fetched")
        site.approve("ada")
        point.hold()  # the reload's CRL fetch waits for the test
        asked_before = point.requests
        answered: list[tuple[int, str]] = []
        config = layout.hospital.config_path

        def reload() -> None:
            if asked == "medgw reload":
                done = medgw("reload", "--config", config, timeout=WAIT)
                answered.append((done.returncode, done.stderr))
            else:
                answered.append(asyncio.run(_maintenance_reload(site)))

        reloader = threading.Thread(target=reload, daemon=True)
        reloader.start()
        assert point.waiting.wait(WAIT), "the reload's CRL fetch"
        if files == "refused":  # read by the reload after the CRLs: it is refused
            key = load_config(config).tls.identity.key_path
            key.write_bytes(b"-----BEGIN PRIVATE KEY-----\nbroken\n-----END PRIVATE KEY-----\n")
        built = _lab_message(layout, "during-reload.bin")
        half = len(built.body) // 2
        with _lab_connection(layout) as conn:
            conn.sendall(_head(built.headers, len(built.body)) + built.body[:half])
            _stop_during_upload(layout, hospital, conn, half)
            point.release()
            reloader.join(WAIT)
            assert not reloader.is_alive()
            wait_for_events(layout.hospital.audit_log, "config.reload_failed", timeout=WAIT)
            conn.sendall(built.body[half:])
            status, _, _ = _answer(conn)
        assert status == 200
        assert hospital.wait_exit(WAIT) == 0
    finally:
        point.release()
        point.stop()
    assert point.requests == asked_before + 1  # the reload's one fetch
    assert point.held_too_long == 0  # the fetch was released, not answered 503
    [(code, text)] = answered
    assert code == 1, text
    assert "medgw is stopping" in text, text
    [failed] = events(layout.hospital.audit_log, "config.reload_failed")
    if files == "right":
        assert "not applied" in text and "reads the configuration files then" in text, text
        assert failed["detail"] == {"refused": "stopping"}, failed
    else:
        assert "cannot build the TLS configuration" in text, text
        # the error's own fix, for once medgw has stopped
        assert "once it has stopped: check the [tls] certificate and key" in text, text
        assert "reads the configuration files then" not in text, text
        assert "refused" not in failed.get("detail", {}), failed
    if asked == "maintenance reload":
        [command] = events(layout.hospital.audit_log, "maintenance.command")
        refused = "stopping" if files == "right" else None
        assert command["detail"].get("refused") == refused, command
    assert not events(layout.hospital.audit_log, "config.reloaded")


async def _maintenance_reload(site: Site) -> tuple[int, str]:
    """``reload`` in an SSH maintenance session of ada's: its exit status and text."""
    conn = await site.connect("ada", site.code("ada"))
    async with conn:
        done = await conn.run("reload")
    return int(done.exit_status or 0), str(done.stdout) + str(done.stderr)
