"""The demo PKI generator, the certificate helpers and the example configuration.

Real files, real ``openssl verify``, and ``load_config`` as the judge of what
the generated and example TOML files may contain.
"""

from __future__ import annotations

import os
import re
import shutil
import ssl
import stat
import subprocess
import tomllib
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from gateway.config import load_config
from gateway.errors import ConfigError
from gateway.pki.demo import MARKER, DemoFolderError, DemoLayout, init_demo
from gateway.pki.issue import issue, make_ca, new_key, write_pem
from tests.helpers.openssl_keys import P256, self_signed

REPO = Path(__file__).resolve().parent.parent
EXAMPLE_GATEWAY = REPO / "config" / "gateway.toml"
EXAMPLE_PEER = REPO / "config" / "peers.d" / "example-lab.toml"
PROBE = "medgw_probe_unknown_key"

NOW = datetime.now(UTC).replace(microsecond=0)


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> DemoLayout:
    """One demo for the read-only tests (tests that modify it make their own)."""
    return init_demo(tmp_path_factory.mktemp("demo") / "demo", now=NOW)


def _load_cert(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


def _openssl_verify(ca: Path, cert: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["openssl", "verify", "-x509_strict", "-CAfile", str(ca), *args, str(cert)],
        capture_output=True,
        text=True,
        check=False,
    )


# --- init_demo ------------------------------------------------------------------------


def test_layout_and_files(demo: DemoLayout) -> None:
    root = demo.root
    assert (root / MARKER).is_file()
    assert demo.ca_certificate == root / "ca" / "ca.crt"
    assert (root / "ca" / "ca.key").is_file()
    for me, other in ((demo.hospital, demo.lab), (demo.lab, demo.hospital)):
        base = root / me.name
        assert me.config_path == base / "gateway.toml"
        assert me.root == base
        for role in ("tls", "sign", "encrypt"):
            assert (base / "certs" / f"{role}.crt").is_file()
            assert (base / "certs" / f"{role}.key").is_file()
            # the peer copy is byte-identical to the other side's own certificate
            copy = base / "certs" / "peers" / other.name / f"{role}.crt"
            assert copy.read_bytes() == (root / other.name / "certs" / f"{role}.crt").read_bytes()
        assert (
            base / "certs" / "trust" / "loopback.crt"
        ).read_bytes() == demo.ca_certificate.read_bytes()
        assert (base / "peers.d" / f"{other.name}.toml").is_file()
        for folder in ("inbox", "state", "audit", "outbox", f"outbox/{other.name}"):
            assert (base / folder).is_dir()
            assert not any((base / folder).iterdir()) or folder == "outbox"
        assert me.outbox_for(other) == base / "outbox" / other.name
        assert me.outbox_for(other).is_dir()
    assert (demo.hospital.name, demo.hospital.as2_id) == ("hospital", "SAKURA-HOSPITAL")
    assert (demo.lab.name, demo.lab.as2_id) == ("lab", "KITA-LAB")
    assert (demo.hospital.port, demo.lab.port) == (18443, 18444)


def test_load_config_accepts_both_institutions(demo: DemoLayout) -> None:
    hospital = load_config(demo.hospital.config_path)
    lab = load_config(demo.lab.config_path)
    assert hospital.warnings == () and lab.warnings == ()

    assert hospital.name == "Sakura General Hospital"
    assert hospital.as2_id == "SAKURA-HOSPITAL"
    assert hospital.institution_id.startswith("JP-")
    assert lab.name == "Kita Clinical Laboratory"
    assert lab.as2_id == "KITA-LAB"

    for config, me, other in ((hospital, demo.hospital, demo.lab), (lab, demo.lab, demo.hospital)):
        (listener,) = config.listeners
        assert (listener.address, listener.port, listener.path) == ("127.0.0.1", me.port, "/as2")
        (zone,) = config.zones
        assert (zone.name, zone.kind, zone.min_version) == ("loopback", "closed-network", "1.3")
        assert zone.source_address == "127.0.0.1"
        assert listener.zone == zone.name
        assert config.storage.outbox_dir == me.outbox_dir
        assert config.storage.inbox_dir == me.inbox_dir
        assert config.storage.audit_log == me.audit_log
        assert config.storage.state_dir == me.root / "state"
        assert config.runtime.outbox_poll_seconds == 0.2
        assert config.runtime.retry_initial_seconds == 1
        assert config.runtime.retry_max_seconds == 5
        assert config.runtime.shutdown_deadline_seconds == 10
        (peer,) = config.peers
        assert peer.name == other.name
        assert peer.as2_id == other.as2_id
        assert peer.url == f"https://127.0.0.1:{other.port}/as2"
        assert not peer.accept_legacy
        # what we trust for the peer is exactly what the peer presents
        other_config = load_config(other.config_path)
        assert peer.tls_certificates == (other_config.tls.identity.certificate,)
        assert peer.signing_certificates == (other_config.smime.signing.certificate,)
        assert peer.encryption_certificates == (other_config.smime.encryption.certificate,)
        assert peer.zone == zone.name
        assert zone.trust_anchors == (_load_cert(demo.ca_certificate),)


def test_generated_toml_uses_relative_paths(demo: DemoLayout, tmp_path: Path) -> None:
    """The institution folder is self-contained: it still loads after a move."""
    moved = tmp_path / "elsewhere"
    shutil.copytree(demo.root / "hospital", moved)
    config = load_config(moved / "gateway.toml")
    assert config.tls.identity.key_path == moved / "certs" / "tls.key"
    assert config.peers[0].name == "lab"
    text = (moved / "gateway.toml").read_text() + (moved / "peers.d" / "lab.toml").read_text()
    assert str(demo.root) not in text


def test_openssl_verify_purposes(demo: DemoLayout) -> None:
    ca = demo.ca_certificate
    for inst in (demo.hospital, demo.lab):
        certs = inst.root / "certs"
        accepted = [
            (certs / "tls.crt", "sslserver"),
            (certs / "tls.crt", "sslclient"),
            (certs / "sign.crt", "smimesign"),
            # OpenSSL's "smimeencrypt" purpose demands keyEncipherment, which is
            # wrong for an ECDH key (RFC 5480: keyAgreement); the RSA variant is
            # checked with that purpose in test_demo_with_other_key_kinds.
            (certs / "encrypt.crt", "any"),
        ]
        for cert, purpose in accepted:
            result = _openssl_verify(ca, cert, "-purpose", purpose)
            assert result.returncode == 0, (cert, purpose, result.stdout, result.stderr)
            assert result.stdout.strip().endswith(": OK")
        refused = [
            (certs / "sign.crt", "sslserver"),
            (certs / "sign.crt", "sslclient"),
            (certs / "encrypt.crt", "sslclient"),
            (certs / "tls.crt", "smimesign"),
        ]
        for cert, purpose in refused:
            result = _openssl_verify(ca, cert, "-purpose", purpose)
            assert result.returncode != 0, (cert, purpose, "unexpectedly accepted")
        # the TLS certificate names the address the peer connects to
        for check in (["-verify_ip", "127.0.0.1"], ["-verify_hostname", "localhost"]):
            result = _openssl_verify(ca, certs / "tls.crt", "-purpose", "sslserver", *check)
            assert result.returncode == 0, (check, result.stderr)
        result = _openssl_verify(ca, certs / "tls.crt", "-verify_hostname", "example.org")
        assert result.returncode != 0


def test_keys_are_private(demo: DemoLayout) -> None:
    keys = sorted(demo.root.rglob("*.key"))
    assert len(keys) == 1 + 2 * 3
    for key in keys:
        assert stat.S_IMODE(key.stat().st_mode) == 0o600, key
        assert key.read_text().startswith("-----BEGIN PRIVATE KEY-----")  # PKCS#8, unencrypted
    # no private key material anywhere but in *.key files
    for path in demo.root.rglob("*"):
        if path.is_file() and path.suffix != ".key":
            assert b"PRIVATE KEY" not in path.read_bytes(), path


def test_certificates_carry_the_right_usages(demo: DemoLayout) -> None:
    ca = _load_cert(demo.ca_certificate)
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    ca_ku = ca.extensions.get_extension_for_class(x509.KeyUsage).value
    assert ca_ku.key_cert_sign and ca_ku.crl_sign
    for inst in (demo.hospital, demo.lab):
        certs = inst.root / "certs"
        tls = _load_cert(certs / "tls.crt")
        sign = _load_cert(certs / "sign.crt")
        encrypt = _load_cert(certs / "encrypt.crt")
        for cert in (tls, sign, encrypt):
            assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == inst.as2_id
            assert cert.issuer == ca.subject
            _assert_leaf_basics(cert, ca)
        _assert_usage(tls, {"digital_signature"}, {"SERVER_AUTH", "CLIENT_AUTH"})
        san = tls.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        assert san.get_values_for_type(x509.DNSName) == ["localhost"]
        assert [str(ip) for ip in san.get_values_for_type(x509.IPAddress)] == ["127.0.0.1"]
        _assert_usage(sign, {"digital_signature", "content_commitment"}, {"EMAIL_PROTECTION"})
        _assert_usage(encrypt, {"key_agreement"}, {"EMAIL_PROTECTION"})


def test_stdlib_ssl_accepts_the_tls_identities(demo: DemoLayout) -> None:
    for inst in (demo.hospital, demo.lab):
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(inst.root / "certs" / "tls.crt", inst.root / "certs" / "tls.key")
        context.load_verify_locations(cafile=inst.root / "certs" / "trust" / "loopback.crt")


def test_init_demo_twice_recreates_cleanly(tmp_path: Path) -> None:
    target = tmp_path / "demo"
    first = init_demo(target, now=NOW)
    old_cert = (target / "hospital" / "certs" / "tls.crt").read_bytes()
    stale = first.hospital.inbox_dir / "received.xml"
    stale.write_text("<old/>")
    (first.lab.root / "state" / "spool.sqlite").write_bytes(b"old state")

    second = init_demo(target, now=NOW, hospital_port=28443, lab_port=28444)
    assert not stale.exists()
    assert not (second.lab.root / "state" / "spool.sqlite").exists()
    assert (target / "hospital" / "certs" / "tls.crt").read_bytes() != old_cert
    hospital = load_config(second.hospital.config_path)
    assert hospital.listeners[0].port == 28443
    assert hospital.peers[0].url == "https://127.0.0.1:28444/as2"
    assert load_config(second.lab.config_path).peers[0].name == "hospital"
    assert not list(target.rglob("*.tmp"))


def test_empty_existing_folder_is_used(tmp_path: Path) -> None:
    target = tmp_path / "empty"
    target.mkdir()
    layout = init_demo(target, now=NOW)
    assert load_config(layout.lab.config_path).as2_id == "KITA-LAB"


def test_foreign_folder_is_refused_and_untouched(tmp_path: Path) -> None:
    target = tmp_path / "admin-folder"
    (target / "hospital").mkdir(parents=True)
    precious = target / "hospital" / "gateway.toml"
    precious.write_text("# the admin's real configuration\n")
    with pytest.raises(DemoFolderError) as info:
        init_demo(target, now=NOW)
    assert "not empty" in str(info.value) and MARKER in str(info.value)
    assert info.value.fix
    assert precious.read_text() == "# the admin's real configuration\n"
    assert sorted(p.name for p in target.rglob("*")) == ["gateway.toml", "hospital"]

    a_file = tmp_path / "a-file"
    a_file.write_text("x")
    with pytest.raises(DemoFolderError):
        init_demo(a_file, now=NOW)
    assert a_file.read_text() == "x"


def test_init_demo_rejects_bad_ports(tmp_path: Path) -> None:
    with pytest.raises(ValueError):
        init_demo(tmp_path / "d", now=NOW, hospital_port=18443, lab_port=18443)
    with pytest.raises(ValueError):
        init_demo(tmp_path / "d", now=NOW, lab_port=70000)
    assert not (tmp_path / "d").exists()


@pytest.mark.parametrize("key_kind", ["ec-p384", "rsa-3072"])
def test_demo_with_other_key_kinds(tmp_path: Path, key_kind: str) -> None:
    layout = init_demo(tmp_path / "demo", now=NOW, key_kind=key_kind)
    config = load_config(layout.hospital.config_path)
    assert config.warnings == ()
    encrypt = _load_cert(layout.hospital.root / "certs" / "encrypt.crt")
    if key_kind == "rsa-3072":
        assert isinstance(encrypt.public_key(), rsa.RSAPublicKey)
        _assert_usage(encrypt, {"key_encipherment"}, {"EMAIL_PROTECTION"})
        tls = _load_cert(layout.hospital.root / "certs" / "tls.crt")
        _assert_usage(
            tls, {"digital_signature", "key_encipherment"}, {"SERVER_AUTH", "CLIENT_AUTH"}
        )
    else:
        assert isinstance(encrypt.signature_hash_algorithm, hashes.SHA384)
        assert config.smime.digest == "sha384"
    checks = [("tls.crt", "sslclient"), ("tls.crt", "sslserver"), ("sign.crt", "smimesign")]
    if key_kind == "rsa-3072":
        checks.append(("encrypt.crt", "smimeencrypt"))
    for name, purpose in checks:
        cert = layout.lab.root / "certs" / name
        result = _openssl_verify(layout.ca_certificate, cert, "-purpose", purpose)
        assert result.returncode == 0, (name, purpose, result.stderr)


# --- gateway.pki.issue ------------------------------------------------------------------


def test_new_key_kinds() -> None:
    p256 = new_key()
    assert isinstance(p256, ec.EllipticCurvePrivateKey) and p256.curve.name == "secp256r1"
    p384 = new_key("ec-p384")
    assert isinstance(p384, ec.EllipticCurvePrivateKey) and p384.curve.name == "secp384r1"
    rsa2048 = new_key("rsa-2048")
    assert isinstance(rsa2048, rsa.RSAPrivateKey) and rsa2048.key_size == 2048
    with pytest.raises(ValueError, match="unknown key kind"):
        new_key("dsa-1024")


def test_intermediate_chain_verifies(tmp_path: Path) -> None:
    root = make_ca("Root", now=NOW, key_kind="ec-p384", organization="Test PKI")
    inter = make_ca("Issuing CA", now=NOW, parent=root, path_length=0)
    leaf = issue(inter, "leaf", purpose="tls", now=NOW, dns_names=["gw.example"])

    assert inter.certificate.issuer == root.certificate.subject
    assert isinstance(inter.certificate.signature_hash_algorithm, hashes.SHA384)  # P-384 issuer
    assert isinstance(leaf.certificate.signature_hash_algorithm, hashes.SHA256)
    bc = inter.certificate.extensions.get_extension_for_class(x509.BasicConstraints)
    assert bc.critical and bc.value.ca and bc.value.path_length == 0
    _assert_leaf_basics(leaf.certificate, inter.certificate)
    root_aki = root.certificate.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier)
    root_ski = root.certificate.extensions.get_extension_for_class(x509.SubjectKeyIdentifier)
    assert root_aki.value.key_identifier == root_ski.value.digest

    write_pem(tmp_path / "root.crt", root.certificate)
    write_pem(tmp_path / "inter.crt", inter.certificate)
    write_pem(tmp_path / "leaf.crt", leaf.certificate)
    result = _openssl_verify(
        tmp_path / "root.crt",
        tmp_path / "leaf.crt",
        "-untrusted",
        str(tmp_path / "inter.crt"),
        "-purpose",
        "sslserver",
    )
    assert result.returncode == 0, result.stderr

    # path length 0 forbids a further CA below the intermediate
    sub = make_ca("Sub CA", now=NOW, parent=inter)
    deep = issue(sub, "deep", purpose="smime-sign", now=NOW)
    write_pem(tmp_path / "chain.crt", [inter.certificate, sub.certificate])
    write_pem(tmp_path / "deep.crt", deep.certificate)
    result = _openssl_verify(
        tmp_path / "root.crt", tmp_path / "deep.crt", "-untrusted", str(tmp_path / "chain.crt")
    )
    assert result.returncode != 0
    assert "path length" in (result.stdout + result.stderr).lower()


