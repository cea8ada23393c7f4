"""Receipts and AS2 headers made by other AS2 products (Mendelson, IBM Sterling B2B Integrator).

The vendor files are raw HTTP bodies as received, AS2/MIME headers at the
top; they live outside the repository (``../shared/testdata/as2-vendors``) and
the tests that read them skip when it is absent.  (Opening and verifying the
vendor *messages* is the CMS engine's, in ``test_vendors.py``; here: our AS2
layer's reading of their headers and of their MDNs.)
"""

from __future__ import annotations

import base64
import subprocess
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509

from gateway.as2.headers import check_message_id, parse_receipt_request, unquote_as2_id
from gateway.as2.mdn import Receipt, Report, parse_receipt, read_report, split_multipart
from gateway.cms.mime import get_header, header_param, parse_entity
from gateway.config import load_config
from gateway.errors import PolicyError, ProtocolError, SignatureError, SignerNotTrustedError
from gateway.pki.demo import DemoLayout
from gateway.policy import LEGACY_ALGORITHMS, AlgorithmPolicy
from tests import as2client, testdata
from tests.helpers.audit import events, wait_for_events
from tests.helpers.demo import lab_post


@pytest.fixture(scope="module")
def vendors() -> Path:
    return testdata.AS2_VENDORS.require()


def _http(raw: bytes) -> tuple[dict[str, str], bytes]:
    """Headers as the channel hands them to the pipeline (lower-case names), and the body."""
    headers, body = parse_entity(raw)
    return {k.lower(): v for k, v in headers}, body


# name -> (the signer's certificate file, or None: only the one the MDN carries; the report)
SIGNED_MDNS: dict[str, tuple[str | None, Report]] = {
    # Signed by a self-signed "CN=mecas2" certificate (expired 2017) that the MDN
    # carries, not by cert_mecas2_public.pem ("mendelson test key 3").
    "mecas2_signed.mdn": (
        None,
        Report(
            original_message_id="<20161230102456.10748.40759@imac.local>",
            disposition="processed",
            mic="O4bvrm5t2YunRfwvZicNdEUmPaPZ9vUslX8loVLDck0=, sha-256",
            final_recipient="mecas2",
        ),
    ),
    # Sterling: LF after its HTTP headers, CRLF inside, no space after ";", a
    # report part without headers, and the signature as binary DER.
    "sb2bi_signed.mdn": (
        "cert_sb2bi_public.pem",
        Report(
            original_message_id=(
                "<151694007918.24690.7052273208458909245@ip-172-31-14-209.ec2.internal>"
            ),
            disposition="processed",
            mic="wNh76aEicfBurg/et2wio4zk/2I=,sha1",
            final_recipient="MCLANECOAS2PRD",
        ),
    ),
}


def _signed_parts(vendors: Path, name: str) -> tuple[str, bytes, bytes]:
    """(Content-Type, signed report entity, DER signature) of a vendor's signed MDN."""
    headers, body = _http((vendors / name).read_bytes())
    content_type = headers["content-type"]
    boundary = header_param(content_type, "boundary")
    assert boundary
    report, signature_part = split_multipart(body, boundary)
    sig_headers, sig_body = parse_entity(signature_part)
    encoding = (get_header(sig_headers, "Content-Transfer-Encoding") or "binary").lower()
    signature = base64.b64decode(b"".join(sig_body.split())) if encoding == "base64" else sig_body
    return content_type, report, signature


@pytest.mark.parametrize("name", sorted(SIGNED_MDNS))
def test_vendor_signed_mdn_reports_read(vendors: Path, name: str) -> None:
    _cert, expected = SIGNED_MDNS[name]
    _content_type, report, _signature = _signed_parts(vendors, name)
    assert read_report(report) == expected


