"""What the AS2 listener records when connections fail before a peer is known.

A load balancer's or a monitor's TCP check connects and hangs up, every few
seconds, for ever.  That is no authentication attempt: it must not raise an
alert each time (admins would learn to ignore alerts), yet it is logged.  A
real failed handshake (plain HTTP, no certificate, an unknown one) is an alert;
one address can produce only so many one by one, then one record counts the
rest, so nothing is lost and nothing floods the trail.

The listener runs in this process on a real socket with real TLS; only its
clock is injected, to close a minute's window without waiting for it.
"""

from __future__ import annotations

import asyncio
import io
import json
import ssl
from datetime import UTC, datetime
from pathlib import Path

import pytest
from aiohttp import web

from gateway.audit.log import AuditLog
from gateway.channel.server import FAILURES_RECORDED, As2Server
from gateway.clock import SystemClock
from gateway.pki.demo import DemoLayout
from gateway.ratelimit import address_source
from tests.helpers.listener import hospital_listener
from tests.helpers.waiting import until


class SteppedClock:
    def __init__(self) -> None:
        self.seconds = 1000.0

    def now(self) -> datetime:
        return datetime.now(UTC)

    def monotonic(self) -> float:
        return self.seconds

    def boottime(self) -> float:
        return self.monotonic()


async def _not_reached(request: web.Request) -> web.Response:
    raise AssertionError("no request can get past a failed handshake")


def _records(path: Path, event: str) -> list[dict[str, object]]:
    if not path.exists():
        return []
    return [r for r in map(json.loads, path.read_text().splitlines()) if r["event"] == event]


async def _settled(server: As2Server) -> None:
    """Every accepted connection's handshake has ended one way or the other."""
    await until(lambda: server.handshakes_in_progress == 0, "every handshake ended")


def _listener(
    layout: DemoLayout, audit: AuditLog, log: io.StringIO, clock: SteppedClock, **kwargs: int
) -> As2Server:
    return hospital_listener(layout, _not_reached, audit, clock, log, **kwargs)


async def test_health_checks_are_logged_and_failed_handshakes_audited_within_a_bound(
    layout: DemoLayout, tmp_path: Path
) -> None:
    audit_path = tmp_path / "audit.jsonl"
    audit = AuditLog(audit_path, SystemClock(), node="hospital")
    log = io.StringIO()
    clock = SteppedClock()
    server = _listener(layout, audit, log, clock)
    await server.start()
    try:
        for _ in range(20):  # a TCP health check: connect, hang up
            _, writer = await asyncio.open_connection("127.0.0.1", server.port)
            writer.close()
            await writer.wait_closed()
        attempts = FAILURES_RECORDED + 15
        for _ in range(attempts):  # plain HTTP on the TLS port: a failed handshake
            reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
            writer.write(b"GET /as2 HTTP/1.0\r\n\r\n")
            await reader.read()
            writer.close()
            await writer.wait_closed()
        await _settled(server)

        failed = _records(audit_path, "tls.handshake_failed")
        assert len(failed) == FAILURES_RECORDED  # one by one, then only counted
        assert all("HTTP_REQUEST" in str(r["reason"]) for r in failed)
        lines = [json.loads(line) for line in log.getvalue().splitlines()]
        abandoned = [line for line in lines if line["event"] == "tls.handshake_abandoned"]
        assert len(abandoned) == 1  # logged, once for that address, not audited
        assert abandoned[0]["remote"].startswith("127.0.0.1:")

        server.write_summaries()  # the minute is not over: nothing to add yet
        assert len(_records(audit_path, "tls.handshake_failed")) == FAILURES_RECORDED
        clock.seconds += 61
        server.write_summaries()
        summary = _records(audit_path, "tls.handshake_failed")[-1]
        # 25 from one address within the minute are a storm: one alert for the storm,
        # and the count of the rest is part of it (gateway.channel.storms).
        [storm] = _records(audit_path, "tls.handshake_storm")
        assert storm["severity"] == "alert" and storm["remote_address"] == "127.0.0.1"
        assert summary["severity"] == "warning"
        assert summary["remote_address"] == "127.0.0.1"
        assert str(summary["reason"]).startswith("15 more failed TLS handshakes from 127.0.0.1")
        assert summary["detail"]["not_recorded_one_by_one"] == 15  # type: ignore[index]
    finally:
        await server.stop(5)
        audit.close()
    # The health checks' count is written when the listener stops.
    lines = [json.loads(line) for line in log.getvalue().splitlines()]
    [last] = [
        line for line in lines if line["event"] == "tls.handshake_abandoned" and "more" in line
    ]
    assert last["more"] == 19 and last["remote"] == "127.0.0.1"