def test_validity_window_and_expired_leaf(tmp_path: Path) -> None:
    ca = make_ca("CA", now=NOW - timedelta(days=10))
    expired = issue(ca, "old", purpose="smime-sign", now=NOW - timedelta(days=10), days=2)
    assert expired.certificate.not_valid_before_utc == NOW - timedelta(days=10)
    assert expired.certificate.not_valid_after_utc == NOW - timedelta(days=8)
    write_pem(tmp_path / "ca.crt", ca.certificate)
    write_pem(tmp_path / "old.crt", expired.certificate)
    result = _openssl_verify(tmp_path / "ca.crt", tmp_path / "old.crt")
    assert result.returncode != 0 and "expired" in (result.stdout + result.stderr)


def test_issue_rejects_bad_input() -> None:
    ca = make_ca("CA", now=NOW)
    with pytest.raises(ValueError, match="purpose"):
        issue(ca, "x", purpose="code-signing", now=NOW)
    with pytest.raises(ValueError, match="timezone"):
        issue(ca, "x", purpose="tls", now=datetime(2026, 1, 1))
    with pytest.raises(ValueError):
        make_ca("CA", now=NOW, days=0)


def test_rsa_usages_and_organization() -> None:
    ca = make_ca("CA", now=NOW, key_kind="rsa-2048")
    tls = issue(ca, "t", purpose="tls", now=NOW, key_kind="rsa-2048", organization="Org")
    enc = issue(ca, "e", purpose="smime-encrypt", now=NOW, key_kind="rsa-2048")
    sign = issue(ca, "s", purpose="smime-sign", now=NOW, key_kind="rsa-2048")
    _assert_usage(
        tls.certificate, {"digital_signature", "key_encipherment"}, {"SERVER_AUTH", "CLIENT_AUTH"}
    )
    _assert_usage(enc.certificate, {"key_encipherment"}, {"EMAIL_PROTECTION"})
    _assert_usage(
        sign.certificate, {"digital_signature", "content_commitment"}, {"EMAIL_PROTECTION"}
    )
    assert tls.certificate.subject.rfc4514_string() == "CN=t,O=Org"
    # no SAN unless asked for
    with pytest.raises(x509.ExtensionNotFound):
        enc.certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName)


