"""The one connect path (NET-4): every outbound connection the gateway makes is checked,
at connect time, against the zones of the configuration in force then.

Real sockets throughout: a recorder accepts TCP connections on a loopback address and
notes who connected; a refused connection never reaches it.
"""

from __future__ import annotations

import ast
import asyncio
import contextlib
import dataclasses
import hashlib
import http.server
import io
import ipaddress
import random
import signal
import socket
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from gateway.audit import AuditLog
from gateway.channel.client import PeerClient
from gateway.clock import SystemClock
from gateway.config import load_config
from gateway.delivery.http import HandOver
from gateway.demo_run import free_ports, read_audit, wait_until
from gateway.diagnose import Diagnoser
from gateway.egress import Network as ConnectPath
from gateway.egress import NetworkMap, Refused, ZonePath
from gateway.errors import TransportError
from gateway.logs import make_logger
from gateway.pki.tls import client_context
from gateway.routing import Network, zones_holding
from gateway.spool import SqliteSpool
from tests.helpers.zones import (
    World,
    as2_message,
    post_as2,
    set_site_runtime,
)
from tests.routes import listening, zone_map

GATEWAY = Path(__file__).resolve().parent.parent / "gateway"


@dataclass(frozen=True)
class _Zone:
    name: str
    egress: tuple[Network, ...]


def _zone(name: str, *ranges: str) -> _Zone:
    return _Zone(name, tuple(ipaddress.ip_network(r) for r in ranges))


def test_zones_holding_names_every_zone_whose_egress_holds_the_address() -> None:
    zones = [
        _zone("a", "10.1.0.0/16", "2001:db8:1::/48"),
        _zone("b", "10.2.0.0/16"),
        _zone("wide", "10.0.0.0/8"),
    ]
    assert zones_holding(zones, "10.1.2.3") == ["a", "wide"]
    assert zones_holding(zones, "10.2.0.1") == ["b", "wide"]
    assert zones_holding(zones, "2001:db8:1::5") == ["a"]
    assert zones_holding(zones, "fe80::1%eth0") == []
    assert zones_holding(zones, "192.168.1.1") == []
    assert zones_holding(zones, "not-an-address") == []


# --- a TCP server that records who connected -------------------------------------------


class Recorder:
    """Accepts connections on ``address``; notes each client's address; with ``hold``,
    keeps them open (unanswered) until :meth:`release`."""

    def __init__(self, address: str, *, hold: bool = False) -> None:
        self.seen: list[str] = []
        self._held: list[socket.socket] = []
        self._hold = hold
        self._server = socket.create_server((address, 0))
        self._server.settimeout(0.2)
        self.port = self._server.getsockname()[1]
        self._stop = False
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while not self._stop:
            try:
                conn, peer = self._server.accept()
            except TimeoutError:
                continue
            self.seen.append(peer[0])
            if self._hold:
                self._held.append(conn)
            else:
                conn.close()

    def release(self) -> None:
        for conn in self._held:
            conn.close()
        self._held.clear()
        self._hold = False

    def close(self) -> None:
        self._stop = True
        self._thread.join(2)
        self.release()
        self._server.close()


@pytest.fixture
def recorder() -> Iterator[Recorder]:
    server = Recorder("127.0.0.1")
    try:
        yield server
    finally:
        server.close()


def _post(world: World, url: str, network: ConnectPath) -> str:
    async def go() -> str:
        client = _client(world, network)
        try:
            await client.post(url, (), b"x")
        except TransportError as exc:
            return f"refused: {exc}" if exc.refused else f"failed: {exc}"
        finally:
            await client.close()
        return "sent"

    return asyncio.run(go())


def _client(world: World, network: ConnectPath, zone: str = "z") -> PeerClient:
    context = client_context(
        world.hospital.pair("tls"), [world.lab.ca.certificate], [world.lab.tls.certificate], "1.3"
    )
    return PeerClient(context, 2, 5, route=network.zone(zone))


def _map(*ranges: str, listeners: tuple[tuple[str, int], ...] = ()) -> NetworkMap:
    return zone_map(None, *ranges, listeners=listeners)


