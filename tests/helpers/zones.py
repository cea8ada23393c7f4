"""Sites in several network zones, each a real gateway with its own certificates, and
AS2 messages and TLS connections between them."""

from __future__ import annotations

import json
import socket
import ssl
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.serialization import Encoding

from gateway.as2.headers import new_message_id
from gateway.as2.message import MessageSpec, build_message
from gateway.pki.issue import Issued, issue, make_ca, write_pem
from gateway.pki.keypair import KeyPair
from gateway.policy import AlgorithmPolicy


def set_site_runtime(site_config: Path, **values: int) -> None:
    """Set `[runtime]` keys the config file already has (Site.write writes them)."""
    lines = site_config.read_text().splitlines()
    for key, value in values.items():
        lines = [f"{key} = {value}" if line.startswith(f"{key} =") else line for line in lines]
    site_config.write_text("\n".join(lines) + "\n")


NOW = datetime.now(UTC).replace(microsecond=0)


@dataclass
class Site:
    """One institution's installation: its certificates and (once written) its config."""

    name: str
    as2_id: str
    root: Path
    ca: Issued
    tls: Issued
    sign: Issued
    encrypt: Issued
    zones: list[dict[str, Any]] = field(default_factory=list)
    listeners: list[dict[str, Any]] = field(default_factory=list)
    peers: list[tuple[Site, str, str]] = field(default_factory=list)  # (peer, zone, url)

    @classmethod
    def make(cls, root: Path, name: str, as2_id: str, ca: Issued, ips: list[str]) -> Site:
        def one(purpose: str) -> Issued:
            return issue(
                ca,
                as2_id,
                purpose=purpose,
                now=NOW,
                ip_addresses=ips if purpose == "tls" else (),
                dns_names=("localhost",) if purpose == "tls" else (),
            )

        site = cls(
            name, as2_id, root / name, ca, one("tls"), one("smime-sign"), one("smime-encrypt")
        )
        certs = site.root / "certs"
        certs.mkdir(parents=True, mode=0o700)
        write_pem(certs / "ca.crt", ca.certificate)
        for role in ("tls", "sign", "encrypt"):
            pair: Issued = getattr(site, role)
            write_pem(certs / f"{role}.crt", pair.certificate)
            write_pem(certs / f"{role}.key", pair.key)
        return site

    @property
    def config_path(self) -> Path:
        return self.root / "gateway.toml"

    @property
    def audit_log(self) -> Path:
        return self.root / "audit" / "audit.jsonl"

    def pair(self, role: str) -> KeyPair:
        base = self.root / "certs"
        issued: Issued = getattr(self, role)
        return KeyPair(base / f"{role}.crt", base / f"{role}.key", issued.certificate, issued.key)

    def trust(self, other: Site) -> str:
        """Store ``other``'s CA certificate here; the path for a zone's trust_anchors."""
        path = self.root / "certs" / "anchors" / f"{other.name}-ca.crt"
        path.parent.mkdir(parents=True, exist_ok=True)
        write_pem(path, other.ca.certificate)
        return str(path)

    def zone(self, name: str, egress: list[str], anchors: list[Site], **extra: Any) -> None:
        self.zones.append(
            {
                "name": name,
                "kind": extra.pop("kind", "closed-network"),
                "egress": egress,
                "trust_anchors": [self.trust(a) for a in anchors],
                "revocation": "off",
                **extra,
            }
        )

    def listen(self, name: str, address: str, port: int, zone: str) -> None:
        self.listeners.append(
            {"name": name, "address": address, "port": port, "path": "/as2", "zone": zone}
        )

    def peer(self, other: Site, zone: str, url: str) -> None:
        self.peers.append((other, zone, url))

    def write(self, *, gateway_extra: str = "") -> Path:
        lines = [
            "[gateway]",
            f"name = {toml_string(self.name)}",
            f"as2_id = {toml_string(self.as2_id)}",
            "",
            "[tls]",
            'certificate = "certs/tls.crt"',
            'key = "certs/tls.key"',
            "",
            "[smime]",
            'signing_certificate = "certs/sign.crt"',
            'signing_key = "certs/sign.key"',
            'encryption_certificate = "certs/encrypt.crt"',
            'encryption_key = "certs/encrypt.key"',
            "",
        ]
        for table, entries in (("zones", self.zones), ("listeners", self.listeners)):
            for entry in entries:
                lines.append(f"[[{table}]]")
                lines += [f"{key} = {toml_string(value)}" for key, value in entry.items()]
                lines.append("")
        lines += [
            "[[responsible]]",  # who to call (NET-6b): without, check-config warns
            'name = "Zone Admin"',
            'role = "network administrator"',
            'contact = "ext. 1"',
            'responsible_for = ["communication", "encryption", "authentication"]',
            "",
            "[storage]",
            'state_dir = "state"',
            'outbox_dir = "outbox"',
            'inbox_dir = "inbox"',
            'audit_log = "audit/audit.jsonl"',
            "",
            "[runtime]",
            "shutdown_deadline_seconds = 5",
            "outbox_poll_seconds = 0.2",
            "retry_initial_seconds = 1",
            "retry_max_seconds = 3",
            "connect_timeout_seconds = 5",
            "request_timeout_seconds = 30",
            'log_level = "info"',
        ]
        text = "\n".join(lines) + "\n" + gateway_extra
        self.config_path.write_text(text)
        peers_d = self.root / "peers.d"
        peers_d.mkdir(exist_ok=True)
        for old in peers_d.glob("*.toml"):
            old.unlink()
        for other, zone, url in self.peers:
            certs = self.root / "certs" / "peers" / other.name
            certs.mkdir(parents=True, exist_ok=True)
            for role in ("tls", "sign", "encrypt"):
                write_pem(certs / f"{role}.crt", getattr(other, role).certificate)
            (peers_d / f"{other.name}.toml").write_text(
                f"as2_id = {toml_string(other.as2_id)}\n"
                f"url = {toml_string(url)}\n"
                f"zone = {toml_string(zone)}\n"
                f'tls_certificates = ["certs/peers/{other.name}/tls.crt"]\n'
                f'signing_certificates = ["certs/peers/{other.name}/sign.crt"]\n'
                f'encryption_certificates = ["certs/peers/{other.name}/encrypt.crt"]\n'
            )
        return self.config_path