def test_write_pem_is_atomic_and_private(tmp_path: Path) -> None:
    key = new_key()
    path = tmp_path / "k.key"
    path.write_text("old, world-readable")
    path.chmod(0o644)
    old_umask = os.umask(0)
    try:
        write_pem(path, key)
    finally:
        os.umask(old_umask)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert path.read_text().startswith("-----BEGIN PRIVATE KEY-----")
    assert [p.name for p in tmp_path.iterdir()] == ["k.key"]

    ca = make_ca("CA", now=NOW)
    write_pem(tmp_path / "c.crt", ca.certificate)
    assert _load_cert(tmp_path / "c.crt") == ca.certificate
    with pytest.raises(FileNotFoundError):
        write_pem(tmp_path / "missing-dir" / "x.crt", ca.certificate)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.crt", "k.key"]


# --- config/ examples and schema coverage ---------------------------------------------------


def _enable_optional(text: str) -> str:
    """The example with its optional, commented-out settings (``#key = ...``) enabled."""
    return re.sub(r"(?m)^#(?=\[|[a-z_0-9]+ = )", "", text)


@pytest.mark.parametrize("optional", [False, True], ids=["as-shipped", "optional-enabled"])
def test_examples_are_complete_and_loadable(
    demo: DemoLayout, tmp_path: Path, optional: bool
) -> None:
    """Put the demo certificates where the examples expect them; load_config must accept it,
    as shipped and with every optional table enabled."""
    fake = tmp_path / "fs"
    prefixes = (
        "/etc/medgw",
        "/var/lib/medgw",
        "/var/log/medgw",
        "/run/medgw",
        "/usr/lib/postgresql",
    )

    def relocate(text: str) -> str:
        if optional:
            text = _enable_optional(text)
        for prefix in prefixes:
            text = text.replace(f'"{prefix}', f'"{fake}{prefix}')
        return text

    etc = fake / "etc" / "medgw"
    (etc / "peers.d").mkdir(parents=True)
    gateway_toml = etc / "gateway.toml"
    gateway_toml.write_text(relocate(EXAMPLE_GATEWAY.read_text()))
    peer_toml = etc / "peers.d" / EXAMPLE_PEER.name
    peer_toml.write_text(relocate(EXAMPLE_PEER.read_text()))

    gw = tomllib.loads(gateway_toml.read_text())
    peer = tomllib.loads(peer_toml.read_text())
    url_paths = {listener["path"] for listener in gw["listeners"]}
    for value in _string_values(gw) + _string_values(peer):
        if value not in url_paths:
            assert not value.startswith("/") or value.startswith(str(fake)), value

    own = demo.hospital.root / "certs"
    lab = demo.lab.root / "certs"
    copies = {
        gw["tls"]["certificate"]: own / "tls.crt",
        gw["tls"]["key"]: own / "tls.key",
        gw["smime"]["signing_certificate"]: own / "sign.crt",
        gw["smime"]["signing_key"]: own / "sign.key",
        gw["smime"]["encryption_certificate"]: own / "encrypt.crt",
        gw["smime"]["encryption_key"]: own / "encrypt.key",
        **{k["certificate"]: own / "encrypt.crt" for k in gw["smime"].get("decryption_keys", [])},
        **{k["key"]: own / "encrypt.key" for k in gw["smime"].get("decryption_keys", [])},
        **{a: demo.ca_certificate for zone in gw["zones"] for a in zone["trust_anchors"]},
        **{p: lab / "tls.crt" for p in peer["tls_certificates"]},
        **{p: lab / "sign.crt" for p in peer["signing_certificates"]},
        **{p: lab / "encrypt.crt" for p in peer["encryption_certificates"]},
    }
    export = gw.get("audit", {}).get("export")
    if export is not None:  # the collector's CA and our client certificate for it
        copies[export["ca"]] = demo.ca_certificate
        copies[export["certificate"]] = own / "tls.crt"
        copies[export["key"]] = own / "tls.key"
    if "backup" in gw:  # the certificate backups are encrypted to
        copies[gw["backup"]["recipient"]] = own / "encrypt.crt"
    spool = gw.get("spool", {})
    if "ca_file" in spool:  # the database server's CA (any CA certificate will load)
        copies[spool["ca_file"]] = demo.ca_certificate
    for destination, source in copies.items():
        Path(destination).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(source, destination)
    if "password_file" in spool:  # the database password, private as the example says
        password = Path(spool["password_file"])
        password.write_text("example\n")
        password.chmod(0o600)
    if "backup" in gw:  # backups' own signing key pair, made as README (Backups) says
        backup = gw["backup"]
        key, cert = Path(backup["signing_key"]), Path(backup["signing_certificate"])
        self_signed(key, cert, "/CN=medgw backup signer", P256, days=3650)
        for earlier in backup.get("trusted_signers", []):
            shutil.copy2(cert, earlier)
    if "audit" in gw:  # the audit checkpoint key, made as the example's comment says
        key, cert = Path(gw["audit"]["signing_key"]), Path(gw["audit"]["certificate"])
        key.parent.mkdir(parents=True, exist_ok=True)
        subprocess.run(
            ["openssl", "ecparam", "-name", "prime256v1", "-genkey", "-noout", "-out", str(key)],
            check=True,
        )
        key.chmod(0o600)
        subprocess.run(
            [
                "openssl",
                "req",
                "-new",
                "-x509",
                "-key",
                str(key),
                "-sha256",
                "-days",
                "30",
                "-subj",
                "/CN=medgw audit",
                "-out",
                str(cert),
            ],
            check=True,
            capture_output=True,
        )
    if "maintenance" in gw:  # the SSH host key, made as the example's comment says
        host_key = etc / gw["maintenance"]["host_key"]
        subprocess.run(
            ["ssh-keygen", "-q", "-t", "ecdsa", "-b", "384", "-N", "", "-f", str(host_key)],
            check=True,
        )
        folder = etc / gw["maintenance"]["maintainers_dir"]
        folder.mkdir(mode=0o700)
        shutil.copy2(EXAMPLE_GATEWAY.parent / "maintainers.d" / "example.toml", folder)
        (folder / "example.toml").chmod(0o600)
    for zone in gw["zones"]:  # the examples name CRL folders
        for folder in zone.get("crls", []):
            Path(folder).mkdir(parents=True, exist_ok=True)
            shutil.copy2(own / "crls" / "loopback" / "ca.crl", Path(folder) / "ca.crl")

    config = load_config(gateway_toml)
    assert config.warnings == ()
    assert [p.name for p in config.peers] == ["example-lab"]
    assert config.storage.state_dir == fake / "var" / "lib" / "medgw"
    assert config.storage.audit_log.parent == fake / "var" / "log" / "medgw"
    # the example's [runtime] values are the documented defaults
    defaults = _runtime_defaults(tmp_path / "defaults", demo)
    assert config.runtime == defaults

    if optional:
        _assert_every_key_present(gateway_toml, gateway_toml)
        _assert_every_key_present(gateway_toml, peer_toml)
    else:  # as shipped: one zone, one listener, no rotation key, API or hand-over
        assert [z.name for z in config.zones] == ["regional-vpn"]
        assert config.api is None and config.delivery is None
        assert len(config.listeners) == 1


