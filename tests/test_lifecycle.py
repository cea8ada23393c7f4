"""Signals and systemd integration of a real ``medgw run`` subprocess (and of the
daemon run in this process, where a test must act while it stops)."""

from __future__ import annotations

import asyncio
import io
import os
import pwd
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from gateway.clock import SystemClock
from gateway.daemon import Daemon
from gateway.demo_run import drop_file, wait_until
from gateway.logs import make_logger
from gateway.pki.demo import DemoLayout
from tests.cli import medgw
from tests.helpers.audit import events, wait_for_events
from tests.helpers.demo import edit, new_demo
from tests.helpers.maintenance import ADDRESS as MAINTENANCE_ADDRESS
from tests.helpers.maintenance import enable_maintenance
from tests.helpers.notify import NotifySocket
from tests.helpers.other_user import as_nobody, give_to_nobody, open_folder


def test_sigterm_stops_cleanly_with_exit_0(layout: DemoLayout, processes: Any) -> None:
    proc = processes.start(layout.hospital.config_path)
    started = time.monotonic()
    assert proc.stop(timeout=15) == 0
    assert time.monotonic() - started < 12  # within the 10 s shutdown deadline (+ start-up)
    assert events(layout.hospital.audit_log, "daemon.stopped")
    assert any(line.get("event") == "daemon.stopped" for line in proc.lines)


def test_sigterm_parks_undelivered_work_and_the_next_run_delivers_it(
    layout: DemoLayout, processes: Any
) -> None:
    lab = processes.start(layout.lab.config_path)  # the hospital is down
    drop_file(layout.lab.outbox_dir / "hospital", "parked.hl7", b"MSH|parked\r")
    wait_for_events(layout.lab.audit_log, "message.send_failed")
    assert lab.stop(timeout=15) == 0
    processes.start(layout.hospital.config_path)
    processes.start(layout.lab.config_path)
    wait_for_events(layout.lab.audit_log, "receipt.received")
    assert (layout.hospital.inbox_dir / "lab" / "parked.hl7").read_bytes() == b"MSH|parked\r"


def test_sighup_applies_a_valid_change(layout: DemoLayout, processes: Any) -> None:
    proc = processes.start(layout.hospital.config_path)
    peer_file = layout.hospital.root / "peers.d" / "lab.toml"
    text = peer_file.read_text()
    assert 'cipher = "aes-256-gcm"' in text
    peer_file.write_text(text.replace('cipher = "aes-256-gcm"', 'cipher = "aes-128-gcm"'))
    proc.signal(signal.SIGHUP)
    wait_for_events(layout.hospital.audit_log, "config.reloaded")
    assert proc.proc.poll() is None


def test_sighup_with_broken_config_keeps_serving_on_the_old_one(
    layout: DemoLayout, processes: Any
) -> None:
    hospital = processes.start(layout.hospital.config_path)
    processes.start(layout.lab.config_path)
    config = layout.hospital.config_path
    good = config.read_text()
    config.write_text(good.replace("[storage]", "[storage]\nstate_dri = 'typo'"))
    hospital.signal(signal.SIGHUP)
    failed = wait_for_events(layout.hospital.audit_log, "config.reload_failed")
    assert "state_dri" in failed[0]["reason"] and "unknown key" in failed[0]["reason"]
    hospital.wait_for(
        lambda line: (
            line.get("event") == "config.reload_failed" and "previous" in line.get("action", "")
        ),
        30,
    )

    # Still serving, with the old configuration: an exchange goes through.
    drop_file(layout.lab.outbox_dir / "hospital", "after-bad-reload.hl7", b"MSH|still up\r")
    wait_for_events(layout.lab.audit_log, "receipt.received")
    assert (layout.hospital.inbox_dir / "lab" / "after-bad-reload.hl7").exists()
    assert hospital.proc.poll() is None
    config.write_text(good)
    hospital.signal(signal.SIGHUP)
    wait_for_events(layout.hospital.audit_log, "config.reloaded")


