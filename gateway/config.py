"""Configuration: TOML files -> typed, frozen dataclasses.

An installation has one ``gateway.toml`` (this institution) and a folder
``peers.d/`` with one ``<peer>.toml`` per peer institution; the file's stem is
the peer's name.  Relative paths inside a file are resolved against the folder
of ``gateway.toml``.

Loading never stops at the first mistake: every problem found is collected as
a :class:`~gateway.errors.ConfigProblem` naming the file, the key and the fix,
and :class:`~gateway.errors.ConfigError` carries all of them.  Unknown keys are
errors, because a misspelt security option silently falling back to a default
is exactly the surprise an administrator must not get.
"""

from __future__ import annotations

import functools
import hashlib
import ipaddress
import os
import re
import ssl
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlsplit

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from gateway.audit.export.settings import ExportSettings, load_export
from gateway.audit.seal import CURVES, SealSettings
from gateway.egress import NetworkMap, ZonePath, resolve_hosts
from gateway.errors import ConfigError, ConfigProblem, MedgwError, PolicyError
from gateway.fsutil import MAX_SOCKET_PATH
from gateway.httpbody import BODY_IDLE_SECONDS, BODY_MIN_BYTES_PER_SECOND
from gateway.maintenance.settings import MaintenanceSettings, load_maintenance
from gateway.pki.keypair import KeyPair
from gateway.pki.store import load_crls
from gateway.places import Place, overlap_problems
from gateway.policy import (
    CONTENT_CIPHERS,
    DEFAULT_KEY_TRANSPORT,
    DIGESTS,
    LEGACY_ALGORITHMS,
    LEGACY_SEND_KEY_TRANSPORT,
    SEND_KEY_TRANSPORTS,
    AlgorithmPolicy,
    certificate_key,
    describe_legacy,
)
from gateway.routing import (
    REVOCATION_POLICIES,
    ZONE_KINDS,
    Address,
    Network,
    endpoint,
    hosts_to_resolve,
    own_listeners,
    reach_problems,
    zone_problems,
)
from gateway.tomlreader import Reader as _Reader
from gateway.tomlreader import Section as _Section

LOG_LEVELS = ("debug", "info", "warning", "error")
# What an administrator named in [[responsible]] answers for (NET-6b); "incidents" is
# called about every alert.
RESPONSIBILITIES = ("communication", "encryption", "authentication", "incidents")
MAX_RESPONSIBLE_TEXT = 200
AS2_ID_MAX = 128
# A service name is also a folder name (outbox/<peer>/<service>/, inbox/<peer>/<service>/).
SERVICE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
SPKI_PIN = re.compile(r"[0-9a-f]{64}")


@dataclass(frozen=True)
class TlsSettings:
    """Our TLS identity; what we trust, and how, is set per zone (:class:`Zone`)."""

    identity: KeyPair


@dataclass(frozen=True)
class Zone:
    """One network the gateway is attached to (``[[zones]]``); see gateway.routing."""

    name: str
    kind: str  # "closed-network", "ip-vpn" or "internet"
    source_address: str | None  # outbound connections of this zone leave from it
    egress: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]  # where its peers live
    trust_anchor_paths: tuple[Path, ...]
    trust_anchors: tuple[x509.Certificate, ...]
    min_version: str  # "1.2" or "1.3"
    revocation: str  # "require", "prefer" or "off"
    crl_paths: tuple[Path, ...] = ()  # files or folders, maintained by the administrator
    crls: tuple[x509.CertificateRevocationList, ...] = ()
    ocsp: bool = False  # ask the responders named in the certificates (AIA)
    crl_warn_days: int = 7  # alarm this many days before a CRL's nextUpdate
    # Ranges taken out of ``egress`` as written (``egress`` is what is left).
    egress_except: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] = ()

    @property
    def network(self) -> ZonePath:
        """The zone's way out, for everything sent on its behalf (NET-4)."""
        return ZonePath(self.source_address, self.egress)


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


@dataclass(frozen=True)
class Listener:
    name: str
    address: str
    port: int
    path: str
    zone: str


SPOOL_FILE = "spool.sqlite3"  # in [storage] state_dir


@dataclass(frozen=True)
class Storage:
    state_dir: Path
    outbox_dir: Path
    inbox_dir: Path
    audit_log: Path

    @property
    def spool_path(self) -> Path:
        """The spool database."""
        return self.state_dir / SPOOL_FILE


@dataclass(frozen=True)
class Runtime:
    shutdown_deadline_seconds: float
    outbox_poll_seconds: float
    retry_initial_seconds: float
    retry_max_seconds: float
    connect_timeout_seconds: float
    request_timeout_seconds: float
    max_message_bytes: int
    message_expiry_seconds: float
    max_attempts: int
    log_level: str
    # A peer's request body may pause at most body_idle_seconds, and must average at
    # least body_min_bytes_per_second after that long (gateway.httpbody).
    body_idle_seconds: float = BODY_IDLE_SECONDS
    body_min_bytes_per_second: float = BODY_MIN_BYTES_PER_SECOND


@dataclass(frozen=True)
class Responsible:
    """An administrator named in ``[[responsible]]`` (NET-6b): who to call."""

    name: str
    role: str  # the position, e.g. "医療情報システム管理者" or "network administrator"
    contact: str  # telephone, extension, mail: how to reach them
    responsible_for: tuple[str, ...]  # of RESPONSIBILITIES

    def describe(self) -> str:
        return f"{self.name} ({self.role}; {self.contact})"


def who_to_call(people: Sequence[Responsible], area: str) -> tuple[Responsible, ...]:
    """Those responsible for ``area`` and for incidents; everyone named if none is."""
    found = tuple(
        p for p in people if area in p.responsible_for or "incidents" in p.responsible_for
    )
    return found or tuple(people)


