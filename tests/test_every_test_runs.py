"""Where CI sets MEDGW_EVERY_TEST_RUNS, a test that skips fails: a part missing on the CI
machine (PostgreSQL, openssl, root) can never pass for a check that ran."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _run(test_file: Path, strict: bool) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "MEDGW_EVERY_TEST_RUNS"}
    if strict:
        env["MEDGW_EVERY_TEST_RUNS"] = "1"
    return subprocess.run(
        [
            *(sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider"),
            *("-p", "tests.conftest", "--rootdir", str(test_file.parent), str(test_file)),
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_a_skip_fails_where_every_test_must_run(tmp_path: Path) -> None:
    test_file = tmp_path / "test_needs_a_widget.py"
    test_file.write_text(
        "import pytest\n\n\n"
        "def test_in_the_body() -> None:\n    pytest.skip('no widget here')\n\n\n"
        "@pytest.mark.skipif(True, reason='no gadget here')\n"
        "def test_marked() -> None:\n    pass\n"
    )
    strict = _run(test_file, strict=True)
    assert strict.returncode == 1, strict.stdout + strict.stderr
    assert "1 failed, 1 error" in strict.stdout, strict.stdout  # the mark's: at its setup
    assert "(MEDGW_EVERY_TEST_RUNS is set): Skipped: no widget here" in strict.stdout
    assert "(MEDGW_EVERY_TEST_RUNS is set): Skipped: no gadget here" in strict.stdout
    elsewhere = _run(test_file, strict=False)
    assert elsewhere.returncode == 0 and "2 skipped" in elsewhere.stdout, elsewhere.stdout


def test_a_module_skipped_while_collected_fails_where_every_test_must_run(tmp_path: Path) -> None:
    test_file = tmp_path / "test_needs_a_module.py"
    test_file.write_text(
        "import pytest\n\n"
        "pytest.importorskip('no_such_module_anywhere')\n\n\n"
        "def test_with_the_module() -> None:\n    pass\n"
    )
    strict = _run(test_file, strict=True)
    assert strict.returncode != 0, strict.stdout + strict.stderr
    assert "1 error" in strict.stdout, strict.stdout
    assert "(MEDGW_EVERY_TEST_RUNS is set)" in strict.stdout, strict.stdout
    assert "no_such_module_anywhere" in strict.stdout, strict.stdout
    elsewhere = _run(test_file, strict=False)  # a module's only test skipped: none ran
    assert elsewhere.returncode == pytest.ExitCode.NO_TESTS_COLLECTED, elsewhere.stdout
    assert "1 skipped" in elsewhere.stdout, elsewhere.stdout


def test_test_data_from_outside_the_project_may_be_missing_there(tmp_path: Path) -> None:
    """No installation brings other parties' files (tests/testdata.py): their tests skip."""
    test_file = tmp_path / "test_needs_outside_data.py"
    test_file.write_text(
        "from pathlib import Path\n\n"
        "from tests.testdata import DataSet\n\n"
        "ABSENT = DataSet('a set', 'absent', 'index.json', 'its maker')\n\n\n"
        "def test_with_the_set(monkeypatch) -> None:\n"
        f"    monkeypatch.setenv('MEDGW_TESTDATA', {str(tmp_path)!r})\n"
        "    ABSENT.require()\n"
    )
    strict = _run(test_file, strict=True)
    assert strict.returncode == 0 and "1 skipped" in strict.stdout, strict.stdout
    elsewhere = _run(test_file, strict=False)
    assert elsewhere.returncode == 0 and "1 skipped" in elsewhere.stdout, elsewhere.stdout
