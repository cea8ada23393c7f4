"""The package's metadata says what current packaging tools expect, and the licence it
names is in the repository."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def _pyproject() -> dict[str, object]:
    return tomllib.loads((REPO / "pyproject.toml").read_text())


def test_the_licence_is_an_spdx_expression_with_its_text_in_the_repository() -> None:
    """A ``license`` table is deprecated (setuptools warns on every build); PEP 639 wants
    an SPDX expression and the licence's own text listed in ``license-files``."""
    project = _pyproject()["project"]
    assert isinstance(project, dict)
    assert project["license"] == "Apache-2.0"
    files = project["license-files"]
    assert files == ["LICENSE"]
    text = (REPO / "LICENSE").read_text()
    assert text.split()[:5] == ["Apache", "License", "Version", "2.0,", "January"]
    assert "TERMS AND CONDITIONS FOR USE, REPRODUCTION, AND DISTRIBUTION" in text
    assert "END OF TERMS AND CONDITIONS" in text
    # All nine sections of the terms, not a summary of them.
    for number in range(1, 10):
        assert re.search(rf"^\s+{number}\. [A-Z]", text, re.MULTILINE), number


def test_the_build_needs_a_setuptools_that_reads_an_spdx_licence() -> None:
    """setuptools reads ``license = "<SPDX>"`` and ``license-files`` from 77.0 on."""
    system = _pyproject()["build-system"]
    assert isinstance(system, dict)
    [setuptools] = [r for r in system["requires"] if r.startswith("setuptools")]
    found = re.fullmatch(r"setuptools>=(\d+)(?:\.\d+)*", setuptools)
    assert found and int(found.group(1)) >= 77, setuptools
