"""``peers.d/<peer>.toml``: one file per peer institution; the file's stem is the
peer's name."""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization

from gateway.config.identity import check_as2_id
from gateway.config.peer_algorithms import read_accept_legacy, read_key_transport
from gateway.config.smime import SmimeSettings
from gateway.errors import PolicyError
from gateway.fsutil import this_user
from gateway.policy import (
    CONTENT_CIPHERS,
    DEFAULT_KEY_TRANSPORT,
    DIGESTS,
    AlgorithmPolicy,
    certificate_key,
)
from gateway.tomlreader import Reader, Section

# A service name is also a folder name (outbox/<peer>/<service>/, inbox/<peer>/<service>/).
SERVICE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
SPKI_PIN = re.compile(r"[0-9a-f]{64}")
PEER_NAME_KEY = "(file name)"  # where check-config reports a problem of the peer's name


@dataclass(frozen=True)
class Peer:
    """A peer institution, from ``peers.d/<name>.toml``."""

    name: str
    source: Path
    as2_id: str
    institution_id: str
    url: str
    tls_certificates: tuple[x509.Certificate, ...]
    signing_certificates: tuple[x509.Certificate, ...]
    encryption_certificates: tuple[x509.Certificate, ...]
    cipher: str
    digest: str
    zone: str
    # Monitored-list algorithms accepted from this peer, each on its own
    # (names of policy.LEGACY_ALGORITHMS); never used to send.
    accept_legacy: frozenset[str] = frozenset()
    # How we wrap content-encryption keys for this peer's RSA certificates.
    key_transport: str = DEFAULT_KEY_TRANSPORT
    # Accept AES-CBC content (EnvelopedData) from this peer; false: AES-GCM only.
    accept_cbc: bool = False
    # Also accept a person's signature (e.g. a doctor's HPKI certificate) that
    # validates for S/MIME signing under the zone's trust anchors.
    personal_signers: bool = False
    # Where this peer should POST our receipts later (asynchronous MDN, RFC 4130
    # 7.3): one of our own listeners' https URLs as the peer reaches it; "" = sync.
    async_receipt_url: str = ""
    # Routing keys agreed with this peer (which internal function a document is
    # for): sent as outbox/<peer>/<service>/, delivered to inbox/<peer>/<service>/.
    services: tuple[str, ...] = ()
    # SHA-256 (lower-case hex) of SubjectPublicKeyInfo DER: a TLS client
    # certificate with one of these keys identifies this peer even when it is
    # not listed in tls_certificates (checked by full path validation after the
    # handshake).  Inbound connections only.
    tls_spki_pins: tuple[str, ...] = ()

    @property
    def policy(self) -> AlgorithmPolicy:
        return AlgorithmPolicy(
            accept_legacy=self.accept_legacy,
            key_transport=self.key_transport,
            accept_cbc=self.accept_cbc,
        )


def _check_url(section: Section, key: str, url: str) -> None:
    fix = (
        "write https://host:port/path, an IPv6 address in brackets: https://[2001:db8::1]:4443/as2"
    )
    try:
        parts = urlsplit(url)
    except ValueError as exc:  # e.g. an unclosed [ of an IPv6 address
        section.problem(key, f"{url!r} is not a valid URL ({exc})", fix)
        return
    try:
        port = parts.port
    except ValueError:  # not a number, or above 65535
        section.problem(key, f"{url!r}: the port is not a number 1-65535", fix)
        return
    if parts.scheme != "https":
        section.problem(
            key,
            f"{url!r} is not an https:// URL; medgw never sends over plaintext HTTP",
            "use the peer's https:// AS2 endpoint",
        )
    elif not parts.hostname:
        section.problem(key, f"{url!r} has no host", fix)
    elif port is not None and not 1 <= port <= 65535:
        section.problem(key, f"{url!r}: port {port} is out of range 1-65535", fix)


