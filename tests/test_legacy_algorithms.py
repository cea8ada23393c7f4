"""Legacy partners: each monitored-list algorithm is admitted on its own, by name.

What an administrator meets: ``medgw check-config`` on a peer file, and the
peer's policy the daemon then applies.  The former ``compat = true`` admitted
five algorithms at once; it is refused, naming the replacement.
"""

from __future__ import annotations

import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest
from asn1crypto import cms
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from gateway.cms import decrypt, encrypt
from gateway.config import load_config
from gateway.errors import MalformedMessageError, PolicyError
from gateway.pki.demo import DemoLayout
from gateway.policy import LEGACY_ALGORITHMS, AlgorithmPolicy
from tests.cli import medgw
from tests.helpers.openssl_keys import self_signed
from tests.oscrypto_fix import load_pyas2lib

as2 = load_pyas2lib()


def check_config(config: Path) -> subprocess.CompletedProcess[str]:
    return medgw("check-config", "--config", str(config))


def lines(result: subprocess.CompletedProcess[str], file: Path, key: str) -> list[str]:
    """The check-config lines about ``key`` of ``file``."""
    return [
        line
        for line in (result.stdout + result.stderr).splitlines()
        if line.startswith(("error:", "warning:")) and f"{file}: {key}:" in line
    ]


DEFAULT = 'key_transport = "rsaes-oaep-sha256"'


def edit_peer(layout: DemoLayout, old: str, new: str) -> Path:
    peer = layout.hospital.root / "peers.d" / "lab.toml"
    text = peer.read_text()
    assert old in text
    peer.write_text(text.replace(old, new))
    return peer


def test_compat_true_is_refused_naming_each_replacement(layout: DemoLayout) -> None:
    peer = edit_peer(layout, "accept_legacy = []", "compat = true")
    result = check_config(layout.hospital.config_path)
    assert result.returncode == 1, result.stdout + result.stderr
    [line] = lines(result, peer, "compat")
    assert line.startswith("error:") and "no longer read" in line
    fix = line.split("(fix: ", 1)[1]
    for name in LEGACY_ALGORITHMS:  # what it used to admit, and the key that replaces it
        assert f'"{name}"' in fix, name
    assert "accept_legacy = [" in fix and "policy.compat_algorithm_used" in fix


def test_compat_false_is_a_warning_to_remove_it_and_admits_nothing(layout: DemoLayout) -> None:
    peer = edit_peer(layout, "accept_legacy = []", "compat = false")
    result = check_config(layout.hospital.config_path)
    assert result.returncode == 0, result.stdout + result.stderr
    [line] = lines(result, peer, "compat")
    assert line.startswith("warning:") and "remove the line" in line
    lab = load_config(layout.hospital.config_path).peer("lab")
    assert lab is not None and lab.accept_legacy == frozenset()


@pytest.mark.parametrize("name", list(LEGACY_ALGORITHMS))
def test_one_legacy_permission_admits_that_algorithm_only_and_the_warning_says_which(
    layout: DemoLayout, name: str
) -> None:
    peer = edit_peer(layout, "accept_legacy = []", f'accept_legacy = ["{name}"]')
    result = check_config(layout.hospital.config_path)
    assert result.returncode == 0, result.stdout + result.stderr
    [line] = lines(result, peer, "accept_legacy")
    assert line.startswith("warning:")
    said = line.split("(fix: ", 1)[0]
    assert f"{name} ({LEGACY_ALGORITHMS[name]})" in said
    for other in set(LEGACY_ALGORITHMS) - {name}:
        assert LEGACY_ALGORITHMS[other] not in said, other
    assert f"ACCEPTS LEGACY: {name}\n" in result.stdout  # the summary of the peer
    lab = load_config(layout.hospital.config_path).peer("lab")
    assert lab is not None and lab.accept_legacy == frozenset({name})
    policy = lab.policy
    checks: dict[str, Callable[[], None]] = {
        "sha1": lambda: policy.check_digest("sha1", inbound=True),
        "des-ede3-cbc": lambda: policy.check_content_cipher("des-ede3-cbc", inbound=True),
        "rsaes-pkcs1-v1_5": lambda: policy.check_key_transport("rsaes-pkcs1-v1_5", inbound=True),
        "rsaes-oaep-sha1": lambda: policy.check_key_transport("rsaes-oaep-sha1", inbound=True),
        "ecdh-sha1kdf": lambda: policy.check_key_transport("ecdh-sha1kdf", inbound=True),
    }
    assert set(checks) == set(LEGACY_ALGORITHMS)
    checks[name]()
    for other, check in checks.items():
        if other != name:
            with pytest.raises(PolicyError):
                check()
    # admitted for reading only: never for what we send
    with pytest.raises(PolicyError):
        policy.check_digest("sha1")
    with pytest.raises(PolicyError):
        policy.check_content_cipher("des-ede3-cbc", inbound=False)


