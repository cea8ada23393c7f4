"""CMS engine: our own round trips, negatives, policy, MIME and S/MIME framing.

Interop with the reference implementation (``openssl cms``) is in
``test_cms_openssl.py``; the test PKI is built by ``tests/helpers/cms_pki.py``.
"""

from __future__ import annotations

import base64
import hashlib
import itertools
import os
from datetime import UTC, datetime
from typing import Any

import pytest
from asn1crypto import cms as asn1_cms
from cryptography.hazmat.primitives.asymmetric import ec

from gateway.cms import Decrypted, compute_mic, decrypt, encrypt, sign, verify
from gateway.cms.mime import header_param, make_entity, parse_entity
from gateway.cms.smime import envelope_entity, open_envelope, sign_entity, verify_entity
from gateway.errors import (
    DecryptionError,
    MalformedMessageError,
    ObjectSecurityError,
    PolicyError,
    SignatureError,
    SignerNotTrustedError,
)
from gateway.policy import AlgorithmPolicy
from tests.helpers.cms_pki import (
    ALL_LEGACY,
    PAYLOADS,
    SIGNING_TIME,
    STRICT,
    Pki,
    build_pki,
)

# ---------------------------------------------------------------------------
# test PKI


@pytest.fixture(scope="session")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return build_pki(tmp_path_factory.mktemp("pki"))


# ---------------------------------------------------------------------------
# signatures: ours -> ours

# (party, rsa_padding)
SIGNERS = [
    ("rsa2048", "pkcs1v15"),
    ("rsa3072", "pss"),
    ("rsa2048", "pss"),
    ("p256", ""),
    ("p384", ""),
]
DIGESTS = ["sha256", "sha384", "sha512"]
SIGN_MATRIX = [
    pytest.param(party, pad, digest, detached, id=f"{party}-{pad or 'ecdsa'}-{digest}-{mode}")
    for (party, pad), digest, (detached, mode) in itertools.product(
        SIGNERS, DIGESTS, [(True, "detached"), (False, "attached")]
    )
]


def _sign(pki: Pki, party: str, content: bytes, **kw: Any) -> bytes:
    p = pki[party]
    kw.setdefault("signing_time", SIGNING_TIME)
    kw.setdefault("policy", STRICT)
    return sign(content, p.cert, p.key, **kw)


@pytest.mark.parametrize(("party", "pad", "digest", "detached"), SIGN_MATRIX)
def test_sign_verify_round_trip(
    pki: Pki, party: str, pad: str, digest: str, detached: bool
) -> None:
    for payload in PAYLOADS.values():
        kwargs: dict[str, Any] = {"digest": digest, "detached": detached}
        if pad:
            kwargs["rsa_padding"] = pad
        der = _sign(pki, party, payload, **kwargs)
        v = verify(
            der,
            content=payload if detached else None,
            trusted_signers=[pki["other-rsa"].cert, pki[party].cert],
            policy=STRICT,
        )
        assert v.content == payload
        assert v.digest == digest
        assert v.signer == pki[party].cert
        assert v.signing_time == SIGNING_TIME
        expected = {"pss": "rsassa-pss", "pkcs1v15": "rsassa-pkcs1-v1_5", "": "ecdsa"}[pad]
        assert v.signature_algorithm == expected
        assert pki[party].cert in v.certificates


def test_signed_attributes_are_the_required_set(pki: Pki) -> None:
    der = _sign(pki, "p256", b"x", certificates=[pki.ca_cert])
    ci = asn1_cms.ContentInfo.load(der)
    sd = ci["content"]
    assert der == ci.dump(force=True), "output must be DER"
    si = sd["signer_infos"][0]
    types = {a["type"].native for a in si["signed_attrs"]}
    assert types == {"content_type", "message_digest", "signing_time", "cms_algorithm_protection"}
    assert len(sd["certificates"]) == 2
    assert sd["encap_content_info"]["content"].native is None  # detached


