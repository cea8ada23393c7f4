"""Our own certificates judged by the rules a peer's certificate is judged by.

A peer refuses our TLS certificate outside its validity period or without the
extendedKeyUsage of its use, and our S/MIME certificates likewise: ``check-config``
and ``pki check`` say so as errors naming the key, the rule and the fix, ``medgw run``
does not start with such a certificate and a reload to one is refused (the
configuration in force goes on serving).  One that chains to no zone's trust anchors
is a warning: a peer judges it by its own anchors.

Real demo PKI (certificates issued by its CA, or by another one), real ``medgw``
subprocesses.
"""

from __future__ import annotations

import signal
import ssl
import subprocess
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from cryptography import x509

from gateway.pki.demo import DemoLayout
from gateway.pki.issue import Issued, issue, make_ca, write_pem
from tests.cli import medgw
from tests.helpers.audit import wait_for_events
from tests.helpers.check_config import check_config, check_config_reports, reported
from tests.helpers.demo import demo_ca, edit, tls_under_an_intermediate

NOW = datetime.now(UTC)


def expired_tls(layout: DemoLayout) -> Issued:
    """Issued by the demo CA; expired two days ago."""
    return issue(
        demo_ca(layout),
        "SAKURA-HOSPITAL",
        purpose="tls",
        now=NOW - timedelta(days=32),
        days=30,
        dns_names=("localhost",),
        ip_addresses=("127.0.0.1",),
    )


def future_tls(layout: DemoLayout) -> Issued:
    """Issued by the demo CA; valid from three days on."""
    return issue(demo_ca(layout), "SAKURA-HOSPITAL", purpose="tls", now=NOW + timedelta(days=3))


def install(layout: DemoLayout, role: str, pair: Issued) -> None:
    """``pair`` as the hospital's certs/<role>.crt and .key."""
    certs = layout.hospital.root / "certs"
    write_pem(certs / f"{role}.crt", pair.certificate)
    write_pem(certs / f"{role}.key", pair.key)


def assert_names_the_clock(output: str, *, before: datetime, condition: str) -> None:
    """An error's fix in ``output`` names this host's clock reading (after ``condition``),
    read by medgw between ``before`` and now: the clock, not the certificate, may be wrong."""
    after = datetime.now(UTC)
    fixes = [line.split("(fix: ", 1)[1] for line in output.splitlines() if "(fix: " in line]
    marker = f"{condition}the clock reads "
    [fix] = [fix for fix in fixes if marker in fix]
    reading = datetime.strptime(fix.split(marker, 1)[1][:16], "%Y-%m-%d %H:%M")
    assert before.replace(second=0, microsecond=0, tzinfo=None) <= reading
    assert reading <= after.replace(tzinfo=None)
    assert "timedatectl" in fix.split(marker, 1)[1]


def pki_check(layout: DemoLayout) -> subprocess.CompletedProcess[str]:
    return medgw("pki", "check", "--config", layout.hospital.config_path)


def rows(result: subprocess.CompletedProcess[str], severity: str, item: str) -> list[str]:
    return [
        line
        for line in result.stdout.splitlines()
        if line.startswith(severity) and line.split()[1] == item
    ]


@pytest.mark.parametrize(
    ("make", "words", "fix", "condition"),
    [
        (
            expired_tls,
            "expired on",
            "then point tls.certificate and tls.key at the new",
            "or, if the certificate is current, this host's clock is wrong (",
        ),
        (future_tls, "is not valid before", "check this host's clock", ""),
    ],
    ids=["expired", "not-yet-valid"],
)
def test_our_tls_certificate_outside_its_validity_is_an_error(
    layout: DemoLayout, make: Any, words: str, fix: str, condition: str
) -> None:
    install(layout, "tls", make(layout))
    config = layout.hospital.config_path
    before = datetime.now(UTC)
    result = check_config(config)
    assert result.returncode == 1, result.stdout + result.stderr
    assert "configuration is valid" not in result.stdout
    assert reported(result, config, "tls.certificate", "our TLS certificate CN=SAKURA", fix)
    assert reported(result, config, "tls.certificate", words, "")
    assert_names_the_clock(result.stderr, before=before, condition=condition)
    assert "medgw will not start with this configuration" in result.stderr
    checked = pki_check(layout)
    assert checked.returncode == 1, checked.stdout
    [row] = rows(checked, "error", "tls.certificate")
    assert words in row and "(fix: " in row


