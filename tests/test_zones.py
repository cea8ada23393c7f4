"""Network zones (NET-4, NET-8): configuration rules, check-config's proof table,
per-zone TLS on the listeners, the spool's no-transit invariant, and outbound
connections that stay in their zone.

``Site`` builds real installations (certificates from real CAs, TOML files) for
any zone layout; the network-namespace system test uses it too.
"""

from __future__ import annotations

import asyncio
import ipaddress
import re
import signal
import socket
import sqlite3
import ssl
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from gateway.channel.client import PeerClient
from gateway.clock import SystemClock
from gateway.config import load_config
from gateway.demo_run import drop_file, free_ports, wait_until
from gateway.egress import Route
from gateway.errors import ConfigError, ConfigProblem, TransportError
from gateway.pki.tls import client_context
from gateway.routing import LOCAL_INTAKE, Origin, TransitRefused
from gateway.spool import SqliteSpool
from tests.helpers.audit import events, wait_for_events
from tests.helpers.zones import (
    World,
    as2_message,
    handshake_refused,
    post_as2,
    send_as2,
    tls_connect,
    toml_string,
)
from tests.routes import zone_route

# --- building installations ------------------------------------------------------------


# --- configuration rules --------------------------------------------------------------


def _problems(config: Path) -> list[ConfigProblem]:
    with pytest.raises(ConfigError) as info:
        load_config(config)
    return [p for p in info.value.problems if p.severity == "error"]


def _warnings(config: Path) -> list[ConfigProblem]:
    """Warnings other than the one each zone of these worlds earns by revocation = "off"."""
    return [w for w in load_config(config).warnings if not w.key.endswith(".revocation")]


def _one(problems: list[ConfigProblem], key: str) -> ConfigProblem:
    found = [p for p in problems if p.key == key]
    assert len(found) == 1, (key, [str(p) for p in problems])
    assert found[0].fix
    return found[0]


def _check_config(config: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "gateway", "check-config", "--config", str(config)],
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )


def test_two_zone_config_loads_and_check_config_prints_the_proof(world: World) -> None:
    config = load_config(world.hospital.config_path)
    assert _warnings(world.hospital.config_path) == []
    a, b = config.zones
    assert (a.name, a.kind, a.source_address, [str(n) for n in a.egress]) == (
        "zone-a",
        "closed-network",
        "127.0.1.1",
        ["127.0.1.0/24"],
    )
    assert a.trust_anchors == (world.lab.ca.certificate,)
    assert b.trust_anchors == (world.pharmacy.ca.certificate,)
    assert (b.kind, b.min_version, b.revocation) == ("ip-vpn", "1.3", "off")
    assert {p.name: p.zone for p in config.peers} == {"lab": "zone-a", "pharmacy": "zone-b"}
    assert [(lst.name, lst.zone) for lst in config.listeners] == [
        ("zone-a", "zone-a"),
        ("zone-b", "zone-b"),
    ]

    result = _check_config(world.hospital.config_path)
    assert result.returncode == 0, result.stderr
    out = result.stdout
    table = out[out.index("network separation proof") :]
    rows = {
        line[7:].split("  ")[0]: line
        for line in table.splitlines()
        if line[:6].strip() in ("NET-1", "NET-4")
    }
    assert set(rows) == {
        "no plaintext listener",
        "no listener shared by two zones",
        "no address in two zones' egress",
        "each peer's URL inside its zone's egress",
        "hand-over and local API outside every zone",
        "no cross-zone route",
    }
    assert all(" holds " in row for row in rows.values()), table
    assert "VIOLATED" not in table
    assert "lab: 127.0.1.2 in 127.0.1.0/24 (zone zone-a)" in table
    assert "pharmacy: 127.0.2.2 in 127.0.2.0/24 (zone zone-b)" in table
    assert "zone-a: 127.0.1.0/24" in table and "zone-b: 127.0.2.0/24" in table
    assert "(no hand-over: received documents stay in the inbox folder)" in table
    profiles = table[table.index("zone TLS profiles") :].splitlines()
    assert any(
        line.split()[:6] == ["zone-a", "closed-network", ">=", "1.3", "off", "lab"]
        for line in profiles
    )
    assert any(
        line.split()[:6] == ["zone-b", "ip-vpn", ">=", "1.3", "off", "pharmacy"]
        for line in profiles
    )


