"""The direct DER reader of the CMS hot path (gateway.cms.der).

It must be strict (truncation, overlong lengths, trailing data, non-DER forms
refused), read exactly what asn1crypto reads on the common shapes (openssl's
messages and ours, compared field by field), and leave every other input to
the asn1crypto path: with the direct reader on or off, any message - intact
or corrupted - gets the same result or the same error.
"""

from __future__ import annotations

import contextlib
import io
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from unittest import mock

import pytest
from asn1crypto import cms, core
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gateway.cms import (
    decrypt,
    der,
    encrypt,
    enveloped_read,
    key_recovery,
    sign,
    signed_parsed,
    signed_read,
    verify,
)
from gateway.cms.decrypting import decrypt_stream
from gateway.cms.envelope_algorithms import cbc_iv, gcm_parameters
from gateway.errors import MalformedMessageError, MedgwError
from tests.helpers.cms_pki import SIGNING_TIME, STRICT, Pki, build_pki
from tests.helpers.openssl_cms import ECDH_SHA256, RSA_OAEP_SHA256

SETTINGS = settings(
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
PAYLOAD = b"MSH|^~\\&|LAB|HOSP|||20250601||ORU^R01|1|P|2.5\rOBX|1|NM|K^Potassium||4.1\r" * 3


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return build_pki(tmp_path_factory.mktemp("pki-der"))


def _openssl(*args: str | Path) -> None:
    subprocess.run(["openssl", "cms", *map(str, args)], check=True, capture_output=True)


# ---------------------------------------------------------------------------
# the reader itself


def test_header_short_and_long_forms() -> None:
    assert der.header(b"\x04\x03abc", 0, 5) == (0x04, 3, 2)
    long = b"\x04\x81\x80" + b"x" * 0x80
    assert der.header(long, 0, len(long)) == (0x04, 0x80, 3)
    assert der.header(b"\x30\x82\x01\x00", 0, 4) == (0x30, 256, 4)


@pytest.mark.parametrize(
    ("data", "detail"),
    [
        (b"\x04\x81\x05hello", "shortest form"),  # DER: 5 fits the short form
        (b"\x04\x82\x00\x85" + b"x" * 0x85, "shortest form"),  # leading zero octet
        (b"\x30\x80\x00\x00", "indefinite length in DER"),
        (b"\x1f\x01\x00", "high tag"),
        (b"\x04\x89" + b"\x01" * 9, "length of 9 octets"),
    ],
)
def test_header_refuses_what_der_forbids(data: bytes, detail: str) -> None:
    with pytest.raises(der.DerError, match=detail):
        der.header(data, 0, len(data))


def test_header_ber_mode_takes_indefinite_and_long_lengths() -> None:
    assert der.header(b"\x30\x80", 0, 2, ber=True) == (0x30, None, 2)
    assert der.header(b"\x04\x81\x05", 0, 3, ber=True) == (0x04, 5, 3)
    with pytest.raises(der.DerError, match="primitive"):
        der.header(b"\x04\x80", 0, 2, ber=True)


@pytest.mark.parametrize(("data", "at"), [(b"", 0), (b"\x30", 0), (b"\x30\x82\x01", 2)])
def test_header_truncated(data: bytes, at: int) -> None:
    with pytest.raises(der.Truncated) as info:
        der.header(data, 0, len(data))
    assert info.value.at == at
    assert isinstance(info.value, MalformedMessageError)


def test_cursor_is_strict() -> None:
    c = der.contents_of(b"\x30\x06\x02\x01\x05\x04\x01x", 0x30)
    start, stop = c.next(0x02)
    assert der.integer(c.buf, start, stop) == 5
    assert c.value(0x04) == b"x"
    c.finish()
    with pytest.raises(der.DerError, match="unexpected bytes"):  # trailing data
        der.contents_of(b"\x30\x03\x02\x01\x05\x00", 0x30)
    with pytest.raises(der.DerError, match="unexpected bytes"):  # inside the container
        c = der.contents_of(b"\x30\x04\x02\x01\x05\x00", 0x30)
        c.next(0x02)
        c.finish()
    with pytest.raises(der.DerError, match="past the end"):  # length beyond its container
        der.contents_of(b"\x30\x03\x02\x05\x05", 0x30).next(0x02)
    with pytest.raises(der.DerError, match="past the end"):
        der.contents_of(b"\x30\x05\x02\x01", 0x30)
    with pytest.raises(der.DerError, match="expected tag 0x04, found 0x02"):
        der.contents_of(b"\x30\x03\x02\x01\x05", 0x30).next(0x04)
    with pytest.raises(der.DerError, match="past the end"):  # long form, overlong
        der.contents_of(b"\x30\x84\x7f\xff\xff\xff\x00", 0x30)


@pytest.mark.parametrize(
    ("contents", "value"),
    [(b"\x00", 0), (b"\x7f", 127), (b"\x00\x80", 128), (b"\xff", -1), (b"\x80", -128)],
)
def test_integer(contents: bytes, value: int) -> None:
    assert der.integer(contents, 0, len(contents)) == value


@pytest.mark.parametrize("contents", [b"", b"\x00\x05", b"\xff\x80"])
def test_integer_refuses_empty_and_padded(contents: bytes) -> None:
    with pytest.raises(der.DerError):
        der.integer(contents, 0, len(contents))


def test_oid_forms() -> None:
    assert der.oid_valid(bytes.fromhex("2a864886f70d010702"))
    assert not der.oid_valid(bytes.fromhex("2a80864886f70d010702"))  # padded sub-identifier
    assert not der.oid_valid(bytes.fromhex("2a864886f70d0107"[:-2] + "87"))  # unterminated
    assert not der.oid_valid(b"")


@given(st.binary(max_size=64))
def test_cursor_on_any_bytes_only_raises_der_errors(data: bytes) -> None:
    def walk(c: der.Cursor, depth: int) -> None:
        while not c.at_end():
            tag, start, stop = c.any()
            assert c.pos == stop <= c.end
            if tag & 0x20 and depth < 8:
                walk(der.Cursor(c.buf, start, stop), depth + 1)

    with contextlib.suppress(der.DerError):
        walk(der.Cursor(data, 0, len(data)), 0)


# ---------------------------------------------------------------------------
# exactly what asn1crypto reads, on openssl's messages and ours


class _Messages(dict[str, bytes]):
    def __repr__(self) -> str:  # hypothesis prints its arguments on failure
        return f"<{len(self)} messages>"


@pytest.fixture(scope="module")
def messages(pki: Pki, tmp_path_factory: pytest.TempPathFactory) -> dict[str, bytes]:
    d = tmp_path_factory.mktemp("der-messages")
    data = d / "payload.bin"
    data.write_bytes(PAYLOAD)
    out = _Messages()
    sign_cases: dict[str, tuple[str, list[str]]] = {
        "ossl-sign-rsa": ("rsa2048", []),
        "ossl-sign-rsa-nocaps": ("rsa2048", ["-nosmimecap"]),
        "ossl-sign-rsa-keyid": ("rsa2048", ["-keyid"]),
        "ossl-sign-rsa-nocerts": ("rsa2048", ["-nocerts"]),
        "ossl-sign-p256-attached": ("p256", ["-nodetach"]),
        "ossl-sign-p384-sha384": ("p384", ["-md", "sha384"]),
    }
    for name, (party, extra) in sign_cases.items():
        p = pki[party]
        dst = d / f"{name}.der"
        _openssl("-sign", "-binary", "-in", data, "-signer", p.cert_path, "-inkey", p.key_path,
                 "-outform", "DER", "-out", dst, *extra)  # fmt: skip
        out[name] = dst.read_bytes()
    enc_cases: dict[str, tuple[str, list[tuple[str, list[str]]]]] = {
        "ossl-enc-rsa-gcm": ("aes-256-gcm", [("rsa2048", RSA_OAEP_SHA256)]),
        "ossl-enc-rsa-cbc": ("aes-128-cbc", [("rsa2048", RSA_OAEP_SHA256)]),
        "ossl-enc-p256-gcm": ("aes-128-gcm", [("p256", ECDH_SHA256)]),
        "ossl-enc-p384-cbc": ("aes-256-cbc", [("p384", ECDH_SHA256)]),
        "ossl-enc-both": ("aes-256-gcm", [("p256", ECDH_SHA256), ("rsa2048", RSA_OAEP_SHA256)]),
        "ossl-enc-rsa-keyid": ("aes-256-gcm", [("rsa2048", [*RSA_OAEP_SHA256, "-keyid"])]),
    }
    for name, (cipher, recips) in enc_cases.items():
        dst = d / f"{name}.der"
        args: list[str | Path] = ["-encrypt", "-binary", "-in", data, "-outform", "DER"]
        args += ["-out", dst, f"-{cipher}"]
        for party, keyopts in recips:
            args += ["-recip", pki[party].cert_path, *keyopts]
        _openssl(*args)
        out[name] = dst.read_bytes()
    for party in ("rsa2048", "p256"):
        p = pki[party]
        out[f"ours-sign-{party}"] = sign(
            PAYLOAD, p.cert, p.key, signing_time=SIGNING_TIME, policy=STRICT
        )
    for party, cipher in (("rsa2048", "aes-256-gcm"), ("p256", "aes-256-cbc")):
        out[f"ours-enc-{party}"] = encrypt(PAYLOAD, [pki[party].cert], cipher=cipher, policy=STRICT)
    return out


SIGNATURES = [
    "ossl-sign-rsa",
    "ossl-sign-rsa-nocaps",
    "ossl-sign-rsa-keyid",
    "ossl-sign-rsa-nocerts",
    "ossl-sign-p256-attached",
    "ossl-sign-p384-sha384",
    "ours-sign-rsa2048",
    "ours-sign-p256",
]
ENVELOPES = [
    ("ossl-enc-rsa-gcm", "rsa2048"),
    ("ossl-enc-rsa-cbc", "rsa2048"),
    ("ossl-enc-p256-gcm", "p256"),
    ("ossl-enc-p384-cbc", "p384"),
    ("ossl-enc-both", "p256"),
    ("ossl-enc-both", "rsa2048"),
    ("ossl-enc-rsa-keyid", "rsa2048"),
    ("ours-enc-rsa2048", "rsa2048"),
    ("ours-enc-p256", "p256"),
]

CBC = {"ossl-enc-rsa-cbc", "ossl-enc-p384-cbc", "ours-enc-p256"}  # no integrity of its own


@pytest.mark.parametrize("name", SIGNATURES)
def test_signature_read_as_asn1crypto_reads_it(messages: dict[str, bytes], name: str) -> None:
    data = messages[name]
    direct = signed_read.parse_signed_data_der(data)  # the common shape: no fallback
    slow = signed_parsed.parse_signed_data_asn1(data)
    assert direct.content_type == slow.content_type == "data"
    assert direct.content == slow.content
    assert [c.public_bytes(der_enc()) for c in direct.certificates] == [
        c.public_bytes(der_enc()) for c in slow.certificates
    ]
    assert len(direct.signers) == len(slow.signers) == 1
    d, s = direct.signers[0], slow.signers[0]
    assert isinstance(d, signed_parsed.DirectSigner) and isinstance(s, signed_parsed.ParsedSigner)
    for field in (
        "index",
        "digest",
        "sig_alg_name",
        "signature",
        "attrs_present",
        "attrs_original",
        "content_type_attr",
        "message_digest",
        "signing_time",
        "sid_ski",
    ):
        assert getattr(d, field) == getattr(s, field), field
    assert d.attrs_present and d.message_digest and d.signing_time is not None
    if s.sid_issuer_serial is not None:
        assert d.sid_issuer_der == s.sid_issuer_serial["issuer"].dump()
        assert d.sid_serial == s.sid_issuer_serial["serial_number"].native
    else:
        assert d.sid_issuer_der is None and d.sid_ski
    assert d.describe() == s.describe()
    assert list(d.attrs_der()) == list(s.attrs_der())
    s.check_protection("signer")  # what the direct reader accepted passes the asn1crypto check


def der_enc() -> Any:
    from cryptography.hazmat.primitives.serialization import Encoding

    return Encoding.DER


def _asn1crypto_reading(data: bytes) -> enveloped_read.ParsedEnvelope:
    """The same fields as asn1crypto reads them: the independent reference."""
    ci = cms.ContentInfo.load(data, strict=True)
    kind = ci["content_type"].native
    body = ci["content"]
    if kind == "enveloped_data":
        eci, mac = body["encrypted_content_info"], None
    else:
        eci, mac = body["auth_encrypted_content_info"], body["mac"].native
        assert isinstance(body["auth_attrs"], core.Void)
    alg = eci["content_encryption_algorithm"]
    return enveloped_read.ParsedEnvelope(
        kind=kind,
        recipient_infos=body["recipient_infos"],
        cipher_oid_name=alg["algorithm"].native,
        cipher_params=alg["parameters"],
        encrypted_content=bytes(eci["encrypted_content"]),
        mac=mac,
        auth_attrs_der=None,
    )


@pytest.mark.parametrize(("name", "party"), ENVELOPES)
def test_envelope_read_as_asn1crypto_reads_it(
    pki: Pki, messages: dict[str, bytes], name: str, party: str
) -> None:
    data = messages[name]
    direct = enveloped_read.parse_enveloped_der(data)  # the common shape: no fallback
    slow = _asn1crypto_reading(data)
    assert direct.kind == slow.kind
    assert direct.cipher_oid_name == slow.cipher_oid_name
    assert direct.encrypted_content == slow.encrypted_content
    assert direct.mac == slow.mac
    assert direct.auth_attrs_der is slow.auth_attrs_der is None
    if direct.kind == "authenticated_enveloped_data":
        assert gcm_parameters(direct.cipher_params) == gcm_parameters(slow.cipher_params)
    else:
        assert cbc_iv(direct.cipher_params) == cbc_iv(slow.cipher_params)
    ris = direct.recipient_infos
    assert isinstance(ris, enveloped_read.DirectRecipients)
    asn1_ris = list(slow.recipient_infos)
    assert len(ris.infos) == len(asn1_ris)
    for info, ri in zip(ris.infos, asn1_ris, strict=True):
        if isinstance(info, enveloped_read.DirectKtri):
            assert ri.name == "ktri"
            k = ri.chosen
            _same_rid(info.rid, k["rid"])
            assert info.encrypted_key == k["encrypted_key"].native
            params = k["key_encryption_algorithm"]["parameters"]
            assert info.hash_name == params["hash_algorithm"]["algorithm"].native
            mgf = params["mask_gen_algorithm"]["parameters"]["algorithm"].native
            assert info.mgf_hash_name == mgf
        else:
            assert ri.name == "kari"
            k = ri.chosen
            orig = k["originator"].chosen
            assert info.point == bytes(orig["public_key"])
            assert info.wrap_der == k["key_encryption_algorithm"]["parameters"].dump()
            ukm = k["ukm"]
            assert info.ukm == (None if ukm.native is None else ukm.native)
            reks = list(k["recipient_encrypted_keys"])
            assert len(info.keys) == len(reks)
            for (rid, encrypted_key), rek in zip(info.keys, reks, strict=True):
                _same_rid(rid, rek["rid"])
                assert encrypted_key == rek["encrypted_key"].native
    p = pki[party]
    fast_cek = key_recovery.recover_cek(ris, p.cert, p.key, STRICT)
    with _asn1_only():
        assert key_recovery.recover_cek(slow.recipient_infos, p.cert, p.key, STRICT) == fast_cek
    assert decrypt(data, p.cert, p.key, policy=STRICT).content == PAYLOAD


def _same_rid(rid: Any, asn1_rid: Any) -> None:
    if asn1_rid.name == "issuer_and_serial_number":
        assert rid.issuer_der == asn1_rid.chosen["issuer"].dump()
        assert rid.serial == asn1_rid.chosen["serial_number"].native
    else:
        assert asn1_rid.name == "subject_key_identifier"
        assert rid.issuer_der is None and rid.ski == asn1_rid.chosen.native


# ---------------------------------------------------------------------------
# direct reader on or off: the same result, the same error


@contextlib.contextmanager
def _asn1_only() -> Iterator[None]:
    def refuse(*_args: Any) -> Any:
        raise der.DerError("direct reader off")

    with (
        mock.patch.object(signed_read, "parse_signed_data_der", refuse),
        mock.patch.object(enveloped_read, "parse_enveloped_der", refuse),
        mock.patch("gateway.cms.decrypting.direct_recipients", lambda _der: None),
        mock.patch("gateway.cms.decrypting.content_algorithm_direct", refuse),
        mock.patch.object(key_recovery, "_recover_direct", lambda *_args: None),
    ):
        yield


def _outcome(fn: Callable[[], Any]) -> Any:
    try:
        return ("ok", fn())
    except MedgwError as exc:
        return ("error", type(exc), str(exc))


def _both(fn: Callable[[], Any]) -> tuple[Any, Any]:
    fast = _outcome(fn)
    with _asn1_only():
        slow = _outcome(fn)
    return fast, slow


def _verified(v: Any) -> tuple[Any, ...]:
    return (
        v.signer.public_bytes(der_enc()),
        v.digest,
        v.signature_algorithm,
        v.signing_time,
        v.content,
        tuple(c.public_bytes(der_enc()) for c in v.certificates),
        v.compat_algorithms,
    )


@st.composite
def _corrupted(draw: Any, data: bytes) -> bytes:
    out = bytearray(data)
    how = draw(st.sampled_from(["flip", "truncate", "append", "insert", "delete"]))
    if how == "flip":
        for _ in range(draw(st.integers(1, 3))):
            out[draw(st.integers(0, len(out) - 1))] ^= 1 << draw(st.integers(0, 7))
    elif how == "truncate":
        del out[draw(st.integers(0, len(out) - 1)) :]
    elif how == "append":
        out += draw(st.binary(min_size=1, max_size=8))
    elif how == "insert":
        out.insert(draw(st.integers(0, len(out))), draw(st.integers(0, 255)))
    else:
        del out[draw(st.integers(0, len(out) - 1))]
    return bytes(out)


@SETTINGS
@given(name=st.sampled_from(SIGNATURES), data=st.data())
def test_corrupted_signature_same_outcome_either_way(
    pki: Pki, messages: dict[str, bytes], name: str, data: Any
) -> None:
    signed = data.draw(_corrupted(messages[name]))
    party = "p256" if "p256" in name else "p384" if "p384" in name else "rsa2048"
    detached = name not in ("ossl-sign-p256-attached",)

    def run() -> Any:
        v = verify(
            signed,
            content=PAYLOAD if detached else None,
            trusted_signers=[pki[party].cert],
            policy=STRICT,
        )
        return _verified(v)

    fast, slow = _both(run)
    assert fast == slow
    if signed != messages[name]:
        assert fast[0] == "error" or fast[1][4] == PAYLOAD


@pytest.mark.parametrize("name", SIGNATURES)
def test_a_corrupted_digest_algorithm_list_same_outcome_either_way(
    pki: Pki, messages: dict[str, bytes], name: str
) -> None:
    """The SignedData's digestAlgorithms are not used (each signer names its own), but a
    corrupted one is read by both readers alike: every bit flipped in it, one at a time."""
    signed = messages[name]
    ci = der.contents_of(signed, 0x30)
    ci.next(0x06)
    sd = ci.inner(0xA0).inner(0x30)
    sd.next(0x02)
    start, stop = sd.next(0x31)
    party = "p256" if "p256" in name else "p384" if "p384" in name else "rsa2048"
    detached = name not in ("ossl-sign-p256-attached",)
    for at in range(start, stop):
        for bit in range(8):
            corrupted = bytearray(signed)
            corrupted[at] ^= 1 << bit

            def run(data: bytes = bytes(corrupted)) -> Any:
                v = verify(
                    data,
                    content=PAYLOAD if detached else None,
                    trusted_signers=[pki[party].cert],
                    policy=STRICT,
                )
                return _verified(v)

            fast, slow = _both(run)
            assert fast == slow, (at, bit)


@SETTINGS
@given(case=st.sampled_from(ENVELOPES), data=st.data())
def test_corrupted_envelope_same_outcome_either_way(
    pki: Pki, messages: dict[str, bytes], case: tuple[str, str], data: Any
) -> None:
    name, party = case
    enveloped = data.draw(_corrupted(messages[name]))
    p = pki[party]

    def in_memory() -> Any:
        d = decrypt(enveloped, p.cert, p.key, policy=STRICT)
        return (d.content, d.content_cipher, d.key_transport, d.compat_algorithms)

    def streamed() -> Any:
        out = io.BytesIO()
        d = decrypt_stream(io.BytesIO(enveloped), out, p.cert, p.key, policy=STRICT)
        return (out.getvalue(), d.size, d.content_cipher, d.key_transport, d.compat_algorithms)

    for fn in (in_memory, streamed):
        fast, slow = _both(fn)
        assert fast == slow
        if name not in CBC:  # authenticated (GCM): altered content never passes
            assert fast[0] == "error" or fast[1][0] == PAYLOAD


@pytest.mark.parametrize("name", SIGNATURES)
def test_trailing_garbage_after_a_signature_refused(
    pki: Pki, messages: dict[str, bytes], name: str
) -> None:
    with pytest.raises(der.DerError):
        signed_read.parse_signed_data_der(messages[name] + b"\x00")
    with pytest.raises(MalformedMessageError):
        verify(messages[name] + b"\x00\x00", content=PAYLOAD, trusted_signers=[], policy=STRICT)


@pytest.mark.parametrize(("name", "party"), ENVELOPES[:4])
def test_every_truncation_of_an_envelope_refused(
    pki: Pki, messages: dict[str, bytes], name: str, party: str
) -> None:
    data = messages[name]
    p = pki[party]
    for cut in range(0, len(data), max(1, len(data) // 97)):
        with pytest.raises(der.DerError):
            enveloped_read.parse_enveloped_der(data[:cut])
        with pytest.raises(MedgwError):
            decrypt(data[:cut], p.cert, p.key, policy=STRICT)


def test_asn1_only_switch_really_switches(pki: Pki, messages: dict[str, bytes]) -> None:
    # the differential tests above compare something only if this holds
    data = messages["ours-sign-rsa2048"]
    assert isinstance(signed_read.parse_signed_data(data).signers[0], signed_parsed.DirectSigner)
    with _asn1_only():
        assert isinstance(
            signed_read.parse_signed_data(data).signers[0], signed_parsed.ParsedSigner
        )
        with pytest.raises(der.DerError):
            enveloped_read.parse_enveloped_der(messages["ours-enc-rsa2048"])
