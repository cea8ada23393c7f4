"""Network zones and routes: pure functions, no I/O (NET-4, NET-8).

A *zone* is one network the gateway is attached to: a closed network, an
IP-VPN, or the internet.  Every peer belongs to exactly one zone, and every
listener serves exactly one zone.  The gateway is an end point, never a router
between zones, and this module is where that is decided:

* :func:`admit` -- a peer is accepted only on a listener of its own zone;
* :func:`route_inbound` -- a message from a peer is delivered locally, or
  refused: medgw does not forward messages, so a message addressed to another
  peer (transit) is always refused, and audited as an alert when it would
  cross zones;
* :func:`check_enqueue` -- the invariant the spool enforces where messages are
  enqueued: a message that came in from zone A is never queued for a peer of
  zone B, even if every other check were bypassed;
* :func:`handover_reason` -- why a connection of the internal side would reach
  a zone or this gateway itself.

The configuration rules built on these (every problem naming the file, the key
and the fix) are :mod:`gateway.config.network_rules`; the proof table
``medgw check-config`` prints is :mod:`gateway.report`.

Every refusal is a :class:`Refusal`, which knows the audit event to emit, so
no caller can refuse without saying so in the audit trail.

Peer URLs with a literal IP address are checked against their zone's egress
ranges when the configuration is loaded.  A host name cannot be checked then
(DNS answers change), so each address it resolves to is checked at every
connect instead (:func:`egress_allows`, used by the channel's resolver);
addresses outside the egress are never connected to.

What a zone *reaches*: the addresses inside its egress ranges, except those on
this host (loopback, the any-address), which never leave it; on this host a
zone reaches only its endpoints, its listeners and its peers' URLs (address
and port).  Two zones never reach the same address (their egress ranges may
not overlap), and the internal side (the hand-over, the local API) reaches
nothing a zone reaches.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar
from urllib.parse import urlsplit

from gateway.audit.events import AuditEvent, EventType, Outcome, Severity
from gateway.errors import InvalidValueError, RoutingError

Network = ipaddress.IPv4Network | ipaddress.IPv6Network
Address = ipaddress.IPv4Address | ipaddress.IPv6Address


class ZonedPeer(Protocol):
    """What routing needs to know about a peer (``gateway.config.Peer`` is one)."""

    @property
    def name(self) -> str: ...

    @property
    def as2_id(self) -> str: ...

    @property
    def zone(self) -> str: ...


class EgressZone(Protocol):
    """What the egress rules need to know about a zone (``gateway.config.Zone`` is one)."""

    @property
    def name(self) -> str: ...

    @property
    def egress(self) -> tuple[Network, ...]: ...


_Z = TypeVar("_Z", bound=EgressZone)


class Listener(Protocol):
    """What the address rules need to know about a listener (``gateway.config.Listener``)."""

    @property
    def name(self) -> str: ...

    @property
    def address(self) -> str: ...

    @property
    def port(self) -> int: ...

    @property
    def zone(self) -> str: ...


@dataclass(frozen=True)
class Origin:
    """Where a queued message came from: local intake, or a peer of some zone."""

    peer: str | None = None
    zone: str | None = None

    def __post_init__(self) -> None:
        if (self.peer is None) != (self.zone is None):
            raise InvalidValueError(
                f"origin peer={self.peer!r}, zone={self.zone!r}: an inbound origin names both "
                "the peer and its zone, a local one neither",
                fix="give both the peer and its zone, or neither (LOCAL_INTAKE)",
            )

    @property
    def is_local(self) -> bool:
        return self.peer is None

    def __str__(self) -> str:
        if self.is_local:
            return "local intake"
        return f"inbound from peer {self.peer!r} (zone {self.zone!r})"


LOCAL_INTAKE = Origin()


@dataclass(frozen=True)
class Refusal:
    """A routing decision against a message or a connection, with its audit event."""

    event: EventType
    rule: str
    reason: str
    detail: dict[str, Any] = field(default_factory=dict)

    def audit_event(
        self,
        *,
        direction: str,
        peer: str | None = None,
        message_id: str | None = None,
        remote_address: str | None = None,
    ) -> AuditEvent:
        return AuditEvent(
            self.event,
            Outcome.FAILURE,
            Severity.ALERT,
            peer=peer,
            message_id=message_id,
            direction=direction,
            remote_address=remote_address,
            reason=self.reason,
            detail={"rule": self.rule, **self.detail},
        )


@dataclass(frozen=True)
class LocalDelivery:
    """The only place a message from a peer may go: this institution's inbox."""


