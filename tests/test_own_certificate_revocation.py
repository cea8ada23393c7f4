"""Our own certificates judged by the CRLs of the zones they chain to, as a peer's are.

Our CA revoked our certificate, or a CA certificate on its path: every peer that checks
its CRL refuses us.  Listed in a CRL the zone holds, it is an error in ``check-config``
and ``pki check`` naming the certificate, the CRL's issuer, the revocation date and the
fix, and ``medgw run`` does not start with it, whatever the zone's revocation policy.
A status no CRL of the zone gives (our CA's CRL is often not configured) is no finding.

Real demo PKI, real CRLs, real ``medgw`` subprocesses.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509

from gateway.demo_run import free_port
from gateway.pki.demo import DemoLayout
from gateway.pki.issue import Issued, issue, make_crl, write_pem
from tests.cli import medgw
from tests.crl_server import DistributionPoint
from tests.helpers.audit import events, wait_for_events
from tests.helpers.check_config import check_config, reported
from tests.helpers.crl_world import CrlWorld
from tests.helpers.demo import demo_ca, edit, revoke, tls_under_an_intermediate

ROOT_CA = "CN=medgw Demo Root CA"
NEW_CERTIFICATE = "ask the CA (CN=medgw Demo Root CA"


def crl_file(layout: DemoLayout) -> Path:
    """The hospital's zone's CRL of the demo CA."""
    return layout.hospital.root / "certs" / "crls" / "loopback" / "ca.crl"


def our(layout: DemoLayout, name: str) -> x509.Certificate:
    """The hospital's certs/<name>.crt (its first certificate)."""
    return x509.load_pem_x509_certificate((layout.hospital.root / "certs" / name).read_bytes())


def issued_by_an_intermediate(layout: DemoLayout) -> Issued:
    """A TLS certificate of the hospital issued by a CA the demo CA issued: installed as
    certs/tls.crt (with that CA after it) and its key; returns that CA."""
    yesterday = datetime.now(UTC) - timedelta(days=1)
    return tls_under_an_intermediate(layout, ca_from=yesterday, leaf_from=yesterday)[0]


@pytest.mark.parametrize("policy", ["require", "off"])
def test_our_revoked_tls_certificate_is_an_error(layout: DemoLayout, policy: str) -> None:
    """Under "off" too: that policy says how the peers' certificates are judged; the
    peers judge ours by their own, and our CA's CRL says it is revoked."""
    config = layout.hospital.config_path
    if policy == "off":
        edit(config, 'revocation = "require"', 'revocation = "off"')
    revoke(layout, crl_file(layout), our(layout, "tls.crt"))
    result = check_config(config)
    output = result.stdout + result.stderr
    assert result.returncode == 1, output
    assert reported(
        result,
        config,
        "tls.certificate",
        "our TLS certificate CN=SAKURA-HOSPITAL,O=Sakura General Hospital is revoked since ",
        NEW_CERTIFICATE,
    ), output
    [line] = [line for line in output.splitlines() if "is revoked since" in line]
    assert f"by the CRL of {ROOT_CA}" in line and "that zone loopback holds" in line
    assert "then point tls.certificate and tls.key at the new certificate" in line
    assert "medgw will not start with this configuration" in result.stderr
    checked = medgw("pki", "check", "--config", config)
    assert checked.returncode == 1, checked.stdout
    assert any(
        row.startswith("error") and "tls.certificate" in row and "is revoked since" in row
        for row in checked.stdout.splitlines()
    ), checked.stdout


def test_our_revoked_signing_certificate_is_an_error(layout: DemoLayout) -> None:
    config = layout.hospital.config_path
    revoke(layout, crl_file(layout), our(layout, "sign.crt"))
    result = check_config(config)
    assert result.returncode == 1, result.stdout + result.stderr
    assert reported(
        result,
        config,
        "smime.signing_certificate",
        "our S/MIME signing certificate CN=",
        "then point smime.signing_certificate and smime.signing_key at the new",
    ), result.stdout + result.stderr
    assert "is revoked since" in result.stderr


def test_a_revoked_ca_certificate_on_our_path_is_an_error(layout: DemoLayout) -> None:
    issuing = issued_by_an_intermediate(layout)
    revoke(layout, crl_file(layout), issuing.certificate)
    config = layout.hospital.config_path
    result = check_config(config)
    assert result.returncode == 1, result.stdout + result.stderr
    assert reported(
        result,
        config,
        "tls.certificate",
        "our TLS certificate CN=SAKURA-HOSPITAL's chain: CA certificate CN=Sakura Issuing CA "
        "is revoked since ",
        "a CA certificate that is not revoked",
    ), result.stdout + result.stderr
    assert f"by the CRL of {ROOT_CA}" in result.stderr


