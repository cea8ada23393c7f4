"""The demo with the lab's certificates naming a CRL distribution point the test serves,
and the hospital's zone fetching CRLs from it instead of reading files."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

from cryptography import x509

from gateway.pki.demo import DemoLayout
from gateway.pki.issue import Issued, issue, write_pem
from tests.helpers.demo import demo_ca


class CrlWorld:
    """The demo, with the lab's certificates re-issued to name ``url`` as their CRL DP,
    and the hospital's zone fetching CRLs instead of reading files."""

    def __init__(self, layout: DemoLayout, url: str) -> None:
        self.layout = layout
        self.ca = demo_ca(layout)
        start = datetime.now(UTC) - timedelta(hours=1)
        self.lab: dict[str, Issued] = {}
        lab_certs = layout.lab.root / "certs"
        seen_by_hospital = layout.hospital.root / "certs" / "peers" / "lab"
        for role, purpose, dns, ips in (
            ("tls", "tls", ("localhost",), ("127.0.0.1",)),
            ("sign", "smime-sign", (), ()),
            ("encrypt", "smime-encrypt", (), ()),
        ):
            issued = issue(
                self.ca,
                layout.lab.as2_id,
                purpose=purpose,
                now=start,
                organization=layout.lab.display_name,
                dns_names=dns,
                ip_addresses=ips,
                crl_url=url,
            )
            write_pem(lab_certs / f"{role}.key", issued.key)
            write_pem(lab_certs / f"{role}.crt", issued.certificate)
            write_pem(seen_by_hospital / f"{role}.crt", issued.certificate)
            self.lab[role] = issued
        config = layout.hospital.config_path
        text = config.read_text()
        assert 'crls = ["certs/crls/loopback"]' in text
        assert "fetch_crls = false" in text
        config.write_text(
            text.replace('crls = ["certs/crls/loopback"]', "crls = []").replace(
                "fetch_crls = false", "fetch_crls = true"
            )
        )

    @property
    def cache(self) -> Path:
        return self.layout.hospital.root / "state" / "crls" / "loopback"

    def certificate(self, role: str) -> x509.Certificate:
        return self.lab[role].certificate
