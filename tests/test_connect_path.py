"""The one connect path (NET-4): every outbound connection the gateway makes is checked,
at connect time, against the current configuration's zones."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

from gateway.routing import Network, zones_holding


@dataclass(frozen=True)
class _Zone:
    name: str
    egress: tuple[Network, ...]


def _zone(name: str, *ranges: str) -> _Zone:
    return _Zone(name, tuple(ipaddress.ip_network(r) for r in ranges))


def test_zones_holding_names_every_zone_whose_egress_holds_the_address() -> None:
    zones = [
        _zone("a", "10.1.0.0/16", "2001:db8:1::/48"),
        _zone("b", "10.2.0.0/16"),
        _zone("wide", "10.0.0.0/8"),
    ]
    assert zones_holding(zones, "10.1.2.3") == ["a", "wide"]
    assert zones_holding(zones, "10.2.0.1") == ["b", "wide"]
    assert zones_holding(zones, "2001:db8:1::5") == ["a"]
    assert zones_holding(zones, "fe80::1%eth0") == []
    assert zones_holding(zones, "192.168.1.1") == []
    assert zones_holding(zones, "not-an-address") == []
