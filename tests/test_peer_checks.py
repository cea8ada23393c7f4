"""Peer certificates judged before anything is exchanged, the way the daemon judges them.

``check-config`` validates every configured peer certificate (path to the zone's
trust anchors, validity, purpose, local CRLs): a use (TLS, signing, encryption)
with no acceptable certificate left is an error; an unacceptable certificate
beside an acceptable one, or one that expires within 30 days, a warning.  The
running daemon marks such a peer unusable in ``medgw peers list``, raises one
alert, and sends nothing to it (its messages wait) instead of retrying for ever.

Real demo PKI, real ``medgw check-config`` and ``medgw run`` subprocesses.
"""

from __future__ import annotations

import errno
import io
import json
import signal
import subprocess
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.serialization import Encoding

from gateway.audit import AuditEvent, AuditLog
from gateway.config import load_config
from gateway.daemon.trust import TrustKeeper, trust_changed
from gateway.demo_run import drop_file, read_audit
from gateway.egress import Network
from gateway.logs import make_logger
from gateway.pki.demo import DemoLayout
from gateway.pki.issue import Issued, issue, make_ca, make_crl, write_pem
from gateway.pki.peers import PeerTrust
from tests.cli import medgw
from tests.clocks import SetClock
from tests.helpers.audit import events, wait_for_events
from tests.helpers.demo import demo_ca

NOW = datetime.now(UTC)


def lab_file(layout: DemoLayout) -> Path:
    return layout.hospital.root / "peers.d" / "lab.toml"


def lab_cert(layout: DemoLayout, role: str) -> Path:
    return layout.hospital.root / "certs" / "peers" / "lab" / f"{role}.crt"


def check_config(layout: DemoLayout) -> subprocess.CompletedProcess[str]:
    return medgw("check-config", "--config", layout.hospital.config_path)


def findings(
    result: subprocess.CompletedProcess[str], layout: DemoLayout, severity: str, key: str
) -> list[str]:
    """The lines of one severity about one key of the lab's peers.d file."""
    where = f"{severity}: {lab_file(layout)}: {key}:"
    return [line for line in (result.stdout + result.stderr).splitlines() if line.startswith(where)]


def expired_tls(layout: DemoLayout) -> Issued:
    return issue(
        demo_ca(layout), "Kita Lab TLS (old)", purpose="tls", now=NOW - timedelta(days=400), days=30
    )


def foreign_tls(layout: DemoLayout) -> Issued:
    other = make_ca("Some Other CA", now=NOW)
    return issue(other, "Kita Lab TLS", purpose="tls", now=NOW, dns_names=("localhost",))


@pytest.mark.parametrize(
    ("make", "words"),
    [(expired_tls, "expired on"), (foreign_tls, "no path from certificate")],
    ids=["expired", "unknown-ca"],
)
def test_check_config_refuses_a_peer_whose_only_tls_certificate_is_unusable(
    layout: DemoLayout, make: Any, words: str
) -> None:
    write_pem(lab_cert(layout, "tls"), make(layout).certificate)
    result = check_config(layout)
    assert result.returncode == 1, result.stdout + result.stderr
    assert "configuration is valid" not in result.stdout
    [error] = findings(result, layout, "error", "tls_certificates")
    assert "peer 'lab' has no acceptable TLS certificate" in error
    assert words in error and "(fix: " in error
    assert "medgw starts, but exchanges nothing with the peer(s) of" in result.stderr


