"""Break-glass access and emergency mode (EMG-1 to EMG-3), with real clients (OpenSSH's
``ssh`` and asyncssh's) against a real ``medgw run``, and the alert seen at a real
syslog collector (rsyslogd, tests/rsyslog.py)."""

from __future__ import annotations

import asyncio
import json
import re
import subprocess
import sys
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import asyncssh
import pytest

from gateway.demo_run import wait_until
from gateway.emergency.credential import FILE_NAME as CREDENTIAL_FILE
from gateway.pki.demo import DemoLayout
from tests.rsyslog import Collector
from tests.test_maintenance_ssh import Site


@pytest.fixture
def site(layout: DemoLayout) -> Site:
    return Site(layout)


@pytest.fixture
def collector(tmp_path: Path) -> Iterator[Collector]:
    found = Collector(tmp_path / "collector", now=datetime.now(UTC))
    try:
        yield found
    finally:
        found.stop()


def medgw(site: Site, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(
        [sys.executable, "-m", "gateway", *args, "--config", str(site.config)],
        capture_output=True,
        text=True,
        check=False,
    )
    if check:
        assert done.returncode == 0, done.stderr
    return done


def seal(site: Site) -> str:
    """A new break-glass credential: its key written where Site.ssh looks for the key of
    user ``emergency``; the code returned."""
    key_file = site.root / "emergency_id"
    key_file.unlink(missing_ok=True)
    done = medgw(site, "emergency", "seal", "--key-file", str(key_file))
    [code] = re.findall(r"code: +(\S+)", done.stdout)
    assert "BEGIN OPENSSH PRIVATE KEY" in done.stdout
    assert key_file.stat().st_mode & 0o777 == 0o600
    return str(code)


def test_break_glass_works_once_raises_the_alert_and_needs_a_new_seal(
    site: Site, processes: Any, collector: Collector
) -> None:
    with site.config.open("a") as handle:
        handle.write(
            f'\n[audit.export]\ncollector = "127.0.0.1:{collector.port}"\n'
            f'ca = "{collector.ca_path}"\ncertificate = "{collector.client_cert}"\n'
            f'key = "{collector.client_key}"\nformat = "atna"\nhostname = "medgw-lab"\n'
        )
    collector.start()
    proc = processes.start(site.config)
    code = seal(site)
    # Only the verifier is kept, readable by its owner only: neither secret.
    [stored] = site.root.rglob(CREDENTIAL_FILE)
    assert stored.stat().st_mode & 0o777 == 0o600
    private = (site.root / "emergency_id").read_text()
    text = stored.read_text()
    assert code not in text and code.replace("-", "") not in text
    assert private.splitlines()[1] not in text
    # No approved window, no maintainers.d account: the envelope's key and code let in.
    done = site.ssh("emergency", command="emergency status", code=code)
    assert done.returncode == 0, done.stderr
    status = json.loads(done.stdout)
    assert status["emergency_mode"]["reason"] == "the break-glass credential was used"
    assert status["break_glass"]["used_at"] is not None
    # The alert: at the collector with syslog severity Alert, and in the daemon's log.
    alert = wait_until(
        lambda: [r for r in collector.received() if r.event == "emergency.break_glass_used"],
        30,
        "the break-glass alert at the syslog collector",
    )
    assert alert[0].severity == 1
    proc.wait_for(
        lambda line: (
            line.get("event") == "audit.alert"
            and line.get("audit_event") == "emergency.break_glass_used"
        ),
        30,
    )
    used = site.events("emergency.break_glass_used")
    assert used[0]["severity"] == "alert" and used[0]["call"]
    assert used[0]["detail"]["serial"] == 1
    entered = site.events("emergency.entered")
    assert entered[0]["actor"] == "maintainer:emergency"

    async def refused(code: str) -> None:
        with pytest.raises(asyncssh.PermissionDenied):
            await site.connect("emergency", code)

    # The second use fails, also after a crash and a restart.
    asyncio.run(refused(code))
    proc.kill()
    processes.start(site.config)
    asyncio.run(refused(code))
    done = site.ssh("emergency", command="status", code=code)
    assert done.returncode == 255
    # Sealed anew: the new envelope works (once), the old key no longer matters.
    new_code = seal(site)

    async def works() -> None:
        async with await site.connect("emergency", new_code) as conn:
            answer = await conn.run("emergency status")
            assert answer.exit_status == 0, answer.stderr

    asyncio.run(works())
    asyncio.run(refused(new_code))
    sealed = site.events("emergency.credential_sealed")
    assert [s["detail"]["serial"] for s in sealed] == [1, 2]
    assert sealed[1]["detail"]["replaces"] == 1 and sealed[1]["detail"]["replaced_was_used"]
    assert len(site.events("emergency.break_glass_used")) == 2
    failed = [
        r for r in site.events("maintenance.login_failed") if r["actor"] == "maintainer:emergency"
    ]
    assert failed, "the refused uses are audited"
