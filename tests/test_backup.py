"""Backups safe to carry out (OUT-1): a bundle written while a daemon sends, opened by
real ``openssl cms``, restored onto a fresh host whose daemon sends what was queued,
each document arriving exactly once."""

from __future__ import annotations

import base64
import hashlib
import json
import shutil
import threading
import tracemalloc
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from gateway.atrest import KeyStore, Vault
from gateway.atrest.chunked import seal_bytes
from gateway.audit import AuditEvent, AuditLog, EventType
from gateway.audit.files import trail_files
from gateway.audit.order import order_path, ordered, read_notes
from gateway.audit.rotation import RotationSettings
from gateway.backup import bundle
from gateway.backup.bundle import ENTITY_HEAD, WORK_PREFIX, _complete_records
from gateway.backup.restore import WORK as RESTORE_WORK
from gateway.clock import SystemClock
from gateway.config import load_config
from gateway.config.storage import SPOOL_FILE
from gateway.demo_run import drop_file, read_audit, wait_until
from gateway.outbound.status import MAX_SEALED_RECEIPT
from gateway.pki.demo import DemoLayout
from gateway.spool import OutboundState, Settled, SqliteSpool
from gateway.spool.records import receipt_item
from tests.cli import medgw
from tests.clocks import SetClock
from tests.helpers.audit import events, wait_for_events
from tests.helpers.backup import (
    add_backup,
    backup_signer,
    bundle_content,
    fresh_host,
    openssl_opens,
    owed_handover_backup,
    recipient,
    sealed_bundle,
)
from tests.helpers.spooldisk import damage


