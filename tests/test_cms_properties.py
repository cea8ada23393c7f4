"""Property-based tests: round trips for any payload and algorithm choice, and
random corruption that is always refused with a gateway error, never a crash
and never a silent acceptance of altered content."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from gateway.cms import decrypt, encrypt, sign, verify
from gateway.cms.compressed import compress, decompress
from gateway.cms.mime import make_entity
from gateway.cms.smime import envelope_entity, open_envelope, sign_entity, verify_entity
from gateway.errors import MedgwError
from tests.helpers.cms_pki import SIGNING_TIME, STRICT, Pki, build_pki

SETTINGS = settings(
    max_examples=40,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)

SIGNERS = [("rsa2048", "pkcs1v15"), ("rsa3072", "pss"), ("p256", "pkcs1v15"), ("p384", "pss")]
RECIPIENTS = ["rsa2048", "rsa3072", "p256", "p384"]
CIPHERS = ["aes-128-gcm", "aes-256-gcm", "aes-128-cbc", "aes-256-cbc"]
DIGESTS = ["sha256", "sha384", "sha512"]

payloads = st.one_of(
    st.binary(max_size=3000),
    # text-like payloads with the bytes MIME framing cares about
    st.lists(
        st.sampled_from([b"\r", b"\n", b"\r\n", b"--", b"x", b"MSH|", b"\x00"]), max_size=200
    ).map(b"".join),
)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return build_pki(tmp_path_factory.mktemp("pki-properties"))


def _seal(
    pki: Pki, payload: bytes, signer: str, pad: Any, digest: str, recipient: str, cipher: str
) -> bytes:
    s = pki[signer]
    signed = sign(
        payload,
        s.cert,
        s.key,
        digest=digest,
        detached=False,
        rsa_padding=pad,
        signing_time=SIGNING_TIME,
        policy=STRICT,
    )
    return encrypt(signed, [pki[recipient].cert], cipher=cipher, policy=STRICT)


def _open(pki: Pki, der: bytes, signer: str, recipient: str) -> bytes:
    r = pki[recipient]
    inner = decrypt(der, r.cert, r.key, policy=STRICT).content
    return verify(inner, trusted_signers=[pki[signer].cert], policy=STRICT).content


@SETTINGS
@given(
    payload=payloads,
    signer=st.sampled_from(SIGNERS),
    digest=st.sampled_from(DIGESTS),
    recipient=st.sampled_from(RECIPIENTS),
    cipher=st.sampled_from(CIPHERS),
)
def test_sign_encrypt_round_trip(
    pki: Pki, payload: bytes, signer: tuple[str, str], digest: str, recipient: str, cipher: str
) -> None:
    der = _seal(pki, payload, signer[0], signer[1], digest, recipient, cipher)
    assert _open(pki, der, signer[0], recipient) == payload


@SETTINGS
@given(
    payload=payloads,
    signer=st.sampled_from(SIGNERS),
    digest=st.sampled_from(DIGESTS),
    cipher=st.sampled_from(CIPHERS),
    compressed=st.booleans(),
)
def test_smime_round_trip(
    pki: Pki, payload: bytes, signer: tuple[str, str], digest: str, cipher: str, compressed: bool
) -> None:
    entity = make_entity("application/octet-stream", payload)
    s, r = pki[signer[0]], pki["p384"]
    inner = (
        make_entity("application/pkcs7-mime; smime-type=compressed-data", compress(entity))
        if compressed
        else entity
    )
    signed = sign_entity(
        inner, s.cert, s.key, digest=digest, signing_time=SIGNING_TIME, policy=STRICT
    )
    _ctype, body = envelope_entity(signed, [r.cert], cipher=cipher, policy=STRICT)
    opened = open_envelope(body, r.cert, r.key, policy=STRICT)
    got, v = verify_entity(opened.content, trusted_signers=[s.cert], policy=STRICT)
    assert got == inner
    assert v.digest == digest
    if compressed:
        assert decompress(got.split(b"\r\n\r\n", 1)[1]) == entity


# One sealed message per algorithm family, corrupted at random.
SEALED_CASES = [
    ("rsa3072", "pss", "sha384", "rsa2048", "aes-256-gcm"),
    ("p256", "pkcs1v15", "sha256", "p384", "aes-128-cbc"),
    ("rsa2048", "pkcs1v15", "sha512", "p256", "aes-256-cbc"),
    ("p384", "pss", "sha256", "rsa3072", "aes-128-gcm"),
]
PAYLOAD = b"MSH|^~\\&|LAB|HOSP|||20250601||ORU^R01|1|P|2.5\rOBX|1|NM|K^Potassium||4.1|mmol/L\r" * 4


@pytest.fixture(scope="module")
def sealed(pki: Pki) -> list[bytes]:
    return [_seal(pki, PAYLOAD, *case) for case in SEALED_CASES]


def _outcome(pki: Pki, der: bytes, case: int) -> bytes | MedgwError:
    signer, _pad, _digest, recipient, _cipher = SEALED_CASES[case]
    try:
        return _open(pki, der, signer, recipient)
    except MedgwError as exc:
        assert str(exc)  # every refusal explains itself
        return exc


@SETTINGS
@given(case=st.integers(0, len(SEALED_CASES) - 1), data=st.data())
@example(case=0, data=None)
def test_truncation_always_detected(pki: Pki, sealed: list[bytes], case: int, data: Any) -> None:
    der = sealed[case]
    cut = len(der) - 1 if data is None else data.draw(st.integers(0, len(der) - 1))
    assert isinstance(_outcome(pki, der[:cut], case), MedgwError)


GCM_CASES = [i for i, c in enumerate(SEALED_CASES) if c[4].endswith("gcm")]


@SETTINGS
@given(case=st.sampled_from(GCM_CASES), data=st.data())
def test_bit_flips_in_gcm_ciphertext_or_tag_always_detected(
    pki: Pki, sealed: list[bytes], case: int, data: Any
) -> None:
    # AuthEnvelopedData ends with the encrypted content and the tag: any flip
    # there must fail the tag (or, in the length octets, the parser)
    der = bytearray(sealed[case])
    start = len(der) * 6 // 10
    pos = data.draw(st.integers(start, len(der) - 1))
    der[pos] ^= 1 << data.draw(st.integers(0, 7))
    assert isinstance(_outcome(pki, bytes(der), case), MedgwError)


@pytest.fixture(scope="module")
def signed(pki: Pki) -> dict[str, bytes]:
    out = {}
    for name, pad in SIGNERS:
        s = pki[name]
        out[name] = sign(
            PAYLOAD,
            s.cert,
            s.key,
            detached=False,
            rsa_padding=pad,  # type: ignore[arg-type]
            signing_time=SIGNING_TIME,
            policy=STRICT,
        )
    return out


@SETTINGS
@given(signer=st.sampled_from([name for name, _pad in SIGNERS]), data=st.data())
def test_bit_flips_in_signed_content_or_signature_always_detected(
    pki: Pki, signed: dict[str, bytes], signer: str, data: Any
) -> None:
    s = pki[signer]
    der = signed[signer]
    at = der.index(PAYLOAD)
    # the content, or the SignerInfo's tail (signed attributes' end and signature)
    regions = [(at, at + len(PAYLOAD) - 1), (len(der) - 64, len(der) - 1)]
    lo, hi = data.draw(st.sampled_from(regions))
    pos = data.draw(st.integers(lo, hi))
    bad = bytearray(der)
    bad[pos] ^= 1 << data.draw(st.integers(0, 7))
    with pytest.raises(MedgwError):
        verify(bytes(bad), trusted_signers=[s.cert], policy=STRICT)


@SETTINGS
@given(case=st.integers(0, len(SEALED_CASES) - 1), data=st.data())
def test_random_corruption_never_crashes_nor_alters(
    pki: Pki, sealed: list[bytes], case: int, data: Any
) -> None:
    # Anywhere in the message, one to four bit flips.  A flip in a field that
    # protects nothing (a CMS version number, another recipient's info) may be
    # harmless; then the result must be the authentic payload, byte for byte.
    der = bytearray(sealed[case])
    for _ in range(data.draw(st.integers(1, 4))):
        pos = data.draw(st.integers(0, len(der) - 1))
        der[pos] ^= 1 << data.draw(st.integers(0, 7))
    out = _outcome(pki, bytes(der), case)
    assert isinstance(out, MedgwError) or out == PAYLOAD


@SETTINGS
@given(
    noise=st.binary(max_size=600),
    prefix=st.sampled_from(
        [b"", b"\x30\x80", b"\x30\x82\x01\x00", b"\x30\x80\x06\x09*\x86H\x86\xf7\r\x01\x07"]
    ),
)
def test_arbitrary_bytes_are_refused_cleanly(pki: Pki, noise: bytes, prefix: bytes) -> None:
    der = prefix + noise
    r = pki["p256"]
    for fn in (
        lambda: decrypt(der, r.cert, r.key, policy=STRICT),
        lambda: verify(der, content=b"x", trusted_signers=[r.cert], policy=STRICT),
        lambda: decompress(der),
    ):
        with pytest.raises(MedgwError):
            fn()


@settings(max_examples=400, deadline=None)
@given(st.text(alphabet='ab/;"\\= \t', max_size=24))
def test_media_type_and_parameters_read_quoted_strings_whatever_their_place(value: str) -> None:
    """The quick readings of a Content-Type (no quoted string before the first ";", a
    quoted parameter without escapes) give what the full reading of its parameters gives."""
    from gateway.cms.mime import _split_params, header_param, media_type

    assert media_type(value) == _split_params(value)[0].strip().lower()
    for part in _split_params(value)[1:]:
        key, sep, raw = part.partition("=")
        if sep:
            text = raw.strip()
            if len(text) >= 2 and text[0] == text[-1] == '"':
                out, escaped = [], False
                for ch in text[1:-1]:
                    if escaped or ch != "\\":
                        out.append(ch)
                        escaped = False
                    else:
                        escaped = True
                text = "".join(out)
            # the first parameter of that name
            assert header_param(value, key) is not None
            if key.strip().lower() == "a":
                assert header_param(value, "a") == text
            break