def _load_peer(reader: Reader, path: Path, defaults: SmimeSettings | None) -> Peer | None:
    data = reader.load_toml(path)
    if data is None:
        return None
    section = Section(reader, path, "", data)
    name = path.stem
    if ":" in name:
        # The names of what is kept of a peer's messages (gateway.spool.records) are
        # "<kind>:<peer>:<Message-ID>": with a ':' in it, two peers' could be the same.
        section.problem(
            PEER_NAME_KEY,
            f"the peer's name {name!r} (the file name {path.name}) contains ':', which "
            "a peer's name may not",
            f"rename {path} without ':' (e.g. {name.replace(':', '-')}.toml), and its "
            "outbox and inbox folders with it",
        )
    as2_id = section.string("as2_id", example='"LAB-KITA"')
    check_as2_id(section, "as2_id", as2_id)
    institution_id = section.string("institution_id", default="")
    url = section.string("url", example='"https://lab.example:4080/as2"')
    _check_url(section, "url", url)
    zone = section.string("zone", example='"regional-vpn"')
    certs: dict[str, list[x509.Certificate]] = {}
    for key in ("tls_certificates", "signing_certificates", "encryption_certificates"):
        certs[key] = []
        for entry in section.string_list(key):
            found = reader.certificates(section, key, reader.path(entry))
            for cert in found:
                reader.check_key_policy(section, key, cert)
            certs[key].extend(found)
    tls_spki_pins = _spki_pins(section, "tls_spki_pins")
    cipher = section.choice(
        "cipher", CONTENT_CIPHERS, default=defaults.cipher if defaults else "aes-256-gcm"
    )
    digest = section.choice("digest", DIGESTS, default=defaults.digest if defaults else "sha256")
    accept_legacy = read_accept_legacy(section)
    key_transport = read_key_transport(section, certs["encryption_certificates"])
    accept_cbc = section.boolean("accept_cbc", default=False)
    if cipher.endswith("-cbc") and not accept_cbc:
        section.problem(
            "accept_cbc",
            f"we encrypt with {cipher} for this peer, which likely sends CBC too, but its "
            "CBC messages are refused (accept_cbc = false)",
            "if the peer's product cannot do AES-GCM either way, set accept_cbc = true",
            "warning",
        )
    personal_signers = section.boolean("personal_signers", default=False)
    async_receipt_url = section.string("async_receipt_url", default="")
    if async_receipt_url:
        _check_url(section, "async_receipt_url", async_receipt_url)
    services = section.string_list("services", required=False)
    for service in services:
        if not SERVICE_NAME.match(service):
            section.problem(
                "services",
                f"{service!r} is not a service name (1-64 letters, digits, '.', '_' or '-', "
                "not starting with '.' or '-')",
                'name the routing key agreed with the peer, e.g. "lab-results"',
            )
    if len(set(services)) != len(services):
        section.problem("services", "a service is listed twice", "list each service once")
    section.finish()
    return Peer(
        name=name,
        source=path,
        as2_id=as2_id,
        institution_id=institution_id,
        url=url,
        tls_certificates=tuple(certs["tls_certificates"]),
        signing_certificates=tuple(certs["signing_certificates"]),
        encryption_certificates=tuple(certs["encryption_certificates"]),
        cipher=cipher,
        digest=digest,
        zone=zone,
        accept_legacy=accept_legacy,
        key_transport=key_transport,
        accept_cbc=accept_cbc,
        personal_signers=personal_signers,
        async_receipt_url=async_receipt_url,
        services=tuple(dict.fromkeys(s for s in services if SERVICE_NAME.match(s))),
        tls_spki_pins=tls_spki_pins,
    )


def _spki_pins(section: Section, key: str) -> tuple[str, ...]:
    """SHA-256 pins of public keys: 64 hex digits each, listed once."""
    pins: list[str] = []
    for entry in section.string_list(key, required=False):
        pin = entry.strip().lower()
        if not SPKI_PIN.fullmatch(pin):
            section.problem(
                key,
                f"{entry!r} is not a SHA-256 public key pin (64 hexadecimal digits)",
                "write the SHA-256 of the certificate's SubjectPublicKeyInfo (DER) in hex: "
                "openssl x509 -in tls.crt -pubkey -noout | openssl pkey -pubin -outform DER "
                "| sha256sum",
            )
        elif pin in pins:
            section.problem(key, f"pin {pin} is listed twice", "list each pin once")
        else:
            pins.append(pin)
    return tuple(pins)