@dataclass(frozen=True)
class ApiClient:
    """One internal system allowed to submit over the local API (``[[api.clients]]``)."""

    name: str
    token_sha256: str  # hex SHA-256 of its bearer token; the token itself is never stored
    peers: tuple[str, ...]  # the peers it may send to


@dataclass(frozen=True)
class ApiSettings:
    """The local submission API (``[api]``): a unix socket and/or a loopback TCP port."""

    socket: Path | None
    address: str | None  # a loopback IP address, with port
    port: int | None
    clients: tuple[ApiClient, ...]

    def endpoints(self) -> list[str]:
        """Where it listens, as an admin would write it: ``unix:PATH``, ``http://HOST:PORT``."""
        found = [f"unix:{self.socket}"] if self.socket else []
        if self.address is not None and self.port is not None:
            host = f"[{self.address}]" if ":" in self.address else self.address
            found.append(f"http://{host}:{self.port}")
        return found

    @property
    def endpoint(self) -> tuple[str, int] | None:
        """The TCP address and port it listens on, if any."""
        if self.address is None or self.port is None:
            return None
        return self.address, self.port


@dataclass(frozen=True)
class ServiceDelivery:
    """A per-service override of the hand-over URL (``[[delivery.services]]``)."""

    name: str
    http_url: str  # "" = this service's documents stay in the inbox only


@dataclass(frozen=True)
class DeliverySettings:
    """Hand-over of received documents to an internal system (``[delivery]``)."""

    http_url: str  # "" = none (the inbox folder only), unless a service names one
    ca: Path | None  # CA certificate(s) for an https:// internal system
    timeout_seconds: float
    services: tuple[ServiceDelivery, ...] = ()
    # The certificates read from ``ca`` (PEM or DER) at load: the TLS context is built
    # from these, never from the file again, so what was checked is what is used.
    ca_certificates: tuple[x509.Certificate, ...] = ()

    def targets(self) -> tuple[tuple[str, str], ...]:
        """(config key, URL) of every hand-over target, "" where there is none."""
        overrides = (
            (f"delivery.services[{index}].http_url", item.http_url)
            for index, item in enumerate(self.services)
        )
        return (("delivery.http_url", self.http_url), *overrides)

    def url_for(self, service: str | None) -> str:
        """Where a document of ``service`` (None: no service) is POSTed; "" = nowhere."""
        for item in self.services:
            if item.name == service:
                return item.http_url
        return self.http_url


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


@dataclass(frozen=True)
class GatewayConfig:
    source: Path
    name: str
    institution_id: str
    as2_id: str
    tls: TlsSettings
    smime: SmimeSettings
    listeners: tuple[Listener, ...]
    storage: Storage
    runtime: Runtime
    peers: tuple[Peer, ...]
    zones: tuple[Zone, ...]
    warnings: tuple[ConfigProblem, ...] = ()
    api: ApiSettings | None = None
    delivery: DeliverySettings | None = None
    audit: SealSettings | None = None  # [audit]: signed checkpoints (gateway.audit.seal)
    responsible: tuple[Responsible, ...] = ()  # [[responsible]]: who to call (NET-6b)
    # The addresses each host name in a peer or hand-over URL resolved to when the
    # configuration was loaded (a name that did not resolve is absent).
    resolved_hosts: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    audit_export: ExportSettings | None = None  # [audit.export]: off when None
    maintenance: MaintenanceSettings | None = None  # the SSH maintenance listener

    def peer(self, name: str) -> Peer | None:
        return next((p for p in self.peers if p.name == name), None)

    @functools.cached_property
    def network_map(self) -> NetworkMap:
        """What every outbound connection is judged by (:mod:`gateway.egress`)."""
        api = self.api.endpoint if self.api is not None else None
        endpoints: dict[tuple[Address, int], Peer] = {}
        for peer in self.peers:
            found = endpoint(peer.url, self.resolved_hosts)
            if found is not None:
                addresses, port = found
                for ip in addresses:
                    endpoints.setdefault((ip, port), peer)
        return NetworkMap(
            {z.name: z.network for z in self.zones},
            tuple(own_listeners(self.listeners, api)),
            endpoints,
        )

    def zone(self, name: str) -> Zone | None:
        return next((z for z in self.zones if z.name == name), None)

    def require_zone(self, name: str) -> Zone:
        """The zone of a loaded peer or listener (load_config guarantees it exists)."""
        zone = self.zone(name)
        if zone is None:
            raise KeyError(f"no zone {name!r} in {self.source}")
        return zone

    def require_peer(self, name: str) -> Peer:
        peer = self.peer(name)
        if peer is None:
            raise KeyError(f"no peer {name!r} in {self.source.parent / 'peers.d'}")
        return peer


T = TypeVar("T")


def _load_audit(reader: _Reader, section: _Section, storage: Storage) -> SealSettings | None:
    """``[audit]``: the key that signs checkpoints, kept out of the folders it protects."""
    pair = reader.key_pair(section, "certificate", "signing_key")
    every_records = section.integer(
        "checkpoint_every_records", default=1000, minimum=1, maximum=1_000_000
    )
    every_seconds = section.number(
        "checkpoint_every_seconds", default=300, minimum=1, maximum=86_400
    )
    section.finish()
    if pair is None:
        return None
    key = pair.key
    if not isinstance(key, ec.EllipticCurvePrivateKey) or key.curve.name not in CURVES:
        section.problem(
            "signing_key",
            f"{pair.key_path}: audit checkpoints are signed with ECDSA P-256 or P-384 (CRYPTREC)",
            "make one: openssl ecparam -name prime256v1 -genkey -noout -out audit.key",
        )
        return None
    where = pair.key_path.resolve()
    for folder, name in (
        (storage.state_dir, "[storage] state_dir"),
        (storage.audit_log.parent, "the audit log's folder"),
    ):
        if where.is_relative_to(folder.resolve()):
            section.problem(
                "signing_key",
                f"{pair.key_path} is inside {name} ({folder}): whoever can rewrite the "
                "audit trail could also sign it",
                "keep the audit key elsewhere, e.g. /etc/medgw/audit/audit.key, readable "
                "only by the medgw user",
            )
            return None
    return SealSettings(key, pair.certificate, every_records, every_seconds)


