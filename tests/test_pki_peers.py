"""Which configured peer certificates are acceptable at a given time (rotation, revocation)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from gateway.pki.issue import issue, make_ca, make_crl
from gateway.pki.peers import TrustSettings, assess_peer
from gateway.pki.validate import RevocationPolicy
from gateway.policy import AlgorithmPolicy

NOW = datetime(2026, 11, 26, 12, 0, tzinfo=UTC)


async def test_rotation_overlap_accepts_both_and_encrypts_to_the_newest() -> None:
    ca = make_ca("Regional Health CA", now=NOW - timedelta(days=400))
    old_enc = issue(ca, "LAB", purpose="smime-encrypt", now=NOW - timedelta(days=300), days=310)
    new_enc = issue(ca, "LAB", purpose="smime-encrypt", now=NOW - timedelta(days=1), days=400)
    future = issue(ca, "LAB", purpose="smime-encrypt", now=NOW + timedelta(days=5), days=400)
    old_sign = issue(ca, "LAB", purpose="smime-sign", now=NOW - timedelta(days=400), days=300)
    new_sign = issue(ca, "LAB", purpose="smime-sign", now=NOW - timedelta(days=1), days=400)
    tls = issue(ca, "LAB", purpose="tls", now=NOW - timedelta(days=1), ip_addresses=["127.0.0.1"])
    trust = TrustSettings(anchors=(ca.certificate,))
    verdict = await assess_peer(
        "lab",
        tls=[tls.certificate],
        signing=[old_sign.certificate, new_sign.certificate],
        encryption=[old_enc.certificate, future.certificate, new_enc.certificate],
        trust=trust,
        at=NOW,
        policy=AlgorithmPolicy(),
    )
    assert verdict.tls_certificates == (tls.certificate,)
    # old signing certificate expired 100 days ago: dropped, with the reason
    assert verdict.signing_certificates == (new_sign.certificate,)
    [expired] = [v for v in verdict.rejected if v.certificate == old_sign.certificate]
    assert "expired" in (expired.result.reason or "")
    # both encryption certificates valid now (overlap); the not-yet-valid one is not used
    assert verdict.encryption_recipient == new_enc.certificate
    later = await assess_peer(
        "lab",
        tls=[],
        signing=[],
        encryption=[old_enc.certificate, future.certificate],
        trust=trust,
        at=NOW + timedelta(days=20),
        policy=AlgorithmPolicy(),
    )
    assert later.encryption_recipient == future.certificate  # the switch happens by itself


async def test_revoked_certificate_drops_out_under_require() -> None:
    ca = make_ca("Regional Health CA", now=NOW - timedelta(days=400))
    good = issue(ca, "LAB-A", purpose="tls", now=NOW - timedelta(days=10))
    bad = issue(ca, "LAB-B", purpose="tls", now=NOW - timedelta(days=10))
    crl = make_crl(
        ca,
        now=NOW - timedelta(hours=1),
        revoked=[(bad.certificate.serial_number, NOW - timedelta(hours=2))],
    )
    trust = TrustSettings(
        anchors=(ca.certificate,), crls=(crl,), revocation=RevocationPolicy.REQUIRE
    )
    verdict = await assess_peer(
        "lab",
        tls=[good.certificate, bad.certificate],
        signing=[],
        encryption=[],
        trust=trust,
        at=NOW,
        policy=AlgorithmPolicy(),
    )
    assert verdict.tls_certificates == (good.certificate,)
    assert "revoked" in (verdict.rejected[0].result.reason or "").lower()
    # without any CRL, "require" refuses everything: no status, no trust
    blind = await assess_peer(
        "lab",
        tls=[good.certificate],
        signing=[],
        encryption=[],
        trust=TrustSettings(anchors=(ca.certificate,), revocation=RevocationPolicy.REQUIRE),
        at=NOW,
        policy=AlgorithmPolicy(),
    )
    assert blind.tls_certificates == ()


async def test_certificate_from_another_ca_is_not_acceptable() -> None:
    ours = make_ca("Regional Health CA", now=NOW - timedelta(days=400))
    other = make_ca("Some Other CA", now=NOW - timedelta(days=400))
    stranger = issue(other, "LAB", purpose="smime-sign", now=NOW - timedelta(days=1))
    verdict = await assess_peer(
        "lab",
        tls=[],
        signing=[stranger.certificate],
        encryption=[],
        trust=TrustSettings(anchors=(ours.certificate,)),
        at=NOW,
        policy=AlgorithmPolicy(),
    )
    assert verdict.signing_certificates == ()
    assert verdict.rejected[0].result.reason
