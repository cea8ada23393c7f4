"""``[metrics]`` in gateway.toml: where the Prometheus and health endpoints listen.

Only a loopback address: the endpoints carry no TLS and no authentication (a
Prometheus scrape on the same host, or through the host's own agent, is the
common case), so they must never be reachable from a zone, or from any other
machine.  A remote Prometheus scrapes through an agent or proxy on this host.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Sequence
from dataclasses import dataclass

from gateway.config.listeners import Listener
from gateway.tomlreader import Section

DEFAULT_LISTEN = "127.0.0.1:9464"
METRICS_LISTENER = "the metrics endpoint ([metrics] listen)"  # what it is called in problems


@dataclass(frozen=True)
class MetricsSettings:
    address: str
    port: int

    @property
    def endpoint(self) -> tuple[str, int]:
        return self.address, self.port


def load_metrics(
    section: Section,
    listeners: Sequence[Listener],
    others: Sequence[tuple[str, tuple[str, int]]] = (),
) -> MetricsSettings | None:
    """The ``[metrics]`` table; ``others``: our other local endpoints (what, address:port),
    which the metrics port must not share."""
    value = section.string("listen", default=DEFAULT_LISTEN)
    section.finish()
    fix = 'write listen = "127.0.0.1:PORT" (a loopback address and a free port)'
    found = section.address_port("listen", value, fix)
    if found is None:
        return None
    host, address, port = found
    if not address.is_loopback:
        section.problem(
            "listen",
            f"{host} is not a loopback address: the metrics and health endpoints have no TLS "
            "and no authentication, so they are served on this host only",
            "listen on 127.0.0.1 (or ::1) and let a Prometheus agent on this host scrape it",
        )
        return None
    for listener in listeners:
        try:
            theirs = ipaddress.ip_address(listener.address)
        except ValueError:
            continue
        if listener.port == port and (theirs == address or theirs.is_unspecified):
            section.problem(
                "listen",
                f"{address} port {port} is also listener {listener.name!r} (zone "
                f"{listener.zone!r}): the zone's peers would reach the metrics",
                "give the metrics a port of their own",
            )
            return None
    for what, (other_host, other_port) in others:
        other = _ip(other_host)
        if other_port == port and other is not None and (other == address or other.is_unspecified):
            section.problem(
                "listen",
                f"{address} port {port} is also {what}",
                "give the metrics a port of their own",
            )
            return None
    return MetricsSettings(str(address), port)


def _ip(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        return ipaddress.ip_address(text)
    except ValueError:
        return None
