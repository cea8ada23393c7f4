"""``[[listeners]]``: the mutual-TLS listeners, one zone each."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from pathlib import Path

from gateway.tomlreader import Reader, Section


@dataclass(frozen=True)
class Listener:
    name: str
    address: str
    port: int
    path: str
    zone: str


def load_listeners(reader: Reader, root: Section, source: Path) -> list[Listener]:
    """The ``[[listeners]]`` tables, each with a name and an address:port of its own."""
    listeners: list[Listener] = []
    for item in root.tables("listeners"):
        listener_name = item.string("name", example='"regional-vpn"')
        if listener_name and any(other.name == listener_name for other in listeners):
            # Logs, audit events and each listener's TLS settings are looked up by name.
            item.problem(
                "name",
                f"listener name {listener_name!r} is used by another [[listeners]] table",
                "give each listener its own name",
            )
        address = item.string("address", example='"192.0.2.10"')
        try:
            ipaddress.ip_address(address)
        except ValueError:
            item.problem("address", f"{address!r} is not an IP address", "give the address to bind")
        port = item.integer("port", default=None, minimum=1, maximum=65535)
        url_path = item.string("path", default="/as2")
        if not url_path.startswith("/"):
            item.problem("path", f"{url_path!r} must start with /", 'use for example "/as2"')
        zone = item.string("zone", example='"regional-vpn"')
        item.finish()
        listeners.append(Listener(listener_name, address, port, url_path, zone))
    seen: dict[tuple[str, int], str] = {}
    for listener in listeners:
        where = (listener.address, listener.port)
        if where in seen:
            reader.add(
                source,
                "listeners",
                f"listeners {seen[where]!r} and {listener.name!r} both use "
                f"{listener.address}:{listener.port}",
                "give each listener its own address and port",
            )
        seen[where] = listener.name
    return listeners
