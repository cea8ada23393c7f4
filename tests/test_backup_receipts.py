"""Receipt files in a backup, on both backends: a receipt file retention removes between
the spool's copy and the copy of the files is no stale reference in the bundle (its
row is taken again, as retention left it); a receipt file removed before the backup,
or after the restore, is still reported altered; and medgw restore names the receipt
files of this node the bundle lacks, which will be reported altered (a node rebuilt
from another node's bundle, on PostgreSQL)."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import io
import json
import subprocess
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, cast

import pytest

from gateway.atrest.keys import KeyStore
from gateway.atrest.vault import Vault
from gateway.audit.log import AuditLog
from gateway.backup import bundle
from gateway.backup.bundle import BackupError, write_bundle
from gateway.backup.restore import MAX_LISTED
from gateway.clock import SystemClock
from gateway.cms.stream import sign_and_envelope_file
from gateway.config import GatewayConfig, load_config
from gateway.config.retention import RetentionSettings
from gateway.logs import make_logger
from gateway.outbound.context import Context
from gateway.outbound.status import MessageStatus
from gateway.pki.demo import DemoLayout
from gateway.retention.purge import PurgeRefused, PurgeRequest, Retention
from gateway.spool import Claimant, OutboundState, Settled, Spool, open_spool
from gateway.spool.postgres import PostgresSettings
from gateway.spool.records import RetainedKind, body_item
from tests.cli import medgw
from tests.helpers.audit import events
from tests.helpers.backup import add_backup, fresh_host, recipient
from tests.helpers.cluster import add_node
from tests.helpers.demo import hospital_receipt
from tests.helpers.intake import judged
from tests.helpers.postgres import PostgresServer

VICTIM = "<kept-receipt@KITA-LAB>"
MIC = "bWljIG9mIHRoZSBkb2N1bWVudCBzZW50IHRvIHRoZSBob3NwaXRhbA==, sha-256"
LATER = "9999-12-31T00:00:00+00:00"  # retention's cut-off: every finished message's receipt


@dataclass(frozen=True)
class Lab:
    """The lab with a [backup] section, its spool in SQLite or PostgreSQL (``postgres``),
    and the offline recipient's key and certificate."""

    config: Path
    postgres: PostgresSettings | None
    key: Path
    cert: Path
    fresh: PostgresSettings | None  # the database of the host a bundle is restored to

    def loaded(self) -> GatewayConfig:
        return load_config(self.config)


def _lab(layout: DemoLayout, tmp_path: Path, server: PostgresServer | None) -> Lab:
    """The lab, its spool in SQLite, or in a database of ``server`` as node lab-a."""
    key, cert = recipient(tmp_path / "offline")
    config, postgres, fresh = layout.lab.config_path, None, None
    if server is not None:
        postgres, fresh = server.new_database(), server.new_database()
        config = add_node(layout.lab, "lab-a", postgres)
    add_backup(config, cert)
    return Lab(config, postgres, key, cert, fresh)


@pytest.fixture(params=["sqlite", "postgresql"])
def lab(request: pytest.FixtureRequest, layout: DemoLayout, tmp_path: Path) -> Lab:
    server = request.getfixturevalue("postgres_server") if request.param == "postgresql" else None
    return _lab(layout, tmp_path, server)


def _spool(config: GatewayConfig, node: str | None = None) -> Spool:
    """The spool of ``config``, as its node (or ``node``) opens it."""
    return open_spool(
        config.storage.spool_path,
        SystemClock(),
        config.spool.postgres,
        Claimant(node or config.cluster.node_name),
    )


def _settled_in_file(layout: DemoLayout, config: GatewayConfig, node: str | None = None) -> Path:
    """VICTIM sent and settled by the lab (by its node ``node``, if given) with a receipt
    the hospital signed, kept as a file in the lab's receipts folder, its SHA-256
    recorded: that file."""
    built = hospital_receipt(layout, VICTIM, MIC)
    [content_type] = [v for name, v in built.headers if name.lower() == "content-type"]
    stored = f"Content-Type: {content_type}\r\n\r\n".encode() + built.body
    return _settled(config, VICTIM, "v", stored, node)


