"""Outbound AS2 POST over mutual TLS to one peer.

Each peer's connections stay in the peer's network zone (NET-4): they leave
from the zone's source address, and a host name in the peer's URL is resolved
at every connect with only the addresses inside the zone's egress ranges kept
(a literal IP address was already checked when the configuration was loaded).
"""

from __future__ import annotations

import contextlib
import errno
import socket
import ssl
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import aiohttp
from aiohttp.abc import AbstractResolver, ResolveResult
from aiohttp.resolver import DefaultResolver

from gateway.routing import Network, egress_allows

MAX_RECEIPT_BYTES = 1 << 20


class TransportError(Exception):
    """The peer could not be reached or did not answer; the send will be retried."""


@dataclass(frozen=True)
class Response:
    status: int
    content_type: str
    headers: tuple[tuple[str, str], ...]
    body: bytes


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


class PeerClient:
    def __init__(
        self,
        context: ssl.SSLContext,
        connect_timeout: float,
        request_timeout: float,
        *,
        source_address: str | None = None,
        egress: Sequence[Network] = (),
    ) -> None:
        self._session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(
                ssl=context,
                limit=4,
                keepalive_timeout=30,
                local_addr=(source_address, 0) if source_address else None,
                resolver=EgressResolver(egress) if egress else None,
            ),
            timeout=aiohttp.ClientTimeout(total=request_timeout, sock_connect=connect_timeout),
            auto_decompress=False,
        )

    async def post(
        self, url: str, headers: tuple[tuple[str, str], ...], body: Path | bytes
    ) -> Response:
        """POST ``body`` (a file, streamed; or bytes, for a receipt) and read the answer."""
        try:
            with contextlib.ExitStack() as stack:
                data_in = body if isinstance(body, bytes) else stack.enter_context(body.open("rb"))
                async with self._session.post(
                    url, data=data_in, headers=list(headers), allow_redirects=False
                ) as response:
                    data = await response.content.read(MAX_RECEIPT_BYTES + 1)
                    if len(data) > MAX_RECEIPT_BYTES:
                        raise TransportError("the peer's answer is larger than any receipt")
                    return Response(
                        response.status,
                        response.headers.get("Content-Type", ""),
                        tuple(response.headers.items()),
                        data,
                    )
        except aiohttp.ClientConnectorCertificateError as exc:
            raise TransportError(
                f"TLS certificate of the peer refused: {exc.certificate_error}"
            ) from exc
        except aiohttp.ClientSSLError as exc:
            raise TransportError(f"TLS handshake failed: {exc}") from exc
        except aiohttp.ClientConnectorError as exc:
            raise TransportError(f"cannot connect: {exc.os_error.strerror or exc}") from exc
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            raise TransportError(f"{type(exc).__name__}: {exc}") from exc

    async def close(self) -> None:
        await self._session.close()