def load_peers(
    reader: Reader, source: Path, peers_dir: Path, defaults: SmimeSettings | None
) -> list[Peer]:
    """Every ``<peer>.toml`` in ``peers_dir``, by file name; ``defaults`` gives the
    algorithms a peer file does not name."""
    peers: list[Peer] = []
    try:
        entries = sorted(peers_dir.iterdir()) if peers_dir.is_dir() else None
    except OSError as exc:  # a folder on the way this user may not enter, or list
        user = this_user()
        reader.add(
            source,
            "gateway.peers_dir",
            f"cannot list the folder {peers_dir}: {exc.strerror} for user {user}, the user "
            "this command runs as",
            f"let the user medgw runs as enter every folder down to {peers_dir} and list it "
            f"(namei -l {peers_dir} shows each folder's owner and mode), or run this command "
            "as that user (sudo -u medgw ...)",
        )
        return peers
    if entries is not None:
        for entry in entries:
            if entry.suffix != ".toml":
                _not_a_peer_file(reader, entry)
                continue
            peer = _load_peer(reader, entry, defaults)
            if peer is not None:
                peers.append(peer)
    else:
        reader.add(
            source,
            "gateway.peers_dir",
            f"folder {peers_dir} not found",
            "create it and put one <peer>.toml per peer institution in it",
        )
    return peers


def _not_a_peer_file(reader: Reader, entry: Path) -> None:
    """A file in peers.d that is not read: a warning, as a misspelt peer file
    (``lab.tml``, ``lab.toml.bak``) would otherwise leave its peer out unnoticed.
    Hidden files (an editor's swap file such as ``.lab.toml.swp``) and folders are
    passed over."""
    if entry.name.startswith(".") or not entry.is_file():
        return
    name = entry.name.split(".", 1)[0].rstrip("~") + ".toml"
    fix = (
        f"move it out of {entry.parent} (a copy of {name}?)"
        if (entry.parent / name).exists()
        else f"rename it to {name} if it describes a peer, else move it out of {entry.parent}"
    )
    reader.add(
        entry,
        "",
        "ignored: only files named <peer>.toml in the peers folder are read, so no "
        "peer is configured from this one",
        fix,
        "warning",
    )


def check_peer_uniqueness(reader: Reader, peers: list[Peer], own_as2_id: str) -> None:
    by_as2: dict[str, Peer] = {}
    by_tls: dict[bytes, Peer] = {}
    for peer in peers:
        if peer.as2_id == own_as2_id:
            reader.add(
                peer.source,
                "as2_id",
                f"{peer.as2_id!r} is this gateway's own AS2 id",
                "give the peer its own AS2 identifier",
            )
        if peer.as2_id in by_as2:
            reader.add(
                peer.source,
                "as2_id",
                f"{peer.as2_id!r} is also used by {by_as2[peer.as2_id].source.name}",
                "every peer needs a distinct AS2 identifier",
            )
        by_as2[peer.as2_id] = peer
        for cert in peer.tls_certificates:
            fp = cert.fingerprint(hashes.SHA256())
            if fp in by_tls and by_tls[fp] is not peer:
                reader.add(
                    peer.source,
                    "tls_certificates",
                    f"certificate {cert.subject.rfc4514_string()} is also listed for "
                    f"{by_tls[fp].source.name}; a TLS certificate must identify exactly one peer",
                    "list each certificate for one peer only",
                )
            by_tls[fp] = peer
    # A public key pinned for one peer must identify that peer only: neither
    # pinned for another peer nor the key of another peer's listed certificate.
    by_spki: dict[str, Peer] = {}
    for peer in peers:
        for cert in peer.tls_certificates:
            spki = _spki_sha256(cert)
            if spki is not None:  # None: an unusable key, reported by check_key_policy
                by_spki.setdefault(spki, peer)
    for peer in peers:
        for pin in peer.tls_spki_pins:
            other = by_spki.get(pin)
            if other is not None and other is not peer:
                reader.add(
                    peer.source,
                    "tls_spki_pins",
                    f"public key pin {pin} also identifies {other.source.name} "
                    "(pinned there or the key of a certificate listed there); a TLS key "
                    "must identify exactly one peer",
                    "pin each key for one peer only",
                )
            else:
                by_spki[pin] = peer


def _spki_sha256(cert: x509.Certificate) -> str | None:
    try:
        public = certificate_key(cert, "TLS key")
    except PolicyError:
        return None
    spki = public.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return hashlib.sha256(spki).hexdigest()