def test_algorithm_protection_detects_substitution(pki: Pki) -> None:
    # rsaEncryption -> sha256WithRSAEncryption leaves the signature valid; only the
    # RFC 6211 CMSAlgorithmProtection attribute notices the substitution
    der = _sign(pki, "rsa2048", b"payload")
    ci = asn1_cms.ContentInfo.load(der)
    ci["content"]["signer_infos"][0]["signature_algorithm"] = {"algorithm": "sha256_rsa"}
    bad = ci.dump(force=True)
    with pytest.raises(SignatureError, match="CMSAlgorithmProtection"):
        verify(bad, content=b"payload", trusted_signers=[pki["rsa2048"].cert], policy=STRICT)


def test_compute_mic() -> None:
    data = b"hello\r\n"
    assert compute_mic(data, "sha256") == base64.b64encode(hashlib.sha256(data).digest()).decode()
    assert compute_mic(data, "SHA-384") == base64.b64encode(hashlib.sha384(data).digest()).decode()
    with pytest.raises(PolicyError):
        compute_mic(data, "sha1")


# ---------------------------------------------------------------------------
# signatures: negatives


def test_tampered_detached_content(pki: Pki) -> None:
    der = _sign(pki, "rsa2048", b"result: negative")
    with pytest.raises(
        SignatureError, match=r"content does not match its signature \(messageDigest\)"
    ):
        verify(
            der, content=b"result: positive", trusted_signers=[pki["rsa2048"].cert], policy=STRICT
        )


def test_tampered_attached_content(pki: Pki) -> None:
    der = _sign(pki, "p256", b"result: negative", detached=False)
    bad = der.replace(b"result: negative", b"result: positive")
    assert bad != der
    with pytest.raises(SignatureError, match="messageDigest"):
        verify(bad, trusted_signers=[pki["p256"].cert], policy=STRICT)


def test_tampered_signed_attribute(pki: Pki) -> None:
    der = _sign(pki, "rsa3072", b"payload", rsa_padding="pss")
    ci = asn1_cms.ContentInfo.load(der)
    si = ci["content"]["signer_infos"][0]
    attrs = si["signed_attrs"]
    for attr in attrs:
        if attr["type"].native == "signing_time":
            attr["values"] = [asn1_cms.Time({"utc_time": datetime(2030, 1, 1, tzinfo=UTC)})]
    si["signed_attrs"] = attrs
    bad = ci.dump(force=True)
    with pytest.raises(
        SignatureError, match="signature over the signed attributes does not verify"
    ):
        verify(bad, content=b"payload", trusted_signers=[pki["rsa3072"].cert], policy=STRICT)


def test_tampered_signature_value(pki: Pki) -> None:
    der = bytearray(_sign(pki, "p384", b"payload"))
    ci = asn1_cms.ContentInfo.load(bytes(der))
    sig = ci["content"]["signer_infos"][0]["signature"].native
    i = bytes(der).index(sig)
    der[i + 10] ^= 0x01
    with pytest.raises(SignatureError):
        verify(bytes(der), content=b"payload", trusted_signers=[pki["p384"].cert], policy=STRICT)


def test_untrusted_signer(pki: Pki) -> None:
    der = _sign(pki, "other-rsa", b"payload")
    with pytest.raises(SignerNotTrustedError, match=r"other-rsa\.medgw\.test"):
        verify(der, content=b"payload", trusted_signers=[pki["rsa2048"].cert], policy=STRICT)


def test_rogue_signer_with_same_issuer_and_serial(pki: Pki) -> None:
    # same issuer name and serial as the pinned certificate, different key
    der = _sign(pki, "rogue", b"payload")
    with pytest.raises((SignatureError, SignerNotTrustedError)):
        verify(der, content=b"payload", trusted_signers=[pki["rsa2048"].cert], policy=STRICT)


def test_signer_certificate_missing(pki: Pki) -> None:
    der = _sign(pki, "p256", b"payload")
    ci = asn1_cms.ContentInfo.load(der)
    ci["content"]["certificates"] = []
    stripped = ci.dump(force=True)
    with pytest.raises(SignerNotTrustedError, match="neither included"):
        verify(stripped, content=b"payload", trusted_signers=[pki["p384"].cert], policy=STRICT)
    # but a pinned certificate is enough to verify
    v = verify(stripped, content=b"payload", trusted_signers=[pki["p256"].cert], policy=STRICT)
    assert v.signer == pki["p256"].cert