def test_backup_under_load_restores_onto_a_fresh_host_and_sends_each_document_once(
    layout: DemoLayout, processes: Any, tmp_path: Path
) -> None:
    key, cert = recipient(tmp_path / "offline")
    add_backup(layout.lab.config_path, cert)
    hospital = processes.start(layout.hospital.config_path)
    lab = processes.start(layout.lab.config_path)
    outbox = layout.lab.outbox_for("hospital")
    total = 40

    def drop(numbers: range) -> None:
        for n in numbers:
            drop_file(outbox, f"doc-{n:03}.hl7", f"MSH|document {n}\r".encode())

    drop(range(5))
    wait_for_events(layout.hospital.audit_log, "message.delivered", count=3)
    hospital.stop()  # the peer goes away: the lab queues and retries
    dropping = threading.Thread(target=drop, args=(range(5, total),))
    dropping.start()
    bundle = tmp_path / "carried-out" / "medgw.p7m"
    bundle.parent.mkdir()
    made = medgw("backup", "--to", bundle, "--json", "--config", lab.config)  # under way
    assert made.returncode == 0, made.stderr
    written = json.loads(made.stdout)
    dropping.join()
    before = len(read_audit(layout.hospital.audit_log))
    hospital = processes.start(layout.hospital.config_path)
    # The lab sends on after the backup; the restored host will send those again.
    wait_for_events(
        layout.hospital.audit_log,
        "message.delivered",
        where=lambda r: r["seq"] > before,
    )
    lab.kill()  # the host is lost
    [created] = wait_for_events(layout.lab.audit_log, "backup.created")
    assert "(uid " in created["actor"] and created["detail"]["file"] == str(bundle)

    # The bundle is unreadable without the recipient's key, and openssl opens it.
    assert b"MSH|document" not in bundle.read_bytes()
    # Signed by the backup signing certificate (self-signed: its own trust anchor).
    _, signer = backup_signer(layout.lab.config_path)
    manifest = openssl_opens(bundle, key, cert, signer, tmp_path)
    assert manifest["as2_id"] == "KITA-LAB"
    assert written["outbound_messages"] == manifest["outbound_messages"] > 0
    # What a restore needs from the key folder (no purge ran: the first key only)
    assert manifest["key_versions"] == [1]
    assert written["key_encryption_keys"] == created["detail"]["key_encryption_keys"] == ["kek-1"]
    assert {"config/gateway.toml", "state/spool.sqlite3"} <= set(manifest["files"])
    assert any(name.startswith("audit/") for name in manifest["files"])

    config = fresh_host(layout, "lab-restored")
    refused = medgw(
        "restore",
        "--from",
        bundle,
        "--cert",
        cert,
        "--key",
        layout.lab.root / "certs" / "sign.key",
        "--config",
        config,
    )
    assert refused.returncode == 1 and "cannot be opened" in refused.stderr
    done = medgw("restore", "--from", bundle, "--cert", cert, "--key", key, "--config", config)
    assert done.returncode == 0, done.stderr
    again = medgw("restore", "--from", bundle, "--cert", cert, "--key", key, "--config", config)
    assert again.returncode == 1 and "is not empty" in again.stderr and "--force" in again.stderr
    verify = medgw("audit", "verify", "--config", config)
    assert verify.returncode == 0, verify.stderr

    waiting = json.loads(medgw("queue", "list", "--json", "--config", config).stdout)
    assert len(waiting) == manifest["outbound_messages"]
    assert any(r["state"] != "delivered" for r in waiting), "nothing was left to send"

    restored = processes.start(config)
    audit = config.parent / "audit" / "audit.jsonl"
    [event] = wait_for_events(audit, "backup.restored")
    assert event["detail"]["files"] == len(manifest["files"])

    def settled() -> list[dict[str, Any]] | None:
        listed = medgw("queue", "list", "--json", "--config", restored.config)
        records = json.loads(listed.stdout) if listed.returncode == 0 else []
        return records if records and all(r["state"] == "delivered" for r in records) else None

    records = wait_until(settled, 180, "every restored message delivered")
    assert len(records) == manifest["outbound_messages"]
    # Exactly once at the receiver: each document in its inbox once, delivered once.
    delivered = [
        r["message_id"]
        for r in read_audit(layout.hospital.audit_log)
        if r["event"] == "message.delivered"
    ]
    assert len(delivered) == len(set(delivered))
    # Those the lost host sent after the backup came again, and were answered, not delivered.
    assert wait_for_events(layout.hospital.audit_log, "message.duplicate")
    assert {r["message_id"] for r in records} <= set(delivered)
    inbox = sorted(p.name for p in (layout.hospital.inbox_dir / "lab").iterdir())
    assert inbox == sorted(set(inbox)) and len(inbox) == len(delivered)
    for name in inbox:
        number = int(name.removeprefix("doc-").removesuffix(".hl7"))
        text = (layout.hospital.inbox_dir / "lab" / name).read_bytes()
        assert text == f"MSH|document {number}\r".encode()


def test_backup_without_a_recipient_is_refused(layout: DemoLayout, tmp_path: Path) -> None:
    """Refused, and audited: which bundle, why (the error the command said), who."""
    target = tmp_path / "b.p7m"
    made = medgw("backup", "--to", target, "--config", layout.lab.config_path)
    assert made.returncode == 1
    assert "no [backup] section" in made.stderr and "recipient" in made.stderr
    assert "NOT recorded" not in made.stderr, made.stderr
    [refused] = events(layout.lab.audit_log, "backup.refused")
    assert refused["outcome"] == "failure" and refused["severity"] == "warning"
    assert refused["detail"]["file"] == str(target)
    assert refused["reason"].startswith("no [backup] section"), refused
    assert "README, Backups" in refused["detail"]["fix"]
    assert "(uid " in refused["actor"]


