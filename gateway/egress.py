"""The one connect path: every outbound connection the gateway makes goes through here (NET-4).

Each connection is made for one :class:`Route`:

* on behalf of a zone (:meth:`Network.zone`) - AS2 messages and receipts to the
  zone's peers, OCSP requests about their certificates, ``medgw diagnose``: it
  leaves from the zone's source address and may reach only an address inside
  the zone's egress ranges;
* to the internal side (:meth:`Network.internal`) - the hand-over of received
  documents to the internal system, which belongs to no zone: it may never
  reach an address inside any zone's egress ranges (on this host, where
  loopback addresses never leave it: no peer's endpoint);
* for an operator's command that runs without a configuration
  (:meth:`Network.unconfigured`, ``medgw pki verify --ocsp``): where the
  operator pointed it.

No route reaches one of this gateway's own listeners.

The judgement is made when the socket is created, for the address it is about
to connect to - after name resolution, and for a literal IP address in a URL
too (aiohttp does not resolve those) - against the network map of the
configuration in force *at that moment* (``current``): a client built before a
reload connects by the reloaded zones, never by the ones it was built with.
A refusal raises :class:`~gateway.errors.EgressRefused` (an ``OSError``, so
the HTTP client reports a failed connect) and is reported to ``on_refused``
(the daemon audits it).

A test (``tests/test_connect_path.py``) fails when code elsewhere in the
package opens a network connection by another way.
"""

from __future__ import annotations

import asyncio
import socket
import ssl
from collections.abc import Callable, Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

import aiohttp

from gateway.errors import EgressRefused
from gateway.routing import (
    Address,
    OwnListener,
    ZonedPeer,
    handover_reason,
    in_ranges,
    ip_of,
    listener_at,
)
from gateway.routing import Network as AddressRange

AddrInfo = tuple[int, int, int, str, tuple[Any, ...]]

USER_AGENT = "medgw"  # what our requests say they are: no versions


@dataclass(frozen=True)
class ZonePath:
    """How to leave a zone: its source address (None: the OS's choice) and egress ranges."""

    source_address: str | None = None
    egress: tuple[AddressRange, ...] = ()


@dataclass(frozen=True)
class _NamedPath:
    name: str
    egress: tuple[AddressRange, ...]


@dataclass(frozen=True)
class NetworkMap:
    """What the connect path judges by, from one configuration: each zone's way out,
    our own listeners (the AS2 listeners and the local API's TCP port), and the
    peers' AS2 endpoints by address and port (host names as resolved at load)."""

    zones: Mapping[str, ZonePath] = field(default_factory=dict)
    listeners: tuple[OwnListener, ...] = ()
    peer_endpoints: Mapping[tuple[Address, int], ZonedPeer] = field(default_factory=dict)

    @property
    def host(self) -> list[Address]:
        """This host's addresses the configuration names (the zones' source addresses)."""
        found = (ip_of(path.source_address or "") for path in self.zones.values())
        return [ip for ip in found if ip is not None]

    def own_listener(self, ip: Address, port: int) -> OwnListener | None:
        return listener_at(self.listeners, ip, port, self.host)

    def handover_reason(self, ip: Address, port: int) -> str | None:
        zones = [_NamedPath(name, path.egress) for name, path in self.zones.items()]
        return handover_reason(ip, port, zones, self.listeners, self.host, self.peer_endpoints)


class RouteKind(StrEnum):
    ZONE = "zone"
    INTERNAL = "internal"
    UNCONFIGURED = "unconfigured"


@dataclass(frozen=True)
class Refused:
    """One connection the connect path refused, for the audit trail."""

    route: str  # "zone 'a'", "the internal side"
    address: str
    port: int
    reason: str


class Network:
    """The connect path of one daemon (or one command): routes judged by ``current()``.

    ``current`` returns the network map of the configuration in force now; it
    may be called from worker threads (a reference read, no lock needed).
    """

    def __init__(
        self,
        current: Callable[[], NetworkMap],
        *,
        on_refused: Callable[[Refused], None] | None = None,
    ) -> None:
        self._current = current
        self._on_refused = on_refused

    @classmethod
    def fixed(cls, network_map: NetworkMap) -> Network:
        """A connect path for a command that runs with one loaded configuration."""
        return cls(lambda: network_map)

    @classmethod
    def unconfigured(cls) -> Route:
        """The route of a command run without a configuration: no zone to judge by."""
        return Route(cls(lambda: NetworkMap()), RouteKind.UNCONFIGURED)

    def zone(self, name: str) -> Route:
        return Route(self, RouteKind.ZONE, name)

    def internal(self) -> Route:
        return Route(self, RouteKind.INTERNAL)

    def current(self) -> NetworkMap:
        return self._current()

    def refused(self, event: Refused) -> None:
        if self._on_refused is not None:
            self._on_refused(event)


