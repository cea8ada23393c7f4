"""Routes of the connect path (gateway.egress) for tests of one layer alone."""

from __future__ import annotations

import ipaddress

from gateway.egress import Network, NetworkMap, Route, ZonePath


def zone_route(
    source: str | None, *ranges: str, listeners: tuple[tuple[str, int], ...] = ()
) -> Route:
    """The route of zone ``z`` (source address, egress ranges) of a fixed network map."""
    egress = tuple(ipaddress.ip_network(r) for r in ranges)
    return Network.fixed(NetworkMap({"z": ZonePath(source, egress)}, listeners)).zone("z")
