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
* :func:`zone_problems` -- the configuration rules (each problem names the
  file, the key and the fix);
* :func:`proof` -- the rows ``medgw check-config`` prints to show that NET-1
  and NET-4 hold for a loaded configuration.

Every refusal is a :class:`Refusal`, which knows the audit event to emit, so
no caller can refuse without saying so in the audit trail.

Peer URLs with a literal IP address are checked against their zone's egress
ranges when the configuration is loaded.  A host name cannot be checked then
(DNS answers change), so each address it resolves to is checked at every
connect instead (:func:`egress_allows`, used by the channel's resolver);
addresses outside the egress are never connected to.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol
from urllib.parse import urlsplit

from gateway.audit.events import AuditEvent, EventType, Outcome, Severity
from gateway.errors import ConfigProblem, RoutingError

if TYPE_CHECKING:
    from gateway.config import GatewayConfig, Listener, Zone

Network = ipaddress.IPv4Network | ipaddress.IPv6Network
ZONE_KINDS = ("closed-network", "ip-vpn", "internet")
REVOCATION_POLICIES = ("require", "prefer", "off")


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


class SourcedPeer(ZonedPeer, Protocol):
    @property
    def source(self) -> Path: ...

    @property
    def url(self) -> str: ...


@dataclass(frozen=True)
class Origin:
    """Where a queued message came from: local intake, or a peer of some zone."""

    peer: str | None = None
    zone: str | None = None

    def __post_init__(self) -> None:
        if (self.peer is None) != (self.zone is None):
            raise ValueError("an inbound origin names both the peer and its zone")

    @property
    def is_local(self) -> bool:
        return self.peer is None

    def __str__(self) -> str:
        if self.is_local:
            return "local intake"
        return f"inbound from peer {self.peer!r} (zone {self.zone!r})"


LOCAL_INTAKE = Origin()


def inbound_from(peer: ZonedPeer) -> Origin:
    return Origin(peer.name, peer.zone)


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


def egress_allows(egress: Sequence[Network], address: str) -> bool:
    """True when ``address`` (a literal IP) lies inside one of the egress ranges."""
    try:
        ip = ipaddress.ip_address(address.split("%", 1)[0])
    except ValueError:
        return False
    return any(ip in network for network in egress if network.version == ip.version)


def zones_holding(zones: Iterable[EgressZone], address: str) -> list[str]:
    """The names of the zones whose egress ranges hold ``address`` (a literal IP), in
    the given order: one zone, none (the internal side or nowhere), or several where
    egress ranges overlap."""
    return [zone.name for zone in zones if egress_allows(zone.egress, address)]


def url_address(url: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    """The literal IP address in ``url``, or None for a host name."""
    host = urlsplit(url).hostname or ""
    try:
        return ipaddress.ip_address(host)
    except ValueError:
        return None


def covers_everything(egress: Sequence[Network]) -> bool:
    return any(n.prefixlen == 0 for n in egress)


# -- configuration rules ------------------------------------------------------------


def zone_problems(
    gateway_file: Path,
    zones: Sequence[Zone],
    listeners: Sequence[Listener],
    peers: Sequence[SourcedPeer],
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


# -- proof --------------------------------------------------------------------------


@dataclass(frozen=True)
class ProofRow:
    requirement: str
    check: str
    holds: bool
    evidence: tuple[str, ...]


def proof(config: GatewayConfig) -> list[ProofRow]:
    """What ``check-config`` shows to prove NET-1/NET-4 for a loaded configuration."""
    problems = zone_problems(config.source, config.zones, config.listeners, config.peers)
    errors = [p for p in problems if p.severity == "error"]

    def failing(*keys: str) -> tuple[str, ...]:
        return tuple(str(p) for p in errors if any(k in p.key for k in keys))

    listener_lines = tuple(
        f"{lst.name}: https://{lst.address}:{lst.port}{lst.path}, zone {lst.zone}, "
        "client certificate required"
        for lst in config.listeners
    )
    bound = []
    for zone in config.zones:
        own = [f"{lst.address}:{lst.port}" for lst in config.listeners if lst.zone == zone.name]
        bound.append(f"{zone.name}: {', '.join(own) or '(no listener: outbound only)'}")
    shared = failing("listeners", "source_address")
    egress_lines = []
    for peer in config.peers:
        found = config.zone(peer.zone)
        address = url_address(peer.url)
        ranges = ", ".join(str(n) for n in found.egress) if found else "?"
        if address is None:
            egress_lines.append(
                f"{peer.name}: {urlsplit(peer.url).hostname} (host name: every resolved "
                f"address checked at connect against {ranges})"
            )
        else:
            egress_lines.append(f"{peer.name}: {address} in {ranges} (zone {peer.zone})")
    misplaced = failing(".url", "url")
    return [
        ProofRow(
            "NET-1",
            "no plaintext listener",
            True,
            listener_lines or ("(no listener: this gateway only sends)",),
        ),
        ProofRow("NET-4", "no listener shared by two zones", not shared, tuple(bound) + shared),
        ProofRow(
            "NET-4",
            "each peer's URL inside its zone's egress",
            not misplaced,
            tuple(egress_lines) + misplaced or ("(no peers)",),
        ),
        ProofRow(
            "NET-4",
            "no cross-zone route",
            True,
            (
                "inbound messages are delivered to the local inbox only; medgw does not "
                "forward, so no route exists between any two zones",
                "a message addressed through this gateway to another peer is refused "
                "and audited (routing.transit_refused)",
                "the spool refuses to queue a message from zone A for a peer of zone B",
                "a peer is accepted only on its own zone's listener (TLS pins + "
                "zone check, zone.violation)",
            ),
        ),
    ]
