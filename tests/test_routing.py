"""Property tests for NET-4: random zones, peers, listeners and message flows.

Whatever the layout and whatever peers try, a message from a peer is delivered
locally or not at all, nothing is queued for a peer of a zone other than the
one it came from, and every refused attempt leaves an audit event.  The flows
go through the real inbound pipeline (signed and encrypted AS2 messages,
``InboundProcessor``), the real SQLite spool and the real audit log.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gateway.audit import AuditLog
from gateway.clock import SystemClock
from gateway.config import GatewayConfig, Listener, load_config
from gateway.demo_run import read_audit
from gateway.inbound import InboundProcessor, InboundRequest
from gateway.logs import make_logger
from gateway.routing import (
    LOCAL_INTAKE,
    LocalDelivery,
    Origin,
    Refusal,
    TransitRefused,
    admit,
    check_enqueue,
    route_inbound,
)
from gateway.spool import SqliteSpool
from tests.helpers.zones import Site, as2_message, new_ca

PEERS = 5
SELF = -1  # "addressed to this gateway"
UNKNOWN = -2  # "addressed to an AS2 id nobody here has"


# --- pure decisions ---------------------------------------------------------------------


@dataclass(frozen=True)
class P:
    name: str
    as2_id: str
    zone: str


zone_names = st.sampled_from(["a", "b", "c", "d"])


@st.composite
def peer_sets(draw: Any) -> list[P]:
    zones = draw(st.lists(zone_names, min_size=1, max_size=6))
    return [P(f"p{i}", f"AS2-P{i}", z) for i, z in enumerate(zones)]


@given(peer_sets(), st.data())
def test_route_inbound_delivers_locally_or_refuses(peers: list[P], data: Any) -> None:
    sender = data.draw(st.sampled_from(peers))
    to = data.draw(st.sampled_from(["ME", "NOBODY", *(p.as2_id for p in peers)]))
    decision = route_inbound("ME", sender, to, peers)
    if to == "ME":
        assert decision == LocalDelivery()
        return
    assert isinstance(decision, Refusal)  # medgw never forwards: no other outcome exists
    event = decision.audit_event(direction="inbound", peer=sender.name)
    assert (event.outcome.value, event.severity.value) == ("failure", "alert")
    target = next((p for p in peers if p.as2_id == to), None)
    if target is None:
        assert decision.event.value == "message.rejected"
    else:
        assert decision.event.value == "routing.transit_refused"
        assert decision.detail["to_zone"] == target.zone
        assert ("NET-4" in decision.rule) == (target.zone != sender.zone)


@given(peer_sets(), zone_names, st.data())
def test_admit_only_the_listeners_own_zone(peers: list[P], zone: str, data: Any) -> None:
    peer = data.draw(st.sampled_from(peers))
    refusal = admit("listener", zone, peer)
    assert (refusal is None) == (peer.zone == zone)
    if refusal is not None:
        event = refusal.audit_event(direction="inbound", peer=peer.name)
        assert event.event.value == "zone.violation" and event.severity.value == "alert"


@given(st.one_of(st.none(), zone_names), st.one_of(st.none(), zone_names), zone_names)
def test_enqueue_never_crosses_zones(
    origin_zone: str | None, destination: str | None, _: str
) -> None:
    origin = LOCAL_INTAKE if origin_zone is None else Origin("sender", origin_zone)
    allowed = origin.is_local or (destination is not None and origin.zone == destination)
    if allowed:
        check_enqueue(origin, "dest", destination)
    else:
        with pytest.raises(TransitRefused) as info:
            check_enqueue(origin, "dest", destination)
        assert info.value.refusal.event.value == "routing.transit_refused"


# --- flows through the real pipeline --------------------------------------------------------


@dataclass
class Pool:
    hospital: Site
    peers: list[Site]
    config: GatewayConfig


@pytest.fixture(scope="module")
def pool(tmp_path_factory: pytest.TempPathFactory) -> Pool:
    """A hospital and PEERS peer institutions (two CAs), loaded once; zones vary per example."""
    root = tmp_path_factory.mktemp("routing")
    cas = [new_ca("Net 1"), new_ca("Net 2")]
    hospital = Site.make(root, "hospital", "SAKURA-HOSPITAL", cas[0], ["127.0.0.1"])
    peers = [
        Site.make(root, f"peer{i}", f"PEER-{i}", cas[i % 2], ["127.0.0.1"]) for i in range(PEERS)
    ]
    hospital.zone("z0", ["127.0.0.0/8"], [hospital, peers[1]])
    hospital.listen("z0", "127.0.0.1", 4080, "z0")
    for peer in peers:
        hospital.peer(peer, "z0", "https://127.0.0.1:4180/as2")  # not our own listener
    return Pool(hospital, peers, load_config(hospital.write()))


@st.composite
def layouts(draw: Any) -> tuple[list[int], list[int]]:
    """(zone index of each peer, zone index of each listener); 1-4 zones."""
    zones = draw(st.integers(1, 4))
    peer_zones = draw(st.lists(st.integers(0, zones - 1), min_size=PEERS, max_size=PEERS))
    listener_zones = draw(st.lists(st.integers(0, zones - 1), min_size=1, max_size=4))
    return peer_zones, listener_zones


inbound_flows = st.tuples(
    st.just("inbound"),
    st.integers(0, PEERS - 1),  # sender
    st.integers(0, 3),  # listener (modulo the number of listeners)
    st.one_of(st.just(SELF), st.just(UNKNOWN), st.integers(0, PEERS - 1)),  # AS2-To
)
enqueue_flows = st.tuples(
    st.just("enqueue"),
    st.one_of(st.just(SELF), st.integers(0, PEERS - 1)),  # origin: local intake or a peer
    st.integers(0, PEERS - 1),  # destination
    st.just(0),
)


@contextlib.contextmanager
def gateway(pool: Pool, peer_zones: list[int], listener_zones: list[int]) -> Iterator[Any]:
    """The hospital with this zone layout: its config, spool, audit log and inbound pipeline."""
    with tempfile.TemporaryDirectory() as folder:
        base = Path(folder)
        zone = dataclasses.replace(pool.config.zones[0])
        zones = tuple(
            dataclasses.replace(zone, name=f"z{i}")
            for i in range(max(peer_zones + listener_zones) + 1)
        )
        config = dataclasses.replace(
            pool.config,
            zones=zones,
            peers=tuple(
                dataclasses.replace(p, zone=f"z{peer_zones[i]}")
                for i, p in enumerate(pool.config.peers)
            ),
            listeners=tuple(
                Listener(f"l{i}", "127.0.0.1", 4080 + i, "/as2", f"z{z}")
                for i, z in enumerate(listener_zones)
            ),
            storage=dataclasses.replace(
                pool.config.storage,
                state_dir=base / "state",
                inbox_dir=base / "inbox",
                outbox_dir=base / "outbox",
                audit_log=base / "audit.jsonl",
            ),
        )
        clock = SystemClock()
        spool = SqliteSpool(base / "state" / "spool.sqlite3", clock)
        audit = AuditLog(config.storage.audit_log, clock, node=config.as2_id)
        log = make_logger("error", io.StringIO())
        try:
            yield config, spool, audit, InboundProcessor(config, spool, audit, log, clock)
        finally:
            audit.close()
            spool.close()


@settings(
    max_examples=30,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(layouts(), st.lists(st.one_of(inbound_flows, enqueue_flows), min_size=1, max_size=8))
def test_random_flows_never_cross_zones_and_every_refusal_is_audited(
    pool: Pool, layout: tuple[list[int], list[int]], flows: list[tuple[str, int, int, int]]
) -> None:
    peer_zones, listener_zones = layout
    with gateway(pool, peer_zones, listener_zones) as (config, spool, audit, inbound):
        peers = config.peers  # same order as pool.peers
        expected_refusals: list[tuple[str, str]] = []  # (event, peer) the audit trail must hold
        expected_inbox: list[str] = []
        expected_queue: list[tuple[str, str, Origin]] = []
        for number, (kind, a, b, c) in enumerate(flows):
            if kind == "inbound":
                sender, listener = peers[a], config.listeners[b % len(config.listeners)]
                to = (
                    config.as2_id
                    if c == SELF
                    else "NOBODY-HERE"
                    if c == UNKNOWN
                    else peers[c].as2_id
                )
                # What the daemon does for each request: the zone of the listener first ...
                refusal = admit(listener.name, listener.zone, sender)
                if refusal is not None:
                    audit.emit(refusal.audit_event(direction="inbound", peer=sender.name))
                if sender.zone != listener.zone:
                    expected_refusals.append(("zone.violation", sender.name))
                    expected_inbox_skip = True
                else:
                    expected_inbox_skip = False
                if refusal is not None:
                    continue
                # ... then the whole inbound pipeline, with a real signed and encrypted message.
                payload = f"document {number}".encode()
                built = as2_message(pool.peers[a], pool.hospital, to, payload)
                headers = {k.lower(): v for k, v in built.headers}
                response = inbound.process(InboundRequest(sender, "127.0.0.1", headers, built.body))
                assert response.status == 200
                if expected_inbox_skip:
                    continue  # the model says refused; what got through shows in the inbox
                if c == SELF:
                    expected_inbox.append(f"{sender.name}:{payload.decode()}")
                elif c == UNKNOWN:
                    expected_refusals.append(("message.rejected", sender.name))
                else:
                    expected_refusals.append(("routing.transit_refused", sender.name))
            else:
                destination = peers[b]
                origin = LOCAL_INTAKE if a == SELF else Origin(peers[a].name, peers[a].zone)
                message_id = f"<m{number}@test>"
                allowed = origin.is_local or origin.zone == destination.zone
                if allowed:
                    expected_queue.append((message_id, destination.name, origin))
                else:
                    expected_refusals.append(("routing.transit_refused", destination.name))
                try:
                    spool.add_intake(
                        message_id,
                        destination.name,
                        "doc",
                        "text/plain",
                        Path("/nonexistent/src"),
                        Path("/nonexistent/payload"),
                        zone=destination.zone,
                        origin=origin,
                    )
                except TransitRefused as exc:
                    audit.emit(exc.refusal.audit_event(direction="outbound", peer=destination.name))

        # Delivered: exactly the messages addressed to us, from peers on their own zone.
        inbox = config.storage.inbox_dir
        delivered = (
            sorted(
                f"{f.parent.name}:{f.read_text()}"
                for f in inbox.rglob("*")
                if f.is_file() and not f.name.startswith(".")
            )
            if inbox.exists()
            else []
        )
        assert delivered == sorted(expected_inbox)
        # Queued: nothing that came in from one zone is queued for a peer of another.
        zone_of = {p.name: p.zone for p in peers}
        queued = spool.all_outbound()
        assert sorted((r.message_id, r.peer, r.origin) for r in queued) == sorted(expected_queue)
        for record in queued:
            assert record.zone == zone_of[record.peer]
            assert record.origin.is_local or record.origin.zone == record.zone
        # Every refused attempt is an alert in the audit trail, and nothing else is refused.
        records = read_audit(config.storage.audit_log)
        alerts = sorted(
            (r["event"], r["peer"])
            for r in records
            if r["severity"] == "alert"
            and r["event"] in ("zone.violation", "routing.transit_refused", "message.rejected")
        )
        assert alerts == sorted(expected_refusals)
