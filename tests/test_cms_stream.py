"""Streaming CMS over files: same bytes on the wire as the in-memory engine, checked by
openssl; BER input of any chunking; memory that does not grow with the payload."""

from __future__ import annotations

import shutil
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
from asn1crypto import cms as asn1_cms

from gateway.cms import compute_mic
from gateway.cms.decrypting import decrypt_file
from gateway.cms.mime import make_entity, parse_entity
from gateway.cms.smime import open_envelope, verify_entity
from gateway.cms.stream import (
    CHUNK,
    encrypt_chunks,
    encrypt_file,
    open_and_verify_file,
    sign_and_envelope_file,
    sign_entity_file,
    verify_entity_file,
)
from gateway.errors import (
    DecryptionError,
    MalformedMessageError,
    ObjectSecurityError,
    PolicyError,
    SignatureError,
)
from tests import testdata
from tests.helpers.cms_pki import ALL_LEGACY, SIGNING_TIME, STRICT, Pki, build_pki
from tests.helpers.openssl_cms import RSA_OAEP_SHA256, openssl

pytestmark = pytest.mark.skipif(shutil.which("openssl") is None, reason="needs openssl on PATH")

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return build_pki(tmp_path_factory.mktemp("pki-stream"))


def _payload(size: int) -> bytes:
    unit = b"MSH|^~\\&|LAB|HOSP\r\n--not-a-boundary\n\x00\xff"
    return (unit * (size // len(unit) + 1))[:size]


def _entity(tmp_path: Path, size: int) -> tuple[Path, bytes]:
    entity = make_entity("application/dicom", _payload(size))
    src = tmp_path / "entity.mime"
    src.write_bytes(entity)
    return src, entity


# sizes around block and chunk edges
SIZES = [0, 1, 15, 16, 17, 4096, CHUNK - 80, CHUNK + 5]


@pytest.mark.parametrize(
    ("cipher", "recipient", "signer", "size"),
    [
        ("aes-256-gcm", "rsa3072", "p256", SIZES[0]),
        ("aes-128-gcm", "p256", "rsa2048", SIZES[1]),
        ("aes-256-cbc", "p384", "rsa3072", SIZES[2]),
        ("aes-128-cbc", "rsa2048", "p384", SIZES[3]),
        ("aes-256-cbc", "rsa3072", "p256", SIZES[4]),
        ("aes-128-gcm", "p384", "rsa2048", SIZES[5]),
        ("aes-128-cbc", "p256", "p256", SIZES[6]),
        ("aes-256-gcm", "rsa2048", "rsa3072", SIZES[7]),
    ],
)
def test_sealed_file_read_by_openssl_and_in_memory_engine(
    pki: Pki, tmp_path: Path, cipher: str, recipient: str, signer: str, size: int
) -> None:
    src, entity = _entity(tmp_path, size)
    dst = tmp_path / "body.p7m"
    s, r = pki[signer], pki[recipient]
    sealed = sign_and_envelope_file(
        src,
        dst,
        signer_cert=s.cert,
        signer_key=s.key,
        recipients=[pki["other-p256"].cert, r.cert],
        digest="sha384",
        cipher=cipher,
        signing_time=SIGNING_TIME,
        policy=STRICT,
    )
    der = dst.read_bytes()
    assert sealed.size == len(der)
    assert sealed.mic == compute_mic(entity, "sha384")
    assert ("authEnveloped-data" in sealed.content_type) == cipher.endswith("gcm")
    # strict DER: asn1crypto re-encodes it byte for byte
    ci = asn1_cms.ContentInfo.load(der, strict=True)
    assert ci.dump(force=True) == der
    # the in-memory engine reads it
    opened = open_envelope(der, r.cert, r.key, policy=STRICT)
    inner, v = verify_entity(opened.content, trusted_signers=[s.cert], policy=STRICT)
    assert inner == entity and v.digest == "sha384"
    # and so does openssl: decrypt, then verify the multipart/signed
    signed = tmp_path / "signed.eml"
    openssl(
        "-decrypt", "-binary", "-inform", "DER", "-in", dst, "-recip", r.cert_path,
        "-inkey", r.key_path, "-out", signed,
    )  # fmt: skip
    assert signed.read_bytes() == opened.content
    # and we read our own stream back, streamed
    out = tmp_path / "out.mime"
    got = open_and_verify_file(
        dst, out, cert=r.cert, key=r.key, trusted_signers=[s.cert], policy=STRICT
    )
    assert out.read_bytes() == entity
    assert got.size == len(entity) and got.mic == sealed.mic
    assert got.decrypted.content_cipher == cipher


def test_openssl_verifies_streamed_signature(pki: Pki, tmp_path: Path) -> None:
    # openssl's MIME parser needs canonical CRLF text (see test_cms_openssl.py)
    src = tmp_path / "entity.mime"
    entity = make_entity("text/plain", b"line one\r\nline two\r\n" * 1000)
    src.write_bytes(entity)
    dst = tmp_path / "signed.eml"
    p = pki["rsa3072"]
    mic = sign_entity_file(
        src, dst, p.cert, p.key, rsa_padding="pss", signing_time=SIGNING_TIME, policy=STRICT
    )
    assert mic == compute_mic(entity, "sha256")
    out = tmp_path / "out"
    openssl("-verify", "-in", dst, "-CAfile", pki.ca_path, "-out", out)
    assert out.read_bytes() == entity


@pytest.mark.parametrize("cipher", ["aes-128-gcm", "aes-256-cbc"])
@pytest.mark.parametrize("recipient", ["rsa2048", "p384"])
def test_openssl_streamed_ber_decrypted_and_verified(
    pki: Pki, tmp_path: Path, cipher: str, recipient: str
) -> None:
    # openssl signs (multipart/signed, bare LF framing) then encrypts with -stream:
    # indefinite lengths and a constructed OCTET STRING in many chunks
    src, entity = _entity(tmp_path, 300_000)
    s, r = pki["p256"], pki[recipient]
    signed = tmp_path / "signed.eml"
    openssl(
        "-sign", "-binary", "-in", src, "-signer", s.cert_path, "-inkey", s.key_path,
        "-out", signed,
    )  # fmt: skip
    body = tmp_path / "body.ber"
    keyopts = RSA_OAEP_SHA256 if recipient.startswith("rsa") else ["-keyopt", "ecdh_kdf_md:sha256"]
    openssl(
        "-encrypt", "-binary", "-stream", "-in", signed, "-outform", "DER", "-out", body,
        f"-{cipher}", "-recip", r.cert_path, *keyopts,
    )  # fmt: skip
    assert body.read_bytes()[:2] == b"\x30\x80"
    out = tmp_path / "out.mime"
    got = open_and_verify_file(
        body, out, cert=r.cert, key=r.key, trusted_signers=[s.cert], policy=STRICT
    )
    assert out.read_bytes() == entity
    assert got.verified.signer == s.cert
    assert got.mic == compute_mic(entity, "sha256")


def test_encrypt_chunks_any_chunking(pki: Pki, tmp_path: Path) -> None:
    data = _payload(100_000)
    r = pki["p256"]
    pieces = [data[i : i + 7777] for i in range(0, len(data), 7777)]
    der = b"".join(encrypt_chunks(pieces, len(data), [r.cert], cipher="aes-256-gcm", policy=STRICT))
    assert open_envelope(der, r.cert, r.key, policy=STRICT).content == data
    with pytest.raises(ValueError, match="announced"):
        b"".join(encrypt_chunks(pieces, len(data) + 1, [r.cert], policy=STRICT))
    with pytest.raises(ValueError, match="more than the announced"):
        b"".join(encrypt_chunks(pieces, len(data) - 1, [r.cert], policy=STRICT))
    with pytest.raises(PolicyError, match="3DES"):
        b"".join(
            encrypt_chunks(pieces, len(data), [r.cert], cipher="des-ede3-cbc", policy=ALL_LEGACY)
        )


def _sealed(pki: Pki, tmp_path: Path, cipher: str, size: int = 5000) -> tuple[Path, bytes]:
    src, entity = _entity(tmp_path, size)
    dst = tmp_path / "body.p7m"
    sign_and_envelope_file(
        src,
        dst,
        signer_cert=pki["p384"].cert,
        signer_key=pki["p384"].key,
        recipients=[pki["rsa2048"].cert],
        cipher=cipher,
        signing_time=SIGNING_TIME,
        policy=STRICT,
    )
    return dst, entity


def _open(pki: Pki, body: Path, out: Path) -> None:
    r = pki["rsa2048"]
    open_and_verify_file(
        body, out, cert=r.cert, key=r.key, trusted_signers=[pki["p384"].cert], policy=STRICT
    )


@pytest.mark.parametrize("cipher", ["aes-256-gcm", "aes-128-cbc"])
def test_truncated_body_refused_and_nothing_delivered(
    pki: Pki, tmp_path: Path, cipher: str
) -> None:
    body, _ = _sealed(pki, tmp_path, cipher)
    data = body.read_bytes()
    out = tmp_path / "out.mime"
    for cut in (3, 200, len(data) // 2, len(data) - 1):
        body.write_bytes(data[:cut])
        with pytest.raises(MalformedMessageError, match="truncated"):
            _open(pki, body, out)
        assert not out.exists()
        assert sorted(p.name for p in tmp_path.iterdir()) == ["body.p7m", "entity.mime"]


@pytest.mark.parametrize(
    ("cipher", "error"),
    [("aes-256-gcm", DecryptionError), ("aes-128-cbc", SignatureError)],
)
def test_tampered_ciphertext_refused(
    pki: Pki, tmp_path: Path, cipher: str, error: type[Exception]
) -> None:
    # a flip in the middle of the payload: the GCM tag catches it; under CBC it
    # garbles two blocks of the signed entity and the signature catches it
    body, _ = _sealed(pki, tmp_path, cipher)
    data = bytearray(body.read_bytes())
    data[len(data) - 3000] ^= 0x40
    body.write_bytes(bytes(data))
    out = tmp_path / "out.mime"
    with pytest.raises(error):
        _open(pki, body, out)
    assert not out.exists()


def test_wrong_key_and_untrusted_signer(pki: Pki, tmp_path: Path) -> None:
    body, _ = _sealed(pki, tmp_path, "aes-128-gcm")
    out = tmp_path / "out.mime"
    me = pki["other-rsa"]
    with pytest.raises(DecryptionError, match="encrypted for someone else"):
        open_and_verify_file(
            body, out, cert=me.cert, key=me.key, trusted_signers=[pki["p384"].cert], policy=STRICT
        )
    r = pki["rsa2048"]
    with pytest.raises(ObjectSecurityError, match="not an accepted signer"):
        open_and_verify_file(
            body, out, cert=r.cert, key=r.key, trusted_signers=[pki["p256"].cert], policy=STRICT
        )
    assert not out.exists()


def test_decrypt_file_garbage(pki: Pki, tmp_path: Path) -> None:
    r = pki["p256"]
    for junk in (
        b"",
        b"\x30\x80\x06",
        b"not cms",
        b"\x30\x03\x02\x01\x00",
        b"\x30\x89" + b"\xff" * 9,
    ):
        src = tmp_path / "junk"
        src.write_bytes(junk)
        with pytest.raises(MalformedMessageError):
            decrypt_file(src, tmp_path / "out", r.cert, r.key, policy=STRICT)
        assert not (tmp_path / "out").exists()


def test_encrypt_file_openssl_decrypts(pki: Pki, tmp_path: Path) -> None:
    src = tmp_path / "in"
    src.write_bytes(_payload(CHUNK * 2 + 3))
    dst = tmp_path / "out.der"
    r = pki["p384"]
    encrypt_file(src, dst, [r.cert], cipher="aes-256-cbc", policy=STRICT)
    got = tmp_path / "plain"
    openssl(
        "-decrypt", "-binary", "-inform", "DER", "-in", dst, "-recip", r.cert_path,
        "-inkey", r.key_path, "-out", got,
    )  # fmt: skip
    assert got.read_bytes() == src.read_bytes()


def test_vendor_messages_streamed(tmp_path: Path) -> None:
    vendors = testdata.AS2_VENDORS.require()

    from cryptography import x509
    from cryptography.hazmat.primitives.serialization import load_pem_private_key

    pem = (vendors / "cert_test.pem").read_bytes()
    cert = x509.load_pem_x509_certificate(pem)
    key: Any = load_pem_private_key(pem, b"test")
    signer = x509.load_pem_x509_certificate((vendors / "cert_mecas2_public.pem").read_bytes())
    _headers, body = parse_entity((vendors / "mecas2_signed_encrypted.as2").read_bytes())
    src = tmp_path / "body.ber"
    src.write_bytes(body)
    out = tmp_path / "entity"
    with pytest.raises(PolicyError, match="3DES"):
        open_and_verify_file(src, out, cert=cert, key=key, trusted_signers=[signer], policy=STRICT)
    got = open_and_verify_file(
        src,
        out,
        cert=cert,
        key=key,
        trusted_signers=[signer],
        policy=ALL_LEGACY,
    )
    assert got.decrypted.compat_algorithms == ("des-ede3-cbc", "rsaes-pkcs1-v1_5")
    assert parse_entity(out.read_bytes())[1] == (vendors / "payload.txt").read_bytes()
    # the LF-converted signed message goes through the in-memory canonical fallback
    plain = tmp_path / "signed.eml"
    plain.write_bytes((vendors / "mecas2_signed.as2").read_bytes())
    v, size, _mic = verify_entity_file(plain, out, trusted_signers=[signer], policy=STRICT)
    assert parse_entity(out.read_bytes())[1] == (vendors / "payload.txt").read_bytes()
    assert size == len(out.read_bytes()) and v.digest == "sha256"


def test_memory_does_not_grow_with_payload(pki: Pki, tmp_path: Path) -> None:
    # In a child process: seal and open 4 MiB, then 96 MiB; peak RSS may not
    # grow by more than 32 MiB between the two.
    script = textwrap.dedent(
        """
        import resource, sys
        from pathlib import Path
        from cryptography import x509
        from cryptography.hazmat.primitives.serialization import load_pem_private_key
        from gateway.cms.stream import sign_and_envelope_file, open_and_verify_file
        from gateway.policy import AlgorithmPolicy
        from datetime import datetime, timezone
        d = Path(sys.argv[1]); k = Path(sys.argv[2])
        cert = x509.load_pem_x509_certificate((k / "p256.crt.pem").read_bytes())
        key = load_pem_private_key((k / "p256.key.pem").read_bytes(), None)
        def run(mib):
            src = d / "e"
            with src.open("wb") as f:
                f.write(b"Content-Type: application/dicom\\r\\n\\r\\n")
                block = bytes(range(256)) * 4096
                for _ in range(mib):
                    f.write(block)
            sign_and_envelope_file(src, d / "b", signer_cert=cert, signer_key=key,
                recipients=[cert], signing_time=datetime.now(timezone.utc),
                policy=AlgorithmPolicy())
            open_and_verify_file(d / "b", d / "o", cert=cert, key=key,
                trusted_signers=[cert], policy=AlgorithmPolicy())
            assert (d / "o").stat().st_size == src.stat().st_size
            return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        small = run(4)
        big = run(96)
        print(small, big)
        """
    )
    proc = subprocess.run(
        [sys.executable, "-c", script, str(tmp_path), str(pki.directory)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert proc.returncode == 0, proc.stderr
    small_kib, big_kib = map(int, proc.stdout.split())
    assert big_kib - small_kib < 32 * 1024, f"peak RSS grew from {small_kib} to {big_kib} KiB"