@dataclass(frozen=True)
class _Peer:
    name: str
    as2_id: str
    zone: str


# --- AS2 messages and receipts: the peer client -------------------------------------------


def test_an_ip_literal_url_outside_the_zone_is_refused_before_any_packet(
    world: World, recorder: Recorder
) -> None:
    """aiohttp does not resolve an IP literal: the check must not live in a resolver."""
    refusals: list[Refused] = []
    network = ConnectPath(lambda: _map("10.0.0.0/8"), on_refused=refusals.append)
    outcome = _post(world, f"https://127.0.0.1:{recorder.port}/as2", network)
    assert outcome.startswith("refused: cannot connect: 127.0.0.1 is outside the egress of zone")
    assert recorder.seen == []
    assert [(r.route, r.address, r.port) for r in refusals] == [
        ("zone 'z'", "127.0.0.1", recorder.port)
    ]


def test_the_zone_in_force_at_connect_time_decides_not_the_one_the_client_was_built_with(
    world: World, recorder: Recorder
) -> None:
    """A client built before a reload connects by the reloaded zones."""
    now = {"map": _map("127.0.0.0/8")}
    network = ConnectPath(lambda: now["map"])
    url = f"https://127.0.0.1:{recorder.port}/as2"

    async def go() -> list[str]:
        client = _client(world, network)
        outcomes = []
        try:
            for network_map in (_map("127.0.0.0/8"), _map("127.0.2.0/24"), NetworkMap()):
                now["map"] = network_map
                try:
                    await client.post(url, (), b"x")
                except TransportError as exc:
                    outcomes.append("refused" if exc.refused else "connected, then failed")
        finally:
            await client.close()
        return outcomes

    outcomes = asyncio.run(go())
    # In force: inside; then a reload shrank the egress; then removed the zone.
    assert outcomes == ["connected, then failed", "refused", "refused"]
    assert recorder.seen == ["127.0.0.1"]


def test_no_route_connects_to_one_of_our_own_listeners(world: World, recorder: Recorder) -> None:
    ours = (("127.0.0.1", recorder.port),)
    network = ConnectPath(lambda: _map("127.0.0.0/8", listeners=ours))
    outcome = _post(world, f"https://127.0.0.1:{recorder.port}/as2", network)
    assert "listener 0 (zone 'z') of this gateway" in outcome
    wildcard = ConnectPath(lambda: _map("127.0.0.0/8", listeners=(("0.0.0.0", recorder.port),)))
    outcome = _post(world, f"https://127.0.0.1:{recorder.port}/as2", wildcard)
    assert "listener 0 (zone 'z') of this gateway" in outcome
    assert recorder.seen == []


def test_the_internal_route_never_reaches_into_a_zone() -> None:
    network_map = NetworkMap(
        {
            "a": ZonePath("10.1.0.1", (ipaddress.ip_network("10.1.0.0/16"),)),
            "wan": ZonePath(None, (ipaddress.ip_network("0.0.0.0/0"),)),
        },
        listening(("127.0.0.1", 4080)),
        {(ipaddress.ip_address("127.0.0.1"), 5080): _Peer("lab", "LAB", "a")},
    )
    internal = ConnectPath.fixed(network_map).internal()

    def why(address: str, port: int) -> str:
        return str(internal.judge(address, port)[1])

    assert "inside the egress of zone 'a' (10.1.0.0/16)" in why("10.1.2.3", 80)
    assert "inside the egress of zone 'wan'" in why("192.0.2.7", 443)
    # On this host only a peer's endpoint (address and port) or our listener is a zone's.
    assert "the AS2 endpoint of peer 'lab' (zone 'a') on this host" in why("127.0.0.1", 5080)
    assert "listener 0 (zone 'z') of this gateway" in why("127.0.0.1", 4080)
    assert internal.judge("127.0.0.1", 9001) == (None, None)  # the EHR on this host
    # ... and it leaves from the OS's choice of address, never a zone's source address.
    zone_a = ConnectPath.fixed(network_map).zone("a")
    assert zone_a.judge("10.1.2.3", 443) == ("10.1.0.1", None)


# --- the hand-over ------------------------------------------------------------------------