def _check_as2_id(section: _Section, key: str, value: str) -> None:
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


def _check_url(section: _Section, key: str, url: str) -> None:
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


def _parses(url: str) -> bool:
    try:
        _ = urlsplit(url).port  # a port that is not a number 1-65535 raises ValueError
    except ValueError:
        return False
    return True


def _load_peer(reader: _Reader, path: Path, defaults: SmimeSettings | None) -> Peer | None:
    data = reader.load_toml(path)
    if data is None:
        return None
    section = _Section(reader, path, "", data)
    name = path.stem
    as2_id = section.string("as2_id", example='"LAB-KITA"')
    _check_as2_id(section, "as2_id", as2_id)
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
    accept_legacy = _accept_legacy(section)
    key_transport = _key_transport(section, certs["encryption_certificates"])
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


def _accept_legacy(section: _Section) -> frozenset[str]:
    """``accept_legacy``: the monitored-list algorithms accepted from this peer, each
    named on its own; a warning lists exactly what is admitted.  The old ``compat``
    switch admitted all of them at once: ``compat = true`` is refused, naming the
    replacement, so that an upgrade never widens or narrows what a peer may send
    without the admin deciding it."""
    names = LEGACY_ALGORITHMS
    every = ", ".join(f'"{n}"' for n in names)
    if section.has("compat"):
        if section.boolean("compat", default=False):
            section.problem(
                "compat",
                "compat = true is no longer read: it admitted every monitored-list algorithm "
                f"at once ({describe_legacy(tuple(names))}); each is now permitted on its own",
                "replace it with accept_legacy listing only the algorithms this peer still "
                "sends (its policy.compat_algorithm_used records in the audit trail name "
                'them), e.g. accept_legacy = ["rsaes-pkcs1-v1_5"]; every one of them: '
                f"accept_legacy = [{every}]",
            )
        else:
            section.problem(
                "compat",
                "compat is no longer read (it admitted nothing when false)",
                "remove the line; accept_legacy = [...] names any monitored-list algorithm "
                "to accept from this peer",
                "warning",
            )
    admitted: list[str] = []
    for entry in section.string_list("accept_legacy", required=False):
        name = entry.strip().lower()
        if name not in names:
            section.problem(
                "accept_legacy",
                f"{entry!r} is not a monitored-list algorithm the gateway can accept",
                f"use some of: {', '.join(names)}",
            )
        elif name in admitted:
            section.problem("accept_legacy", f"{name} is listed twice", "list each once")
        else:
            admitted.append(name)
    if admitted:
        section.problem(
            "accept_legacy",
            "accepts monitored-list algorithms from this peer (each use audited as a warning): "
            f"{describe_legacy(tuple(admitted))}",
            "ask the peer to upgrade to SHA-256, AES and RSAES-OAEP/ECDH with SHA-256, then "
            "remove each from accept_legacy",
            "warning",
        )
    return frozenset(admitted)


def _key_transport(section: _Section, encryption: list[x509.Certificate]) -> str:
    """``key_transport``: how we wrap content-encryption keys for this peer's RSA
    certificates.  RSAES-OAEP with SHA-256 by default, or with SHA-1 for a partner
    that decrypts nothing else; RSAES-PKCS1-v1_5 (monitored list) only when the
    peer's own legacy option ``legacy_send_rsaes_pkcs1_v1_5`` is also true.  Each
    choice but the default is a warning."""
    legacy = section.boolean("legacy_send_rsaes_pkcs1_v1_5", default=False)
    chosen = section.choice(
        "key_transport",
        (*SEND_KEY_TRANSPORTS, LEGACY_SEND_KEY_TRANSPORT),
        default=DEFAULT_KEY_TRANSPORT,
    )
    if chosen == LEGACY_SEND_KEY_TRANSPORT and not legacy:
        section.problem(
            "key_transport",
            f"{chosen} is on the CRYPTREC monitored list (padding-oracle attacks on the "
            "receiving side); it is sent only to a peer whose legacy_send_rsaes_pkcs1_v1_5 "
            "is true",
            'ask the peer to decrypt RSAES-OAEP and set key_transport = "rsaes-oaep-sha1" '
            "(or the default); only if it cannot, also set legacy_send_rsaes_pkcs1_v1_5 = true",
        )
        return DEFAULT_KEY_TRANSPORT
    if chosen == LEGACY_SEND_KEY_TRANSPORT:
        section.problem(
            "key_transport",
            "sends to this peer with RSAES-PKCS1-v1_5 key transport, on the CRYPTREC "
            "monitored list; every message is audited with a warning",
            'ask the peer to decrypt RSAES-OAEP, then set key_transport = "rsaes-oaep-sha1" '
            "(or the default) and legacy_send_rsaes_pkcs1_v1_5 = false",
            "warning",
        )
    elif legacy:
        section.problem(
            "legacy_send_rsaes_pkcs1_v1_5",
            f"has no effect: key_transport is {chosen}",
            "set it to false (RSAES-PKCS1-v1_5 is sent only with key_transport = "
            '"rsaes-pkcs1-v1_5" as well)',
            "warning",
        )
    if chosen == "rsaes-oaep-sha1":
        section.problem(
            "key_transport",
            "sends to this peer with RSAES-OAEP with SHA-1 (its default parameters) instead "
            "of SHA-256; every message is audited with a warning",
            "ask the peer to decrypt RSAES-OAEP with SHA-256, then set key_transport = "
            f'"{DEFAULT_KEY_TRANSPORT}" (the default)',
            "warning",
        )
    if (
        chosen != DEFAULT_KEY_TRANSPORT
        and encryption
        and not any(isinstance(cert.public_key(), rsa.RSAPublicKey) for cert in encryption)
    ):
        section.problem(
            "key_transport",
            "has no effect: every encryption certificate of this peer has an EC key, and "
            "an EC key is sent the content-encryption key by ECDH key agreement",
            f'remove the line, or set key_transport = "{DEFAULT_KEY_TRANSPORT}"',
            "warning",
        )
    return chosen


