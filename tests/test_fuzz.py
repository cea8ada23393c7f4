"""The fuzzing harness (fuzz/) in the suite: every seed keeps its target's contract,
and a short coverage-guided run of each target finds nothing.

The contract (fuzz/targets.py): a reader of outside input returns or raises one of
the gateway's own errors that its module documents, never IndexError, KeyError,
RecursionError, UnicodeDecodeError, MemoryError..., and spends bounded CPU on one
input.  The long run is ``make fuzz`` (fuzz/README.md).
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from fuzz import targets
from fuzz.seeds import VENDORS, own_seeds, seed_all, vendor_seeds
from gateway.errors import ObjectSecurityError

ROOT = Path(__file__).resolve().parents[1]
SHORT_RUN_SECONDS = 3


@pytest.fixture(scope="module")
def work(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("fuzz-work")


@pytest.fixture(scope="module")
def own(work: Path) -> targets.Material:
    return targets.material(work)


def _keeps_contract(m: targets.Material, seeds: dict[str, list[bytes]]) -> None:
    for name, inputs in seeds.items():
        for data in inputs:
            targets.TARGETS[name](m, data)  # raises ContractBroken if broken


def test_own_seeds_keep_every_contract(own: targets.Material) -> None:
    seeds = own_seeds(own)
    assert all(seeds[name] for name in targets.TARGETS), "a target without seeds"
    _keeps_contract(own, seeds)


def test_vendor_seeds_keep_every_contract(tmp_path: Path) -> None:
    if not VENDORS.is_dir():
        pytest.skip(f"interop fixtures not present at {VENDORS} (outside the repository)")
    m = targets.material(tmp_path, VENDORS)
    seeds = vendor_seeds(VENDORS)
    assert seeds["cms"] and seeds["smime"] and seeds["as2"] and seeds["mdn"]
    _keeps_contract(m, seeds)


def test_the_seeds_reach_the_readers_past_the_errors(own: targets.Material) -> None:
    """Seeds that all failed early would leave the fuzzer in the error paths."""
    from gateway.cms.decrypting import decrypt_bytes
    from gateway.cms.smime import open_envelope, verify_entity

    seeds = own_seeds(own)
    opened = 0
    for der in seeds["cms"]:
        for party in own.recipients:
            try:
                decrypt_bytes(der, party.certificate, party.key, policy=targets.LEGACY)
                opened += 1
            except ObjectSecurityError:
                pass
    assert opened >= 6  # medgw's GCM and CBC to each key, openssl's BER to the RSA key
    entity = seeds["smime"][-1]
    from gateway.cms.mime import parse_entity

    _h, body = parse_entity(entity)
    inner = open_envelope(
        body, own.recipients[1].certificate, own.recipients[1].key, policy=targets.STRICT
    ).content
    verify_entity(inner, trusted_signers=own.signers, policy=targets.STRICT)


def test_a_broken_contract_is_reported() -> None:
    with (
        pytest.raises(targets.ContractBroken, match=r"IndexError escaped"),
        targets._bounded("probe", (ObjectSecurityError,)),
    ):
        raise IndexError("list index out of range")


@pytest.fixture(scope="module")
def short_runs(work: Path, own: targets.Material) -> Iterator[dict[str, subprocess.Popen[bytes]]]:
    """All targets fuzzed at once for a few seconds, with the keys made once."""
    if importlib.util.find_spec("atheris") is None:
        pytest.skip(
            f"atheris is not installed for {sys.executable} (Python {sys.version.split()[0]}); "
            "install the dev extras (pip install -e '.[dev]') to fuzz"
        )
    vendors = VENDORS if VENDORS.is_dir() else None
    seed_all(targets.material(work, vendors), work / "corpus", vendors)  # once, for all
    env = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1"}
    runs = {}
    for name in targets.TARGETS:
        runs[name] = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "fuzz",
                "run",
                name,
                "--work",
                str(work),
                "--seconds",
                str(SHORT_RUN_SECONDS),
            ],
            cwd=ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
    yield runs
    for proc in runs.values():
        if proc.poll() is None:
            proc.kill()
            proc.wait()


@pytest.mark.parametrize("name", list(targets.TARGETS))
def test_short_fuzz_run_finds_nothing(
    short_runs: dict[str, subprocess.Popen[bytes]], name: str, work: Path
) -> None:
    proc = short_runs[name]
    output, _ = proc.communicate(timeout=240)
    text = output.decode(errors="replace")
    broken = [line for line in text.splitlines() if "ContractBroken" in line]
    assert proc.returncode == 0, (
        f"fuzz target {name} broke its contract (input kept in {work / 'findings'}): "
        + ("\n".join(broken[:1]) or text[-3000:])
    )
    assert "DONE" in text and "cov:" in text, text[-2000:]
