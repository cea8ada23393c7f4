"""Steps 1 and 2 of ``medgw diagnose``: the peer's host name, and a TCP connection to it."""

from __future__ import annotations

import asyncio
import errno
import ipaddress
import socket

from gateway.diagnose.base import Steps
from gateway.diagnose.result import (
    StepResult,
    step_failed,
    step_ok,
)


class NetworkSteps(Steps):
    """Name resolution and the TCP connection, inside the zone's egress."""

    async def resolve(self) -> tuple[StepResult, list[str]]:
        host, port = self._target.host, self._target.port
        if not host:
            return step_failed(
                "resolve",
                f"the peer's url {self._peer.url!r} has no host",
                "the configured endpoint of the peer is not a usable URL",
                f'correct `url` in {self._peer_file}, e.g. url = "https://as2.example.jp/as2"',
            ), []
        try:
            ipaddress.ip_address(host)
        except ValueError:
            pass
        else:
            refused = self._route.judge(host, port)[1]
            if refused is not None:
                return self._outside_zone(host, [host], refused), []
            return step_ok("resolve", f"{host} is an IP address: nothing to resolve"), [host]
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(self._connect_timeout):
                infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        except TimeoutError:
            return step_failed(
                "resolve",
                f"no answer for {host} within {self._connect_timeout:g} s",
                "this machine's DNS servers do not answer (or answer too slowly)",
                "check /etc/resolv.conf and that this host can reach its DNS servers "
                f"(`getent hosts {host}`); on a closed network, ask who runs its DNS",
            ), []
        except socket.gaierror as exc:
            temporary = exc.errno == socket.EAI_AGAIN
            return step_failed(
                "resolve",
                f"{host}: {exc.strerror}",
                (
                    "the DNS servers failed to answer for now (temporary failure)"
                    if temporary
                    else f"the name {host} does not exist for this machine's resolver "
                    "(DNS or /etc/hosts): it is misspelt, or not published on this network"
                ),
                f"check the host in `url` of {self._peer_file} against what the peer gave you; "
                f"test with `getent hosts {host}`; on a closed network the name may need an "
                "/etc/hosts entry or the network's own DNS server",
            ), []
        found = list(dict.fromkeys(str(info[4][0]) for info in infos))
        # the daemon connects only to addresses its zone route allows (NET-4)
        verdicts = {a: self._route.judge(a, port)[1] for a in found}
        allowed = [a for a in found if verdicts[a] is None]
        if not allowed:
            return self._outside_zone(host, found, next(iter(verdicts.values())) or ""), []
        found = allowed
        return step_ok("resolve", f"{host} -> {', '.join(found)}"), found

    def _outside_zone(self, host: str, found: list[str], refused: str) -> StepResult:
        zone = self._config.require_zone(self._peer.zone)
        ranges = ", ".join(str(n) for n in zone.egress)
        shown = host if found == [host] else f"{host} -> {', '.join(found)}"
        return step_failed(
            "resolve",
            f"{shown}, none inside the egress of zone {zone.name!r} ({ranges}): {refused}",
            f"the address is outside the network of the peer's zone {zone.name!r} (or is "
            "one of this gateway's own listeners), and the gateway never sends a zone's "
            "messages through another network: this machine's resolver gives another "
            "address than the peer's on that network (DNS or /etc/hosts), or the peer "
            "belongs to another zone",
            f"compare `getent hosts {host}` with the peer's address on the zone's "
            "network and fix the DNS or /etc/hosts entry; or correct `url` or `zone` in "
            f"{self._peer_file}, or egress of the [[zones]] table {zone.name!r} in "
            f"{self._config.source}",
        )

    async def connect(self, addresses: list[str]) -> tuple[StepResult, socket.socket | None]:
        """A TCP connection to the first address that accepts; step 3 upgrades it to TLS."""
        port = self._target.port
        # The daemon's connections to this peer leave from its zone's source address (NET-4).
        errors: list[tuple[str, BaseException]] = []
        for address in addresses:
            started = self._clock.monotonic()
            try:
                async with asyncio.timeout(self._connect_timeout):
                    sock = await self._route.open_socket(address, port)
            except (TimeoutError, OSError) as exc:
                errors.append((address, exc))
                continue
            elapsed = (self._clock.monotonic() - started) * 1000
            return step_ok("tcp", f"{address} port {port} accepted ({elapsed:.1f} ms)"), sock
        if not errors:
            return step_failed(
                "tcp",
                "no address to connect to",
                "name resolution gave no address",
                f"check the host in `url` of {self._peer_file}",
            ), None
        first_address, first_error = errors[0]
        tried = ", ".join(a for a, _ in errors)
        return self._connect_failure(first_address, port, first_error, tried), None

    def _connect_failure(
        self, address: str, port: int, exc: BaseException, tried: str
    ) -> StepResult:
        detail_where = f"{tried} port {port}"
        if isinstance(exc, ConnectionRefusedError):
            return step_failed(
                "tcp",
                f"{detail_where}: connection refused",
                f"the host {address} answered, but nothing accepts connections on port {port}: "
                "the peer's gateway is not running, listens on another port, or a firewall "
                "rejects the connection",
                "call the peer's on-call administrator: is their gateway running and listening "
                f"on port {port}? Compare with `url` in {self._peer_file}. Our messages for "
                "them stay queued and are retried; nothing is lost",
            )
        if isinstance(exc, TimeoutError):
            return step_failed(
                "tcp",
                f"{detail_where}: no answer within {self._connect_timeout:g} s",
                "packets to the peer get no answer: a firewall (ours, theirs or in between) "
                "drops them, the line or VPN to the peer is down, or the host is off",
                f"check the firewall rules for {address}:{port} on both sides and the state of "
                f"the line or VPN (`traceroute -T -p {port} {address}`); ask the peer whether "
                "their host is up",
            )
        if isinstance(exc, OSError) and exc.errno in (errno.EADDRNOTAVAIL, errno.EAFNOSUPPORT):
            source = self._config.require_zone(self._peer.zone).source_address
            return step_failed(
                "tcp",
                f"{detail_where}: {exc.strerror}",
                f"connections to this peer leave from the source_address {source} of its zone "
                f"{self._peer.zone!r}, and this machine cannot use that address (it is not "
                "configured on any interface, or is of the other IP family than the peer's "
                "address)",
                f"check `ip -brief address` for {source}; correct source_address of the "
                f"[[zones]] table {self._peer.zone!r} in {self._config.source}, or bring up "
                "the interface of that network",
            )
        if isinstance(exc, OSError) and exc.errno in (errno.ENETUNREACH, errno.EHOSTUNREACH):
            return step_failed(
                "tcp",
                f"{detail_where}: {exc.strerror}",
                f"there is no route from this machine to {address}: the network interface, "
                "VPN or closed-network link towards the peer is down, or a router reports the "
                "host unreachable",
                f"check `ip route get {address}` and the link or VPN to the peer's network; "
                "contact your network carrier if the line is down",
            )
        text = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        return step_failed(
            "tcp",
            f"{detail_where}: {text}",
            f"the TCP connection to the peer failed: {text}",
            f"check the network path to {address}:{port} and `url` in {self._peer_file}",
        )