def test_an_unusable_certificate_beside_a_usable_one_and_one_expiring_soon_are_warnings(
    layout: DemoLayout,
) -> None:
    ca = demo_ca(layout)
    folder = lab_cert(layout, "sign").parent
    # A TLS certificate listed for signing: its extendedKeyUsage lacks emailProtection.
    write_pem(
        folder / "wrong-purpose.crt", issue(ca, "Kita Lab", purpose="tls", now=NOW).certificate
    )
    soon = issue(
        ca, "Kita Lab sign (ending)", purpose="smime-sign", now=NOW - timedelta(days=800), days=810
    )
    write_pem(folder / "ending.crt", soon.certificate)
    text = lab_file(layout).read_text()
    old = 'signing_certificates = ["certs/peers/lab/sign.crt"]'
    assert old in text
    lab_file(layout).write_text(
        text.replace(
            old,
            'signing_certificates = ["certs/peers/lab/sign.crt", '
            '"certs/peers/lab/wrong-purpose.crt", "certs/peers/lab/ending.crt"]',
        )
    )
    result = check_config(layout)
    assert result.returncode == 0, result.stderr
    warnings = findings(result, layout, "warning", "signing_certificates")
    [unusable] = [w for w in warnings if "is not acceptable" in w]
    assert "extendedKeyUsage lacks emailProtection" in unusable and "2 other(s) are" in unusable
    [ending] = [w for w in warnings if "expires on" in w]
    assert "Kita Lab sign (ending)" in ending and "(in 9 day(s))" in ending
    assert "configuration is valid (2 warning(s))" in result.stdout
    assert not findings(result, layout, "error", "signing_certificates")


def test_a_usable_configuration_gives_no_certificate_finding(layout: DemoLayout) -> None:
    result = check_config(layout)
    assert result.returncode == 0, result.stderr
    assert "certificate" not in result.stdout.split("gateway  ", 1)[0]


def _peers(layout: DemoLayout) -> list[dict[str, Any]]:
    listing = medgw("peers", "list", "--config", layout.hospital.config_path, "--json")
    assert listing.returncode == 0, listing.stderr
    peers: list[dict[str, Any]] = json.loads(listing.stdout)
    return peers


def _reload(proc: Any, layout: DemoLayout) -> None:
    before = len(events(layout.hospital.audit_log, "config.reloaded"))
    proc.signal(signal.SIGHUP)
    wait_for_events(layout.hospital.audit_log, "config.reloaded", count=before + 1)


def test_the_daemon_marks_the_peer_unusable_alerts_once_and_holds_its_messages(
    layout: DemoLayout, processes: Any
) -> None:
    original = lab_cert(layout, "tls").read_bytes()
    write_pem(lab_cert(layout, "tls"), foreign_tls(layout).certificate)
    processes.start(layout.lab.config_path)
    hospital = processes.start(layout.hospital.config_path)

    [alert] = wait_for_events(layout.hospital.audit_log, "peer.unusable")
    assert alert["severity"] == "alert" and alert["peer"] == "lab"
    assert "no acceptable TLS certificate" in alert["reason"]
    [peer] = _peers(layout)
    assert peer["unusable"] == alert["reason"]
    text = medgw("peers", "list", "--config", layout.hospital.config_path).stdout
    assert "UNUSABLE" in text and "unusable: no acceptable TLS certificate" in text
    line = hospital.wait_for(lambda entry: entry.get("event") == "peer.unusable", 30)
    assert len([e for e in hospital.lines if e.get("event") == "peer.unusable"]) == 1
    assert line["level"] == "error" and "fix" in line

    drop_file(layout.hospital.outbox_dir / "lab", "held.hl7", b"MSH|held\r")
    wait_for_events(layout.hospital.audit_log, "message.accepted")
    _reload(hospital, layout)  # the same trust again: no second alert
    assert len(events(layout.hospital.audit_log, "peer.unusable")) == 1
    assert not events(layout.hospital.audit_log, "message.send_failed")  # held, not retried
    [peer] = _peers(layout)
    assert peer["messages"] == {"queued": 1}

    lab_cert(layout, "tls").write_bytes(original)  # the peer's real certificate again
    _reload(hospital, layout)
    [usable] = wait_for_events(layout.hospital.audit_log, "peer.usable")
    assert usable["peer"] == "lab"
    [peer] = _peers(layout)
    assert peer["unusable"] is None
    [receipt] = wait_for_events(layout.hospital.audit_log, "receipt.received")

    assert receipt["detail"]["mic_verified"]