@dataclass(frozen=True)
class Route:
    """One kind of outbound connection; every socket it opens is judged at connect time."""

    network: Network = field(compare=False)
    kind: RouteKind
    zone: str | None = None

    def __str__(self) -> str:
        if self.kind is RouteKind.ZONE:
            return f"zone {self.zone!r}"
        if self.kind is RouteKind.INTERNAL:
            return "the internal side"
        return "a command without configuration"

    def judge(self, address: str, port: int) -> tuple[str | None, str | None]:
        """``(source address, None)`` when ``address:port`` may be connected to now,
        else ``(None, why not)``."""
        now = self.network.current()
        ip = ip_of(address)
        if ip is None:
            return None, f"{address!r} is not an IP address; not connecting"
        if self.kind is RouteKind.ZONE:
            path = now.zones.get(self.zone or "")
            if path is None:
                return None, f"zone {self.zone!r} is no longer configured; not connecting"
            hit = now.own_listener(ip, port)
            if hit is not None:
                return None, f"{ip} port {port} is {hit.what} of this gateway; not connecting"
            if not in_ranges(path.egress, ip):
                ranges = ", ".join(str(n) for n in path.egress)
                return None, (
                    f"{ip} is outside the egress of zone {self.zone!r} ({ranges}); not connecting"
                )
            return path.source_address, None
        if self.kind is RouteKind.INTERNAL:
            reason = now.handover_reason(ip, port)
            if reason is not None:
                return None, (
                    f"{ip} port {port} is {reason.removeprefix('which is ')}: the internal "
                    "system is never reached through a zone; not connecting"
                )
        return None, None

    def _socket(self, addr_info: AddrInfo) -> socket.socket:
        """Create (and bind to the source address) a socket for ``addr_info``, or refuse."""
        family, type_, proto, _, sockaddr = addr_info
        address, port = str(sockaddr[0]), int(sockaddr[1])
        source, reason = self.judge(address, port)
        if reason is not None:
            self.network.refused(Refused(str(self), address, port, reason))
            raise EgressRefused(
                reason,
                fix="correct the URL, or the zone's egress ranges in gateway.toml, then reload",
            )
        sock = socket.socket(family, type_, proto)
        if source:
            try:
                sock.bind((source, 0))
            except OSError as exc:
                sock.close()
                raise OSError(exc.errno, f"cannot send from {source}: {exc.strerror}") from exc
        return sock

    def connector(
        self,
        *,
        tls: ssl.SSLContext | None = None,
        limit: int = 100,
        keepalive_timeout: float | None = 15.0,
        force_close: bool = False,
    ) -> aiohttp.TCPConnector:
        """An aiohttp connector whose every connection is judged and bound by this route;
        ``tls``: the context for https URLs (None: the system's default, verifying)."""
        return aiohttp.TCPConnector(
            ssl=tls if tls is not None else True,
            limit=limit,
            keepalive_timeout=None if force_close else keepalive_timeout,
            force_close=force_close,
            use_dns_cache=False,  # a host name is resolved at every connect
            socket_factory=self._socket,
        )

    def session(
        self,
        *,
        tls: ssl.SSLContext | None = None,
        limit: int = 100,
        keepalive_timeout: float | None = 15.0,
        force_close: bool = False,
        timeout: aiohttp.ClientTimeout,
        trace_configs: list[aiohttp.TraceConfig] | None = None,
    ) -> aiohttp.ClientSession:
        """An HTTP client session on :meth:`connector`; never decompresses bodies,
        never reads proxy settings from the environment, and names no versions to the
        other side (aiohttp's User-Agent gives its own and Python's)."""
        return aiohttp.ClientSession(
            connector=self.connector(
                tls=tls, limit=limit, keepalive_timeout=keepalive_timeout, force_close=force_close
            ),
            timeout=timeout,
            auto_decompress=False,
            trust_env=False,
            headers={"User-Agent": USER_AGENT},
            trace_configs=trace_configs,
        )

    async def open_socket(self, address: str, port: int) -> socket.socket:
        """A connected TCP socket to the literal ``address`` (for step-by-step checks
        that upgrade it themselves; the caller bounds the time)."""
        infos = await asyncio.get_running_loop().getaddrinfo(
            address, port, type=socket.SOCK_STREAM, flags=socket.AI_NUMERICHOST
        )
        family, type_, proto, canonname, sockaddr = infos[0]
        sock = self._socket((family, type_, proto, canonname, sockaddr))
        sock.setblocking(False)
        try:
            await asyncio.get_running_loop().sock_connect(sock, sockaddr)
        except BaseException:
            sock.close()
            raise
        return sock


RESOLVE_SECONDS = 5.0
RESOLVE_THREADS = 8


def resolve_hosts(
    hosts: Iterable[str], timeout: float = RESOLVE_SECONDS
) -> dict[str, tuple[str, ...]]:
    """The addresses each host name resolves to now, all looked up at once and within
    ``timeout`` seconds in all; a name that fails or takes longer is left out.

    For the configuration checks, which show where a URL with a host name leads
    today; a connection resolves again, and judges what it connects to then.
    """
    names = sorted(set(hosts))
    if not names:
        return {}
    pool = ThreadPoolExecutor(min(RESOLVE_THREADS, len(names)), thread_name_prefix="resolve")
    try:
        futures = {
            pool.submit(socket.getaddrinfo, name, None, type=socket.SOCK_STREAM): name
            for name in names
        }
        done, _ = wait(futures, timeout=timeout)
    finally:
        pool.shutdown(wait=False, cancel_futures=True)
    resolved: dict[str, tuple[str, ...]] = {}
    for future in done:
        try:
            found = future.result()
        except (OSError, UnicodeError):
            continue
        resolved[futures[future]] = tuple(dict.fromkeys(str(info[4][0]) for info in found))
    return resolved
