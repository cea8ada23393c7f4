"""What the fuzzer (fuzz/) found, each as the smallest input that shows it and the
error the module must raise instead.  Each failed before its fix."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from gateway.config import load_config
from gateway.errors import ConfigError
from gateway.fsutil import MAX_ADMIN_FILE_BYTES
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


def test_a_device_as_a_configured_file_is_a_config_error_not_a_memory_error(
    layout: DemoLayout,
) -> None:
    """Was: ``certificate = "/dev/zero"`` read until MemoryError."""
    config = layout.hospital.config_path
    config.write_text(
        config.read_text().replace('certificate = "certs/tls.crt"', 'certificate = "/dev/zero"')
    )
    with pytest.raises(ConfigError) as info:
        load_config(config)
    [problem] = [p for p in info.value.problems if p.key == "tls.certificate"]
    assert problem.message == "cannot read /dev/zero: not a regular file (a device, pipe or socket)"


def test_a_pipe_in_peers_d_is_a_config_error_not_a_hang(layout: DemoLayout) -> None:
    """Was: check-config (and a reload) waited forever for a writer on the pipe."""
    pipe = layout.hospital.config_path.parent / "peers.d" / "pharmacy.toml"
    os.mkfifo(pipe)
    done = medgw("check-config", "--config", str(layout.hospital.config_path), timeout=60)
    assert done.returncode != 0
    assert f"{pipe}: cannot read: not a regular file" in done.stdout + done.stderr


def test_a_crl_file_larger_than_any_real_one_is_refused(layout: DemoLayout) -> None:
    crls = layout.hospital.config_path.parent / "certs" / "crls"
    [folder] = [p for p in crls.iterdir() if p.is_dir()]
    huge = folder / "huge.crl"
    with huge.open("wb") as handle:  # sparse: no disk space used
        handle.truncate(MAX_ADMIN_FILE_BYTES + 1)
    with pytest.raises(ConfigError) as info:
        load_config(layout.hospital.config_path)
    assert any(
        f"cannot read CRL file {huge}: larger than 64 MiB" in p.message for p in info.value.problems
    ), info.value.problems