def test_a_hand_over_to_a_peers_endpoint_is_refused_and_retried_not_sent(
    world: World, recorder: Recorder, tmp_path: Path
) -> None:
    """The hand-over URL leads (here: after a reload) to the lab's AS2 endpoint."""
    lab_url = f"https://127.0.0.1:{recorder.port}/as2"
    world.hospital.peers[0] = (world.lab, "zone-a", lab_url)
    world.hospital.zones[0]["egress"] = ["127.0.0.0/24"]
    (ehr_port,) = free_ports(1)
    world.hospital.write(
        gateway_extra=f'[delivery]\nhttp_url = "http://127.0.0.1:{ehr_port}/inbound"\n'
    )
    loaded = load_config(world.hospital.config_path)
    assert loaded.delivery is not None
    # What the URL leads to now is the lab's endpoint (as after a reload or a DNS change).
    moved = dataclasses.replace(loaded.delivery, http_url=f"http://127.0.0.1:{recorder.port}/in")
    config = dataclasses.replace(loaded, delivery=moved)
    spool = SqliteSpool(tmp_path / "spool.sqlite3", SystemClock())
    audit = AuditLog(tmp_path / "audit.jsonl", SystemClock(), node="hospital")
    refusals: list[Refused] = []
    network = ConnectPath(lambda: config.network_map, on_refused=refusals.append)
    worker = HandOver(
        spool, lambda: audit, make_logger(stream=io.StringIO()), SystemClock(),
        lambda: config, random.Random(1), network.internal(),
    )  # fmt: skip
    inbox_file = tmp_path / "a.hl7"
    inbox_file.write_bytes(b"MSH|a\r")
    sha = hashlib.sha256(b"MSH|a\r").hexdigest()

    async def attempt() -> float:
        [record] = spool.handover_due(datetime.now(UTC).timestamp() + 1)
        async with worker.session() as session:
            return await worker.hand_over(session, record)

    try:
        spool.inbound_begin("lab", "<m@x>", sha, inbox_file)
        spool.inbound_delivered("lab", "<m@x>", [], b"mdn", handover=("x/y", 6))
        assert asyncio.run(attempt()) > 0
        record = spool.handover_get("lab", "<m@x>")
        assert record is not None and record.state.value == "pending"
        assert "not connected: 127.0.0.1 port" in str(record.last_error)
        assert "the AS2 endpoint of peer 'lab' (zone 'zone-a')" in str(record.last_error)
        assert [r.route for r in refusals] == ["the internal side"]
        assert recorder.seen == []
    finally:
        spool.close()
        audit.close()


class KeepAliveSystem:
    """An internal system on 127.0.0.1 that keeps connections open (HTTP/1.1) and notes,
    for each POST, the client's port: one port per connection."""

    def __init__(self) -> None:
        self.ports: list[int] = []
        system = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_POST(self) -> None:
                self.rfile.read(int(self.headers["Content-Length"]))
                system.ports.append(self.client_address[1])
                self.send_response(200)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def test_a_connection_kept_alive_from_before_a_reload_is_not_used_after_it(
    world: World, tmp_path: Path
) -> None:
    """The hand-over worker runs across reloads: after one, a new connection is made
    and judged, instead of sending over the one the old configuration allowed."""
    system = KeepAliveSystem()
    world.hospital.write(
        gateway_extra=f'[delivery]\nhttp_url = "http://127.0.0.1:{system.port}/inbound"\n'
    )
    before = load_config(world.hospital.config_path)
    # The reload: the lab's AS2 endpoint is now that address and port.
    lab = dataclasses.replace(
        before.require_peer("lab"), url=f"https://127.0.0.1:{system.port}/as2"
    )
    after = dataclasses.replace(
        before, peers=tuple(lab if p.name == "lab" else p for p in before.peers)
    )
    now = {"config": before}
    spool = SqliteSpool(tmp_path / "spool.sqlite3", SystemClock())
    audit = AuditLog(tmp_path / "audit.jsonl", SystemClock(), node="hospital")
    network = ConnectPath(lambda: now["config"].network_map)
    worker = HandOver(
        spool, lambda: audit, make_logger(stream=io.StringIO()), SystemClock(),
        lambda: now["config"], random.Random(1), network.internal(),
    )  # fmt: skip

    def arrive(message_id: str) -> None:
        inbox_file = tmp_path / f"{len(message_id)}-{message_id.strip('<>@')}.hl7"
        inbox_file.write_bytes(b"MSH|a\r")
        sha = hashlib.sha256(b"MSH|a\r").hexdigest()
        spool.inbound_begin("lab", message_id, sha, inbox_file)
        spool.inbound_delivered("lab", message_id, [], b"mdn", handover=("x/y", 6))
        worker.wake()

    def state(message_id: str) -> Any:
        return spool.handover_get("lab", message_id)

    async def go() -> None:
        task = asyncio.create_task(worker.run())
        try:
            arrive("<one@x>")
            await _until(lambda: state("<one@x>").state.value == "done")
            now["config"] = after
            arrive("<two@x>")
            await _until(lambda: "not connected" in str(state("<two@x>").last_error))
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    try:
        asyncio.run(go())
        assert "the AS2 endpoint of peer 'lab'" in str(state("<two@x>").last_error)
        assert len(system.ports) == 1  # only the first document reached the system
    finally:
        system.close()
        spool.close()
        audit.close()


