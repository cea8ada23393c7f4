"""NET-6 failure cases, end to end with real daemons: each visible in state and audit."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

from gateway.demo_run import drop_file, free_port, wait_until
from gateway.pki.demo import DemoLayout
from tests.audit_trail import wait_for_events


def queue_show_all(config: Path) -> list[dict[str, Any]]:
    result = subprocess.run(
        [sys.executable, "-m", "gateway", "queue", "list", "--config", str(config), "--json"],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    records: list[dict[str, Any]] = json.loads(result.stdout)
    return records


def edit(path: Path, old: str, new: str) -> None:
    text = path.read_text()
    assert old in text, f"{old!r} not in {path}"
    path.write_text(text.replace(old, new))


def final_state(layout: DemoLayout) -> dict[str, Any]:
    def done() -> dict[str, Any] | None:
        records = queue_show_all(layout.lab.config_path)
        final = [r for r in records if r["state"] in ("delivered", "failed")]
        return final[0] if final else None

    result: dict[str, Any] = wait_until(done, 60, "a final state at the sender")
    return result


def test_receiver_fails_to_store_negative_receipt_reaches_sender_state(
    layout: DemoLayout, processes: Any
) -> None:
    blocker = layout.hospital.inbox_dir / "lab"
    blocker.parent.mkdir(parents=True, exist_ok=True)
    blocker.write_text("a file where the lab's inbox folder should be")
    processes.start(layout.hospital.config_path)
    processes.start(layout.lab.config_path)
    drop_file(layout.lab.outbox_dir / "hospital", "undeliverable.hl7", b"MSH|x\r")
    record = final_state(layout)
    assert record["state"] == "failed"
    assert record["disposition"] == "processed/error: unexpected-processing-error"
    # The spool says "failed" before the audit trail does: wait for what is read.
    failed = wait_for_events(layout.lab.audit_log, "message.failed")
    assert failed[0]["severity"] == "alert"
    wait_for_events(layout.hospital.audit_log, "message.rejected")


def test_encryption_failure_is_reported_back_to_the_sender(
    layout: DemoLayout, processes: Any
) -> None:
    # The lab encrypts for a certificate the hospital has no key for (its own).
    edit(
        layout.lab.root / "peers.d" / "hospital.toml",
        "certs/peers/hospital/encrypt.crt",
        "certs/encrypt.crt",
    )
    processes.start(layout.hospital.config_path)
    processes.start(layout.lab.config_path)
    drop_file(layout.lab.outbox_dir / "hospital", "secret.hl7", b"MSH|x\r")
    record = final_state(layout)
    assert record["state"] == "failed"
    assert record["disposition"] == "processed/error: decryption-failed"
    wait_for_events(layout.hospital.audit_log, "decryption.failed")
    wait_for_events(layout.lab.audit_log, "message.failed")


def test_authentication_failure_is_reported_back_to_the_sender(
    layout: DemoLayout, processes: Any
) -> None:
    # The hospital no longer accepts the lab's signing certificate.
    edit(
        layout.hospital.root / "peers.d" / "lab.toml", "certs/peers/lab/sign.crt", "certs/sign.crt"
    )
    processes.start(layout.hospital.config_path)
    processes.start(layout.lab.config_path)
    drop_file(layout.lab.outbox_dir / "hospital", "unsigned-by-known.hl7", b"MSH|x\r")
    record = final_state(layout)
    assert record["state"] == "failed"
    assert record["disposition"] == "processed/error: authentication-failed"
    wait_for_events(layout.hospital.audit_log, "signature.failed")


class SlowProxy:
    """TCP proxy on 127.0.0.1 that holds back everything the receiver sends (a very slow path).

    While ``delay`` is set, even the TLS handshake's server flight is late, so the
    sender's request times out; once it is cleared the path is healthy again.
    """

    def __init__(self, target_port: int) -> None:
        self.port = free_port()
        self.target_port = target_port
        self.delay = 0.0
        self.connections = 0
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        self._ready.wait(10)

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        self._server = self._loop.run_until_complete(
            asyncio.start_server(self._handle, "127.0.0.1", self.port)
        )
        self._ready.set()
        self._loop.run_forever()

    async def _pipe(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, delay: bool
    ) -> None:
        try:
            while data := await reader.read(65536):
                if delay and self.delay:
                    await asyncio.sleep(self.delay)
                writer.write(data)
                await writer.drain()
        except (ConnectionError, OSError):
            pass
        finally:
            writer.close()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
        await asyncio.gather(
            self._pipe(reader, up_writer, delay=False),
            self._pipe(up_reader, writer, delay=True),
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


def test_very_slow_path_times_out_retries_and_delivers_once(
    layout: DemoLayout, processes: Any
) -> None:
    proxy = SlowProxy(layout.hospital.port)
    try:
        proxy.delay = 8.0  # answers take longer than the lab's request timeout
        edit(
            layout.lab.root / "peers.d" / "hospital.toml",
            f":{layout.hospital.port}/",
            f":{proxy.port}/",
        )
        edit(layout.lab.config_path, "request_timeout_seconds = 60", "request_timeout_seconds = 3")
        processes.start(layout.hospital.config_path)
        processes.start(layout.lab.config_path)
        drop_file(layout.lab.outbox_dir / "hospital", "slow.hl7", b"MSH|slow path\r")
        failure = wait_for_events(layout.lab.audit_log, "message.send_failed")
        assert "Timeout" in failure[0]["reason"]
        [queued] = [r for r in queue_show_all(layout.lab.config_path) if r["state"] != "delivered"]
        assert queued["attempts"] >= 1 and "Timeout" in (queued["last_error"] or "")
        proxy.delay = 0.0  # the path recovers
        wait_for_events(layout.lab.audit_log, "receipt.received")
    finally:
        proxy.close()
    # Delivered once, after at least one timed-out attempt over the slow path.
    assert [p.name for p in (layout.hospital.inbox_dir / "lab").iterdir()] == ["slow.hl7"]
    assert len(wait_for_events(layout.hospital.audit_log, "message.delivered")) == 1

    assert proxy.connections >= 2