@pytest.mark.parametrize("digest", ["sha1", "md5"])
def test_weak_digest_refused_when_signing(pki: Pki, digest: str) -> None:
    with pytest.raises(PolicyError, match=digest):
        _sign(pki, "rsa2048", b"payload", digest=digest)


def test_small_rsa_key_refused(pki: Pki) -> None:
    with pytest.raises(PolicyError, match="RSA-1024"):
        _sign(pki, "rsa1024", b"payload")


def test_key_not_matching_certificate(pki: Pki) -> None:
    with pytest.raises(ObjectSecurityError, match="does not belong"):
        sign(
            b"x",
            pki["rsa2048"].cert,
            pki["other-rsa"].key,
            signing_time=SIGNING_TIME,
            policy=STRICT,
        )


def test_detached_signature_without_content(pki: Pki) -> None:
    der = _sign(pki, "p256", b"payload")
    with pytest.raises(MalformedMessageError, match="content="):
        verify(der, trusted_signers=[pki["p256"].cert], policy=STRICT)


@pytest.mark.parametrize(
    "garbage", [b"", b"\x30\x03\x02\x01\x01", b"not cms at all", b"\x30\x80\x06"]
)
def test_garbage_is_malformed(pki: Pki, garbage: bytes) -> None:
    with pytest.raises(MalformedMessageError):
        verify(garbage, content=b"", trusted_signers=[pki["p256"].cert], policy=STRICT)
    with pytest.raises(MalformedMessageError):
        decrypt(garbage, pki["p256"].cert, pki["p256"].key, policy=STRICT)


def test_enveloped_data_given_to_verify(pki: Pki) -> None:
    env = encrypt(b"x", [pki["p256"].cert], policy=STRICT)
    with pytest.raises(MalformedMessageError, match="not SignedData"):
        verify(env, trusted_signers=[pki["p256"].cert], policy=STRICT)


# ---------------------------------------------------------------------------
# encryption: ours -> ours

CIPHERS = ["aes-128-gcm", "aes-256-gcm", "aes-128-cbc", "aes-256-cbc"]
RECIPIENTS = ["rsa2048", "rsa3072", "p256", "p384"]
ENCRYPT_MATRIX = [
    pytest.param(c, r, p, id=f"{c}-{r}-{p}")
    for c, r, p in itertools.product(CIPHERS, RECIPIENTS, PAYLOADS)
]


@pytest.mark.parametrize(("cipher", "recipient", "payload"), ENCRYPT_MATRIX)
def test_encrypt_decrypt_round_trip(pki: Pki, cipher: str, recipient: str, payload: str) -> None:
    r = pki[recipient]
    der = encrypt(PAYLOADS[payload], [r.cert], cipher=cipher, policy=STRICT)
    ctype = asn1_cms.ContentInfo.load(der)["content_type"].native
    assert ctype == ("authenticated_enveloped_data" if "gcm" in cipher else "enveloped_data")
    out = decrypt(der, r.cert, r.key, policy=STRICT)
    assert out == Decrypted(
        content=PAYLOADS[payload],
        content_cipher=cipher,
        key_transport="rsaes-oaep" if recipient.startswith("rsa") else "ecdh",
        compat_algorithms=(),
    )


def test_several_recipients(pki: Pki) -> None:
    names = ["rsa2048", "p256", "p384"]
    der = encrypt(b"for all", [pki[n].cert for n in names], policy=STRICT)
    for n in names:
        assert decrypt(der, pki[n].cert, pki[n].key, policy=STRICT).content == b"for all"


def test_encrypted_for_someone_else(pki: Pki) -> None:
    der = encrypt(b"secret", [pki["other-rsa"].cert, pki["other-p256"].cert], policy=STRICT)
    me = pki["rsa2048"]
    with pytest.raises(DecryptionError, match="encrypted for someone else") as exc:
        decrypt(der, me.cert, me.key, policy=STRICT)
    assert "rsa2048.medgw.test" in str(exc.value)
    assert f"{me.cert.serial_number:x}" in str(exc.value)