def _rejected(config: Path, file: Path, key: str, *words: str) -> ConfigProblem:
    """check-config refuses it, naming the file, the key and a fix; load_config agrees."""
    result = _check_config(config)
    assert result.returncode == 1, result.stdout
    lines = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert any(f"{file}: {key}: " in line and "(fix: " in line for line in lines), result.stderr
    problem = _one(_problems(config), key)
    assert problem.file == str(file)
    for word in words:
        assert word in problem.message + problem.fix, (word, str(problem))
    return problem


def test_plaintext_listener_or_peer_cannot_be_configured(world: World) -> None:
    hospital = world.hospital
    hospital.listeners[0]["tls"] = False
    hospital.write()
    _rejected(hospital.config_path, hospital.config_path, "listeners[0].tls", "unknown key")
    del hospital.listeners[0]["tls"]
    hospital.peers[0] = (world.lab, "zone-a", "http://127.0.1.2:4080/as2")
    hospital.write()
    _rejected(hospital.config_path, hospital.root / "peers.d" / "lab.toml", "url", "plaintext")


def test_listener_shared_by_two_zones_is_refused(world: World) -> None:
    hospital = world.hospital
    hospital.listeners[1]["address"] = "127.0.1.1"  # zone B's listener on zone A's address
    hospital.write()
    problem = _rejected(
        hospital.config_path, hospital.config_path, "listeners[1].address", "share", "two zones"
    )
    assert "zone-a" in problem.message and "zone-b" in problem.message


def test_wildcard_listener_serves_every_zone_and_is_refused(world: World) -> None:
    hospital = world.hospital
    hospital.listeners[0]["address"] = "0.0.0.0"
    hospital.write()
    _rejected(hospital.config_path, hospital.config_path, "listeners[0].address", "every zone")
    # With one zone the same binding works but is flagged.
    assert _warnings(world.lab.config_path) == []
    world.lab.listeners[0]["address"] = "::"
    world.lab.write()
    (warning,) = _warnings(world.lab.config_path)
    assert warning.key == "listeners[0].address" and warning.severity == "warning"


def test_zones_sharing_a_source_address_are_refused(world: World) -> None:
    hospital = world.hospital
    hospital.zones[1]["source_address"] = "127.0.1.1"
    hospital.write()
    _rejected(hospital.config_path, hospital.config_path, "zones[1].source_address", "both send")


def test_zone_without_source_address_is_a_warning_with_several_zones(world: World) -> None:
    del world.hospital.zones[1]["source_address"]
    world.hospital.write()
    (warning,) = _warnings(world.hospital.config_path)
    assert warning.key == "zones[1].source_address" and "routing picks" in warning.message


def test_peer_url_outside_its_zone_egress_is_refused(world: World) -> None:
    hospital = world.hospital
    # The pharmacy's address, but the peer is declared in zone A: it would leave via zone B.
    hospital.peers[1] = (world.pharmacy, "zone-a", "https://127.0.2.2:4443/as2")
    hospital.write()
    problem = _rejected(
        hospital.config_path, hospital.root / "peers.d" / "pharmacy.toml", "url", "egress"
    )
    assert "127.0.1.0/24" in problem.message and "zone-a" in problem.message


def test_no_route_between_zones_can_be_configured(world: World) -> None:
    """medgw has no forwarding: a route table is not part of the schema and is refused."""
    hospital = world.hospital
    hospital.write(gateway_extra='\n[[routes]]\nfrom_zone = "zone-a"\nto_zone = "zone-b"\n')
    problem = _rejected(hospital.config_path, hospital.config_path, "routes", "unknown key")
    assert "zones" in problem.fix  # lists what the table does know