def _spki_pins(section: _Section, key: str) -> tuple[str, ...]:
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


def _load_zones(reader: _Reader, root: _Section) -> list[Zone]:
    """The ``[[zones]]`` tables, in file order (NET-4: every peer is in exactly one)."""
    zones: list[Zone] = []
    missing = (
        "no [[zones]] table: every listener and every peer must belong to a network zone",
        "add one [[zones]] table per network this gateway is attached to (see the example "
        'config/gateway.toml), then `zone = "<name>"` in each [[listeners]] and each peer file',
    )
    for item in root.tables("zones", missing=missing):
        name = item.string("name", example='"regional-vpn"')
        kind = item.string("kind", example=f'"{ZONE_KINDS[1]}"')
        if kind and kind not in ZONE_KINDS:
            item.problem(
                "kind",
                f"{kind!r} is not one of {', '.join(ZONE_KINDS)}",
                f"set kind to one of: {', '.join(ZONE_KINDS)}",
            )
        source_address = item.string("source_address", default="") or None
        if source_address is not None:
            try:
                source_ip = ipaddress.ip_address(source_address)
            except ValueError:
                item.problem(
                    "source_address",
                    f"{source_address!r} is not an IP address",
                    "give this host's address on the zone's network, or remove the key",
                )
            else:
                if source_ip.is_unspecified:
                    item.problem(
                        "source_address",
                        f"{source_address} is the any-address, not an interface's",
                        "give this host's address on the zone's network, or remove the key",
                    )
        egress: list[ipaddress.IPv4Network | ipaddress.IPv6Network] = []
        for entry in item.string_list(
            "egress", empty_fix='name the ranges the zone\'s peers live in, e.g. ["10.20.0.0/16"]'
        ):
            try:
                egress.append(ipaddress.ip_network(entry, strict=True))
            except ValueError as exc:
                item.problem(
                    "egress",
                    f"{entry!r} is not an address range ({exc})",
                    'write CIDR ranges with the network address, e.g. "10.20.0.0/16"; '
                    'the whole internet is ["0.0.0.0/0", "::/0"]',
                )
        egress, egress_except = _egress_except(item, egress)
        anchor_paths = tuple(
            reader.path(p)
            for p in item.string_list(
                "trust_anchors", empty_fix="name the CA certificate file(s) of this zone's peers"
            )
        )
        anchors: list[x509.Certificate] = []
        for anchor_path in anchor_paths:
            anchors.extend(reader.certificates(item, "trust_anchors", anchor_path))
        min_version = item.choice("min_version", ("1.3", "1.2"), default="1.3")
        revocation = item.choice("revocation", REVOCATION_POLICIES, default="require")
        crl_paths = tuple(reader.path(p) for p in item.string_list("crls", required=False))
        crls: list[x509.CertificateRevocationList] = []
        for crl_path in crl_paths:
            try:
                crls.extend(load_crls(crl_path))
            except MedgwError as exc:
                item.problem("crls", exc.message, exc.fix or "give CRL files (PEM or DER)")
        ocsp = item.boolean("ocsp", default=False)
        crl_warn_days = item.integer("crl_warn_days", default=7, minimum=1, maximum=90)
        if revocation == "require" and not crl_paths and not ocsp:
            item.problem(
                "revocation",
                'revocation = "require" but the zone has no `crls` and `ocsp = false`: '
                "no certificate's status could ever be established, so every peer would be "
                "refused",
                "list the CA's CRL files in `crls` (and refresh them, e.g. by cron), set "
                '`ocsp = true`, or, knowingly, revocation = "prefer"',
            )
        if revocation == "off":
            item.problem(
                "revocation",
                'revocation = "off": a revoked certificate of this zone\'s peers is still accepted',
                'set revocation = "require" with the CA\'s CRLs in `crls` (or `ocsp = true`), '
                'or at least "prefer"',
                "warning",
            )
        item.finish()
        zones.append(
            Zone(
                name=name,
                kind=kind,
                source_address=source_address,
                egress=tuple(egress),
                trust_anchor_paths=anchor_paths,
                trust_anchors=tuple(anchors),
                min_version=min_version,
                revocation=revocation,
                crl_paths=crl_paths,
                crls=tuple(crls),
                ocsp=ocsp,
                crl_warn_days=crl_warn_days,
                egress_except=tuple(egress_except),
            )
        )
    return zones