def test_demo_toml_has_every_key(demo: DemoLayout, tmp_path: Path) -> None:
    copy = tmp_path / "hospital"
    shutil.copytree(demo.hospital.root, copy)
    # [[smime.decryption_keys]] exists only during a key rotation; the example shows it.
    _assert_every_key_present(
        copy / "gateway.toml", copy / "gateway.toml", rotation_only={"decryption_keys"}
    )
    _assert_every_key_present(copy / "gateway.toml", copy / "peers.d" / "lab.toml")


def test_examples_comment_every_key() -> None:
    for path in (EXAMPLE_GATEWAY, EXAMPLE_PEER):
        previous = ""
        for number, line in enumerate(path.read_text().splitlines(), 1):
            if re.match(r"^#?[a-z_0-9]+ = ", line):
                assert previous.startswith("#") or re.match(r"^[a-z_0-9]+ = ", previous), (
                    f"{path.name}:{number}: key without an explanatory comment above it"
                )
            previous = line


# --- helpers ------------------------------------------------------------------------------


def _assert_leaf_basics(cert: x509.Certificate, issuer: x509.Certificate) -> None:
    bc = cert.extensions.get_extension_for_class(x509.BasicConstraints)
    assert bc.critical and not bc.value.ca
    assert cert.extensions.get_extension_for_class(x509.KeyUsage).critical
    aki = cert.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier).value
    ski = issuer.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    assert aki.key_identifier == ski.digest
    assert cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier)