class TransitRefused(RoutingError):
    """The spool refused to queue a message that would cross from one zone to another."""

    def __init__(self, refusal: Refusal) -> None:
        super().__init__(
            refusal.reason,
            fix="medgw never passes messages between zones (NET-4); deliver locally instead",
        )
        self.refusal = refusal


# -- decisions ----------------------------------------------------------------------


def admit(listener_name: str, listener_zone: str, peer: ZonedPeer) -> Refusal | None:
    """A peer may talk to us only on a listener of its own zone."""
    if peer.zone == listener_zone:
        return None
    return Refusal(
        EventType.ZONE_VIOLATION,
        "NET-4 listener binding",
        f"peer {peer.name!r} belongs to zone {peer.zone!r} but connected to listener "
        f"{listener_name!r} of zone {listener_zone!r}",
        {"listener": listener_name, "listener_zone": listener_zone, "peer_zone": peer.zone},
    )


def route_inbound(
    own_as2_id: str, sender: ZonedPeer, as2_to: str, peers: Iterable[ZonedPeer]
) -> LocalDelivery | Refusal:
    """Where a message from ``sender`` addressed to ``as2_to`` goes: here, or nowhere."""
    if as2_to == own_as2_id:
        return LocalDelivery()
    target = next((p for p in peers if p.as2_id == as2_to), None)
    if target is None:
        return Refusal(
            EventType.MESSAGE_REJECTED,
            "AS2-To",
            f"AS2-To {as2_to!r} is not this gateway ({own_as2_id!r})",
        )
    detail = {"to_peer": target.name, "from_zone": sender.zone, "to_zone": target.zone}
    if target.zone != sender.zone:
        return Refusal(
            EventType.TRANSIT_REFUSED,
            "NET-4 no transit between zones",
            f"peer {sender.name!r} (zone {sender.zone!r}) addressed a message to peer "
            f"{target.name!r} (zone {target.zone!r}) through this gateway; medgw never "
            "passes messages between zones",
            detail,
        )
    return Refusal(
        EventType.TRANSIT_REFUSED,
        "no forwarding",
        f"peer {sender.name!r} addressed a message to peer {target.name!r} through this "
        "gateway; medgw delivers inbound messages locally only and does not forward",
        detail,
    )


def check_enqueue(origin: Origin, destination_peer: str, destination_zone: str | None) -> None:
    """Raise :class:`TransitRefused` unless ``origin`` may be queued for the destination."""
    if origin.is_local:
        return
    if destination_zone is not None and origin.zone == destination_zone:
        return
    raise TransitRefused(
        Refusal(
            EventType.TRANSIT_REFUSED,
            "NET-4 no transit between zones",
            f"refused to queue a message {origin} for peer {destination_peer!r} "
            f"(zone {destination_zone!r}): it would cross zones",
            {
                "origin_peer": origin.peer,
                "from_zone": origin.zone,
                "to_peer": destination_peer,
                "to_zone": destination_zone,
            },
        )
    )


def ip_of(text: str) -> Address | None:
    """The IP address ``text`` names, or None when it is not a literal address.

    The scope of a link-local IPv6 address is dropped, and an IPv4-mapped IPv6
    address (``::ffff:10.1.2.3``) is the IPv4 address it reaches: judged by the
    IPv4 ranges, never by an IPv6 range such as ``::/0``.
    """
    try:
        ip = ipaddress.ip_address(text.split("%", 1)[0])
    except ValueError:
        return None
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


def in_ranges(ranges: Iterable[Network], ip: Address) -> bool:
    return any(ip in network for network in ranges if network.version == ip.version)


def egress_allows(egress: Sequence[Network], address: str) -> bool:
    """True when ``address`` (a literal IP) lies inside one of the egress ranges."""
    ip = ip_of(address)
    return ip is not None and in_ranges(egress, ip)


def zones_holding(zones: Iterable[EgressZone], address: str) -> list[str]:
    """The names of the zones whose egress ranges hold ``address`` (a literal IP), in
    the given order: one zone, none (the internal side or nowhere), or several where
    egress ranges overlap."""
    return [zone.name for zone in zones if egress_allows(zone.egress, address)]


