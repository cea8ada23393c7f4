"""Revocation against real things: ``openssl ocsp`` serving an ``openssl ca``
index on 127.0.0.1, and CRLs signed by a test CA."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from asn1crypto import crl as asn1_crl
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa

from gateway.demo_run import free_port
from gateway.egress import Network
from gateway.errors import InvalidValueError
from gateway.pki import issue
from gateway.pki.crl import crl_findings, stale_crl_warnings
from gateway.pki.ocsp import OcspClient, OcspError, build_request, parse_response
from gateway.pki.validate import Purpose, RevocationPolicy, ValidationResult, validate
from gateway.policy import AlgorithmPolicy
from tests.ocsp_responder import Responder, index_line
from tests.routes import zone_route

pytestmark = pytest.mark.skipif(shutil.which("openssl") is None, reason="openssl not on PATH")

NOW = datetime.now(UTC).replace(microsecond=0)


@dataclass
class Pki:
    root: issue.Issued
    good: issue.Issued
    revoked: issue.Issued
    unknown: issue.Issued
    responder: issue.Issued
    rogue: issue.Issued  # an OCSP-signing certificate from another CA
    url: str
    port: int
    dir: Path


@pytest.fixture
def pki(tmp_path: Path) -> Pki:
    port = free_port()
    url = f"http://127.0.0.1:{port}/"
    root = issue.make_ca("OCSP Test Root", now=NOW - timedelta(days=1), organization="Test")
    start = NOW - timedelta(hours=1)
    good = issue.issue(root, "good.example", purpose="tls", now=start, ocsp_url=url)
    revoked = issue.issue(root, "revoked.example", purpose="tls", now=start, ocsp_url=url)
    unknown = issue.issue(root, "unknown.example", purpose="tls", now=start, ocsp_url=url)
    responder = issue.issue_ocsp_responder(root, "OCSP Responder", now=start)
    other_ca = issue.make_ca("Other Root", now=start)
    rogue = issue.issue_ocsp_responder(other_ca, "OCSP Responder", now=start)
    (tmp_path / "index.txt").write_text(
        index_line(good.certificate)
        + index_line(revoked.certificate, NOW - timedelta(minutes=30))
        + index_line(responder.certificate)
    )
    (tmp_path / "index.txt.attr").write_text("unique_subject = no\n")
    return Pki(root, good, revoked, unknown, responder, rogue, url, port, tmp_path)


@pytest.fixture
def responder(pki: Pki) -> Iterator[Responder]:
    server = Responder(pki.dir, pki.root.certificate, pki.responder, pki.port)
    try:
        yield server
    finally:
        server.stop()


async def _check(
    pki: Pki,
    leaf: issue.Issued,
    policy: RevocationPolicy,
    client: OcspClient | None = None,
) -> ValidationResult:
    return await validate(
        leaf.certificate,
        anchors=[pki.root.certificate],
        purpose=Purpose.TLS_CLIENT,
        revocation=policy,
        ocsp=True,
        ocsp_client=client or OcspClient(Network.unconfigured(), timeout=5),
        at=datetime.now(UTC),
        policy=AlgorithmPolicy(),
    )


async def test_ocsp_good(pki: Pki, responder: Responder) -> None:
    result = await _check(pki, pki.good, RevocationPolicy.REQUIRE)
    assert result.valid, result.reason
    assert responder.requests == 1
    assert result.statuses[0].status == "good" and result.statuses[0].source == "ocsp"
    assert "CN=good.example" in result.revocation and "ocsp" in result.revocation


async def test_ocsp_without_a_client_asks_nobody_and_says_it_is_the_callers_mistake(
    pki: Pki, responder: Responder
) -> None:
    """There is no default way out: OCSP needs a client, whose route says how it leaves.
    Without one, validation does not start: an error that names the argument, the rule
    and the fix (not a certificate that "could not be validated: internal error")."""
    with pytest.raises(InvalidValueError) as raised:
        await validate(
            pki.good.certificate,
            anchors=[pki.root.certificate],
            purpose=Purpose.TLS_CLIENT,
            revocation=RevocationPolicy.PREFER,
            ocsp=True,
            at=datetime.now(UTC),
            policy=AlgorithmPolicy(),
        )
    error = raised.value
    assert "ocsp=True without an ocsp_client" in error.message and "NET-4" in error.message
    assert error.fix is not None and "OcspClient" in error.fix
    assert "internal error" not in str(error)
    assert responder.requests == 0


async def test_ocsp_revoked_is_refused_under_every_checking_policy(
    pki: Pki, responder: Responder
) -> None:
    for policy in (RevocationPolicy.REQUIRE, RevocationPolicy.PREFER):
        result = await _check(pki, pki.revoked, policy)
        assert not result.valid
        assert result.reason is not None
        assert "CN=revoked.example" in result.reason and "revoked" in result.reason
        assert "fix:" in result.reason


async def test_ocsp_unknown(pki: Pki, responder: Responder) -> None:
    refused = await _check(pki, pki.unknown, RevocationPolicy.REQUIRE)
    assert not refused.valid
    assert refused.reason is not None and "could not be established" in refused.reason
    preferred = await _check(pki, pki.unknown, RevocationPolicy.PREFER)
    assert preferred.valid, preferred.reason
    assert any("unknown" in w for w in preferred.warnings)


async def test_ocsp_responder_down_per_policy(pki: Pki) -> None:
    # nothing listens on pki.port
    refused = await _check(pki, pki.good, RevocationPolicy.REQUIRE)
    assert not refused.valid
    assert refused.reason is not None and "unreachable" in refused.reason
    warned = await _check(pki, pki.good, RevocationPolicy.PREFER)
    assert warned.valid and warned.warnings and "unreachable" in warned.warnings[0]
    off = await _check(pki, pki.good, RevocationPolicy.OFF)
    assert off.valid and off.revocation == "not-checked"


async def test_ocsp_response_signed_by_unauthorised_key_is_refused(pki: Pki) -> None:
    server = Responder(pki.dir, pki.root.certificate, pki.rogue, pki.port)
    try:
        for leaf in (pki.good, pki.revoked):
            result = await _check(pki, leaf, RevocationPolicy.REQUIRE)
            assert not result.valid
            assert result.reason is not None
            assert "could not be established" in result.reason
            assert "unauthori" in result.reason  # the responder is named as not authorised
        assert server.requests >= 2  # the rogue responder really answered
    finally:
        server.stop()


async def test_ocsp_cache_until_next_update(pki: Pki) -> None:
    client = OcspClient(Network.unconfigured(), timeout=5)
    server = Responder(pki.dir, pki.root.certificate, pki.responder, pki.port)
    try:
        assert (await _check(pki, pki.good, RevocationPolicy.REQUIRE, client)).valid
    finally:
        server.stop()
    # The responder is gone: the validated response is still fresh (nextUpdate +10 min).
    cached = await _check(pki, pki.good, RevocationPolicy.REQUIRE, client)
    assert cached.valid, cached.reason
    # Past nextUpdate the cache no longer answers, and require refuses.
    later = await validate(
        pki.good.certificate,
        anchors=[pki.root.certificate],
        at=datetime.now(UTC) + timedelta(minutes=20),
        revocation=RevocationPolicy.REQUIRE,
        ocsp=True,
        ocsp_client=client,
        purpose=Purpose.ANY,
        policy=AlgorithmPolicy(),
    )
    assert not later.valid


async def test_ocsp_request_leaves_from_the_zones_source_address(
    pki: Pki, responder: Responder
) -> None:
    route = zone_route("127.0.0.2", "127.0.0.0/8")
    result = await _check(pki, pki.good, RevocationPolicy.REQUIRE, OcspClient(route, timeout=5))
    assert result.valid, result.reason
    assert responder.clients == ["127.0.0.2"]  # not the address the OS would have chosen


async def test_ocsp_responder_outside_the_zones_egress_is_never_asked(
    pki: Pki, responder: Responder
) -> None:
    """NET-4: a revocation check for a closed network's peer does not go out elsewhere."""
    client = OcspClient(zone_route(None, "10.20.0.0/16"), timeout=5)
    refused = await _check(pki, pki.good, RevocationPolicy.REQUIRE, client)
    assert not refused.valid
    assert refused.reason is not None
    assert "outside the egress of zone 'z' (10.20.0.0/16)" in refused.reason
    assert f"{pki.url}" in refused.reason
    # a host name is resolved, and only addresses inside the egress are connected to
    named = issue.issue(
        pki.root,
        "named.example",
        purpose="tls",
        now=NOW - timedelta(hours=1),
        ocsp_url=f"http://localhost:{pki.port}/",
    )
    by_name = await _check(pki, named, RevocationPolicy.REQUIRE, client)
    assert not by_name.valid
    assert by_name.reason is not None and "outside the egress of zone 'z'" in by_name.reason
    assert responder.requests == 0
    # inside the egress, the same responder is asked
    allowed = OcspClient(zone_route(None, "127.0.0.0/8"), timeout=5)
    assert (await _check(pki, pki.good, RevocationPolicy.REQUIRE, allowed)).valid
    assert responder.requests == 1