_USAGES = (
    "digital_signature",
    "content_commitment",
    "key_encipherment",
    "data_encipherment",
    "key_agreement",
    "key_cert_sign",
    "crl_sign",
)


def _assert_usage(cert: x509.Certificate, usages: set[str], ekus: set[str]) -> None:
    ku = cert.extensions.get_extension_for_class(x509.KeyUsage).value
    assert {name for name in _USAGES if getattr(ku, name)} == usages
    eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert set(eku) == {getattr(ExtendedKeyUsageOID, name) for name in ekus}


def _string_values(data: Any) -> list[str]:
    if isinstance(data, str):
        return [data]
    if isinstance(data, dict):
        return [s for v in data.values() for s in _string_values(v)]
    if isinstance(data, list):
        return [s for v in data for s in _string_values(v)]
    return []


def _runtime_defaults(folder: Path, demo: DemoLayout) -> Any:
    """The Runtime load_config builds when [runtime] is absent."""
    shutil.copytree(demo.hospital.root, folder)
    path = folder / "gateway.toml"
    text = path.read_text()
    path.write_text(text[: text.index("[runtime]")])
    return load_config(path).runtime


def _assert_every_key_present(
    gateway_toml: Path, file: Path, rotation_only: set[str] | None = None
) -> None:
    """Every key load_config knows, in every table, is spelt out in ``file``.

    load_config names the known keys of a table when it meets an unknown one, so
    an unknown probe key in each table makes it list the schema for us.
    """
    original = file.read_text()
    lines = original.splitlines()
    probed = [f"{PROBE} = 1"]
    tables = {"": tomllib.loads(original)}
    array_index: dict[str, int] = {}
    for line in lines:
        probed.append(line)
        header = re.match(r"^\[\[?([a-z_.]+)\]\]?\s*$", line)
        if header:
            probed.append(f"{PROBE} = 1")
            name = header.group(1)
            parent, _, leaf = name.rpartition(".")  # [[api.clients]] is a table in [api]
            container = tables[parent] if parent else tables[""]
            if line.startswith("[["):
                index = array_index[name] = array_index.get(name, -1) + 1
                tables[f"{name}[{index}]"] = container[leaf][index]
            else:
                tables[name] = container[leaf]
    file.write_text("\n".join(probed) + "\n")
    try:
        with pytest.raises(ConfigError) as info:
            load_config(gateway_toml)
    finally:
        file.write_text(original)
    found: dict[str, set[str]] = {}
    for problem in info.value.problems:
        if problem.file != str(file) or not problem.key.endswith(PROBE):
            continue
        assert problem.message == "unknown key"
        table = problem.key[: -len(PROBE)].rstrip(".")
        found[table] = set(problem.fix.split("known keys: ", 1)[1].split(", "))
    assert set(found) == set(tables), f"probe not reported for every table in {file.name}"
    for table, known in found.items():
        present = set(tables[table]) - {PROBE}
        known -= (rotation_only or set()) - present
        assert present == known, f"{file.name} [{table or 'top level'}]: missing {known - present}"