def test_rogue_key_for_same_issuer_serial(pki: Pki) -> None:
    # recipient info names rsa2048's issuer/serial, but we hold the rogue key
    der = encrypt(b"secret", [pki["rsa2048"].cert], cipher="aes-256-gcm", policy=STRICT)
    with pytest.raises(DecryptionError):
        decrypt(der, pki["rogue"].cert, pki["rogue"].key, policy=STRICT)


@pytest.mark.parametrize("cipher", ["aes-256-gcm", "aes-128-cbc"])
def test_tampered_ciphertext(pki: Pki, cipher: str) -> None:
    r = pki["p256"]
    payload = b"A" * 100
    der = encrypt(payload, [r.cert], cipher=cipher, policy=STRICT)
    ci = asn1_cms.ContentInfo.load(der)
    body = ci["content"]
    field = "auth_encrypted_content_info" if "gcm" in cipher else "encrypted_content_info"
    ct = bytearray(body[field]["encrypted_content"].native)
    if "gcm" in cipher:
        ct[-1] ^= 0x01
    else:
        # 100 bytes are padded with 12 bytes of 0x0c; this makes the last one 0x11, which
        # no padding is (a flipped bit in the last block would leave valid padding 1 time
        # in about 250, and decrypt() would return noise instead of raising)
        ct[-17] ^= 0x0C ^ 0x11
    body[field]["encrypted_content"] = bytes(ct)
    with pytest.raises(DecryptionError):
        decrypt(ci.dump(force=True), r.cert, r.key, policy=STRICT)


def test_tampered_gcm_tag(pki: Pki) -> None:
    r = pki["rsa2048"]
    der = encrypt(b"payload", [r.cert], policy=STRICT)
    ci = asn1_cms.ContentInfo.load(der)
    mac = bytearray(ci["content"]["mac"].native)
    mac[0] ^= 0x80
    ci["content"]["mac"] = bytes(mac)
    with pytest.raises(DecryptionError, match="authentication tag"):
        decrypt(ci.dump(force=True), r.cert, r.key, policy=STRICT)


@pytest.mark.parametrize("cipher", ["des-ede3-cbc", "aes-192-cbc", "rc2-cbc", "aes-128-ecb"])
@pytest.mark.parametrize("policy", [STRICT, ALL_LEGACY], ids=["strict", "all-legacy"])
def test_outbound_refuses_non_recommended_ciphers(
    pki: Pki, cipher: str, policy: AlgorithmPolicy
) -> None:
    with pytest.raises(PolicyError, match=cipher):
        encrypt(b"x", [pki["rsa2048"].cert], cipher=cipher, policy=policy)


def test_small_rsa_recipient_refused(pki: Pki) -> None:
    with pytest.raises(PolicyError, match="RSA-1024"):
        encrypt(b"x", [pki["rsa1024"].cert], policy=STRICT)


# ---------------------------------------------------------------------------
# policy


def test_policy_rules() -> None:
    for d in ("sha256", "sha384", "sha512", "SHA-256"):
        STRICT.check_digest(d)
    for d in ("sha1", "md5", "sha224", "whirlpool"):
        with pytest.raises(PolicyError):
            STRICT.check_digest(d)
    for c in ("aes-128-gcm", "aes-256-gcm", "aes-128-cbc", "aes-256-cbc"):
        STRICT.check_content_cipher(c, inbound=False)
        STRICT.check_content_cipher(c, inbound=True)
    with pytest.raises(PolicyError, match="accept_legacy"):
        STRICT.check_content_cipher("des-ede3-cbc", inbound=True)
    ALL_LEGACY.check_content_cipher("des-ede3-cbc", inbound=True)
    with pytest.raises(PolicyError, match="never sends"):
        ALL_LEGACY.check_content_cipher("des-ede3-cbc", inbound=False)
    for kt in ("rsaes-oaep-sha256", "ecdh"):
        STRICT.check_key_transport(kt, inbound=False)
    for kt in ("rsaes-oaep", "ecdh"):
        STRICT.check_key_transport(kt, inbound=True)
    for kt in ("rsaes-pkcs1-v1_5", "rsaes-oaep-sha1", "ecdh-sha1kdf"):
        with pytest.raises(PolicyError):
            STRICT.check_key_transport(kt, inbound=True)
        with pytest.raises(PolicyError):
            ALL_LEGACY.check_key_transport(kt, inbound=False)
        ALL_LEGACY.check_key_transport(kt, inbound=True)
    with pytest.raises(PolicyError):
        STRICT.check_signature_key(ec.generate_private_key(ec.SECP256K1()).public_key())