def test_an_unknown_or_repeated_legacy_name_is_an_error(layout: DemoLayout) -> None:
    peer = edit_peer(layout, "accept_legacy = []", 'accept_legacy = ["3des", "sha1", "sha1"]')
    result = check_config(layout.hospital.config_path)
    assert result.returncode == 1, result.stdout + result.stderr
    found = lines(result, peer, "accept_legacy")
    assert any(
        "'3des' is not a monitored-list algorithm" in x and "des-ede3-cbc" in x for x in found
    )
    assert any("sha1 is listed twice" in x for x in found)


# --- what we send: the key transport for an RSA recipient ---------------------------------


def test_key_transport_rsaes_oaep_sha1_is_a_warning_and_chosen(layout: DemoLayout) -> None:
    peer = edit_peer(layout, DEFAULT, 'key_transport = "rsaes-oaep-sha1"')
    result = check_config(layout.hospital.config_path)
    assert result.returncode == 0, result.stdout + result.stderr
    found = lines(result, peer, "key_transport")
    assert any(x.startswith("warning:") and "RSAES-OAEP with SHA-1" in x for x in found), found
    # the demo's certificates are EC: the choice cannot apply, and check-config says so
    assert any("has no effect" in x and "ECDH" in x for x in found), found
    lab = load_config(layout.hospital.config_path).peer("lab")
    assert lab is not None and lab.policy.key_transport == "rsaes-oaep-sha1"
    assert "key transport rsaes-oaep-sha1" in result.stdout


def test_rsaes_pkcs1_v15_is_sent_only_behind_its_own_legacy_option(layout: DemoLayout) -> None:
    peer = edit_peer(layout, DEFAULT, 'key_transport = "rsaes-pkcs1-v1_5"')
    result = check_config(layout.hospital.config_path)
    assert result.returncode == 1, result.stdout + result.stderr
    [line] = lines(result, peer, "key_transport")
    assert line.startswith("error:") and "monitored list" in line
    assert "legacy_send_rsaes_pkcs1_v1_5 = true" in line.split("(fix: ", 1)[1]

    edit_peer(layout, "legacy_send_rsaes_pkcs1_v1_5 = false", "legacy_send_rsaes_pkcs1_v1_5 = true")
    result = check_config(layout.hospital.config_path)
    assert result.returncode == 0, result.stdout + result.stderr
    found = lines(result, peer, "key_transport")
    assert any(x.startswith("warning:") and "RSAES-PKCS1-v1_5" in x for x in found), found
    lab = load_config(layout.hospital.config_path).peer("lab")
    assert lab is not None and lab.policy.key_transport == "rsaes-pkcs1-v1_5"
    assert lab.accept_legacy == frozenset()  # sending with it admits nothing inbound

    # the legacy option alone sends nothing differently, and check-config says so
    edit_peer(layout, 'key_transport = "rsaes-pkcs1-v1_5"', DEFAULT)
    result = check_config(layout.hospital.config_path)
    assert result.returncode == 0, result.stdout + result.stderr
    [line] = lines(result, peer, "legacy_send_rsaes_pkcs1_v1_5")
    assert line.startswith("warning:") and "has no effect" in line
    lab = load_config(layout.hospital.config_path).peer("lab")
    assert lab is not None and lab.policy.key_transport == "rsaes-oaep-sha256"


OAEP = "2a864886f70d010107"
# key transport -> its KeyEncryptionAlgorithmIdentifier, DER (hex)
SENT_IDENTIFIERS = {
    # sha256 and mgf1-sha256 given explicitly (they are not the defaults)
    "rsaes-oaep-sha256": f"303c0609{OAEP}302f"
    "a00f300d0609608648016503040201" + "0500"
    "a11c301a06092a864886f70d010108300d0609608648016503040201" + "0500",
    # all parameters at their defaults: RSAES-OAEP-params present, an empty SEQUENCE
    # (RFC 4055 4.1); openssl refuses the identifier without it
    "rsaes-oaep-sha1": f"300d0609{OAEP}3000",
    # rsaEncryption, NULL parameters (RFC 3370 4.2.1)
    "rsaes-pkcs1-v1_5": "300d06092a864886f70d0101010500",
}


