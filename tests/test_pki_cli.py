"""``medgw pki verify / check / csr`` as an administrator runs them: real processes."""

from __future__ import annotations

import json
import shutil
import stat
import subprocess
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.serialization import Encoding

from gateway.pki import issue
from gateway.pki.demo import DemoLayout
from tests.cli import medgw as run_medgw

ROOT = Path(__file__).resolve().parent.parent
NOW = datetime.now(UTC).replace(microsecond=0)


def medgw(*args: str | Path) -> subprocess.CompletedProcess[str]:
    return run_medgw(*args, cwd=ROOT)


@pytest.fixture
def files(tmp_path: Path) -> dict[str, Path]:
    root = issue.make_ca("CLI Root", now=NOW - timedelta(days=10), organization="Regional")
    sub = issue.make_ca("CLI Issuing CA", now=NOW - timedelta(days=10), parent=root)
    leaf = issue.issue(sub, "gw.lab.example", purpose="tls", now=NOW - timedelta(days=1), days=90)
    revoked = issue.issue(sub, "old.lab.example", purpose="tls", now=NOW - timedelta(days=1))
    out = {
        "root": tmp_path / "root.pem",
        "sub": tmp_path / "sub.der",  # DER on purpose
        "leaf": tmp_path / "leaf.pem",
        "revoked": tmp_path / "revoked.pem",
        "root_crl": tmp_path / "root.crl",
        "sub_crl": tmp_path / "sub.crl.pem",
        "sub_crl_revoking": tmp_path / "sub-2.crl",
    }
    issue.write_pem(out["root"], root.certificate)
    out["sub"].write_bytes(sub.certificate.public_bytes(Encoding.DER))
    issue.write_pem(out["leaf"], leaf.certificate)
    issue.write_pem(out["revoked"], revoked.certificate)
    out["root_crl"].write_bytes(
        issue.make_crl(root, now=NOW - timedelta(hours=1), days=30).public_bytes(Encoding.DER)
    )
    out["sub_crl"].write_bytes(
        issue.make_crl(sub, now=NOW - timedelta(hours=1)).public_bytes(Encoding.PEM)
    )
    out["sub_crl_revoking"].write_bytes(
        issue.make_crl(
            sub,
            now=NOW - timedelta(minutes=5),
            revoked=[(revoked.certificate.serial_number, NOW - timedelta(minutes=10))],
            number=2,
        ).public_bytes(Encoding.DER)
    )
    return out