def _settled(
    config: GatewayConfig, message_id: str, stem: str, stored: bytes, node: str | None = None
) -> Path:
    """``message_id`` (its document ``<stem>.hl7``) sent and settled as delivered by the lab
    (by its node ``node``, if given), its receipt ``stored`` kept as a file in the lab's
    receipts folder, its SHA-256 recorded: that file."""
    path = config.storage.receipts_dir / f"{stem}.hl7.0123456789ab.mdn"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(stored)
    payload = config.storage.state_dir / "payloads" / stem
    source = config.storage.outbox_dir / "hospital" / f"{stem}.hl7"
    spool = _spool(config, node)
    try:
        spool.add_intake(message_id, "hospital", f"{stem}.hl7", "text/plain", source, payload)
        spool.mark_queued(message_id, None, [], MIC, 3, body=b"sealed")
        spool.mark_sending(message_id)
        _delivered(spool, message_id, path)
    finally:
        spool.close()
    return path


def _delivered(spool: Spool, message_id: str, path: Path) -> None:
    """``message_id``, being sent, settled as delivered in ``spool`` with the receipt kept
    in the file ``path``, its SHA-256 recorded."""
    sha256 = hashlib.sha256(path.read_bytes()).hexdigest()
    settled = Settled(message_id, OutboundState.DELIVERED, "processed", path, receipt_sha256=sha256)
    assert spool.mark_settled([settled]) == [message_id]


def _retention(config: GatewayConfig, path: Path) -> None:
    """Retention disposes of VICTIM's receipt as it does: its row cleared, then its file
    removed."""
    spool = _spool(config)
    try:
        batch = spool.disposable(RetainedKind.RECEIPTS, LATER)
        assert [item.message_id for item in spool.dispose(batch)] == [VICTIM]
    finally:
        spool.close()
    path.unlink()


def _during_the_copy(monkeypatch: pytest.MonkeyPatch, action: Callable[[], object]) -> list[bool]:
    """``action`` run once, right after the spool is copied (SQLite's online backup, or
    pg_dump's snapshot) and before the files it names are; a list that holds True once
    it ran."""
    real = bundle._spooled_files
    ran: list[bool] = []

    def then(db: Any) -> Iterator[bundle.Named]:
        if not ran:
            action()
            ran.append(True)
        return real(db)

    monkeypatch.setattr(bundle, "_spooled_files", then)
    return ran


def _backed_up(
    lab: Lab, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, action: Callable[[], None]
) -> Path:
    """The lab's bundle, ``action`` run between the copy of its spool and its files."""
    ran = _during_the_copy(monkeypatch, action)
    written = tmp_path / "lab.p7m"
    write_bundle(lab.loaded(), written, datetime.now(UTC))
    monkeypatch.undo()
    assert ran == [True]
    return written


def _host(lab: Lab, layout: DemoLayout, node: str | None = None) -> Path:
    """A fresh host to restore the lab's bundles onto (its own database; the cluster node
    ``node``, if given): its configuration."""
    host = fresh_host(layout, "lab-restored")
    if lab.postgres is not None:
        assert lab.fresh is not None
        text = host.read_text()
        assert f'dbname = "{lab.postgres.dbname}"' in text
        text = text.replace(f'dbname = "{lab.postgres.dbname}"', f'dbname = "{lab.fresh.dbname}"')
        if node is not None:
            assert 'node_name = "lab-a"' in text
            text = text.replace('node_name = "lab-a"', f'node_name = "{node}"')
        host.write_text(text)
    return host


