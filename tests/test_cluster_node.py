"""A node's name: configured in ``[cluster]`` (default: the host name), checked, and
shown in its log lines, its audit records and its metrics."""

from __future__ import annotations

import json
from typing import Any

import pytest

from gateway.config import load_config
from gateway.demo_run import drop_file, read_audit
from gateway.errors import ConfigError
from gateway.pki.demo import DemoLayout
from gateway.spool.records import host_node_name
from tests.helpers.audit import wait_for_events
from tests.helpers.check_config import check_config, reported
from tests.helpers.metrics import value, wait_scrape, with_metrics


def test_the_node_name_defaults_to_the_host_name(layout: DemoLayout) -> None:
    config = load_config(layout.lab.config_path)
    assert config.cluster.node_name == host_node_name()
    assert config.cluster.lease_seconds == 60
    assert config.cluster.bodies_dir is None


def test_a_bad_node_name_or_lease_is_refused_naming_the_key_and_the_fix(
    layout: DemoLayout,
) -> None:
    path = layout.lab.config_path
    with path.open("a") as config:
        config.write('\n[cluster]\nnode_name = "gw a/1"\nlease_seconds = 1\nnode = "x"\n')
    with pytest.raises(ConfigError):
        load_config(path)
    result = check_config(path)
    assert result.returncode != 0
    assert reported(result, path, "cluster.node_name", "is not a node name", "node_name =")
    assert reported(result, path, "cluster.lease_seconds", "out of range", "at least 5")
    assert reported(result, path, "cluster.node", "unknown key", "")


def test_the_node_name_is_in_its_logs_audit_records_and_metrics(
    layout: DemoLayout, processes: Any
) -> None:
    with layout.lab.config_path.open("a") as config:
        config.write('\n[cluster]\nnode_name = "lab-a"\nlease_seconds = 30\n')
    port = with_metrics(layout.lab)
    processes.start(layout.hospital.config_path)
    lab = processes.start(layout.lab.config_path)
    drop_file(layout.lab.outbox_dir / "hospital", "n.hl7", b"MSH|n\r")
    wait_for_events(layout.lab.audit_log, "receipt.received")
    records = read_audit(layout.lab.audit_log)
    assert records and {r["node"] for r in records} == {"lab-a"}
    wait_scrape(port, "the node's name", lambda s: value(s, "medgw_node_info", node="lab-a") == 1)
    lines = [json.loads(line) for line in lab.raw if line.startswith("{")]
    assert lines and {line.get("node") for line in lines} == {"lab-a"}