async def test_ocsp_nonce_must_be_echoed(pki: Pki, responder: Responder) -> None:
    import aiohttp
    from asn1crypto import x509 as asn1_x509
    from cryptography.hazmat.primitives.serialization import Encoding

    cert = asn1_x509.Certificate.load(pki.good.certificate.public_bytes(Encoding.DER))
    issuer = asn1_x509.Certificate.load(pki.root.certificate.public_bytes(Encoding.DER))
    body = build_request(cert, issuer, b"0123456789abcdef").dump()
    async with (
        aiohttp.ClientSession() as session,
        session.post(pki.url, data=body, headers={"Content-Type": "application/ocsp-request"}) as r,
    ):
        raw = await r.read()
    now = datetime.now(UTC)
    ok = parse_response(
        raw, url=pki.url, cert=cert, issuer=issuer, nonce=b"0123456789abcdef", at=now
    )
    assert ok.status == "good"
    with pytest.raises(OcspError, match="nonce"):
        parse_response(
            raw, url=pki.url, cert=cert, issuer=issuer, nonce=b"replayed-nonce!!", at=now
        )


# --- CRLs ---------------------------------------------------------------------


@pytest.fixture
def chain() -> tuple[issue.Issued, issue.Issued, issue.Issued]:
    root = issue.make_ca("CRL Root", now=NOW - timedelta(days=30))
    sub = issue.make_ca("CRL Issuing CA", now=NOW - timedelta(days=30), parent=root)
    leaf = issue.issue(sub, "leaf.example", purpose="smime-sign", now=NOW - timedelta(days=1))
    return root, sub, leaf