async def test_connections_beyond_the_handshakes_in_progress_are_closed_at_once(
    layout: DemoLayout, tmp_path: Path
) -> None:
    """A flood of connections that never finish a handshake cannot take every socket:
    beyond the bound a new connection is closed at once, and said in the log."""
    audit = AuditLog(tmp_path / "audit.jsonl", SystemClock(), node="hospital")
    log = io.StringIO()
    server = _listener(layout, audit, log, SteppedClock(), max_handshakes=2)
    await server.start()
    held = []
    try:
        for _ in range(2):  # connect, say nothing: each holds a handshake slot
            held.append(await asyncio.open_connection("127.0.0.1", server.port))
        await until(lambda: server.handshakes_in_progress == 2, "both held connections accepted")
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        assert await asyncio.wait_for(reader.read(), 5) == b""  # closed at once
        writer.close()
        lines = [json.loads(line) for line in log.getvalue().splitlines()]
        [busy] = [line for line in lines if line["event"] == "listener.busy"]
        assert busy["handshakes"] == 2 and "fix" in busy

        for _, w in held:  # the slots free up: connections are taken again
            w.close()
        await _settled(server)
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        writer.write(b"GET /as2 HTTP/1.0\r\n\r\n")
        await asyncio.wait_for(reader.read(), 5)
        writer.close()
        await _settled(server)
        failed = [r for r in map(json.loads, (tmp_path / "audit.jsonl").read_text().splitlines())]
        assert any(r["event"] == "tls.handshake_failed" for r in failed)  # it got a handshake
    finally:
        for _, w in held:
            w.close()
        await server.stop(5)
        audit.close()


class _Unfinished(asyncio.Transport):
    """A connection from ``address`` whose handshake is refused (see the patched start_tls)."""

    def __init__(self, address: str) -> None:
        super().__init__()
        self._peername = (address, 50000, 0, 0)

    def get_extra_info(self, name: str, default: object = None) -> object:
        return self._peername if name == "peername" else default

    def abort(self) -> None:
        pass


async def test_one_ipv6_host_gets_one_budget_whatever_address_of_its_64_it_uses(
    layout: DemoLayout, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A single IPv6 host can send from any address of its /64: counted per address it
    # would get ten alerts per connection, and fill every source tracked.
    audit_path = tmp_path / "audit.jsonl"
    audit = AuditLog(audit_path, SystemClock(), node="hospital")
    server = _listener(layout, audit, io.StringIO(), SteppedClock())
    await server.start()

    async def refused(*args: object, **kwargs: object) -> None:
        raise ssl.SSLError(1, "[SSL: HTTP_REQUEST] http request")

    monkeypatch.setattr(asyncio.get_running_loop(), "start_tls", refused)
    try:
        for n in range(FAILURES_RECORDED + 15):  # a new address of one /64 each time
            await server.upgrade(_Unfinished(f"2001:db8:0:7::{n + 1:x}"))
        await server.upgrade(_Unfinished("2001:db8:0:8::1"))  # another /64: its own budget
        await server.upgrade(_Unfinished("::ffff:192.0.2.1"))  # IPv4 on a dual-stack socket
        failed = _records(audit_path, "tls.handshake_failed")
        assert len(failed) == FAILURES_RECORDED + 2
        server.write_summaries(everything=True)
        summary = _records(audit_path, "tls.handshake_failed")[-1]
        assert str(summary["reason"]).startswith(
            "15 more failed TLS handshakes from 2001:db8:0:7::/64"
        )
    finally:
        monkeypatch.undo()
        await server.stop(5)
        audit.close()


def test_sources_are_addresses_and_ipv6_prefixes() -> None:
    assert address_source("192.0.2.7") == "192.0.2.7"
    assert address_source("::ffff:192.0.2.7") == "192.0.2.7"
    assert address_source("2001:db8:1:2:aaaa::5") == "2001:db8:1:2::/64"
    assert address_source("fe80::1%eth0") == "fe80::/64"
    assert address_source("unknown") == "unknown"
