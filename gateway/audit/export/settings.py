"""``[audit.export]``: where the audit trail is exported to, and how (see README, "Audit export").

::

    [audit.export]
    collector = "siem.hospital.example:6514"   # host:port of a syslog-over-TLS collector
    ca = "/etc/medgw/monitoring-ca.crt"        # the CA of the collector's certificate
    format = "atna"                            # or "fhir"
    certificate = "/etc/medgw/audit-client.crt"  # optional: default the [tls] certificate
    key = "/etc/medgw/audit-client.key"
    server_name = "siem.hospital.example"      # optional: default the collector's host
    min_version = "1.3"                        # or "1.2"
    hostname = "medgw-1"                       # optional: default this host's name
    max_backlog_mib = 1024                     # unexported records kept waiting
"""

from __future__ import annotations

import socket
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509

from gateway.pki.keypair import KeyPair
from gateway.tomlreader import Reader, Section

FORMATS = ("atna", "fhir")
DEFAULT_PORT = 6514  # RFC 5425
MIB = 1024 * 1024


@dataclass(frozen=True)
class ExportSettings:
    host: str
    port: int
    server_name: str
    message_format: str  # "atna" or "fhir"
    ca: Path
    ca_certificates: tuple[x509.Certificate, ...]
    identity: KeyPair | None  # None: the [tls] identity
    min_version: str
    hostname: str
    max_backlog_bytes: int

    @property
    def collector(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"


def parse_collector(value: str) -> tuple[str, int] | None:
    """``host:port``, ``[v6]:port`` or a host alone (port 6514)."""
    host, port_text = value, ""
    if value.startswith("["):
        host, _, rest = value[1:].partition("]")
        port_text = rest.removeprefix(":") if rest.startswith(":") or not rest else "x"
    elif value.count(":") == 1:
        host, port_text = value.split(":")
    if not host or (port_text and not port_text.isdigit()):
        return None
    port = int(port_text) if port_text else DEFAULT_PORT
    if not 1 <= port <= 65535:
        return None
    return host, port


def load_export(reader: Reader, section: Section) -> ExportSettings | None:
    """Read ``[audit.export]``; problems go to ``reader`` (None when it is unusable)."""
    collector_text = section.string("collector", example='"siem.hospital.example:6514"')
    collector = parse_collector(collector_text) if collector_text else None
    if collector_text and collector is None:
        section.problem(
            "collector",
            f"{collector_text!r} is not host:port",
            'write it as "siem.hospital.example:6514" (6514 is syslog over TLS, RFC 5425)',
        )
    message_format = section.choice("format", FORMATS, default="atna")
    ca_path = reader.path(section.string("ca", example='"/etc/medgw/monitoring-ca.crt"'))
    anchors = reader.certificates(section, "ca", ca_path) if section.has("ca") else []
    identity = None
    if section.has("certificate") or section.has("key"):
        identity = reader.key_pair(section, "certificate", "key")
    else:
        section.mark_seen("certificate")
        section.mark_seen("key")
    server_name = section.string("server_name", default="")
    min_version = section.choice("min_version", ("1.3", "1.2"), default="1.3")
    hostname = section.string("hostname", default="") or socket.gethostname()
    backlog = section.number("max_backlog_mib", default=1024, minimum=0.01, maximum=1 << 20)
    section.finish()
    if collector is None or not anchors:
        return None
    host, port = collector
    server_name = server_name or host  # an IP address: checked against its IP entry
    return ExportSettings(
        host=host,
        port=port,
        server_name=server_name,
        message_format=message_format,
        ca=ca_path,
        ca_certificates=tuple(anchors),
        identity=identity,
        min_version=min_version,
        hostname=hostname,
        max_backlog_bytes=int(backlog * MIB),
    )