def _egress_except(item: _Section, egress: list[Network]) -> tuple[list[Network], list[Network]]:
    """``egress`` without the ranges of ``egress_except`` (each inside one of them), and
    those ranges: an internet zone's ["0.0.0.0/0"] less another zone's network."""
    excluded: list[Network] = []
    for entry in item.string_list("egress_except", required=False):
        try:
            network = ipaddress.ip_network(entry, strict=True)
        except ValueError as exc:
            item.problem(
                "egress_except",
                f"{entry!r} is not an address range ({exc})",
                'write CIDR ranges with the network address, e.g. "10.20.0.0/16"',
            )
            continue
        if not any(r.version == network.version and network.subnet_of(r) for r in egress):  # type: ignore[arg-type]
            item.problem(
                "egress_except",
                f"{network} is not inside any of the egress ranges "
                f"({', '.join(str(r) for r in egress) or 'none'})",
                "list only ranges taken out of this zone's egress, or remove it",
            )
            continue
        excluded.append(network)
    if not excluded:
        return egress, []
    left: list[Network] = []
    for network in egress:
        parts = [network]
        for hole in excluded:
            rest: list[Network] = []
            for part in parts:
                if hole.version != part.version or not hole.overlaps(part):
                    rest.append(part)
                elif hole.subnet_of(part):  # type: ignore[arg-type]
                    rest.extend(part.address_exclude(hole))  # type: ignore[arg-type]
            parts = rest
        left.extend(parts)
    if not left:
        # An empty egress means "no ranges given" to the connect-time checks.
        item.problem(
            "egress_except",
            "takes out every address of the egress: the zone would reach nothing",
            "take out only the ranges of other networks, or remove the zone",
        )
        return egress, excluded
    v4 = [n for n in left if isinstance(n, ipaddress.IPv4Network)]
    v6 = [n for n in left if isinstance(n, ipaddress.IPv6Network)]
    collapsed: list[Network] = [*ipaddress.collapse_addresses(v4)]
    collapsed += ipaddress.collapse_addresses(v6)
    return collapsed, excluded


def smime_section_keys(data: dict[str, Any]) -> set[str]:
    smime = data.get("smime")
    return set(smime) if isinstance(smime, dict) else set()


