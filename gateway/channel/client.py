"""Outbound AS2 POST over mutual TLS to one peer.

Each peer's connections stay in the peer's network zone (NET-4): they go
through the peer's zone route (:mod:`gateway.egress`), which binds the zone's
source address and connects only to addresses inside the zone's egress ranges,
judged at every connect by the configuration in force then.
"""

from __future__ import annotations

import contextlib
import ssl
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import BinaryIO

import aiohttp

from gateway.egress import Route
from gateway.errors import EgressRefused, TransportError
from gateway.httpbody import read_capped

MAX_RECEIPT_BYTES = 1 << 20


@dataclass(frozen=True)
class Response:
    status: int
    content_type: str
    headers: tuple[tuple[str, str], ...]
    body: bytes


class PeerClient:
    def __init__(
        self,
        context: ssl.SSLContext,
        connect_timeout: float,
        request_timeout: float,
        *,
        route: Route,
        connections: int = 4,
    ) -> None:
        """``route``: the peer's zone; ``connections``: at most this many to the peer at
        once (more requests wait)."""
        self._session = route.session(
            tls=context,
            limit=connections,
            keepalive_timeout=30,
            timeout=aiohttp.ClientTimeout(total=request_timeout, sock_connect=connect_timeout),
            trace_configs=[_began_tracing()],
        )

    async def post(
        self,
        url: str,
        headers: tuple[tuple[str, str], ...],
        body: Path | bytes | BinaryIO,
        *,
        began: Callable[[], None] | None = None,
    ) -> Response:
        """POST ``body`` (a file, streamed; a reader of one, streamed, its caller closes it
        and names its size in ``headers``; or bytes, for a receipt) and read the answer.
        ``began`` is called right before the request's first byte goes out to the peer
        (once a connection is open, its TLS handshake done): until then the peer cannot
        have seen any of it."""
        try:
            with contextlib.ExitStack() as stack:
                data_in = stack.enter_context(body.open("rb")) if isinstance(body, Path) else body
                async with self._session.post(
                    url,
                    data=data_in,
                    headers=list(headers),
                    allow_redirects=False,
                    trace_request_ctx=began,
                ) as response:
                    data = await read_capped(response.content, MAX_RECEIPT_BYTES)
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
            if isinstance(exc.os_error, EgressRefused):
                raise TransportError(
                    f"cannot connect: {exc.os_error.message}", refused=True
                ) from exc
            raise TransportError(f"cannot connect: {exc.os_error.strerror or exc}") from exc
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            raise TransportError(f"{type(exc).__name__}: {exc}") from exc

    async def close(self) -> None:
        await self._session.close()


def _began_tracing() -> aiohttp.TraceConfig:
    """Calls a request's ``began`` (its ``trace_request_ctx``) when aiohttp is about to
    write the request's headers, before any byte of the request is sent."""

    async def headers_going_out(
        _session: aiohttp.ClientSession,
        context: SimpleNamespace,
        _params: aiohttp.TraceRequestHeadersSentParams,
    ) -> None:
        if callable(began := context.trace_request_ctx):
            began()

    tracing = aiohttp.TraceConfig()
    tracing.on_request_headers_sent.append(headers_going_out)
    return tracing
