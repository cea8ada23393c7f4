"""Break-glass access and emergency mode (EMG-1 to EMG-3), with real clients (OpenSSH's
``ssh`` and asyncssh's) against a real ``medgw run``, and the alert seen at a real
syslog collector (rsyslogd, tests/rsyslog.py)."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
from collections.abc import Sequence
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import asyncssh
import pytest
from cryptography import x509

from gateway.audit import DURABLE, AuditEvent, EventType, Pending, Severity
from gateway.clock import iso_time
from gateway.config import load_config
from gateway.config.emergency import EmergencySettings
from gateway.demo_run import drop_file, wait_until
from gateway.emergency.credential import FILE_NAME as CREDENTIAL_FILE
from gateway.emergency.credential import CredentialError, CredentialStore
from gateway.emergency.mode import EmergencyError, EmergencyMode, MarkingSink, end_of
from gateway.emergency.relax import relaxed
from gateway.errors import ConfigError
from gateway.pki.demo import DemoLayout
from gateway.pki.issue import Issued, issue, make_ca, make_crl
from gateway.pki.peers import TrustSettings
from gateway.pki.validate import Purpose, RevocationPolicy, ValidationResult, validate
from gateway.policy import AlgorithmPolicy
from tests import as2client
from tests.cli import medgw
from tests.clocks import TickingClock
from tests.helpers.audit import events, wait_for_events
from tests.helpers.demo import lab_post, wait_handshake_refused
from tests.helpers.maintenance import ADDRESS, Site
from tests.helpers.ocsp_world import OcspWorld
from tests.helpers.zones import World, as2_message, handshake_refused, post_as2
from tests.rsyslog import Collector


@pytest.fixture
def site(layout: DemoLayout) -> Site:
    return Site(layout)


def run_emergency(config: Path, *args: str) -> str:
    """``medgw emergency ARGS --config CONFIG``, which must succeed; its output."""
    done = medgw("emergency", *args, "--config", config)
    assert done.returncode == 0, done.stderr
    return done.stdout


class Recorder(list[AuditEvent]):
    """An audit sink that keeps what it is given."""

    def emit(self, event: AuditEvent) -> None:
        self.append(event)

    def emit_all(self, events: Sequence[AuditEvent]) -> None:
        self.extend(events)

    def emit_later(self, events: Sequence[AuditEvent]) -> Pending:
        self.emit_all(events)
        return DURABLE


def seal(site: Site) -> str:
    """A new break-glass credential: its key written where Site.ssh looks for the key of
    user ``emergency``; the code returned."""
    key_file = site.root / "emergency_id"
    key_file.unlink(missing_ok=True)
    sealed = run_emergency(site.config, "seal", "--key-file", str(key_file))
    [code] = re.findall(r"code: +(\S+)", sealed)
    assert "BEGIN OPENSSH PRIVATE KEY" in sealed
    # how to use it, with this gateway's maintenance port and address
    assert f"ssh -i KEYFILE -p {site.port} emergency@{ADDRESS} status" in sealed, sealed
    assert key_file.stat().st_mode & 0o777 == 0o600
    return str(code)


def test_break_glass_works_once_raises_the_alert_and_needs_a_new_seal(
    site: Site, processes: Any, collector: Collector
) -> None:
    with site.config.open("a") as handle:
        handle.write(
            f'\n[audit.export]\ncollector = "127.0.0.1:{collector.port}"\n'
            f'ca = "{collector.ca_path}"\ncertificate = "{collector.client_cert}"\n'
            f'key = "{collector.client_key}"\nformat = "atna"\nhostname = "medgw-lab"\n'
        )
    collector.start()
    proc = processes.start(site.config)
    code = seal(site)
    # Only the verifier is kept, readable by its owner only: neither secret.
    [stored] = site.root.rglob(CREDENTIAL_FILE)
    assert stored.stat().st_mode & 0o777 == 0o600
    private = (site.root / "emergency_id").read_text()
    text = stored.read_text()
    assert code not in text and code.replace("-", "") not in text
    assert private.splitlines()[1] not in text
    # No approved window, no maintainers.d account: the envelope's key and code let in.
    done = site.ssh("emergency", command="emergency status", code=code)
    assert done.returncode == 0, done.stderr
    status = json.loads(done.stdout)
    assert status["emergency_mode"]["reason"] == "the break-glass credential was used"
    assert status["break_glass"]["used_at"] is not None
    # The alert: at the collector with syslog severity Alert, and in the daemon's log.
    alert = wait_until(
        lambda: [r for r in collector.received() if r.event == "emergency.break_glass_used"],
        30,
        "the break-glass alert at the syslog collector",
    )
    assert alert[0].severity == 1
    proc.wait_for(
        lambda line: (
            line.get("event") == "audit.alert"
            and line.get("audit_event") == "emergency.break_glass_used"
        ),
        30,
    )
    used = site.events("emergency.break_glass_used")
    assert used[0]["severity"] == "alert" and used[0]["call"]
    assert used[0]["detail"]["serial"] == 1
    entered = site.events("emergency.entered")
    assert entered[0]["actor"] == "maintainer:emergency"

    async def refused(code: str) -> None:
        with pytest.raises(asyncssh.PermissionDenied):
            await site.connect("emergency", code)

    # The second use fails, also after a crash and a restart.
    asyncio.run(refused(code))
    proc.kill()
    processes.start(site.config)
    asyncio.run(refused(code))
    done = site.ssh("emergency", command="status", code=code)
    assert done.returncode == 255
    # Sealed anew: the new envelope works (once), the old key no longer matters.
    new_code = seal(site)

    async def works() -> None:
        async with await site.connect("emergency", new_code) as conn:
            answer = await conn.run("emergency status")
            assert answer.exit_status == 0, answer.stderr

    asyncio.run(works())
    asyncio.run(refused(new_code))
    sealed = site.events("emergency.credential_sealed")
    assert [s["detail"]["serial"] for s in sealed] == [1, 2]
    assert sealed[1]["detail"]["replaces"] == 1 and sealed[1]["detail"]["replaced_was_used"]
    assert len(site.events("emergency.break_glass_used")) == 2
    failed = [
        r for r in site.events("maintenance.login_failed") if r["actor"] == "maintainer:emergency"
    ]
    assert failed, "the refused uses are audited"


def test_a_break_glass_session_ends_with_its_emergency_a_new_seal_and_a_reload(
    site: Site, processes: Any, tmp_path: Path
) -> None:
    """One session for several commands (OpenSSH's ControlMaster, as the README says),
    ended when emergency mode is left, when a new credential is sealed, and at a reload
    that finds the credential removed: each time audited with why, and the command that
    follows is not run."""
    processes.start(site.config)
    control = tmp_path / "cm"
    mux = ("-o", "ControlMaster=no", "-o", f"ControlPath={control}")

    def logged_in(code: str) -> None:
        master = site.master("emergency", control, code)
        assert master.returncode == 0, control.with_suffix(".log").read_text()
        for _ in range(2):  # the envelope is spent once, not per command
            done = site.ssh("emergency", *mux, command="emergency status")
            assert done.returncode == 0, done.stderr

    def ended(number: int, why: str) -> None:
        done = site.ssh("emergency", *mux, command="peers suspend hospital after-the-end")
        assert done.returncode != 0, done.stdout
        [*_, logout] = wait_for_events(
            site.audit,
            "maintenance.logout",
            where=lambda r: r["actor"] == "maintainer:emergency",
            count=number,
        )
        assert why in logout["reason"], logout
        # the connection is gone: the master ends, and its control socket with it
        wait_until(lambda: not control.exists(), 60, "the end of the ssh ControlMaster")
        assert site.events("peer.suspended") == []
        for command in site.events("maintenance.command"):  # refused if it came in time
            detail = command["detail"]
            if detail["session"] == logout["detail"]["session"] and "after-the-end" in str(detail):
                assert detail["refused"] == logout["reason"], command

    logged_in(seal(site))
    run_emergency(site.config, "leave", "--reason", "resolved")
    ended(1, "was left: the break-glass session ends with it")

    logged_in(seal(site))
    code = seal(site)
    ended(2, "a new break-glass credential was sealed (serial 3)")

    logged_in(code)
    [stored] = site.root.rglob(CREDENTIAL_FILE)
    stored.unlink()  # the envelope withdrawn by hand: taken in at the reload
    reloaded = medgw("reload", "--config", site.config)
    assert reloaded.returncode == 0, reloaded.stderr
    ended(3, "a reload: the break-glass credential was removed")
    # The holder logs out as the README says: the session ends, the emergency goes on.
    logged_in(seal(site))
    done = site.ssh("emergency", "-o", f"ControlPath={control}", "-O", "exit")
    assert done.returncode == 0, done.stderr
    wait_until(lambda: not control.exists(), 60, "the end of the ssh ControlMaster")
    [*_, logout] = wait_for_events(
        site.audit,
        "maintenance.logout",
        where=lambda r: r["actor"] == "maintainer:emergency",
        count=4,
    )
    assert logout["reason"] == "the client closed it"
    used = site.events("emergency.break_glass_used")
    assert [e["detail"]["serial"] for e in used] == [1, 2, 3, 1]  # counted from the file
    # The review shows each break-glass session with its use and its emergency's events.
    review = medgw("audit", "sessions", "--config", site.config)
    assert review.returncode == 0, review.stderr
    login = site.events("maintenance.login")[0]["detail"]
    lines = review.stdout.splitlines()
    at = lines.index(next(line for line in lines if login["session"] in line))
    entry = lines[at : at + next(i for i, line in enumerate(lines[at + 1 :], 1) if line[:1] != " ")]
    first = "\n".join(entry)
    assert f"with the break-glass credential 1 (emergency {login['emergency']})" in entry[0]
    assert "emergency.break_glass_used by maintainer:emergency" in first, first
    assert "emergency.entered by maintainer:emergency: the break-glass credential" in first
    assert "emergency.left by operator:" in first and ": resolved" in first, first
    assert "$ emergency status  -> 0" in first, first


def _send_and_wait(layout: DemoLayout, name: str, count: int) -> str:
    """Drop ``name`` in the lab's outbox for the hospital; its message id once the
    hospital has sent its receipt (the last event of the exchange there)."""
    drop_file(layout.lab.outbox_dir / "hospital", name, f"MSH|{name}".encode())
    wait_for_events(layout.hospital.audit_log, "receipt.sent", count=count)
    [accepted] = wait_for_events(
        layout.lab.audit_log,
        "message.accepted",
        where=lambda r: r["detail"].get("filename") == name,
    )
    return str(accepted["message_id"])


def test_the_emergency_report_lists_exactly_the_messages_of_the_window(
    layout: DemoLayout, processes: Any
) -> None:
    config = layout.hospital.config_path
    processes.start(config)
    processes.start(layout.lab.config_path)

    def run(*args: str) -> str:
        return run_emergency(config, *args)

    before = _send_and_wait(layout, "before.hl7", 1)
    entered = json.loads(run("enter", "--reason", "CRL server down", "--hours", "2"))
    during = [_send_and_wait(layout, f"during-{n}.hl7", 2 + n) for n in range(2)]
    left = json.loads(run("leave", "--reason", "CRL server back"))
    assert left["id"] == entered["id"]
    after = _send_and_wait(layout, "after.hl7", 4)
    report = run("report", "--last", "--format", "json")
    listed = [json.loads(line) for line in report.splitlines()]
    assert sorted(m["message_id"] for m in listed) == sorted(during), (before, after)
    assert {m["window"] for m in listed} == {entered["id"]}
    assert all(m["direction"] == "inbound" and m["peer"] == "lab" for m in listed)
    assert all("message.delivered:success" in m["events"] for m in listed)
    # by time: the day's report holds the same messages, and the table names the window
    today = datetime.now(UTC).strftime("%Y-%m-%d")
    by_day = run("report", "--since", today, "--until", today, "--format", "json")
    assert sorted(json.loads(line)["message_id"] for line in by_day.splitlines()) == sorted(during)
    table = run("report", "--last")
    assert f"WINDOW {entered['id']}" in table and "CRL server down" in table
    assert "left by operator:" in table and "CRL server back" in table
    # entering and leaving are audited; entering is an alert
    [on] = events(layout.hospital.audit_log, "emergency.entered")
    assert on["severity"] == "alert" and on["reason"] == "CRL server down"
    [off] = events(layout.hospital.audit_log, "emergency.left")
    assert off["detail"]["emergency"] == entered["id"]


def test_emergency_mode_ends_by_itself_and_a_restart_neither_ends_nor_forgets_it(
    tmp_path: Path,
) -> None:
    clock = TickingClock()
    recorded = Recorder()

    settings = EmergencySettings(crl_stale_days=3)
    mode = EmergencyMode(tmp_path, clock, lambda: recorded, lambda: settings)
    marked = MarkingSink(recorded, lambda: mode)
    start = clock.now().timestamp()
    window = mode.enter("power failure", start + 3600, "operator:root (uid 0)")
    marked.emit(AuditEvent(EventType.MESSAGE_RECEIVED, message_id="m1"))
    marked.emit(AuditEvent(EventType.DAEMON_STARTED))
    # a restart in between: the window is read back from the state folder
    again = EmergencyMode(tmp_path, clock, lambda: recorded, lambda: settings)
    assert again.current() == window
    again.expire()
    assert again.current() == window and recorded[-1].event is EventType.DAEMON_STARTED
    clock.at += timedelta(hours=1)
    marked = MarkingSink(recorded, lambda: again)
    marked.emit(AuditEvent(EventType.MESSAGE_RECEIVED, message_id="m2"))
    again.expire()
    entered, first, daemon, second, left = recorded
    assert entered.event is EventType.EMERGENCY_ENTERED and entered.severity is Severity.ALERT
    assert entered.detail["relaxed"] == {"crl_stale_days": 3}
    assert first.detail["emergency"] == window.id and "emergency" not in daemon.detail
    assert "emergency" not in second.detail  # its end has passed: no longer marked
    assert left.event is EventType.EMERGENCY_LEFT and left.actor == "medgw"
    assert left.reason == "its time bound was reached"
    assert not (tmp_path / "emergency-mode.json").exists()
    with pytest.raises(EmergencyError, match="emergency mode is off"):
        again.leave("operator:root (uid 0)", "done")


def test_an_emergency_needs_a_reason_and_an_end_within_max_hours(tmp_path: Path) -> None:
    clock = TickingClock()
    now = clock.now().timestamp()
    with pytest.raises(EmergencyError, match="exactly one of --until and --hours"):
        end_of(None, None, now, 24)
    with pytest.raises(EmergencyError, match="not within the next 24 hours"):
        end_of(None, 25, now, 24)
    with pytest.raises(EmergencyError, match="has no UTC offset"):
        end_of("2026-11-27T05:00", None, now, 24)
    five = datetime(2026, 11, 27, 5, tzinfo=UTC).timestamp()
    assert end_of("2026-11-27T14:00+09:00", None, now, 24) == five
    mode = EmergencyMode(tmp_path, clock, Recorder, EmergencySettings)
    with pytest.raises(EmergencyError, match="the reason is empty"):
        mode.enter(" \n", now + 60, "operator:root (uid 0)")
    mode.enter("flood", now + 60, "operator:root (uid 0)")
    with pytest.raises(EmergencyError, match="already on"):
        mode.enter("again", now + 60, "operator:root (uid 0)")


def _emergency_problems(config: Path, table: str) -> list[str]:
    with config.open("a") as handle:
        handle.write(f"\n[emergency]\n{table}\n")
    try:
        load_config(config)
    except ConfigError as exc:
        return [str(p) for p in exc.problems]
    return []


@pytest.mark.parametrize(
    ("table", "rule"),
    [
        ("zones = false", "the zones (NET-4)"),
        ("allow_transit = true", "transit between zones (NET-4)"),
        ("verify_signatures = false", "signature verification (NET-5)"),
        ('unsigned_peers = ["lab"]', "signature verification (NET-5)"),
    ],
)
def test_check_config_refuses_relaxing_the_zones_or_signature_verification(
    layout: DemoLayout, table: str, rule: str
) -> None:
    [problem] = _emergency_problems(layout.hospital.config_path, table)
    assert f"{rule} can never be relaxed" in problem and "emergency." in problem


def test_check_config_reads_what_emergency_mode_may_relax(layout: DemoLayout) -> None:
    config = layout.hospital.config_path
    text = config.read_text()
    assert _emergency_problems(config, 'ocsp_unreachable_peers = ["lab"]\nmax_hours = 12') == []
    loaded = load_config(config).emergency
    assert loaded.ocsp_unreachable_peers == ("lab",) and loaded.max_hours == 12
    config.write_text(text)
    problems = _emergency_problems(config, 'ocsp_unreachable_peers = ["nobody"]\nlax = true')
    assert any("'nobody' is not a configured peer" in p for p in problems), problems
    assert any("emergency.lax" in p and "unknown key" in p for p in problems), problems


def test_emergency_mode_lets_a_named_peer_send_while_ocsp_is_down_and_nothing_else(
    layout: DemoLayout, processes: Any
) -> None:
    """The hospital's zone requires OCSP and the responder is down: the lab is refused,
    until an emergency is declared with the lab in ``ocsp_unreachable_peers``.  Even then
    a message with a broken signature is refused; after the emergency, the lab again."""
    OcspWorld(layout)  # the lab's certificates name a responder nobody runs
    with layout.hospital.config_path.open("a") as handle:
        handle.write('\n[emergency]\nocsp_unreachable_peers = ["lab"]\n')
    processes.start(layout.hospital.config_path)
    wait_for_events(
        layout.hospital.audit_log,
        "peer.certificate_rejected",
        where=lambda r: r["peer"] == "lab",
        count=3,
    )
    processes.start(layout.lab.config_path)
    enter = ("enter", "--reason", "OCSP responder down", "--hours", "1")
    window = json.loads(run_emergency(layout.hospital.config_path, *enter))
    drop_file(layout.lab.outbox_dir / "hospital", "during.hl7", b"MSH|during\r")
    [delivered] = wait_for_events(layout.hospital.audit_log, "message.delivered")
    assert delivered["detail"]["emergency"] == window["id"]
    assert (layout.hospital.inbox_dir / "lab" / "during.hl7").read_bytes() == b"MSH|during\r"
    [entered] = events(layout.hospital.audit_log, "emergency.entered")
    assert entered["detail"]["relaxed"] == {"ocsp_unreachable_peers": ["lab"]}
    # signature verification is never relaxed
    lab = load_config(layout.lab.config_path)
    headers, body = as2client.build_tampered(
        b"MSH|^~\\&|tampered lab result\r",
        sender_as2="KITA-LAB",
        receiver_as2="SAKURA-HOSPITAL",
        signing=lab.smime.signing,
        recipient=lab.require_peer("hospital").encryption_certificates[0],
    )
    answer = lab_post(layout, headers, body)
    assert b"integrity-check-failed" in answer.body
    [failed] = wait_for_events(layout.hospital.audit_log, "signature.failed")
    assert failed["detail"]["emergency"] == window["id"]
    assert sorted(p.name for p in (layout.hospital.inbox_dir / "lab").iterdir()) == ["during.hl7"]
    # after the emergency the lab is refused again
    run_emergency(layout.hospital.config_path, "leave", "--reason", "OCSP responder back")
    drop_file(layout.lab.outbox_dir / "hospital", "after.hl7", b"MSH|after\r")
    wait_handshake_refused(layout)
    assert not (layout.hospital.inbox_dir / "lab" / "after.hl7").exists()


def test_emergency_mode_never_lets_a_message_pass_between_zones(
    world: World, processes: Any
) -> None:
    config = world.hospital.config_path
    processes.start(config)
    window = json.loads(run_emergency(config, "enter", "--reason", "flood", "--hours", "1"))
    port = world.hospital.listeners[0]["port"]
    # the lab (zone A) addresses the pharmacy (zone B) through the hospital: transit
    built = as2_message(world.lab, world.hospital, world.pharmacy.as2_id, b"MSH|for the pharmacy")
    answer = post_as2(world.lab, "127.0.1.1", port, built, until=b"authentication-failed")
    assert b"authentication-failed" in answer
    [refused] = wait_for_events(world.hospital.audit_log, "routing.transit_refused")
    assert refused["detail"]["emergency"] == window["id"]
    # and a peer on another zone's listener is refused at the handshake
    ports = {lst["name"]: lst["port"] for lst in world.hospital.listeners}
    assert handshake_refused(world.lab, world.lab, "127.0.2.1", ports["zone-b"])
    assert not list((world.hospital.root / "inbox").rglob("*"))


def _signer_verdict(
    certificate: x509.Certificate, trust: TrustSettings, at: datetime
) -> ValidationResult:
    """The path validation of a signer's ``certificate`` under ``trust`` (as relaxed)."""
    return asyncio.run(
        validate(
            certificate,
            anchors=trust.anchors,
            purpose=Purpose.SMIME_SIGN,
            at=at,
            revocation=trust.revocation,
            crls=trust.crls,
            policy=AlgorithmPolicy(),
        )
    )


def test_stale_crls_are_accepted_up_to_the_configured_days_and_a_revocation_still_counts() -> None:
    start = datetime(2026, 11, 1, tzinfo=UTC)
    ca = make_ca("Emergency Test CA", now=start)
    good = issue(ca, "GOOD-LAB", purpose="smime-sign", now=start)
    bad = issue(ca, "BAD-LAB", purpose="smime-sign", now=start)
    revoked = [(bad.certificate.serial_number, start + timedelta(hours=1))]
    crl = make_crl(ca, now=start + timedelta(days=1), days=7, revoked=revoked)
    trust = TrustSettings(
        anchors=(ca.certificate,), crls=(crl,), revocation=RevocationPolicy.REQUIRE
    )
    settings = EmergencySettings(crl_stale_days=3)
    two_days_stale = start + timedelta(days=10)  # nextUpdate was day 8
    four_days_stale = start + timedelta(days=12)

    def judge(leaf: Issued, at: datetime, settings: EmergencySettings) -> bool:
        used = relaxed(settings, "lab", trust, at, [leaf.certificate])
        return _signer_verdict(leaf.certificate, used, at).valid

    assert not judge(good, two_days_stale, EmergencySettings())  # nothing relaxed
    assert judge(good, two_days_stale, settings)
    assert not judge(bad, two_days_stale, settings)  # revoked in the stale CRL: still refused
    assert not judge(good, four_days_stale, settings)  # staler than allowed
    # a zone that asks OCSP is relaxed only for the peers named
    with_ocsp = replace(trust, ocsp=True)
    named = EmergencySettings(ocsp_unreachable_peers=("lab",))
    assert (
        relaxed(named, "lab", with_ocsp, two_days_stale, [good.certificate]).revocation
        is RevocationPolicy.PREFER
    )
    assert relaxed(named, "pharmacy", with_ocsp, two_days_stale, [good.certificate]) == with_ocsp
    assert relaxed(settings, "lab", with_ocsp, two_days_stale, [good.certificate]) == with_ocsp


def test_crl_stale_days_accepts_no_certificate_whose_issuer_has_no_crl_at_all() -> None:
    """The relaxation is for a CRL past its nextUpdate: a peer whose issuer has no CRL in
    the zone (another CA's fresh CRL there) stays refused, emergency or not."""
    start = datetime(2026, 11, 1, tzinfo=UTC)
    listed = make_ca("Emergency CA With A CRL", now=start)
    unlisted = make_ca("Emergency CA Without A CRL", now=start)
    peer = issue(unlisted, "NO-CRL-LAB", purpose="smime-sign", now=start)
    crl = make_crl(listed, now=start + timedelta(days=1), days=7)
    trust = TrustSettings(
        anchors=(listed.certificate, unlisted.certificate),
        crls=(crl,),
        revocation=RevocationPolicy.REQUIRE,
    )
    at = start + timedelta(days=2)  # the one CRL is current
    used = relaxed(EmergencySettings(crl_stale_days=3), "lab", trust, at, [peer.certificate])
    assert used == trust
    result = _signer_verdict(peer.certificate, used, at)
    assert not result.valid and "could not be established" in (result.reason or "")


def test_a_reload_that_changes_the_relaxations_during_an_emergency_is_an_alert_in_the_report(
    layout: DemoLayout, processes: Any
) -> None:
    config = layout.hospital.config_path
    text = config.read_text()
    config.write_text(text + "\n[emergency]\ncrl_stale_days = 1\n")
    hospital = processes.start(config)

    def run(*args: str) -> str:
        return run_emergency(config, *args)

    def reload(count: int) -> None:
        hospital.signal(signal.SIGHUP)
        wait_for_events(layout.hospital.audit_log, "config.reloaded", count=count)

    # Not in an emergency: a change of [emergency] is an ordinary reload.
    config.write_text(text + "\n[emergency]\ncrl_stale_days = 2\n")
    reload(1)
    entered = json.loads(run("enter", "--reason", "CRL server down", "--hours", "2"))
    # On: widening what it relaxes is an alert of its own, with the old and new values.
    config.write_text(
        text + '\n[emergency]\ncrl_stale_days = 7\nocsp_unreachable_peers = ["lab"]\n'
    )
    reload(2)
    [changed] = events(layout.hospital.audit_log, "emergency.relaxations_changed")
    assert changed["severity"] == "alert"
    assert changed["detail"]["emergency"] == entered["id"]
    assert changed["detail"]["old"] == {"crl_stale_days": 2}
    assert changed["detail"]["new"] == {"crl_stale_days": 7, "ocsp_unreachable_peers": ["lab"]}
    assert changed["actor"] == "signal"  # SIGHUP does not say who sent it
    # The same relaxations again: nothing to alert.
    reload(3)
    assert len(events(layout.hospital.audit_log, "emergency.relaxations_changed")) == 1
    table = run("report", "--last")
    assert "relaxed at entry: crl_stale_days=2" in table
    assert (
        "relaxations changed by signal: crl_stale_days=2 -> "
        "crl_stale_days=7, ocsp_unreachable_peers=['lab']" in table
    )


def test_a_maintainer_s_reload_names_who_changed_the_relaxations(tmp_path: Path) -> None:
    clock = TickingClock()
    recorded = Recorder()

    mode = EmergencyMode(tmp_path, clock, lambda: recorded, EmergencySettings)
    narrow, wide = EmergencySettings(crl_stale_days=1), EmergencySettings(crl_stale_days=9)
    mode.relaxations_changed(narrow, wide, "maintainer:alice")
    assert recorded == []  # off: nothing is relaxed, nothing to alert
    mode.enter("flood", clock.now().timestamp() + 60, "operator:root (uid 0)")
    mode.relaxations_changed(narrow, wide, "maintainer:alice")
    changed = recorded[-1]
    assert changed.event is EventType.EMERGENCY_RELAXATIONS_CHANGED
    assert changed.severity is Severity.ALERT and changed.actor == "maintainer:alice"
    assert changed.detail["old"] == {"crl_stale_days": 1}
    assert changed.detail["new"] == {"crl_stale_days": 9}


def _window_file(tmp_path: Path, since: float, until: float) -> Path:
    path = tmp_path / "emergency-mode.json"
    window = {"id": "emg-1", "since": since, "until": until, "reason": "flood", "by": "admin"}
    path.write_text(json.dumps(window))
    path.chmod(0o600)
    return path


@pytest.mark.parametrize(
    ("mode", "owner", "rule"),
    [
        (0o620, None, "accessible by other users (mode 620)"),
        (0o602, None, "accessible by other users (mode 602)"),
        (0o600, 65534, "owned by uid 65534"),
    ],
)
def test_an_emergency_mode_file_others_could_write_is_refused_with_an_alert(
    tmp_path: Path, mode: int, owner: int | None, rule: str
) -> None:
    clock = TickingClock()
    recorded = Recorder()

    now = clock.now().timestamp()
    path = _window_file(tmp_path, now, now + 3600)
    path.chmod(mode)
    if owner is not None:
        if os.geteuid() != 0:
            pytest.skip("giving a file to another user needs root")
        os.chown(path, owner, owner)
    emergency = EmergencyMode(tmp_path, clock, lambda: recorded, EmergencySettings)
    assert emergency.current() is None
    [refused] = recorded
    assert refused.event is EventType.EMERGENCY_STATE_REFUSED
    assert refused.severity is Severity.ALERT and rule in (refused.reason or "")
    assert path.exists()  # kept for whoever looks into it
    # The same rule guards the break-glass credential.
    (tmp_path / CREDENTIAL_FILE).write_text("{}")
    (tmp_path / CREDENTIAL_FILE).chmod(mode)
    if owner is not None:
        os.chown(tmp_path / CREDENTIAL_FILE, owner, owner)
    with pytest.raises(CredentialError, match=re.escape(rule)):
        CredentialStore(tmp_path).current()


def test_an_emergency_mode_file_s_end_is_capped_at_max_hours_after_its_start(
    tmp_path: Path,
) -> None:
    clock = TickingClock()
    recorded = Recorder()

    now = clock.now().timestamp()
    _window_file(tmp_path, now, now + 10 * 365 * 86400)  # edited to end in ten years
    emergency = EmergencyMode(
        tmp_path, clock, lambda: recorded, lambda: EmergencySettings(max_hours=6)
    )
    window = emergency.current()
    assert window is not None and window.until == now + 6 * 3600
    clock.at += timedelta(hours=6)
    assert emergency.current() is None
    emergency.expire()
    [left] = recorded
    assert left.event is EventType.EMERGENCY_LEFT
    assert left.detail["ended"] == iso_time(now + 6 * 3600)
