"""The way out of a network zone: its source address and its egress ranges.

Everything the daemon sends on behalf of a zone - AS2 messages and receipts
to its peers, OCSP requests about its peers' certificates - leaves from the
zone's source address, and a host name is resolved at every connect with
only the addresses inside the zone's egress ranges kept (NET-4: nothing of
one zone goes out through another zone's network).
"""

from __future__ import annotations

import errno
import socket
import ssl
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor, wait
from dataclasses import dataclass

import aiohttp
from aiohttp.abc import AbstractResolver, ResolveResult
from aiohttp.resolver import DefaultResolver

from gateway.routing import Network, egress_allows, url_address


@dataclass(frozen=True)
class ZonePath:
    """How to leave a zone; the default (no source address, no ranges) is the OS's choice."""

    source_address: str | None = None
    egress: tuple[Network, ...] = ()

    def refusal(self, url: str) -> str | None:
        """Why ``url`` may not be contacted from this zone, or None when it may.

        Only a literal IP address is judged here; a host name is judged at
        connect time by :class:`EgressResolver`.
        """
        address = url_address(url)
        if not self.egress or address is None or egress_allows(self.egress, str(address)):
            return None
        ranges = ", ".join(str(n) for n in self.egress)
        return f"{address} is outside the zone's egress ({ranges}); not connecting"

    def connector(
        self,
        *,
        tls: ssl.SSLContext | None = None,
        limit: int = 100,
        keepalive_timeout: float = 15.0,
    ) -> aiohttp.TCPConnector:
        """A connector bound to the source address, resolving only into the egress;
        ``tls``: the context for https URLs (None: the system's default, verifying)."""
        return aiohttp.TCPConnector(
            ssl=tls if tls is not None else True,
            limit=limit,
            keepalive_timeout=keepalive_timeout,
            local_addr=(self.source_address, 0) if self.source_address else None,
            resolver=EgressResolver(self.egress) if self.egress else None,
        )


class EgressResolver(AbstractResolver):
    """Resolves host names, keeping only addresses inside the zone's egress ranges."""

    def __init__(self, egress: Sequence[Network]) -> None:
        self._egress = tuple(egress)
        self._resolver = DefaultResolver()

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        found = await self._resolver.resolve(host, port, family)
        allowed = [r for r in found if egress_allows(self._egress, r["host"])]
        if not allowed:
            addresses = ", ".join(sorted({r["host"] for r in found})) or "none"
            ranges = ", ".join(str(n) for n in self._egress)
            raise OSError(
                errno.EHOSTUNREACH,
                f"{host} resolves to {addresses}, outside the zone's egress ({ranges}); "
                "not connecting",
            )
        return allowed

    async def close(self) -> None:
        await self._resolver.close()


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