def test_zone_references_and_values_are_checked(world: World) -> None:
    hospital = world.hospital
    hospital.listeners[0]["zone"] = "zone-c"
    hospital.zones[0]["egress"] = ["127.0.1.1/24"]
    hospital.zones[1]["kind"] = "vpn"
    hospital.zones[1]["name"] = "zone-a"
    hospital.peers[1] = (world.pharmacy, "nowhere", "https://127.0.2.2:4443/as2")
    hospital.write()
    problems = _problems(hospital.config_path)
    assert "zone-c" in _one(problems, "listeners[0].zone").message
    assert "network address" in _one(problems, "zones[0].egress").fix
    assert "closed-network" in _one(problems, "zones[1].kind").fix
    assert "twice" in _one(problems, "zones[1].name").message
    pharmacy = [p for p in problems if p.file.endswith("pharmacy.toml") and p.key == "zone"]
    assert len(pharmacy) == 1 and "nowhere" in pharmacy[0].message


def test_config_from_before_zones_is_refused_with_the_way_forward(world: World) -> None:
    hospital = world.hospital
    text = hospital.write().read_text()
    head, rest = text.split("[[zones]]", 1)
    old = (
        head.replace("[tls]\n", '[tls]\ntrust_anchors = ["certs/ca.crt"]\nmin_version = "1.3"\n')
        + rest[rest.index("[[listeners]]") :]
    )
    old = old.replace('zone = "zone-a"\n', "").replace('zone = "zone-b"\n', "")
    hospital.config_path.write_text(old)
    for peer in (hospital.root / "peers.d").glob("*.toml"):
        peer.write_text(
            "\n".join(x for x in peer.read_text().splitlines() if not x.startswith("zone"))
        )
    problems = _problems(hospital.config_path)
    assert "[[zones]]" in _one(problems, "zones").fix
    assert "[[zones]]" in _one(problems, "tls.trust_anchors").fix
    assert "[[zones]]" in _one(problems, "tls.min_version").fix
    assert _one(problems, "listeners[0].zone").message == "required key is missing"
    assert {p.file for p in problems if p.key == "zone"} == {
        str(hospital.root / "peers.d" / "lab.toml"),
        str(hospital.root / "peers.d" / "pharmacy.toml"),
    }


# --- what each configured URL reaches (hand-over, peers' URLs, egress) ---------------------


def _hand_over(url: str, *, services: str = "", ca: bool = False) -> str:
    lines = ["", "[delivery]", f"http_url = {toml_string(url)}"]
    if ca:
        lines.append('ca = "certs/ca.crt"')
    return "\n".join(lines) + "\n" + services


def _run_refused(config: Path, *words: str) -> str:
    """``medgw run`` does not start, and says why."""
    result = subprocess.run(
        [sys.executable, "-m", "gateway", "run", "--config", str(config)],
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )
    assert result.returncode != 0, result.stdout
    assert "not starting" in result.stderr, result.stderr
    for word in words:
        assert word in result.stderr, (word, result.stderr)
    return result.stderr


def test_hand_over_to_a_peers_endpoint_is_refused_everywhere(world: World) -> None:
    """The reproduction: the hand-over URL set to the lab's AS2 endpoint (zone A)."""
    hospital = world.hospital
    lab_port = world.lab.listeners[0]["port"]
    hospital.write(gateway_extra=_hand_over(f"http://127.0.1.2:{lab_port}/as2"))
    problem = _rejected(
        hospital.config_path, hospital.config_path, "delivery.http_url", "peer 'lab'", "NET-4"
    )
    assert "egress" in problem.fix
    _run_refused(hospital.config_path, "delivery.http_url", "peer 'lab'")


