"""Remote maintenance over SSH, with real clients: OpenSSH's ``ssh`` and ``sftp``
(keyboard-interactive answered through SSH_ASKPASS) and asyncssh's client, against a
real ``medgw run``."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import asyncssh
import pytest

from gateway.audit import DURABLE, AuditEvent, EventType, Pending
from gateway.audit.index import index_path
from gateway.clock import SystemClock
from gateway.config import load_config
from gateway.demo_run import drop_file, wait_until
from gateway.errors import ConfigError
from gateway.maintenance import algorithms
from gateway.maintenance.server import MaintenanceServer, _Connection, _Session
from gateway.operations import Reloaded, ReloadRefused
from gateway.pki.demo import DemoLayout
from tests.cli import medgw
from tests.helpers.audit import events as records_of
from tests.helpers.audit import wait_for_events
from tests.helpers.maintenance import ADDRESS, Site


@pytest.fixture
def site(layout: DemoLayout) -> Site:
    return Site(layout)


def test_key_and_code_log_in_and_every_step_is_audited(site: Site, processes: Any) -> None:
    people = ("alice", "victor", "ada")
    for person, role in zip(people, ("operator", "viewer", "admin"), strict=True):
        site.add(person, role)
    processes.start(site.config)
    for person in people:
        site.approve(person)

    async def scenario() -> None:
        conn = await site.connect("alice", site.code("alice"))
        async with conn:
            done = await conn.run("peers list")
            assert done.exit_status == 0 and '"hospital"' in str(done.stdout)
            done = await conn.run("queue list")
            assert done.exit_status == 0
            done = await conn.run("rm -rf /")
            assert done.exit_status == 127 and "unknown command" in str(done.stderr)
        viewer = await site.connect("victor", site.code("victor"))
        async with viewer:
            done = await viewer.run("queue retry 1234")
            assert done.exit_status == 126 and "needs the role operator" in str(done.stderr)
        admin = await site.connect("ada", site.code("ada"))
        async with admin:
            done = await admin.run("audit query --event maintenance.login")
            assert done.exit_status == 0, done.stderr
            shown = [json.loads(line) for line in str(done.stdout).splitlines()]
            assert [r["actor"] for r in shown] == [f"maintainer:{p}" for p in people]
            done = await admin.run("audit query --since yesterday")
            assert done.exit_status == 2 and "not an ISO 8601" in str(done.stderr)
        # a wrong code: refused, audited
        with pytest.raises(asyncssh.PermissionDenied):
            await site.connect("alice", "000000" if site.code("alice") != "000000" else "111111")

    asyncio.run(scenario())
    logins = site.events("maintenance.login")
    assert [r["actor"] for r in logins] == [f"maintainer:{p}" for p in people]
    assert logins[0]["remote_address"] == "127.0.0.1" or logins[0]["remote_address"]
    assert logins[0]["detail"]["key"].startswith("SHA256:")
    assert logins[0]["detail"]["second_factor"] == "passed"
    commands = wait_until(
        lambda: len(site.events("maintenance.command")) >= 6 and site.events("maintenance.command"),
        30,
        "the commands in the audit trail",
    )
    assert [(c["detail"]["command"], c["detail"]["exit_status"]) for c in commands] == [
        ("peers list", 0),
        ("queue list", 0),
        ("rm -rf /", 127),
        ("queue retry", 126),
        ("audit query", 0),
        ("audit query", 2),
    ]
    assert commands[4]["detail"]["reveals"] == "patient identifiers"
    assert commands[4]["detail"]["shown"]["records"] == 3
    assert commands[4]["detail"]["arguments"] == ["--event", "maintenance.login"]
    assert commands[1]["detail"]["reveals"] == "documents" or "shown" not in commands[1]["detail"]
    failed = wait_until(
        lambda: [
            r
            for r in site.events("maintenance.login_failed")
            if r["detail"].get("second_factor") == "failed"
        ],
        30,
        "the wrong code in the audit trail",
    )
    assert failed[0]["actor"] == "maintainer:alice" and failed[0]["reason"] == "wrong one-time code"
    wait_until(lambda: len(site.events("maintenance.logout")) >= 2, 30, "the logouts")
    # the review report: one entry per connection, its commands, the approvals
    today = time.strftime("%Y-%m-%d", time.gmtime())
    window = ["--since", today, "--until", today, "--format", "json"]
    review = subprocess.run(
        [
            sys.executable,
            "-m",
            "gateway",
            "audit",
            "sessions",
            *window,
            "--config",
            str(site.config),
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    entries = [json.loads(line) for line in review.stdout.splitlines()]
    approvals = [e for e in entries if e["approved"]]
    assert [a["person"] for a in approvals] == list(people)
    assert all(a["approved"]["reason"] == "CRL" for a in approvals)
    alice, victor, _ada, wrong = [e for e in entries if not e["approved"]]
    assert alice["person"] == "alice" and alice["login"] == "passed" and alice["role"] == "operator"
    assert alice["key"].startswith("SHA256:") and alice["source"]
    assert [c["command"] for c in alice["commands"]] == ["peers list", "queue list", "rm -rf /"]
    assert victor["commands"][0]["arguments"] == ["1234"]
    assert victor["commands"][0]["exit_status"] == 126
    assert wrong["login"] == "refused: wrong one-time code" and wrong["commands"] == []
    table = subprocess.run(
        [sys.executable, "-m", "gateway", "audit", "sessions", "--config", str(site.config)],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert "$ queue retry 1234  -> 126" in table and "APPROVED alice" in table
    # what a command showed, as a person reads it (not as Python writes it)
    assert "$ audit query --event maintenance.login  -> 0  shown: records 3\n" in table


def test_the_console_s_audit_query_answers_what_the_host_s_does(
    layout: DemoLayout, site: Site, processes: Any
) -> None:
    """``audit query`` in the console and ``medgw audit query`` on the host are one review:
    the same records for the same filters (a date alone as --until includes that day),
    read through the same review index beside the log."""
    site.add("ada", "admin")
    processes.start(layout.hospital.config_path)
    processes.start(site.config)
    site.approve("ada")
    document = b"MSH|^~\\&|LIS|LAB\rPID|1||PAT-4711^^^MR||YAMADA^HANAKO||19800101|F\r"
    drop_file(layout.lab.outbox_for("hospital"), "result.hl7", document)
    wait_for_events(site.audit, "receipt.received")
    today = time.strftime("%Y-%m-%d", time.gmtime())
    filters = ["--patient", "PAT-4711", "--until", today]

    async def console() -> list[dict[str, Any]]:
        async with await site.connect("ada", site.code("ada")) as admin:
            done = await admin.run(f"audit query {' '.join(filters)}")
        assert done.exit_status == 0, done.stderr
        return [json.loads(line) for line in str(done.stdout).splitlines()]

    in_console = asyncio.run(console())
    assert index_path(site.audit).exists()  # the console built the review index
    (asked,) = wait_for_events(site.audit, "maintenance.command")
    on_host = medgw("audit", "query", "--config", site.config, "--format", "json", *filters)
    assert on_host.returncode == 0, on_host.stderr
    # and the console's query itself, which named the patient it showed
    assert [*in_console, asked] == [json.loads(line) for line in on_host.stdout.splitlines()]
    events = {r["event"] for r in in_console}
    assert {"message.accepted", "receipt.received"} <= events, events


def test_a_key_without_a_code_an_expired_account_and_no_window_are_refused(
    site: Site, processes: Any
) -> None:
    site.add("alice", "operator")
    site.add("erin", "admin", expires="2020-01-01")
    site.add("nora", "operator")
    processes.start(site.config)
    site.approve("alice")
    site.approve("erin")
    # OpenSSH in batch mode: the key alone, no keyboard-interactive
    done = site.ssh("alice", command="status")
    assert done.returncode == 255 and "Permission denied" in done.stderr
    wait_until(
        lambda: [
            r
            for r in site.events("maintenance.login_failed")
            if r["detail"].get("second_factor") == "missing"
        ],
        30,
        "the missing second factor in the audit trail",
    )
    done = site.ssh("erin", command="status", code=site.code("erin"))
    assert done.returncode == 255, done.stdout
    done = site.ssh("nora", command="status", code=site.code("nora"))
    assert done.returncode == 255, done.stdout
    reasons = wait_until(
        lambda: (
            len(site.events("maintenance.login_failed")) >= 3
            and [r["reason"] for r in site.events("maintenance.login_failed")]
        ),
        30,
        "the refusals",
    )
    assert any(
        "expired on 2020-01-01: an administrator of the gateway extends it" in r for r in reasons
    ), reasons
    assert any("no approved maintenance window" in r for r in reasons), reasons
    # With the key and the code, OpenSSH gets in
    done = site.ssh("alice", command="status", code=site.code("alice"))
    assert done.returncode == 0, done.stderr
    assert '"peers"' in done.stdout


def test_a_shell_a_port_forward_and_sftp_are_refused_and_audited(
    site: Site, processes: Any
) -> None:
    # one person per login: a one-time code is accepted once
    for person in ("alice", "bob", "carol"):
        site.add(person, "admin")
    processes.start(site.config)
    for person in ("alice", "bob", "carol"):
        site.approve(person)
    shell = site.ssh("alice", code=site.code("alice"))
    assert shell.returncode != 0
    assert "shell request failed" in shell.stderr or "failed" in shell.stderr
    # agent and X11 forwarding asked for along with a command: refused, the command runs
    agent_socket = site.root / "agent.sock"
    agent = subprocess.Popen(
        ["ssh-agent", "-D", "-a", str(agent_socket)], stdout=subprocess.DEVNULL
    )
    try:
        wait_until(agent_socket.exists, 30, "the ssh-agent socket")
        done = site.ssh(
            "alice",
            "-A",
            "-X",
            command="status",
            code=site.code("alice", 1),
            env={"SSH_AUTH_SOCK": str(agent_socket)},
        )
    finally:
        agent.terminate()
        agent.wait(30)
    assert done.returncode == 0, done.stderr
    assert "X11 forwarding request failed" in done.stderr
    forward = site.ssh("bob", "-W", "127.0.0.1:22", code=site.code("bob"))
    assert forward.returncode != 0 and "administratively prohibited" in forward.stderr
    sftp = site.ssh("carol", "-b", "/dev/null", code=site.code("carol"), prog="sftp")
    assert sftp.returncode != 0
    refused = wait_until(
        lambda: (
            len(site.events("maintenance.request_refused")) >= 5
            and [r["detail"]["request"] for r in site.events("maintenance.request_refused")]
        ),
        30,
        "the refused requests",
    )
    assert "a shell" in refused
    assert "port forwarding to 127.0.0.1:22" in refused
    assert "the sftp subsystem" in refused
    assert "agent forwarding" in refused and "X11 forwarding" in refused


def test_only_cryptrec_algorithms_are_negotiated(site: Site, processes: Any) -> None:
    site.add("alice", "viewer")
    processes.start(site.config)
    site.approve("alice")
    offered = {
        what: subprocess.run(
            ["ssh", "-Q", what], capture_output=True, text=True, check=True
        ).stdout.split()
        for what in ("kex", "cipher", "mac")
    }
    assert set(algorithms.KEX) <= set(offered["kex"])
    assert set(algorithms.CIPHERS) <= set(offered["cipher"])
    assert set(algorithms.MACS) <= set(offered["mac"])
    done = site.ssh("alice", "-vv", command="status", code=site.code("alice"))
    assert done.returncode == 0, done.stderr
    kex = re.findall(r"kex: algorithm: (\S+)", done.stderr)
    host_key = re.findall(r"kex: host key algorithm: (\S+)", done.stderr)
    ciphers = re.findall(r"kex: \S+ cipher: (\S+) MAC: (\S+)", done.stderr)
    assert kex and set(kex) <= set(algorithms.KEX), done.stderr
    assert host_key == ["ecdsa-sha2-nistp384"]
    assert len(ciphers) == 2, done.stderr
    for cipher, mac in ciphers:
        assert cipher in algorithms.CIPHERS
        assert mac in algorithms.MACS or (mac == "<implicit>" and "gcm" in cipher)
    for option in (
        "KexAlgorithms=curve25519-sha256,diffie-hellman-group14-sha256",
        "Ciphers=chacha20-poly1305@openssh.com,aes256-cbc",
        "MACs=umac-128-etm@openssh.com,hmac-sha1",
        "HostKeyAlgorithms=ssh-ed25519,rsa-sha2-256",
    ):
        done = site.ssh("alice", "-o", option, command="status", code=site.code("alice"))
        assert done.returncode == 255 and "no matching" in done.stderr, (option, done.stderr)


def test_an_account_removed_at_reload_loses_its_open_session(site: Site, processes: Any) -> None:
    site.add("oscar", "operator")
    proc = processes.start(site.config)
    site.approve("oscar")

    async def scenario() -> None:
        conn = await site.connect("oscar", site.code("oscar"))
        done = await conn.run("status")
        assert done.exit_status == 0
        (site.folder / "oscar.toml").unlink()
        os.kill(proc.proc.pid, signal.SIGHUP)
        await asyncio.wait_for(conn.wait_closed(), 60)

    asyncio.run(scenario())
    logout = wait_until(lambda: site.events("maintenance.logout"), 30, "the logout")
    assert logout[0]["reason"] == "the account was removed"
    assert logout[0]["actor"] == "maintainer:oscar"


def test_the_accounts_at_start_and_each_change_at_reload_are_recorded(
    site: Site, processes: Any
) -> None:
    """When an account was given, changed or revoked can be proven from the trail (MNT-2),
    even for an account nobody logged in with."""
    site.add("alice", "operator")
    site.add("oscar", "viewer")
    processes.start(site.config)
    [started] = wait_for_events(site.audit, "daemon.started")
    shown = started["detail"]["maintainers"]
    assert [(m["person"], m["role"], m["expires"]) for m in shown] == [
        ("alice", "operator", "2099-12-31"),
        ("oscar", "viewer", "2099-12-31"),
    ]
    assert shown[0]["keys"][0].startswith("SHA256:")
    assert site.secrets["alice"] not in json.dumps(started)  # never the TOTP secret
    site.add("jiro", "admin")
    (site.folder / "oscar.toml").unlink()
    alice = site.folder / "alice.toml"
    text = alice.read_text().replace('role = "operator"', 'role = "admin"')
    alice.write_text(text.replace("expires = 2099-12-31", "expires = 2027-03-31"))
    done = medgw("reload", "--config", site.config)
    assert done.returncode == 0, done.stderr
    names = ("account_added", "account_removed", "account_changed")
    found = wait_for_events(site.audit, tuple(f"maintenance.{n}" for n in names), count=3)
    by_event = {r["event"]: r for r in found}
    assert len(by_event) == 3, found
    added = by_event["maintenance.account_added"]
    assert (added["detail"]["person"], added["detail"]["role"]) == ("jiro", "admin")
    assert added["actor"].startswith("operator:")
    assert by_event["maintenance.account_removed"]["detail"]["person"] == "oscar"
    changed = by_event["maintenance.account_changed"]["detail"]
    assert changed["person"] == "alice"
    assert changed["changed"] == {
        "role": {"was": "operator", "now": "admin"},
        "expires": {"was": "2099-12-31", "now": "2027-03-31"},
    }
    # a reload that changes no account records none
    again = medgw("reload", "--config", site.config)
    assert again.returncode == 0, again.stderr
    wait_for_events(site.audit, "config.reloaded", count=2)
    assert len(records_of(site.audit, tuple(f"maintenance.{n}" for n in names))) == 3


def test_logins_by_a_removed_account_or_an_unknown_key_are_recorded_bounded(
    site: Site, processes: Any
) -> None:
    """A revoked vendor engineer who tries is on record (user name, address, reason); a
    scanner trying names gets one record per address and minute, then a count."""
    site.add("hanako", "operator")
    proc = processes.start(site.config)
    (site.folder / "hanako.toml").unlink()
    assert medgw("reload", "--config", site.config).returncode == 0
    done = site.ssh("hanako", command="status")  # OpenSSH, hanako's old key
    assert done.returncode == 255 and "Permission denied" in done.stderr, done.stderr
    [refused] = wait_for_events(
        site.audit,
        "maintenance.login_failed",
        where=lambda r: r["detail"].get("first_factor") == "refused",
    )
    assert refused["detail"]["user"] == "hanako" and "actor" not in refused
    assert refused["reason"] == "no account named 'hanako' (never added, or removed)"
    assert refused["remote_address"] == "127.0.0.1"
    hanako_key = site.key("hanako").with_suffix(".pub")
    assert refused["detail"]["offered_key"] == asyncssh.read_public_key(hanako_key).get_fingerprint(
        "sha256"
    )

    async def scanner() -> None:
        for name in ("root", "admin", "mallory", "root", "oracle"):
            with pytest.raises(asyncssh.PermissionDenied):
                await site.connect(name, None)

    asyncio.run(scanner())
    # the stop writes the count of the minute not yet over
    assert proc.stop() == 0
    records = records_of(site.audit, "maintenance.login_failed")
    assert records[0] == refused
    [summary] = [r for r in records if "not_recorded_one_by_one" in r["detail"]]
    assert summary["detail"]["not_recorded_one_by_one"] == 5, summary
    assert summary["detail"]["users"] == ["hanako", "root", "admin", "mallory", "oracle"]
    assert summary["remote_address"] == "127.0.0.1"
    assert "5 more logins from 127.0.0.1 refused at the key within 60 s" in summary["reason"]
    assert len(records) == 2, records


def _problems(config: Path) -> list[str]:
    try:
        load_config(config)
    except ConfigError as exc:
        return [str(p) for p in exc.problems]
    return []


def test_check_config_keeps_maintenance_off_the_zones_networks(site: Site) -> None:
    assert _problems(site.config) == []
    text = site.config.read_text()
    on_listener = text.replace(f'listen = "{ADDRESS}:', 'listen = "127.0.0.1:')
    site.config.write_text(on_listener)
    [problem] = _problems(site.config)
    assert "maintenance.listen" in problem and "also the address of listener" in problem
    # the fix offers a loopback address the listener does not use, not its own
    assert "(or 127.0.0.1" not in problem and "(or 127.0.0.2, reached" in problem, problem
    in_egress = text.replace(f'listen = "{ADDRESS}:', 'listen = "192.0.2.5:').replace(
        'egress = ["127.0.0.0/8"]', 'egress = ["127.0.0.0/8", "192.0.2.0/24"]'
    )
    site.config.write_text(in_egress)
    [problem] = _problems(site.config)
    assert "inside the egress of zone" in problem
    done = subprocess.run(
        [sys.executable, "-m", "gateway", "check-config", "--config", str(site.config)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 1 and "inside the egress of zone" in done.stdout + done.stderr


def test_an_account_file_with_an_unknown_key_a_weak_key_or_loose_mode_is_refused(
    site: Site,
) -> None:
    site.add("alice", "operator")
    path = site.folder / "alice.toml"
    text = path.read_text()
    path.write_text(text + 'shell = "/bin/bash"\n')
    problems = _problems(site.config)
    assert any("shell" in p and "unknown key" in p for p in problems), problems
    subprocess.run(
        ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(site.root / "ed")], check=True
    )
    ed = (site.root / "ed.pub").read_text().strip()
    path.write_text(text.replace("public_keys = [", f'public_keys = ["{ed}", '))
    problems = _problems(site.config)
    assert any(
        "ssh-ed25519 keys are not accepted: a maintainer's key is ECDSA" in p for p in problems
    ), problems
    path.write_text(text)
    path.chmod(0o644)
    problems = _problems(site.config)
    assert any("accessible by other users" in p and "chmod 600" in p for p in problems)


def test_one_key_in_two_accounts_is_refused_naming_both_files(site: Site) -> None:
    """A shared key is a shared account: the trail could not say who logged in."""
    site.add("hanako", "operator")
    site.add("hanako2", "admin")
    assert _problems(site.config) == []
    theirs = site.key("hanako").with_suffix(".pub").read_text().strip()
    second = site.folder / "hanako2.toml"
    own = site.key("hanako2").with_suffix(".pub").read_text().strip()
    second.write_text(second.read_text().replace(own, theirs))
    [problem] = _problems(site.config)
    assert str(second) in problem and "public_keys" in problem, problem
    assert "also a key of account 'hanako'" in problem and "hanako.toml" in problem, problem
    assert "give each person a key of their own" in problem, problem
    done = subprocess.run(
        [sys.executable, "-m", "gateway", "check-config", "--config", str(site.config)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 1 and "shared key" in done.stdout + done.stderr


def test_maintainer_add_writes_the_account_and_shows_its_secret_once(
    site: Site, processes: Any
) -> None:
    public = site.key("hana").with_suffix(".pub")
    command = [sys.executable, "-m", "gateway", "maintainer", "add", "hana", "--role"]
    command += ["operator", "--key", str(public), "--expires", "2099-01-31"]
    command += ["--config", str(site.config)]
    done = subprocess.run(command, capture_output=True, text=True, check=True)
    [secret] = re.findall(r"secret: ([A-Z2-7]+)", done.stdout)
    assert "otpauth://totp/" in done.stdout and f"secret={secret}" in done.stdout
    assert "\u2588" in done.stdout or "\u2580" in done.stdout  # the QR code, drawn in blocks
    account = site.folder / "hana.toml"
    assert account.stat().st_mode & 0o777 == 0o600
    assert secret in account.read_text()
    again = subprocess.run(command, capture_output=True, text=True, check=False)
    assert again.returncode == 1 and "exists" in again.stderr
    assert secret in account.read_text()  # unchanged
    site.secrets["hana"] = secret
    processes.start(site.config)
    site.approve("hana")

    async def scenario() -> None:
        async with await site.connect("hana", site.code("hana")) as conn:
            assert (await conn.run("status")).exit_status == 0

    asyncio.run(scenario())


def test_a_one_time_code_is_accepted_once(site: Site, processes: Any) -> None:
    site.add("alice", "operator")
    processes.start(site.config)
    site.approve("alice")

    async def scenario() -> None:
        code = site.code("alice", 1)  # the next step's code: still valid on the next try
        async with await site.connect("alice", code):
            pass
        with pytest.raises(asyncssh.PermissionDenied):
            await site.connect("alice", code)

    asyncio.run(scenario())
    refused = wait_until(
        lambda: [
            r
            for r in site.events("maintenance.login_failed")
            if r["reason"] == "one-time code already used"
        ],
        30,
        "the replayed code in the audit trail",
    )
    assert refused[0]["actor"] == "maintainer:alice"


def test_a_key_verified_for_one_person_is_not_the_first_factor_of_another(site: Site) -> None:
    """SSH lets a client change the user name between authentication requests."""
    site.add("alice", "admin")
    site.add("bob", "admin")
    settings = load_config(site.config).maintenance
    assert settings is not None
    events: list[AuditEvent] = []

    class Sink:
        def emit(self, event: AuditEvent) -> None:
            events.append(event)

        def emit_all(self, batch: Sequence[AuditEvent]) -> None:
            events.extend(batch)

        def emit_later(self, events: Sequence[AuditEvent]) -> Pending:
            self.emit_all(events)
            return DURABLE

    async def no_reload(actor: str) -> Reloaded | ReloadRefused:
        return ReloadRefused("not here")

    def no_operations() -> Any:
        raise AssertionError("nobody logs in here")

    server = MaintenanceServer(
        settings, no_operations, Sink, SystemClock(), no_reload, lambda *_: True
    )
    alice_key = asyncssh.read_public_key(site.key("alice").with_suffix(".pub"))
    connection = _Connection(server)
    connection.begin_auth("alice")
    connection._session.fingerprint = alice_key.get_fingerprint("sha256")
    assert connection.kbdint_auth_supported()
    connection.begin_auth("bob")
    assert not connection.kbdint_auth_supported()
    # and alice's key with bob's code is no login of bob's
    session = _Session("s", "127.0.0.1", "bob", alice_key.get_fingerprint("sha256"))
    assert not server.check_code(session, site.code("bob"))
    assert not session.logged_in
    assert [e.event for e in events] == [EventType.MAINTENANCE_LOGIN_FAILED]


def test_a_session_ends_when_its_approved_window_ends(site: Site, processes: Any) -> None:
    site.add("alice", "operator")
    processes.start(site.config)
    # Long enough for the approval's process and the login to start within it on a
    # loaded machine (the approval of a window already past is refused).
    end = time.gmtime(time.time() + 20)
    until = time.strftime("%Y-%m-%dT%H:%M:%S+00:00", end)
    command = ["maintenance", "approve", "alice", "--until", until, "--reason", "short job"]
    done = subprocess.run(
        [sys.executable, "-m", "gateway", *command, "--config", str(site.config)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 0, done.stderr

    async def scenario() -> None:
        conn = await site.connect("alice", site.code("alice"))
        assert (await conn.run("status")).exit_status == 0
        await asyncio.wait_for(conn.wait_closed(), 60)  # not at the idle timeout (900 s)

    asyncio.run(scenario())
    [logout] = wait_until(lambda: site.events("maintenance.logout"), 30, "the logout")
    assert logout["reason"] == "the approved maintenance window has ended"
    assert logout["actor"] == "maintainer:alice"
    assert logout["time"] >= time.strftime("%Y-%m-%dT%H:%M:%S", end)


def test_wrong_codes_lock_the_person_out_until_an_admin_unlocks(site: Site, processes: Any) -> None:
    site.add("alice", "operator")
    processes.start(site.config)
    site.approve("alice")
    wrong = "000000" if site.code("alice") != "000000" else "111111"

    async def refused(code: str) -> None:
        with pytest.raises(asyncssh.PermissionDenied):
            await site.connect("alice", code)

    for _ in range(5):  # each connection takes up to three codes
        asyncio.run(refused(wrong))
        if site.events("maintenance.locked"):
            break
    [locked] = site.events("maintenance.locked")
    assert locked["severity"] == "alert" and locked["actor"] == "maintainer:alice"
    assert "medgw maintenance unlock alice" in locked["reason"]
    # the right code is refused now, in the same way, and audited as locked
    asyncio.run(refused(site.code("alice")))
    reasons = [r["reason"] for r in site.events("maintenance.login_failed")]
    assert any(r.startswith("logins locked until") for r in reasons), reasons
    unlock = ["maintenance", "unlock", "alice", "--config", str(site.config)]
    done = subprocess.run(
        [sys.executable, "-m", "gateway", *unlock],
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == {"person": "alice", "was_locked": True}
    [unlocked] = wait_until(lambda: site.events("maintenance.unlocked"), 30, "the unlock")
    assert unlocked["actor"].startswith("operator:")
    # The review: the lockout in the session that caused it, the unlock as what it is.
    review = medgw("audit", "sessions", "--config", site.config)
    assert review.returncode == 0, review.stderr
    assert f"  LOCKED: {locked['reason']}\n" in review.stdout
    assert f"  UNLOCKED alice by {unlocked['actor']} (was_locked True)\n" in review.stdout
    assert "SESSION None" not in review.stdout and "from None" not in review.stdout

    async def works() -> None:
        async with await site.connect("alice", site.code("alice", 1)) as conn:
            assert (await conn.run("status")).exit_status == 0

    asyncio.run(works())


def test_a_peer_url_or_hand_over_at_the_maintenance_port_is_refused(site: Site) -> None:
    peer = next(site.root.glob("peers.d/*.toml"))
    text = peer.read_text()
    url = re.search(r'^url = "(https://[^"]+)"', text, re.M)
    assert url is not None
    peer.write_text(text.replace(url.group(1), f"https://{ADDRESS}:{site.port}/as2"))
    problems = _problems(site.config)
    assert any(
        "the SSH maintenance listener" in p and "send this peer's messages to itself" in p
        for p in problems
    ), problems
    peer.write_text(text)
    with site.config.open("a") as handle:
        handle.write(f'\n[delivery]\nhttp_url = "http://{ADDRESS}:{site.port}/inbox"\n')
    problems = _problems(site.config)
    assert any(
        "delivery.http_url" in p and "the SSH maintenance listener" in p for p in problems
    ), problems
