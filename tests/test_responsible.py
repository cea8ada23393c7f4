"""Who answers for the gateway (NET-6b): named in [[responsible]], shown by check-config
and diagnose, and in every alert - its audit record and its log line."""

from __future__ import annotations

import json
import signal
from pathlib import Path
from typing import Any

import pytest

from gateway.config import load_config
from gateway.errors import ConfigError
from gateway.pki.demo import DemoLayout
from tests.cli import medgw
from tests.helpers.audit import wait_for_event
from tests.helpers.local_api import Api, enable_api

DEMO_AREAS = 'responsible_for = ["communication", "encryption", "authentication", "incidents"]'
NETWORK = "Kenji Ito (network administrator; ext. 1111)"
SECURITY = "Yumi Kato (information security officer; ext. 2222, ciso@hospital.example)"


def split_responsibility(config: Path) -> None:
    """The demo's one administrator answers for communication only; a security officer
    for authentication and encryption (a table later in the file: TOML allows it)."""
    text = config.read_text()
    assert DEMO_AREAS in text
    text = text.replace('name = "Demo Administrator"', 'name = "Kenji Ito"')
    text = text.replace('role = "gateway administrator"', 'role = "network administrator"')
    text = text.replace('contact = "ext. 0000"', 'contact = "ext. 1111"')
    text = text.replace(DEMO_AREAS, 'responsible_for = ["communication"]')
    config.write_text(
        text
        + """
[[responsible]]
name = "Yumi Kato"
role = "information security officer"
contact = "ext. 2222, ciso@hospital.example"
responsible_for = ["authentication", "encryption"]
"""
    )


def without_responsible(config: Path) -> None:
    text = config.read_text()
    start = text.index("[[responsible]]")
    config.write_text(text[:start] + text[text.index("[storage]") :])


def test_check_config_lists_who_to_call_and_warns_of_an_area_without_anyone(
    layout: DemoLayout,
) -> None:
    config = layout.lab.config_path
    demo = config.read_text()
    split_responsibility(config)
    shown = medgw("check-config", "--config", config)
    assert shown.returncode == 0, shown.stderr
    assert f"communication    {NETWORK}" in shown.stdout
    assert f"authentication, encryption {SECURITY}" in shown.stdout
    assert "0 warning(s)" in shown.stdout

    config.write_text(demo)
    without_responsible(config)
    warned = medgw("check-config", "--config", config)
    assert warned.returncode == 0, warned.stderr  # runs, but says what is missing
    for area in ("communication", "encryption", "authentication"):
        assert f"no one is named responsible for {area} (NET-6b)" in warned.stdout
    assert "(no one named: add [[responsible]] tables to gateway.toml)" in warned.stdout


@pytest.mark.parametrize(
    ("table", "key", "says"),
    [
        (
            'name = "A"\nrole = "B"\ncontact = "C"\nresponsible_for = ["billing"]',
            "responsible[0].responsible_for",
            "'billing' is not one of",
        ),
        (
            'name = "A"\nrole = "B"\ncontact = "C"\nresponsible_for = ["incidents"]\nphone = "1"',
            "responsible[0].phone",
            "unknown key",
        ),
        (
            'name = "A"\nrole = "B"\nresponsible_for = ["incidents"]',
            "responsible[0].contact",
            "required key is missing",
        ),
        (
            'name = "A\\nB"\nrole = "B"\ncontact = "C"\nresponsible_for = ["incidents"]',
            "responsible[0].name",
            "must be one line",
        ),
    ],
)
def test_a_bad_responsible_table_is_refused_naming_the_key(
    layout: DemoLayout, table: str, key: str, says: str
) -> None:
    config = layout.lab.config_path
    without_responsible(config)
    config.write_text(config.read_text() + f"\n[[responsible]]\n{table}\n")
    with pytest.raises(ConfigError) as info:
        load_config(config)
    found = [p for p in info.value.problems if p.key == key and p.severity == "error"]
    assert found and says in found[0].message and found[0].fix, info.value.problems


def test_an_alert_names_whom_to_call_in_its_record_and_its_log_line(
    layout: DemoLayout, processes: Any
) -> None:
    config = layout.lab.config_path
    split_responsibility(config)
    api: Api = enable_api(layout)
    lab = processes.start(config)
    status, _ = api.request("GET", "/v1/messages/x", token="not-a-token")
    assert status == 401
    alert = wait_for_event(layout.lab.audit_log, "api.authentication_failed")
    assert alert["severity"] == "alert" and alert["call"] == [SECURITY]
    line = lab.wait_for(lambda line: line.get("event") == "audit.alert", 30)
    assert line["audit_event"] == "api.authentication_failed"
    assert line["call"] == [SECURITY] and line["area"] == "authentication"
    assert "call" not in wait_for_event(layout.lab.audit_log, "daemon.started")  # only alerts


def test_diagnose_names_whom_to_call_for_the_failing_segment(layout: DemoLayout) -> None:
    config = layout.lab.config_path
    split_responsibility(config)
    # Nothing runs at the hospital: the TCP connection is refused (communication).
    text = medgw("diagnose", "hospital", "--config", config)
    assert text.returncode != 0
    assert f"Who to call:   {NETWORK}" in text.stdout and SECURITY not in text.stdout
    report = json.loads(medgw("diagnose", "hospital", "--config", config, "--json").stdout)
    assert report["failed_step"] == "tcp" and report["who_to_call"] == [NETWORK]


def test_a_reload_changes_whom_alerts_name(layout: DemoLayout, processes: Any) -> None:
    config = layout.lab.config_path
    api: Api = enable_api(layout)
    lab = processes.start(config)
    split_responsibility(config)
    lab.signal(signal.SIGHUP)
    wait_for_event(layout.lab.audit_log, "config.reloaded")
    status, _ = api.request("GET", "/v1/messages/x", token="not-a-token")
    assert status == 401
    alert = wait_for_event(layout.lab.audit_log, "api.authentication_failed")
    assert alert["call"] == [SECURITY]  # not the demo administrator named at start