async def _until(condition: Callable[[], bool], timeout: float = 30) -> None:
    async with asyncio.timeout(timeout):
        while not condition():
            await asyncio.sleep(0.05)


# --- diagnose -----------------------------------------------------------------------------


def test_diagnose_refuses_an_ip_literal_outside_the_zone(world: World) -> None:
    config = load_config(world.hospital.config_path)
    zone_a = config.require_zone("zone-a")
    narrowed = dataclasses.replace(zone_a, egress=(ipaddress.ip_network("10.9.0.0/16"),))
    config = dataclasses.replace(
        config, zones=tuple(narrowed if z.name == "zone-a" else z for z in config.zones)
    )
    diagnosis = asyncio.run(Diagnoser(config, config.require_peer("lab"), SystemClock()).run())
    failed = diagnosis.first_failure
    assert failed is not None and failed.name == "resolve", diagnosis.to_json()
    assert "127.0.1.2, none inside the egress of zone 'zone-a' (10.9.0.0/16)" in failed.detail


# --- the daemon: an asynchronous receipt owed across a reload -----------------------------


def _audited(world: World, event: str) -> list[dict[str, Any]]:
    return [e for e in read_audit(world.hospital.audit_log) if e["event"] == event]


def test_a_receipt_owed_to_a_peer_moved_to_another_zone_is_not_sent_across(
    world: World, processes: Any
) -> None:
    """The receipt URL was the lab's in zone A; a reload moved the lab to zone B while
    the receipt was being delivered: the next attempt is judged by zone B, and refused."""
    lab_endpoint = Recorder("127.0.1.2", hold=True)  # the lab's AS2 endpoint in zone A
    try:
        receipt_url = f"https://127.0.1.2:{lab_endpoint.port}/as2"
        world.hospital.peers[0] = (world.lab, "zone-a", receipt_url)
        world.hospital.write()
        # The first attempt waits on the held connection while the test reloads.
        set_site_runtime(
            world.hospital.config_path, connect_timeout_seconds=120, request_timeout_seconds=300
        )
        hospital = processes.start(world.hospital.config_path)
        built = as2_message(
            world.lab, world.hospital, world.hospital.as2_id, b"MSH|x\r", receipt_url=receipt_url
        )
        port = world.hospital.listeners[0]["port"]
        answer = post_as2(world.lab, "127.0.1.1", port, built, until=b"\r\n\r\n")
        assert answer.startswith(b"HTTP/1.1 200"), answer
        wait_until(lambda: lab_endpoint.seen == ["127.0.1.1"], 30, "the first receipt attempt")

        # The lab moves to zone B, with its URL in zone B's range.
        world.hospital.zones[1]["trust_anchors"].append(world.hospital.trust(world.lab))
        world.hospital.peers[0] = (world.lab, "zone-b", "https://127.0.2.9:4443/as2")
        world.hospital.write()
        set_site_runtime(
            world.hospital.config_path, connect_timeout_seconds=120, request_timeout_seconds=300
        )
        hospital.signal(signal.SIGHUP)
        hospital.wait_for(lambda line: line.get("event") == "config.reloaded", 60)
        lab_endpoint.release()  # the first attempt fails; the next one is made after the reload

        [refused] = wait_until(
            lambda: [
                e
                for e in read_audit(world.hospital.audit_log)
                if e["event"] == "zone.egress_refused"
            ],
            60,
            "the refused receipt connection",
        )
        assert refused["remote_address"] == "127.0.1.2"
        assert refused["detail"] == {"route": "zone 'zone-b'", "port": lab_endpoint.port}
        assert refused["severity"] == "alert"
        assert "outside the egress of zone 'zone-b' (127.0.2.0/24)" in refused["reason"]
        [gave_up] = wait_until(
            lambda: [e for e in _audited(world, "receipt.sent") if e["outcome"] == "failure"],
            30,
            "the receipt given up",
        )
        assert "not tried again" in gave_up["reason"]
        assert lab_endpoint.seen == ["127.0.1.1"]  # nothing from zone B's address
    finally:
        lab_endpoint.close()


