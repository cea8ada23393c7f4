"""Every listener scanned from outside, as a penetration tester would: sslyze
against each AS2 zone listener (versions, suites, groups, client certificate,
renegotiation, compression, resumption, chain), openssl for a session carried
from one listener to another, and the local API (plain HTTP by design) checked
to be no TLS listener and bound to loopback only.

One hospital gateway, with two zones on loopback addresses: zone A with the
default TLS 1.3 only, zone B allowing TLS 1.2 (``min_version = "1.2"``), and a
local API.

sslyze pins ``cryptography<47`` while medgw's dependencies need a newer one, so
it lives in its own virtual environment, ``.venv/scan`` (``make venv`` makes
it; ``MEDGW_SSLYZE`` may name another interpreter that has sslyze).
"""

from __future__ import annotations

import functools
import json
import os
import re
import socket
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from gateway.demo_run import free_ports
from gateway.intake.api import new_token
from gateway.policy import TLS13_SUITES, TLS_GROUPS
from tests.conftest import Processes
from tests.helpers.zones import Site, World, two_zone_world

SSLYZE = Path(os.environ.get("MEDGW_SSLYZE", Path(sys.prefix) / "scan" / "bin" / "python"))
# The policy's group names as OpenSSL (and so sslyze) names the curves.
CURVE_NAMES = {"P-256": "secp256r1", "P-384": "secp384r1", "P-521": "secp521r1"}
OLD_VERSIONS = ("ssl_2_0", "ssl_3_0", "tls_1_0", "tls_1_1")


@dataclass(frozen=True)
class Gateway:
    world: World
    zone_a: tuple[str, int]  # TLS 1.3 only (the default)
    zone_b: tuple[str, int]  # TLS 1.2 allowed
    api_port: int

    @property
    def hospital(self) -> Site:
        return self.world.hospital


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    ports = free_ports(5)
    world = two_zone_world(
        tmp_path_factory.mktemp("tls-scan"),
        hospital_a="127.0.1.1",
        hospital_b="127.0.2.1",
        lab_ip="127.0.1.2",
        pharmacy_ip="127.0.2.2",
        net_a="127.0.1.0/24",
        net_b="127.0.2.0/24",
        ports=(ports[0], ports[1], ports[2], ports[3]),
    )
    hospital = world.hospital
    hospital.zones[1]["min_version"] = "1.2"
    _, sha = new_token()
    hospital.write(
        gateway_extra=f'\n[api]\nlisten = "127.0.0.1:{ports[4]}"\n\n[[api.clients]]\n'
        f'name = "his"\ntoken_sha256 = "{sha}"\npeers = ["lab"]\n'
    )
    processes = Processes()
    try:
        processes.start(hospital.config_path)
        yield Gateway(world, ("127.0.1.1", ports[0]), ("127.0.2.1", ports[1]), ports[4])
    finally:
        processes.cleanup()


@functools.cache
def _has_sslyze() -> bool:
    if not SSLYZE.exists():
        return False
    found = subprocess.run([str(SSLYZE), "-c", "import sslyze"], capture_output=True, check=False)
    return found.returncode == 0