@pytest.fixture(scope="module")
def rsa_recipient(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    directory = tmp_path_factory.mktemp("rsa")
    key, cert = self_signed(
        directory / "enc.key", directory / "enc.crt", "/CN=recipient.medgw.test"
    )
    return cert, key


@pytest.mark.parametrize("cipher", ["aes-256-cbc", "aes-256-gcm"])
@pytest.mark.parametrize("key_transport", list(SENT_IDENTIFIERS))
def test_what_we_send_with_each_key_transport_opens_with_openssl_and_reads_back(
    rsa_recipient: tuple[Path, Path], tmp_path: Path, key_transport: str, cipher: str
) -> None:
    cert_path, key_path = rsa_recipient
    cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
    key = serialization.load_pem_private_key(key_path.read_bytes(), None)
    assert isinstance(key, rsa.RSAPrivateKey)
    payload = b"MSH|^~\\&|KITA-LIS|KITA-LAB\rPID|1||DEMO-0001\r" * 20
    der = encrypt(
        payload, [cert], cipher=cipher, policy=AlgorithmPolicy(key_transport=key_transport)
    )
    assert bytes.fromhex(SENT_IDENTIFIERS[key_transport]) in der
    envelope = tmp_path / "env.der"
    envelope.write_bytes(der)
    opened = subprocess.run(
        [
            *("openssl", "cms", "-decrypt", "-binary", "-inform", "DER", "-in", str(envelope)),
            *("-recip", str(cert_path), "-inkey", str(key_path)),
        ],
        capture_output=True,
        check=False,
    )
    assert opened.returncode == 0, opened.stderr.decode()
    assert opened.stdout == payload
    # our own reading: the name the audit trail uses, and a monitored-list one only
    # from a peer whose accept_legacy names it
    inbound = {"rsaes-oaep-sha256": "rsaes-oaep"}.get(key_transport, key_transport)
    legacy = frozenset() if inbound == "rsaes-oaep" else frozenset({inbound})
    back = decrypt(der, cert, key, policy=AlgorithmPolicy(accept_legacy=legacy))
    assert (back.content, back.key_transport) == (payload, inbound)


def test_pyas2lib_decrypts_rsaes_oaep_sha1_and_pkcs1_v15_but_not_oaep_sha256(
    rsa_recipient: tuple[Path, Path],
) -> None:
    """Why the choice exists: pyas2lib (oscrypto) unwraps the key with RSAES-OAEP-SHA-1 or
    RSAES-PKCS1-v1_5 only."""
    from pyas2lib.cms import decrypt_message  # type: ignore[import-untyped]

    cert_path, key_path = rsa_recipient
    cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
    org = as2.Organization(as2_name="X", decrypt_key=key_path.read_bytes() + cert_path.read_bytes())
    payload = b"OBX|1|NM|K^Potassium||4.1|mmol/L\r"
    for key_transport in SENT_IDENTIFIERS:
        der = encrypt(
            payload,
            [cert],
            cipher="aes-256-cbc",
            policy=AlgorithmPolicy(key_transport=key_transport),
        )
        if key_transport == "rsaes-oaep-sha256":
            with pytest.raises(Exception, match="decryption key"):
                decrypt_message(der, org.decrypt_key)
        else:
            assert decrypt_message(der, org.decrypt_key)[1] == payload, key_transport


def test_an_oaep_identifier_without_parameters_is_refused_naming_rfc_4055(
    rsa_recipient: tuple[Path, Path], tmp_path: Path
) -> None:
    """pyas2lib writes RSAES-OAEP without its parameters: openssl cannot open that, and
    medgw says which rule it breaks instead of guessing the hash (or a vague parse error)."""
    cert_path, key_path = rsa_recipient
    cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
    key = serialization.load_pem_private_key(key_path.read_bytes(), None)
    assert isinstance(key, rsa.RSAPrivateKey)
    good = encrypt(
        b"x", [cert], cipher="aes-256-cbc", policy=AlgorithmPolicy(key_transport="rsaes-oaep-sha1")
    )
    info = cms.ContentInfo.load(good)
    ktri = info["content"]["recipient_infos"][0].chosen
    ktri["key_encryption_algorithm"] = cms.KeyEncryptionAlgorithm({"algorithm": "rsaes_oaep"})
    bad = info.dump(force=True)
    assert bytes.fromhex(f"300b0609{OAEP}") in bad
    envelope = tmp_path / "env.der"
    envelope.write_bytes(bad)
    opened = subprocess.run(
        [
            *("openssl", "cms", "-decrypt", "-binary", "-inform", "DER", "-in", str(envelope)),
            *("-recip", str(cert_path), "-inkey", str(key_path)),
        ],
        capture_output=True,
        check=False,
    )
    assert opened.returncode != 0
    everything = AlgorithmPolicy(accept_legacy=frozenset(LEGACY_ALGORITHMS))
    with pytest.raises(MalformedMessageError, match="RFC 4055") as refused:
        decrypt(bad, cert, key, policy=everything)
    assert refused.value.fix is not None and "rsa_oaep_md:sha256" in refused.value.fix
    shown = medgw("smime", "inspect", str(envelope))
    assert shown.returncode == 0, shown.stderr
    assert "rsaes-oaep (no parameters) [refused: RFC 4055" in shown.stdout
