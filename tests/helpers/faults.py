"""Daemons stopped at one named point of the code by tests/faultpoint.py."""

from __future__ import annotations

import signal
import sys
from pathlib import Path

from gateway.demo_run import GatewayProcess

FAULTPOINT = Path(__file__).parent.parent / "faultpoint.py"


def killed_at(*point: str) -> tuple[str, ...]:
    """The command prefix that runs a daemon under faultpoint.py, e.g.
    ``killed_at("--kill-after", "gateway.delivery.inbox:finish")``."""
    return (sys.executable, str(FAULTPOINT), *point, "--")


def wait_killed(proc: GatewayProcess) -> None:
    """Until ``proc`` has SIGKILLed itself at its fault point (its last lines if not)."""
    assert proc.wait_exit() == -signal.SIGKILL, "\n".join(proc.raw[-20:])
