"""What marking the moment a request's first byte goes out costs a send: CPU time per
POST of a 4 KiB body over TLS on one kept-alive connection, with the trace that
:class:`gateway.channel.client.PeerClient` installs for it (``began``) against the
same session without it, alternating, in one process (the local server's CPU is in
both figures, so the ratio understates nothing on the client's side).

    .venv/bin/python bench/began_trace_bench.py [--requests 2000] [--rounds 4]
"""

from __future__ import annotations

import argparse
import asyncio
import ssl
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

import aiohttp
from aiohttp import web

from gateway.channel.client import _began_tracing
from gateway.pki.demo import init_demo

BODY = b"x" * 4096


async def _answer(request: web.Request) -> web.Response:
    await request.read()
    return web.Response(body=b"ok")


async def _round(url: str, client: ssl.SSLContext, requests: int, traced: bool) -> float:
    """Microseconds of CPU per POST."""
    began: list[bool] = []
    tracing = [_began_tracing()] if traced else None
    async with aiohttp.ClientSession(trace_configs=tracing) as session:
        start = time.process_time()
        for _ in range(requests):
            mark = (lambda: began.append(True)) if traced else None
            async with session.post(url, data=BODY, ssl=client, trace_request_ctx=mark) as r:
                await r.read()
        spent = time.process_time() - start
    assert len(began) == (requests if traced else 0)
    return spent / requests * 1e6


async def measure(root: Path, requests: int, rounds: int) -> dict[bool, list[float]]:
    layout = init_demo(root, now=datetime.now(UTC), hospital_port=40001, lab_port=40002)
    certs = layout.lab.root / "certs"
    server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server.load_cert_chain(certs / "tls.crt", certs / "tls.key")
    client = ssl.create_default_context(cafile=str(layout.ca_certificate))
    app = web.Application()
    app.router.add_post("/as2", _answer)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=server)
    await site.start()
    port = runner.addresses[0][1]
    url = f"https://127.0.0.1:{port}/as2"
    try:
        await _round(url, client, requests // 4, False)  # warm up
        found: dict[bool, list[float]] = {False: [], True: []}
        for number in range(rounds):
            order = (False, True) if number % 2 == 0 else (True, False)
            for traced in order:
                found[traced].append(await _round(url, client, requests, traced))
        return found
    finally:
        await runner.cleanup()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=4)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as root:
        found = asyncio.run(measure(Path(root), args.requests, args.rounds))
    for traced, label in ((False, "without the trace"), (True, "with the trace")):
        print(f"{label:18} " + " ".join(f"{us:6.0f}" for us in found[traced]) + " us CPU/POST")
    ratio = sum(found[True]) / sum(found[False])
    print(f"with / without (means): {ratio:.3f}")


if __name__ == "__main__":
    main()
