"""``[smime]``: this gateway's signing and decryption keys, and its default algorithms."""

from __future__ import annotations

from dataclasses import dataclass

from gateway.pki.keypair import KeyPair
from gateway.policy import CONTENT_CIPHERS, DIGESTS
from gateway.tomlreader import Reader, Section


@dataclass(frozen=True)
class SmimeSettings:
    signing: KeyPair
    encryption: KeyPair
    digest: str
    cipher: str
    # Further key pairs that may decrypt incoming messages: during a rotation the
    # new key before peers switch to it, or the old one until nothing is in flight.
    extra_decryption: tuple[KeyPair, ...] = ()

    @property
    def decryption_keys(self) -> tuple[KeyPair, ...]:
        return (self.encryption, *self.extra_decryption)


def load_smime(reader: Reader, root: Section) -> SmimeSettings | None:
    """The ``[smime]`` table; None when a key pair is unusable (a problem says why)."""
    smime_section = root.table("smime")
    signing = reader.key_pair(smime_section, "signing_certificate", "signing_key")
    encryption = reader.key_pair(smime_section, "encryption_certificate", "encryption_key")
    digest = smime_section.choice("digest", DIGESTS, default="sha256")
    cipher = smime_section.choice("cipher", CONTENT_CIPHERS, default="aes-256-gcm")
    extra_decryption: list[KeyPair] = []
    if smime_section.has("decryption_keys"):
        for item in smime_section.tables("decryption_keys"):
            pair = reader.key_pair(item, "certificate", "key")
            item.finish()
            if pair is not None:
                extra_decryption.append(pair)
    else:
        smime_section.mark_seen("decryption_keys")
    smime_section.finish()
    if signing is None or encryption is None:
        return None
    return SmimeSettings(signing, encryption, digest, cipher, tuple(extra_decryption))