# --- `medgw pki init-demo` on the command line --------------------------------------------


def test_init_demo_picks_free_ports_and_prints_the_next_steps(tmp_path: Path) -> None:
    from tests.cli import medgw

    result = medgw("pki", "init-demo", str(tmp_path / "d"), "--key-type", "rsa-2048")
    assert result.returncode == 0, result.stderr
    ports = [int(p) for p in re.findall(r"listens on 127\.0\.0\.1:(\d+)", result.stdout)]
    assert len(ports) == 2 and ports[0] != ports[1]
    for step in ("medgw check-config --config", "medgw run --config", "medgw send --config"):
        assert step in result.stdout
    key = (tmp_path / "d" / "hospital" / "certs" / "sign.crt").read_bytes()
    assert isinstance(x509.load_pem_x509_certificate(key).public_key(), rsa.RSAPublicKey)
    load_config(tmp_path / "d" / "hospital" / "gateway.toml")  # valid as written


def test_init_demo_refuses_a_port_in_use(tmp_path: Path) -> None:
    import socket

    from tests.cli import medgw

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = medgw("pki", "init-demo", str(tmp_path / "d"), "--lab-port", str(port))
    assert result.returncode == 1
    assert f"--lab-port {port}: the port is in use" in result.stderr and "fix:" in result.stderr
    assert not (tmp_path / "d").exists()