def test_an_eddsa_peer_certificate_is_refused_with_the_key_families_medgw_accepts(
    layout: DemoLayout, tmp_path: Path
) -> None:
    ca = layout.root / "ca"
    key, csr, cert = tmp_path / "ed.key", tmp_path / "ed.csr", tmp_path / "ed.crt"
    subprocess.run(["openssl", "genpkey", "-algorithm", "ed25519", "-out", key], check=True)
    subprocess.run(
        ["openssl", "req", "-new", "-key", key, "-subj", "/CN=Kita Lab TLS", "-out", csr],
        check=True,
    )
    signing: list[str | Path] = ["-CA", ca / "ca.crt", "-CAkey", ca / "ca.key", "-days", "30"]
    subprocess.run(
        ["openssl", "x509", "-req", "-in", csr, *signing, "-out", cert],
        check=True,
        capture_output=True,
    )
    lab_cert(layout, "tls").write_bytes(cert.read_bytes())
    result = check_config(layout)
    assert result.returncode == 1, result.stdout + result.stderr
    said = result.stdout + result.stderr
    assert "EdDSA (Ed25519/Ed448) certificates are not accepted" in said, said
    assert "use an ECDSA P-256 or RSA-3072 key" in said
    assert "not on the CRYPTREC list" not in said


@pytest.mark.parametrize(
    ("issued_ago", "valid_days", "clock_first"),
    [(40, 30, False), (45, 7, True)],
    ids=["stale", "stale-for-longer-than-its-validity"],
)
def test_a_stale_crl_is_named_by_its_issuer_and_dates_with_the_clock_in_the_fix(
    layout: DemoLayout, issued_ago: int, valid_days: int, clock_first: bool
) -> None:
    this_update = NOW - timedelta(days=issued_ago)
    crl = make_crl(demo_ca(layout), now=this_update, days=valid_days, number=2)
    crl_file = layout.hospital.root / "certs" / "crls" / "loopback" / "ca.crl"
    crl_file.write_bytes(crl.public_bytes(Encoding.PEM))
    result = check_config(layout)
    assert result.returncode == 1, result.stdout + result.stderr
    [error] = findings(result, layout, "error", "tls_certificates")
    next_update = this_update + timedelta(days=valid_days)
    assert (
        f"the CRL of Common Name: medgw Demo Root CA, Organization: medgw demo PKI "
        f"(not for production) (thisUpdate {this_update:%Y-%m-%d %H:%M}Z) passed its "
        f"nextUpdate on {next_update:%Y-%m-%d %H:%M}Z" in error
    ), error
    assert "fix: fetch the CA's current CRL into the zone's `crls`" in error
    assert "correct this host's clock" in error
    assert ("check this host's clock first" in error) is clock_first
    assert "CRLContainer" not in error and "\\x" not in error


def test_check_config_warns_about_a_zone_crl_close_to_its_next_update(
    layout: DemoLayout,
) -> None:
    """As `pki check` does: within the zone's crl_warn_days (7) of its nextUpdate."""
    crl = make_crl(demo_ca(layout), now=NOW - timedelta(days=27), days=30)
    crl_file = layout.hospital.root / "certs" / "crls" / "loopback" / "ca.crl"
    crl_file.write_bytes(crl.public_bytes(Encoding.PEM))
    result = check_config(layout)
    assert result.returncode == 0, result.stderr
    config = layout.hospital.config_path
    where = f"warning: {config}: zones[0].crls: zone loopback's CRL of "
    [warning] = [line for line in result.stdout.splitlines() if line.startswith(where)]
    assert "goes stale in 2 d 23 h" in warning
    assert "(fix: fetch the CA's next CRL now, before traffic is refused)" in warning
    assert "configuration is valid (1 warning(s))" in result.stdout
    checked = medgw("pki", "check", "--config", config)
    assert "goes stale in" in checked.stdout