def test_a_signing_certificate_as_our_tls_certificate_is_an_error(layout: DemoLayout) -> None:
    config = layout.hospital.config_path
    edit(config, 'certificate = "certs/tls.crt"', 'certificate = "certs/sign.crt"')
    edit(config, 'key = "certs/tls.key"', 'key = "certs/sign.key"')
    result = check_config(config)
    assert result.returncode == 1, result.stdout + result.stderr
    for eku in ("serverAuth", "clientAuth"):
        assert reported(
            result, config, "tls.certificate", f"extendedKeyUsage lacks {eku}", "medgw pki csr"
        ), result.stderr
    checked = pki_check(layout)
    assert checked.returncode == 1 and len(rows(checked, "error", "tls.certificate")) == 2


def test_a_tls_certificate_as_our_signing_certificate_is_an_error(layout: DemoLayout) -> None:
    config = layout.hospital.config_path
    edit(config, 'signing_certificate = "certs/sign.crt"', 'signing_certificate = "certs/tls.crt"')
    edit(config, 'signing_key = "certs/sign.key"', 'signing_key = "certs/tls.key"')
    result = check_config_reports(
        config,
        1,
        "smime.signing_certificate",
        "our S/MIME signing certificate CN=",
        "smime.signing_key",
    )
    assert "extendedKeyUsage lacks emailProtection" in result.stderr


def test_our_certificate_from_a_ca_no_zone_trusts_is_a_warning(layout: DemoLayout) -> None:
    other = make_ca("Other CA", now=NOW)
    install(layout, "tls", issue(other, "KITA-LAB", purpose="tls", now=NOW))
    config = layout.hospital.config_path
    result = check_config_reports(
        config,
        0,
        "tls.certificate",
        "our TLS certificate CN=KITA-LAB",
        "ask each peer's administrator to trust that root CA",
    )
    assert "chains to the trust anchors of no zone (loopback)" in result.stdout
    assert "its issuer CN=Other CA" in result.stdout
    assert "configuration is valid (1 warning(s))" in result.stdout
    checked = pki_check(layout)
    assert checked.returncode == 0, checked.stdout
    assert len(rows(checked, "warning", "tls.certificate")) == 1


def test_an_expired_ca_certificate_sent_with_ours_is_an_error(layout: DemoLayout) -> None:
    """Every peer refuses a path through an expired intermediate CA just as an expired
    leaf: the CA certificates after ours in its file are judged by the same rule."""
    tls_under_an_intermediate(
        layout, ca_from=NOW - timedelta(days=32), ca_days=30, leaf_from=NOW - timedelta(days=1)
    )
    config = layout.hospital.config_path
    before = datetime.now(UTC)
    result = check_config(config)
    assert result.returncode == 1, result.stdout + result.stderr
    assert reported(
        result,
        config,
        "tls.certificate",
        "our TLS certificate CN=SAKURA-HOSPITAL's chain: CA certificate CN=Sakura Issuing CA "
        "expired on",
        "put its CA's current certificate (ask the CA for it) in its place",
    ), result.stdout + result.stderr
    assert_names_the_clock(
        result.stderr,
        before=before,
        condition="or, if the certificate is current, this host's clock is wrong (",
    )
    assert "medgw will not start with this configuration" in result.stderr


