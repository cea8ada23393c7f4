"""The audit export of the demo's lab pointed at a test collector, and what the
collector received."""

from __future__ import annotations

from pathlib import Path

from gateway.pki.demo import DemoLayout
from tests.rsyslog import Collector, Received


def export_to(layout: DemoLayout, collector: Collector, *, message_format: str = "atna") -> None:
    with layout.hospital.config_path.open("a") as handle:
        handle.write(
            f"""
[audit.export]
collector = "127.0.0.1:{collector.port}"
ca = "{collector.ca_path}"
certificate = "{collector.client_cert}"
key = "{collector.client_key}"
format = "{message_format}"
hostname = "medgw-hospital"
"""
        )


def export_with_files_in(config_path: Path, collector: str, folder: Path) -> None:
    """``[audit.export]`` to ``collector`` ("host:port") with the CA, client certificate and
    key in ``folder`` (``ca.crt``, ``client.crt``, ``client.key``)."""
    with config_path.open("a") as handle:
        handle.write(
            f"""
[audit.export]
collector = "{collector}"
ca = "{folder / "ca.crt"}"
certificate = "{folder / "client.crt"}"
key = "{folder / "client.key"}"
"""
        )


def first_seen(received: list[Received]) -> list[int]:
    seen: list[int] = []
    for item in received:
        if item.seq not in seen:
            seen.append(item.seq)
    return seen
