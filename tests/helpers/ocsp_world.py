"""The demo with the lab's certificates re-issued to name a real OCSP responder."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from gateway.demo_run import free_port
from gateway.pki.demo import DemoLayout
from gateway.pki.issue import Issued, issue, issue_ocsp_responder, write_pem
from tests.helpers.demo import demo_ca
from tests.ocsp_responder import Responder, index_line


class OcspWorld:
    """The demo, with the lab's certificates re-issued to name an OCSP responder."""

    def __init__(self, layout: DemoLayout) -> None:
        self.layout = layout
        self.port = free_port()
        self.work = layout.root / "ocsp"
        self.work.mkdir()
        ca = demo_ca(layout)
        self.ca = ca
        start = datetime.now(UTC) - timedelta(hours=1)
        self.responder_cert = issue_ocsp_responder(ca, "Demo OCSP Responder", now=start)
        self.lab: dict[str, Issued] = {}
        lab_certs = layout.lab.root / "certs"
        seen_by_hospital = layout.hospital.root / "certs" / "peers" / "lab"
        for role, purpose, dns, ips in (
            ("tls", "tls", ("localhost",), ("127.0.0.1",)),
            ("sign", "smime-sign", (), ()),
            ("encrypt", "smime-encrypt", (), ()),
        ):
            issued = issue(
                ca,
                layout.lab.as2_id,
                purpose=purpose,
                now=start,
                organization=layout.lab.display_name,
                dns_names=dns,
                ip_addresses=ips,
                ocsp_url=f"http://127.0.0.1:{self.port}/",
            )
            write_pem(lab_certs / f"{role}.key", issued.key)
            write_pem(lab_certs / f"{role}.crt", issued.certificate)
            write_pem(seen_by_hospital / f"{role}.crt", issued.certificate)
            self.lab[role] = issued
        self.set_status(revoked=())
        (self.work / "index.txt.attr").write_text("unique_subject = no\n")
        # The hospital's zone: no CRLs, OCSP required.
        config = layout.hospital.config_path
        text = config.read_text()
        assert 'crls = ["certs/crls/loopback"]' in text and "ocsp = false" in text
        config.write_text(
            text.replace('crls = ["certs/crls/loopback"]', "crls = []").replace(
                "ocsp = false", "ocsp = true"
            )
        )

    def set_status(self, *, revoked: tuple[str, ...]) -> None:
        """Write the responder's index: the lab's certificates, ``revoked`` ones revoked."""
        when = datetime.now(UTC) - timedelta(minutes=5)
        lines = [index_line(self.responder_cert.certificate)]
        for role, issued in self.lab.items():
            lines.append(index_line(issued.certificate, when if role in revoked else None))
        (self.work / "index.txt").write_text("".join(lines))

    def responder(self) -> Responder:
        # No nextUpdate: nothing is cached, every judgement asks again.
        return Responder(
            self.work,
            self.ca.certificate,
            self.responder_cert,
            self.port,
            next_update_minutes=None,
        )
