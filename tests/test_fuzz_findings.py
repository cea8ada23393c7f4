"""What the fuzzer (fuzz/) found, each as the smallest input that shows it and the
error the module must raise instead.  Each failed before its fix."""

from __future__ import annotations

from pathlib import Path

import pytest

from gateway.config import load_config
from gateway.errors import ConfigError
from gateway.pki.demo import DemoLayout
from tests.cli import medgw


@pytest.mark.parametrize("which", ["gateway.toml", "peer file"])
def test_a_configuration_file_that_is_not_utf8_is_a_config_error(
    layout: DemoLayout, which: str
) -> None:
    """Was: UnicodeDecodeError out of load_config (a traceback from check-config,
    and a reload that failed without saying where)."""
    config = layout.hospital.config_path
    target = config if which == "gateway.toml" else config.parent / "peers.d" / "lab.toml"
    text = target.read_bytes()
    at = text.index(b'"', text.index(b"as2_id")) + 1
    target.write_bytes(text[:at] + b"\x9e" + text[at:])
    with pytest.raises(ConfigError) as info:
        load_config(config)
    problem = next(p for p in info.value.problems if p.file == str(target))
    assert problem.message == f"not UTF-8 text: byte {at} is 0x9e"
    assert "UTF-8" in problem.fix
    done = medgw("check-config", "--config", str(config))
    assert done.returncode != 0
    assert "Traceback" not in done.stderr + done.stdout
    assert f"{Path(target)}" in done.stdout + done.stderr
    assert "not UTF-8 text" in done.stdout + done.stderr
