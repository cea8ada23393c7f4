"""``[gateway]`` and ``[tls]``: who this gateway is, and the TLS identity it shows."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from gateway.pki.keypair import KeyPair
from gateway.tomlreader import Reader, Section

AS2_ID_MAX = 128


@dataclass(frozen=True)
class TlsSettings:
    """Our TLS identity; what we trust, and how, is set per zone (:class:`Zone`)."""

    identity: KeyPair


def check_as2_id(section: Section, key: str, value: str) -> None:
    if not value:
        if section.has(key):  # a missing key is reported as missing already
            section.problem(
                key,
                "AS2 identifier is empty: messages could not be addressed to or from it",
                "choose an identifier such as HOSPITAL-TOKYO-01 (1-128 printable ASCII "
                "characters, no spaces or quotes)",
            )
        return
    if len(value) > AS2_ID_MAX or not all(32 < ord(c) < 127 and c not in '"\\' for c in value):
        section.problem(
            key,
            f"AS2 identifier {value!r} must be 1-{AS2_ID_MAX} printable ASCII characters "
            "without spaces or quotes",
            "choose an identifier such as HOSPITAL-TOKYO-01",
        )


@dataclass(frozen=True)
class Identity:
    """The ``[gateway]`` table: this institution, and where its peer files are."""

    name: str
    institution_id: str
    as2_id: str
    peers_dir: Path


def load_identity(reader: Reader, root: Section) -> Identity:
    gw = root.table("gateway")
    name = gw.string("name", example='"Sakura General Hospital"')
    institution_id = gw.string("institution_id", default="")
    as2_id = gw.string("as2_id", example='"SAKURA-HOSP"')
    check_as2_id(gw, "as2_id", as2_id)
    peers_dir = reader.path(gw.string("peers_dir", default="peers.d"))
    gw.finish()
    return Identity(name, institution_id, as2_id, peers_dir)


def load_tls(reader: Reader, root: Section) -> TlsSettings | None:
    """The ``[tls]`` table; None when its certificate or key is unusable (a problem says why)."""
    tls_section = root.table("tls")
    tls_identity = reader.key_pair(tls_section, "certificate", "key")
    for moved in ("trust_anchors", "min_version"):
        tls_section.moved(
            moved,
            f"move {moved} into each [[zones]] table: what a listener trusts, and how, "
            "is set per network zone",
        )
    tls_section.finish()
    return TlsSettings(tls_identity) if tls_identity is not None else None