def test_a_backup_from_a_daemon_that_has_not_loaded_backup_says_to_reload(
    layout: DemoLayout, processes: Any, tmp_path: Path
) -> None:
    """[backup] added to gateway.toml while the daemon runs: the daemon writes the backup
    with the configuration it runs, so the refusal names that one and the reload."""
    lab = processes.start(layout.lab.config_path)
    _, cert = recipient(tmp_path / "offline")
    add_backup(layout.lab.config_path, cert)
    bundle = tmp_path / "carried-out" / "medgw.p7m"
    bundle.parent.mkdir()
    made = medgw("backup", "--to", bundle, "--config", lab.config)
    assert made.returncode == 1
    assert "the running daemon's configuration has no [backup] section" in made.stderr
    assert "run medgw reload" in made.stderr, made.stderr
    assert not bundle.exists()
    # Recorded by the daemon, the trail's one writer, before it answered.
    [refused] = events(layout.lab.audit_log, "backup.refused")
    assert refused["detail"]["file"] == str(bundle) and "(uid " in refused["actor"]
    assert refused["reason"].startswith("the running daemon's configuration has no [backup]")
    reloaded = medgw("reload", "--config", lab.config)
    assert reloaded.returncode == 0, reloaded.stderr
    made = medgw("backup", "--to", bundle, "--config", lab.config)
    assert made.returncode == 0, made.stderr
    assert bundle.exists()


@pytest.mark.parametrize(
    ("bad", "says"),
    [
        ('recipient = "nope.crt"', "backup.recipient: file"),
        ('cipher = "des-ede3-cbc"', "backup.cipher"),
        # Backups have a signing key of their own: none is an error, the AS2 or TLS key too.
        ("", "backup.signing_key: no key to sign backups with"),
        (
            'signing_certificate = "certs/sign.crt"\nsigning_key = "certs/sign.key"',
            "is also smime.signing_key",
        ),
        ('signing_certificate = "certs/tls.crt"\nsigning_key = "certs/tls.key"', "is also tls.key"),
        ('signing_certificate = "certs/tls.crt"\nsigning_key = "{key}"', "not the private key"),
    ],
)
def test_backup_configuration_is_checked(
    layout: DemoLayout, tmp_path: Path, bad: str, says: str
) -> None:
    _, cert = recipient(tmp_path)
    config = layout.lab.config_path
    key, signing = backup_signer(config)
    base = f'recipient = "{cert}"\n' if "recipient" not in bad else ""
    if bad.startswith("recipient") or bad.startswith("cipher"):
        base += f'signing_certificate = "{signing}"\nsigning_key = "{key}"\n'
    config.write_text(config.read_text() + f"\n[backup]\n{base}{bad.format(key=key)}\n")
    check = medgw("check-config", "--config", config)
    assert check.returncode == 1
    assert says in check.stdout + check.stderr, check.stdout + check.stderr


def test_a_backup_signing_key_of_its_own_passes_check_config(
    layout: DemoLayout, tmp_path: Path
) -> None:
    _, cert = recipient(tmp_path)
    add_backup(layout.lab.config_path, cert)
    check = medgw("check-config", "--config", layout.lab.config_path)
    assert check.returncode == 0, check.stdout + check.stderr