@pytest.mark.parametrize(
    ("policy", "does", "fix"),
    [
        (
            "prefer",
            'revocation = "prefer" accepts the certificates of its CA with their revocation '
            "status unknown: a revocation this CRL does not list goes unseen",
            "download the CA's current CRL into the zone's `crls` folder and reload",
        ),
        (
            "off",
            'revocation = "off" checks no certificate against any CRL',
            'set revocation = "require" (or "prefer") to use the zone\'s CRLs, and download',
        ),
    ],
)
def test_check_config_warns_about_a_stale_zone_crl_under_prefer_and_off(
    layout: DemoLayout, policy: str, does: str, fix: str
) -> None:
    """Past its nextUpdate, a CRL refuses nothing under "prefer" or "off" (no peer
    certificate error says it): check-config still names it, its nextUpdate and what
    the zone's policy does with it."""
    next_update = NOW - timedelta(days=10)
    crl = make_crl(demo_ca(layout), now=next_update - timedelta(days=30), days=30, number=2)
    crl_file = layout.hospital.root / "certs" / "crls" / "loopback" / "ca.crl"
    crl_file.write_bytes(crl.public_bytes(Encoding.PEM))
    config = layout.hospital.config_path
    text = config.read_text()
    assert text.count('revocation = "require"') == 1
    config.write_text(text.replace('revocation = "require"', f'revocation = "{policy}"'))
    result = check_config(layout)
    assert result.returncode == 0, result.stdout + result.stderr
    where = f"warning: {config}: zones[0].crls: "
    [warning] = [line for line in result.stdout.splitlines() if line.startswith(where)]
    assert (
        "zone loopback's CRL of CN=medgw Demo Root CA,O=medgw demo PKI (not for production) "
        f"is stale: its nextUpdate {next_update:%Y-%m-%d %H:%M}Z has passed; {does}"
    ) in warning, warning
    assert f"(fix: {fix}" in warning, warning
    assert "'require' are refused" not in warning


def test_a_crl_dated_after_this_hosts_clock_names_the_clock(layout: DemoLayout) -> None:
    """The CA's current CRL on a host whose clock is behind its thisUpdate: the clock
    is the cause, not the CRL, and the fix says so."""
    this_update = NOW + timedelta(days=2)
    crl = make_crl(demo_ca(layout), now=this_update, days=30, number=2)
    crl_file = layout.hospital.root / "certs" / "crls" / "loopback" / "ca.crl"
    crl_file.write_bytes(crl.public_bytes(Encoding.PEM))
    result = check_config(layout)
    assert result.returncode == 1, result.stdout + result.stderr
    [error] = findings(result, layout, "error", "tls_certificates")
    assert (
        f"the CRL of Common Name: medgw Demo Root CA, Organization: medgw demo PKI "
        f"(not for production) (thisUpdate {this_update:%Y-%m-%d %H:%M}Z) is dated after "
        f"the time checked, " in error
    ), error
    assert "fix: check this host's clock (timedatectl)" in error
    assert "too recent" not in error and "provide a current CRL" not in error


class ReChecks:
    """The daemon's five-minute trust re-checks of the hospital's configuration, by a
    real :class:`TrustKeeper` on an injected clock starting at the time the test runs
    (not the module's NOW, taken when the suite was collected, which may be before
    ``layout``'s certificates were made: they would not be valid yet)."""

    def __init__(self, layout: DemoLayout, tmp_path: Path) -> None:
        self.layout = layout
        self.now = datetime.now(UTC)
        self.clock = SetClock(self.now)
        self.trail = tmp_path / "audit.jsonl"
        self.audit = AuditLog(self.trail, self.clock, node="test")
        network = Network.fixed(load_config(layout.hospital.config_path).network_map)
        log = make_logger(stream=io.StringIO())
        self.keeper = TrustKeeper(network, lambda: self.audit, log, self.clock, lambda r: None)
        self.kept: Mapping[str, PeerTrust] = {}

    def crl(self, issued_ago: int) -> None:
        """The loopback zone's CRL file: issued ``issued_ago`` days ago, valid for 30."""
        issued = make_crl(
            demo_ca(self.layout), now=self.now - timedelta(days=issued_ago), days=30, number=2
        )
        crl_file = self.layout.hospital.root / "certs" / "crls" / "loopback" / "ca.crl"
        crl_file.write_bytes(issued.public_bytes(Encoding.PEM))

    async def refresh(self, *names: str) -> list[dict[str, Any]]:
        """A re-check five minutes on, as the daemon's (its state kept unless trust
        changed); the trail's records of the events ``names``."""
        self.clock.advance(300)
        config = load_config(self.layout.hospital.config_path)
        trust = await self.keeper.assess(config)
        self.keeper.audit(config, trust, self.kept)
        if not self.kept or trust_changed(self.kept, trust):
            self.kept = trust
        return events(self.trail, names)


