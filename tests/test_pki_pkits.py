"""NIST PKITS (2011 edition) through our validator, with revocation required.

Sections 4.1-4.7, 4.13, 4.14, 4.15 and 4.16: no path PKITS marks invalid may
be accepted; a valid path may be refused only if it is listed in
``EXPECTED_MISSES`` with the reason.  The list is checked in both directions:
a listed case that starts to pass fails the test too, so the list stays true.
"""

from __future__ import annotations

import json
from collections import defaultdict
from datetime import UTC, datetime
from typing import Any

import pytest
from cryptography import x509
from pyhanko_certvalidator.policy_decl import PKIXValidationParams

from gateway.pki.validate import Purpose, RevocationPolicy, validate
from gateway.policy import AlgorithmPolicy
from tests import testdata

PKITS = testdata.PKITS.folder
SECTIONS = ("401", "402", "403", "404", "405", "406", "407", "413", "414", "415", "416")
# Inside every certificate's and CRL's validity window of the 2011 edition.
AT = datetime(2022, 5, 1, tzinfo=UTC)

EXPECTED_MISSES = {
    "40104": "DSA keys are not on the CRYPTREC list (policy refuses the leaf's DSA key)",
    "40105": "DSA with inherited parameters: the certificate cannot even be parsed "
    "(cryptography refuses an AlgorithmIdentifier without DSA parameters); DSA is "
    "refused by policy anyway",
    "40306": "UID CA carries a subjectUniqueID that is not octet-aligned; asn1crypto "
    "re-encodes it once read, so when the CA is validated a second time as the CRL "
    "issuer its signature no longer verifies and the CRL cannot be used - refused "
    "(fail closed); unique identifiers are forbidden for conforming CAs (RFC 5280 4.1.2.8)",
}


def _cases() -> list[dict[str, Any]]:
    index = PKITS / "pkits.json"
    if not index.is_file():
        return []
    cases: list[dict[str, Any]] = json.loads(index.read_text())
    return [c for c in cases if c["id"][:3] in SECTIONS]


def _cert(name: str) -> x509.Certificate:
    return x509.load_der_x509_certificate((PKITS / "certs" / name).read_bytes())


def _crl(name: str) -> x509.CertificateRevocationList:
    return x509.load_der_x509_crl((PKITS / "crls" / name).read_bytes())


def _params(case: dict[str, Any]) -> PKIXValidationParams | None:
    raw = case.get("params")
    if raw is None:
        return None
    return PKIXValidationParams(
        user_initial_policy_set=frozenset(raw.get("user_initial_policy_set", ["any_policy"])),
        initial_policy_mapping_inhibit=bool(raw.get("initial_policy_mapping_inhibit", False)),
        initial_explicit_policy=bool(raw.get("initial_explicit_policy", False)),
        initial_any_policy_inhibit=bool(raw.get("initial_any_policy_inhibit", False)),
    )


async def _accepted(case: dict[str, Any]) -> tuple[bool, str]:
    try:
        leaf = _cert(case["cert"])
        others = [_cert(n) for n in case.get("other_certs", [])]
        crls = [_crl("TrustAnchorRootCRL.crl")] + [_crl(n) for n in case.get("crls", [])]
    except ValueError as exc:  # unparseable input is refused, never accepted
        return False, f"input cannot be parsed: {exc}"
    result = await validate(
        leaf,
        anchors=[_cert("TrustAnchorRootCertificate.crt")],
        intermediates=others,
        at=AT,
        revocation=RevocationPolicy.REQUIRE,
        crls=crls,
        pkix_params=_params(case),
        purpose=Purpose.ANY,
        policy=AlgorithmPolicy(),
    )
    if result.valid:
        # revocation was really established for every certificate below the anchor
        assert all(s.status in ("good", "trust-anchor") for s in result.statuses), case["id"]
        assert result.revocation != "not-checked"
    return result.valid, result.reason or ""


@pytest.mark.skipif(not testdata.PKITS.present, reason=testdata.PKITS.missing())
@pytest.mark.filterwarnings("ignore::cryptography.utils.CryptographyDeprecationWarning")
async def test_pkits_with_revocation_required() -> None:
    cases = _cases()
    table: dict[str, list[int]] = defaultdict(lambda: [0, 0, 0, 0])
    false_accepts: list[str] = []
    misses: dict[str, str] = {}
    for case in cases:
        accepted, reason = await _accepted(case)
        row = table[case["id"][:3]]
        if "error" in case:
            row[3] += 1
            if accepted:
                false_accepts.append(f"{case['id']} {case['name']}")
            else:
                row[2] += 1
        else:
            row[1] += 1
            if accepted:
                row[0] += 1
            else:
                misses[case["id"]] = f"{case['name']}: {reason}"
    print("section  valid accepted/total  invalid rejected/total")
    for section in sorted(table):
        a, v, r, i = table[section]
        print(f"4.{int(section[1:])}      {a}/{v}                {r}/{i}")
    assert not false_accepts, f"invalid PKITS paths accepted: {false_accepts}"
    assert set(misses) == set(EXPECTED_MISSES), (
        f"unexpected misses: {sorted(set(misses) - set(EXPECTED_MISSES))} "
        f"{[misses[k] for k in sorted(set(misses) - set(EXPECTED_MISSES))]}; "
        f"listed but now accepted: {sorted(set(EXPECTED_MISSES) - set(misses))}"
    )
    accepted_valid = sum(row[0] for row in table.values())
    total_valid = sum(row[1] for row in table.values())
    assert accepted_valid / total_valid >= 0.95, (accepted_valid, total_valid)
    assert sum(row[3] for row in table.values()) > 80  # the suite really ran