def new_ca(name: str) -> Issued:
    return make_ca(f"{name} CA", now=NOW, organization=f"{name} (test PKI)")


@dataclass
class World:
    """Hospital in two zones; the lab (own CA) in zone A, the pharmacy (own CA) in zone B."""

    hospital: Site
    lab: Site
    pharmacy: Site


def two_zone_world(
    root: Path,
    *,
    hospital_a: str,
    hospital_b: str,
    lab_ip: str,
    pharmacy_ip: str,
    net_a: str,
    net_b: str,
    ports: tuple[int, int, int, int],
) -> World:
    """Zone A is the lab's closed network, zone B the pharmacy chain's IP-VPN.

    The hospital's certificate comes from the lab's CA (both sides of zone A
    trust it); the pharmacy trusts that CA for the hospital only, and the
    hospital's zone B trusts only the pharmacy's CA.
    """
    ca_a, ca_b = new_ca("Zone A lab"), new_ca("Zone B pharmacy")
    hospital = Site.make(root, "hospital", "SAKURA-HOSPITAL", ca_a, [hospital_a, hospital_b])
    lab = Site.make(root, "lab", "KITA-LAB", ca_a, [lab_ip])
    pharmacy = Site.make(root, "pharmacy", "MIDORI-PHARMACY", ca_b, [pharmacy_ip])
    port_a, port_b, lab_port, pharmacy_port = ports

    hospital.zone("zone-a", [net_a], [lab], source_address=hospital_a)
    hospital.zone("zone-b", [net_b], [pharmacy], kind="ip-vpn", source_address=hospital_b)
    hospital.listen("zone-a", hospital_a, port_a, "zone-a")
    hospital.listen("zone-b", hospital_b, port_b, "zone-b")
    hospital.peer(lab, "zone-a", f"https://{lab_ip}:{lab_port}/as2")
    hospital.peer(pharmacy, "zone-b", f"https://{pharmacy_ip}:{pharmacy_port}/as2")

    lab.zone("hospital-line", [net_a], [hospital], source_address=lab_ip)
    lab.listen("hospital-line", lab_ip, lab_port, "hospital-line")
    lab.peer(hospital, "hospital-line", f"https://{hospital_a}:{port_a}/as2")

    pharmacy.zone("chain-vpn", [net_b], [hospital], kind="ip-vpn", source_address=pharmacy_ip)
    pharmacy.listen("chain-vpn", pharmacy_ip, pharmacy_port, "chain-vpn")
    pharmacy.peer(hospital, "chain-vpn", f"https://{hospital_b}:{port_b}/as2")
    for site in (hospital, lab, pharmacy):
        site.write()
    return World(hospital, lab, pharmacy)