def test_medgw_reload_records_who_asked_and_sighup_records_signal(
    layout: DemoLayout, processes: Any
) -> None:
    """``medgw reload`` asks over the control socket, which knows the caller's uid
    (SO_PEERCRED): the reload's audit record names that person, a refused one too (and
    the command says why); SIGHUP's record can only say ``signal``."""
    config = layout.hospital.config_path
    audit = layout.hospital.audit_log
    hospital = processes.start(config)
    person = f"operator:{pwd.getpwuid(os.getuid()).pw_name} (uid {os.getuid()}"
    done = medgw("reload", "--config", config)
    assert done.returncode == 0 and "configuration reloaded" in done.stdout, done.stderr
    [asked] = wait_for_events(audit, "config.reloaded")
    assert asked["actor"].startswith(person), asked
    hospital.signal(signal.SIGHUP)
    [_, signalled] = wait_for_events(audit, "config.reloaded", count=2)
    assert signalled["actor"] == "signal"

    good = config.read_text()
    config.write_text(good.replace("[storage]", "[storage]\nstate_dri = 'typo'"))
    refused = medgw("reload", "--config", config)
    assert refused.returncode == 1
    assert "state_dri" in refused.stderr and "previous one" in refused.stderr, refused.stderr
    [failed] = wait_for_events(audit, "config.reload_failed")
    assert failed["actor"] == asked["actor"] and "state_dri" in failed["reason"]
    assert hospital.proc.poll() is None  # serving on with the previous configuration
    assert hospital.stop() == 0
    stopped = medgw("reload", "--config", config)
    assert stopped.returncode == 1 and "medgw is not running" in stopped.stderr


def test_a_reload_of_a_change_only_a_restart_applies_says_to_restart(
    layout: DemoLayout, processes: Any
) -> None:
    """``medgw reload`` of files whose change only a restart applies (the AS2 identifier):
    refused with that error's own fix, to restart medgw; not told to correct files that
    are right as they are."""
    config = layout.hospital.config_path
    hospital = processes.start(config)
    text = config.read_text()
    assert 'as2_id = "SAKURA-HOSPITAL"' in text
    config.write_text(text.replace('as2_id = "SAKURA-HOSPITAL"', 'as2_id = "SAKURA-2"'))
    refused = medgw("reload", "--config", config)
    assert refused.returncode == 1, refused.stdout
    assert "gateway.as2_id cannot change while running" in refused.stderr, refused.stderr
    assert "restart medgw (systemctl restart medgw)" in refused.stderr, refused.stderr
    assert "correct what it names" not in refused.stderr, refused.stderr
    assert "check-config" not in refused.stderr, refused.stderr
    [failed] = wait_for_events(layout.hospital.audit_log, "config.reload_failed")
    assert "gateway.as2_id" in failed["reason"], failed
    assert hospital.proc.poll() is None  # serving on with the previous configuration


def test_sd_notify_ready_reloading_stopping_and_watchdog(
    layout: DemoLayout, processes: Any, tmp_path: Path
) -> None:
    notify = NotifySocket(tmp_path / "notify.sock")
    try:
        env = {"NOTIFY_SOCKET": str(notify.path), "WATCHDOG_USEC": "400000"}
        proc = processes.start(layout.hospital.config_path, env=env)
        wait_until(lambda: "READY=1" in notify.states(), 30, "READY=1")
        wait_until(lambda: notify.states().count("WATCHDOG=1") >= 3, 30, "watchdog pings")
        proc.signal(signal.SIGHUP)
        wait_until(lambda: "RELOADING=1" in notify.states(), 30, "RELOADING=1")
        wait_until(lambda: notify.states().count("READY=1") >= 2, 30, "READY=1 after reload")
        assert proc.stop(timeout=15) == 0
        wait_until(lambda: "STOPPING=1" in notify.states(), 30, "STOPPING=1")
        states = notify.states()
        assert states.index("RELOADING=1") < len(states) - 1 - states[::-1].index("READY=1")
    finally:
        notify.close()


def test_refuses_to_start_on_invalid_config_and_says_why(
    layout: DemoLayout, processes: Any
) -> None:
    config = layout.hospital.config_path
    config.write_text(config.read_text().replace("[runtime]", "[runtime]\nshutdown_deadline = 5"))
    proc = processes.start(config, wait=False)
    assert proc.wait_exit() == 1
    output = "\n".join(proc.raw)
    assert "runtime.shutdown_deadline" in output and "unknown key" in output
    assert "check-config" in output


def test_sigterm_does_not_wait_for_idle_keep_alive_connections(
    layout: DemoLayout, processes: Any
) -> None:
    hospital = processes.start(layout.hospital.config_path)
    processes.start(layout.lab.config_path)
    drop_file(layout.lab.outbox_dir / "hospital", "kept-alive.hl7", b"MSH|x\r")
    wait_for_events(layout.lab.audit_log, "receipt.received")
    # The lab keeps its connection to the hospital open for the next document.
    started = time.monotonic()
    assert hospital.stop(timeout=15) == 0
    assert time.monotonic() - started < 5  # not the 10 s shutdown deadline