def test_of_two_intermediates_of_one_name_the_one_that_issued_ours_is_judged(
    layout: DemoLayout,
) -> None:
    """A CA rollover: the CA's next intermediate (its name, a new key, valid now) put in
    the file before the one that issued ours, which has expired.  A peer's path goes
    through the one whose key signed ours: expired, an error, though a valid certificate
    of that name is in the file too."""
    issuing, _ = tls_under_an_intermediate(
        layout, ca_from=NOW - timedelta(days=32), ca_days=30, leaf_from=NOW - timedelta(days=1)
    )
    subject = issuing.certificate.subject
    next_ca = make_ca(
        "Sakura Issuing CA", now=NOW - timedelta(days=1), days=30, parent=demo_ca(layout)
    ).certificate
    assert next_ca.subject == subject and next_ca.public_key() != issuing.certificate.public_key()
    certs = layout.hospital.root / "certs"
    leaf, old_ca = x509.load_pem_x509_certificates((certs / "tls.crt").read_bytes())
    write_pem(certs / "tls.crt", [leaf, next_ca, old_ca])
    config = layout.hospital.config_path
    result = check_config(config)
    assert result.returncode == 1, result.stdout + result.stderr
    assert reported(
        result,
        config,
        "tls.certificate",
        "our TLS certificate CN=SAKURA-HOSPITAL's chain: CA certificate CN=Sakura Issuing CA "
        "expired on",
        "put its CA's current certificate (ask the CA for it) in its place",
    ), result.stdout + result.stderr
    assert "medgw will not start with this configuration" in result.stderr


@pytest.mark.parametrize("aside", ["expired-root", "next-intermediate"])
def test_a_certificate_in_our_file_that_no_path_goes_through_is_only_a_warning(
    layout: DemoLayout, aside: str
) -> None:
    """An expired root appended after ours, or the CA's next intermediate put there
    before it is valid: a peer builds its path without them, so the configuration that
    started before starts still, with a warning naming the certificate."""
    certs = layout.hospital.root / "certs"
    ours = x509.load_pem_x509_certificates((certs / "tls.crt").read_bytes())
    if aside == "expired-root":
        extra = make_ca("Old Root", now=NOW - timedelta(days=400), days=30).certificate
        words = "CA certificate CN=Old Root expired on"
    else:
        extra = make_ca(
            "Next Issuing CA", now=NOW + timedelta(days=10), days=30, parent=demo_ca(layout)
        ).certificate
        words = "CA certificate CN=Next Issuing CA is not valid before"
    write_pem(certs / "tls.crt", [*ours, extra])
    config = layout.hospital.config_path
    result = check_config(config)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "warning:" in result.stdout + result.stderr
    assert words in result.stdout + result.stderr, result.stdout + result.stderr
    assert "error:" not in result.stdout + result.stderr


def test_the_demo_certificates_give_no_finding(layout: DemoLayout) -> None:
    for site in (layout.hospital, layout.lab):
        result = check_config(site.config_path)
        assert result.returncode == 0, result.stderr
        assert "configuration is valid (0 warning(s))" in result.stdout
        checked = medgw("pki", "check", "--config", site.config_path)
        assert checked.returncode == 0 and "0 error(s), 0 warning(s)" in checked.stdout


def test_medgw_does_not_start_with_our_expired_tls_certificate(
    layout: DemoLayout, processes: Any
) -> None:
    install(layout, "tls", expired_tls(layout))
    before = datetime.now(UTC)
    hospital = processes.start(layout.hospital.config_path, wait=False)
    assert hospital.wait_exit() == 1
    output = "\n".join(hospital.raw)
    assert "tls.certificate: our TLS certificate CN=SAKURA-HOSPITAL" in output
    assert "expired on" in output and "(fix: " in output
    assert_names_the_clock(
        output,
        before=before,
        condition="if the certificate is current, this host's clock is wrong (",
    )
    assert not any(line.get("event") == "daemon.ready" for line in hospital.lines)


def served_certificate(port: int) -> x509.Certificate:
    """The certificate the listener on ``port`` shows (the handshake itself is refused
    afterwards: this client has none)."""
    pem = ssl.get_server_certificate(("127.0.0.1", port))
    return x509.load_pem_x509_certificate(pem.encode())


def test_a_reload_to_our_expired_tls_certificate_is_refused(
    layout: DemoLayout, processes: Any
) -> None:
    hospital = processes.start(layout.hospital.config_path)
    before = served_certificate(layout.hospital.port)
    install(layout, "tls", expired_tls(layout))
    hospital.signal(signal.SIGHUP)
    [failed] = wait_for_events(layout.hospital.audit_log, "config.reload_failed")
    assert "tls.certificate: our TLS certificate" in failed["reason"]
    assert "expired on" in failed["reason"]
    assert hospital.proc.poll() is None
    assert served_certificate(layout.hospital.port) == before