def load_config(path: str | os.PathLike[str]) -> GatewayConfig:
    """Load and validate ``gateway.toml`` and its ``peers.d/``.

    Raises :class:`ConfigError` listing every problem found.  Warnings (things
    that work but an administrator should know) are kept in ``.warnings``.
    """
    source = Path(path).absolute()
    reader = _Reader(source.parent)
    data = reader.load_toml(source)
    if data is None:
        raise ConfigError(reader.problems)
    root = _Section(reader, source, "", data)

    gw = root.table("gateway")
    name = gw.string("name", example='"Sakura General Hospital"')
    institution_id = gw.string("institution_id", default="")
    as2_id = gw.string("as2_id", example='"SAKURA-HOSP"')
    _check_as2_id(gw, "as2_id", as2_id)
    peers_dir = reader.path(gw.string("peers_dir", default="peers.d"))
    gw.finish()

    tls_section = root.table("tls")
    tls_identity = reader.key_pair(tls_section, "certificate", "key")
    for moved in ("trust_anchors", "min_version"):
        tls_section.moved(
            moved,
            f"move {moved} into each [[zones]] table: what a listener trusts, and how, "
            "is set per network zone",
        )
    tls_section.finish()

    zones = _load_zones(reader, root)

    smime_section = root.table("smime")
    signing = reader.key_pair(smime_section, "signing_certificate", "signing_key")
    encryption = reader.key_pair(smime_section, "encryption_certificate", "encryption_key")
    digest = smime_section.choice("digest", DIGESTS, default="sha256")
    cipher = smime_section.choice("cipher", CONTENT_CIPHERS, default="aes-256-gcm")
    extra_decryption: list[KeyPair] = []
    if "decryption_keys" in smime_section_keys(data):
        for item in smime_section.tables("decryption_keys"):
            pair = reader.key_pair(item, "certificate", "key")
            item.finish()
            if pair is not None:
                extra_decryption.append(pair)
    else:
        smime_section.mark_seen("decryption_keys")
    smime_section.finish()

    listeners: list[Listener] = []
    for item in root.tables("listeners"):
        listener_name = item.string("name", example='"regional-vpn"')
        if listener_name and any(other.name == listener_name for other in listeners):
            # Logs, audit events and each listener's TLS settings are looked up by name.
            item.problem(
                "name",
                f"listener name {listener_name!r} is used by another [[listeners]] table",
                "give each listener its own name",
            )
        address = item.string("address", example='"192.0.2.10"')
        try:
            ipaddress.ip_address(address)
        except ValueError:
            item.problem("address", f"{address!r} is not an IP address", "give the address to bind")
        port = item.integer("port", default=None, minimum=1, maximum=65535)
        url_path = item.string("path", default="/as2")
        if not url_path.startswith("/"):
            item.problem("path", f"{url_path!r} must start with /", 'use for example "/as2"')
        zone = item.string("zone", example='"regional-vpn"')
        item.finish()
        listeners.append(Listener(listener_name, address, port, url_path, zone))
    seen: dict[tuple[str, int], str] = {}
    for listener in listeners:
        where = (listener.address, listener.port)
        if where in seen:
            reader.add(
                source,
                "listeners",
                f"listeners {seen[where]!r} and {listener.name!r} both use "
                f"{listener.address}:{listener.port}",
                "give each listener its own address and port",
            )
        seen[where] = listener.name

    st = root.table("storage")
    storage = Storage(
        state_dir=reader.path(st.string("state_dir", example='"/var/lib/medgw"')),
        outbox_dir=reader.path(st.string("outbox_dir", example='"/var/lib/medgw/outbox"')),
        inbox_dir=reader.path(st.string("inbox_dir", example='"/var/lib/medgw/inbox"')),
        audit_log=reader.path(st.string("audit_log", example='"/var/log/medgw/audit.jsonl"')),
    )
    st.finish()

    rt = root.table("runtime", required=False)
    runtime = Runtime(
        shutdown_deadline_seconds=rt.number("shutdown_deadline_seconds", default=20, minimum=1),
        outbox_poll_seconds=rt.number("outbox_poll_seconds", default=1.0, minimum=0.05),
        retry_initial_seconds=rt.number("retry_initial_seconds", default=10, minimum=0.1),
        retry_max_seconds=rt.number("retry_max_seconds", default=900, minimum=1),
        connect_timeout_seconds=rt.number("connect_timeout_seconds", default=15, minimum=0.5),
        request_timeout_seconds=rt.number("request_timeout_seconds", default=600, minimum=1),
        max_message_bytes=int(
            rt.number("max_message_bytes", default=4 * 1024**3, minimum=1024, maximum=2**40)
        ),
        message_expiry_seconds=rt.number("message_expiry_seconds", default=72 * 3600, minimum=60),
        max_attempts=rt.integer("max_attempts", default=200, minimum=1, maximum=100_000),
        log_level=rt.choice("log_level", LOG_LEVELS, default="info"),
        body_idle_seconds=rt.number(
            "body_idle_seconds", default=BODY_IDLE_SECONDS, minimum=1, maximum=3600
        ),
        body_min_bytes_per_second=rt.number(
            "body_min_bytes_per_second", default=BODY_MIN_BYTES_PER_SECOND, minimum=1
        ),
    )
    rt.finish()
    api_section = root.table("api", required=False) if "api" in data else None
    delivery_section = root.table("delivery", required=False) if "delivery" in data else None
    audit, audit_export = None, None
    if "audit" in data:
        audit_section = root.table("audit")
        if audit_section.has("export"):
            audit_export = load_export(reader, audit_section.table("export"))
        if isinstance(data["audit"], dict) and set(data["audit"]) - {"export"}:
            audit = _load_audit(reader, audit_section, storage)
        else:
            audit_section.finish()  # [audit.export] alone: no checkpoints
    responsible = _load_responsible(reader, root, source)
    maintenance_section = (
        root.table("maintenance", required=False) if "maintenance" in data else None
    )
    root.finish()

    peers: list[Peer] = []
    defaults = (
        SmimeSettings(signing, encryption, digest, cipher) if signing and encryption else None
    )
    if peers_dir.is_dir():
        for peer_file in sorted(peers_dir.glob("*.toml")):
            peer = _load_peer(reader, peer_file, defaults)
            if peer is not None:
                peers.append(peer)
    else:
        reader.add(
            source,
            "gateway.peers_dir",
            f"folder {peers_dir} not found",
            "create it and put one <peer>.toml per peer institution in it",
        )
    _check_peer_uniqueness(reader, peers, as2_id)
    delivery = (
        _load_delivery(reader, delivery_section, peers) if delivery_section is not None else None
    )
    places = _places(source, peers_dir, storage, zones, reader.read)
    reader.problems.extend(overlap_problems(places))
    api = _load_api(reader, api_section, peers, places) if api_section is not None else None
    maintenance = (
        load_maintenance(
            reader, maintenance_section, listeners, zones, api.endpoint if api else None
        )
        if maintenance_section is not None
        else None
    )
    # A url already reported as unreadable is not judged against the zones a second time.
    judged = [
        replace(
            p,
            url=p.url if _parses(p.url) else "",
            async_receipt_url=p.async_receipt_url if _parses(p.async_receipt_url) else "",
        )
        for p in peers
    ]
    reader.problems.extend(zone_problems(source, zones, listeners, judged))
    handover = delivery.targets() if delivery is not None else ()
    urls = [u for p in judged for u in (p.url, p.async_receipt_url)] + [u for _, u in handover]
    resolved = resolve_hosts(hosts_to_resolve(urls))
    reader.problems.extend(
        reach_problems(
            source,
            zones,
            listeners,
            api.endpoint if api is not None else None,
            judged,
            handover,
            resolved,
        )
    )

    if reader.errors or tls_identity is None or signing is None or encryption is None:
        raise ConfigError(reader.problems)
    return GatewayConfig(
        source=source,
        name=name,
        institution_id=institution_id,
        as2_id=as2_id,
        tls=TlsSettings(tls_identity),
        smime=SmimeSettings(signing, encryption, digest, cipher, tuple(extra_decryption)),
        listeners=tuple(listeners),
        storage=storage,
        runtime=runtime,
        peers=tuple(peers),
        zones=tuple(zones),
        warnings=tuple(reader.problems),
        api=api,
        delivery=delivery,
        audit=audit,
        responsible=responsible,
        resolved_hosts=resolved,
        audit_export=audit_export,
        maintenance=maintenance,
    )


def _load_responsible(reader: _Reader, root: _Section, source: Path) -> tuple[Responsible, ...]:
    """``[[responsible]]``: the administrators for communication, encryption and
    authentication (NET-6b).  None named, or an area without anyone, is a warning: the
    gateway runs, but an alert would not say who to call."""
    people: list[Responsible] = []
    for item in root.tables("responsible") if root.has("responsible") else []:
        texts = {}
        for key, example in (
            ("name", '"Hanako Sato"'),
            ("role", '"medical information systems manager"'),
            ("contact", '"ext. 4321, it-security@hospital.example"'),
        ):
            text = item.string(key, example=example)
            if len(text) > MAX_RESPONSIBLE_TEXT or not text.isprintable():
                item.problem(
                    key,
                    f"must be one line of at most {MAX_RESPONSIBLE_TEXT} characters",
                    f"shorten it, e.g. {key} = {example}",
                )
            texts[key] = text
        areas = item.string_list("responsible_for", empty_fix=f"name some of {RESPONSIBILITIES}")
        for area in areas:
            if area not in RESPONSIBILITIES:
                item.problem(
                    "responsible_for",
                    f"{area!r} is not one of {', '.join(RESPONSIBILITIES)}",
                    f"use some of: {', '.join(RESPONSIBILITIES)}",
                )
        item.finish()
        people.append(Responsible(texts["name"], texts["role"], texts["contact"], tuple(areas)))
    root.mark_seen("responsible")
    for area in RESPONSIBILITIES[:3]:
        if not any(area in p.responsible_for for p in people):
            reader.add(
                source,
                "responsible",
                f"no one is named responsible for {area} (NET-6b): alerts, check-config "
                "and diagnose cannot say who to call",
                "add a [[responsible]] table with name, role, contact and "
                f'responsible_for = ["{area}", ...] to gateway.toml',
                "warning",
            )
    return tuple(people)