def test_policy_key_warnings(pki: Pki) -> None:
    (w,) = STRICT.warnings_for_key(pki["rsa2048"].cert.public_key())  # type: ignore[arg-type]
    assert "112-bit" in w and "2030" in w
    assert STRICT.warnings_for_key(pki["rsa3072"].key) == []
    assert STRICT.warnings_for_key(pki["p256"].key) == []


# ---------------------------------------------------------------------------
# MIME helper


def test_make_and_parse_entity_keep_body_bytes() -> None:
    for body in PAYLOADS.values():
        entity = make_entity(
            "application/hl7-v2; charset=utf-8",
            body,
            [("Content-Disposition", 'attachment; filename="a.hl7"')],
        )
        assert entity.startswith(b"Content-Type: application/hl7-v2; charset=utf-8\r\n")
        assert entity.endswith(b"\r\n\r\n" + body)
        headers, out = parse_entity(entity)
        assert out == body
        assert ("Content-Transfer-Encoding", "binary") in headers


def test_parse_entity_lf_and_folding() -> None:
    headers, body = parse_entity(
        b'Content-Type: multipart/signed;\n\tboundary="a b";\n micalg=sha-256\nX-A: 1\n\nbody\r'
    )
    assert headers == [
        ("Content-Type", 'multipart/signed; boundary="a b"; micalg=sha-256'),
        ("X-A", "1"),
    ]
    assert body == b"body\r"
    assert parse_entity(b"Content-Type: text/plain\r\n") == ([("Content-Type", "text/plain")], b"")
    with pytest.raises(MalformedMessageError):
        parse_entity(b"this is not a header\r\n\r\nbody")


def test_make_entity_refuses_header_injection() -> None:
    with pytest.raises(ValueError, match="CR, LF"):
        make_entity("text/plain", b"", [("X-A", "1\r\nX-B: 2")])


def test_header_param() -> None:
    v = (
        'multipart/signed; protocol="application/pkcs7-signature"; micalg=sha-256; '
        'boundary="x;\\"y"'
    )
    assert header_param(v, "boundary") == 'x;"y'
    assert header_param(v, "MICALG") == "sha-256"
    assert header_param(v, "protocol") == "application/pkcs7-signature"
    assert header_param(v, "charset") is None
    assert header_param("text/plain;charset=us-ascii", "charset") == "us-ascii"


# ---------------------------------------------------------------------------
# S/MIME framing


@pytest.mark.parametrize("payload", list(PAYLOADS))
@pytest.mark.parametrize("party", ["rsa2048", "p384"])
def test_smime_sign_verify_entity(pki: Pki, party: str, payload: str) -> None:
    entity = make_entity("application/edi-x12", PAYLOADS[payload])
    signed = sign_entity(
        entity,
        pki[party].cert,
        pki[party].key,
        digest="sha384",
        signing_time=SIGNING_TIME,
        policy=STRICT,
    )
    headers, _ = parse_entity(signed)
    ctype = headers[0][1]
    assert ctype.startswith("multipart/signed;")
    assert header_param(ctype, "micalg") == "sha-384"
    assert header_param(ctype, "protocol") == "application/pkcs7-signature"
    inner, v = verify_entity(signed, trusted_signers=[pki[party].cert], policy=STRICT)
    assert inner == entity
    assert parse_entity(inner)[1] == PAYLOADS[payload]
    assert v.digest == "sha384"


def test_smime_tampered_first_part(pki: Pki) -> None:
    entity = make_entity("text/plain", b"dose: 5 mg\r\n")
    signed = sign_entity(
        entity, pki["p256"].cert, pki["p256"].key, signing_time=SIGNING_TIME, policy=STRICT
    )
    with pytest.raises(SignatureError, match="messageDigest"):
        verify_entity(
            signed.replace(b"5 mg", b"50 mg"), trusted_signers=[pki["p256"].cert], policy=STRICT
        )


