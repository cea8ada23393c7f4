"""Signed checkpoints: every kind of tampering by someone who can write the audit log,
caught by ``medgw audit verify`` with the record named; the key made by real openssl."""

from __future__ import annotations

import hashlib
import json
import subprocess
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from gateway.audit import AuditEvent, AuditLog, EventType
from gateway.audit.chain import GENESIS, canonical
from gateway.audit.seal import Sealer, SealSettings
from gateway.demo_run import read_audit, wait_until
from gateway.pki.demo import DemoLayout
from tests.cli import medgw
from tests.clocks import TickingClock
from tests.helpers.audit import openssl_audit_key
from tests.helpers.openssl_keys import self_signed


def sealer(key: Path, cert: Path, every: int = 5) -> Sealer:
    private = serialization.load_pem_private_key(key.read_bytes(), None)
    certificate = x509.load_pem_x509_certificate(cert.read_bytes())
    return Sealer(SealSettings(private, certificate, every_records=every))  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return openssl_audit_key(tmp_path_factory.mktemp("keys"))


def write_trail(path: Path, keys: tuple[Path, Path], records: int = 12) -> list[str]:
    """``records`` events, a checkpoint after every 5, one more at close (shutdown)."""
    log = AuditLog(path, TickingClock(), node="HOSP", sealer=sealer(*keys), sync=lambda fd: None)
    for n in range(records):
        log.emit(AuditEvent(EventType.MESSAGE_SENT, peer="lab", message_id=f"<{n}@x>"))
    log.close()
    return path.read_text().splitlines()


