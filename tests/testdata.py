"""Test data from outside this project: what each set is, where the tests look for it,
and where to get it.

Other parties' files (NIST's PKITS, other AS2 products' messages) are not part of
the product and are not in the repository.  The tests that need them look in
``../shared/testdata/`` beside the project's folder, or in the folder named by
``MEDGW_TESTDATA``; when a set is not there, those tests skip saying which set
they need, where they looked and where it comes from.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
ENVIRONMENT = "MEDGW_TESTDATA"
# In the reason of a test skipped for want of such a set: not a part CI installs.
OUTSIDE = "It is test data from outside this project, not in the repository"


def shared_folder() -> Path:
    """``$MEDGW_TESTDATA`` if set, else ``../shared/testdata`` from the project's root."""
    named = os.environ.get(ENVIRONMENT)
    return Path(named) if named else REPO.parent / "shared" / "testdata"


@dataclass(frozen=True)
class DataSet:
    """One set of test data, in its own folder of the shared test data folder."""

    name: str  # what it is, for a person reading the skip reason
    folder_name: str  # its folder in the shared test data folder
    marker: str  # a file every copy of the set has: present means usable
    source: str  # where to get it

    @property
    def folder(self) -> Path:
        return shared_folder() / self.folder_name

    @property
    def present(self) -> bool:
        return (self.folder / self.marker).is_file()

    def missing(self) -> str:
        """Why the tests that need this set cannot run here, and what to do about it."""
        return (
            f"needs {self.name}, not found at {self.folder} (no {self.marker} there). "
            f"{OUTSIDE}: get it "
            f"from {self.source}, and put it in {self.folder_name}/ of ../shared/testdata "
            f"beside the project's folder, or of the folder named by ${ENVIRONMENT}"
        )

    def require(self) -> Path:
        """The set's folder; the calling test is skipped, saying why, if it is absent."""
        if not self.present:
            pytest.skip(self.missing())
        return self.folder


PKITS = DataSet(
    name="NIST's Public Key Interoperability Test Suite (PKITS, 2011 edition: "
    "certificates and CRLs, with the pkits.json index of its test cases)",
    folder_name="pkits",
    marker="pkits.json",
    source="NIST (https://csrc.nist.gov/projects/pki-testing: certs/ and crls/ in DER) "
    "and the pyHanko project, whose certvalidator tests compiled the index "
    "(https://github.com/MatthiasValvekens/pyHanko, tests/fixtures/nist_pkits/pkits.json)",
)

AS2_VENDORS = DataSet(
    name="AS2 messages and receipts made by other AS2 products (Mendelson AS2, "
    "IBM Sterling B2B Integrator) with their certificates",
    folder_name="as2-vendors",
    marker="mecas2_signed_encrypted.as2",
    source="the pyas2lib test suite's fixtures "
    "(https://github.com/abhishek-ram/pyas2-lib, pyas2lib/tests/fixtures)",
)
