"""Disposal of closed audit files (DSP-1): only closed, old, exported files, the oldest
first; a sealed record says what went, and ``audit verify`` over the rest passes and
says where the trail starts."""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography import x509

from gateway.audit import AuditEvent, AuditLog, EventType
from gateway.audit.files import trail_files
from gateway.audit.rotation import RotationSettings
from gateway.audit.seal import CheckpointKeys
from gateway.audit.verify import AuditChainError, files_removed, verify_trail
from gateway.config.retention import RetentionSettings
from gateway.demo_run import read_audit
from gateway.retention.audit_files import AuditFiles
from gateway.retention.purge import PurgeRefused, PurgeRequest, Retention, purge_request
from gateway.spool import SqliteSpool
from tests.audit_writer import StepClock, sealer
from tests.cli import medgw
from tests.helpers.audit import openssl_audit_key


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return openssl_audit_key(tmp_path_factory.mktemp("keys"))


def _days_of_records(log: AuditLog, clock: StepClock, days: int) -> None:
    """Three records a day for ``days`` days, a daily rotation closing each day's file."""
    for day in range(days):
        for n in range(3):
            log.emit(AuditEvent(EventType.MESSAGE_SENT, peer="lab", message_id=f"<{day}.{n}@h>"))
        clock.at += timedelta(days=1)


def test_old_closed_audit_files_go_sealed_and_the_rest_verifies(
    tmp_path: Path, keys: tuple[Path, Path]
) -> None:
    key, cert = keys
    current = tmp_path / "audit" / "audit.jsonl"
    clock = StepClock(datetime(2026, 3, 1, 12, 0, tzinfo=UTC))
    log = AuditLog(
        current,
        clock,
        node="HOSP",
        sealer=sealer(key, cert),
        rotation=RotationSettings(None, daily=True),
    )
    _days_of_records(log, clock, 6)
    files = trail_files(current)
    assert len(files) == 6  # five closed days and today's
    spool = SqliteSpool(tmp_path / "spool.sqlite3", clock)
    # The export has sent the first three days' files, and one record of the fourth.
    exported = [read_audit(files[2])[-1]["seq"] + 1]
    audit_files = AuditFiles(current, log.checkpoint, lambda: exported[0])
    retention = Retention(spool, log, clock, audit_files)

    # Older than 2 days: files 1-4 qualify; the export holds it at the first three.
    counts = retention.sweep(RetentionSettings(audit_days=2))
    assert counts == {"audit": 3}
    remaining = trail_files(current)
    # (The disposal record, written on a new day, itself closed yesterday's file.)
    assert remaining[: len(files) - 4] == files[3:-1] and current in remaining
    assert not any(f.exists() for f in files[:3])
    keys_ = CheckpointKeys([x509.load_pem_x509_certificate(cert.read_bytes())])
    log.checkpoint("test")
    report = verify_trail(remaining, keys_)
    assert report.first_seq > 1 and report.disposal_record is not None
    files_removed(current, report)  # disposed of by retention: not removed outside medgw
    [record] = [r for r in read_audit(current) if r["event"] == "retention.audit_disposed"]
    assert record["seq"] == report.disposal_record
    assert [f["file"] for f in record["detail"]["files"]] == [p.name for p in files[:3]]
    assert record["detail"]["trail_starts_at"] == report.first_seq
    assert record["actor"] == "medgw retention sweep"
    # Sealed before the files went: the checkpoint right after it.
    after = [r for r in read_audit(current) if r["seq"] == record["seq"] + 1]
    assert after[0]["event"] == "audit.checkpoint"

    # The operator: the current file never goes, whatever the date.
    exported[0] = 10**9
    with pytest.raises(PurgeRefused, match="no peer or service"):
        retention.purge(PurgeRequest(clock.now(), (), peer="lab", audit_files=True), "op")
    closed = len(trail_files(current)) - 1
    dry = retention.purge(PurgeRequest(clock.now(), (), audit_files=True, dry_run=True), "op")
    assert dry == {"audit": closed} and trail_files(current)[:-1] == remaining[:-1]
    counts = retention.purge(PurgeRequest(clock.now(), (), audit_files=True), "operator:x")
    assert counts == {"audit": closed}
    assert trail_files(current) == [current]
    log.close()
    report = verify_trail([current], keys_)
    assert report.disposal_record is not None and report.first_seq > 1
    shown = medgw("audit", "verify", "--file", current, "--certificate", cert)
    assert shown.returncode == 0, shown.stderr
    assert f"starts at record {report.first_seq}: the files before it were disposed of" in (
        shown.stdout
    )


def test_a_trail_cut_without_a_disposal_record_is_reported_as_not_given(
    tmp_path: Path,
) -> None:
    current = tmp_path / "audit.jsonl"
    clock = StepClock(datetime(2026, 3, 1, 12, 0, tzinfo=UTC))
    log = AuditLog(current, clock, node="HOSP", rotation=RotationSettings(None, daily=True))
    _days_of_records(log, clock, 3)
    log.close()
    files = trail_files(current)
    files[0].unlink()  # removed by hand, not by retention
    report = verify_trail(files[1:])
    assert report.first_seq == 4 and report.disposal_record is None
    with pytest.raises(AuditChainError, match="wrote a file beginning at record 1, and no "):
        files_removed(current, report)  # its notes say the writer began a file there


NOW = datetime(2031, 3, 1, 12, 0, tzinfo=UTC)


@pytest.mark.parametrize(
    ("audit_days", "kept"),
    [
        (None, "audit files are kept at least 1825 days (5 years"),
        (2000, "[retention] audit_days keeps audit files 2000 days"),
    ],
)
def test_an_operator_purge_takes_audit_files_only_named_and_old_enough(
    audit_days: int | None, kept: str
) -> None:
    days = audit_days or 1825
    everything = purge_request({"before": NOW.isoformat()}, NOW, audit_days)
    assert not everything.audit_files  # "everything finished before" leaves the trail
    with pytest.raises(
        PurgeRefused, match=re.escape(f"closed less than {days} days ago: {kept}")
    ) as refused:
        purge_request({"before": NOW.isoformat(), "kinds": ["audit"]}, NOW, audit_days)
    latest = (NOW - timedelta(days=days)).date().isoformat()
    assert f"give a --before of {latest} or earlier" in str(refused.value.fix)
    old = purge_request({"before": latest, "kinds": ["audit"]}, NOW, audit_days)
    assert old.audit_files and old.kinds == ()
