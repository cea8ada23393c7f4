"""Which Python `make` builds the environment with (tools/find-python), and what it
says when the machine has none that fits, with real interpreters and real `make`."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SUPPORTED = ("3.13", "3.12", "3.11")
THIS = f"{sys.version_info[0]}.{sys.version_info[1]}"
# The real interpreter behind this one (a virtual environment's python links to it).
REAL = Path(sys.executable).resolve()
# What the scripts and `make` need besides the interpreters under test.
TOOLS = ("sh", "make", "cat", "cut", "dirname", "grep", "head", "rm", "sed", "touch", "wc")


def bin_dir(tmp_path: Path, pythons: dict[str, Path | str]) -> Path:
    """A PATH holding the tools and, as ``pythonX.Y``, the given interpreters: a Path
    is linked to, a str is the text of a script (an interpreter that fails to run)."""
    folder = tmp_path / "bin"
    folder.mkdir()
    for tool in TOOLS:
        found = shutil.which(tool)
        assert found is not None, tool
        (folder / tool).symlink_to(found)
    for name, target in pythons.items():
        if isinstance(target, Path):
            (folder / name).symlink_to(target)
        else:
            (folder / name).write_text(target)
            (folder / name).chmod(0o755)
    return folder


def find_python(path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["sh", str(REPO / "tools" / "find-python"), *args],
        env={"PATH": str(path), "HOME": os.environ.get("HOME", "/")},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


# A pyenv shim for a version that is installed but not selected fails like this.
SHIM = '#!/bin/sh\necho "pyenv: ${0##*/}: command not found" >&2\nexit 127\n'


def test_make_says_what_each_missing_python_lacks(tmp_path: Path) -> None:
    """No candidate fits: one does not run, one is another version than its name, one
    is absent; `make venv` stops before making anything and names each reason."""
    others = [v for v in SUPPORTED if v != THIS]
    path = bin_dir(tmp_path, {f"python{others[0]}": SHIM, f"python{others[1]}": REAL})
    venv = tmp_path / "venv"
    result = subprocess.run(
        ["make", "venv", f"VENV={venv}"],
        cwd=REPO,
        env={"PATH": str(path), "HOME": os.environ.get("HOME", "/")},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode != 0
    message = result.stderr
    assert "medgw needs CPython 3.13, 3.12, 3.11 with its venv module" in message, message
    assert f"python{others[0]}: found at {path}/python{others[0]} but does not run: " in message
    assert f"pyenv: python{others[0]}: command not found" in message
    assert f"python{others[1]}: is Python {THIS}, not {others[1]}" in message
    assert f"python{THIS}: not found" in message
    assert "apt install python3.12-venv" in message and "make PYTHON=" in message
    assert not venv.exists()


def test_the_interpreter_under_test_is_chosen_by_its_name(tmp_path: Path) -> None:
    path = bin_dir(tmp_path, {f"python{v}": SHIM for v in SUPPORTED if v != THIS})
    (path / f"python{THIS}").symlink_to(REAL)
    result = find_python(path)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == str(REAL)


def test_a_named_interpreter_must_be_a_supported_cpython_with_venv(tmp_path: Path) -> None:
    path = bin_dir(tmp_path, {})
    chosen = find_python(path, str(REAL))
    assert chosen.returncode == 0 and chosen.stdout.strip() == str(REAL), chosen.stderr
    missing = find_python(path, "python3.99")
    assert missing.returncode == 1
    assert missing.stderr.strip() == "PYTHON=python3.99 cannot be used: not found"
    # An interpreter without the venv module (Debian's python3.X without python3.X-venv),
    # stood in for by this one with the module hidden.
    bare = tmp_path / "bare"
    bare.write_text(
        f'#!/bin/sh\nexec {REAL} -c \'import sys; sys.modules["ensurepip"] = None\n\'"$2"\n'
    )
    bare.chmod(0o755)
    refused = find_python(path, str(bare))
    assert refused.returncode == 1
    assert f"has no venv module (Debian, Ubuntu: apt install python{THIS}-venv)" in refused.stderr


def installed_pythons() -> dict[str, Path]:
    """Supported interpreters installed here besides this one: on PATH or under pyenv."""
    found: dict[str, Path] = {}
    root = Path(os.environ.get("PYENV_ROOT", Path.home() / ".pyenv"))
    for version in SUPPORTED:
        candidates = sorted(root.glob(f"versions/{version}.*/bin/python{version}"))
        on_path = shutil.which(f"python{version}")
        candidates += [Path(on_path)] if on_path else []
        for candidate in candidates:
            probe = subprocess.run(
                [str(candidate), "-c", "import ensurepip, sys; print(sys.version_info[:2])"],
                capture_output=True,
                text=True,
                check=False,
            )
            if probe.returncode == 0 and probe.stdout.strip() == str(
                tuple(map(int, version.split(".")))
            ):
                found[version] = candidate.resolve()
                break
    return found


def test_the_newest_that_runs_is_chosen(tmp_path: Path) -> None:
    pythons = installed_pythons()
    if len(pythons) < 2:
        pytest.skip(f"needs two of CPython {', '.join(SUPPORTED)}; found {sorted(pythons)}")
    newest, *older = sorted(pythons, key=lambda v: tuple(map(int, v.split("."))), reverse=True)
    path = bin_dir(tmp_path, {f"python{v}": pythons[v] for v in pythons})
    assert find_python(path).stdout.strip() == str(pythons[newest])
    # The newest does not run (a shim of a version not selected): the next one is chosen.
    (path / f"python{newest}").unlink()
    (path / f"python{newest}").write_text(SHIM)
    (path / f"python{newest}").chmod(0o755)
    assert find_python(path).stdout.strip() == str(pythons[older[0]])
