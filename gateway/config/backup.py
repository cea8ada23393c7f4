"""``[backup]``: whom ``medgw backup`` encrypts its bundles to (OUT-1; see README, "Backups").

::

    [backup]
    recipient = "/etc/medgw/backup/recipient.crt"   # its private key is kept off this host
    cipher = "aes-256-gcm"                          # a CRYPTREC content cipher

The bundle is signed with the ``[smime]`` signing key and encrypted to
``recipient``: a bundle carried out of the hospital is readable only with that
certificate's private key, which the gateway never holds.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from cryptography import x509

from gateway.policy import CONTENT_CIPHERS
from gateway.tomlreader import Reader, Section


@dataclass(frozen=True)
class BackupSettings:
    recipient_path: Path
    recipient: x509.Certificate
    cipher: str


def load_backup(reader: Reader, section: Section) -> BackupSettings | None:
    """Read ``[backup]``; problems go to ``reader`` (None when it is unusable)."""
    path = reader.path(section.string("recipient", example='"/etc/medgw/backup/recipient.crt"'))
    certificates = (
        reader.certificates(section, "recipient", path) if section.has("recipient") else []
    )
    cipher = section.choice("cipher", CONTENT_CIPHERS, default="aes-256-gcm")
    section.finish()
    if len(certificates) != 1:
        if certificates:
            section.problem(
                "recipient",
                f"{path} holds {len(certificates)} certificates; a bundle is encrypted to one",
                "give the backup recipient's certificate alone",
            )
        return None
    reader.check_key_policy(section, "recipient", certificates[0])
    return BackupSettings(path, certificates[0], cipher)
