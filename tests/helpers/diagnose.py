"""`medgw diagnose` run against the demo, and its report read step by step."""

from __future__ import annotations

import json
from typing import Any

from gateway.diagnose import STEPS
from gateway.pki.demo import DemoLayout
from tests.cli import medgw


def diagnose(layout: DemoLayout) -> tuple[int, dict[str, Any]]:
    result = medgw("diagnose", "hospital", "--config", str(layout.lab.config_path), "--json")
    assert result.stdout, result.stderr
    return result.returncode, json.loads(result.stdout)


def assert_fails_at(report: dict[str, Any], name: str) -> dict[str, Any]:
    """``name`` failed, every step before it passed, every step after it was skipped."""
    by_name = steps(report)
    order = list(STEPS)
    assert [s["name"] for s in report["steps"]] == order
    assert report["ok"] is False and report["failed_step"] == name, report
    for before in order[: order.index(name)]:
        assert by_name[before]["status"] in ("ok", "warn"), by_name[before]
    for after in order[order.index(name) + 1 :]:
        assert by_name[after]["status"] == "skip", by_name[after]
    failed = by_name[name]
    assert failed["status"] == "fail" and failed["meaning"] and failed["action"]
    return failed


def failure_at(layout: DemoLayout, name: str) -> dict[str, Any]:
    """The lab's ``medgw diagnose hospital``, which must exit 1 failing at step ``name``
    (see :func:`assert_fails_at`): that step's report."""
    code, report = diagnose(layout)
    assert code == 1, report
    return assert_fails_at(report, name)


def steps(report: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {s["name"]: s for s in report["steps"]}