async def test_crl_good_revoked_missing_and_stale(
    chain: tuple[issue.Issued, issue.Issued, issue.Issued],
) -> None:
    root, sub, leaf = chain
    root_crl = issue.make_crl(root, now=NOW - timedelta(hours=1), days=30)
    sub_crl = issue.make_crl(sub, now=NOW - timedelta(hours=1), days=7)

    async def check(crls: list[x509.CertificateRevocationList], **kw: object) -> ValidationResult:
        return await validate(
            leaf.certificate,
            anchors=[root.certificate],
            intermediates=[sub.certificate],
            purpose=Purpose.SMIME_SIGN,
            revocation=kw.get("policy", RevocationPolicy.REQUIRE),  # type: ignore[arg-type]
            crls=crls,
            at=kw.get("at", NOW),  # type: ignore[arg-type]
            policy=AlgorithmPolicy(),
        )

    good = await check([root_crl, sub_crl])
    assert good.valid, good.reason
    assert [s.status for s in good.statuses] == ["good", "good", "trust-anchor"]
    assert good.subjects[0] == "CN=leaf.example"

    revoked_crl = issue.make_crl(
        sub,
        now=NOW - timedelta(minutes=5),
        revoked=[(leaf.certificate.serial_number, NOW - timedelta(minutes=10))],
        number=2,
    )
    revoked = await check([root_crl, revoked_crl])
    assert not revoked.valid and revoked.reason is not None
    assert "CN=leaf.example is revoked" in revoked.reason
    assert not (await check([root_crl, revoked_crl], policy=RevocationPolicy.PREFER)).valid

    missing = await check([root_crl])  # no CRL from the issuing CA
    assert not missing.valid and missing.reason is not None
    assert "CN=leaf.example" in missing.reason and "could not be established" in missing.reason
    assert (await check([root_crl], policy=RevocationPolicy.PREFER)).valid

    stale_at = NOW + timedelta(days=8)  # past the issuing CA's nextUpdate, inside validity
    stale = await check([root_crl, sub_crl], at=stale_at)
    assert not stale.valid

    # a CRL signed by another CA under the same name does not count
    impostor = issue.make_ca("CRL Issuing CA", now=NOW - timedelta(days=30))
    forged = issue.make_crl(impostor, now=NOW - timedelta(hours=1))
    assert not (await check([root_crl, forged])).valid


