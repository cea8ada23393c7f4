"""SHA-1 signatures (CRYPTREC monitored list): read from a compat peer, never made.

``openssl cms -sign -md sha1`` is the reference producer.  A strict peer's
SHA-1 signature is refused naming SHA-1, the rule and the fix; a compat
peer's verifies, for real (a tampered one still fails), and reports ``sha1``
in ``compat_algorithms`` for the audit.  Whatever the policy, the gateway
never signs, nor computes a MIC it sends, with SHA-1.  MD5 stays refused.
"""

from __future__ import annotations

import base64
import hashlib
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest

from gateway.as2.mdn import Disposition, build_receipt
from gateway.cms import compute_mic, sign, verify
from gateway.cms.mime import make_entity
from gateway.cms.signing import sign_digest
from gateway.cms.smime import sign_entity, verify_entity
from gateway.cms.stream import sign_and_envelope_file, sign_entity_file, verify_entity_file
from gateway.errors import PolicyError, SignatureError
from gateway.pki.keypair import KeyPair
from gateway.policy import AlgorithmPolicy
from tests.helpers.cms_pki import ALL_LEGACY, SIGNING_TIME, STRICT, Pki, build_pki
from tests.helpers.openssl_cms import openssl

pytestmark = pytest.mark.skipif(shutil.which("openssl") is None, reason="needs openssl on PATH")

PAYLOAD = b"MSH|^~\\&|LAB|HOSP|||20250601||ORU^R01|1|P|2.5\rOBX|1|NM|K^Potassium||4.1|mmol/L\r"

# party, extra openssl flags, the scheme we report
SHA1_SIGNERS = [
    pytest.param("rsa2048", [], "rsassa-pkcs1-v1_5", id="rsa-pkcs1v15-sha1"),
    pytest.param("p256", [], "ecdsa", id="ecdsa-p256-sha1"),
    pytest.param("rsa3072", ["-keyopt", "rsa_padding_mode:pss"], "rsassa-pss", id="rsa-pss-sha1"),
]


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return build_pki(tmp_path_factory.mktemp("pki-sha1"))


def _openssl_sign(pki: Pki, tmp_path: Path, party: str, md: str, *extra: str) -> bytes:
    """A detached DER signature over PAYLOAD, made by openssl with digest ``md``."""
    p = pki[party]
    src = tmp_path / "payload.bin"
    src.write_bytes(PAYLOAD)
    out = tmp_path / "sig.der"
    openssl(
        "-sign", "-binary", "-md", md, "-in", src, "-signer", p.cert_path, "-inkey", p.key_path,
        "-outform", "DER", "-out", out, *extra,
    )  # fmt: skip
    return out.read_bytes()


def _assert_refused_naming_sha1(err: PolicyError) -> None:
    assert err.algorithm == "sha1"
    assert "CRYPTREC" in err.rule and "monitored list" in err.rule and "accept_legacy" in err.rule
    assert err.fix is not None and "sha256" in err.fix and 'accept_legacy = ["sha1"]' in err.fix


@pytest.mark.parametrize(("party", "extra", "scheme"), SHA1_SIGNERS)
def test_openssl_sha1_signature_refused_strict_accepted_compat(
    pki: Pki, tmp_path: Path, party: str, extra: list[str], scheme: str
) -> None:
    der = _openssl_sign(pki, tmp_path, party, "sha1", *extra)
    signer = pki[party].cert
    with pytest.raises(PolicyError) as refused:
        verify(der, content=PAYLOAD, trusted_signers=[signer], policy=STRICT)
    _assert_refused_naming_sha1(refused.value)

    v = verify(der, content=PAYLOAD, trusted_signers=[signer], policy=ALL_LEGACY)
    assert v.signer == signer
    assert v.digest == "sha1"
    assert v.signature_algorithm == scheme
    assert v.compat_algorithms == ("sha1",)
    # accepted means verified: altered content still fails
    with pytest.raises(SignatureError, match="messageDigest"):
        verify(der, content=PAYLOAD + b"x", trusted_signers=[signer], policy=ALL_LEGACY)


def test_openssl_sha1_signature_with_a_wrong_signature_fails_under_compat(
    pki: Pki, tmp_path: Path
) -> None:
    der = bytearray(_openssl_sign(pki, tmp_path, "rsa2048", "sha1"))
    der[-5] ^= 0x01  # inside the signature value, the last element of the SignerInfo
    with pytest.raises(SignatureError, match="does not verify"):
        verify(
            bytes(der), content=PAYLOAD, trusted_signers=[pki["rsa2048"].cert], policy=ALL_LEGACY
        )


def test_sha256_signature_reports_no_compat_use(pki: Pki, tmp_path: Path) -> None:
    der = _openssl_sign(pki, tmp_path, "p256", "sha256")
    v = verify(der, content=PAYLOAD, trusted_signers=[pki["p256"].cert], policy=ALL_LEGACY)
    assert v.digest == "sha256" and v.compat_algorithms == ()


def test_md5_signature_refused_even_for_compat(pki: Pki, tmp_path: Path) -> None:
    der = _openssl_sign(pki, tmp_path, "rsa2048", "md5")
    for policy in (STRICT, ALL_LEGACY):
        with pytest.raises(PolicyError) as refused:
            verify(der, content=PAYLOAD, trusted_signers=[pki["rsa2048"].cert], policy=policy)
        assert refused.value.algorithm == "md5"
        assert "CRYPTREC" in refused.value.rule
        assert refused.value.fix is not None and "sha256" in refused.value.fix