def test_smime_attached_signed_data(pki: Pki) -> None:
    entity = make_entity("text/plain", b"hello\r")
    der = _sign(pki, "p256", entity, detached=False)
    wrapped = make_entity(
        "application/pkcs7-mime; smime-type=signed-data; name=smime.p7m",
        base64.encodebytes(der),
        [("Content-Transfer-Encoding", "base64")],
    )
    inner, v = verify_entity(wrapped, trusted_signers=[pki["p256"].cert], policy=STRICT)
    assert inner == entity
    assert v.signer == pki["p256"].cert


def test_smime_unsigned_entity(pki: Pki) -> None:
    with pytest.raises(MalformedMessageError, match="not signed"):
        verify_entity(make_entity("text/plain", b"x"), trusted_signers=[], policy=STRICT)


@pytest.mark.parametrize("cipher", ["aes-256-gcm", "aes-128-cbc"])
def test_smime_envelope_round_trip(pki: Pki, cipher: str) -> None:
    entity = make_entity("application/hl7-v2", PAYLOADS["hl7-bare-cr"])
    signed = sign_entity(
        entity, pki["rsa3072"].cert, pki["rsa3072"].key, signing_time=SIGNING_TIME, policy=STRICT
    )
    ctype, body = envelope_entity(signed, [pki["p384"].cert], cipher=cipher, policy=STRICT)
    smime_type = "authEnveloped-data" if "gcm" in cipher else "enveloped-data"
    assert header_param(ctype, "smime-type") == smime_type
    for wire in (body, base64.encodebytes(body)):
        opened = open_envelope(wire, pki["p384"].cert, pki["p384"].key, policy=STRICT)
        assert opened.content == signed
        inner, _ = verify_entity(
            opened.content, trusted_signers=[pki["rsa3072"].cert], policy=STRICT
        )
        assert inner == entity


def test_open_envelope_garbage(pki: Pki) -> None:
    with pytest.raises(MalformedMessageError):
        open_envelope(b"%%% not base64 %%%", pki["p256"].cert, pki["p256"].key, policy=STRICT)


def test_random_payloads_round_trip(pki: Pki) -> None:
    for size in (1, 15, 16, 17, 4096, 100_000):
        data = os.urandom(size)
        der = encrypt(data, [pki["p256"].cert], cipher="aes-128-cbc", policy=STRICT)
        assert decrypt(der, pki["p256"].cert, pki["p256"].key, policy=STRICT).content == data


def test_sign_entity_with_the_digest_given_signs_as_without(pki: Pki) -> None:
    """The AS2 MIC is the digest the signature's messageDigest holds: a caller that has
    computed it passes it, and gets the signature it would get without (RSA PKCS#1 v1.5
    is deterministic); a digest that is not the entity's gives no valid signature."""
    entity = make_entity("application/hl7-v2", PAYLOADS["hl7-bare-cr"])
    party = pki["rsa2048"]

    def signed(**extra: Any) -> bytes:
        return sign_entity(
            entity,
            party.cert,
            party.key,
            digest="sha384",
            signing_time=SIGNING_TIME,
            policy=STRICT,
            **extra,
        )

    def signature_part(whole: bytes) -> bytes:
        boundary = header_param(parse_entity(whole)[0][0][1], "boundary")
        assert boundary
        return whole.split(b"--" + boundary.encode())[2]

    given = signed(entity_digest=hashlib.sha384(entity).digest())
    assert signature_part(given) == signature_part(signed())
    inner, verified = verify_entity(given, trusted_signers=[party.cert], policy=STRICT)
    assert inner == entity and verified.digest == "sha384"
    wrong = signed(entity_digest=hashlib.sha384(entity + b"x").digest())
    with pytest.raises(SignatureError, match="messageDigest"):
        verify_entity(wrong, trusted_signers=[party.cert], policy=STRICT)