def _resigned_with_sha1(
    crl: x509.CertificateRevocationList, ca: issue.Issued
) -> x509.CertificateRevocationList:
    """``crl`` signed again by ``ca`` (an RSA key) with sha1WithRSAEncryption."""
    listed = asn1_crl.CertificateList.load(crl.public_bytes(serialization.Encoding.DER))
    listed["tbs_cert_list"]["signature"] = {"algorithm": "sha1_rsa"}
    listed["signature_algorithm"] = {"algorithm": "sha1_rsa"}
    tbs = listed["tbs_cert_list"].dump(force=True)
    assert isinstance(ca.key, rsa.RSAPrivateKey)
    listed["signature"] = ca.key.sign(tbs, padding.PKCS1v15(), hashes.SHA1())
    return x509.load_der_x509_crl(listed.dump(force=True))


async def test_crl_signed_with_sha1_establishes_no_status() -> None:
    root = issue.make_ca("RSA Root", now=NOW - timedelta(days=30), key_kind="rsa-2048")
    sub = issue.make_ca("RSA CA", now=NOW - timedelta(days=30), parent=root, key_kind="rsa-2048")
    leaf = issue.issue(sub, "leaf.example", purpose="smime-sign", now=NOW - timedelta(days=1))
    crls = [
        issue.make_crl(root, now=NOW - timedelta(hours=1)),
        issue.make_crl(sub, now=NOW - timedelta(hours=1)),
    ]

    async def check(crls: list[x509.CertificateRevocationList]) -> ValidationResult:
        return await validate(
            leaf.certificate,
            anchors=[root.certificate],
            intermediates=[sub.certificate],
            purpose=Purpose.SMIME_SIGN,
            revocation=RevocationPolicy.REQUIRE,
            crls=crls,
            at=NOW,
            policy=AlgorithmPolicy(),
        )

    assert (await check(crls)).valid
    weak = [crls[0], _resigned_with_sha1(crls[1], sub)]
    refused = await check(weak)
    assert not refused.valid and refused.reason is not None
    assert [s.status for s in refused.statuses] == ["unknown", "good", "trust-anchor"]
    assert "CN=leaf.example could not be established" in refused.reason


def _crl_with_reasons(
    ca: issue.Issued,
    *,
    now: datetime,
    number: int,
    entries: list[tuple[int, x509.ReasonFlags]],
    delta_of: int | None = None,
) -> x509.CertificateRevocationList:
    builder = (
        x509.CertificateRevocationListBuilder()
        .issuer_name(ca.certificate.subject)
        .last_update(now)
        .next_update(now + timedelta(days=2))
        .add_extension(x509.CRLNumber(number), critical=False)
    )
    if delta_of is not None:
        builder = builder.add_extension(x509.DeltaCRLIndicator(delta_of), critical=True)
    for serial, reason in entries:
        entry = (
            x509.RevokedCertificateBuilder()
            .serial_number(serial)
            .revocation_date(now - timedelta(hours=1))
            .add_extension(x509.CRLReason(reason), critical=False)
            .build()
        )
        builder = builder.add_revoked_certificate(entry)
    return builder.sign(ca.key, issue.signature_hash(ca.key))


