"""``[cluster]``: this node among the nodes that share one spool.

::

    [cluster]
    node_name = "gw-a"            # default: the host name; unique among the nodes
    lease_seconds = 60            # how long a claim lasts without renewal
    bodies_dir = "/var/lib/medgw-shared/outgoing"   # the nodes' one folder of AS2 bodies

Every claim on a message (sending it, writing a received document to the
inbox, handing one over) is held by this node's name for ``lease_seconds``; a
live node renews its claims every third of that, and another node takes over
those whose lease ran out (gateway.spool.protocol).  ``bodies_dir``: where the
signed and encrypted bodies of queued messages too large to be kept in the
spool itself are written, a folder every node mounts at the same path, so that
a node taking over a dead node's messages can read them, and, in its
``payloads/<node_name>/``, the copies of the documents each node took in and has
not yet prepared (default: ``outgoing/`` and ``payloads/`` in the state folder,
for a single node).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from gateway.spool.records import DEFAULT_LEASE_SECONDS, NODE_NAME, host_node_name
from gateway.tomlreader import Reader, Section


@dataclass(frozen=True)
class ClusterSettings:
    node_name: str
    lease_seconds: float = DEFAULT_LEASE_SECONDS
    bodies_dir: Path | None = None  # None: outgoing/ in the state folder


def load_cluster(reader: Reader, root: Section) -> ClusterSettings:
    """The optional ``[cluster]`` table; every key has a default."""
    section = root.optional_table("cluster")
    if section is None:
        return ClusterSettings(host_node_name())
    name = section.string("node_name", default=host_node_name())
    lease = section.number("lease_seconds", default=DEFAULT_LEASE_SECONDS, minimum=5, maximum=3600)
    bodies = section.string("bodies_dir", default="")
    section.finish()
    if not NODE_NAME.match(name):
        section.problem(
            "node_name",
            f"{name!r} is not a node name: up to 63 letters, digits, '.', '-' or '_', "
            "starting with a letter or digit",
            'write a short name unique among the nodes, e.g. node_name = "gw-a"',
        )
        name = host_node_name()
    return ClusterSettings(name, lease, reader.path(bodies) if bodies else None)
