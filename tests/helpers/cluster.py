"""Several ``medgw run`` nodes of one demo institution sharing one PostgreSQL spool.

A node is the institution's gateway.toml with a state folder, an outbox, an audit
trail and a listener port of its own, a ``[cluster]`` node name, and the shared
parts: the spool (a PostgreSQL database), the folder of bodies, the key folder of
the encryption at rest (the spool's data keys are wrapped under its keys) and the
inbox.
Peers reach the nodes through :class:`RoundRobin`, one address in front of them.
"""

from __future__ import annotations

import asyncio
import hashlib
import re
from pathlib import Path

from gateway.pki.demo import DemoInstitution, DemoLayout
from gateway.spool import OutboundRecord
from gateway.spool.postgres import PostgresSettings, PostgresSpool
from tests.clocks import TickingClock
from tests.helpers.tcp_proxy import Stream, TcpProxy

LEASE_SECONDS = 5  # the shortest allowed: a dead node's work is taken over quickly
NODE_PART = "\n# -- this node --\n"


def outbound(spool: PostgresSettings) -> list[OutboundRecord]:
    """Every outbound row of the nodes' shared spool, read through a handle of its own."""
    opened = PostgresSpool(spool, TickingClock())
    try:
        return opened.all_outbound()
    finally:
        opened.close()


def inbox(layout: DemoLayout) -> dict[str, str]:
    """The hospital's inbox from the lab: file name -> SHA-256 of its content."""
    folder = layout.hospital.inbox_dir / "lab"
    if not folder.exists():
        return {}
    return {
        p.name: hashlib.sha256(p.read_bytes()).hexdigest()
        for p in folder.iterdir()
        if not p.name.startswith(".")
    }


def add_node(
    side: DemoInstitution, name: str, spool: PostgresSettings, *, port: int | None = None
) -> Path:
    """A configuration for node ``name`` of ``side``, beside its gateway.toml (the first
    node, ``<side>-a``, keeps the demo's own folders and port)."""
    text = side.config_path.read_text().split(NODE_PART)[0]
    first = port is None
    if not first:
        for key, value in (
            ("state_dir", f"state-{name}"),
            ("outbox_dir", f"outbox-{name}"),
            ("audit_log", f"audit/audit-{name}.jsonl"),
        ):
            text, found = re.subn(rf'(?m)^{key} = ".*"$', f'{key} = "{value}"', text)
            assert found == 1, key
        text, found = re.subn(r"(?m)^port = \d+$", f"port = {port}", text, count=1)
        assert found == 1
    text += (
        f'{NODE_PART}[cluster]\nnode_name = "{name}"\nlease_seconds = {LEASE_SECONDS}\n'
        'bodies_dir = "shared-bodies"\n'
        '\n[at_rest]\nkey_dir = "shared-keys"\n'
        f'\n[spool]\nbackend = "postgresql"\nsocket_dir = "{spool.socket_dir}"\n'
        f'port = {spool.port}\ndbname = "{spool.dbname}"\nuser = "{spool.user}"\n'
    )
    path = side.config_path if first else side.config_path.with_name(f"gateway-{name}.toml")
    path.write_text(text)
    for shared in ("shared-bodies", "shared-keys"):  # on the mount the nodes share
        (side.root / shared).mkdir(mode=0o700, exist_ok=True)
    return path


def listener_port(config: Path) -> int:
    found = re.search(r"(?m)^port = (\d+)$", config.read_text())
    assert found is not None
    return int(found.group(1))


def point_peer_at(side: DemoInstitution, peer: str, port: int) -> None:
    """``side`` sends to ``peer`` at 127.0.0.1:``port`` (a proxy in front of it)."""
    path = side.root / "peers.d" / f"{peer}.toml"
    text, found = re.subn(
        r"https://127\.0\.0\.1:\d+/", f"https://127.0.0.1:{port}/", path.read_text()
    )
    assert found == 1
    path.write_text(text)


class RoundRobin(TcpProxy):
    """A TCP front on 127.0.0.1 for several nodes: each new connection goes to the next
    node that accepts it (a node that is down is skipped, as a load balancer's health
    check would); while ``held`` is set, the nodes' answers are held back (a path so
    slow that a send stays in the middle)."""

    def __init__(self, ports: list[int]) -> None:
        self.ports = ports
        self.held = False
        self._next = 0
        super().__init__()

    async def _connect(self) -> Stream | None:
        for _ in range(len(self.ports)):
            port = self.ports[self._next % len(self.ports)]
            self._next += 1
            try:
                return await asyncio.open_connection("127.0.0.1", port)
            except OSError:
                continue
        return None

    async def _before_answer(self) -> None:
        while self.held:
            await asyncio.sleep(0.05)
