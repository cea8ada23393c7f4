"""What the event loop costs a POST: CPU per POST of a 4 KiB body over TLS (TLS 1.3,
the demo's certificates, client certificate required) on one kept-alive connection,
aiohttp client and server in one process, on asyncio's loop against uvloop's.
uvloop is not a dependency of medgw: install it into the environment first
(``.venv/bin/pip install uvloop``).

    .venv/bin/python bench/loop_post_bench.py [--requests 2000] [--rounds 4]
        CPU time per POST, the two loops alternating in one process
    .venv/bin/python bench/loop_post_bench.py --loop uvloop --requests N --only
        N POSTs on one loop and nothing else measured: under
        ``valgrind --tool=callgrind``, run with N and 2N; (I(2N) - I(N)) / N is the
        instructions per POST, whatever the machine's load
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
import ssl
import tempfile
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

import aiohttp
from aiohttp import web

from gateway.pki.demo import init_demo

BODY = b"x" * 4096


def _uvloop() -> asyncio.AbstractEventLoop:
    try:
        uvloop = importlib.import_module("uvloop")
    except ImportError:
        raise SystemExit(
            "uvloop is not installed: .venv/bin/pip install uvloop (not a medgw dependency)"
        ) from None
    loop: asyncio.AbstractEventLoop = uvloop.new_event_loop()
    return loop


LOOPS: dict[str, Callable[[], asyncio.AbstractEventLoop]] = {
    "asyncio": asyncio.new_event_loop,
    "uvloop": _uvloop,
}


async def _answer(request: web.Request) -> web.Response:
    await request.read()
    return web.Response(body=b"ok")


async def _posts(root: Path, requests: int) -> float:
    """Microseconds of CPU per POST over one kept-alive TLS connection."""
    layout = init_demo(root, now=datetime.now(UTC), hospital_port=40001, lab_port=40002)
    hospital = layout.hospital.root / "certs"
    lab = layout.lab.root / "certs"
    server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server.load_cert_chain(hospital / "tls.crt", hospital / "tls.key")
    server.verify_mode = ssl.CERT_REQUIRED
    server.load_verify_locations(layout.ca_certificate)
    client = ssl.create_default_context(cafile=str(layout.ca_certificate))
    client.load_cert_chain(lab / "tls.crt", lab / "tls.key")
    app = web.Application()
    app.router.add_post("/as2", _answer)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=server)
    await site.start()
    url = f"https://127.0.0.1:{runner.addresses[0][1]}/as2"
    try:
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=1)) as session:
            async with session.post(
                url, data=BODY, ssl=client, server_hostname="localhost"
            ) as r:  # the handshake
                assert await r.read() == b"ok"
            start = time.process_time()
            for _ in range(requests):
                async with session.post(
                    url, data=BODY, ssl=client, server_hostname="localhost"
                ) as r:
                    assert await r.read() == b"ok"
            return (time.process_time() - start) / requests * 1e6
    finally:
        await runner.cleanup()


def run(loop: str, requests: int) -> float:
    with tempfile.TemporaryDirectory() as root, asyncio.Runner(loop_factory=LOOPS[loop]) as r:
        return r.run(_posts(Path(root), requests))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--loop", choices=sorted(LOOPS), default="asyncio")
    parser.add_argument("--only", action="store_true", help="one run on --loop, no figures")
    args = parser.parse_args()
    if args.only:
        run(args.loop, args.requests)
        return
    found: dict[str, list[float]] = {name: [] for name in LOOPS}
    for number in range(args.rounds):
        order = ("asyncio", "uvloop") if number % 2 == 0 else ("uvloop", "asyncio")
        for name in order:
            found[name].append(run(name, args.requests))
    for name, figures in found.items():
        print(f"{name:8} " + " ".join(f"{us:6.0f}" for us in figures) + " us CPU/POST")
    print(f"uvloop / asyncio (means): {sum(found['uvloop']) / sum(found['asyncio']):.3f}")


if __name__ == "__main__":
    main()
