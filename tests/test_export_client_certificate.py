"""The audit export's client certificate judged at check-config and at the start.

The collector refuses our client certificate outside its validity period or without
clientAuth: said before the export fails at run time, as warnings naming
``audit.export.certificate``, the rule and the fix.  Only warnings: the export waits,
documents go on flowing, and ``medgw run`` starts (a monitoring certificate never stops
the gateway).  A key that is not its own is an error, as for any key pair.  Its path
ends at the collector's trust anchors, not a zone's: one from a CA no zone trusts is no
finding.

Real certificates from the tests' PKI, real ``medgw`` subprocesses.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from gateway.pki.demo import DemoLayout
from gateway.pki.issue import Issued, issue, make_ca, write_pem
from tests.helpers.audit_export import export_with_files_in
from tests.helpers.check_config import check_config, check_config_reports, reported

KEY = "audit.export.certificate"
NEW_CERTIFICATE = "then point audit.export.certificate and audit.export.key at the new"


def monitoring_ca(now: datetime) -> Issued:
    """The hospital's monitoring CA: no zone of the gateway trusts it."""
    return make_ca("Monitoring CA", now=now - timedelta(days=400))


def export_with(layout: DemoLayout, client: Issued, *, key: Issued | None = None) -> None:
    """``[audit.export]`` in the hospital's configuration, with ``client`` as its client
    certificate and the key of ``key`` (default: its own)."""
    folder = layout.hospital.root / "certs" / "audit-export"
    folder.mkdir()
    write_pem(folder / "client.crt", client.certificate)
    write_pem(folder / "client.key", (key or client).key)
    (folder / "client.key").chmod(0o600)
    write_pem(folder / "ca.crt", monitoring_ca(datetime.now(UTC)).certificate)
    export_with_files_in(layout.hospital.config_path, "127.0.0.1:6514", folder)


def client(purpose: str, *, issued_ago: timedelta = timedelta(days=1), days: int = 825) -> Issued:
    now = datetime.now(UTC)
    return issue(
        monitoring_ca(now), "medgw-hospital", purpose=purpose, now=now - issued_ago, days=days
    )


@pytest.mark.parametrize(
    ("made", "words", "fix"),
    [
        (
            lambda: client("smime-sign"),
            "its extendedKeyUsage lacks clientAuth",
            "medgw pki csr",
        ),
        (
            lambda: client("tls", issued_ago=timedelta(days=32), days=30),
            "expired on",
            "this host's clock is wrong (",
        ),
        (
            lambda: client("tls", issued_ago=-timedelta(days=3)),
            "is not valid before",
            "check this host's clock",
        ),
    ],
    ids=["signing-certificate", "expired", "not-yet-valid"],
)
def test_an_export_client_certificate_the_collector_refuses_is_a_warning(
    layout: DemoLayout, made: Any, words: str, fix: str
) -> None:
    export_with(layout, made())
    config = layout.hospital.config_path
    result = check_config_reports(
        config, 0, KEY, "our audit export client certificate CN=medgw-hospital", fix
    )
    assert reported(result, config, KEY, words, ""), result.stdout + result.stderr
    assert "the audit export waits" in result.stdout, result.stdout
    assert "configuration is valid (1 warning(s))" in result.stdout, result.stdout


def test_an_export_client_key_that_is_not_its_own_is_an_error(layout: DemoLayout) -> None:
    export_with(layout, client("tls"), key=client("tls"))
    check_config_reports(
        layout.hospital.config_path,
        1,
        "audit.export.key",
        "is not the private key of the certificate",
        "point certificate and key at a matching certificate and key",
    )


def test_a_current_export_client_certificate_from_the_monitoring_ca_is_no_finding(
    layout: DemoLayout,
) -> None:
    export_with(layout, client("tls"))
    result = check_config(layout.hospital.config_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "configuration is valid (0 warning(s))" in result.stdout, result.stdout


def test_medgw_starts_with_an_expired_export_client_certificate_and_says_so(
    layout: DemoLayout, processes: Any
) -> None:
    """The gateway's documents do not wait for its monitoring's certificate."""
    export_with(layout, client("tls", issued_ago=timedelta(days=32), days=30))
    hospital = processes.start(layout.hospital.config_path)
    [warning] = [
        line["problem"]
        for line in hospital.lines
        if line.get("event") == "config.warning" and KEY in line["problem"]
    ]
    assert "our audit export client certificate CN=medgw-hospital" in warning, warning
    assert "expired on" in warning and "the audit export waits" in warning, warning
