"""Shared test data that is absent is named, with where it was looked for and where it
comes from, in the reason its tests give for skipping."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests import testdata


@pytest.mark.parametrize(
    ("data", "named", "source"),
    [
        (testdata.PKITS, "PKITS", "csrc.nist.gov"),
        (testdata.AS2_VENDORS, "Mendelson AS2", "pyas2-lib"),
    ],
)
def test_an_absent_data_set_is_skipped_saying_what_it_is_where_and_where_to_get_it(
    data: testdata.DataSet, named: str, source: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(testdata.ENVIRONMENT, str(tmp_path))
    with pytest.raises(pytest.skip.Exception) as skipped:
        data.require()
    reason = str(skipped.value)
    assert named in reason and source in reason
    assert str(tmp_path / data.folder_name) in reason  # where it looked
    assert "../shared/testdata" in reason and testdata.ENVIRONMENT in reason  # where to put it

    (tmp_path / data.folder_name).mkdir()
    (tmp_path / data.folder_name / data.marker).write_text("[]")
    assert data.require() == tmp_path / data.folder_name


def test_without_the_variable_the_data_is_looked_for_beside_the_project(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv(testdata.ENVIRONMENT, raising=False)
    project = Path(__file__).resolve().parent.parent
    assert testdata.PKITS.folder == project.parent / "shared" / "testdata" / "pkits"
