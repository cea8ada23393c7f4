"""The rules that span the sections (NET-4, NET-8): zones, listeners, peers' URLs
and the hand-over, judged together.  Each problem names the file, the key and
the fix.

* :func:`zone_problems` -- zones defined once, with egress ranges that do not
  overlap and a source address of their own; every listener and peer in a
  defined zone; a peer's literal address inside its zone's egress;
* :func:`reach_problems` -- where each configured URL leads: a peer's URLs
  never to one of our own listeners (nor receipts into another zone), the
  hand-over to an internal system never into a zone;
* :func:`network_problems` -- both, as loading applies them.  It is the one
  step of loading that uses the network: each host name in a peer or hand-over
  URL is resolved (:func:`gateway.egress.resolve_hosts`) and judged by the
  addresses it has now; every connect judges them again.

The address arithmetic these rules share with the connect path is
:mod:`gateway.routing`.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from urllib.parse import urlsplit

from gateway.config.api import ApiSettings
from gateway.config.delivery import DeliverySettings
from gateway.config.listeners import Listener
from gateway.config.peers import Peer
from gateway.config.zones import Zone
from gateway.egress import resolve_hosts
from gateway.errors import ConfigProblem
from gateway.routing import (
    Address,
    EgressZone,
    OwnListener,
    egress_allows,
    endpoint,
    handover_reason,
    hosts_to_resolve,
    in_ranges,
    ip_of,
    listener_at,
    own_listeners,
    ranges_text,
    url_address,
    zones_reaching,
)
from gateway.tomlreader import Reader


def network_problems(
    reader: Reader,
    source: Path,
    zones: Sequence[Zone],
    listeners: Sequence[Listener],
    peers: Sequence[Peer],
    api: ApiSettings | None,
    delivery: DeliverySettings | None,
    others: Sequence[tuple[str, tuple[str, int]]] = (),
) -> dict[str, tuple[str, ...]]:
    """The zone rules (NET-4) and where each configured URL leads, judged with the
    addresses its host name resolves to now; returns those addresses."""
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
            others,
        )
    )
    return resolved


def _parses(url: str) -> bool:
    try:
        _ = urlsplit(url).port  # a port that is not a number 1-65535 raises ValueError
    except ValueError:
        return False
    return True


def zone_problems(
    gateway_file: Path,
    zones: Sequence[Zone],
    listeners: Sequence[Listener],
    peers: Sequence[Peer],
) -> list[ConfigProblem]:
    """Every violation of the zone rules; ``zones``/``listeners`` in file order."""
    problems: list[ConfigProblem] = []

    def add(file: Path, key: str, message: str, fix: str, severity: str = "error") -> None:
        problems.append(ConfigProblem(str(file), key, message, fix, severity))

    names = [z.name for z in zones]
    by_name: dict[str, Zone] = {}
    for index, zone in enumerate(zones):
        if zone.name in by_name:
            add(
                gateway_file,
                f"zones[{index}].name",
                f"zone {zone.name!r} is defined twice",
                "give every [[zones]] table its own name",
            )
        by_name.setdefault(zone.name, zone)
    known = ", ".join(names) or "(none)"
    problems += _egress_overlaps(gateway_file, zones)

    shared_source: dict[str, str] = {}
    for index, zone in enumerate(zones):
        if zone.source_address is None:
            if len(zones) > 1:
                add(
                    gateway_file,
                    f"zones[{index}].source_address",
                    f"outbound connections of zone {zone.name!r} leave from whatever address "
                    "the operating system's routing picks",
                    "set source_address to this host's address on that zone's network",
                    "warning",
                )
            continue
        other = shared_source.get(zone.source_address)
        if other is not None and other != zone.name:
            add(
                gateway_file,
                f"zones[{index}].source_address",
                f"zones {other!r} and {zone.name!r} both send from {zone.source_address}: "
                "one interface would carry two zones",
                "give each zone the address of its own interface",
            )
        shared_source.setdefault(zone.source_address, zone.name)

    address_zone: dict[str, tuple[str, str]] = {}
    for index, listener in enumerate(listeners):
        if listener.zone not in by_name:
            if not listener.zone:
                continue  # reported as a missing key where it is read
            add(
                gateway_file,
                f"listeners[{index}].zone",
                f"listener {listener.name!r} names zone {listener.zone!r}, which is not defined",
                f"set zone to one of: {known}, or add a [[zones]] table for it",
            )
            continue
        try:
            ip = ipaddress.ip_address(listener.address)
        except ValueError:
            continue  # reported where the address is read
        if ip.is_unspecified:
            many = len(zones) > 1
            add(
                gateway_file,
                f"listeners[{index}].address",
                f"listener {listener.name!r} binds {listener.address}, i.e. every interface"
                + (
                    f": it is reachable from every zone ({known}), not only {listener.zone!r}"
                    if many
                    else ", including networks that are not zone " + repr(listener.zone)
                ),
                f"bind the address of zone {listener.zone!r}'s interface only",
                "error" if many else "warning",
            )
        seen = address_zone.get(str(ip))
        if seen is not None and seen[0] != listener.zone:
            add(
                gateway_file,
                f"listeners[{index}].address",
                f"listeners {seen[1]!r} (zone {seen[0]!r}) and {listener.name!r} "
                f"(zone {listener.zone!r}) share the address {ip}: one listener address "
                "would serve two zones",
                "give each zone's listener the address of that zone's interface",
            )
        address_zone.setdefault(str(ip), (listener.zone, listener.name))

    for peer in peers:
        peer_zone = by_name.get(peer.zone)
        if peer_zone is None:
            if peer.zone:
                add(
                    peer.source,
                    "zone",
                    f"peer {peer.name!r} names zone {peer.zone!r}, which gateway.toml does "
                    "not define",
                    f"set zone to one of: {known}",
                )
            continue
        address = url_address(peer.url)
        if address is None or not peer_zone.egress:
            continue  # host names are checked against the egress at every connect
        if not egress_allows(peer_zone.egress, str(address)):
            ranges = ", ".join(str(n) for n in peer_zone.egress)
            add(
                peer.source,
                "url",
                f"{peer.url!r} points at {address}, outside the egress ranges of zone "
                f"{peer_zone.name!r} ({ranges}): the connection would leave through another "
                "network",
                f"correct the url, move the peer to the zone whose network holds {address}, "
                f"or add that range to zone {peer_zone.name!r}'s egress",
            )
    return problems


def _egress_overlaps(gateway_file: Path, zones: Sequence[Zone]) -> list[ConfigProblem]:
    """Two zones may not reach one address: the proof could not say which network a
    connection to it leaves by, and a peer of one zone could be reached from the other."""
    problems = []
    for index, later in enumerate(zones):
        for earlier in zones[:index]:
            if earlier.name == later.name:
                continue  # reported as a zone defined twice
            shared = [
                (a, b)
                for a in earlier.egress
                for b in later.egress
                if a.version == b.version and a.overlaps(b)
            ]
            if not shared:
                continue
            narrow = [b if b.prefixlen >= a.prefixlen else a for a, b in shared]
            wider = earlier if shared[0][0].prefixlen < shared[0][1].prefixlen else later
            other = later if wider is earlier else earlier
            both = ", ".join(f"{a} and {b}" if a != b else str(a) for a, b in shared)
            problems.append(
                ConfigProblem(
                    str(gateway_file),
                    f"zones[{index}].egress",
                    f"the egress of zones {earlier.name!r} and {later.name!r} overlap ({both}): "
                    f"an address in {', '.join(str(n) for n in narrow)} would belong to two "
                    "zones, so a connection to it could leave by either network (NET-4)",
                    f"give each zone only the ranges of its own network; when zone "
                    f"{wider.name!r} is wider (e.g. the internet), keep zone {other.name!r}'s "
                    f"ranges out of it with egress_except = "
                    "[" + ", ".join(f'"{n}"' for n in narrow) + "]",
                )
            )
    return problems


def reach_problems(
    gateway_file: Path,
    zones: Sequence[Zone],
    listeners: Sequence[Listener],
    api: tuple[str, int] | None,
    peers: Sequence[Peer],
    handover: Sequence[tuple[str, str]],
    resolved: Mapping[str, Sequence[str]],
    others: Sequence[tuple[str, tuple[str, int]]] = (),
) -> list[ConfigProblem]:
    """Where each configured URL leads (host names as ``resolved``, host -> addresses).

    A peer's ``url`` must not be one of our own listeners (of any zone, or the local
    API); its ``async_receipt_url`` (ours, as the peer reaches us) must not be a
    listener of another zone, the local API, or inside another zone's egress.  A
    hand-over URL (``handover``: key, url) must reach nothing a zone reaches: no
    address inside a zone's egress, none of our listeners, and no peer's endpoint
    on this host.
    """
    problems: list[ConfigProblem] = []
    own = own_listeners(listeners, api, others)
    host = [ip for ip in (ip_of(z.source_address or "") for z in zones) if ip is not None]
    peer_endpoints: dict[tuple[Address, int], Peer] = {}

    for peer in peers:
        found = endpoint(peer.url, resolved) if peer.url else None
        if found is not None:
            addresses, port = found
            for ip in addresses:
                peer_endpoints.setdefault((ip, port), peer)
            hits = [(ip, hit) for ip in addresses if (hit := listener_at(own, ip, port, host))]
            if hits:
                ip, hit = hits[0]
                across = f", from zone {peer.zone!r} into another" if hit.zone != peer.zone else ""
                problems.append(
                    ConfigProblem(
                        str(peer.source),
                        "url",
                        f"{peer.url!r} reaches {ip} port {port}, which is {hit.what} of this "
                        f"gateway: medgw would send this peer's messages to itself{across}",
                        "set url to the peer's own AS2 endpoint (its gateway's https URL)",
                    )
                )
            problems += _name_outside_egress(peer, zones, addresses)
        if peer.async_receipt_url:
            problems += _receipt_url_problems(peer, zones, own, host, resolved)

    for key, url in handover:
        if not url:
            continue
        found = endpoint(url, resolved)
        if found is None:
            problems.append(
                ConfigProblem(
                    str(gateway_file),
                    key,
                    f"the host of {url!r} cannot be resolved now, so it cannot be shown to "
                    "stay on the internal side (outside every zone's egress)",
                    "use the internal system's IP address, or make the name resolvable and "
                    "run check-config again",
                    "warning",
                )
            )
            continue
        addresses, port = found
        for ip in addresses:
            reason = handover_reason(ip, port, zones, own, host, peer_endpoints)
            if reason is not None:
                problems.append(
                    ConfigProblem(
                        str(gateway_file),
                        key,
                        f"{url!r} reaches {ip} port {port}, {reason}: received documents "
                        "would be handed over there, outside the zone's TLS and S/MIME "
                        "protection (NET-4: nothing received leaves into a zone)",
                        "hand over to an internal system outside every zone's egress (e.g. "
                        "http://127.0.0.1:PORT/path on this host); if that address is "
                        "internal, keep it out of the zone with egress_except",
                    )
                )
                break
    return problems


def _name_outside_egress(
    peer: Peer, zones: Sequence[EgressZone], addresses: Sequence[Address]
) -> list[ConfigProblem]:
    """A warning when the peer's host name resolves now to no address its zone may reach:
    every connection would be refused (a literal address outside is an error already)."""
    zone = next((z for z in zones if z.name == peer.zone), None)
    if url_address(peer.url) is not None or zone is None or not zone.egress:
        return []
    if any(in_ranges(zone.egress, ip) for ip in addresses):
        return []
    ranges = ", ".join(str(n) for n in zone.egress)
    return [
        ConfigProblem(
            str(peer.source),
            "url",
            f"the host of {peer.url!r} resolves now to {', '.join(map(str, addresses))}, none "
            f"inside the egress of zone {peer.zone!r} ({ranges}): every connection to it "
            "would be refused",
            "correct the url or the name's DNS entry, or add the peer's range to the zone's egress",
            "warning",
        )
    ]


def _receipt_url_problems(
    peer: Peer,
    zones: Sequence[Zone],
    own: Sequence[OwnListener],
    host: Sequence[Address],
    resolved: Mapping[str, Sequence[str]],
) -> list[ConfigProblem]:
    url = peer.async_receipt_url
    found = endpoint(url, resolved)
    if found is None:
        return []
    addresses, port = found
    for ip in addresses:
        hit = listener_at(own, ip, port, host)
        reason = None
        if hit is not None and hit.zone != peer.zone:
            reason = f"which is {hit.what} of this gateway"
        elif hit is None:
            others = [z for z in zones_reaching(zones, ip) if z.name != peer.zone]
            if others:
                reason = f"inside the egress of zone {others[0].name!r} ({ranges_text(others[0])})"
        if reason is not None:
            return [
                ConfigProblem(
                    str(peer.source),
                    "async_receipt_url",
                    f"{url!r} reaches {ip} port {port}, {reason}, but peer {peer.name!r} "
                    f"belongs to zone {peer.zone!r}: it would be asked to deliver its "
                    "receipts into another zone (NET-4)",
                    f"give the https URL of this gateway's listener of zone {peer.zone!r}, "
                    'as the peer reaches it, or "" for synchronous receipts',
                )
            ]
    return []
