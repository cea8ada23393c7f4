"""``medgw smime ...`` run as a real process, on files made by ``openssl cms`` and read by it."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests import testdata
from tests.helpers.cms_pki import Pki, build_pki
from tests.helpers.openssl_cms import RSA_OAEP_SHA256, openssl

pytestmark = pytest.mark.skipif(shutil.which("openssl") is None, reason="needs openssl on PATH")

ROOT = Path(__file__).resolve().parents[1]
PAYLOAD = b"MSH|^~\\&|LAB|HOSP|||20250601||ORU^R01|1|P|2.5\rPID|||12345||DOE^JANE\r"


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return build_pki(tmp_path_factory.mktemp("pki-cli"))


def medgw(*args: str | Path, stdin: bytes | None = None) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(
        [sys.executable, "-m", "gateway", "smime", *(str(a) for a in args)],
        cwd=ROOT,
        input=stdin,
        capture_output=True,
        timeout=120,
    )


@pytest.fixture
def payload(tmp_path: Path) -> Path:
    p = tmp_path / "payload.hl7"
    p.write_bytes(PAYLOAD)
    return p


# ---------------------------------------------------------------------------
# sign


@pytest.mark.parametrize(
    ("party", "fmt", "detached"),
    [
        ("rsa3072", "der", False),
        ("rsa2048", "der", True),
        ("p256", "smime", True),
        ("p384", "smime", False),
    ],
)
def test_sign_openssl_verifies(
    pki: Pki, tmp_path: Path, payload: Path, party: str, fmt: str, detached: bool
) -> None:
    p = pki[party]
    out = tmp_path / "signed"
    args: list[str | Path] = ["sign", "--cert", p.cert_path, "--key", p.key_path, "--format", fmt]
    expected = PAYLOAD
    binary = ["-binary"]
    if detached:
        args.append("--detached")
        if fmt == "smime":
            # multipart/signed: openssl's line-based MIME parser only keeps
            # canonical CRLF text intact (see test_cms_openssl.py)
            expected = b"Content-Type: text/plain\r\n\r\nline one\r\nline two\r\n"
            payload.write_bytes(expected)
            binary = []
    proc = medgw(*args, payload, out)
    assert proc.returncode == 0, proc.stderr.decode()
    got = tmp_path / "content"
    cmd: list[str | Path] = ["-verify", *binary, "-CAfile", pki.ca_path, "-in", out, "-out", got]
    if fmt == "der":
        cmd += ["-inform", "DER"]
        if detached:
            cmd += ["-content", payload]
    openssl(*cmd)
    assert got.read_bytes() == expected


def test_sign_refuses_rsa1024_with_reason(pki: Pki, tmp_path: Path, payload: Path) -> None:
    p = pki["rsa1024"]
    proc = medgw("sign", "--cert", p.cert_path, "--key", p.key_path, payload, tmp_path / "o")
    assert proc.returncode == 1
    err = proc.stderr.decode()
    assert "RSA-1024" in err and "at least 2048 bits" in err and "fix:" in err
    assert not (tmp_path / "o").exists()


# ---------------------------------------------------------------------------
# verify


def _openssl_sign(pki: Pki, tmp_path: Path, payload: Path, party: str, *extra: str) -> Path:
    p = pki[party]
    out = tmp_path / "ossl-signed"
    openssl(
        "-sign", "-binary", "-in", payload, "-signer", p.cert_path, "-inkey", p.key_path,
        "-out", out, *extra,
    )  # fmt: skip
    return out


@pytest.mark.parametrize(
    ("fmt", "extra"),
    [
        ("der-attached", ["-nodetach", "-outform", "DER"]),
        ("ber-stream", ["-nodetach", "-stream", "-outform", "DER"]),
        ("pem", ["-nodetach", "-outform", "PEM"]),
        ("smime-multipart", []),
        ("smime-opaque", ["-nodetach"]),
    ],
)
def test_verify_detects_formats(
    pki: Pki, tmp_path: Path, payload: Path, fmt: str, extra: list[str]
) -> None:
    signed = _openssl_sign(pki, tmp_path, payload, "p384", *extra)
    out = tmp_path / "out"
    proc = medgw("verify", "--trust", pki.ca_path, signed, out)
    assert proc.returncode == 0, proc.stderr.decode()
    err = proc.stderr.decode()
    assert "Verification successful" in err and "CN=p384.medgw.test" in err
    assert "ecdsa with sha256" in err
    assert out.read_bytes() == PAYLOAD


def test_verify_detached_with_content(pki: Pki, tmp_path: Path, payload: Path) -> None:
    signed = _openssl_sign(pki, tmp_path, payload, "rsa2048", "-outform", "DER")
    ok = medgw("verify", "--trust", pki.ca_path, "--content", payload, signed)
    assert ok.returncode == 0, ok.stderr.decode()
    other = tmp_path / "other"
    other.write_bytes(PAYLOAD.replace(b"DOE", b"ROE"))
    bad = medgw("verify", "--trust", pki.ca_path, "--content", other, signed)
    assert bad.returncode == 1
    assert b"Verification FAILED" in bad.stderr and b"messageDigest" in bad.stderr


def test_verify_untrusted_anchor_and_time(pki: Pki, tmp_path: Path, payload: Path) -> None:
    signed = _openssl_sign(pki, tmp_path, payload, "p256", "-nodetach", "-outform", "DER")
    wrong = medgw("verify", "--trust", pki["other-rsa"].cert_path, signed)
    assert wrong.returncode == 1
    assert b"does not chain to any trust anchor" in wrong.stderr
    early = medgw("verify", "--trust", pki.ca_path, "--at", "2023-01-01T00:00:00Z", signed)
    assert early.returncode == 1
    assert b"is not valid at 2023-01-01" in early.stderr
    inside = medgw("verify", "--trust", pki.ca_path, "--at", "2030-01-01T00:00:00Z", signed)
    assert inside.returncode == 0, inside.stderr.decode()


def test_verify_sha1_refused(pki: Pki, tmp_path: Path, payload: Path) -> None:
    signed = _openssl_sign(pki, tmp_path, payload, "rsa2048", "-md", "sha1", "-nodetach")
    proc = medgw("verify", "--trust", pki.ca_path, signed)
    assert proc.returncode == 1
    assert b"algorithm sha1 refused" in proc.stderr and b"fix:" in proc.stderr


# ---------------------------------------------------------------------------
# encrypt / decrypt


@pytest.mark.parametrize(
    ("recipient", "cipher", "fmt"),
    [
        ("rsa2048", "aes-256-gcm", "der"),
        ("p256", "aes-128-cbc", "smime"),
        ("p384", "aes-128-gcm", "smime"),
        ("rsa3072", "aes-256-cbc", "der"),
    ],
)
def test_encrypt_openssl_decrypts(
    pki: Pki, tmp_path: Path, payload: Path, recipient: str, cipher: str, fmt: str
) -> None:
    r = pki[recipient]
    env = tmp_path / "env"
    proc = medgw(
        "encrypt", "--recipient", r.cert_path, "--cipher", cipher, "--format", fmt, payload, env
    )
    assert proc.returncode == 0, proc.stderr.decode()
    out = tmp_path / "out"
    cmd: list[str | Path] = ["-decrypt", "-binary", "-in", env, "-out", out]
    cmd += ["-recip", r.cert_path, "-inkey", r.key_path]
    openssl(*cmd, *(["-inform", "DER"] if fmt == "der" else []))
    assert out.read_bytes() == PAYLOAD


@pytest.mark.parametrize(
    ("recipient", "cipher", "outform"),
    [
        ("rsa3072", "-aes-256-gcm", "SMIME"),
        ("p384", "-aes-128-cbc", "DER"),
        ("p256", "-aes-256-gcm", "PEM"),
    ],
)
def test_decrypt_openssl_made(
    pki: Pki, tmp_path: Path, payload: Path, recipient: str, cipher: str, outform: str
) -> None:
    r = pki[recipient]
    env = tmp_path / "env"
    keyopts = RSA_OAEP_SHA256 if recipient.startswith("rsa") else ["-keyopt", "ecdh_kdf_md:sha256"]
    openssl(
        "-encrypt", "-binary", "-in", payload, "-out", env, "-outform", outform, cipher,
        "-recip", r.cert_path, *keyopts,
    )  # fmt: skip
    out = tmp_path / "out"
    proc = medgw("decrypt", "--cert", r.cert_path, "--key", r.key_path, env, out)
    assert proc.returncode == 0, proc.stderr.decode()
    assert out.read_bytes() == PAYLOAD
    assert cipher[1:].encode() in proc.stderr


def test_decrypt_3des_needs_each_legacy_algorithm_named(
    pki: Pki, tmp_path: Path, payload: Path
) -> None:
    """openssl's defaults here are two monitored-list algorithms (3DES content encryption,
    RSAES-PKCS1-v1_5 key transport): each must be named; naming one does not admit the
    other, and the old all-at-once --compat is refused naming its replacement."""
    r = pki["rsa2048"]
    env = tmp_path / "env"
    openssl(
        "-encrypt",
        "-binary",
        "-in",
        payload,
        "-out",
        env,
        "-outform",
        "DER",
        "-des3",
        "-recip",
        r.cert_path,
    )
    out = tmp_path / "out"
    refused = medgw("decrypt", "--cert", r.cert_path, "--key", r.key_path, env, out)
    assert refused.returncode == 1
    err = refused.stderr.decode()
    assert "des-ede3-cbc refused" in err and "3DES" in err and "accept_legacy" in err
    assert not out.exists()
    half = medgw(
        "decrypt", "--accept-legacy", "des-ede3-cbc",
        "--cert", r.cert_path, "--key", r.key_path, env, out,
    )  # fmt: skip
    assert half.returncode == 1 and "rsaes-pkcs1-v1_5 refused" in half.stderr.decode()
    assert not out.exists()
    old = medgw("decrypt", "--compat", "--cert", r.cert_path, "--key", r.key_path, env, out)
    assert old.returncode == 2 and "--accept-legacy" in old.stderr.decode()
    assert not out.exists()
    ok = medgw(
        "decrypt", "--accept-legacy", "des-ede3-cbc", "--accept-legacy", "rsaes-pkcs1-v1_5",
        "--cert", r.cert_path, "--key", r.key_path, env, out,
    )  # fmt: skip
    assert ok.returncode == 0, ok.stderr.decode()
    assert out.read_bytes() == PAYLOAD
    warnings = ok.stderr.decode()
    assert "warning: monitored-list algorithm des-ede3-cbc" in warnings
    assert "warning: monitored-list algorithm rsaes-pkcs1-v1_5" in warnings


def test_decrypt_wrong_key(pki: Pki, tmp_path: Path, payload: Path) -> None:
    env = tmp_path / "env"
    assert (
        medgw("encrypt", "--recipient", pki["other-p256"].cert_path, payload, env).returncode == 0
    )
    r = pki["p256"]
    proc = medgw("decrypt", "--cert", r.cert_path, "--key", r.key_path, env, tmp_path / "out")
    assert proc.returncode == 1
    assert b"encrypted for someone else" in proc.stderr


# ---------------------------------------------------------------------------
# inspect, usage


def test_inspect_openssl_envelope(pki: Pki, tmp_path: Path, payload: Path) -> None:
    env = tmp_path / "env"
    openssl(
        "-encrypt", "-binary", "-in", payload, "-out", env, "-aes-128-gcm",
        "-recip", pki["rsa2048"].cert_path, *RSA_OAEP_SHA256,
        "-recip", pki["p384"].cert_path, "-keyopt", "ecdh_kdf_md:sha1",
    )  # fmt: skip
    proc = medgw("inspect", env)
    assert proc.returncode == 0, proc.stderr.decode()
    text = proc.stdout.decode()
    assert "format: smime" in text
    assert "CMS authenticated_enveloped_data" in text
    assert "content cipher: aes-128-gcm (recommended)" in text
    assert "recipients: 2" in text
    assert "key transport rsaes-oaep (sha256) [recommended]" in text
    assert (
        'key agreement ECDH (KDF sha1) [monitored list: only with accept_legacy = ["ecdh-sha1kdf"]]'
        in text
    )


def test_inspect_signed(pki: Pki, tmp_path: Path, payload: Path) -> None:
    signed = _openssl_sign(
        pki, tmp_path, payload, "rsa2048", "-md", "sha1", "-nodetach", "-outform", "DER"
    )
    text = medgw("inspect", signed).stdout.decode()
    assert "CMS signed_data" in text and f"attached, {len(PAYLOAD)} bytes" in text
    assert 'digest: sha1 (monitored list: only with accept_legacy = ["sha1"])' in text
    assert "signingTime=" in text


def test_inspect_mendelson(tmp_path: Path) -> None:
    msg = testdata.AS2_VENDORS.require() / "mecas2_compressed_signed_encrypted.as2"

    text = medgw("inspect", msg).stdout.decode()
    assert "BER (indefinite lengths)" in text
    assert 'des-ede3-cbc (monitored list: only with accept_legacy = ["des-ede3-cbc"])' in text


@pytest.mark.parametrize(
    "args",
    [
        ["sign", "--cert", "/nonexistent.pem", "--key", "/nonexistent.key", "in", "out"],
        ["verify", "in"],  # --trust missing
        ["encrypt", "--recipient", "x.pem", "--cipher", "des-ede3-cbc", "in", "out"],
        ["frobnicate"],
    ],
    ids=["unreadable-cert", "missing-trust", "cipher-not-offered", "unknown-command"],
)
def test_usage_errors_exit_2(args: list[str]) -> None:
    proc = medgw(*args)
    assert proc.returncode == 2, proc.stderr.decode()
    assert proc.stderr


def test_garbage_input_exit_1(pki: Pki, tmp_path: Path) -> None:
    junk = tmp_path / "junk"
    junk.write_bytes(b"\x30\x80\x06\x03garbage")
    proc = medgw("verify", "--trust", pki.ca_path, junk)
    assert proc.returncode == 1
    assert b"not a DER/BER CMS ContentInfo" in proc.stderr


def test_stdin_stdout(pki: Pki) -> None:
    r = pki["p256"]
    env = medgw("encrypt", "--recipient", r.cert_path, "-", "-", stdin=PAYLOAD)
    assert env.returncode == 0 and env.stdout[:1] == b"\x30"
    out = medgw("decrypt", "--cert", r.cert_path, "--key", r.key_path, "-", "-", stdin=env.stdout)
    assert out.returncode == 0, out.stderr.decode()
    assert out.stdout == PAYLOAD


@pytest.mark.parametrize("role", ["tls", "smime-encrypt", "ca", "smime-sign"])
def test_verify_refuses_a_signer_not_meant_for_signing_documents(
    tmp_path: Path, payload: Path, role: str
) -> None:
    from datetime import UTC, datetime

    from gateway.pki.issue import issue, make_ca, write_pem

    now = datetime.now(UTC)
    ca = make_ca("Purpose CA", now=now)
    signer = ca if role == "ca" else issue(ca, f"{role}.medgw.test", purpose=role, now=now)
    ca_path, cert_path, key_path = (tmp_path / n for n in ("ca.pem", "signer.pem", "key.pem"))
    write_pem(ca_path, ca.certificate)
    write_pem(cert_path, signer.certificate)
    write_pem(key_path, signer.key)
    signed = tmp_path / "signed.der"
    openssl(
        "-sign", "-binary", "-in", payload, "-signer", cert_path, "-inkey", key_path,
        "-nodetach", "-outform", "DER", "-out", signed,
    )  # fmt: skip
    proc = medgw("verify", "--trust", ca_path, signed)
    if role == "smime-sign":
        assert proc.returncode == 0, proc.stderr.decode()
        return
    assert proc.returncode == 1, proc.stderr.decode()
    err = proc.stderr.decode()
    assert "Verification FAILED" in err and "smime-sign" in err and "fix:" in err
    # openssl refuses it too, for the same reason
    ref = subprocess.run(
        ["openssl", "cms", "-verify", "-inform", "DER", "-in", signed, "-CAfile", ca_path,
         "-purpose", "smimesign", "-out", "/dev/null"],
        capture_output=True,
    )  # fmt: skip
    assert ref.returncode != 0


def test_verify_signer_on_an_unsupported_curve_fails_cleanly(tmp_path: Path, payload: Path) -> None:
    from tests.helpers.openssl_cms import signed_by_openssl, unsupported_curve_signer

    cert, key = unsupported_curve_signer(tmp_path)
    signed = tmp_path / "signed.eml"
    signed.write_bytes(signed_by_openssl(tmp_path, cert, key, PAYLOAD))
    proc = medgw("verify", "--trust", cert, signed)
    err = proc.stderr.decode()
    assert proc.returncode == 1, err
    assert "Traceback" not in err and "1.3.132.0.16 is not supported" in err
