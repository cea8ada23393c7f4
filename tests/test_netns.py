"""System test of network zones (NET-4) with Linux network namespaces.

Three namespaces, two veth links, real ``medgw run`` daemons::

    [lab] 10.77.1.2 ──zone A── 10.77.1.1 [hospital] 10.77.2.1 ──zone B── 10.77.2.2 [pharmacy]

The hospital has one interface per zone; the lab (its own CA) lives in zone A,
the pharmacy chain (another CA) in zone B.  Lab -> hospital is delivered; lab
-> pharmacy through the hospital is refused (at the AS2 layer and, since the
hospital namespace does not forward, at the IP layer); the pharmacy's
perfectly valid certificate on the zone A interface is refused at the
handshake; each refusal is in the hospital's audit trail.  The hospital's own
outbound connections leave from each zone's source address.

The hospital hands received documents over to its internal system (an HTTPS
server on its own loopback, named ``ehr.internal`` in the namespace's hosts
file) and answers the lab with asynchronous receipts.  When the name of the
internal system is made to point into zone B (at the pharmacy), the next
hand-over is refused at connect time and nothing reaches the pharmacy.

Needs root and ``ip netns``; skipped, saying why, where that is impossible.
Run as a script (``python -m tests.test_netns probe ...``) it is the small
client the test runs inside a namespace.
"""

from __future__ import annotations

import contextlib
import hashlib
import http.server
import json
import os
import shutil
import signal
import socket
import ssl
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from gateway.clock import SystemClock
from gateway.demo_run import GatewayProcess, drop_file, wait_until
from gateway.pki.issue import issue, make_ca, write_pem
from gateway.spool import SqliteSpool
from tests.helpers.audit import wait_for_event, wait_for_events
from tests.helpers.maintenance import enable_maintenance
from tests.helpers.zones import NOW, Site, World, as2_message, set_site_runtime, two_zone_world

REPO = Path(__file__).resolve().parent.parent
# Every test here runs real gateways, one per network namespace.
pytestmark = pytest.mark.daemon
HOSPITAL_A, LAB = "10.77.1.1", "10.77.1.2"
HOSPITAL_B, PHARMACY = "10.77.2.1", "10.77.2.2"
PORT = 4080


def _ip(*args: str) -> None:
    result = subprocess.run(["ip", *args], capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)}: {result.stderr.strip()}")


class Namespaces:
    def __init__(self) -> None:
        tag = f"{os.getpid() % 100000}"
        self.hospital, self.lab, self.pharmacy = (f"mgw{x}{tag}" for x in "hlp")
        self.created: list[str] = []
        self._tag = tag
        self.etc: list[Path] = []

    def setup(self) -> None:
        for ns in (self.hospital, self.lab, self.pharmacy):
            _ip("netns", "add", ns)
            self.created.append(ns)
            _ip("-n", ns, "link", "set", "lo", "up")
        t = self._tag
        for (here, here_ip), (there, there_ip), name in (
            ((self.hospital, HOSPITAL_A), (self.lab, LAB), "a"),
            ((self.hospital, HOSPITAL_B), (self.pharmacy, PHARMACY), "b"),
        ):
            near, far = f"mh{name}{t}", f"mp{name}{t}"
            _ip("link", "add", near, "type", "veth", "peer", "name", far)
            _ip("link", "set", near, "netns", here)
            _ip("link", "set", far, "netns", there)
            for ns, dev, address in ((here, near, here_ip), (there, far, there_ip)):
                _ip("-n", ns, "addr", "add", f"{address}/24", "dev", dev)
                _ip("-n", ns, "link", "set", dev, "up")
        # The lab even routes zone B's range via the hospital: only the hospital could pass it on.
        _ip("-n", self.lab, "route", "add", "10.77.2.0/24", "via", HOSPITAL_A)

    def teardown(self) -> None:
        for ns in reversed(self.created):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, check=False)
        self.created.clear()
        for folder in self.etc:
            shutil.rmtree(folder, ignore_errors=True)
        self.etc.clear()

    def hosts(self, ns: str, text: str) -> None:
        """The namespace's /etc/hosts (``ip netns exec`` mounts /etc/netns/NS/hosts over
        it; rewritten in place, so a process already running sees the change)."""
        folder = Path("/etc/netns") / ns
        if folder not in self.etc:
            folder.mkdir(parents=True, exist_ok=True)
            self.etc.append(folder)
        with (folder / "hosts").open("w") as hosts:
            hosts.write("127.0.0.1 localhost\n" + text)

    def exec(self, ns: str) -> tuple[str, ...]:
        return ("ip", "netns", "exec", ns)


