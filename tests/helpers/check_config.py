"""`medgw check-config` run on a configuration, and the problems it reports by key."""

from __future__ import annotations

import subprocess
from pathlib import Path

from gateway.pki.demo import DemoLayout
from tests.cli import medgw


def check_config(config: Path) -> subprocess.CompletedProcess[str]:
    return medgw("check-config", "--config", str(config))


def reported(
    result: subprocess.CompletedProcess[str], file: Path, key: str, words: str, fix: str
) -> bool:
    """One line names the file, the key, what is wrong and the fix."""
    return any(
        line.startswith(("error:", "warning:"))
        and f"{file}: {key}:" in line
        and words in line
        and "(fix: " in line
        and fix in line.split("(fix: ", 1)[1]
        for line in (result.stdout + result.stderr).splitlines()
    )


def check_config_reports(
    config: Path, status: int, key: str, words: str, fix: str
) -> subprocess.CompletedProcess[str]:
    """``medgw check-config`` of ``config``, which ends with ``status`` and reports ``key``
    with ``words`` and ``fix`` (see :func:`reported`); its result, for more checks."""
    result = check_config(config)
    said = result.stdout + result.stderr
    assert result.returncode == status, said
    assert reported(result, config, key, words, fix), said
    return result


def set_peer_url(layout: DemoLayout, url: str) -> Path:
    peer = layout.hospital.root / "peers.d" / "lab.toml"
    text = peer.read_text()
    start = text.index('url = "')
    end = text.index('"', start + len('url = "'))
    peer.write_text(text[:start] + f'url = "{url}' + text[end:])
    return peer
