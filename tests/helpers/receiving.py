"""A hospital receiving a lab's documents in the test's own process: two sites of one
zone, the hospital's inbound pipeline over a spool and audit trail opened for it, and a
lab's document as the request its listener hands on."""

from __future__ import annotations

import io
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from gateway.audit import AuditLog
from gateway.clock import Clock, SystemClock
from gateway.config import GatewayConfig, load_config
from gateway.inbound import InboundProcessor, InboundRequest
from gateway.logs import make_logger
from gateway.spool import Spool, SqliteSpool
from tests.helpers.zones import Site, as2_message, new_ca


@dataclass(frozen=True)
class Receiver:
    """The hospital's configuration and inbound pipeline, what it writes to, and the lab
    it receives from."""

    config: GatewayConfig
    hospital: Site
    lab: Site
    clock: SystemClock
    spool: Spool
    audit: AuditLog
    inbound: InboundProcessor

    def request(self, document: bytes) -> InboundRequest:
        """The lab's signed and encrypted AS2 message of ``document``, as received."""
        [peer] = self.config.peers
        built = as2_message(self.lab, self.hospital, self.hospital.as2_id, document)
        headers = {k.lower(): v for k, v in built.headers}
        return InboundRequest(peer, "127.0.0.1", headers, built.body)


@contextmanager
def receiver(
    root: Path, *, gateway_extra: str = "", spool: Callable[[Clock], Spool] | None = None
) -> Iterator[Receiver]:
    """The hospital (``gateway_extra``: more of its gateway.toml) and the lab, made in
    ``root``; the spool (``spool``: opened by it, else SQLite in the state folder) and
    audit trail closed after."""
    ca = new_ca("Net")
    hospital = Site.make(root, "hospital", "SAKURA-HOSPITAL", ca, ["127.0.0.1"])
    lab = Site.make(root, "lab", "LAB-1", ca, ["127.0.0.1"])
    hospital.zone("z0", ["127.0.0.0/8"], [hospital, lab])
    hospital.listen("z0", "127.0.0.1", 4080, "z0")
    hospital.peer(lab, "z0", "https://127.0.0.1:4180/as2")
    config = load_config(hospital.write(gateway_extra=gateway_extra))
    clock = SystemClock()
    opened = (
        spool(clock)
        if spool is not None
        else SqliteSpool(config.storage.state_dir / "spool.sqlite3", clock)
    )
    audit = AuditLog(config.storage.audit_log, clock, node=config.as2_id)
    try:
        log = make_logger("error", io.StringIO())
        inbound = InboundProcessor(config, opened, audit, log, clock)
        yield Receiver(config, hospital, lab, clock, opened, audit, inbound)
    finally:
        audit.close()
        opened.close()