def test_a_second_daemon_on_the_same_state_folder_stops_before_touching_it(
    layout: DemoLayout, processes: Any
) -> None:
    first = processes.start(layout.hospital.config_path)
    processes.start(layout.lab.config_path)
    # What a second start would otherwise clear: a body the first is receiving.
    receiving = layout.hospital.root / "state" / "incoming" / "in-progress.as2"
    receiving.write_bytes(b"half a message")
    second = subprocess.run(
        [sys.executable, "-m", "gateway", "run", "--config", str(layout.hospital.config_path)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert second.returncode == 1
    assert f"another medgw (pid {first.proc.pid}) is already running" in second.stderr
    assert "systemctl stop medgw" in second.stderr
    assert receiving.read_bytes() == b"half a message"
    # The first one carries on.
    drop_file(layout.lab.outbox_dir / "hospital", "still.hl7", b"MSH|still\r")
    wait_until(lambda: (layout.hospital.inbox_dir / "lab" / "still.hl7").exists(), 60, "delivery")
    assert first.proc.poll() is None
    assert first.stop() == 0
    restarted = processes.start(layout.hospital.config_path)  # the lock went with the process
    assert restarted.proc.poll() is None


def test_a_start_removes_the_decrypted_working_files_a_killed_run_left(
    layout: DemoLayout, processes: Any
) -> None:
    """A large received message is decrypted into state/incoming (in the clear) while it
    is verified; a run killed meanwhile leaves those files: the next start removes them
    before it takes any work (the peer, never answered, resends)."""
    incoming = layout.hospital.root / "state" / "incoming"
    incoming.mkdir(parents=True, exist_ok=True)
    left = [incoming / n for n in ("0f1e.as2", "0f1e.signed", "0f1e.entity")]
    for path in left:
        path.write_bytes(b"MSH|^~\\&|LAB|KITA|HIS|HOSP|a patient's document\r")
    processes.start(layout.hospital.config_path)
    assert not [p for p in left if p.exists()]


def test_a_sighup_while_stopping_is_not_a_failed_reload(layout: DemoLayout) -> None:
    """Once stopping, the daemon waits for its worker threads (a received message still
    being delivered) before it closes the spool and the audit log.  A SIGHUP meanwhile
    (a log rotation, say) must not start a reload that can no longer run: no
    "reload failed" error and alert in the audit trail of a clean stop."""
    out = io.StringIO()
    daemon = Daemon(
        layout.hospital.config_path, environ={}, clock=SystemClock(), log=make_logger("info", out)
    )
    audit = layout.hospital.audit_log
    release = threading.Event()

    async def until(name: str) -> None:
        for _ in range(400):
            if events(audit, name):
                return
            await asyncio.sleep(0.05)
        raise AssertionError(f"no {name} in the audit log")

    async def main() -> int:
        running = asyncio.create_task(daemon.run())
        await until("daemon.started")
        # A worker thread still busy when the daemon stops, as a delivery would be.
        busy = asyncio.get_running_loop().run_in_executor(None, release.wait, 30)
        os.kill(os.getpid(), signal.SIGTERM)
        await until("daemon.stopped")  # now waiting for the worker thread
        os.kill(os.getpid(), signal.SIGHUP)
        await asyncio.sleep(0.5)
        release.set()
        await busy
        return await running

    try:
        assert asyncio.run(main()) == 0
    finally:
        release.set()
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        signal.signal(signal.SIGINT, signal.default_int_handler)
    assert not events(audit, "config.reload_failed"), out.getvalue()
    assert "reload_failed" not in out.getvalue()


def test_a_port_in_use_stops_the_start_with_one_clear_error_and_no_noise(
    layout: DemoLayout,
) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", layout.hospital.port))
        taken.listen()
        result = subprocess.run(
            [sys.executable, "-m", "gateway", "run", "--config", str(layout.hospital.config_path)],
            capture_output=True,
            text=True,
            timeout=120,
        )
    assert result.returncode == 1
    port = layout.hospital.port
    assert (
        f"cannot listen on 127.0.0.1:{port} (listener 'loopback'): Address already in use "
        f"(fix: another process listens on port {port} (ss -ltnp 'sport = :{port}' names "
        "it): stop it, or give [[listeners]] 'loopback' another port in gateway.toml)"
    ) in result.stderr
    # Nothing after the error but the error: no "Unclosed client session" from aiohttp.
    assert "Unclosed" not in result.stderr + result.stdout, result.stderr
    assert [line for line in result.stderr.splitlines() if line.strip()] == [
        line for line in result.stderr.splitlines() if line.startswith("medgw: ")
    ]


def test_an_address_this_host_lacks_stops_the_start_naming_it_not_the_port(
    layout: DemoLayout,
) -> None:
    """192.0.2.10 (TEST-NET-1, README's own example) is on no interface of this host."""
    edit(layout.hospital.config_path, '\naddress = "127.0.0.1"', '\naddress = "192.0.2.10"')
    result = medgw("run", "--config", layout.hospital.config_path)
    assert result.returncode == 1
    assert (
        f"cannot listen on 192.0.2.10:{layout.hospital.port} (listener 'loopback'): Cannot "
        "assign requested address (fix: 192.0.2.10 is not an address of this host (ip -br "
        "addr lists them): add it to the interface on the network it serves, or give "
        "[[listeners]] 'loopback' an address this host has)"
    ) in result.stderr, result.stderr
    assert "free the port" not in result.stderr


API_CLIENT = f"""
[[api.clients]]
name = "ris"
token_sha256 = "{"0" * 64}"
peers = ["lab"]
"""


@pytest.mark.parametrize("section", ["metrics", "api", "maintenance"])
def test_a_port_in_use_for_any_other_listener_names_the_process_to_look_for(
    layout: DemoLayout, section: str
) -> None:
    """The metrics endpoint, the local API and the maintenance listener report a port
    taken as the zones' listeners do: the cause, and how to find who holds it."""
    config = layout.hospital.config_path
    address = MAINTENANCE_ADDRESS if section == "maintenance" else "127.0.0.1"
    with socket.socket() as taken:
        taken.bind((address, 0))
        taken.listen()
        port = taken.getsockname()[1]
        if section == "maintenance":
            enable_maintenance(layout.hospital.root, config, f"{address}:{port}")
        else:
            with config.open("a") as handle:
                handle.write(f'\n[{section}]\nlisten = "{address}:{port}"\n')
                if section == "api":
                    handle.write(API_CLIENT)
        result = medgw("run", "--config", config)
    assert result.returncode == 1, result.stderr
    assert (
        f": Address already in use (fix: another process listens on port {port} (ss -ltnp "
        f"'sport = :{port}' names it): stop it, or give [{section}] listen another port in "
        "gateway.toml)"
    ) in result.stderr, result.stderr
    assert "free the port" not in result.stderr


def test_a_port_below_1024_without_the_capability_names_the_capability() -> None:
    """Run as ``nobody``, which may not bind a port below 1024 (EACCES), in a network
    namespace of its own where the unprivileged ports start at 1024 whatever the host's
    setting (0 in some containers)."""
    own_network = (
        "ip link set lo up && echo 1024 > /proc/sys/net/ipv4/ip_unprivileged_port_start "
        '&& exec "$@"'
    )
    with open_folder() as base:
        layout = new_demo(base / "demo")
        edit(layout.hospital.config_path, f"port = {layout.hospital.port}", "port = 1000")
        give_to_nobody(layout.hospital.root)
        config = layout.hospital.config_path
        result = subprocess.run(
            [
                *("unshare", "--net", "sh", "-c", own_network, "sh"),
                *as_nobody(),
                *(sys.executable, "-m", "gateway", "run", "--config", str(config)),
            ],
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
    assert result.returncode == 1
    assert (
        "cannot listen on 127.0.0.1:1000 (listener 'loopback'): Permission denied (fix: port "
        "1000 may be bound only with the capability CAP_NET_BIND_SERVICE: give [[listeners]] "
        "'loopback' a port from 1024 up (and redirect the standard port to it in the "
        "firewall), or grant medgw the capability (see systemd/medgw.service))"
    ) in result.stderr, result.stderr


def test_sigterm_does_not_wait_for_peers_that_never_answer_the_tls_close(
    layout: DemoLayout, processes: Any
) -> None:
    """A TLS connection closed by the listener waits for the peer's own close.  Peers
    whose connections stay open and silent (a crashed client, a firewall dropping
    packets) must not hold the stop past its deadline: from Python 3.12 the listener's
    stop waits for every connection to be gone, and asyncio's TLS close waits 30 s."""
    hospital = processes.start(layout.hospital.config_path)
    certs = layout.lab.root / "certs"
    context = ssl.create_default_context(cafile=str(layout.ca_certificate))
    context.load_cert_chain(str(certs / "tls.crt"), str(certs / "tls.key"))
    silent = []
    for _ in range(3):
        raw = socket.create_connection(("127.0.0.1", layout.hospital.port), timeout=30)
        silent.append(context.wrap_socket(raw, server_hostname="localhost"))
    try:
        started = time.monotonic()
        assert hospital.stop(timeout=60) == 0
        # The demo's shutdown_deadline_seconds is 10; nothing is in progress.
        assert time.monotonic() - started < 10
    finally:
        for conn in silent:
            conn.close()