def _check_internal_url(reader: _Reader, item: _Section, key: str, url: str) -> None:
    """http:// to a loopback address only; https:// anywhere (verified against ``ca``)."""
    fix = (
        'use "http://127.0.0.1:PORT/path" for a system on this host, or '
        '"https://host:PORT/path" with `ca` naming the CA of its certificate'
    )
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:  # an unclosed [ of an IPv6 address, a port above 65535
        item.problem(key, f"{url!r} is not a valid URL ({exc})", fix)
        return
    if port is not None and not 1 <= port <= 65535:
        item.problem(key, f"{url!r}: port {port} is out of range 1-65535", fix)
        return
    if parts.scheme not in ("http", "https") or not parts.hostname:
        item.problem(key, f"{url!r} is not an http:// or https:// URL with a host", fix)
        return
    if parts.scheme == "http":
        try:
            loopback = ipaddress.ip_address(parts.hostname).is_loopback
        except ValueError:
            loopback = False
        if not loopback:
            item.problem(
                key,
                f"{url!r}: plaintext http:// is allowed only to a loopback IP address "
                "(received documents hold patient data)",
                fix,
            )


def _load_delivery(reader: _Reader, section: _Section, peers: list[Peer]) -> DeliverySettings:
    """The optional ``[delivery]`` table: hand received documents to an internal system."""
    http_url = section.string("http_url", default="")
    if http_url:
        _check_internal_url(reader, section, "http_url", http_url)
    ca_text = section.string("ca", default="")
    ca = reader.path(ca_text) if ca_text else None
    ca_certificates: list[x509.Certificate] = []
    if ca is not None:
        ca_certificates = reader.certificates(section, "ca", ca)
        if ca_certificates:
            try:
                delivery_tls_context(ca_certificates)
            except (ssl.SSLError, ValueError) as exc:
                section.problem(
                    "ca",
                    f"{ca}: the certificates in it cannot be used to verify an https:// "
                    f"internal system ({exc})",
                    "give the CA certificate(s) that issued the internal system's "
                    "certificate, as a PEM or DER file",
                )
                ca_certificates = []
    timeout = section.number("timeout_seconds", default=60, minimum=1, maximum=3600)
    known = sorted({s for p in peers for s in p.services})
    overrides: list[ServiceDelivery] = []
    if section.has("services"):
        for item in section.tables("services"):
            name = item.string("name", example='"lab-results"')
            if name and name not in known:
                item.problem(
                    "name",
                    f"no peer has a service named {name!r}",
                    f"use a service from a peer's `services` ({', '.join(known) or 'none yet'})",
                )
            if any(o.name == name for o in overrides):
                item.problem("name", f"service {name!r} is listed twice", "give it one entry")
            url = item.string("http_url", example='"http://127.0.0.1:9001/referrals"')
            if url:
                _check_internal_url(reader, item, "http_url", url)
            item.finish()
            overrides.append(ServiceDelivery(name, url))
    else:
        section.mark_seen("services")
    urls = [http_url, *(o.http_url for o in overrides)]
    if any(u.lower().startswith("https:") for u in urls) and ca is None:
        section.problem(
            "ca",
            "an https:// hand-over URL needs the CA that issued the internal system's certificate",
            'add ca = "/etc/medgw/internal-ca.crt" (PEM or DER)',
        )
    section.finish()
    return DeliverySettings(http_url, ca, timeout, tuple(overrides), tuple(ca_certificates))


def delivery_tls_context(certificates: Sequence[x509.Certificate]) -> ssl.SSLContext:
    """The client TLS context for an https:// hand-over: trusts exactly ``certificates``
    (``[delivery] ca``), TLS 1.2 or newer.  Built from the loaded certificates rather
    than the file, so a DER file works as well as a PEM one.  Raises ssl.SSLError."""
    if not certificates:
        raise ValueError("no CA certificate to verify the internal system against")
    pem = "".join(c.public_bytes(serialization.Encoding.PEM).decode() for c in certificates)
    context = ssl.create_default_context(cadata=pem)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    return context


_CLIENT_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
_SHA256_HEX = re.compile(r"^[0-9a-f]{64}$")


def _parse_listen(item: _Section, value: str) -> tuple[str, int] | None:
    """``127.0.0.1:8470`` or ``[::1]:8470``: a loopback address only (NET-3)."""
    host, sep, port_text = value.rpartition(":")
    host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    fix = 'write listen = "127.0.0.1:8470" (or "[::1]:8470"), or use socket = "..." instead'
    if not sep or not port_text.isdigit() or not 1 <= int(port_text) <= 65535:
        item.problem("listen", f"{value!r} is not ADDRESS:PORT with a port 1-65535", fix)
        return None
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        item.problem("listen", f"{host!r} is not an IP address (host names are not accepted)", fix)
        return None
    if not address.is_loopback:
        item.problem(
            "listen",
            f"{host} is not a loopback address: the local API must not be reachable from "
            "the network (NET-3)",
            "use 127.0.0.1 or ::1; internal systems on other hosts use the outbox folder "
            "on a share, or a local relay",
        )
        return None
    return str(address), int(port_text)