def test_hand_over_into_a_zones_egress_or_to_our_listener_is_refused(world: World) -> None:
    hospital = world.hospital
    # A third zone on a real network range: an internal-looking address inside it.
    hospital.zone("zone-c", ["10.20.0.0/16"], [world.lab], source_address="127.0.3.1")
    hospital.write(gateway_extra=_hand_over("https://10.20.0.5:8443/inbound", ca=True))
    problem = _rejected(
        hospital.config_path, hospital.config_path, "delivery.http_url", "zone 'zone-c'"
    )
    assert "10.20.0.0/16" in problem.message
    # The same address, as an IPv4-mapped IPv6 literal, is the same place.
    hospital.write(gateway_extra=_hand_over("https://[::ffff:10.20.0.5]:8443/inbound", ca=True))
    _rejected(hospital.config_path, hospital.config_path, "delivery.http_url", "zone 'zone-c'")
    # Our own listener of zone B.
    port_b = hospital.listeners[1]["port"]
    hospital.write(gateway_extra=_hand_over(f"http://127.0.2.1:{port_b}/as2"))
    _rejected(hospital.config_path, hospital.config_path, "delivery.http_url", "'zone-b'")


def test_hand_over_per_service_and_by_host_name_is_checked_too(world: World) -> None:
    hospital = world.hospital
    (api_port,) = free_ports(1)
    api = (
        f'\n[api]\nlisten = "127.0.0.1:{api_port}"\n[[api.clients]]\nname = "lis"\n'
        f'token_sha256 = "{"0" * 64}"\npeers = ["lab"]\n'
    )
    service = (
        '[[delivery.services]]\nname = "referrals"\n'
        f'http_url = "https://localhost:{api_port}/referrals"\n'
    )
    text = hospital.write(
        gateway_extra=_hand_over("http://127.0.0.1:9000/inbound", services=service, ca=True) + api
    )
    lab = hospital.root / "peers.d" / "lab.toml"
    lab.write_text(lab.read_text() + 'services = ["referrals"]\n')
    # "localhost" resolves to this host: at the API's port it is the local API.
    problem = _rejected(
        text, hospital.config_path, "delivery.services[0].http_url", "the local API"
    )
    assert f"port {api_port}" in problem.message


def test_hand_over_on_this_host_is_accepted_and_shown_in_the_proof(world: World) -> None:
    hospital = world.hospital
    (api_port,) = free_ports(1)
    api = (
        f'\n[api]\nlisten = "127.0.0.1:{api_port}"\n[[api.clients]]\nname = "lis"\n'
        f'token_sha256 = "{"0" * 64}"\npeers = ["lab"]\n'
    )
    hospital.write(gateway_extra=_hand_over("http://127.0.0.1:9000/inbound") + api)
    result = _check_config(hospital.config_path)
    assert result.returncode == 0, result.stderr
    table = result.stdout[result.stdout.index("network separation proof") :]
    row = table[table.index("hand-over and local API outside every zone") :]
    assert row.split("\n")[0].split()[7] == "holds", row
    assert "delivery.http_url: http://127.0.0.1:9000/inbound -> 127.0.0.1 port 9000" in row
    assert f"local API: http://127.0.0.1:{api_port} (loopback: this host only)" in row


def test_reload_into_a_hand_over_to_a_peer_keeps_the_old_configuration(
    world: World, processes: Any
) -> None:
    hospital = world.hospital
    hospital.write(gateway_extra=_hand_over("http://127.0.0.1:9000/inbound"))
    daemon = processes.start(hospital.config_path)
    lab_port = world.lab.listeners[0]["port"]
    hospital.write(gateway_extra=_hand_over(f"http://127.0.1.2:{lab_port}/as2"))
    daemon.signal(signal.SIGHUP)
    [failed] = wait_for_events(hospital.audit_log, "config.reload_failed")
    assert "delivery.http_url" in failed["reason"] and "peer 'lab'" in failed["reason"]
    assert daemon.proc.poll() is None
    # Still serving: the listener of zone A completes a handshake with the lab.
    assert not handshake_refused(world.lab, world.lab, "127.0.1.1", hospital.listeners[0]["port"])
    assert events(hospital.audit_log, "config.reloaded") == []