async def test_stale_crls_a_lifted_hold_is_no_revocation(
    chain: tuple[issue.Issued, issue.Issued, issue.Issued],
) -> None:
    root, sub, leaf = chain
    root_crl = issue.make_crl(root, now=NOW - timedelta(hours=1), days=30)
    serial = leaf.certificate.serial_number
    flags = x509.ReasonFlags
    held = _crl_with_reasons(
        sub, now=NOW - timedelta(days=10), number=1, entries=[(serial, flags.certificate_hold)]
    )
    released = _crl_with_reasons(
        sub,
        now=NOW - timedelta(days=9),
        number=2,
        entries=[(serial, flags.remove_from_crl)],
        delta_of=1,
    )
    later = _crl_with_reasons(sub, now=NOW - timedelta(days=9), number=2, entries=[])
    compromised = _crl_with_reasons(
        sub, now=NOW - timedelta(days=10), number=1, entries=[(serial, flags.key_compromise)]
    )

    async def check(*crls: x509.CertificateRevocationList) -> ValidationResult:
        return await validate(
            leaf.certificate,
            anchors=[root.certificate],
            intermediates=[sub.certificate],
            purpose=Purpose.SMIME_SIGN,
            revocation=RevocationPolicy.PREFER,
            crls=[root_crl, *crls],
            at=NOW,
            policy=AlgorithmPolicy(),
        )

    # every CRL of the issuing CA is past its nextUpdate: the leaf's status is unknown ...
    for crls in ((released,), (held, released), (held, later)):
        result = await check(*crls)
        assert result.valid, result.reason
        assert result.statuses[0].status == "unknown" and result.warnings
    # ... unless its last word is a revocation: a hold not lifted, or any other reason
    for crls in ((held,), (compromised, later), (released, compromised)):
        result = await check(*crls)
        assert not result.valid and result.reason is not None
        assert "CN=leaf.example is revoked" in result.reason


def test_stale_crl_alarm_goes_off_before_next_update(
    chain: tuple[issue.Issued, issue.Issued, issue.Issued],
) -> None:
    _, sub, _ = chain
    crl = issue.make_crl(sub, now=NOW, days=7)
    assert stale_crl_warnings([crl], at=NOW, warn_days=3) == []
    soon = stale_crl_warnings([crl], at=NOW + timedelta(days=5), warn_days=3)
    assert [f.severity for f in soon] == ["warning"]
    assert "goes stale in 2 d" in soon[0].message and "CN=CRL Issuing CA" in soon[0].issuer
    late = crl_findings([crl], at=NOW + timedelta(days=8))
    assert [f.severity for f in late] == ["error"] and "stale" in late[0].message


async def test_purpose_and_expiry_reasons(
    chain: tuple[issue.Issued, issue.Issued, issue.Issued],
) -> None:
    root, sub, leaf = chain
    wrong = await validate(
        leaf.certificate,
        anchors=[root.certificate],
        intermediates=[sub.certificate],
        purpose=Purpose.TLS_CLIENT,
        at=datetime.now(UTC),
        revocation=RevocationPolicy.OFF,
        policy=AlgorithmPolicy(),
    )
    assert not wrong.valid and wrong.reason is not None
    assert "CN=leaf.example" in wrong.reason and "clientAuth" in wrong.reason

    expired = await validate(
        leaf.certificate,
        anchors=[root.certificate],
        intermediates=[sub.certificate],
        purpose=Purpose.SMIME_SIGN,
        at=leaf.certificate.not_valid_after_utc + timedelta(days=1),
        revocation=RevocationPolicy.OFF,
        policy=AlgorithmPolicy(),
    )
    assert not expired.valid and expired.reason is not None
    assert "CN=leaf.example expired on" in expired.reason and "renew" in expired.reason

    no_path = await validate(
        leaf.certificate,
        anchors=[root.certificate],
        purpose=Purpose.ANY,
        at=datetime.now(UTC),
        revocation=RevocationPolicy.OFF,
        policy=AlgorithmPolicy(),
    )
    assert not no_path.valid and no_path.reason is not None
    assert "CN=CRL Issuing CA" in no_path.reason

    weak_root = issue.make_ca("Weak Root", now=NOW - timedelta(days=1), key_kind="rsa-2048")
    fine = issue.issue(weak_root, "ok.example", purpose="tls", now=NOW - timedelta(hours=1))
    assert (
        await validate(
            fine.certificate,
            anchors=[weak_root.certificate],
            purpose=Purpose.ANY,
            at=datetime.now(UTC),
            revocation=RevocationPolicy.OFF,
            policy=AlgorithmPolicy(),
        )
    ).valid
