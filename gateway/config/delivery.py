"""``[delivery]``: the hand-over of received documents to an internal system."""

from __future__ import annotations

import ipaddress
import ssl
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from cryptography import x509

from gateway.config.peers import Peer
from gateway.pki.tls import delivery_tls_context
from gateway.tomlreader import Reader, Section


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


def _check_internal_url(reader: Reader, item: Section, key: str, url: str) -> None:
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


def load_delivery(reader: Reader, section: Section, peers: list[Peer]) -> DeliverySettings:
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