def test_peer_url_pointing_at_our_own_listener_is_refused(world: World) -> None:
    hospital = world.hospital
    port_a = hospital.listeners[0]["port"]
    # The lab's url set to our own zone A listener: we would send to ourselves.
    hospital.peers[0] = (world.lab, "zone-a", f"https://127.0.1.1:{port_a}/as2")
    hospital.write()
    problem = _rejected(
        hospital.config_path, hospital.root / "peers.d" / "lab.toml", "url", "'zone-a'"
    )
    assert "to itself" in problem.message


def test_async_receipt_url_at_another_zones_listener_is_refused(world: World) -> None:
    hospital = world.hospital
    hospital.zone("zone-c", ["10.20.0.0/16"], [world.lab], source_address="127.0.3.1")
    hospital.write()
    lab = hospital.root / "peers.d" / "lab.toml"
    port_a, port_b = (entry["port"] for entry in hospital.listeners)
    plain = lab.read_text()
    # Our zone A listener, as the lab (zone A) reaches it: fine.
    lab.write_text(plain + f'async_receipt_url = "https://127.0.1.1:{port_a}/as2"\n')
    assert _warnings(hospital.config_path) == []
    # Our zone B listener: the lab would be told to deliver receipts into zone B.
    lab.write_text(plain + f'async_receipt_url = "https://127.0.2.1:{port_b}/as2"\n')
    problem = _rejected(hospital.config_path, lab, "async_receipt_url", "'zone-b'", "NET-4")
    assert "zone 'zone-a'" in problem.fix
    # Inside zone C's egress, though no listener of ours: refused too.
    lab.write_text(plain + 'async_receipt_url = "https://10.20.0.7:4443/as2"\n')
    _rejected(hospital.config_path, lab, "async_receipt_url", "egress of zone 'zone-c'")


def test_peer_host_name_resolving_outside_its_zone_is_a_warning_shown_in_the_proof(
    world: World,
) -> None:
    """ "localhost" resolves to 127.0.0.1, outside zone A's 127.0.1.0/24: every connection
    would be refused at connect time, which check-config says now."""
    hospital = world.hospital
    hospital.peers[0] = (world.lab, "zone-a", "https://localhost:4443/as2")
    hospital.write()
    (warning,) = _warnings(hospital.config_path)
    assert warning.file == str(hospital.root / "peers.d" / "lab.toml")
    assert warning.key == "url" and "127.0.0.1" in warning.message
    assert "would be refused" in warning.message and warning.fix
    result = _check_config(hospital.config_path)
    assert result.returncode == 0, result.stderr
    (line,) = [x for x in result.stdout.splitlines() if "lab: localhost (" in x]
    assert "127.0.0.1" in line and "checked at connect against 127.0.1.0/24" in line


def test_overlapping_egress_of_two_zones_is_refused(world: World) -> None:
    hospital = world.hospital
    hospital.zones[1]["egress"] = ["127.0.2.0/24", "127.0.1.128/25"]
    hospital.write()
    problem = _rejected(
        hospital.config_path, hospital.config_path, "zones[1].egress", "'zone-a'", "'zone-b'"
    )
    assert "127.0.1.128/25" in problem.message and "egress_except" in problem.fix