def as2_message(
    sender: Site, receiver: Site, to_as2_id: str, payload: bytes, receipt_url: str | None = None
) -> Any:
    """What ``sender``'s gateway would POST, encrypted for ``receiver``, to ``to_as2_id``
    (``receipt_url``: asking for an asynchronous receipt there)."""
    return build_message(
        payload,
        MessageSpec(
            filename="result.hl7",
            content_type="application/hl7-v2",
            message_id=new_message_id(sender.as2_id),
            sender_as2_id=sender.as2_id,
            receiver_as2_id=to_as2_id,
            signing=sender.pair("sign"),
            recipients=(receiver.encrypt.certificate,),
            digest="sha256",
            cipher="aes-256-gcm",
            policy=AlgorithmPolicy(),
            at=datetime.now(UTC),
            receipt_url=receipt_url,
        ),
    )


def tls_connect(site: Site, anchor: Site, address: str, port: int) -> ssl.SSLSocket:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.load_verify_locations(cadata=anchor.ca.certificate.public_bytes(Encoding.PEM).decode())
    context.load_cert_chain(site.root / "certs" / "tls.crt", site.root / "certs" / "tls.key")
    raw = socket.create_connection((address, port), timeout=10)
    return context.wrap_socket(raw, server_hostname=address)


def send_as2(conn: ssl.SSLSocket, built: Any) -> None:
    head = "".join(f"{k}: {v}\r\n" for k, v in built.headers)
    length = len(built.body)
    conn.sendall(
        f"POST /as2 HTTP/1.1\r\nHost: x\r\n{head}Content-Length: {length}\r\n\r\n".encode()
        + built.body
    )


def post_as2(site: Site, address: str, port: int, built: Any, *, until: bytes) -> bytes:
    """POST ``built`` from ``site`` (trusting its own CA) to ``address:port``; what the
    server answers, read until ``until`` is in it or the server closes."""
    conn = tls_connect(site, site, address, port)
    try:
        send_as2(conn, built)
        answer = b""
        while until not in answer:
            chunk = conn.recv(65536)
            if not chunk:
                break
            answer += chunk
        return answer
    finally:
        conn.close()


def toml_string(value: Any) -> str:
    return json.dumps(value)


def handshake_refused(site: Site, anchor: Site, address: str, port: int) -> bool:
    """True when the server refuses ``site``'s certificate (TLS 1.3: seen on the first read)."""
    try:
        conn = tls_connect(site, anchor, address, port)
    except (ssl.SSLError, ConnectionError):
        return True
    try:
        conn.sendall(b"POST /as2 HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n")
        return conn.recv(100) == b""
    except (ssl.SSLError, ConnectionError):
        return True
    finally:
        conn.close()