def verify(path: Path, cert: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    return medgw("audit", "verify", "--file", path, "--certificate", cert, *extra)


def rechain(lines: list[str]) -> list[str]:
    """What an insider without the key does: compute every seq, prev and hash again, and
    make each checkpoint point at the record and checkpoint before it (it cannot sign)."""
    out, prev, checkpoint = [], GENESIS, 0
    for seq, line in enumerate(lines, start=1):
        record = json.loads(line)
        record.pop("hash")
        record["seq"], record["prev"] = seq, prev
        if record["event"] == "audit.checkpoint":
            record["detail"].update(
                sealed_seq=seq - 1, sealed_hash=prev, previous_checkpoint=checkpoint
            )
            checkpoint = seq
        record["hash"] = prev = hashlib.sha256(canonical(record)).hexdigest()
        out.append(json.dumps(record))
    return out


def test_intact_trail_has_signed_checkpoints_and_verifies(
    tmp_path: Path, keys: tuple[Path, Path]
) -> None:
    path = tmp_path / "audit.jsonl"
    lines = write_trail(path, keys)
    events = [json.loads(line)["event"] for line in lines]
    # 12 events: checkpoints after 5 and 10 (records 6 and 12), one at shutdown (record 15)
    assert [i + 1 for i, e in enumerate(events) if e == "audit.checkpoint"] == [6, 12, 15]
    last = json.loads(lines[-1])
    assert last["detail"]["trigger"] == "shutdown" and last["detail"]["previous_checkpoint"] == 12
    ok = verify(path, keys[1], "--last-checkpoint", f"15:{last['hash']}")
    assert ok.returncode == 0, ok.stderr
    assert "3 checkpoints, signatures valid" in ok.stdout
    assert f"last checkpoint: record 15 ({path}:15), 15:{last['hash']}" in ok.stdout
    assert "not yet sealed" not in ok.stdout


def test_records_emitted_together_are_sealed_where_one_by_one_they_would_be(
    tmp_path: Path, keys: tuple[Path, Path]
) -> None:
    path = tmp_path / "audit.jsonl"
    log = AuditLog(path, TickingClock(), node="HOSP", sealer=sealer(*keys), sync=lambda fd: None)
    sent = [
        AuditEvent(EventType.MESSAGE_SENT, peer="lab", message_id=f"<{n}@x>") for n in range(12)
    ]
    log.emit_all(sent[:3])
    log.emit_all(sent[3:11])  # checkpoints fall due after its 2nd and its 7th record
    log.emit(sent[11])
    log.close()
    lines = path.read_text().splitlines()
    one_by_one = write_trail(tmp_path / "one_by_one.jsonl", keys)
    assert [json.loads(line)["event"] for line in lines] == [
        json.loads(line)["event"] for line in one_by_one
    ]
    assert [json.loads(line).get("message_id") for line in lines] == [
        json.loads(line).get("message_id") for line in one_by_one
    ]
    last = json.loads(lines[-1])
    ok = verify(path, keys[1], "--last-checkpoint", f"15:{last['hash']}")
    assert ok.returncode == 0, ok.stderr
    assert "3 checkpoints, signatures valid" in ok.stdout


def test_an_edited_record_is_named(tmp_path: Path, keys: tuple[Path, Path]) -> None:
    path = tmp_path / "audit.jsonl"
    lines = write_trail(path, keys)
    record = json.loads(lines[2])
    record["peer"] = "someone-else"
    path.write_text("\n".join([*lines[:2], json.dumps(record), *lines[3:]]) + "\n")
    result = verify(path, keys[1])
    assert result.returncode == 1
    assert f"{path}:3: record 3 was altered" in result.stderr


def test_a_deleted_record_is_named(tmp_path: Path, keys: tuple[Path, Path]) -> None:
    path = tmp_path / "audit.jsonl"
    lines = write_trail(path, keys)
    path.write_text("\n".join([*lines[:7], *lines[8:]]) + "\n")  # record 8 removed
    result = verify(path, keys[1])
    assert result.returncode == 1
    assert f"{path}:8: record 9: chain broken: record 8 expected here" in result.stderr


def test_an_inserted_record_is_named(tmp_path: Path, keys: tuple[Path, Path]) -> None:
    path = tmp_path / "audit.jsonl"
    lines = write_trail(path, keys)
    forged = json.loads(lines[3])
    forged["message_id"] = "<forged@x>"
    path.write_text("\n".join([*lines[:4], json.dumps(forged), *lines[4:]]) + "\n")
    result = verify(path, keys[1])
    assert result.returncode == 1
    assert f"{path}:5: record 4: chain broken: record 5 expected here" in result.stderr


def test_reordered_records_are_named(tmp_path: Path, keys: tuple[Path, Path]) -> None:
    path = tmp_path / "audit.jsonl"
    lines = write_trail(path, keys)
    path.write_text("\n".join([*lines[:8], lines[9], lines[8], *lines[10:]]) + "\n")
    result = verify(path, keys[1])
    assert result.returncode == 1
    assert f"{path}:9: record 10: chain broken: record 9 expected here" in result.stderr


def test_a_truncated_trail_is_found_against_the_last_checkpoint_seen_outside(
    tmp_path: Path, keys: tuple[Path, Path]
) -> None:
    path = tmp_path / "audit.jsonl"
    lines = write_trail(path, keys)
    seen_outside = json.loads(lines[11])  # checkpoint 12 left the box
    path.write_text("\n".join(lines[:9]) + "\n")  # records 10.. cut off
    alone = verify(path, keys[1])
    assert alone.returncode == 0  # without outside knowledge: only "not yet sealed"
    assert "not yet sealed: 3 records after record 6" in alone.stdout
    result = verify(path, keys[1], "--last-checkpoint", f"12:{seen_outside['hash']}")
    assert result.returncode == 1
    assert "TRUNCATED: the trail ends at record 9, but checkpoint 12 was seen outside" in (
        result.stderr
    )


@pytest.mark.parametrize("cut", ["delete", "edit"])
def test_a_chain_rewritten_without_the_key_fails_at_the_first_checkpoint_after(
    tmp_path: Path, keys: tuple[Path, Path], cut: str
) -> None:
    path = tmp_path / "audit.jsonl"
    lines = write_trail(path, keys)
    if cut == "delete":
        tampered = [*lines[:7], *lines[8:]]  # record 8 removed, then the chain recomputed
    else:
        record = json.loads(lines[7])
        record["message_id"] = "<other@x>"
        tampered = [*lines[:7], json.dumps(record), *lines[8:]]
    path.write_text("\n".join(rechain(tampered)) + "\n")
    plain = medgw("audit", "verify", "--file", path)
    assert plain.returncode == 0, "the hash chain alone cannot see it: that is the point"
    result = verify(path, keys[1])
    assert result.returncode == 1
    line = 11 if cut == "delete" else 12  # the checkpoint that sealed records 7-11
    assert f"{path}:{line}: record {line}: " in result.stderr
    assert f"the records after checkpoint 6 ({path}:6) were changed" in result.stderr


def test_a_chain_rewritten_and_signed_with_another_key_is_refused(
    tmp_path: Path, keys: tuple[Path, Path]
) -> None:
    path = tmp_path / "audit.jsonl"
    write_trail(path, openssl_audit_key(tmp_path, "insider"))
    result = verify(path, keys[1])
    assert result.returncode == 1
    assert f"{path}:6: record 6: a checkpoint signed by a key not given" in result.stderr


def test_a_removed_checkpoint_is_found_even_if_the_chain_is_recomputed(
    tmp_path: Path, keys: tuple[Path, Path]
) -> None:
    path = tmp_path / "audit.jsonl"
    lines = write_trail(path, keys)
    path.write_text("\n".join(rechain([*lines[:11], *lines[12:]])) + "\n")  # checkpoint 12
    result = verify(path, keys[1], "--last-checkpoint", f"12:{json.loads(lines[11])['hash']}")
    assert result.returncode == 1
    assert f"{path}:12: record 12 is not the checkpoint seen outside" in result.stderr


def test_records_after_the_last_checkpoint_are_reported_not_yet_sealed(
    tmp_path: Path, keys: tuple[Path, Path]
) -> None:
    path = tmp_path / "audit.jsonl"
    log = AuditLog(path, TickingClock(), node="HOSP", sealer=sealer(*keys), sync=lambda fd: None)
    for n in range(7):
        log.emit(AuditEvent(EventType.MESSAGE_SENT, message_id=f"<{n}@x>"))
    assert log.unsealed == 2
    # a crash: no shutdown checkpoint; the next run chains on and counts from checkpoint 6
    reopened = AuditLog(
        path, TickingClock(), node="HOSP", sealer=sealer(*keys), sync=lambda fd: None
    )
    assert reopened.unsealed == 2
    result = verify(path, keys[1])
    assert result.returncode == 0, result.stderr
    assert "not yet sealed: 2 records after record 6" in result.stdout
    assert reopened.checkpoint("time")
    assert not reopened.checkpoint("time")  # nothing new to seal: nothing written
    reopened.close()
    assert json.loads(path.read_text().splitlines()[-1])["detail"]["previous_checkpoint"] == 6
    assert "not yet sealed" not in verify(path, keys[1]).stdout


def test_the_daemon_seals_its_trail_and_verify_reads_the_certificate_from_the_config(
    layout: DemoLayout, processes: Any, tmp_path: Path
) -> None:
    key, cert = openssl_audit_key(tmp_path)  # outside the demo's state and audit folders
    key.chmod(0o600)
    config = layout.lab.config_path
    config.write_text(
        config.read_text()
        + f'\n[audit]\nsigning_key = "{key}"\ncertificate = "{cert}"\n'
        + "checkpoint_every_records = 1000\ncheckpoint_every_seconds = 3600\n"
    )
    lab = processes.start(config)
    assert lab.stop() == 0
    records = read_audit(layout.lab.audit_log)
    assert records[-1]["event"] == "audit.checkpoint"
    assert records[-1]["detail"]["trigger"] == "shutdown"
    assert records[-2]["event"] == "daemon.stopped"
    ok = medgw("audit", "verify", "--config", config)
    assert ok.returncode == 0, ok.stderr
    assert "signatures valid" in ok.stdout and "not yet sealed" not in ok.stdout


def test_the_daemon_seals_on_its_timer_when_records_were_written(
    layout: DemoLayout, processes: Any, tmp_path: Path
) -> None:
    key, cert = openssl_audit_key(tmp_path)
    key.chmod(0o600)
    config = layout.lab.config_path
    config.write_text(
        config.read_text()
        + f'\n[audit]\nsigning_key = "{key}"\ncertificate = "{cert}"\n'
        + "checkpoint_every_seconds = 1\n"
    )
    processes.start(config)
    sealed = wait_until(
        lambda: [
            r
            for r in read_audit(layout.lab.audit_log)
            if r["event"] == "audit.checkpoint" and r["detail"]["trigger"] == "time"
        ],
        60,
        "a checkpoint made by the timer",
    )
    started = next(r for r in read_audit(layout.lab.audit_log) if r["event"] == "daemon.started")
    assert sealed[0]["detail"]["sealed_seq"] >= started["seq"]


@pytest.mark.parametrize(
    ("where", "expected"),
    [
        ("state", "is inside [storage] state_dir"),
        ("rsa", "audit checkpoints are signed with ECDSA P-256 or P-384"),
        ("unknown", "audit.checkpoint_every: unknown key"),
    ],
)
def test_check_config_refuses_an_audit_key_it_cannot_trust(
    layout: DemoLayout, tmp_path: Path, where: str, expected: str
) -> None:
    folder = layout.lab.config_path.parent / "state" if where == "state" else tmp_path
    folder.mkdir(exist_ok=True)
    key, cert = openssl_audit_key(folder)
    extra = ""
    if where == "rsa":
        self_signed(key, cert, "/CN=rsa audit")
    if where == "unknown":
        extra = "checkpoint_every = 5\n"
    key.chmod(0o600)
    config = layout.lab.config_path
    config.write_text(
        config.read_text() + f'\n[audit]\nsigning_key = "{key}"\ncertificate = "{cert}"\n{extra}'
    )
    result = medgw("check-config", "--config", config)
    assert result.returncode != 0
    assert expected in result.stdout + result.stderr


def test_a_trail_split_over_files_verifies_in_order_and_a_missing_file_is_named(
    tmp_path: Path, keys: tuple[Path, Path]
) -> None:
    lines = write_trail(tmp_path / "whole.jsonl", keys)
    parts = [tmp_path / f"audit-{n}.jsonl" for n in range(3)]
    for part, chunk in zip(parts, (lines[:6], lines[6:12], lines[12:]), strict=True):
        part.write_text("\n".join(chunk) + "\n")
    files = [arg for part in parts for arg in ("--file", str(part))]
    whole = medgw("audit", "verify", *files, "--certificate", keys[1])
    assert whole.returncode == 0, whole.stderr
    assert "15 records, hash chain intact" in whole.stdout
    assert f"last checkpoint: record 15 ({parts[2]}:3)" in whole.stdout

    gap = medgw("audit", "verify", "--file", parts[0], "--file", parts[2], "--certificate", keys[1])
    assert gap.returncode == 1
    assert f"{parts[2]}:1: record 13: chain broken: record 7 expected here" in gap.stderr

    recent = medgw(
        "audit", "verify", "--file", parts[1], "--file", parts[2], "--certificate", keys[1]
    )
    assert recent.returncode == 0, recent.stderr
    assert "starts at record 7: the files before it were not given" in recent.stdout