# --- no way out but the connect path ------------------------------------------------------

# Names that open a network connection (or make something that does) without the
# connect path.  A file may use one only where it is listed below, with the reason.
OUTBOUND = {
    "ClientSession": "aiohttp: a session without the route's connector connects directly",
    "TCPConnector": "aiohttp: connects to what the URL says",
    "request": "aiohttp.request: a one-off session",
    "open_connection": "asyncio: connects to a host and port",
    "create_connection": "asyncio / socket: connects to a host and port",
    "sock_connect": "asyncio: connects a socket",
    "start_connection": "aiohappyeyeballs: connects to addresses",
    "socket": "socket.socket: a raw socket can connect anywhere",
    "urlopen": "urllib: connects to what the URL says",
    "HTTPConnection": "http.client: connects to a host",
    "HTTPSConnection": "http.client: connects to a host",
    "connect": "socket.connect / connect_ex: connects a socket",
    "connect_ex": "socket.connect_ex: connects a socket",
    "sendto": "socket.sendto: sends a datagram anywhere",
    "allow_fetching": "pyhanko-certvalidator: fetches CRLs, OCSP and certificates itself",
}
# (file under gateway/, name): why it is not an outbound network connection.
ALLOWED = {
    ("egress.py", "ClientSession"): "the connect path itself",
    ("egress.py", "TCPConnector"): "the connect path itself",
    ("egress.py", "socket"): "the connect path itself (its socket factory)",
    ("egress.py", "sock_connect"): "the connect path itself (open_socket)",
    ("control/client.py", "socket"): "AF_UNIX: the local control socket",
    ("control/client.py", "HTTPConnection"): "AF_UNIX: HTTP over the local control socket",
    ("control/client.py", "connect"): "AF_UNIX: the local control socket",
    ("control/server.py", "socket"): "AF_UNIX: the local control socket",
    ("sdnotify.py", "socket"): "AF_UNIX: systemd's notification socket",
    ("sdnotify.py", "sendto"): "AF_UNIX: systemd's notification socket",
    ("intake/api.py", "socket"): "the local API's listening socket",
    ("demo_run.py", "socket"): "binds a port to find a free one; never connects",
    ("commands/demo.py", "socket"): "binds a port to see whether it is free; never connects",
}


def _outbound_name(node: ast.expr, imported: dict[str, str]) -> str | None:
    """The OUTBOUND name ``node`` (what is called, or a base class) stands for."""
    if isinstance(node, ast.Attribute):
        base = node.value.id if isinstance(node.value, ast.Name) else ""
        if node.attr == "request" and base != "aiohttp":
            return None  # e.g. connection.request(...): a method of something already made
        if node.attr in ("connect", "connect_ex", "sendto") and "sock" not in base.lower():
            return None  # e.g. sqlite3.connect(...)
        return node.attr if node.attr in OUTBOUND else None
    if isinstance(node, ast.Name):
        return imported.get(node.id)
    return None