@pytest.mark.parametrize("streamed", [False, True], ids=["in-memory", "streamed"])
def test_openssl_sha1_smime_verified_for_compat_and_our_mic_is_sha256(
    pki: Pki, tmp_path: Path, streamed: bool
) -> None:
    """multipart/signed by openssl -md sha1: verified for a compat peer; the MIC we would
    return for it is never SHA-1 (sha256 unless another digest is asked for)."""
    entity = make_entity("application/edi-x12", b"ISA*00*sha1-partner~\r\n" * 50)
    src = tmp_path / "entity.mime"
    src.write_bytes(entity)
    signed = tmp_path / "signed.eml"
    p = pki["rsa2048"]
    openssl(
        "-sign", "-binary", "-md", "sha1", "-in", src, "-signer", p.cert_path,
        "-inkey", p.key_path, "-out", signed,
    )  # fmt: skip
    assert b'micalg="sha1"' in signed.read_bytes()
    out = tmp_path / "out.mime"
    if streamed:
        with pytest.raises(PolicyError) as refused:
            verify_entity_file(signed, out, trusted_signers=[p.cert], policy=STRICT)
        _assert_refused_naming_sha1(refused.value)
        assert not out.exists()
        v, size, mic = verify_entity_file(signed, out, trusted_signers=[p.cert], policy=ALL_LEGACY)
        assert out.read_bytes() == entity and size == len(entity)
        assert mic == compute_mic(entity, "sha256")
        _v, _size, mic384 = verify_entity_file(
            signed, out, trusted_signers=[p.cert], policy=ALL_LEGACY, mic_digest="sha384"
        )
        assert mic384 == base64.b64encode(hashlib.sha384(entity).digest()).decode()
        # a SHA-1 MIC is never computed for sending, even for a compat peer
        with pytest.raises(PolicyError, match="sha1"):
            verify_entity_file(
                signed, out, trusted_signers=[p.cert], policy=ALL_LEGACY, mic_digest="sha1"
            )
    else:
        with pytest.raises(PolicyError) as refused:
            verify_entity(signed.read_bytes(), trusted_signers=[p.cert], policy=STRICT)
        _assert_refused_naming_sha1(refused.value)
        inner, v = verify_entity(signed.read_bytes(), trusted_signers=[p.cert], policy=ALL_LEGACY)
        assert inner == entity
    assert v.digest == "sha1" and v.compat_algorithms == ("sha1",)


# ---------------------------------------------------------------------------
# never made by us, whatever the policy


@pytest.mark.parametrize("policy", [STRICT, ALL_LEGACY], ids=["strict", "all-legacy"])
@pytest.mark.parametrize("digest", ["sha1", "SHA-1", "md5"])
def test_we_never_sign_or_compute_a_mic_with_a_weak_digest(
    pki: Pki, tmp_path: Path, policy: AlgorithmPolicy, digest: str
) -> None:
    p = pki["rsa3072"]
    entity = make_entity("text/plain", b"x")
    src = tmp_path / "entity.mime"
    src.write_bytes(entity)
    attempts: dict[str, Callable[[], object]] = {
        "sign": lambda: sign(
            PAYLOAD, p.cert, p.key, digest=digest, signing_time=SIGNING_TIME, policy=policy
        ),
        "sign_digest": lambda: sign_digest(
            hashlib.sha1(PAYLOAD).digest(),
            p.cert,
            p.key,
            digest=digest,
            signing_time=SIGNING_TIME,
            policy=policy,
        ),
        "sign_entity": lambda: sign_entity(
            entity, p.cert, p.key, digest=digest, signing_time=SIGNING_TIME, policy=policy
        ),
        "sign_entity_file": lambda: sign_entity_file(
            src,
            tmp_path / "signed.eml",
            p.cert,
            p.key,
            digest=digest,
            signing_time=SIGNING_TIME,
            policy=policy,
        ),
        "sign_and_envelope_file": lambda: sign_and_envelope_file(
            src,
            tmp_path / "body.der",
            signer_cert=p.cert,
            signer_key=p.key,
            recipients=[pki["p256"].cert],
            digest=digest,
            signing_time=SIGNING_TIME,
            policy=policy,
        ),
        "build_receipt": lambda: build_receipt(
            original_message_id="<m@x>",
            our_as2_id="US",
            peer_as2_id="THEM",
            disposition=Disposition.PROCESSED,
            mic=None,
            signing=KeyPair(p.cert_path, p.key_path, p.cert, p.key),
            digest=digest,
            policy=policy,
            at=SIGNING_TIME,
        ),
        "compute_mic": lambda: compute_mic(entity, digest),
    }
    for what, attempt in attempts.items():
        with pytest.raises(PolicyError) as refused:
            attempt()
        assert refused.value.algorithm.lower().replace("-", "") in ("sha1", "md5"), what
        assert "CRYPTREC" in refused.value.rule, what
        assert "accept_legacy" not in refused.value.rule, what  # no way out when we sign
    assert not (tmp_path / "signed.eml").exists() and not (tmp_path / "body.der").exists()


def test_policy_digest_rule() -> None:
    for d in ("sha256", "sha384", "sha512"):
        for policy in (STRICT, ALL_LEGACY):
            policy.check_digest(d)
            policy.check_digest(d, inbound=True)
    ALL_LEGACY.check_digest("sha1", inbound=True)
    ALL_LEGACY.check_digest("SHA-1", inbound=True)
    with pytest.raises(PolicyError) as refused:
        STRICT.check_digest("sha1", inbound=True)
    _assert_refused_naming_sha1(refused.value)
    for policy in (STRICT, ALL_LEGACY):
        with pytest.raises(PolicyError, match="sha1"):
            policy.check_digest("sha1")  # signing, MICs we send, outbound
        for d in ("md5", "md2", "md4", "sha224"):
            for inbound in (False, True):
                with pytest.raises(PolicyError, match=d):
                    policy.check_digest(d, inbound=inbound)