def _sslyze(target: tuple[str, int], client: Site | None, tmp: Path, *scans: str) -> Any:
    if not _has_sslyze():
        pytest.skip(
            f"sslyze is not installed at {SSLYZE}: run `make venv` (it installs sslyze in its "
            "own environment, .venv/scan, since it needs an older cryptography than medgw), "
            "or set MEDGW_SSLYZE to a Python that has it"
        )
    out = tmp / f"sslyze-{target[1]}-{client.name if client else 'anonymous'}.json"
    command = [str(SSLYZE), "-m", "sslyze", "--quiet", "--mozilla_config", "disable"]
    if client is not None:
        certs = client.root / "certs"
        command += ["--cert", str(certs / "tls.crt"), "--key", str(certs / "tls.key")]
    command += [*scans, "--json_out", str(out), f"{target[0]}:{target[1]}"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    [server] = json.loads(out.read_text())["server_scan_results"]
    assert server["connectivity_status"] == "COMPLETED", server.get("connectivity_error_trace")
    return server


def _accepted(scan: dict[str, Any], version: str) -> set[str]:
    result = scan[f"{version}_cipher_suites"]
    assert result["status"] == "COMPLETED", result["error_trace"]
    return {s["cipher_suite"]["name"] for s in result["result"]["accepted_cipher_suites"]}


def _result(scan: dict[str, Any], name: str) -> dict[str, Any]:
    assert scan[name]["status"] == "COMPLETED", scan[name]["error_trace"]
    return scan[name]["result"]  # type: ignore[no-any-return]


FULL_SCAN = (
    *("--sslv2", "--sslv3", "--tlsv1", "--tlsv1_1", "--tlsv1_2", "--tlsv1_3"),
    *("--elliptic_curves", "--compression", "--reneg", "--resum", "--early_data"),
    *("--ems", "--heartbleed", "--openssl_ccs"),
    "--certinfo",
)


def _full_scan(gw: Gateway) -> tuple[str, ...]:
    # the CA that issued our certificate, for sslyze to tell the root from the chain sent
    return (*FULL_SCAN, "--certinfo_ca_file", str(gw.hospital.root / "certs" / "ca.crt"))


def _common_checks(server: dict[str, Any]) -> dict[str, Any]:
    scan = server["scan_result"]
    for version in OLD_VERSIONS:
        assert _accepted(scan, version) == set(), version
    # TLS 1.3: AES-GCM only, never ChaCha20 (37d6230), whatever the client prefers.
    tls13 = _accepted(scan, "tls_1_3")
    assert tls13 == set(TLS13_SUITES)
    assert not [s for s in tls13 if "CHACHA20" in s or "CCM" in s], tls13  # not CRYPTREC's
    curves = {c["name"] for c in _result(scan, "elliptic_curves")["supported_curves"]}
    assert curves == {CURVE_NAMES[g] for g in TLS_GROUPS}
    assert not curves & {"X25519", "X448"}, curves  # not on the CRYPTREC list
    assert _result(scan, "tls_compression")["supports_compression"] is False
    reneg = _result(scan, "session_renegotiation")
    assert reneg["is_vulnerable_to_client_renegotiation_dos"] is False
    assert reneg["client_renegotiations_success_count"] == 0
    assert _result(scan, "tls_1_3_early_data")["supports_early_data"] is False
    assert _result(scan, "heartbleed")["is_vulnerable_to_heartbleed"] is False
    assert _result(scan, "openssl_ccs_injection")["is_vulnerable_to_ccs_injection"] is False
    [deployment] = _result(scan, "certificate_info")["certificate_deployments"]
    assert deployment["received_chain_contains_anchor_certificate"] is False  # no root sent
    return scan  # type: ignore[no-any-return]


def test_every_as2_listener_requires_a_client_certificate(gateway: Gateway, tmp_path: Path) -> None:
    for target in (gateway.zone_a, gateway.zone_b):
        server = _sslyze(target, None, tmp_path, "--tlsv1_3")
        assert server["connectivity_result"]["client_auth_requirement"] == "REQUIRED", target


def test_the_tls13_zone_listener_offers_only_the_policy(gateway: Gateway, tmp_path: Path) -> None:
    server = _sslyze(gateway.zone_a, gateway.world.lab, tmp_path, *_full_scan(gateway))
    scan = _common_checks(server)
    assert server["connectivity_result"]["highest_tls_version_supported"] == "TLS_1_3"
    assert _accepted(scan, "tls_1_2") == set()  # 1.2 only where a zone allows it
    resumption = _result(scan, "session_resumption")
    assert resumption["session_id_resumption_result"] == "SERVER_IS_TLS_1_3_ONLY"


def test_a_tls12_zone_listener_offers_only_ecdhe_or_dhe_with_aead(
    gateway: Gateway, tmp_path: Path
) -> None:
    server = _sslyze(gateway.zone_b, gateway.world.pharmacy, tmp_path, *_full_scan(gateway))
    scan = _common_checks(server)
    tls12 = _accepted(scan, "tls_1_2")
    assert tls12, "zone B allows TLS 1.2"
    # RFC 7627: the session bound to the handshake (no triple handshake)
    assert _result(scan, "tls_extended_master_secret")["supports_ems_extension"] is True
    for name in tls12:
        assert name.startswith(("TLS_ECDHE_", "TLS_DHE_")), name  # forward secrecy
        assert "_GCM_" in name, name  # AEAD: AES-GCM (no CBC, no ChaCha20)
        assert "CHACHA20" not in name and "_CBC_" not in name, name


def _s_client(target: tuple[str, int], client: Site, *extra: str) -> str:
    certs = client.root / "certs"
    done = subprocess.run(
        [
            *("openssl", "s_client", "-connect", f"{target[0]}:{target[1]}"),
            *("-cert", str(certs / "tls.crt"), "-key", str(certs / "tls.key")),
            *("-ign_eof", *extra),
        ],
        input=b"GET /as2 HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
        capture_output=True,
        timeout=30,
        check=False,
    )
    return done.stdout.decode(errors="replace")


def test_no_listener_resumes_a_session(gateway: Gateway, tmp_path: Path) -> None:
    """A resumed session would skip the client certificate's validation and pin check
    (a revocation or a removed peer since the first handshake would not count), and a
    zone A session resumed on zone B would skip zone B's client authentication: every
    connection is a full handshake, on every listener, TLS 1.3 and 1.2 alike."""
    session = tmp_path / "zone-a.session"
    first = _s_client(gateway.zone_a, gateway.world.lab, "-sess_out", str(session))
    assert "New, TLSv1.3" in first and "HTTP/1.1 " in first, first[-1500:]
    if session.exists() and session.stat().st_size:
        again = _s_client(gateway.zone_a, gateway.world.lab, "-sess_in", str(session))
        assert "Reused" not in again, again[-1500:]
        assert "New, TLSv1.3" in again and "HTTP/1.1 " in again, again[-1500:]
        elsewhere = _s_client(gateway.zone_b, gateway.world.lab, "-sess_in", str(session))
        assert "Reused" not in elsewhere, elsewhere[-1500:]
        assert "HTTP/1.1 " not in elsewhere, elsewhere[-1500:]  # lab's CA is not zone B's
    # TLS 1.2 (zone B allows it): neither a session ID nor a ticket resumes.
    old = tmp_path / "zone-b.session"
    first = _s_client(gateway.zone_b, gateway.world.pharmacy, "-tls1_2", "-sess_out", str(old))
    assert "New, TLSv1.2" in first and "HTTP/1.1 " in first, first[-1500:]
    # The server gave the session no ID and no ticket: there is nothing a client could
    # offer to resume (openssl then writes a session it cannot read back, or none).
    assert re.search(r"Session-ID: *\n", first), first[-1500:]
    assert "TLS session ticket:" not in first, first[-1500:]
    again = _s_client(gateway.zone_b, gateway.world.pharmacy, "-tls1_2", "-sess_in", str(old))
    assert "Reused" not in again, again[-1500:]


def _listening_addresses(port: int) -> set[str]:
    done = subprocess.run(
        ["ss", "-Hltn", f"sport = :{port}"], capture_output=True, text=True, check=True
    )
    return {line.split()[3].rpartition(":")[0] for line in done.stdout.splitlines()}


def test_the_local_api_is_plain_http_on_loopback_only(gateway: Gateway) -> None:
    assert _listening_addresses(gateway.api_port) == {"127.0.0.1"}
    # Not TLS: a ClientHello gets no handshake, and plain HTTP gets an HTTP answer.
    hello = subprocess.run(
        ["openssl", "s_client", "-connect", f"127.0.0.1:{gateway.api_port}", "-tls1_3"],
        input=b"",
        capture_output=True,
        timeout=30,
        check=False,
    )
    assert hello.returncode != 0
    assert b"BEGIN CERTIFICATE" not in hello.stdout
    with socket.create_connection(("127.0.0.1", gateway.api_port), timeout=30) as sock:
        sock.sendall(b"GET /v1/messages HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        assert sock.recv(12).startswith(b"HTTP/1.1 ")
    # and the AS2 listeners are bound to their zone's address only
    assert _listening_addresses(gateway.zone_b[1]) == {"127.0.2.1"}
    assert _listening_addresses(gateway.zone_a[1]) == {"127.0.1.1"}
