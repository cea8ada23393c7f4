"""``[backup]``: whom ``medgw backup`` encrypts its bundles to, and the key it signs them
with (OUT-1; see README, "Backups").

::

    [backup]
    recipient = "/etc/medgw/backup/recipient.crt"         # its private key is kept off this host
    signing_certificate = "/etc/medgw/backup/signing.crt"  # backups' own signing key pair
    signing_key = "/etc/medgw/backup/signing.key"
    trusted_signers = ["/etc/medgw/backup/signing-2025.crt"]  # earlier ones, for restore
    cipher = "aes-256-gcm"                                # a CRYPTREC content cipher
    pg_bin_dir = "/usr/lib/postgresql/16/bin"  # pg_dump, pg_restore (default: on PATH)

The bundle is signed with the backup signing key and encrypted to ``recipient``: a
bundle carried out of the hospital is readable only with that certificate's private
key, which the gateway never holds.  The signing key is for backups alone (not the
``[smime]`` or ``[tls]`` key: a key serves one purpose), and restore accepts a bundle
signed by exactly ``signing_certificate`` or one of ``trusted_signers``.
``pg_bin_dir``: where PostgreSQL's ``pg_dump`` and ``pg_restore`` are, for a spool in
PostgreSQL (default: found on PATH).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from gateway.pki.keypair import KeyPair
from gateway.policy import CONTENT_CIPHERS
from gateway.tomlreader import Reader, Section


@dataclass(frozen=True)
class BackupSettings:
    recipient_path: Path
    recipient: x509.Certificate
    cipher: str
    signing: KeyPair
    trusted_signers: tuple[x509.Certificate, ...] = ()  # earlier signing certificates
    pg_bin_dir: Path | None = None  # pg_dump and pg_restore (None: found on PATH)

    @property
    def restore_signers(self) -> list[x509.Certificate]:
        """Whose signature a restore accepts: this signing certificate, or an earlier one."""
        return [self.signing.certificate, *self.trusted_signers]


def _spki(cert: x509.Certificate) -> bytes:
    return cert.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def load_backup(
    reader: Reader, section: Section, others: Iterable[tuple[str, KeyPair]] = ()
) -> BackupSettings | None:
    """Read ``[backup]``; problems go to ``reader`` (None when it is unusable).  ``others``:
    this gateway's other key pairs by their key names (``smime.signing_key``...), none of
    which may sign backups."""
    path = reader.path(section.string("recipient", example='"/etc/medgw/backup/recipient.crt"'))
    certificates = (
        reader.certificates(section, "recipient", path) if section.has("recipient") else []
    )
    cipher = section.choice("cipher", CONTENT_CIPHERS, default="aes-256-gcm")
    signing = None
    if section.has("signing_certificate") or section.has("signing_key"):
        signing = reader.key_pair(section, "signing_certificate", "signing_key")
    else:
        section.mark_seen("signing_certificate")
        section.mark_seen("signing_key")
        section.problem(
            "signing_key",
            "no key to sign backups with: a backup is signed with a key of its own, never "
            "with the [smime] (AS2) or [tls] key",
            "make one (see README, Backups) and add signing_certificate = "
            '"/etc/medgw/backup/signing.crt" and signing_key = "/etc/medgw/backup/signing.key"',
        )
    trusted: list[x509.Certificate] = []
    for value in section.string_list("trusted_signers", required=False):
        trusted += reader.certificates(section, "trusted_signers", reader.path(value))
    tools = section.string("pg_bin_dir", default="")
    section.finish()
    if signing is not None:
        for name, pair in others:
            if _spki(pair.certificate) == _spki(signing.certificate):
                section.problem(
                    "signing_key",
                    f"{signing.key_path} is also {name}: a backup's signature would be one "
                    "that key makes for its own purpose too",
                    "give backups a key pair of their own (see README, Backups)",
                )
                signing = None
                break
    if len(certificates) != 1:
        if certificates:
            section.problem(
                "recipient",
                f"{path} holds {len(certificates)} certificates; a bundle is encrypted to one",
                "give the backup recipient's certificate alone",
            )
        return None
    reader.check_key_policy(section, "recipient", certificates[0])
    if signing is None:
        return None
    return BackupSettings(
        path,
        certificates[0],
        cipher,
        signing,
        tuple(trusted),
        reader.path(tools) if tools else None,
    )
