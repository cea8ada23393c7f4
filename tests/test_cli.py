"""The ``medgw`` command as an administrator runs it: real subprocesses."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from gateway.pki.demo import DemoLayout
from tests.cli import medgw


def test_check_config_accepts_the_demo_and_prints_a_summary(layout: DemoLayout) -> None:
    result = medgw("check-config", "--config", str(layout.hospital.config_path))
    assert result.returncode == 0, result.stderr
    assert "configuration is valid" in result.stdout
    assert "no plaintext listener" in result.stdout
    assert "KITA-LAB" in result.stdout


def test_check_config_reports_every_problem_with_file_key_and_fix(layout: DemoLayout) -> None:
    root = layout.hospital.root
    config = layout.hospital.config_path
    text = config.read_text()
    text = text.replace("[gateway]", "[gateway]\ncolour = 'blue'", 1)
    text = text.replace('key = "certs/tls.key"', 'key = "certs/sign.key"', 1)
    config.write_text(text)
    peer = root / "peers.d" / "lab.toml"
    peer.write_text(peer.read_text().replace('url = "https://', 'url = "http://'))
    (root / "certs" / "encrypt.crt").unlink()
    result = medgw("check-config", "--config", str(config))
    assert result.returncode == 1
    lines = result.stderr.splitlines()

    def reported(file: Path, key: str, words: str) -> bool:
        return any(
            str(file) in line and key in line and words in line and "fix:" in line for line in lines
        )

    assert reported(config, "gateway.colour", "unknown key")
    assert reported(config, "tls.key", "is not the private key of the certificate")
    assert reported(config, "smime.encryption_certificate", "not found")
    assert reported(peer, "url", "not an https:// URL")
    assert "4 error(s)" in result.stderr


def test_check_config_on_a_missing_file(tmp_path: Path) -> None:
    result = medgw("check-config", "--config", str(tmp_path / "nope.toml"))
    assert result.returncode == 1
    assert "nope.toml" in result.stderr and "file not found" in result.stderr


def test_python_dash_m_and_usage_errors() -> None:
    assert medgw("--version").stdout.startswith("medgw ")
    assert medgw("frobnicate").returncode == 2


@pytest.mark.daemon
def test_demo_runs_twice_and_shows_the_verified_receipt(tmp_path: Path) -> None:

    for _ in range(2):
        result = medgw("demo", "--dir", str(tmp_path / "demo"), timeout=240)
        assert result.returncode == 0, result.stdout + result.stderr
        assert "byte-for-byte identical" in result.stdout
        assert "disposition 'processed'" in result.stdout
        assert "matches what was sent" in result.stdout
        assert "stopped cleanly" in result.stdout


@pytest.mark.daemon
def test_the_demos_queue_show_line_runs_as_printed_when_pasted_into_a_shell(
    tmp_path: Path,
) -> None:
    """The commands the demo prints (to see the receipt kept in the lab's spool, and to
    check a configuration) run as printed when pasted into bash in any folder, with
    medgw not on PATH: the receipt's names a Message-ID, whose angle brackets a shell
    would read as redirections."""
    path = ":".join(
        d for d in os.environ["PATH"].split(":") if not d or not (Path(d) / "medgw").exists()
    )
    result = medgw(
        "demo", "--dir", str(tmp_path / "demo"), timeout=240, env={**os.environ, "PATH": path}
    )
    assert result.returncode == 0, result.stdout + result.stderr
    [line] = [x for x in result.stdout.splitlines() if "receipt (as sent)" in x]
    assert "kept in the lab's spool (" in line and line.endswith(")"), line
    command = line.partition("kept in the lab's spool (")[2][:-1]
    [check] = [x.partition("try")[2].strip() for x in result.stdout.splitlines() if " try " in x]
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()

    def pasted(line: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            ["bash", "-c", line],
            cwd=elsewhere,
            env={**os.environ, "PATH": path},
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )

    shown = pasted(command)
    assert shown.returncode == 0, (command, shown.stdout, shown.stderr)
    [message_id] = [x.split()[-1] for x in result.stdout.splitlines() if "message id" in x]
    assert message_id in shown.stdout and "delivered" in shown.stdout, shown.stdout
    checked = pasted(check)
    assert checked.returncode == 0, (check, checked.stdout, checked.stderr)
    assert "configuration is valid" in checked.stdout


def test_demo_refuses_a_folder_that_is_not_a_demo(tmp_path: Path) -> None:
    precious = tmp_path / "precious"
    precious.mkdir()
    (precious / "records.txt").write_text("do not delete")
    result = medgw("demo", "--dir", str(precious))
    assert result.returncode == 1
    assert (precious / "records.txt").read_text() == "do not delete"
    assert "precious" in result.stderr