@pytest.fixture
def namespaces() -> Iterator[Namespaces]:
    if sys.platform != "linux":
        pytest.skip("network namespaces need Linux")
    if shutil.which("ip") is None:
        pytest.skip("the `ip` command (Debian package iproute2) is not installed")
    if os.geteuid() != 0:
        pytest.skip("creating network namespaces needs root (CI runs as root)")
    spaces = Namespaces()
    try:
        spaces.setup()
    except RuntimeError as exc:
        spaces.teardown()
        pytest.skip(f"network namespaces are not available here: {exc}")
    try:
        yield spaces
    finally:
        spaces.teardown()


@pytest.fixture
def world(tmp_path: Path) -> World:
    """The two zones on the namespaces' addresses (conftest's are on loopback)."""
    return two_zone_world(
        tmp_path,
        hospital_a=HOSPITAL_A,
        hospital_b=HOSPITAL_B,
        lab_ip=LAB,
        pharmacy_ip=PHARMACY,
        net_a="10.77.1.0/24",
        net_b="10.77.2.0/24",
        ports=(PORT, PORT, PORT, PORT),
    )


@contextlib.contextmanager
def _gateways(spaces: Namespaces, *sites: tuple[Site, str]) -> Iterator[list[GatewayProcess]]:
    """``medgw run`` for each (site, namespace), ready; at the end, any still running is
    killed and the last of each one's output printed (pytest shows it when a test fails)."""
    started: list[GatewayProcess] = []
    try:
        for site, ns in sites:
            proc = GatewayProcess(site.config_path, prefix=spaces.exec(ns))
            started.append(proc)
            proc.wait_ready()
        yield started
    finally:
        for proc in started:
            if proc.proc.poll() is None:
                proc.kill()
            print(f"--- output of medgw run --config {proc.config}")
            print("\n".join(proc.raw[-60:]))


def _stop(processes: list[GatewayProcess]) -> list[int]:
    """SIGTERM to all at once, then each one's exit code."""
    for proc in processes:
        proc.signal(signal.SIGTERM)
    return [proc.stop() for proc in processes]


def _request_file(path: Path, built: Any) -> Path:
    """An AS2 message as the ``post`` probe reads it."""
    path.write_text(json.dumps({"headers": built.headers, "body": built.body.hex()}))
    return path