def _fields(der: bytes) -> list[tuple[str, Any]]:
    """The fields of an (Auth)EnvelopedData that do not depend on its random key, IV or
    nonce: (name, value), the random ones by their length only."""
    info = asn1_cms.ContentInfo.load(der)
    body = info["content"]
    ri = body["recipient_infos"][0].chosen
    gcm = info["content_type"].native == "authenticated_enveloped_data"
    eci = body["auth_encrypted_content_info" if gcm else "encrypted_content_info"]
    params = eci["content_encryption_algorithm"]["parameters"]
    return [
        ("content_type", info["content_type"].native),
        ("version", body["version"].native),
        ("rid", ri["rid"].dump()),
        ("key_algorithm", ri["key_encryption_algorithm"].dump()),
        ("encrypted_key", len(ri["encrypted_key"].native)),
        ("algorithm", eci["content_encryption_algorithm"]["algorithm"].native),
        ("parameters", len(params.dump())),
        ("content", len(eci["encrypted_content"].native)),
        ("mac", len(body["mac"].native) if gcm else None),
    ]


@pytest.mark.parametrize("cipher", ["aes-256-gcm", "aes-128-gcm", "aes-256-cbc"])
def test_encrypt_in_memory_writes_what_the_streaming_encryption_writes(
    pki: Pki, cipher: str
) -> None:
    """A small message is encrypted in one call; the DER is the one encrypt_chunks
    writes (same fields and lengths, only the random key, IV or nonce differ), and it
    decrypts to the content."""
    from gateway.cms.enveloping import encrypt_chunks

    for size in (0, 1, 17, 4096, 70_000):
        data = os.urandom(size)
        recipients = [pki["rsa2048"].cert]
        whole = encrypt(data, recipients, cipher=cipher, policy=STRICT)
        streamed = b"".join(
            encrypt_chunks([data[:5], data[5:]], size, recipients, cipher=cipher, policy=STRICT)
        )
        assert len(whole) == len(streamed)
        assert _fields(whole) == _fields(streamed)
        for der in (whole, streamed):
            opened = decrypt(der, pki["rsa2048"].cert, pki["rsa2048"].key, policy=STRICT)
            assert opened.content == data


def _outcome(fn: Any, *args: Any, **kwargs: Any) -> Any:
    try:
        inner, verified = fn(*args, **kwargs)
    except Exception as exc:  # compared: the same error either way
        return type(exc), str(exc)
    return inner, verified.signer, verified.digest, verified.signing_time


def test_a_signed_body_verifies_as_the_entity_it_is_the_body_of(pki: Pki) -> None:
    """A receipt arrives as a Content-Type header and a body: verified as they are, with
    the result or the error the whole entity gets, intact, altered or malformed."""
    from gateway.cms.smime import verify_multipart_signed

    entity = make_entity("text/plain", b"dose: 5 mg\r\nnext line\n")
    signed = sign_entity(
        entity, pki["rsa2048"].cert, pki["rsa2048"].key, signing_time=SIGNING_TIME, policy=STRICT
    )
    headers, body = parse_entity(signed)
    ctype = headers[0][1]
    boundary = header_param(ctype, "boundary")
    assert boundary
    bodies = {
        "intact": body,
        "altered": body.replace(b"5 mg", b"50 mg"),
        "lf": body.replace(b"\r\n", b"\n"),
        "no closing boundary": body[: body.rindex(b"--" + boundary.encode())],
        "three parts": body.replace(
            f"--{boundary}--".encode(), f"--{boundary}\r\n\r\nx\r\n--{boundary}--".encode()
        ),
        "signature not base64": body.replace(b"Content-Transfer-Encoding: base64", b""),
    }
    ctypes = {
        "as sent": ctype,
        "quoted escapes": ctype.replace(f'"{boundary}"', '"' + "\\" + boundary + '"'),
        "no boundary": ctype.split("; boundary=")[0],
    }
    seen = set()
    for (_, wire), (_, value) in itertools.product(bodies.items(), ctypes.items()):
        for trusted in ([pki["rsa2048"].cert], [pki["p256"].cert]):
            whole = f"Content-Type: {value}\r\n\r\n".encode() + wire
            expected = _outcome(verify_entity, whole, trusted_signers=trusted, policy=STRICT)
            assert expected == _outcome(
                verify_multipart_signed, value, wire, trusted_signers=trusted, policy=STRICT
            )
            seen.add(expected[0] if isinstance(expected[0], type) else "verified")
    assert len(seen) >= 4  # verified, and refused for several reasons