def test_verify_valid_without_revocation_says_not_checked(files: dict[str, Path]) -> None:
    done = medgw(
        "pki", "verify", files["leaf"], "--intermediate", files["sub"],
        "--trust", files["root"], "--purpose", "tls-client",
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    assert "VALID" in done.stdout and "not-checked" in done.stdout
    assert "CN=gw.lab.example" in done.stdout and "CN=CLI Root,O=Regional" in done.stdout

    as_json = medgw(
        "pki", "verify", files["leaf"], "--intermediate", files["sub"],
        "--trust", files["root"], "--json",
    )  # fmt: skip
    assert as_json.returncode == 0
    report = json.loads(as_json.stdout)
    assert report["valid"] is True and report["reason"] is None
    assert report["revocation"] == "not-checked"
    assert report["chain"] == [
        "CN=gw.lab.example",
        "CN=CLI Issuing CA",
        "CN=CLI Root,O=Regional",
    ]


def test_verify_with_crls_requires_status_for_every_certificate(files: dict[str, Path]) -> None:
    base = ("pki", "verify", "--intermediate", files["sub"], "--trust", files["root"], "--json")
    good = medgw(*base, files["leaf"], "--crl", files["root_crl"], "--crl", files["sub_crl"])
    assert good.returncode == 0, good.stdout + good.stderr
    report = json.loads(good.stdout)
    assert report["valid"] is True
    assert "crl" in report["revocation"] and "not-checked" not in report["revocation"]
    assert [d["status"] for d in report["revocation_details"]] == ["good", "good", "trust-anchor"]

    # the issuing CA's CRL is missing: the leaf's status cannot be established
    missing = medgw(*base, files["leaf"], "--crl", files["root_crl"])
    assert missing.returncode == 1
    report = json.loads(missing.stdout)
    assert report["valid"] is False and "CN=gw.lab.example" in report["reason"]

    revoked = medgw(
        *base, files["revoked"], "--crl", files["root_crl"], "--crl", files["sub_crl_revoking"]
    )
    assert revoked.returncode == 1
    reason = json.loads(revoked.stdout)["reason"]
    assert "CN=old.lab.example is revoked" in reason and "fix:" in reason

    folder = files["root_crl"].parent / "crls"
    folder.mkdir()
    for key in ("root_crl", "sub_crl_revoking"):
        shutil.copy(files[key], folder / files[key].name)
    by_folder = medgw("pki", "verify", files["revoked"], "--intermediate", files["sub"],
                      "--trust", files["root"], "--crl", folder)  # fmt: skip
    assert by_folder.returncode == 1 and "INVALID" in by_folder.stdout


def test_verify_at_a_time_with_a_zone_names_it_in_utc(files: dict[str, Path]) -> None:
    """--at with another time zone: a stale CRL's reason gives the time checked in UTC
    (the zone's wall time with a Z would be hours off), and calls it the time checked,
    not this host's clock."""
    at = NOW + timedelta(days=40)
    tokyo = at.astimezone(timezone(timedelta(hours=9)))
    done = medgw(
        "pki", "verify", files["leaf"], "--intermediate", files["sub"],
        "--trust", files["root"], "--crl", files["root_crl"], "--crl", files["sub_crl"],
        "--at", tokyo.isoformat(), "--json",
    )  # fmt: skip
    assert done.returncode == 1, done.stdout + done.stderr
    reason = json.loads(done.stdout)["reason"]
    assert "passed its nextUpdate on" in reason, reason
    assert f"and the time checked is {at:%Y-%m-%d %H:%M}Z" in reason, reason
    assert f"{tokyo:%Y-%m-%d %H:%M}Z" not in reason and "this host's clock reads" not in reason


@pytest.mark.parametrize(
    ("at", "cause"),
    [
        (NOW + timedelta(days=40), "passed its nextUpdate on"),
        (NOW - timedelta(hours=2), "is dated after the time checked"),
    ],
    ids=["stale", "dated-after"],
)
def test_verify_at_a_time_given_blames_the_time_not_this_hosts_clock(
    files: dict[str, Path], at: datetime, cause: str
) -> None:
    """--at is the administrator's choice: a CRL that does not cover it (past its
    nextUpdate, or issued after it) is fixed by another CRL or another time, and the
    fix names that time; this host's clock has nothing to do with it."""
    done = medgw(
        "pki", "verify", files["leaf"], "--intermediate", files["sub"],
        "--trust", files["root"], "--crl", files["root_crl"], "--crl", files["sub_crl"],
        "--at", at.isoformat(), "--json",
    )  # fmt: skip
    assert done.returncode == 1, done.stdout + done.stderr
    reason = json.loads(done.stdout)["reason"]
    assert cause in reason, reason
    assert (
        "fix: give a CRL of its issuer that was current at the time given "
        f"({at:%Y-%m-%d %H:%M}Z): thisUpdate before it and nextUpdate after it; or verify "
        "at a time within that CRL's validity period"
    ) in reason, reason
    assert "clock" not in reason and "timedatectl" not in reason, reason


def test_verify_invalid_reasons_name_certificate_and_fix(files: dict[str, Path]) -> None:
    later = (NOW + timedelta(days=200)).isoformat()
    expired = medgw("pki", "verify", files["leaf"], "--intermediate", files["sub"],
                    "--trust", files["root"], "--at", later)  # fmt: skip
    assert expired.returncode == 1
    assert "INVALID: certificate CN=gw.lab.example expired on" in expired.stdout
    assert "renew" in expired.stdout

    purpose = medgw("pki", "verify", files["leaf"], "--intermediate", files["sub"],
                    "--trust", files["root"], "--purpose", "smime-sign")  # fmt: skip
    assert purpose.returncode == 1 and "emailProtection" in purpose.stdout

    no_chain = medgw("pki", "verify", files["leaf"], "--trust", files["root"])
    assert no_chain.returncode == 1 and "CN=CLI Issuing CA" in no_chain.stdout


def test_verify_usage_errors_exit_2(files: dict[str, Path], tmp_path: Path) -> None:
    assert medgw("pki", "verify", files["leaf"]).returncode == 2  # no --trust
    missing = medgw("pki", "verify", tmp_path / "nope.pem", "--trust", files["root"])
    assert missing.returncode == 2 and "not found" in missing.stderr
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("hello")
    assert medgw("pki", "verify", garbage, "--trust", files["root"]).returncode == 2
    bad_time = medgw("pki", "verify", files["leaf"], "--trust", files["root"], "--at", "soon")
    assert bad_time.returncode == 2 and "ISO 8601" in bad_time.stderr
    bad_purpose = medgw("pki", "verify", files["leaf"], "--trust", files["root"], "--purpose", "x")
    assert bad_purpose.returncode == 2


@pytest.mark.parametrize(
    ("purpose", "key_type", "usage", "eku"),
    [
        ("tls", "ec-p256", "digital_signature", "serverAuth"),
        ("smime-sign", "ec-p384", "content_commitment", "emailProtection"),
        ("smime-encrypt", "ec-p256", "key_agreement", "emailProtection"),
    ],
)
def test_csr(tmp_path: Path, purpose: str, key_type: str, usage: str, eku: str) -> None:
    key, csr_path = tmp_path / "new.key", tmp_path / "new.csr"
    done = medgw("pki", "csr", "--purpose", purpose, "--cn", "gw.lab.example", "--org", "Lab",
                 "--dns", "gw.lab.example", "--key-type", key_type,
                 "--key-out", key, "--csr-out", csr_path)  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    verified = subprocess.run(
        ["openssl", "req", "-in", str(csr_path), "-noout", "-verify"],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert verified.returncode == 0, verified.stderr
    csr = x509.load_pem_x509_csr(csr_path.read_bytes())
    assert csr.is_signature_valid
    ku = csr.extensions.get_extension_for_class(x509.KeyUsage)
    assert ku.critical and getattr(ku.value, usage)
    ekus = csr.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert eku in {o._name for o in ekus}
    assert csr.subject.rfc4514_string() == "CN=gw.lab.example,O=Lab"
    again = medgw("pki", "csr", "--purpose", purpose, "--cn", "x",
                  "--key-out", key, "--csr-out", tmp_path / "other.csr")  # fmt: skip
    assert again.returncode == 2 and "refusing to overwrite" in again.stderr


def test_check_reports_expiry_policy_and_crl_freshness(layout: DemoLayout, tmp_path: Path) -> None:
    config = layout.hospital.config_path
    fine = medgw("pki", "check", "--config", config)
    assert fine.returncode == 0, fine.stdout + fine.stderr
    assert "days to expiry" in fine.stdout and "peer lab tls pin" in fine.stdout

    ca = issue.make_ca("Stale CA", now=NOW - timedelta(days=30))
    stale = tmp_path / "stale.crl"
    stale.write_bytes(
        issue.make_crl(ca, now=NOW - timedelta(days=10), days=7).public_bytes(Encoding.DER)
    )
    soon = tmp_path / "soon.crl"
    soon.write_bytes(
        issue.make_crl(ca, now=NOW - timedelta(days=5), days=7).public_bytes(Encoding.DER)
    )
    warned = medgw("pki", "check", "--config", config, "--crl", soon)
    assert warned.returncode == 0 and "goes stale in 1 d" in warned.stdout
    failed = medgw("pki", "check", "--config", config, "--crl", stale)
    assert failed.returncode == 1
    assert "stale" in failed.stdout and "CN=Stale CA" in failed.stdout


def _demo_ca(layout: DemoLayout) -> issue.Issued:
    key = serialization.load_pem_private_key((layout.root / "ca" / "ca.key").read_bytes(), None)
    cert = x509.load_pem_x509_certificate(layout.ca_certificate.read_bytes())
    return issue.Issued(cert, key)  # type: ignore[arg-type]


def test_check_judges_the_crls_the_zones_are_configured_with(layout: DemoLayout) -> None:
    config = layout.hospital.config_path
    crl_file = layout.hospital.root / "certs" / "crls" / "loopback" / "ca.crl"
    assert 'crls = ["certs/crls/loopback"]' in config.read_text() and crl_file.exists()
    fresh = medgw("pki", "check", "--config", config)
    assert fresh.returncode == 0, fresh.stdout + fresh.stderr
    assert "no CRL" not in fresh.stdout  # the zone's CRL is what revocation is checked with
    [row] = [line for line in fresh.stdout.splitlines() if "zone " in line and " CRL " in line]
    assert row.startswith("ok") and "CN=medgw Demo Root CA" in row and "fresh for" in row

    # The configured CRL is about to go stale: said before the daemon starts refusing peers.
    ca = _demo_ca(layout)
    soon = issue.make_crl(ca, now=NOW - timedelta(days=6, hours=12), days=7, number=2)
    crl_file.write_bytes(soon.public_bytes(Encoding.PEM))
    warned = medgw("pki", "check", "--config", config)
    assert warned.returncode == 0, warned.stdout + warned.stderr
    [row] = [line for line in warned.stdout.splitlines() if "goes stale in 0 d" in line]
    assert row.startswith("warning") and "zone " in row and "fix:" in row

    # A zone that requires revocation status but whose CRL folder is empty refuses every peer.
    folder = layout.hospital.root / "certs" / "crls" / "empty"
    folder.mkdir()
    config.write_text(
        config.read_text().replace('crls = ["certs/crls/loopback"]', 'crls = ["certs/crls/empty"]')
    )
    empty = medgw("pki", "check", "--config", config)
    assert empty.returncode == 1, empty.stdout + empty.stderr
    assert "holds no CRL" in empty.stdout and "no CRL configured or given" in empty.stdout


def test_csr_into_a_missing_folder_is_a_usage_error(tmp_path: Path) -> None:
    missing = tmp_path / "nonexist" / "dir"
    result = medgw("pki", "csr", "--purpose", "tls", "--cn", "gw.lab.example",
                   "--key-out", missing / "k", "--csr-out", tmp_path / "new.csr")  # fmt: skip
    assert result.returncode == 2
    assert f"--key-out {missing / 'k'}: the folder {missing} does not exist" in result.stderr
    assert "fix:" in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "new.csr").exists()