def _probe(spaces: Namespaces, ns: str, *args: str) -> dict[str, Any]:
    result = subprocess.run(
        [*spaces.exec(ns), sys.executable, "-m", "tests.test_netns", "probe", *args],
        capture_output=True,
        text=True,
        check=False,
        cwd=REPO,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    answer: dict[str, Any] = json.loads(result.stdout)
    return answer


def _host(remote: str) -> str:
    """The address of ``ip`` or ``ip:port`` as the audit trail records it."""
    return remote.rsplit(":", 1)[0] if remote.count(":") == 1 else remote


def _received_from(site: Site, peer: str) -> dict[str, Any]:
    """The record of the first message ``site`` received from ``peer``, once there is one."""
    return wait_for_event(site.audit_log, "message.received", where=lambda e: e["peer"] == peer)


def test_hospital_in_two_zones_passes_nothing_between_them(
    namespaces: Namespaces, world: World, tmp_path: Path
) -> None:
    hospital, lab, pharmacy = world.hospital, world.lab, world.pharmacy
    with _gateways(
        namespaces,
        (hospital, namespaces.hospital),
        (lab, namespaces.lab),
        (pharmacy, namespaces.pharmacy),
    ) as processes:
        # Zone A: lab -> hospital is delivered.
        drop_file(lab.root / "outbox" / "hospital", "result.hl7", b"MSH|lab result for the ward")
        delivered = hospital.root / "inbox" / "lab" / "result.hl7"
        wait_until(delivered.exists, 60, "lab -> hospital delivery")
        assert delivered.read_bytes() == b"MSH|lab result for the ward"
        received = _received_from(hospital, "lab")
        assert _host(received["remote_address"]) == LAB

        # The hospital's own sends leave from each zone's source address.
        drop_file(hospital.root / "outbox" / "pharmacy", "rx.txt", b"prescription")
        drop_file(hospital.root / "outbox" / "lab", "order.hl7", b"MSH|order")
        at_pharmacy = _received_from(pharmacy, "hospital")
        at_lab = _received_from(lab, "hospital")
        assert _host(at_pharmacy["remote_address"]) == HOSPITAL_B
        assert _host(at_lab["remote_address"]) == HOSPITAL_A

        # Lab -> pharmacy through the hospital: refused, with a signed negative receipt.
        built = as2_message(lab, hospital, pharmacy.as2_id, b"MSH|for the pharmacy")
        request = _request_file(tmp_path / "transit.json", built)
        answer = _probe(
            namespaces,
            namespaces.lab,
            "post",
            str(lab.root / "certs"),
            HOSPITAL_A,
            str(PORT),
            str(request),
        )
        assert answer["status"] == 200 and "authentication-failed" in answer["body"], answer
        (transit,) = wait_for_events(hospital.audit_log, "routing.transit_refused")
        assert transit["peer"] == "lab" and transit["severity"] == "alert"
        assert _host(transit["remote_address"]) == LAB
        assert "zone 'zone-b'" in transit["reason"]
        assert not (pharmacy.root / "inbox" / "lab").exists()
        spool = SqliteSpool(hospital.root / "state" / "spool.sqlite3", SystemClock())
        try:
            queued = [(r.peer, r.filename, r.origin.is_local) for r in spool.all_outbound()]
        finally:
            spool.close()
        assert sorted(queued) == [("lab", "order.hl7", True), ("pharmacy", "rx.txt", True)]

        # ... and at the IP layer the hospital namespace does not forward either.
        assert _probe(namespaces, namespaces.hospital, "forwarding")["ipv4"] == "0"
        tcp = _probe(namespaces, namespaces.lab, "connect", PHARMACY, str(PORT))
        assert tcp["connected"] is False, tcp

        # The pharmacy's valid certificate on the zone A interface: refused at the handshake.
        pharmacy_cert = str(pharmacy.root / "certs")
        refused = _probe(
            namespaces, namespaces.lab, "handshake", pharmacy_cert, HOSPITAL_A, str(PORT)
        )
        assert refused["refused"] is True, refused
        # ... while it is accepted on the zone B interface, where the pharmacy belongs.
        accepted = _probe(
            namespaces, namespaces.pharmacy, "handshake", pharmacy_cert, HOSPITAL_B, str(PORT)
        )
        assert accepted["refused"] is False, accepted
        (handshake,) = wait_for_events(hospital.audit_log, "tls.handshake_failed")

        assert handshake["detail"]["listener"] == "zone-a"
        assert _host(handshake["remote_address"]) == LAB
        assert handshake["severity"] == "alert"
        # The pharmacy cannot even reach zone A's interface from its own network.
        unreachable = _probe(namespaces, namespaces.pharmacy, "connect", HOSPITAL_A, str(PORT))
        assert unreachable["connected"] is False

        assert _stop(processes) == [0, 0, 0]


class Background:
    """A probe that keeps running inside a namespace (a server), until :meth:`stop`."""

    def __init__(self, spaces: Namespaces, ns: str, *args: str) -> None:
        self.proc = subprocess.Popen(
            [*spaces.exec(ns), sys.executable, "-m", "tests.test_netns", "probe", *args],
            stdout=subprocess.PIPE,
            text=True,
            cwd=REPO,
        )
        assert self.proc.stdout is not None
        ready = self.proc.stdout.readline()  # printed once it listens
        assert ready.strip() == "ready", ready

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(10)

    def __enter__(self) -> Background:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _lines(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


EHR_PORT = 9443


def test_hand_over_and_asynchronous_receipt_stay_on_their_side(
    namespaces: Namespaces, world: World, tmp_path: Path
) -> None:
    hospital, lab = world.hospital, world.lab
    # The internal system: its own CA, a certificate for ehr.internal.
    internal_ca = make_ca("Sakura internal CA", now=NOW, organization="Sakura IT")
    ehr = issue(internal_ca, "ehr.internal", purpose="tls", now=NOW, dns_names=("ehr.internal",))
    certs = hospital.root / "certs"
    write_pem(certs / "internal-ca.crt", internal_ca.certificate)
    write_pem(tmp_path / "ehr.crt", ehr.certificate)
    write_pem(tmp_path / "ehr.key", ehr.key)
    hospital.write(
        gateway_extra="[delivery]\n"
        f'http_url = "https://ehr.internal:{EHR_PORT}/inbound"\n'
        'ca = "certs/internal-ca.crt"\n'
        "timeout_seconds = 5\n"
    )
    # The lab asks for its receipts asynchronously, at its own zone A address.
    lab_peer = lab.root / "peers.d" / "hospital.toml"
    lab_peer.write_text(lab_peer.read_text() + f'async_receipt_url = "https://{LAB}:{PORT}/as2"\n')
    namespaces.hosts(namespaces.hospital, "127.0.0.1 ehr.internal\n")
    handed_over, knocked = tmp_path / "ehr.jsonl", tmp_path / "pharmacy-9443.jsonl"
    ehr_files = (str(tmp_path / "ehr.crt"), str(tmp_path / "ehr.key"))
    serve = ("serve-https", *ehr_files, str(EHR_PORT), str(handed_over))
    # What ehr.internal will be made to point at: a port on the pharmacy's host.
    record = ("record", PHARMACY, str(EHR_PORT), str(knocked))
    with (
        Background(namespaces, namespaces.hospital, *serve),
        Background(namespaces, namespaces.pharmacy, *record),
        _gateways(namespaces, (hospital, namespaces.hospital), (lab, namespaces.lab)) as processes,
    ):
        # Lab -> hospital: delivered, handed over on the hospital's own host, and the
        # receipt POSTed back to the lab afterwards.
        drop_file(lab.root / "outbox" / "hospital", "one.hl7", b"MSH|first result")
        [one] = wait_until(lambda: _lines(handed_over), 60, "the first hand-over")
        assert one["path"] == "/inbound" and one["peer"] == "lab"
        assert one["sha256"] == hashlib.sha256(b"MSH|first result").hexdigest()
        sent = wait_for_events(lab.audit_log, "message.sent")
        assert sent[0]["detail"]["receipt"] == "async"
        [receipt] = wait_for_events(lab.audit_log, "receipt.received")
        assert receipt["message_id"] == sent[0]["message_id"]
        assert receipt["detail"]["disposition"] == "processed"
        assert receipt["detail"]["mic_verified"] is True

        # ehr.internal now resolves into zone B: the hand-over is refused at connect.
        namespaces.hosts(namespaces.hospital, f"{PHARMACY} ehr.internal\n")
        drop_file(lab.root / "outbox" / "hospital", "two.hl7", b"MSH|second result")
        [refused] = wait_for_events(hospital.audit_log, "zone.egress_refused")
        assert refused["remote_address"] == PHARMACY
        assert refused["detail"] == {"route": "the internal side", "port": EHR_PORT}
        assert "inside the egress of zone 'zone-b'" in refused["reason"]
        failed = wait_for_events(hospital.audit_log, "message.handover_failed")
        assert "not connected" in failed[0]["reason"]
        assert (hospital.root / "inbox" / "lab" / "two.hl7").exists()
        assert _lines(knocked) == []  # nothing reached the pharmacy's host
        assert len(_lines(handed_over)) == 1

        assert _stop(processes) == [0, 0]


RECEIPT_PORT = 4443


def test_a_receipt_owed_across_a_reload_is_not_sent_from_another_zone(
    namespaces: Namespaces, world: World, tmp_path: Path
) -> None:
    """The lab asked for its receipt at its zone A address; while the first delivery
    attempt hangs, a reload moves the lab into zone B.  The hospital could route from
    zone B's interface to the lab's address (it has both): the next attempt is refused
    by the zone in force, and the lab's address hears nothing from zone B."""
    hospital, lab = world.hospital, world.lab
    receipt_url = f"https://{LAB}:{RECEIPT_PORT}/as2"
    hospital.peers[0] = (lab, "zone-a", receipt_url)
    hospital.write()
    # The first attempt waits on the held connection for as long as the test needs.
    slow = {"connect_timeout_seconds": 120, "request_timeout_seconds": 300}
    set_site_runtime(hospital.config_path, **slow)
    knocked, release = tmp_path / "lab-4443.jsonl", tmp_path / "release"
    record = ("record", LAB, str(RECEIPT_PORT), str(knocked), str(release))
    with (
        Background(namespaces, namespaces.lab, *record),
        _gateways(namespaces, (hospital, namespaces.hospital)) as (daemon,),
    ):
        built = as2_message(lab, hospital, hospital.as2_id, b"MSH|x\r", receipt_url=receipt_url)
        request = _request_file(tmp_path / "message.json", built)
        certs = str(lab.root / "certs")
        answer = _probe(
            namespaces, namespaces.lab, "post", certs, HOSPITAL_A, str(PORT), str(request)
        )
        assert answer["status"] == 200, answer
        wait_until(lambda: _lines(knocked) == [{"from": HOSPITAL_A}], 60, "the first attempt")

        hospital.zones[1]["trust_anchors"].append(hospital.trust(lab))
        hospital.peers[0] = (lab, "zone-b", "https://10.77.2.9:4443/as2")
        hospital.write()
        set_site_runtime(hospital.config_path, **slow)
        daemon.signal(signal.SIGHUP)
        daemon.wait_for(lambda line: line.get("event") == "config.reloaded", 60)
        release.touch()  # the first attempt fails; the next is made by the new zones

        [refused] = wait_for_events(hospital.audit_log, "zone.egress_refused")
        assert refused["remote_address"] == LAB
        assert refused["detail"] == {"route": "zone 'zone-b'", "port": RECEIPT_PORT}
        given_up = wait_for_events(
            hospital.audit_log, "receipt.sent", where=lambda e: e["outcome"] == "failure"
        )

        assert "not tried again" in given_up[0]["reason"]
        assert _lines(knocked) == [{"from": HOSPITAL_A}]  # nothing from HOSPITAL_B
        assert daemon.stop() == 0


def test_the_maintenance_listener_cannot_be_reached_from_any_zone(
    namespaces: Namespaces, world: World
) -> None:
    """The hospital's SSH maintenance port is on its loopback (reached through a jump host):
    from the lab's zone and the pharmacy's zone no address of the hospital answers on it."""
    hospital = world.hospital
    maintenance_port = 2222
    enable_maintenance(hospital.root, hospital.config_path, f"127.0.0.1:{maintenance_port}")
    with _gateways(namespaces, (hospital, namespaces.hospital)) as (proc,):
        # it listens: on the hospital's own loopback an SSH server answers
        inside = _probe(namespaces, namespaces.hospital, "connect", "127.0.0.1", "2222")
        assert inside["connected"], inside
        for ns, address in (
            (namespaces.lab, HOSPITAL_A),
            (namespaces.pharmacy, HOSPITAL_B),
            (namespaces.lab, HOSPITAL_B),  # routed via the hospital, which does not forward
        ):
            outside = _probe(namespaces, ns, "connect", address, str(maintenance_port))
            assert not outside["connected"], (ns, address, outside)
        assert proc.stop() == 0


def test_a_maintenance_address_of_its_own_answers_no_zone_that_routes_to_it(
    namespaces: Namespaces, world: World
) -> None:
    """The maintenance listener on a management address outside every zone's egress.
    A zone's host that routes to that address reaches the hospital anyway (Linux accepts
    a packet for any local address on any interface): medgw closes such a connection
    before it says a word of SSH, and audits it."""
    management = "10.77.9.1"
    # the management address on the hospital's loopback device, as a host route would
    _ip("-n", namespaces.hospital, "addr", "add", f"{management}/32", "dev", "lo")
    _ip("-n", namespaces.lab, "route", "add", f"{management}/32", "via", HOSPITAL_A)
    hospital = world.hospital
    enable_maintenance(hospital.root, hospital.config_path, f"{management}:2222")
    with _gateways(namespaces, (hospital, namespaces.hospital)) as (proc,):
        inside = _probe(namespaces, namespaces.hospital, "read", management, "2222")
        assert inside["received"].startswith("SSH-2.0-"), inside  # the management side
        outside = _probe(namespaces, namespaces.lab, "read", management, "2222")
        assert outside["received"] == "", outside  # not even the SSH banner
        refused = wait_for_event(
            hospital.audit_log,
            "maintenance.login_failed",
            where=lambda e: e.get("remote_address") == LAB,
        )
        assert "inside the egress of zone" in refused["reason"], refused
        assert proc.stop() == 0


# --- the client run inside a namespace ------------------------------------------------------


def _context(certs: Path) -> ssl.SSLContext:
    """Client context of the institution whose certs/ folder this is (trusting its own CA)."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.load_verify_locations(cafile=str(certs / "anchors" / "hospital-ca.crt"))
    context.load_cert_chain(str(certs / "tls.crt"), str(certs / "tls.key"))
    return context


def _handshake(certs: Path, host: str, port: int) -> dict[str, Any]:
    try:
        with (
            socket.create_connection((host, port), timeout=10) as raw,
            _context(certs).wrap_socket(raw, server_hostname=host) as conn,
        ):
            # TLS 1.3: the server judges the client certificate after our Finished.
            conn.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            data = conn.recv(100)
            return {"refused": data == b"", "answer": data.decode(errors="replace")}
    except (ssl.SSLError, ConnectionError) as exc:
        return {"refused": True, "error": f"{type(exc).__name__}: {exc}"}


def _post(certs: Path, host: str, port: int, request: Path) -> dict[str, Any]:
    message = json.loads(request.read_text())
    body = bytes.fromhex(message["body"])
    head = "".join(f"{k}: {v}\r\n" for k, v in message["headers"])
    with (
        socket.create_connection((host, port), timeout=30) as raw,
        _context(certs).wrap_socket(raw, server_hostname=host) as conn,
    ):
        conn.sendall(
            f"POST /as2 HTTP/1.1\r\nHost: {host}\r\n{head}Content-Length: {len(body)}\r\n"
            "Connection: close\r\n\r\n".encode()
            + body
        )
        answer = b""
        while chunk := conn.recv(65536):
            answer += chunk
    status = int(answer.split(b" ", 2)[1])
    return {"status": status, "body": answer.decode(errors="replace")}


def _connect(host: str, port: int) -> dict[str, Any]:
    try:
        with socket.create_connection((host, port), timeout=3):
            return {"connected": True}
    except OSError as exc:
        return {"connected": False, "error": f"{type(exc).__name__}: {exc}"}


def _serve_https(certificate: Path, key: Path, port: int, out: Path) -> None:
    """An internal system on this namespace's loopback: notes each POST, answers 200
    and closes the connection (HTTP/1.0), so every hand-over is a new connection."""

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers["Content-Length"]))
            note = {
                "path": self.path,
                "peer": self.headers.get("X-Medgw-Peer"),
                "sha256": hashlib.sha256(body).hexdigest(),
            }
            with out.open("a") as notes:
                notes.write(json.dumps(note) + "\n")
            self.send_response(200)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *args: Any) -> None:
            pass

    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(certificate, key)
    server = http.server.HTTPServer(("127.0.0.1", port), Handler)
    server.socket = context.wrap_socket(server.socket, server_side=True)
    print("ready", flush=True)
    server.serve_forever()


def _record(address: str, port: int, out: Path, release: Path | None = None) -> None:
    """Accepts TCP connections and notes who connected; with ``release``, keeps them
    open, unanswered, until that file exists."""
    server = socket.create_server((address, port))
    server.settimeout(0.1)
    held: list[socket.socket] = []
    print("ready", flush=True)
    while True:
        if release is None or release.exists():
            for conn in held:
                conn.close()
            held.clear()
        try:
            conn, peer = server.accept()
        except TimeoutError:
            continue
        with out.open("a") as notes:
            notes.write(json.dumps({"from": peer[0]}) + "\n")
        if release is None or release.exists():
            conn.close()
        else:
            held.append(conn)


def _read_all(host: str, port: int) -> dict[str, Any]:
    """Connect, and read whatever the server sends until it closes (or 5 s pass)."""
    try:
        with socket.create_connection((host, port), timeout=5) as conn:
            received = b""
            try:
                while chunk := conn.recv(4096):
                    received += chunk
            except (TimeoutError, ConnectionResetError):
                pass
            return {"connected": True, "received": received.decode("latin-1")}
    except OSError as exc:
        return {"connected": False, "error": f"{type(exc).__name__}: {exc}"}


def main(argv: list[str]) -> int:
    if argv[:1] != ["probe"]:
        print("usage: python -m tests.test_netns probe ACTION ...", file=sys.stderr)
        return 2
    action, args = argv[1], argv[2:]
    if action == "handshake":
        result = _handshake(Path(args[0]), args[1], int(args[2]))
    elif action == "post":
        result = _post(Path(args[0]), args[1], int(args[2]), Path(args[3]))
    elif action == "connect":
        result = _connect(args[0], int(args[1]))
    elif action == "read":
        result = _read_all(args[0], int(args[1]))
    elif action == "serve-https":
        _serve_https(Path(args[0]), Path(args[1]), int(args[2]), Path(args[3]))
        return 0
    elif action == "record":
        _record(args[0], int(args[1]), Path(args[2]), Path(args[3]) if args[3:] else None)
        return 0
    elif action == "forwarding":
        result = {"ipv4": Path("/proc/sys/net/ipv4/ip_forward").read_text().strip()}
    else:
        print(f"unknown probe {action!r}", file=sys.stderr)
        return 2
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