def url_address(url: str) -> Address | None:
    """The literal IP address in ``url``, or None for a host name."""
    return ip_of(urlsplit(url).hostname or "")


def on_this_host(ip: Address) -> bool:
    """A loopback or any-address destination: a connection to it never leaves this host."""
    return ip.is_loopback or ip.is_unspecified


# -- where addresses lead -----------------------------------------------------------


@dataclass(frozen=True)
class OwnListener:
    """A TCP listener of this gateway: an AS2 listener of a zone, or the local API."""

    what: str
    address: Address
    port: int
    zone: str | None  # None: the local API (the internal side)


def own_listeners(
    listeners: Sequence[Listener],
    api: tuple[str, int] | None,
    others: Sequence[tuple[str, tuple[str, int]]] = (),
) -> list[OwnListener]:
    """Our listeners: the zones', the local API's TCP port, and ``others`` (what, endpoint),
    such as the metrics port."""
    own = []
    for listener in listeners:
        ip = ip_of(listener.address)
        if ip is not None:
            what = f"listener {listener.name!r} (zone {listener.zone!r})"
            own.append(OwnListener(what, ip, listener.port, listener.zone))
    if api is not None:
        ip = ip_of(api[0])
        if ip is not None:
            own.append(OwnListener("the local API ([api] listen)", ip, api[1], None))
    for what, (address, port) in others:
        ip = ip_of(address)
        if ip is not None:
            own.append(OwnListener(what, ip, port, None))
    return own


def listener_at(
    own: Sequence[OwnListener], ip: Address, port: int, host: Iterable[Address] = ()
) -> OwnListener | None:
    """Our listener a connection to ``ip``:``port`` would reach; ``host``: this host's
    other known addresses (zone source addresses), which a wildcard listener serves too."""
    local = on_this_host(ip) or ip in set(host) or any(o.address == ip for o in own)
    for item in own:
        if item.port != port:
            continue
        if item.address == ip or (local and (item.address.is_unspecified or ip.is_unspecified)):
            return item
    return None


def endpoint(url: str, resolved: Mapping[str, Sequence[str]]) -> tuple[list[Address], int] | None:
    """The addresses and the port a connection to ``url`` reaches; None when its host is
    a name that could not be resolved (or the URL does not parse)."""
    try:
        parts = urlsplit(url)
        port = parts.port or (443 if parts.scheme.lower() == "https" else 80)
    except ValueError:
        return None
    host = parts.hostname or ""
    literal = ip_of(host)
    if literal is not None:
        return [literal], port
    found = [ip for ip in (ip_of(a) for a in resolved.get(host, ())) if ip is not None]
    return (found, port) if found else None


def hosts_to_resolve(urls: Iterable[str]) -> set[str]:
    """The host names (not literal addresses) in ``urls``."""
    hosts = set()
    for url in urls:
        try:
            host = urlsplit(url).hostname
        except ValueError:
            continue
        if host and ip_of(host) is None:
            hosts.add(host)
    return hosts


def zones_reaching(zones: Sequence[_Z], ip: Address) -> list[_Z]:
    """The zones whose network ``ip`` is in (never an address on this host)."""
    if on_this_host(ip):
        return []
    holding = zones_holding(zones, str(ip))
    return [zone for zone in zones if zone.name in holding]


def ranges_text(zone: EgressZone) -> str:
    return ", ".join(str(n) for n in zone.egress)


def handover_reason(
    ip: Address,
    port: int,
    zones: Sequence[EgressZone],
    own: Sequence[OwnListener],
    host: Sequence[Address],
    peer_endpoints: Mapping[tuple[Address, int], ZonedPeer],
) -> str | None:
    """Why a connection of the hand-over (the internal side) to ``ip``:``port`` would
    reach a zone or this gateway, or None when it stays on the internal side; judged
    when the configuration is loaded and again by the connect path at every connect."""
    hit = listener_at(own, ip, port, host)
    if hit is not None:
        return f"which is {hit.what} of this gateway"
    reaching = zones_reaching(zones, ip)
    if reaching:
        zone = reaching[0]
        return f"inside the egress of zone {zone.name!r} ({ranges_text(zone)})"
    peer = peer_endpoints.get((ip, port))
    if peer is not None:
        return f"the AS2 endpoint of peer {peer.name!r} (zone {peer.zone!r}) on this host"
    return None
