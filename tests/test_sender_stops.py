"""A peer's sender stopped while its messages are being sent: they go back to the queue
at once, due now (not left "sending" by this node until the next start, or until
another node's take-over once its lease runs out).

The sender loop is the daemon's own (gateway.daemon.sending), over the real sending
pipeline, a real spool of each backend and a real TLS client; the peer accepts the
connections and never answers, so the sends are under way when the sender stops:
its peer removed by a reload (what Daemon._swap does), or the daemon's shutdown
with its deadline passed.
"""

from __future__ import annotations

import io
import random
from dataclasses import replace
from pathlib import Path

import pytest

from gateway.audit.log import AuditLog
from gateway.clock import SystemClock
from gateway.config import load_config
from gateway.daemon.sending import Senders
from gateway.daemon.state import Parts, build_state
from gateway.daemon.tasks import Tasks
from gateway.egress import Network
from gateway.inbound.locks import InboundLocks
from gateway.logs import make_logger
from gateway.outbound import Outbound
from gateway.outbound.send import INTERRUPTED
from gateway.pki.demo import DemoLayout
from gateway.pki.peers import assess_peers
from gateway.spool import OutboundState
from tests.conftest import MakeSpool
from tests.helpers.listener import SilentPeer
from tests.helpers.waiting import until

DOCUMENTS = 3


@pytest.mark.parametrize("stopped_by", ["reload", "shutdown"])
async def test_messages_being_sent_go_back_to_the_queue_when_their_sender_stops(
    layout: DemoLayout,
    tmp_path: Path,
    make_spool: MakeSpool,
    silent: SilentPeer,
    stopped_by: str,
) -> None:
    config = silent.sent_to(load_config(layout.hospital.config_path))
    [peer] = config.peers
    clock = SystemClock()
    log = make_logger(stream=io.StringIO())
    spool = make_spool(clock)
    audit = AuditLog(tmp_path / "audit.jsonl", clock, node=spool.node)
    parts = Parts(spool, audit, log, clock, Network.fixed(config.network_map), InboundLocks())
    trust = await assess_peers(config.peers, config.zones, at=clock.now())
    states = [build_state(config, trust, parts)]
    outbound = Outbound(states[0], spool, audit, log, clock)
    tasks = Tasks(lambda: audit, log, clock)
    senders = Senders(lambda: states[-1], parts, outbound, tasks, random.Random(1))
    try:
        folder = layout.hospital.outbox_dir / peer.name
        folder.mkdir(parents=True, exist_ok=True)
        for number in range(DOCUMENTS):
            (folder / f"order-{number}.hl7").write_bytes(b"MSH|^~\\&|order|%d\r" % number)
        taken = 0
        while taken < DOCUMENTS:
            taken += await outbound.intake_once()

        def states_now() -> list[OutboundState]:
            return [r.state for r in spool.list_outbound()]

        senders.sync()  # the peer's sender starts: claims them all, and sends
        await until(lambda: len(silent.held) >= DOCUMENTS, f"{DOCUMENTS} connections to the peer")
        assert states_now() == [OutboundState.SENDING] * DOCUMENTS

        if stopped_by == "reload":  # the peer removed from peers.d, as Daemon._swap does
            states.append(replace(states[0], config=replace(config, peers=())))
            outbound.use(states[-1])
            senders.sync()
        else:  # SIGTERM: the sends in progress do not end within the stop's deadline
            tasks.stopping = True
            await senders.stop(0.1)
        await until(
            lambda: states_now() == [OutboundState.QUEUED] * DOCUMENTS,
            "the messages back in the queue",
        )
        for record in spool.list_outbound():
            assert record.lease_until == 0  # no claim left
            assert record.next_attempt_at == 0  # due now, for whichever node
            assert record.last_error == INTERRUPTED
    finally:
        tasks.stopping = True
        await senders.stop(0.1)
        for client in states[0].clients.values():
            await client.close()
        audit.close()