def _openssl_signer(vendors: Path, name: str, tmp_path: Path) -> x509.Certificate:
    """openssl checks the vendor's signature over the report bytes as our MDN layer cut
    them; the certificate that signed (the one to pin for this peer)."""
    cert, _expected = SIGNED_MDNS[name]
    _content_type, report, signature = _signed_parts(vendors, name)
    (tmp_path / "report").write_bytes(report)
    (tmp_path / "signature.der").write_bytes(signature)
    certfile = ("-certfile", str(vendors / cert)) if cert else ()
    proc = subprocess.run(
        [
            *("openssl", "cms", "-verify", "-noverify", "-binary", "-inform", "DER"),
            *("-in", str(tmp_path / "signature.der"), "-content", str(tmp_path / "report")),
            *certfile,
            *("-signer", str(tmp_path / "signer.pem"), "-out", "/dev/null"),
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    assert "Verification successful" in proc.stderr
    signer = x509.load_pem_x509_certificate((tmp_path / "signer.pem").read_bytes())
    if cert:
        assert signer == x509.load_pem_x509_certificate((vendors / cert).read_bytes())
    return signer


@pytest.mark.parametrize("name", sorted(SIGNED_MDNS))
def test_vendor_mdn_signature_covers_exactly_the_report_we_read(
    vendors: Path, name: str, tmp_path: Path
) -> None:
    _openssl_signer(vendors, name, tmp_path)


def _receipt(vendors: Path, name: str, signer: x509.Certificate, *, compat: bool) -> Receipt:
    headers, body = _http((vendors / name).read_bytes())
    return parse_receipt(
        headers["content-type"],
        body,
        trusted_signers=[signer],
        policy=AlgorithmPolicy(accept_legacy=frozenset({"sha1"} if compat else ())),
    )


@pytest.mark.parametrize("name", sorted(SIGNED_MDNS))
def test_vendor_mdns_signed_with_sha1_verify_only_for_compat_peers(
    vendors: Path, name: str, tmp_path: Path
) -> None:
    """Both vendor MDNs are signed with SHA-1 (CRYPTREC monitored list): refused, by name,
    unless the peer is compat; then verified, and the compat use reported for the audit."""
    _cert, expected = SIGNED_MDNS[name]
    signer = _openssl_signer(vendors, name, tmp_path)
    with pytest.raises(PolicyError) as refused:
        _receipt(vendors, name, signer, compat=False)
    assert refused.value.algorithm == "sha1"
    assert "CRYPTREC" in refused.value.rule and "accept_legacy" in refused.value.rule
    assert refused.value.fix is not None and 'accept_legacy = ["sha1"]' in refused.value.fix

    receipt = _receipt(vendors, name, signer, compat=True)
    assert receipt.signer == signer
    assert receipt.signing_digest == "sha1"
    assert receipt.compat_algorithms == ("sha1",)  # the signature (and Sterling's MIC)
    assert receipt.original_message_id == expected.original_message_id
    assert receipt.disposition == expected.disposition and receipt.processed
    assert receipt.mic == expected.mic


@pytest.mark.parametrize("name", sorted(SIGNED_MDNS))
def test_vendor_mdn_altered_or_from_another_signer_refused_for_compat_peers(
    vendors: Path, name: str, tmp_path: Path
) -> None:
    signer = _openssl_signer(vendors, name, tmp_path)
    headers, body = _http((vendors / name).read_bytes())
    assert body.count(b"processed") >= 1
    with pytest.raises(SignatureError):
        parse_receipt(
            headers["content-type"],
            body.replace(b"processed", b"processeD", 1),
            trusted_signers=[signer],
            policy=AlgorithmPolicy(accept_legacy=frozenset(LEGACY_ALGORITHMS)),
        )
    other = x509.load_pem_x509_certificate((vendors / "cert_test_public.pem").read_bytes())
    with pytest.raises(SignerNotTrustedError):
        _receipt(vendors, name, other, compat=True)


def test_mendelson_unsigned_mdn_reads_and_is_never_taken_as_a_receipt(vendors: Path) -> None:
    raw = (vendors / "mecas2_unsigned.mdn").read_bytes()
    # LF line ends only, and the body opens with its first delimiter.
    assert read_report(raw) == Report(
        original_message_id="<20161230102316.10728.85252@imac.local>",
        disposition="processed/error: authentication-failed",
        mic=None,
        final_recipient="mecas2",
    )
    headers, body = _http(raw)
    with pytest.raises(ProtocolError, match="not signed"):
        parse_receipt(
            headers["content-type"],
            body,
            trusted_signers=[],
            policy=AlgorithmPolicy(accept_legacy=frozenset(LEGACY_ALGORITHMS)),
        )


VENDOR_MESSAGES = {
    "mecas2_signed.as2": ("mecas2", "pyas2lib", False),
    "mecas2_compressed.as2": ("mecas2", "pyas2lib", False),
    "mecas2_encrypted.as2": ("mecas2", "pyas2lib", False),
    "mecas2_signed_encrypted.as2": ("mecas2", "pyas2lib", False),
    "mecas2_compressed_signed_encrypted.as2": ("mecas2", "pyas2lib", False),
    "sb2bi_signed_cmp.msg": ("SIAS2PRD", "as2server", True),
}


@pytest.mark.parametrize("name", sorted(VENDOR_MESSAGES))
def test_vendor_message_as2_headers_parse(vendors: Path, name: str) -> None:
    as2_from, as2_to, signed_receipt = VENDOR_MESSAGES[name]
    headers, _body = _http((vendors / name).read_bytes())
    message_id = check_message_id(headers.get("message-id"))
    assert message_id.startswith("<") and message_id.endswith(">")
    assert message_id.strip("<>") == headers["message-id"].strip().strip("<>")
    assert unquote_as2_id(headers["as2-from"]) == as2_from
    assert unquote_as2_id(headers["as2-to"]) == as2_to
    request = parse_receipt_request(headers)
    assert request.requested
    assert request.signed is signed_receipt
    # Sterling asks for a SHA-1 MIC only; we do not compute SHA-1 and fall back to ours.
    assert request.micalgs == ()
    assert request.choose_digest("sha256") == "sha256"


# -- a Sterling-style Message-ID against a real gateway ----------------------------------

# As IBM Sterling B2B Integrator sends it (sb2bi_signed_cmp.msg): no angle brackets.
STERLING_MESSAGE_ID = "0574493161569973Sterling20574493161569973MOKO"


def test_message_id_without_angle_brackets_is_accepted_and_echoed_with_them(
    layout: DemoLayout, processes: Any
) -> None:
    """RFC 4130 5.3.3: brackets are not part of the value; do not check for them on receipt."""
    processes.start(layout.hospital.config_path)
    lab = load_config(layout.lab.config_path)
    peer = lab.require_peer("hospital")
    built = as2client.build(
        b"ISA*00*sterling-style~",
        sender_as2="KITA-LAB",
        receiver_as2="SAKURA-HOSPITAL",
        signing=lab.smime.signing,
        recipient=peer.encryption_certificates[0],
        filename="edi.x12",
    )

    def post(message_id: str) -> as2client.Answer:
        headers = tuple((k, message_id if k == "Message-ID" else v) for k, v in built.headers)
        return lab_post(layout, headers, built.body)

    first = post(STERLING_MESSAGE_ID)
    assert first.status == 200, first.body[:200]
    receipt = parse_receipt(
        first.content_type,
        first.body,
        trusted_signers=peer.signing_certificates,
        policy=AlgorithmPolicy(),
    )
    assert receipt.processed
    assert f"Original-Message-ID: <{STERLING_MESSAGE_ID}>\r\n".encode() in first.body
    assert receipt.original_message_id == f"<{STERLING_MESSAGE_ID}>"
    # The same value with brackets is the same message: answered with the same receipt.
    second = post(f"<{STERLING_MESSAGE_ID}>")
    assert second.body == first.body
    duplicates = wait_for_events(layout.hospital.audit_log, "message.duplicate")
    assert len(duplicates) == 1
    delivered = events(layout.hospital.audit_log, "message.delivered")
    assert [r["message_id"] for r in delivered] == [f"<{STERLING_MESSAGE_ID}>"]
    assert (layout.hospital.inbox_dir / "lab" / "edi.x12").read_bytes() == b"ISA*00*sterling-style~"


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        (
            b"preamble\r\n--b\r\nA: 1\r\n\r\none\r\n--b\r\n\r\ntwo\r\n--b--\r\n",
            [b"A: 1\r\n\r\none", b"\r\ntwo"],
        ),
        (b"--b\nA: 1\n\none\n--b\n\ntwo\n--b--\n", [b"A: 1\n\none", b"\ntwo"]),
        (b"\n--b\r\nA: 1\r\n\r\none\n--b \r\n\r\ntwo\r\n--b--", [b"A: 1\r\n\r\none", b"\r\ntwo"]),
        (b"--b\r\n\r\n--b\r\nx\r\n--b--", [b"", b"x"]),
    ],
    ids=["crlf", "lf-opening-delimiter", "mixed", "empty-part"],
)
def test_split_multipart_takes_each_delimiter_line_break_as_it_comes(
    body: bytes, expected: list[bytes]
) -> None:
    assert split_multipart(body, "b") == expected