def test_egress_except_keeps_another_zones_network_out_of_a_wide_zone(world: World) -> None:
    """An internet-like zone ("everything") next to zone A: refused until zone A's range
    is taken out of it with egress_except."""
    hospital = world.hospital
    hospital.zones[1]["egress"] = ["127.0.0.0/8"]
    hospital.write()
    problem = _rejected(hospital.config_path, hospital.config_path, "zones[1].egress", "overlap")
    assert 'egress_except = ["127.0.1.0/24"]' in problem.fix
    hospital.zones[1]["egress_except"] = ["127.0.1.0/24"]
    hospital.write()
    config = load_config(hospital.config_path)
    zone_b = config.require_zone("zone-b")
    assert not any(ipaddress.ip_address("127.0.1.2") in n for n in zone_b.egress)
    assert any(ipaddress.ip_address("127.0.2.2") in n for n in zone_b.egress)
    assert [str(n) for n in zone_b.egress_except] == ["127.0.1.0/24"]
    result = _check_config(hospital.config_path)
    assert result.returncode == 0, result.stderr
    assert "(egress_except 127.0.1.0/24)" in result.stdout
    # A range outside the egress cannot be excepted.
    hospital.zones[1]["egress_except"] = ["10.0.0.0/8"]
    hospital.write()
    _rejected(hospital.config_path, hospital.config_path, "zones[1].egress_except", "not inside")
    # Nor the whole egress: an empty egress would leave the zone's connections unchecked.
    hospital.zones[1]["egress_except"] = ["127.0.0.0/8"]
    hospital.write()
    _rejected(hospital.config_path, hospital.config_path, "zones[1].egress_except", "nothing")


# --- spool: no transit, enforced where messages are enqueued ----------------------------


def test_spool_refuses_a_message_from_one_zone_for_a_peer_of_another(tmp_path: Path) -> None:
    spool = SqliteSpool(tmp_path / "spool.sqlite3", SystemClock())
    try:
        args = ("report.pdf", "application/pdf", tmp_path / "src", tmp_path / "payload")
        with pytest.raises(TransitRefused) as info:
            spool.add_intake("m1", "pharmacy", *args, zone="zone-b", origin=Origin("lab", "zone-a"))
        refusal = info.value.refusal
        assert refusal.event.value == "routing.transit_refused"
        assert refusal.detail == {
            "origin_peer": "lab",
            "from_zone": "zone-a",
            "to_peer": "pharmacy",
            "to_zone": "zone-b",
        }
        event = refusal.audit_event(direction="outbound", peer="pharmacy", message_id="m1")
        assert (event.severity.value, event.outcome.value) == ("alert", "failure")
        assert info.value.fix and "zone" in info.value.message
        # an inbound origin without a known destination zone fails closed
        with pytest.raises(TransitRefused):
            spool.add_intake("m2", "pharmacy", *args, origin=Origin("lab", "zone-a"))
        assert spool.all_outbound() == []

        spool.add_intake("m3", "lab2", *args, zone="zone-a", origin=Origin("lab", "zone-a"))
        spool.add_intake("m4", "pharmacy", *args, zone="zone-b")
        records = {r.message_id: r for r in spool.all_outbound()}
        assert set(records) == {"m3", "m4"}
        assert (records["m3"].zone, records["m3"].origin) == ("zone-a", Origin("lab", "zone-a"))
        assert (records["m4"].zone, records["m4"].origin) == ("zone-b", LOCAL_INTAKE)
    finally:
        spool.close()


def test_spool_created_before_zones_gains_the_columns(tmp_path: Path) -> None:
    path = tmp_path / "spool.sqlite3"
    db = sqlite3.connect(path)
    db.execute(
        "CREATE TABLE outbound (message_id TEXT PRIMARY KEY, peer TEXT NOT NULL,"
        " filename TEXT NOT NULL, content_type TEXT NOT NULL, source_path TEXT NOT NULL,"
        " payload_path TEXT NOT NULL, body_path TEXT, headers TEXT, mic TEXT, size INTEGER,"
        " state TEXT NOT NULL, attempts INTEGER NOT NULL DEFAULT 0,"
        " next_attempt_at REAL NOT NULL DEFAULT 0, last_error TEXT, disposition TEXT,"
        " receipt_path TEXT, expires_at REAL NOT NULL DEFAULT 0, created_at TEXT NOT NULL,"
        " updated_at TEXT NOT NULL)"
    )
    db.execute(
        "INSERT INTO outbound (message_id, peer, filename, content_type, source_path,"
        " payload_path, state, created_at, updated_at) VALUES"
        " ('old', 'lab', 'a', 'b', '/s', '/p', 'queued', '2026-01-01', '2026-01-01')"
    )
    db.commit()
    db.close()
    spool = SqliteSpool(path, SystemClock())
    try:
        (old,) = spool.all_outbound()
        assert (old.zone, old.origin) == (None, LOCAL_INTAKE)
        spool.add_intake("new", "lab", "a", "b", Path("/s2"), Path("/p2"), zone="zone-a")
        assert spool.get("new") is not None and spool.get("new").zone == "zone-a"  # type: ignore[union-attr]
    finally:
        spool.close()


