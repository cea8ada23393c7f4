"""`medgw diagnose` on a very slow path (NET-6): the segment and its meaning are named."""

from __future__ import annotations

from typing import Any

from gateway.pki.demo import DemoLayout
from tests.helpers.diagnose import assert_fails_at, diagnose
from tests.helpers.slow_proxy import SlowProxy, edit_every


def test_very_slow_path_is_named_at_the_tls_step(layout: DemoLayout, processes: Any) -> None:
    proxy = SlowProxy(layout.hospital.port)
    try:
        proxy.delay = 5.0  # every byte from the hospital arrives late
        edit_every(
            layout.lab.root / "peers.d" / "hospital.toml",
            f":{layout.hospital.port}/",
            f":{proxy.port}/",
        )
        edit_every(
            layout.lab.config_path, "connect_timeout_seconds = 5", "connect_timeout_seconds = 1"
        )
        processes.start(layout.hospital.config_path)
        code, report = diagnose(layout)
    finally:
        proxy.close()
    assert code == 1
    step = assert_fails_at(report, "tls")
    assert "within 1 s" in step["detail"]
    assert "very slow" in step["meaning"]
    assert "connect_timeout_seconds" in step["action"]
    assert proxy.connections >= 1
