"""Routes of the connect path (gateway.egress) for tests of one layer alone."""

from __future__ import annotations

import ipaddress

from gateway.egress import Network, NetworkMap, Route, ZonePath
from gateway.routing import OwnListener


def listening(*endpoints: tuple[str, int]) -> tuple[OwnListener, ...]:
    """Our own listeners at ``(address, port)``, as zone ``z``'s."""
    return tuple(
        OwnListener(f"listener {index} (zone 'z')", ipaddress.ip_address(address), port, "z")
        for index, (address, port) in enumerate(endpoints)
    )


def zone_map(
    source: str | None, *ranges: str, listeners: tuple[tuple[str, int], ...] = ()
) -> NetworkMap:
    """One zone ``z`` (source address, egress ranges) and our listeners."""
    egress = tuple(ipaddress.ip_network(r) for r in ranges)
    return NetworkMap({"z": ZonePath(source, egress)}, listening(*listeners))


def zone_route(
    source: str | None, *ranges: str, listeners: tuple[tuple[str, int], ...] = ()
) -> Route:
    """The route of zone ``z`` of a fixed network map."""
    return Network.fixed(zone_map(source, *ranges, listeners=listeners)).zone("z")