def test_restore_checks_every_file_and_never_replaces_an_inbox_document_by_accident(
    layout: DemoLayout, tmp_path: Path
) -> None:
    """A hand-over still owed travels with its inbox document; on the new host a document
    of the same name is not replaced without --force, and a damaged bundle is refused."""
    bundle, key, cert = owed_handover_backup(layout, tmp_path)
    hospital = layout.hospital

    root = hospital.root.with_name("hospital-restored")
    shutil.copytree(
        hospital.root, root, ignore=shutil.ignore_patterns("state", "audit", "inbox", "outbox")
    )
    new = root / "gateway.toml"
    damaged = tmp_path / "damaged.p7m"
    data = bytearray(bundle.read_bytes())
    data[len(data) // 2] ^= 0x01
    damaged.write_bytes(bytes(data))
    refused = medgw("restore", "--from", damaged, "--cert", cert, "--key", key, "--config", new)
    assert refused.returncode == 1 and "cannot be opened" in refused.stderr
    assert not (root / "state" / "spool.sqlite3").exists()

    other = root / "inbox" / "lab" / "result.hl7"
    other.parent.mkdir(parents=True)
    other.write_bytes(b"MSH|another document\r")
    kept = medgw("restore", "--from", bundle, "--cert", cert, "--key", key, "--config", new)
    assert kept.returncode == 1 and str(other) in kept.stderr and "--force" in kept.stderr
    assert other.read_bytes() == b"MSH|another document\r"
    assert not (root / "state" / "spool.sqlite3").exists()
    forced = medgw(
        "restore", "--from", bundle, "--cert", cert, "--key", key, "--force", "--config", new
    )
    assert forced.returncode == 0, forced.stderr
    assert other.read_bytes() == b"MSH|owed to the internal system\r"
    restored = SqliteSpool(root / "state" / "spool.sqlite3", SystemClock())
    [owed] = restored.handover_list()
    assert owed.path == other and owed.state.value == "pending"  # the new host's inbox
    assert (root / "state" / "restored-config" / "gateway.toml").exists()


@pytest.mark.parametrize(
    ("listed", "member"),
    [
        # an absolute name after the folder: restore would write it where it says
        ("state//{outside}/planted", "state/{outside}/planted"),
        # a ``..`` part: one folder deeper in the bundle than on the host, so it leaves
        ("state/x/../../planted", "planted"),
    ],
)
def test_restore_refuses_a_manifest_name_that_leaves_its_folder(
    layout: DemoLayout, tmp_path: Path, listed: str, member: str
) -> None:
    """Every name the manifest lists stays in its folder: one with an absolute or a ``..``
    part is refused before anything is written, even in a bundle whose signature is good
    (restore may run as root: such a name would write anywhere)."""
    key, cert = recipient(tmp_path / "offline")
    outside = tmp_path / "outside"
    outside.mkdir()
    config = fresh_host(layout, "restored")
    add_backup(config, cert)
    where = str(outside).lstrip("/")
    listed, member = listed.format(outside=where), member.format(outside=where)
    data = b"planted by the bundle\n"
    manifest = {
        "format": 1,
        "as2_id": "lab",
        "state_dir": "/nowhere/state",
        "inbox_dir": "/nowhere/inbox",
        "audit_log": "audit.jsonl",
        "outbound_messages": 0,
        "files": {listed: hashlib.sha256(data).hexdigest()},
    }
    bundle = tmp_path / "crafted.p7m"
    sealed_bundle(bundle_content({"state/x/kept": b"", member: data}, manifest), bundle, config)
    refused = medgw("restore", "--from", bundle, "--cert", cert, "--key", key, "--config", config)
    assert refused.returncode == 1, refused.stdout
    named = "manifest names" in refused.stderr and listed in refused.stderr
    assert named or f"archive holds {member!r}" in refused.stderr, refused.stderr
    assert "nothing was restored" in refused.stderr
    assert not (outside / "planted").exists()
    assert not (config.parent / "planted").exists()
    assert not list(config.parent.glob("state/**/planted"))


@pytest.mark.parametrize(
    "where", ["state/spool.sqlite3", "audit/audit.jsonl", "gateway.toml", "../keys/kek-1"]
)
def test_backup_never_replaces_a_file_of_the_gateway(
    layout: DemoLayout, tmp_path: Path, where: str
) -> None:
    """A bundle written over the spool, the audit trail, the configuration or a
    key-encryption key would lose them (the rename replaces the file; without its key,
    nothing kept encrypted at rest can be read): such a --to is refused, the file kept."""
    _, cert = recipient(tmp_path / "offline")
    hospital = layout.hospital
    add_backup(hospital.config_path, cert)
    # The key folder apart from the configuration's, as /var/lib/medgw-keys is.
    key_dir = (hospital.root / "../keys").resolve()
    with hospital.config_path.open("a") as toml:
        toml.write(f'\n[at_rest]\nkey_dir = "{key_dir}"\n')
    config = load_config(hospital.config_path)
    SqliteSpool(config.storage.spool_path, SystemClock()).close()
    target = (hospital.root / where).resolve()
    if not target.exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(b'{"kept": true}\n')
    before = target.read_bytes()
    made = medgw("backup", "--to", target, "--config", hospital.config_path)
    assert made.returncode == 1, made.stdout
    assert str(target) in made.stderr and "--to" in made.stderr, made.stderr
    trail = read_audit(hospital.audit_log)  # {"kept": true} too, where it is the trail
    [refused] = [r for r in trail if r.get("event") == "backup.refused"]
    assert refused["detail"]["file"] == str(target) and "--to" in refused["reason"]
    if target == hospital.audit_log.resolve():  # kept, with the refusal's record after
        assert target.read_bytes().startswith(before)
    else:
        assert target.read_bytes() == before


def test_the_current_audit_file_is_cut_at_its_last_whole_record_without_reading_it_whole(
    tmp_path: Path,
) -> None:
    """The record the running daemon is writing is left out of the copy; finding where it
    starts reads the file's end, not the whole file (a trail file may be larger than memory)."""
    trail = tmp_path / "audit.jsonl"
    with trail.open("wb") as handle:
        handle.truncate(256 << 20)  # sparse: costs no disk
        handle.seek(0, 2)
        handle.write(b'{"seq": 1}\n{"seq": 2, "half written')
    tracemalloc.start()
    try:
        upto = _complete_records(trail)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert upto == (256 << 20) + len(b'{"seq": 1}\n')
    assert peak < 1 << 20
    trail.write_bytes(b'{"seq": 1, "half written')
    assert _complete_records(trail) == 0
    trail.write_bytes(b"")
    assert _complete_records(trail) == 0


def _leftovers_of_a_killed_backup(state: Path, secret: bytes) -> list[Path]:
    """What ``medgw backup`` leaves in the state folder when it is killed after collecting
    (its work folder with an inbox document, the archive and the entity), as it names them."""
    work = state / f"{WORK_PREFIX}4242-20260101T000000000000"
    (work / "inbox" / "lab").mkdir(parents=True)
    (work / "inbox" / "lab" / "result.hl7").write_bytes(secret)
    archive, entity = work.with_name(work.name + ".tar"), work.with_name(work.name + ".entity")
    archive.write_bytes(b"result.hl7\0" + secret)
    entity.write_bytes(ENTITY_HEAD + base64.b64encode(secret))
    return [work, archive, entity]


def test_a_backup_or_restore_killed_half_way_leaves_no_plaintext_in_the_state_folder(
    layout: DemoLayout, processes: Any, tmp_path: Path
) -> None:
    """The work files of a backup or a restore killed half-way hold documents and the
    audit trail unencrypted: the next start of the daemon (or, for a backup's, the next
    backup with it stopped) removes them before anything else (no purge reaches them)."""
    _, cert = recipient(tmp_path / "offline")
    hospital = layout.hospital
    add_backup(hospital.config_path, cert)
    state = hospital.root / "state"
    secret = b"PID|||PATIENT-4711^^^HOSP||YAMADA^TARO\r"
    processes.start(hospital.config_path).stop()
    left = _leftovers_of_a_killed_backup(state, secret)
    # ... and a restore killed half-way: the bundle unpacked, its entity and archive.
    for name in (RESTORE_WORK, RESTORE_WORK + ".entity", RESTORE_WORK + ".tar"):
        left.append(state / name)
    (state / RESTORE_WORK / "inbox" / "lab").mkdir(parents=True)
    (state / RESTORE_WORK / "inbox" / "lab" / "result.hl7").write_bytes(secret)
    left[-2].write_bytes(secret)
    left[-1].write_bytes(secret)
    kept = state / "spool.sqlite3"
    processes.start(hospital.config_path).stop()
    assert [p for p in left if p.exists()] == []
    assert kept.exists()
    left = _leftovers_of_a_killed_backup(state, secret)
    made = medgw("backup", "--to", tmp_path / "b.p7m", "--config", hospital.config_path)
    assert made.returncode == 0, made.stderr
    assert [p for p in left if p.exists()] == []
    assert not [p for p in state.rglob("*") if p.is_file() and secret in p.read_bytes()]


def test_a_row_refreshed_after_the_copy_takes_its_receipt_and_that_receipts_key(
    layout: DemoLayout, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A message sent and settled between the spool's online backup and the copy of its
    body file: its row is taken again from the live spool, with the receipt it now
    keeps, and that receipt's data key (stored after the copy) with it, so that the
    bundle's spool opens the receipt it holds."""
    config = load_config(layout.lab.config_path)
    assert config.at_rest is not None
    outgoing = config.storage.state_dir / "outgoing"
    outgoing.mkdir(parents=True, exist_ok=True)
    body = outgoing / "moved-on.as2"
    body.write_bytes(b"sealed body")
    message_id = "<moved-on@KITA-LAB>"
    item = receipt_item(message_id)
    receipt = b"Content-Type: text/plain\r\n\r\nthe receipt, settled after the copy"
    spool = SqliteSpool(config.storage.spool_path, SystemClock())
    vault = Vault(KeyStore(config.at_rest.key_dir), spool)
    vault.open()
    payload = config.storage.state_dir / "payloads" / "moved-on"
    spool.add_intake(message_id, "hospital", "a.hl7", "text/plain", payload, payload)
    spool.mark_queued(message_id, body, [], "mic", 11)
    real = bundle._spooled_files
    settled: list[str] = []

    def then_settled(db: Any) -> Any:
        if not settled:  # copied: the message is sent and settled, its body removed
            spool.mark_sending(message_id)
            dek, key = vault.new_key(item)
            done = Settled(
                message_id,
                OutboundState.DELIVERED,
                "processed",
                None,
                None,
                key,
                receipt=seal_bytes(dek, item, receipt),
                receipt_sha256=hashlib.sha256(receipt).hexdigest(),
            )
            settled.extend(spool.mark_settled([done]))
            body.unlink()
        return real(db)

    monkeypatch.setattr(bundle, "_spooled_files", then_settled)
    try:
        manifest = bundle.collect(config, tmp_path / "work")
    finally:
        spool.close()
    assert settled == [message_id]
    assert "state/outgoing/moved-on.as2" not in manifest["files"]
    copy = SqliteSpool(tmp_path / "work" / "state" / config.storage.spool_path.name, SystemClock())
    try:
        record = copy.get(message_id)
        assert record is not None and record.state is OutboundState.DELIVERED
        kept = copy.stored_receipt(message_id, MAX_SEALED_RECEIPT)
        assert kept is not None
        assert Vault(KeyStore(config.at_rest.key_dir), copy).open_bytes(item, kept) == receipt
    finally:
        copy.close()


@pytest.mark.parametrize("notes", [True, False], ids=["with-notes", "older-bundle"])
def test_a_restored_trail_keeps_its_order_notes_so_reviews_bisect_it(
    layout: DemoLayout, tmp_path: Path, notes: bool
) -> None:
    """The bundle carries the writer's notes for reviews (``<audit_log>.order``): the
    restored trail's files are bisected by a query as on the host that wrote them (the
    notes a refused restore left on the fresh host are replaced).  A bundle without them
    (written by an earlier version) restores a trail read whole: the same records found,
    more slowly."""
    hospital = layout.hospital
    start = (datetime.now(UTC) - timedelta(days=3)).replace(hour=9, minute=0, second=0)
    clock = SetClock(start)
    rotation = RotationSettings(max_bytes=20_000, daily=True)
    log = AuditLog(hospital.audit_log, clock, node="HOSP", sync=lambda fd: None, rotation=rotation)
    for n in range(150):
        clock.advance(60)
        log.emit(AuditEvent(EventType.MESSAGE_RECEIVED, peer="lab", message_id=f"<{n}@lab>"))
    log.close()
    written = trail_files(hospital.audit_log)
    assert len(written) > 2 and all(ordered(written))
    if not notes:
        order_path(hospital.audit_log).unlink()
    bundle, key, cert = owed_handover_backup(layout, tmp_path)

    new = fresh_host(layout, "hospital-restored", hospital)
    wrong = medgw(
        "restore", "--from", bundle, "--cert", cert, "--key", "/nonexistent", "--config", new
    )
    assert wrong.returncode == 1  # refused and audited: a trail and notes of its own
    audit = new.parent / "audit" / "audit.jsonl"
    refusals_notes = order_path(audit).read_bytes()
    [refusal_first] = read_notes(audit).firsts
    done = medgw("restore", "--from", bundle, "--cert", cert, "--key", key, "--config", new)
    assert done.returncode == 0, done.stderr
    # The refusals' notes are kept with them, never paired with the restored trail.
    assert refusal_first not in read_notes(audit).firsts
    [kept] = audit.parent.glob("audit-refused-restores-*.jsonl")
    assert order_path(kept).read_bytes() == refusals_notes
    restored = trail_files(audit)
    # The files written above (the backup's own record began another, closing the last)
    assert ordered(restored[: len(written)]) == [notes] * len(written)
    day = start.date().isoformat()
    found = medgw(
        "audit", "query", "--config", new, "--format", "json", "--since", day, "--until", day,
        "--event", "message.received", "--no-index",
    )  # fmt: skip
    assert found.returncode == 0, found.stderr
    got = [json.loads(line)["message_id"] for line in found.stdout.splitlines()]
    assert got == [f"<{n}@lab>" for n in range(150)]


@pytest.mark.parametrize("spool", ["missing", "damaged", "not-a-database"])
def test_a_backup_of_a_missing_or_damaged_sqlite_spool_names_it_and_the_fix(
    layout: DemoLayout, tmp_path: Path, spool: str
) -> None:
    """The backup reads the spool database itself (the daemon stopped): a missing file, or
    one whose pages a failing disk overwrote, is said as the spool's own reads say it,
    naming the file and the fix, without a traceback; no bundle is written."""
    _, cert = recipient(tmp_path / "offline")
    hospital = layout.hospital
    add_backup(hospital.config_path, cert)
    path = hospital.root / "state" / SPOOL_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    if spool != "missing":
        SqliteSpool(path, SystemClock()).close()
    if spool == "damaged":
        damage(path, "outbound")
    elif spool == "not-a-database":
        with path.open("r+b") as handle:
            handle.write(b"\xa5" * 100)  # the database header
    target = tmp_path / "b.p7m"
    made = medgw("backup", "--to", target, "--config", hospital.config_path)
    assert made.returncode == 1, made.stdout
    assert "Traceback" not in made.stderr, made.stderr
    assert str(path) in made.stderr, made.stderr
    assert "nothing was written" in made.stderr, made.stderr
    if spool == "missing":
        assert f"the spool database {path} does not exist" in made.stderr, made.stderr
        assert "[storage] state_dir" in made.stderr, made.stderr
    else:
        assert f"the spool database {path} is damaged" in made.stderr, made.stderr
        assert "medgw restore --from BUNDLE --force" in made.stderr, made.stderr
    assert not target.exists()
    assert not list(target.parent.glob(".*b.p7m*"))
    assert not list((hospital.root / "state").glob(f"{WORK_PREFIX}*"))
    [refused] = events(hospital.audit_log, "backup.refused")
    assert refused["detail"]["file"] == str(target) and str(path) in refused["reason"]