async def test_a_stale_crl_makes_one_unusable_alert_over_the_re_checks_and_a_new_cause_another(
    layout: DemoLayout, tmp_path: Path
) -> None:
    """The reason of a stale CRL names the clock, which moves between the five-minute
    re-checks; the alert is raised once per cause: again when another certificate is
    refused, and again after the peer was usable in between."""
    checks = ReChecks(layout, tmp_path)
    unusable = ("peer.unusable", "peer.usable")

    checks.crl(40)
    for _ in range(4):
        said = await checks.refresh(*unusable)
    assert [r["event"] for r in said] == ["peer.unusable"], said
    assert "passed its nextUpdate" in said[0]["reason"]

    original = lab_cert(layout, "tls").read_bytes()
    write_pem(lab_cert(layout, "tls"), expired_tls(layout).certificate)  # another refused
    await checks.refresh()
    said = await checks.refresh(*unusable)
    assert [r["event"] for r in said] == ["peer.unusable"] * 2, said

    lab_cert(layout, "tls").write_bytes(original)
    checks.crl(1)
    said = await checks.refresh(*unusable)
    assert [r["event"] for r in said] == ["peer.unusable"] * 2 + ["peer.usable"], said

    checks.crl(40)  # the same problem again, after the peer was usable: a new alert
    await checks.refresh()
    said = await checks.refresh(*unusable)
    assert [r["event"] for r in said] == ["peer.unusable"] * 2 + ["peer.usable", "peer.unusable"]
    checks.audit.close()


async def test_a_crl_near_or_past_its_next_update_is_alerted_once_per_kind(
    layout: DemoLayout, tmp_path: Path
) -> None:
    """``pki.crl_stale`` is raised when a zone's CRL nears its nextUpdate (a warning) and
    again when it passes it (an alert), not at every five-minute re-check while it stays
    so, though its message counts the time left; ``pki.crl_fresh`` is recorded once a
    current CRL is in place, and the same problem after it is a new alert."""
    checks = ReChecks(layout, tmp_path)
    crl = ("pki.crl_stale", "pki.crl_fresh")

    checks.crl(25)  # nextUpdate in 5 days: within crl_warn_days (7)
    for _ in range(4):
        said = await checks.refresh(*crl)
    assert [(r["event"], r["severity"]) for r in said] == [("pki.crl_stale", "warning")], said
    assert "goes stale in 4 d 23 h" in said[0]["reason"], said
    assert said[0]["detail"]["zone"] == "loopback"

    checks.crl(40)  # past its nextUpdate: the warning becomes an alert, once
    for _ in range(4):
        said = await checks.refresh(*crl)
    assert [(r["event"], r["severity"]) for r in said[1:]] == [("pki.crl_stale", "alert")], said
    assert "is stale: nextUpdate" in said[1]["reason"], said

    checks.crl(1)
    for _ in range(3):
        said = await checks.refresh(*crl)
    assert [r["event"] for r in said[2:]] == ["pki.crl_fresh"], said
    fresh = said[2]
    assert fresh["detail"] == {"zone": "loopback", "issuer": said[1]["detail"]["issuer"]}
    assert "fresh again" in fresh["reason"] and "medgw Demo Root CA" in fresh["reason"], fresh

    checks.crl(40)  # stale again after it was fresh: a new alert
    for _ in range(2):
        said = await checks.refresh(*crl)
    assert [r["event"] for r in said[3:]] == ["pki.crl_stale"], said
    checks.audit.close()


async def test_a_stale_crl_taken_out_of_the_zone_is_no_all_clear(
    layout: DemoLayout, tmp_path: Path
) -> None:
    """A stale CRL's file removed from the zone's ``crls``: no CRL of its CA is current,
    so nothing says it is fresh again; a current one put back after that is none either,
    since nothing was said to be stale meanwhile."""
    checks = ReChecks(layout, tmp_path)
    crl = ("pki.crl_stale", "pki.crl_fresh")
    checks.crl(40)
    said = await checks.refresh(*crl)
    assert [(r["event"], r["severity"]) for r in said] == [("pki.crl_stale", "alert")], said

    (layout.hospital.root / "certs" / "crls" / "loopback" / "ca.crl").unlink()
    for _ in range(2):
        said = await checks.refresh(*crl)
    assert [r["event"] for r in said] == ["pki.crl_stale"], said

    checks.crl(1)
    said = await checks.refresh(*crl)
    assert [r["event"] for r in said] == ["pki.crl_stale"], said
    checks.audit.close()