def _names_used(tree: ast.AST) -> set[str]:
    """The OUTBOUND names ``tree`` calls or subclasses (``aiohttp.ClientSession()``,
    ``sock.connect(...)``, ``class C(http.client.HTTPConnection)``, and names imported
    from the modules that connect), and a certificate validator allowed to fetch by
    itself; a type annotation connects nothing."""
    imported = {
        alias.asname or alias.name: alias.name
        for node in ast.walk(tree)
        if isinstance(node, ast.ImportFrom)
        and (node.module or "").split(".")[0] in ("aiohttp", "asyncio", "socket", "urllib", "http")
        for alias in node.names
        if alias.name in OUTBOUND
    }
    found = set()
    for node in ast.walk(tree):
        targets: list[ast.expr] = []
        if isinstance(node, ast.Call):
            targets = [node.func]
            if any(
                k.arg == "allow_fetching"
                and not (isinstance(k.value, ast.Constant) and k.value.value is False)
                for k in node.keywords
            ):
                found.add("allow_fetching")
        elif isinstance(node, ast.ClassDef):
            targets = list(node.bases)
        for target in targets:
            name = _outbound_name(target, imported)
            upgrades = isinstance(node, ast.Call) and any(k.arg == "sock" for k in node.keywords)
            if name in ("open_connection", "create_connection") and upgrades:
                continue  # wraps a socket already connected (by the connect path)
            if name is not None:
                found.add(name)
    return found


def test_every_outbound_connection_goes_through_the_connect_path() -> None:
    used: dict[tuple[str, str], str] = {}
    for path in sorted(GATEWAY.rglob("*.py")):
        relative = path.relative_to(GATEWAY).as_posix()
        for name in _names_used(ast.parse(path.read_text(), str(path))):
            used[(relative, name)] = OUTBOUND[name]
    bypasses = {key: why for key, why in used.items() if key not in ALLOWED}
    assert not bypasses, (
        "outbound connections that bypass gateway/egress.py (use a Route's session(), "
        f"connector() or open_socket(), or list the use in ALLOWED with why): {bypasses}"
    )
    stale = set(ALLOWED) - set(used)
    assert not stale, f"ALLOWED lists uses that are gone; remove them: {stale}"


def test_the_rule_catches_each_way_of_connecting() -> None:
    samples = {
        "import aiohttp\naiohttp.ClientSession()": "ClientSession",
        "from aiohttp import ClientSession as S\nS()": "ClientSession",
        "import aiohttp\naiohttp.TCPConnector()": "TCPConnector",
        "import aiohttp\naiohttp.request('GET', u)": "request",
        "import asyncio\nasyncio.open_connection(h, p)": "open_connection",
        "loop.create_connection(f, h, p)": "create_connection",
        "loop.sock_connect(s, a)": "sock_connect",
        "import asyncio\nasyncio.open_connection(h, p, ssl=c)": "open_connection",
        "import socket\nsocket.create_connection((h, p))": "create_connection",
        "import socket\nsocket.socket()": "socket",
        "sock.connect((h, p))": "connect",
        "sock.sendto(b'x', (h, p))": "sendto",
        "from urllib.request import urlopen\nurlopen(u)": "urlopen",
        "import http.client\nclass C(http.client.HTTPConnection): pass": "HTTPConnection",
        "import urllib.request\nurllib.request.urlopen(u)": "urlopen",
        "import http.client\nhttp.client.HTTPSConnection(h)": "HTTPSConnection",
        "ValidationContext(trust_roots=r, allow_fetching=True)": "allow_fetching",
    }
    for source, name in samples.items():
        assert name in _names_used(ast.parse(source)), source
    for harmless in (
        "db.connect()",
        "sqlite3.connect(p)",
        "connection.request('GET', u)",
        "ValidationContext(trust_roots=r, allow_fetching=False)",
        "asyncio.open_connection(sock=s, ssl=c)",
        "def f(s: aiohttp.ClientSession, c: socket.socket) -> None: ...",
    ):
        assert not _names_used(ast.parse(harmless)), harmless
