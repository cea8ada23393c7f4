"""``[api]``: the local submission API, where it listens and who may use it (NET-3)."""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from gateway.config.peers import Peer
from gateway.fsutil import MAX_SOCKET_PATH
from gateway.places import Place
from gateway.tomlreader import Reader, Section


@dataclass(frozen=True)
class ApiClient:
    """One internal system allowed to submit over the local API (``[[api.clients]]``)."""

    name: str
    token_sha256: str  # hex SHA-256 of its bearer token; the token itself is never stored
    peers: tuple[str, ...]  # the peers it may send to


@dataclass(frozen=True)
class ApiSettings:
    """The local submission API (``[api]``): a unix socket and/or a loopback TCP port."""

    socket: Path | None
    address: str | None  # a loopback IP address, with port
    port: int | None
    clients: tuple[ApiClient, ...]

    def endpoints(self) -> list[str]:
        """Where it listens, as an admin would write it: ``unix:PATH``, ``http://HOST:PORT``."""
        found = [f"unix:{self.socket}"] if self.socket else []
        if self.address is not None and self.port is not None:
            host = f"[{self.address}]" if ":" in self.address else self.address
            found.append(f"http://{host}:{self.port}")
        return found

    @property
    def endpoint(self) -> tuple[str, int] | None:
        """The TCP address and port it listens on, if any."""
        if self.address is None or self.port is None:
            return None
        return self.address, self.port


_CLIENT_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
_SHA256_HEX = re.compile(r"^[0-9a-f]{64}$")


def _parse_listen(item: Section, value: str) -> tuple[str, int] | None:
    """``127.0.0.1:8470`` or ``[::1]:8470``: a loopback address only (NET-3)."""
    fix = 'write listen = "127.0.0.1:8470" (or "[::1]:8470"), or use socket = "..." instead'
    found = item.address_port("listen", value, fix, not_an_ip=" (host names are not accepted)")
    if found is None:
        return None
    host, address, port = found
    if not address.is_loopback:
        item.problem(
            "listen",
            f"{host} is not a loopback address: the local API must not be reachable from "
            "the network (NET-3)",
            "use 127.0.0.1 or ::1; internal systems on other hosts use the outbox folder "
            "on a share, or a local relay",
        )
        return None
    return str(address), port


def load_api(
    reader: Reader,
    section: Section,
    peers: list[Peer],
    places: Sequence[Place] = (),
) -> ApiSettings | None:
    """The optional ``[api]`` table: where the local API listens and who may use it."""
    socket_text = section.string("socket", default="")
    listen_text = section.string("listen", default="")
    socket_path = reader.path(socket_text) if socket_text else None
    if socket_path is not None and len(str(socket_path)) > MAX_SOCKET_PATH:
        section.problem(
            "socket",
            f"{socket_path} is longer than {MAX_SOCKET_PATH} characters (a unix socket limit)",
            "choose a shorter path, e.g. /run/medgw/api.sock",
        )
    if socket_path is not None:
        file, key = section.where("socket")
        socket_place = Place(socket_path, file, key, "the API socket", tree=False)
        for place in places:
            where = socket_place.relation(place)
            if where is not None:
                section.problem(
                    "socket",
                    f"{socket_path} {where} {place.what} ({place.path}): medgw would delete "
                    "or overlay it to make the API socket",
                    'give the socket a path of its own, e.g. socket = "/run/medgw/api.sock"',
                )
                break
    listen = _parse_listen(section, listen_text) if listen_text else None
    if not socket_text and not listen_text:
        section.problem(
            "socket",
            "[api] has neither socket nor listen: the API would not be reachable",
            'add socket = "/run/medgw/api.sock" and/or listen = "127.0.0.1:8470", '
            "or remove the [api] table",
        )
    known = {p.name for p in peers}
    clients: list[ApiClient] = []
    names: set[str] = set()
    hashes_seen: set[str] = set()
    for item in section.tables("clients"):
        name = item.string("name", example='"ris"')
        if name and not _CLIENT_NAME.match(name):
            item.problem(
                "name",
                f"{name!r} must be 1-64 letters, digits, '.', '_' or '-'",
                'name the internal system, e.g. "ris" or "lab-lis"',
            )
        elif name in names:
            item.problem("name", f"client {name!r} is listed twice", "give each client one entry")
        names.add(name)
        token_sha256 = item.string("token_sha256", example='"<64 hex digits>"').lower()
        if token_sha256 and not _SHA256_HEX.match(token_sha256):
            item.problem(
                "token_sha256",
                "must be the 64 hex digits of the token's SHA-256",
                "run `medgw api token` and paste the token_sha256 line it prints",
            )
        elif token_sha256 in hashes_seen:
            item.problem(
                "token_sha256",
                "the same token is configured for two clients: it would not identify one",
                "give each client its own token (`medgw api token`)",
            )
        hashes_seen.add(token_sha256)
        allowed = item.string_list("peers", empty_fix="name the peers this client may send to")
        for peer_name in allowed:
            if peer_name not in known:
                item.problem(
                    "peers",
                    f"no peer named {peer_name!r}",
                    f"use peer names from peers.d/ ({', '.join(sorted(known)) or 'none yet'})",
                )
        item.finish()
        clients.append(ApiClient(name, token_sha256, tuple(allowed)))
    section.finish()
    return ApiSettings(
        socket=socket_path,
        address=listen[0] if listen else None,
        port=listen[1] if listen else None,
        clients=tuple(clients),
    )