# Files and folders under ``[storage] state_dir`` that medgw keeps its work in.
STATE_FILES = (
    SPOOL_FILE,
    f"{SPOOL_FILE}-wal",
    f"{SPOOL_FILE}-shm",
    f"{SPOOL_FILE}-journal",
    "medgw.lock",  # gateway.instance.LOCK_NAME
    "control.sock",  # gateway.control.SOCKET_NAME
)
STATE_FOLDERS = ("incoming", "payloads", "outgoing", "receipts")


def _places(
    source: Path, peers_dir: Path, storage: Storage, zones: Sequence[Zone], read: Sequence[Place]
) -> list[Place]:
    """Every file and folder the configuration names (gateway.places)."""
    state = storage.state_dir
    state_use = "medgw keeps its spool and work files there"
    # The inbox and outbox may be folders of their own inside the state folder, so it
    # is not a tree here: its own entries are.
    places = [
        Place(
            state,
            source,
            "storage.state_dir",
            "the state folder ([storage] state_dir)",
            tree=False,
            use=state_use,
        ),
    ]
    places += [
        Place(
            state / n,
            source,
            "storage.state_dir",
            f"the spool's {n} in state_dir",
            tree=False,
            use=state_use,
        )
        for n in STATE_FILES
    ]
    places += [
        Place(
            state / n,
            source,
            "storage.state_dir",
            f"the work folder {n}/ in state_dir",
            tree=True,
            use=state_use,
        )
        for n in STATE_FOLDERS
    ]
    places += [
        Place(
            storage.outbox_dir,
            source,
            "storage.outbox_dir",
            "the outbox folder ([storage] outbox_dir)",
            tree=True,
            use="medgw sends every file put there to a peer and removes it",
        ),
        Place(
            storage.inbox_dir,
            source,
            "storage.inbox_dir",
            "the inbox folder ([storage] inbox_dir)",
            tree=True,
            use="medgw writes every received document there",
        ),
        Place(
            storage.audit_log,
            source,
            "storage.audit_log",
            "the audit log ([storage] audit_log)",
            tree=False,
            use="medgw appends the audit trail to it",
        ),
        Place(
            peers_dir,
            source,
            "gateway.peers_dir",
            "the peers folder ([gateway] peers_dir)",
            tree=True,
        ),
        Place(source, source, "", "this configuration file", tree=False),
    ]
    for index, zone in enumerate(zones):
        places += [
            Place(path, source, f"zones[{index}].crls", "a CRL file or folder", path.is_dir())
            for path in zone.crl_paths
        ]
    return places + list(read)


def _load_api(
    reader: _Reader,
    section: _Section,
    peers: list[Peer],
    places: Sequence[Place] = (),
) -> ApiSettings | None:
    """The optional ``[api]`` table: where the local API listens and who may use it."""
    socket_text = section.string("socket", default="")
    listen_text = section.string("listen", default="")
    socket_path = reader.path(socket_text) if socket_text else None
    if socket_path is not None and len(str(socket_path)) > MAX_SOCKET_PATH:
        section.problem(
            "socket",
            f"{socket_path} is longer than {MAX_SOCKET_PATH} characters (a unix socket limit)",
            "choose a shorter path, e.g. /run/medgw/api.sock",
        )
    if socket_path is not None:
        file, key = section.where("socket")
        socket_place = Place(socket_path, file, key, "the API socket", tree=False)
        for place in places:
            where = socket_place.relation(place)
            if where is not None:
                section.problem(
                    "socket",
                    f"{socket_path} {where} {place.what} ({place.path}): medgw would delete "
                    "or overlay it to make the API socket",
                    'give the socket a path of its own, e.g. socket = "/run/medgw/api.sock"',
                )
                break
    listen = _parse_listen(section, listen_text) if listen_text else None
    if not socket_text and not listen_text:
        section.problem(
            "socket",
            "[api] has neither socket nor listen: the API would not be reachable",
            'add socket = "/run/medgw/api.sock" and/or listen = "127.0.0.1:8470", '
            "or remove the [api] table",
        )
    known = {p.name for p in peers}
    clients: list[ApiClient] = []
    names: set[str] = set()
    hashes_seen: set[str] = set()
    for item in section.tables("clients"):
        name = item.string("name", example='"ris"')
        if name and not _CLIENT_NAME.match(name):
            item.problem(
                "name",
                f"{name!r} must be 1-64 letters, digits, '.', '_' or '-'",
                'name the internal system, e.g. "ris" or "lab-lis"',
            )
        elif name in names:
            item.problem("name", f"client {name!r} is listed twice", "give each client one entry")
        names.add(name)
        token_sha256 = item.string("token_sha256", example='"<64 hex digits>"').lower()
        if token_sha256 and not _SHA256_HEX.match(token_sha256):
            item.problem(
                "token_sha256",
                "must be the 64 hex digits of the token's SHA-256",
                "run `medgw api token` and paste the token_sha256 line it prints",
            )
        elif token_sha256 in hashes_seen:
            item.problem(
                "token_sha256",
                "the same token is configured for two clients: it would not identify one",
                "give each client its own token (`medgw api token`)",
            )
        hashes_seen.add(token_sha256)
        allowed = item.string_list("peers", empty_fix="name the peers this client may send to")
        for peer_name in allowed:
            if peer_name not in known:
                item.problem(
                    "peers",
                    f"no peer named {peer_name!r}",
                    f"use peer names from peers.d/ ({', '.join(sorted(known)) or 'none yet'})",
                )
        item.finish()
        clients.append(ApiClient(name, token_sha256, tuple(allowed)))
    section.finish()
    return ApiSettings(
        socket=socket_path,
        address=listen[0] if listen else None,
        port=listen[1] if listen else None,
        clients=tuple(clients),
    )


def _check_peer_uniqueness(reader: _Reader, peers: list[Peer], own_as2_id: str) -> None:
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
