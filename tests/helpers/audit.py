"""Reading a running gateway's audit trail from a test, without racing the gateway.

A gateway writes an audit record after, not before, what a test usually waits
for first: its log line, its HTTP answer, the delivered file.  A test that
asserts on the audit trail waits for the records it asserts on
(:func:`wait_for_events`), never for another signal followed by a read.
"""

from __future__ import annotations

import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from gateway.demo_run import read_audit

Record = dict[str, Any]

DEADLINE = 60.0  # seconds: generous, so that a loaded machine fails no test by being slow


def events(path: Path, name: str | tuple[str, ...]) -> list[Record]:
    """The records of event ``name`` (or of any of several) in the audit log at ``path``,
    as it is now."""
    names = (name,) if isinstance(name, str) else name
    return [r for r in read_audit(path) if r["event"] in names]


def wait_for_events(
    path: Path,
    name: str | tuple[str, ...],
    *,
    where: Callable[[Record], bool] = lambda record: True,
    count: int = 1,
    timeout: float = DEADLINE,
) -> list[Record]:
    """Every record of event ``name`` (or of any of several) matching ``where``, once there
    are at least ``count``.

    Polls the file until then; after ``timeout`` seconds fails with what the log
    held, so that a failure says what happened instead of only that it did not.
    """
    deadline = time.monotonic() + timeout
    while True:
        found = [r for r in events(path, name) if where(r)]
        if len(found) >= count:
            return found
        if time.monotonic() >= deadline:
            raise AssertionError(
                f"timed out after {timeout:g} s waiting for {count} record(s) of {name!r} "
                f"in {path}: {len(found)} matched; " + _summary(read_audit(path))
            )
        time.sleep(0.05)


def wait_for_event(
    path: Path,
    name: str | tuple[str, ...],
    *,
    where: Callable[[Record], bool] = lambda record: True,
    timeout: float = DEADLINE,
) -> Record:
    """The first record of event ``name`` matching ``where``, once it is there."""
    return wait_for_events(path, name, where=where, timeout=timeout)[0]


def _summary(records: list[Record], last: int = 30) -> str:
    if not records:
        return "the log has no record"
    shown = records[-last:]
    lines = [
        f"  {r.get('seq')} {r.get('event')} peer={r.get('peer')} outcome={r.get('outcome')} "
        f"{r.get('reason') or ''}".rstrip()
        for r in shown
    ]
    skipped = f" (the last {last})" if len(records) > last else ""
    return f"the log has {len(records)} records{skipped}:\n" + "\n".join(lines)


def openssl_audit_key(folder: Path, name: str = "audit") -> tuple[Path, Path]:
    """An ECDSA P-256 key and a self-signed certificate, made as the README says."""
    key, cert = folder / f"{name}.key", folder / f"{name}.crt"
    subprocess.run(
        ["openssl", "ecparam", "-name", "prime256v1", "-genkey", "-noout", "-out", str(key)],
        check=True,
    )
    subprocess.run(
        [
            "openssl",
            "req",
            "-new",
            "-x509",
            "-key",
            str(key),
            "-sha256",
            "-days",
            "3650",
            "-subj",
            f"/CN=medgw audit {name}",
            "-out",
            str(cert),
        ],
        check=True,
        capture_output=True,
    )
    return key, cert