# --- outbound: source address and egress --------------------------------------------------


@pytest.fixture
def recorder() -> Iterator[tuple[int, list[str]]]:
    """A TCP server on 127.0.0.1 that records who connected (and then hangs up)."""
    seen: list[str] = []
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen()
    server.settimeout(0.2)
    stop = False

    def loop() -> None:
        while not stop:
            try:
                conn, address = server.accept()
            except TimeoutError:
                continue
            seen.append(address[0])
            conn.close()

    thread = threading.Thread(target=loop, daemon=True)
    thread.start()
    try:
        yield server.getsockname()[1], seen
    finally:
        stop = True
        thread.join(2)
        server.close()


def _post(world: World, url: str, body: Path, route: Route) -> str:
    """POST with a hospital client going through ``route``; what happened, as text."""
    context = client_context(
        world.hospital.pair("tls"), [world.lab.ca.certificate], [world.lab.tls.certificate], "1.3"
    )

    async def go() -> str:
        client = PeerClient(context, 2, 5, route=route)
        try:
            await client.post(url, (), body)
        except TransportError as exc:
            return str(exc)
        finally:
            await client.close()
        return "sent"

    return asyncio.run(go())


def test_outbound_connections_leave_from_the_zone_source_address(
    world: World, recorder: tuple[int, list[str]], tmp_path: Path
) -> None:
    port, seen = recorder
    body = tmp_path / "body"
    body.write_bytes(b"x")
    for source in ("127.0.0.7", "127.0.0.9"):
        route = zone_route(source, "127.0.0.0/8")
        outcome = _post(world, f"https://127.0.0.1:{port}/as2", body, route)
        assert outcome != "sent"
    assert seen == ["127.0.0.7", "127.0.0.9"]


def test_host_names_are_connected_only_to_addresses_inside_the_egress(
    world: World, recorder: tuple[int, list[str]], tmp_path: Path
) -> None:
    port, seen = recorder
    body = tmp_path / "body"
    body.write_bytes(b"x")
    url = f"https://localhost:{port}/as2"
    outside = _post(world, url, body, zone_route(None, "10.0.0.0/8"))
    assert "outside the egress of zone 'z' (10.0.0.0/8)" in outside
    assert seen == []
    inside = _post(world, url, body, zone_route(None, "127.0.0.0/8"))
    assert "egress" not in inside
    wait_until(lambda: seen == ["127.0.0.1"], 30, "the connection inside the egress")


# --- listeners bound to their zone (loopback) ---------------------------------------------


def _round_trip(conn: ssl.SSLSocket) -> bytes:
    """One request on ``conn`` and its whole answer: proof that the server finished the
    handshake (TLS 1.3 lets the client finish first), with the connection kept open."""
    conn.sendall(b"GET /as2 HTTP/1.1\r\nHost: x\r\n\r\n")
    answer = b""
    while b"\r\n\r\n" not in answer:
        chunk = conn.recv(4096)
        assert chunk, f"connection closed after {answer!r}"
        answer += chunk
    head, _, body = answer.partition(b"\r\n\r\n")
    match = re.search(rb"(?im)^content-length:\s*(\d+)", head)
    assert match, head
    length = int(match.group(1))
    while len(body) < length:
        body += conn.recv(4096)
    return head