def test_a_status_no_crl_of_the_zone_gives_is_no_finding(layout: DemoLayout) -> None:
    """Our certificate issued by an intermediate whose CRL the zone does not hold: its
    status is unknown, which says nothing against it."""
    issued_by_an_intermediate(layout)
    result = check_config(layout.hospital.config_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "configuration is valid (0 warning(s))" in result.stdout
    assert "revoked" not in result.stdout + result.stderr


def test_medgw_does_not_start_with_our_revoked_tls_certificate(
    layout: DemoLayout, processes: Any
) -> None:
    revoke(layout, crl_file(layout), our(layout, "tls.crt"))
    hospital = processes.start(layout.hospital.config_path, wait=False)
    assert hospital.wait_exit() == 1
    output = "\n".join(hospital.raw)
    assert "tls.certificate: our TLS certificate CN=SAKURA-HOSPITAL" in output
    assert "is revoked since" in output and f"by the CRL of {ROOT_CA}" in output
    assert not any(line.get("event") == "daemon.ready" for line in hospital.lines)


def test_a_crl_revoking_ours_and_a_peers_is_applied_at_a_reload_and_ours_alerted(
    layout: DemoLayout, processes: Any
) -> None:
    """The CA's new CRL revokes our TLS certificate and the lab's: refusing the reload
    for ours would keep the old CRL, and the lab's revoked certificate accepted, while
    changing nothing about ours.  The reload is applied, the lab's certificate refused,
    and ours alerted and said to the admin who asked."""
    hospital = processes.start(layout.hospital.config_path)
    lab_tls = x509.load_pem_x509_certificate(
        (layout.hospital.root / "certs" / "peers" / "lab" / "tls.crt").read_bytes()
    )
    revoke(layout, crl_file(layout), our(layout, "tls.crt"), lab_tls)
    # A new signing certificate in the same reload: it changes, the TLS one found
    # revoked does not.
    now = datetime.now(UTC)
    signing = issue(demo_ca(layout), "SAKURA-HOSPITAL", purpose="smime-sign", now=now)
    write_pem(layout.hospital.root / "certs" / "sign.crt", signing.certificate)
    write_pem(layout.hospital.root / "certs" / "sign.key", signing.key)
    done = medgw("reload", "--config", layout.hospital.config_path)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "tls.certificate: our TLS certificate CN=SAKURA-HOSPITAL" in done.stdout, done.stdout
    [alert] = wait_for_events(layout.hospital.audit_log, "pki.own_certificate_unusable")
    assert alert["severity"] == "alert" and "is revoked since" in alert["reason"], alert
    [rejected] = wait_for_events(
        layout.hospital.audit_log,
        "peer.certificate_rejected",
        where=lambda r: r["peer"] == "lab" and "revoked" in r["reason"].lower(),
    )
    assert rejected["outcome"] == "failure", rejected
    wait_for_events(layout.hospital.audit_log, "config.reloaded")
    assert hospital.proc.poll() is None  # still serving


def fetched_crl(
    world: CrlWorld,
    *revoked: x509.Certificate,
    since: datetime | None = None,
    lapses_in: timedelta,
    number: int,
) -> x509.CertificateRevocationList:
    """The demo CA's CRL, listing ``revoked`` (revoked ``since``), whose nextUpdate is
    ``lapses_in`` from now: the daemon fetches the next one at about half that time."""
    now = datetime.now(UTC)
    when = since or now - timedelta(minutes=2)
    return make_crl(
        world.ca,
        now=now + lapses_in - timedelta(days=7),
        days=7,
        revoked=[(cert.serial_number, when) for cert in revoked],
        number=number,
    )


def test_a_fetched_crl_revoking_ours_is_alerted_at_the_start(
    layout: DemoLayout, processes: Any
) -> None:
    """The zone fetches its CA's CRL (no CRL file): the one fetched at the start revokes
    our TLS certificate.  Fetched by the daemon, it judges ours too: alerted, and medgw
    serves (the peers that do not check it still accept us)."""
    point = DistributionPoint(free_port())
    try:
        world = CrlWorld(layout, point.url)
        ours = our(layout, "tls.crt")
        point.serve(fetched_crl(world, ours, lapses_in=timedelta(days=3), number=1))
        hospital = processes.start(layout.hospital.config_path)
        [alert] = wait_for_events(layout.hospital.audit_log, "pki.own_certificate_unusable")
        assert alert["severity"] == "alert" and "is revoked since" in alert["reason"], alert
        assert "our TLS certificate CN=SAKURA-HOSPITAL" in alert["reason"], alert
        assert alert["detail"]["key"] == "tls.certificate", alert
        assert NEW_CERTIFICATE in alert["detail"]["fix"], alert
        assert hospital.proc.poll() is None
    finally:
        point.stop()


def test_a_fetched_crl_revoking_ours_is_alerted_once_when_the_daemon_refreshes_it(
    layout: DemoLayout, processes: Any
) -> None:
    """The CRL fetched at the start revokes nothing and lapses soon; the next one the
    daemon fetches on its own (no reload) revokes our TLS certificate: alerted then.  The
    same revocation in the CRLs after it (fetched again by a reload) is not alerted
    again: once per cause."""
    point = DistributionPoint(free_port())
    try:
        world = CrlWorld(layout, point.url)
        ours = our(layout, "tls.crt")
        point.serve(fetched_crl(world, lapses_in=timedelta(seconds=40), number=1))
        hospital = processes.start(layout.hospital.config_path)
        wait_for_events(layout.hospital.audit_log, "pki.crl_fetched")
        since = datetime.now(UTC) - timedelta(minutes=2)
        point.serve(fetched_crl(world, ours, since=since, lapses_in=timedelta(days=3), number=2))
        wait_for_events(layout.hospital.audit_log, "pki.crl_fetched", count=2)
        [alert] = wait_for_events(layout.hospital.audit_log, "pki.own_certificate_unusable")
        assert "is revoked since" in alert["reason"], alert
        assert alert["detail"]["key"] == "tls.certificate", alert

        point.serve(fetched_crl(world, ours, since=since, lapses_in=timedelta(days=3), number=3))
        done = medgw("reload", "--config", layout.hospital.config_path)
        assert done.returncode == 0, done.stdout + done.stderr
        assert "tls.certificate: our TLS certificate CN=SAKURA-HOSPITAL" in done.stdout
        wait_for_events(layout.hospital.audit_log, "pki.crl_fetched", count=3)
        wait_for_events(layout.hospital.audit_log, "config.reloaded")
        said = events(layout.hospital.audit_log, "pki.own_certificate_unusable")
        assert said == [alert], said
        assert hospital.proc.poll() is None
    finally:
        point.stop()
