"""Metrics in tests: a gateway with its metrics listener, and scrapes parsed by the real
Prometheus text parser."""

from __future__ import annotations

import urllib.error
import urllib.request
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from gateway.demo_run import free_port, wait_until
from gateway.pki.demo import DemoInstitution

DEADLINE = 90.0


Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def get(port: int, path: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as reply:
            return reply.status, reply.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def with_metrics(side: DemoInstitution) -> int:
    port = free_port()
    with side.config_path.open("a") as config:
        config.write(f'\n[metrics]\nlisten = "127.0.0.1:{port}"\n')
    return port


def scrape(port: int) -> Samples:
    status, text = get(port, "/metrics")
    assert status == 200
    out: Samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return out


def wait_scrape(port: int, what: str, check: Any) -> Samples:
    """Scrapes until ``check(samples)`` holds (the counters move as the daemon works)."""

    def ready() -> Samples | None:
        found = scrape(port)
        return found if check(found) else None

    result: Samples = wait_until(ready, DEADLINE, what)
    return result


def value(samples: Samples, name: str, **labels: str) -> float | None:
    return samples.get((name, tuple(sorted(labels.items()))))