def _restore(
    lab: Lab, host: Path, written: Path, *options: str
) -> subprocess.CompletedProcess[str]:
    """``written`` restored onto ``host`` by medgw restore (with ``options``), which ends well."""
    done = medgw(
        "restore", "--from", written, "--cert", lab.cert, "--key", lab.key, "--config", host,
        *options,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    return done


def _restored(lab: Lab, layout: DemoLayout, written: Path) -> GatewayConfig:
    """``written`` restored by medgw restore onto a fresh host (its own database): that
    host's configuration."""
    host = _host(lab, layout)
    _restore(lab, host, written)
    return load_config(host)


def _status(config: GatewayConfig, trail: Path, log: io.StringIO) -> dict[str, Any]:
    """VICTIM's status asked twice on the node of ``config`` (its audit trail ``trail``,
    its log ``log``), as its daemon answers it; the second answer."""
    spool = _spool(config)
    audit = AuditLog(trail, SystemClock(), node=config.cluster.node_name)
    try:
        settings = asyncio.run(judged(config, SystemClock()))
        context = Context(settings, spool, audit, make_logger(stream=log), SystemClock(), None)
        status = MessageStatus(context)
        views = [asyncio.run(status.status(VICTIM)) for _ in range(2)]
    finally:
        audit.close()
        spool.close()
    assert views[0] == views[1], views
    assert views[1] is not None
    return views[1]


def test_a_receipt_file_retention_removes_during_a_backup_is_not_named_by_the_bundle(
    lab: Lab, layout: DemoLayout, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Retention disposes of a delivered message's receipt (its row, then its file) after
    the spool was copied, before its files are: the bundle's row is taken again
    as retention left it, so the restored node shows the message without a receipt, as
    the live one does, and raises no alert."""
    config = lab.loaded()
    path = _settled_in_file(layout, config)
    written = _backed_up(lab, tmp_path, monkeypatch, lambda: _retention(config, path))
    restored = _restored(lab, layout, written)
    trail, log = tmp_path / "restored-audit.jsonl", io.StringIO()
    view = _status(restored, trail, log)
    assert view["state"] == "delivered", view
    assert view["receipt"] is None and view["receipt_kept"] is None, view
    assert events(trail, "atrest.integrity_failed") == []
    assert "receipt.stored_altered" not in log.getvalue()


def test_a_receipt_file_removed_after_a_restore_is_reported_altered(
    lab: Lab, layout: DemoLayout, tmp_path: Path
) -> None:
    """A receipt file the bundle holds is restored with its row; removed from the restored
    node's state folder afterwards, it is reported altered, with its alert, as on any
    node."""
    config = lab.loaded()
    _settled_in_file(layout, config)
    written = tmp_path / "lab.p7m"
    write_bundle(config, written, datetime.now(UTC))
    restored = _restored(lab, layout, written)
    trail, log = tmp_path / "restored-audit.jsonl", io.StringIO()
    view = _status(restored, trail, log)
    assert view["receipt"]["verified"] is True, view
    (restored.storage.receipts_dir / "v.hl7.0123456789ab.mdn").unlink()
    view = _status(restored, trail, log)
    assert view["receipt"]["altered"] is True and "was removed" in view["receipt"]["error"], view
    assert view["disposition"] is None, view
    [alert] = events(trail, "atrest.integrity_failed")
    assert alert["message_id"] == VICTIM, alert


def test_a_receipt_settled_again_during_a_backup_is_in_the_bundle(
    lab: Lab, layout: DemoLayout, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Both backends: a message retried and settled again, with a new receipt file, after
    the spool was copied and before its files are: the row is taken again from the live
    spool, and the bundle holds the new receipt file it names, so the restored node
    verifies the receipt and raises no alert."""
    config = lab.loaded()
    first = _settled_in_file(layout, config)

    def settled_again() -> None:
        spool = _spool(config)
        try:  # as a retry does: the row cleared, its receipt file removed; then settled
            cast(Any, spool)._write(  # the same on both backends' SQL stores
                "UPDATE outbound SET state='sending', receipt_path=NULL, receipt=NULL,"
                " receipt_sha256=NULL WHERE message_id=?",
                (VICTIM,),
            )
            first.unlink()
            second = config.storage.receipts_dir / "v.hl7.ba9876543210.mdn"
            second.write_bytes(first_bytes)
            _delivered(spool, VICTIM, second)
        finally:
            spool.close()

    first_bytes = first.read_bytes()
    written = _backed_up(lab, tmp_path, monkeypatch, settled_again)
    restored = _restored(lab, layout, written)
    trail = tmp_path / "restored-audit.jsonl"
    view = _status(restored, trail, io.StringIO())
    assert view["receipt"] is not None and view["receipt"].get("verified") is True, view
    assert events(trail, "atrest.integrity_failed") == []


@contextlib.contextmanager
def _retention_with_keys(config: GatewayConfig, tmp_path: Path) -> Iterator[Retention]:
    """The lab's retention with its vault, as the daemon has them (encryption at rest on):
    a first key-encryption key, and another message's body key wrapped under it (no
    row of it is taken again by a backup)."""
    assert config.at_rest is not None
    spool = _spool(config)
    clock = SystemClock()
    audit = AuditLog(tmp_path / "purge-audit.jsonl", clock, node=config.cluster.node_name)
    try:
        vault = Vault(KeyStore(config.at_rest.key_dir), spool)
        vault.open()
        with vault.storing(body_item("<queued@KITA-LAB>")) as sealing:
            sealing.seal(b"the body")
            assert sealing.key is not None
            spool.put_data_key(sealing.key)
        yield Retention(spool, audit, clock, None, vault)
    finally:
        audit.close()
        spool.close()


def _settled_with_keys(lab: Lab, layout: DemoLayout) -> tuple[GatewayConfig, Path, Path]:
    """The lab's configuration (encryption at rest on) with VICTIM settled, its receipt
    kept in a file (as :func:`_settled_in_file`): the configuration, that file, and the
    key folder (``[at_rest] key_dir``)."""
    config = lab.loaded()
    assert config.at_rest is not None
    return config, _settled_in_file(layout, config), config.at_rest.key_dir


def _receipts_now() -> PurgeRequest:
    return PurgeRequest(before=datetime.now(UTC), kinds=(RetainedKind.RECEIPTS,))


def test_a_purge_that_rotates_the_key_during_a_backup_fails_the_backup(
    lab: Lab, layout: DemoLayout, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Both backends, encryption at rest on: a real purge (of another process: another
    node of the cluster) disposes of a receipt after the
    spool was copied and before its files are, and rotates the key-encryption key,
    destroying the one the copy's data keys are wrapped under.  Such a bundle could never
    be restored, so the backup fails, naming the key and saying to run it again, and
    writes nothing."""
    config, path, key_dir = _settled_with_keys(lab, layout)
    written = tmp_path / "lab.p7m"
    with _retention_with_keys(config, tmp_path) as retention:
        ran = _during_the_copy(monkeypatch, lambda: retention.purge(_receipts_now(), "admin"))
        with pytest.raises(BackupError) as refused:
            write_bundle(config, written, datetime.now(UTC))
        assert ran == [True]
    assert not path.exists()  # the purge did dispose of the receipt
    assert "kek-1" in refused.value.message and "nothing was written" in refused.value.message
    assert refused.value.fix is not None and "medgw backup again" in refused.value.fix
    assert not written.exists()
    assert KeyStore(key_dir).versions() == [2]


def test_the_daemons_purge_and_sweep_do_not_run_while_its_backup_collects(
    lab: Lab, layout: DemoLayout, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Both backends: while the daemon's backup collects, an operator's purge is refused
    (saying why and to run it again) and a retention sweep does nothing, so the key the
    bundle needs is still in the key folder when the backup ends; both run as usual once
    it has ended."""
    config, path, key_dir = _settled_with_keys(lab, layout)
    written = tmp_path / "lab.p7m"
    refusals: list[PurgeRefused] = []
    swept: list[dict[str, int]] = []
    every_day = RetentionSettings(days={RetainedKind.RECEIPTS: 0})
    with _retention_with_keys(config, tmp_path) as retention:
        vault = cast(Any, retention)._vault

        def during() -> None:
            try:
                retention.purge(_receipts_now(), "admin")
            except PurgeRefused as exc:
                refusals.append(exc)
            swept.append(retention.sweep(every_day))

        ran = _during_the_copy(monkeypatch, during)
        write_bundle(config, written, datetime.now(UTC), vault)
        assert ran == [True]
        [refused] = refusals
        assert "medgw backup is collecting" in refused.message, refused.message
        assert refused.fix == "run medgw purge again once medgw backup has finished"
        assert swept == [{}] and path.exists()
        assert KeyStore(key_dir).versions() == [1]
        assert retention.sweep(every_day) == {"receipts": 1}  # the backup has ended
    assert not path.exists()
    assert KeyStore(key_dir).versions() == [2]


def test_a_receipt_file_removed_before_a_backup_is_still_reported_altered_after_its_restore(
    lab: Lab, layout: DemoLayout, tmp_path: Path
) -> None:
    """A delivered message's receipt file is removed outside medgw, its row still naming
    it: the live node reports it altered.  A backup taken then lacks the file, and the
    node restored from it reports the receipt altered too, with its alert: a restore
    turns no removal into a receipt "not in the backup", whose disposition would be
    shown as if nothing had happened."""
    config = lab.loaded()
    _settled_in_file(layout, config).unlink()
    live_trail = tmp_path / "live-audit.jsonl"
    view = _status(config, live_trail, io.StringIO())
    assert view["receipt"].get("altered") is True, view
    [alert] = events(live_trail, "atrest.integrity_failed")
    assert alert["message_id"] == VICTIM, alert
    written = tmp_path / "lab.p7m"
    write_bundle(config, written, datetime.now(UTC))
    restored = _restored(lab, layout, written)
    trail, log = tmp_path / "restored-audit.jsonl", io.StringIO()
    view = _status(restored, trail, log)
    receipt = view["receipt"]
    assert receipt.get("altered") is True and "was removed" in receipt["error"], view
    assert view["disposition"] is None, view
    [alert] = events(trail, "atrest.integrity_failed")
    assert alert["message_id"] == VICTIM, alert
    assert "receipt.stored_altered" in log.getvalue()


def test_a_restore_names_the_receipt_files_it_lacks_that_will_be_reported_altered(
    lab: Lab, layout: DemoLayout, tmp_path: Path
) -> None:
    """More receipt files than a restore names one by one are removed from the lab's
    state folder, their rows still naming them, before a backup: medgw restore counts
    them all, names the first MAX_LISTED (by Message-ID, as files of this host) in its
    output and its backup.restored record, and says that they will be reported
    altered and what to do.  A file the bundle holds is not named; nor, at a restore
    again, is a file put back where the restored spool names it."""
    config = lab.loaded()
    kept = _settled_in_file(layout, config)
    gone = {
        f"<gone-{n:03}@KITA-LAB>": _settled(config, f"<gone-{n:03}@KITA-LAB>", f"g{n}", b"r%d" % n)
        for n in range(MAX_LISTED + 1)
    }
    contents = {message_id: path.read_bytes() for message_id, path in gone.items()}
    for path in gone.values():
        path.unlink()
    written = tmp_path / "lab.p7m"
    write_bundle(config, written, datetime.now(UTC))
    host = _host(lab, layout)
    text = _restore(lab, host, written).stdout
    restored = load_config(host)
    receipts = restored.storage.receipts_dir
    expected = [
        {"message_id": message_id, "file": str(receipts / path.name)}
        for message_id, path in sorted(gone.items())
    ]
    assert f"WARNING: {MAX_LISTED + 1} receipt file(s)" in text, text
    assert "will report its receipt altered" in text and "Fix: copy each file" in text, text
    assert all(f"  {f['message_id']}  {f['file']}\n" in text for f in expected[:MAX_LISTED])
    assert expected[-1]["file"] not in text and str(receipts / kept.name) not in text, text
    assert text.endswith(
        f"\n  ... and 1 more, not named: only the first {MAX_LISTED} are, here"
        " and in the backup.restored audit record\n"
    ), text
    [record] = events(restored.storage.audit_log, "backup.restored")
    said = record["detail"]["receipt_files_not_in_bundle"]
    assert said["count"] == MAX_LISTED + 1 and said["first"] == expected[:MAX_LISTED], said
    assert "will report its receipt altered" in said["warning"], said
    assert str(receipts) in said["fix"] and "record that decision" in said["fix"], said
    first = expected[0]
    Path(first["file"]).write_bytes(contents[first["message_id"]])  # taken from where it is
    said = json.loads(_restore(lab, host, written, "--force", "--json").stdout)
    said = said["receipt_files_not_in_bundle"]
    assert said["count"] == MAX_LISTED and said["first"] == expected[1:], said
    *_, record = events(restored.storage.audit_log, "backup.restored")  # (the bundle has no trail)
    assert record["detail"]["receipt_files_not_in_bundle"] == said, record


def test_a_node_rebuilt_from_another_nodes_bundle_names_its_own_receipt_files_it_lacks(
    layout: DemoLayout, tmp_path: Path, postgres_server: PostgresServer
) -> None:
    """Nodes share a PostgreSQL spool, each with the same state folder path on its own
    machine: lab-b and lab-c settle a message each with a receipt file in their own
    state folders, which lab-a's backup cannot copy.  lab-b rebuilt from lab-a's bundle
    under its own name: medgw restore names lab-b's receipt file, which its status will
    report altered (and does), not lab-c's, which lab-c keeps."""
    lab = _lab(layout, tmp_path, postgres_server)
    config = lab.loaded()
    _settled_in_file(layout, config, "lab-b").unlink()  # on lab-b's machine, not on lab-a's
    other = _settled(config, "<other@KITA-LAB>", "o", b"kept by lab-c", "lab-c")
    other.unlink()  # on lab-c's machine
    written = tmp_path / "lab-a.p7m"
    write_bundle(config, written, datetime.now(UTC))
    host = _host(lab, layout, "lab-b")
    text = _restore(lab, host, written).stdout
    rebuilt = load_config(host)
    assert rebuilt.cluster.node_name == "lab-b"
    receipts = rebuilt.storage.receipts_dir
    assert "WARNING: 1 receipt file(s)" in text, text
    assert f"  {VICTIM}  {receipts / 'v.hl7.0123456789ab.mdn'}" in text, text
    assert "<other@KITA-LAB>" not in text and other.name not in text, text
    [record] = events(rebuilt.storage.audit_log, "backup.restored")
    said = record["detail"]["receipt_files_not_in_bundle"]
    assert said["count"] == 1 and [f["message_id"] for f in said["first"]] == [VICTIM], said
    trail = tmp_path / "rebuilt-audit.jsonl"
    view = _status(rebuilt, trail, io.StringIO())
    assert view["receipt"].get("altered") is True, view
    [alert] = events(trail, "atrest.integrity_failed")
    assert alert["message_id"] == VICTIM, alert


def test_a_rotation_under_way_on_another_node_fails_the_backup(
    lab: Lab, layout: DemoLayout, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Both backends: another node's purge (no hold of this daemon's: its own process) has
    made the new key-encryption key and re-wrapped every data key, and has not yet
    destroyed the old key (its spool's shred, a long VACUUM, is under way) when the backup
    checks its keys.  The key the bundle needs is still there, but goes as the rotation
    ends: the backup fails and says to run it again."""
    config, _, key_dir = _settled_with_keys(lab, layout)
    written = tmp_path / "lab.p7m"
    with _retention_with_keys(config, tmp_path) as retention:
        spool = cast(Any, retention)._spool
        in_shred, release = threading.Event(), threading.Event()
        real_shred = spool.shred

        def held_shred() -> bool:  # the rotation paused between its commit and the destroy
            in_shred.set()
            if not release.wait(60):
                raise AssertionError("the backup never let the rotation go on")
            return bool(real_shred())

        monkeypatch.setattr(spool, "shred", held_shred)
        other = threading.Thread(target=retention.purge, args=(_receipts_now(), "other node"))

        def start_other() -> None:
            other.start()
            assert in_shred.wait(60)

        ran = _during_the_copy(monkeypatch, start_other)
        try:
            with pytest.raises(BackupError) as refused:
                write_bundle(config, written, datetime.now(UTC))
        finally:
            release.set()
            other.join(60)
        assert not other.is_alive(), "the other node's purge did not end"
        assert ran == [True]
    assert "kek-1" in refused.value.message and "holds kek-1, kek-2" in refused.value.message
    assert refused.value.fix is not None and "medgw backup again" in refused.value.fix
    assert not written.exists()
    assert KeyStore(key_dir).versions() == [2]


def test_a_key_folder_with_no_key_fails_the_backup_naming_it(
    lab: Lab, layout: DemoLayout, tmp_path: Path
) -> None:
    """Both backends: the spool keeps items encrypted at rest, and the key folder holds
    no key (not put back after a move): the backup says that, not that a purge ran."""
    config, _, key_dir = _settled_with_keys(lab, layout)
    with _retention_with_keys(config, tmp_path):
        pass
    for key in key_dir.iterdir():
        key.unlink()
    with pytest.raises(BackupError) as refused:
        write_bundle(config, tmp_path / "lab.p7m", datetime.now(UTC))
    assert "holds no key-encryption key" in refused.value.message, refused.value.message
    assert "rotation" not in refused.value.message
    assert refused.value.fix is not None and str(key_dir) in refused.value.fix


def test_an_old_key_a_killed_rotation_left_beside_the_newest_fails_no_backup(
    lab: Lab, layout: DemoLayout, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Both backends: a rotation re-wrapped every data key under kek-2 and died before it
    destroyed kek-1 (here: its destroy fails).  The bundle needs kek-2 alone, which no
    rotation under way destroys: the backup is written, and names kek-2."""
    config, _, key_dir = _settled_with_keys(lab, layout)
    written = tmp_path / "lab.p7m"
    with _retention_with_keys(config, tmp_path) as retention:
        vault = cast(Any, retention)._vault

        def killed(version: int) -> None:
            raise OSError(f"killed before kek-{version} was destroyed")

        monkeypatch.setattr(vault._store, "destroy", killed)
        with pytest.raises(OSError, match="killed before kek-1"):
            vault.rotate()
    assert KeyStore(key_dir).versions() == [1, 2]
    done = write_bundle(config, written, datetime.now(UTC))
    assert done.key_versions == (2,) and written.exists()


def test_a_rotation_while_the_bundle_is_sealed_fails_it_and_keeps_the_earlier_file(
    lab: Lab, layout: DemoLayout, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Both backends: another node's purge rotates the key after the backup has collected
    and checked its keys, while the bundle is being signed and encrypted.  The bundle's
    keys are checked again before it takes its name: the backup fails, and the file of
    that name from an earlier backup is still there, as it was."""
    config, _, _ = _settled_with_keys(lab, layout)
    written = tmp_path / "lab.p7m"
    written.write_bytes(b"the bundle of an earlier night")
    with _retention_with_keys(config, tmp_path) as retention:
        real = sign_and_envelope_file

        def seal_as_another_node_purges(*args: Any, **kwargs: Any) -> Any:
            retention.purge(_receipts_now(), "other node")
            return real(*args, **kwargs)

        monkeypatch.setattr(bundle, "sign_and_envelope_file", seal_as_another_node_purges)
        with pytest.raises(BackupError) as refused:
            write_bundle(config, written, datetime.now(UTC))
    assert "holds kek-2" in refused.value.message, refused.value.message
    assert written.read_bytes() == b"the bundle of an earlier night"
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".lab.p7m")] == []