def test_a_port_handed_out_is_not_handed_out_again_while_its_gateway_may_not_listen_yet() -> None:
    """The kernel offers a just-released port again within a few thousand asks (a test
    that chose its gateway's port, then an API port, had both land on one); the demo's
    and the tests' chooser never gives the same port twice in that span."""
    from gateway.demo_run import free_port, free_ports

    chosen = [free_port() for _ in range(3000)] + free_ports(40)
    assert len(chosen) == len(set(chosen))


def test_ports_for_listeners_are_chosen_outside_the_kernels_range_for_outgoing_ones() -> None:
    """A port chosen now for a listener that starts later must not be one the kernel may
    give meanwhile to an outgoing connection as its local port (a node's connection to
    the spool's database took a node's listening port: "address already in use")."""
    from gateway.demo_run import free_ports, listener_ports, outgoing_port_range

    low, high = outgoing_port_range()
    chosen = free_ports(200)
    assert len(set(chosen)) == 200
    assert not [port for port in chosen if low <= port <= high]
    assert list(listener_ports((32768, 60999))) == list(range(20768, 32768))
    # No room below the range: above it instead, never inside it.
    above = listener_ports((1100, 60999))
    assert above.start == 61000 and above.stop <= 65536


def test_the_kernels_range_is_read_from_its_setting_or_taken_as_linuxs_default(
    tmp_path: Path,
) -> None:
    from gateway.demo_run import outgoing_port_range

    setting = tmp_path / "ip_local_port_range"
    setting.write_text("40000\t50000\n")
    assert outgoing_port_range(setting) == (40000, 50000)
    setting.write_text("garbage")
    assert outgoing_port_range(setting) == (32768, 60999)
    assert outgoing_port_range(tmp_path / "absent") == (32768, 60999)
