"""A TCP proxy on 127.0.0.1, run by an event loop in a thread of its own: each
connection it accepts is piped to the upstream a subclass connects it to, and the
upstream's answers may be held back (a slow path, a load balancer's hold)."""

from __future__ import annotations

import asyncio
import threading

from gateway.demo_run import free_port

Stream = tuple[asyncio.StreamReader, asyncio.StreamWriter]


class TcpProxy:
    """Listens on ``port`` from construction until :meth:`close`."""

    def __init__(self) -> None:
        self.port = free_port()
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        assert self._ready.wait(10), "the proxy did not start listening"

    async def _connect(self) -> Stream | None:
        """The upstream for a new connection (None: none; the connection is closed)."""
        raise NotImplementedError

    async def _before_answer(self) -> None:
        """Awaited before each chunk of an answer (upstream to client) is passed on."""

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        self._server = self._loop.run_until_complete(
            asyncio.start_server(self._handle, "127.0.0.1", self.port)
        )
        self._ready.set()
        self._loop.run_forever()

    async def _pipe(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, answers: bool
    ) -> None:
        try:
            while data := await reader.read(65536):
                if answers:
                    await self._before_answer()
                writer.write(data)
                await writer.drain()
        except (ConnectionError, OSError):
            pass
        finally:
            writer.close()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        upstream = await self._connect()
        if upstream is None:
            writer.close()
            return
        up_reader, up_writer = upstream
        await asyncio.gather(
            self._pipe(reader, up_writer, answers=False),
            self._pipe(up_reader, writer, answers=True),
        )

    async def _shutdown(self) -> None:
        self._server.close()
        tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    def close(self) -> None:
        asyncio.run_coroutine_threadsafe(self._shutdown(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)
