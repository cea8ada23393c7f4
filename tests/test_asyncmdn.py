"""Asynchronous receipts: where they may go, and what counts as one."""

from __future__ import annotations

import pytest

from gateway.as2.asyncmdn import async_receipt_url, is_receipt

PEER = "https://as2.lab.example:4443/as2"


@pytest.mark.parametrize(
    ("requested", "expected"),
    [
        (None, None),
        ("", None),
        ("https://as2.lab.example:4443/mdn", "https://as2.lab.example:4443/mdn"),
        ("https://AS2.LAB.example:4443/other", "https://AS2.LAB.example:4443/other"),
        ("http://as2.lab.example:4443/mdn", None),  # never plaintext
        ("https://as2.lab.example/mdn", None),  # another port
        ("https://169.254.169.254:4443/latest", None),  # another host: no SSRF
        ("mailto:admin@lab.example", None),
        ("https://[::1", None),
    ],
)
def test_receipts_go_only_to_the_peers_own_endpoint(
    requested: str | None, expected: str | None
) -> None:
    assert async_receipt_url(requested, PEER) == expected


def test_a_report_that_asks_for_no_receipt_is_a_receipt() -> None:
    assert is_receipt({"content-type": 'multipart/signed; protocol="application/pkcs7-signature"'})
    assert is_receipt({"content-type": "multipart/report; report-type=disposition-notification"})
    assert not is_receipt({"content-type": "application/pkcs7-mime; smime-type=enveloped-data"})
    assert not is_receipt(
        {"content-type": "multipart/signed", "disposition-notification-to": "LAB"}
    )
