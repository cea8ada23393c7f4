"""Backups in tests: the offline recipient, the gateway's backup signer, a fresh host,
a bundle opened with openssl alone, and a bundle holding a hand-over still owed."""

from __future__ import annotations

import base64
import json
import shutil
import subprocess
import tarfile
from pathlib import Path
from typing import Any

from gateway.backup.bundle import ENTITY_HEAD, MANIFEST
from gateway.clock import SystemClock
from gateway.config import load_config
from gateway.pki.demo import DemoLayout
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


def fresh_host(layout: DemoLayout, name: str) -> Path:
    """The lab's configuration, keys and certificates on a new host: no state, no audit."""
    root = layout.lab.root.with_name(name)
    shutil.copytree(
        layout.lab.root, root, ignore=shutil.ignore_patterns("state", "audit", "inbox", "outbox")
    )
    return root / "gateway.toml"


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
