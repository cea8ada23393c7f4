"""Legacy partners: each monitored-list algorithm is admitted on its own, by name.

What an administrator meets: ``medgw check-config`` on a peer file, and the
peer's policy the daemon then applies.  The former ``compat = true`` admitted
five algorithms at once; it is refused, naming the replacement.
"""

from __future__ import annotations

import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest

from gateway.config import load_config
from gateway.errors import PolicyError
from gateway.pki.demo import DemoLayout
from gateway.policy import LEGACY_ALGORITHMS
from tests.cli import medgw


def check_config(config: Path) -> subprocess.CompletedProcess[str]:
    return medgw("check-config", "--config", str(config))


def lines(result: subprocess.CompletedProcess[str], file: Path, key: str) -> list[str]:
    """The check-config lines about ``key`` of ``file``."""
    return [
        line
        for line in (result.stdout + result.stderr).splitlines()
        if line.startswith(("error:", "warning:")) and f"{file}: {key}:" in line
    ]


def edit_peer(layout: DemoLayout, old: str, new: str) -> Path:
    peer = layout.hospital.root / "peers.d" / "lab.toml"
    text = peer.read_text()
    assert old in text
    peer.write_text(text.replace(old, new))
    return peer


def test_compat_true_is_refused_naming_each_replacement(layout: DemoLayout) -> None:
    peer = edit_peer(layout, "accept_legacy = []", "compat = true")
    result = check_config(layout.hospital.config_path)
    assert result.returncode == 1, result.stdout + result.stderr
    [line] = lines(result, peer, "compat")
    assert line.startswith("error:") and "no longer read" in line
    fix = line.split("(fix: ", 1)[1]
    for name in LEGACY_ALGORITHMS:  # what it used to admit, and the key that replaces it
        assert f'"{name}"' in fix, name
    assert "accept_legacy = [" in fix and "policy.compat_algorithm_used" in fix


def test_compat_false_is_a_warning_to_remove_it_and_admits_nothing(layout: DemoLayout) -> None:
    peer = edit_peer(layout, "accept_legacy = []", "compat = false")
    result = check_config(layout.hospital.config_path)
    assert result.returncode == 0, result.stdout + result.stderr
    [line] = lines(result, peer, "compat")
    assert line.startswith("warning:") and "remove the line" in line
    lab = load_config(layout.hospital.config_path).peer("lab")
    assert lab is not None and lab.accept_legacy == frozenset()


@pytest.mark.parametrize("name", list(LEGACY_ALGORITHMS))
def test_one_legacy_permission_admits_that_algorithm_only_and_the_warning_says_which(
    layout: DemoLayout, name: str
) -> None:
    peer = edit_peer(layout, "accept_legacy = []", f'accept_legacy = ["{name}"]')
    result = check_config(layout.hospital.config_path)
    assert result.returncode == 0, result.stdout + result.stderr
    [line] = lines(result, peer, "accept_legacy")
    assert line.startswith("warning:")
    said = line.split("(fix: ", 1)[0]
    assert f"{name} ({LEGACY_ALGORITHMS[name]})" in said
    for other in set(LEGACY_ALGORITHMS) - {name}:
        assert LEGACY_ALGORITHMS[other] not in said, other
    lab = load_config(layout.hospital.config_path).peer("lab")
    assert lab is not None and lab.accept_legacy == frozenset({name})
    policy = lab.policy
    checks: dict[str, Callable[[], None]] = {
        "sha1": lambda: policy.check_digest("sha1", inbound=True),
        "des-ede3-cbc": lambda: policy.check_content_cipher("des-ede3-cbc", inbound=True),
        "rsaes-pkcs1-v1_5": lambda: policy.check_key_transport("rsaes-pkcs1-v1_5", inbound=True),
        "rsaes-oaep-sha1": lambda: policy.check_key_transport("rsaes-oaep-sha1", inbound=True),
        "ecdh-sha1kdf": lambda: policy.check_key_transport("ecdh-sha1kdf", inbound=True),
    }
    assert set(checks) == set(LEGACY_ALGORITHMS)
    checks[name]()
    for other, check in checks.items():
        if other != name:
            with pytest.raises(PolicyError):
                check()
    # admitted for reading only: never for what we send
    with pytest.raises(PolicyError):
        policy.check_digest("sha1")
    with pytest.raises(PolicyError):
        policy.check_content_cipher("des-ede3-cbc", inbound=False)


def test_an_unknown_or_repeated_legacy_name_is_an_error(layout: DemoLayout) -> None:
    peer = edit_peer(layout, "accept_legacy = []", 'accept_legacy = ["3des", "sha1", "sha1"]')
    result = check_config(layout.hospital.config_path)
    assert result.returncode == 1, result.stdout + result.stderr
    found = lines(result, peer, "accept_legacy")
    assert any(
        "'3des' is not a monitored-list algorithm" in x and "des-ede3-cbc" in x for x in found
    )
    assert any("sha1 is listed twice" in x for x in found)