@pytest.mark.parametrize(
    ("policy", "severity", "does", "fix"),
    [
        (
            "require",
            "alert",
            'revocation = "require" refuses the certificates of its CA, and with them the '
            "zone's peers that hold them",
            "download the current CRL from the CA into the CRL folder and reload",
        ),
        (
            "prefer",
            "alert",
            'revocation = "prefer" accepts the certificates of its CA with their revocation '
            "status unknown: a revocation this CRL does not list goes unseen",
            "download the current CRL from the CA into the CRL folder and reload",
        ),
        (
            "off",
            "warning",
            'revocation = "off" checks no certificate against any CRL',
            'set revocation = "require" (or "prefer") to use the zone\'s CRLs, and download',
        ),
    ],
)
async def test_a_stale_crl_alert_says_what_the_zones_revocation_policy_does(
    layout: DemoLayout, tmp_path: Path, policy: str, severity: str, does: str, fix: str
) -> None:
    """Past its nextUpdate, a CRL refuses its CA's certificates only under "require":
    ``pki.crl_stale`` and ``medgw pki check`` say what the zone's policy does with it, in
    check-config's words; under "off", which uses no CRL, it is no alert."""
    config = layout.hospital.config_path
    text = config.read_text()
    assert text.count('revocation = "require"') == 1
    config.write_text(text.replace('revocation = "require"', f'revocation = "{policy}"'))
    checks = ReChecks(layout, tmp_path)
    checks.crl(40)
    [stale] = await checks.refresh("pki.crl_stale")
    assert stale["severity"] == severity, stale
    assert stale["reason"].startswith("CRL is stale: nextUpdate "), stale
    assert f"has passed; {does}" in stale["reason"], stale
    assert "'require' are refused" not in stale["reason"]
    assert stale["detail"]["fix"].startswith(fix), stale
    checks.audit.close()
    checked = medgw("pki", "check", "--config", config)  # says it as the alert does
    assert f"has passed; {does}" in checked.stdout, checked.stdout
    # An error only where the policy refuses certificates for it; a warning under "prefer"
    # and "off", as check-config says it (in its words).
    [row] = [line for line in checked.stdout.splitlines() if f"has passed; {does}" in line]
    assert row.startswith("error" if policy == "require" else "warning"), row
    assert checked.returncode == (1 if policy == "require" else 0), checked.stdout
    if policy != "require":
        result = check_config(layout)
        output = result.stdout + result.stderr
        [said] = [line for line in output.splitlines() if f"has passed; {does}" in line]
        assert said.startswith("warning: "), output
        words = said[said.index("is stale: its nextUpdate") :]
        assert words in row, (said, row)  # the finding and its fix


@dataclass(frozen=True)
class _OwnProblem:
    key: str
    message: str
    fix: str = "put a current certificate in its place"


class _FailingOnce(AuditLog):
    """An audit log whose first write fails as a full disk's would."""

    failed = False

    def emit(self, event: AuditEvent) -> None:
        if not self.failed:
            self.failed = True
            raise OSError(errno.ENOSPC, "No space left on device")
        super().emit(event)


def test_an_own_certificate_alert_the_trail_did_not_take_is_raised_at_the_next_check(
    layout: DemoLayout, tmp_path: Path
) -> None:
    checks = ReChecks(layout, tmp_path)
    audit = _FailingOnce(checks.trail, checks.clock, node="test")
    keeper = TrustKeeper(
        Network.fixed(load_config(layout.hospital.config_path).network_map),
        lambda: audit,
        make_logger(stream=io.StringIO()),
        checks.clock,
        lambda r: None,
    )
    revoked = _OwnProblem("tls.certificate", "our TLS certificate is revoked")
    keeper._alert_own([revoked])  # not written (logged): the check goes on
    assert not checks.trail.exists() or read_audit(checks.trail) == []
    keeper._alert_own([revoked])  # the next check: alerted now, once
    keeper._alert_own([revoked])
    assert [r["reason"] for r in read_audit(checks.trail)] == [revoked.message]
