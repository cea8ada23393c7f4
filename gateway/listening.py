"""Why a listening socket could not be bound, and what the administrator does about it.

Every listener medgw opens (the zones' AS2 listeners, the local API, the metrics
endpoint, the SSH maintenance listener) reports a failed bind the same way: the
cause in plain words and a fix true for that cause, never "free the port" for an
address this host lacks or a port it may not bind.
"""

from __future__ import annotations

import errno
import os
from pathlib import Path

UNPRIVILEGED_PORTS = Path("/proc/sys/net/ipv4/ip_unprivileged_port_start")


def bind_cause(exc: OSError) -> str:
    """The system's words for ``exc`` (``strerror`` can be missing on a bare OSError)."""
    return os.strerror(exc.errno) if exc.errno else str(exc)


def bind_fix(exc: OSError, address: str, port: int, named: str) -> str:
    """What the administrator does about ``exc``, raised binding ``address``:``port``,
    the listener ``named`` as gateway.toml names it (``[metrics] listen``)."""
    if exc.errno == errno.EADDRINUSE:
        return (
            f"another process listens on port {port} (ss -ltnp 'sport = :{port}' names it): "
            f"stop it, or give {named} another port in gateway.toml"
        )
    if exc.errno == errno.EADDRNOTAVAIL:
        return (
            f"{address} is not an address of this host (ip -br addr lists them): add it to "
            f"the interface on the network it serves, or give {named} an address this host has"
        )
    if exc.errno == errno.EACCES and port < unprivileged_ports_start():
        return (
            f"port {port} may be bound only with the capability CAP_NET_BIND_SERVICE: give "
            f"{named} a port from {unprivileged_ports_start()} up (and redirect the standard "
            "port to it in the firewall), or grant medgw the capability (see "
            "systemd/medgw.service)"
        )
    if exc.errno == errno.EACCES:
        return (
            "the host's security policy (SELinux, AppArmor) forbids medgw this port: allow "
            f"it there (ausearch -m avc shows the denial), or give {named} another port"
        )
    return f"check the address and port of {named} in gateway.toml"


def unprivileged_ports_start() -> int:
    """The lowest port a process without CAP_NET_BIND_SERVICE may bind (Linux sysctl
    net.ipv4.ip_unprivileged_port_start; 1024 where it cannot be read)."""
    try:
        return int(UNPRIVILEGED_PORTS.read_text())
    except (OSError, ValueError):
        return 1024
