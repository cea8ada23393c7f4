"""The outcome of ``medgw diagnose``: one result per step, and the helpers steps share."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from datetime import datetime, timedelta
from enum import StrEnum
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes

# Whose area a failing step is (NET-6b: who to call; see config.who_to_call).
STEP_AREAS: dict[str, str] = {
    "resolve": "communication",
    "tcp": "communication",
    "tls": "authentication",
    "certificates": "authentication",
    "as2": "encryption",
}
EXPIRY_WARNING = timedelta(days=30)

DEFAULT_PROBE_TIMEOUT = 60.0

STEPS: dict[str, str] = {
    "resolve": "name resolution",
    "tcp": "TCP connect",
    "tls": "TLS handshake",
    "certificates": "certificate validity",
    "as2": "AS2 test message and receipt",
}


class Status(StrEnum):
    OK = "ok"
    WARN = "warn"
    FAIL = "fail"
    SKIP = "skip"


@dataclass(frozen=True)
class StepResult:
    """The outcome of one step; ``meaning`` and ``action`` are set when it failed or warned."""

    name: str  # one of STEPS
    status: Status
    detail: str
    meaning: str = ""
    action: str = ""

    @property
    def ok(self) -> bool:
        return self.status in (Status.OK, Status.WARN)

    @property
    def number(self) -> int:
        return list(STEPS).index(self.name) + 1

    @property
    def title(self) -> str:
        return STEPS[self.name]

    def to_json(self) -> dict[str, Any]:
        return {
            "step": self.number,
            "name": self.name,
            "title": self.title,
            "status": self.status.value,
            "ok": self.ok,
            "detail": self.detail,
            "meaning": self.meaning or None,
            "action": self.action or None,
        }


@dataclass(frozen=True)
class Diagnosis:
    peer: str
    as2_id: str
    url: str
    steps: tuple[StepResult, ...]

    @property
    def ok(self) -> bool:
        return all(step.ok for step in self.steps)

    @property
    def first_failure(self) -> StepResult | None:
        return next((s for s in self.steps if s.status is Status.FAIL), None)

    def to_json(self) -> dict[str, Any]:
        failure = self.first_failure
        return {
            "peer": self.peer,
            "as2_id": self.as2_id,
            "url": self.url,
            "ok": self.ok,
            "failed_step": failure.name if failure else None,
            "steps": [s.to_json() for s in self.steps],
        }


def step_ok(name: str, detail: str) -> StepResult:
    return StepResult(name, Status.OK, detail)


def step_failed(name: str, detail: str, meaning: str, action: str) -> StepResult:
    return StepResult(name, Status.FAIL, detail, meaning, action)


def subject_of(cert: x509.Certificate) -> str:
    return cert.subject.rfc4514_string() or "(empty subject)"


def fingerprint(cert: x509.Certificate) -> str:
    return cert.fingerprint(hashes.SHA256()).hex()


def day_of(when: datetime) -> str:
    return when.strftime("%Y-%m-%d %H:%M UTC")


@dataclass(frozen=True)
class Target:
    host: str
    port: int
    path: str

    @property
    def where(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"


CLOSE_WAIT_SECONDS = 2.0


async def closed(writer: asyncio.StreamWriter) -> None:
    """Wait briefly for a connection to close.  A TLS close waits for the peer's
    close_notify, up to 30 s: a hung peer never sends it, and diagnose has said all
    it can by then, so after a moment the connection is dropped instead."""
    try:
        async with asyncio.timeout(CLOSE_WAIT_SECONDS):
            await writer.wait_closed()
    except TimeoutError:
        writer.transport.abort()
    except OSError:
        pass  # the connection is gone either way (SSLError too)
