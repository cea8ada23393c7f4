"""Backups in tests: the offline recipient, the gateway's backup signer, a fresh host,
a bundle opened with openssl alone, a bundle crafted as medgw backup seals one, and a
bundle holding a hand-over still owed."""

from __future__ import annotations

import base64
import io
import json
import shutil
import subprocess
import tarfile
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, cast

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from gateway.backup.bundle import ENTITY_HEAD, MANIFEST
from gateway.clock import SystemClock
from gateway.cms.stream import sign_and_envelope_file
from gateway.config import load_config
from gateway.pki.demo import DemoInstitution, DemoLayout
from gateway.pki.keypair import PrivateKey
from gateway.policy import AlgorithmPolicy
from gateway.spool import SqliteSpool
from tests.cli import medgw
from tests.helpers.openssl_keys import P256, self_signed


def recipient(folder: Path) -> tuple[Path, Path]:
    """The backup recipient: an RSA-3072 key and self-signed certificate, made with openssl
    (the key is kept off the gateway; only the certificate is configured)."""
    folder.mkdir(parents=True, exist_ok=True)
    return self_signed(
        folder / "recipient.key", folder / "recipient.crt", "/CN=medgw backup recipient"
    )


def backup_signer(config: Path) -> tuple[Path, Path]:
    """The gateway's backup signing key pair (made as README, Backups says), beside its
    other keys: a fresh host given the same /etc/medgw has it too.  Made once, with the
    README's command (ECDSA P-256, self-signed)."""
    key, cert = (
        config.parent / "certs" / "backup-signing.key",
        config.parent / "certs" / "backup-signing.crt",
    )
    if not (key.exists() and cert.exists()):
        subject = "/CN=medgw backup signer, Sakura General Hospital"
        self_signed(key, cert, subject, P256, days=3650)
    return key, cert


def add_backup(config: Path, cert: Path) -> None:
    key, signing = backup_signer(config)
    config.write_text(
        config.read_text()
        + f'\n[backup]\nrecipient = "{cert}"\n'
        + f'signing_certificate = "{signing}"\nsigning_key = "{key}"\n'
    )


def fresh_host(layout: DemoLayout, name: str, side: DemoInstitution | None = None) -> Path:
    """The configuration, keys and certificates of ``side`` (None: the lab) on a new host:
    no state, no audit."""
    old = (side or layout.lab).root
    root = old.with_name(name)
    shutil.copytree(old, root, ignore=shutil.ignore_patterns("state", "audit", "inbox", "outbox"))
    return root / "gateway.toml"


def private_key(path: Path) -> PrivateKey:
    return cast(PrivateKey, serialization.load_pem_private_key(path.read_bytes(), None))


def bundle_content(files: dict[str, bytes], manifest: dict[str, Any]) -> bytes:
    """A bundle's signed content: a tar archive of ``files`` and ``manifest``, base64."""
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name, data in {MANIFEST: json.dumps(manifest).encode(), **files}.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            info.mode = 0o600
            tar.addfile(info, io.BytesIO(data))
    return ENTITY_HEAD + base64.encodebytes(out.getvalue()).replace(b"\n", b"\r\n")


def sealed_bundle(
    entity_content: bytes, dst: Path, config_path: Path, *, signer: tuple[Path, Path] | None = None
) -> Path:
    """``entity_content`` signed (by the gateway's backup signing key, or ``signer``:
    certificate, key) and encrypted to the configured backup recipient, as medgw backup seals."""
    config = load_config(config_path)
    assert config.backup is not None
    entity = dst.with_name(dst.name + ".entity")
    entity.write_bytes(entity_content)
    if signer is None:
        cert, key = config.backup.signing.certificate, config.backup.signing.key
    else:
        cert = x509.load_pem_x509_certificate(signer[0].read_bytes())
        key = private_key(signer[1])
    sign_and_envelope_file(
        entity,
        dst,
        signer_cert=cert,
        signer_key=key,
        recipients=[config.backup.recipient],
        signing_time=datetime.now(UTC),
        policy=AlgorithmPolicy(),
    )
    return dst


def openssl_opens(bundle: Path, key: Path, cert: Path, ca: Path, tmp: Path) -> dict[str, Any]:
    """Decrypt and verify the bundle with openssl alone; the manifest inside."""
    entity, content = tmp / "entity.eml", tmp / "content.bin"
    subprocess.run(
        [
            "openssl",
            "cms",
            "-decrypt",
            "-binary",
            "-inform",
            "DER",
            "-in",
            str(bundle),
            "-recip",
            str(cert),
            "-inkey",
            str(key),
            "-out",
            str(entity),
        ],
        check=True,
        capture_output=True,
    )
    verified = subprocess.run(
        [
            "openssl",
            "cms",
            "-verify",
            "-in",
            str(entity),
            "-inform",
            "SMIME",
            "-CAfile",
            str(ca),
            "-purpose",
            "any",
            "-out",
            str(content),
        ],
        capture_output=True,
        text=True,
    )
    assert verified.returncode == 0, verified.stderr
    assert "Verification successful" in verified.stderr
    data = content.read_bytes()
    assert data.startswith(ENTITY_HEAD)
    (tmp / "tar").write_bytes(base64.b64decode(data[len(ENTITY_HEAD) :]))
    with tarfile.open(tmp / "tar") as tar:
        member = tar.extractfile(MANIFEST)
        assert member is not None
        return dict(json.loads(member.read()))


def owed_handover_backup(layout: DemoLayout, tmp: Path) -> tuple[Path, Path, Path]:
    """A real bundle of the hospital holding a received document whose hand-over is owed
    (so that its spool names an inbox file); (bundle, recipient key, certificate)."""
    key, cert = recipient(tmp / "offline")
    hospital = layout.hospital
    add_backup(hospital.config_path, cert)
    document = hospital.inbox_dir / "lab" / "result.hl7"
    document.parent.mkdir(parents=True, exist_ok=True)
    document.write_bytes(b"MSH|owed to the internal system\r")
    config = load_config(hospital.config_path)
    spool = SqliteSpool(config.storage.spool_path, SystemClock())
    spool.inbound_begin("lab", "<owed@lab>", "00" * 32, document)
    spool.inbound_delivered("lab", "<owed@lab>", [], b"receipt", ("application/hl7-v2", 31))
    spool.close()
    bundle = tmp / "medgw.p7m"
    made = medgw("backup", "--to", bundle, "--config", hospital.config_path)
    assert made.returncode == 0, made.stderr
    return bundle, key, cert