def test_each_listener_trusts_only_its_zone(world: World, processes: Any) -> None:
    hospital = processes.start(world.hospital.config_path)
    ports = {lst["name"]: lst["port"] for lst in world.hospital.listeners}
    # The lab's certificate on zone B's listener, the pharmacy's on zone A's: refused.
    assert handshake_refused(world.lab, world.lab, "127.0.2.1", ports["zone-b"])
    assert handshake_refused(world.pharmacy, world.lab, "127.0.1.1", ports["zone-a"])
    failed = wait_for_events(world.hospital.audit_log, "tls.handshake_failed", count=2)
    assert sorted(e["detail"]["listener"] for e in failed) == ["zone-a", "zone-b"]
    assert all(e["severity"] == "alert" for e in failed)
    # Each on its own zone's listener: the handshake completes.
    assert not handshake_refused(world.lab, world.lab, "127.0.1.1", ports["zone-a"])
    assert not handshake_refused(world.pharmacy, world.lab, "127.0.2.1", ports["zone-b"])
    assert hospital.proc.poll() is None


def test_zone_checked_again_per_request_after_a_reload(world: World, processes: Any) -> None:
    """A connection made before a reload moved the peer to another zone is refused, audited."""
    hospital = processes.start(world.hospital.config_path)
    port = world.hospital.listeners[0]["port"]
    conn = tls_connect(world.lab, world.lab, "127.0.1.1", port)
    try:
        assert _round_trip(conn).startswith(b"HTTP/1.1 ")  # established before the reload
        # The lab moves to zone B (its url to zone B's range); zone B now trusts the lab's CA.
        world.hospital.zones[1]["trust_anchors"].append(world.hospital.trust(world.lab))
        world.hospital.peers[0] = (world.lab, "zone-b", "https://127.0.2.9:4443/as2")
        world.hospital.write()
        hospital.signal(signal.SIGHUP)
        hospital.wait_for(lambda line: line.get("event") == "config.reloaded", 20)
        built = as2_message(world.lab, world.hospital, world.hospital.as2_id, b"MSH|after reload")
        send_as2(conn, built)
        answer = conn.recv(200)
    finally:
        conn.close()
    assert answer.startswith(b"HTTP/1.1 403"), answer
    (violation,) = wait_for_events(world.hospital.audit_log, "zone.violation")
    assert violation["peer"] == "lab" and violation["severity"] == "alert"
    assert violation["detail"]["listener_zone"] == "zone-a"
    assert violation["detail"]["peer_zone"] == "zone-b"
    assert not list((world.hospital.root / "inbox").rglob("*.hl7"))


def test_lab_to_hospital_delivered_and_transit_to_pharmacy_refused(
    world: World, processes: Any
) -> None:
    processes.start(world.hospital.config_path)
    processes.start(world.lab.config_path)
    drop_file(world.lab.root / "outbox" / "hospital", "result.hl7", b"MSH|lab result")
    delivered = world.hospital.root / "inbox" / "lab" / "result.hl7"
    wait_until(delivered.exists, 30, "lab -> hospital delivery")
    # the lab (zone A) addresses a message to the pharmacy (zone B) through the hospital
    port = world.hospital.listeners[0]["port"]
    built = as2_message(world.lab, world.hospital, world.pharmacy.as2_id, b"MSH|for the pharmacy")
    answer = post_as2(world.lab, "127.0.1.1", port, built, until=b"authentication-failed")
    assert b"authentication-failed" in answer  # the signed MDN says so
    (refused,) = wait_for_events(world.hospital.audit_log, "routing.transit_refused")

    assert refused["peer"] == "lab" and refused["severity"] == "alert"
    assert "zone 'zone-b'" in refused["reason"]
    spool = SqliteSpool(world.hospital.root / "state" / "spool.sqlite3", SystemClock())
    try:
        assert [r.peer for r in spool.all_outbound()] == []  # nothing queued onward
    finally:
        spool.close()
