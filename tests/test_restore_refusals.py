"""Every refused ``medgw restore`` is audited (``backup.restore_refused``, the rule as
its reason) and tells the administrator the input, the rule and the fix; nothing is
written, and a fresh host stays restorable.  A bundle whose spool names a file outside
this host's state folder and inbox is refused even when its signature is good."""

from __future__ import annotations

import hashlib
import json
import shutil
import sqlite3
from collections.abc import Callable
from pathlib import Path
from typing import Any

from cryptography import x509

from gateway.atrest import KeyStore, Vault
from gateway.audit.files import closed_files
from gateway.audit.order import order_path
from gateway.backup.bundle import open_bundle
from gateway.clock import SystemClock
from gateway.config import load_config
from gateway.demo_run import read_audit
from gateway.pki.demo import DemoLayout
from gateway.spool import SqliteSpool
from tests.cli import medgw
from tests.helpers.audit import wait_for_events
from tests.helpers.backup import (
    backup_signer,
    bundle_content,
    fresh_host,
    owed_handover_backup,
    private_key,
    recipient,
    sealed_bundle,
)


def _unpacked(bundle: Path, key: Path, cert: Path, config_path: Path, work: Path) -> dict[str, Any]:
    """The real bundle opened as restore opens it: manifest, files in ``work``."""
    config = load_config(config_path)
    work.mkdir()
    return open_bundle(
        bundle,
        work,
        cert=x509.load_pem_x509_certificate(cert.read_bytes()),
        key=private_key(key),
        signers=config.backup.restore_signers if config.backup else [],
    )


def _repacked(
    work: Path, manifest: dict[str, Any], change: Callable[[dict[str, bytes], dict[str, Any]], None]
) -> bytes:
    files = {name: (work / name).read_bytes() for name in manifest["files"]}
    manifest = json.loads(json.dumps(manifest))
    change(files, manifest)
    return bundle_content(files, manifest)


def _digests(files: dict[str, bytes], manifest: dict[str, Any]) -> None:
    manifest["files"] = {name: hashlib.sha256(data).hexdigest() for name, data in files.items()}


def test_every_refused_restore_is_audited_and_the_fresh_host_stays_restorable(
    layout: DemoLayout, tmp_path: Path
) -> None:
    bundle, key, cert = owed_handover_backup(layout, tmp_path)
    config = fresh_host(layout, "hospital-restored", layout.hospital)
    trail = config.parent / "audit" / "audit.jsonl"
    state = config.parent / "state"
    other_key, _ = recipient(tmp_path / "another-recipient")
    work = tmp_path / "opened"
    manifest = _unpacked(bundle, key, cert, layout.hospital.config_path, work)

    def crafted(name: str, change: Callable[[dict[str, bytes], dict[str, Any]], None]) -> Path:
        return sealed_bundle(
            _repacked(work, manifest, change), tmp_path / f"{name}.p7m", layout.hospital.config_path
        )

    def planted(files: dict[str, bytes], m: dict[str, Any]) -> None:
        files["state/x/../../planted"] = b"planted"
        m["files"]["state/x/../../planted"] = hashlib.sha256(b"planted").hexdigest()

    def newer(files: dict[str, bytes], m: dict[str, Any]) -> None:
        m["format"] = 3

    def damaged(files: dict[str, bytes], m: dict[str, Any]) -> None:
        files["config/gateway.toml"] += b"\n# changed after the digest was taken\n"

    def not_a_database(files: dict[str, bytes], m: dict[str, Any]) -> None:
        # Signed by the backup signer, its digests right: the spool copy is simply no
        # SQLite database (the bundle was made wrongly, or the spool was damaged).
        files["state/spool.sqlite3"] = b"not an SQLite database" * 200
        _digests(files, m)

    flipped = tmp_path / "flipped.p7m"
    data = bytearray(bundle.read_bytes())
    data[len(data) // 2] ^= 0x01
    flipped.write_bytes(bytes(data))
    # Signed with the gateway's own AS2 key: a good signature, but not by the backup signer.
    as2_sign = (config.parent / "certs" / "sign.crt", config.parent / "certs" / "sign.key")
    cases: list[tuple[Path, Path, str, str]] = [
        # (bundle, recipient key, reason, what the error says)
        (bundle, other_key, "bundle-decryption", "cannot be opened"),
        (flipped, key, "bundle-decryption", "cannot be opened"),
        (
            sealed_bundle(
                _repacked(work, manifest, lambda _files, _manifest: None),
                tmp_path / "as2-signed.p7m",
                config,
                signer=as2_sign,
            ),
            key,
            "bundle-signer",
            "cannot be opened",
        ),
        (
            sealed_bundle(
                b"Content-Type: text/plain\r\n\r\nhello\r\n", tmp_path / "text.p7m", config
            ),
            key,
            "not-a-backup",
            "is not a medgw backup",
        ),
        (crafted("planted", planted), key, "unsafe-name", "archive holds"),
        (crafted("newer", newer), key, "format-version", "format 3"),
        (crafted("damaged", damaged), key, "checksum", "does not match its SHA-256"),
        (crafted("no-database", not_a_database), key, "spool-unreadable", "cannot be read"),
        (bundle, tmp_path / "no-such.key", "recipient-unreadable", "no-such.key"),
        (tmp_path / "no-such.p7m", key, "bundle-unreadable", "no-such.p7m"),
    ]
    for number, (source, with_key, reason, says) in enumerate(cases, start=1):
        refused = medgw(
            "restore", "--from", source, "--cert", cert, "--key", with_key, "--config", config
        )
        assert refused.returncode == 1, (reason, refused.stdout)
        assert says in refused.stderr and "(fix: " in refused.stderr, (reason, refused.stderr)
        assert "nothing was restored" in refused.stderr, refused.stderr
        assert "NOT recorded" not in refused.stderr
        records = read_audit(trail)
        assert len(records) == number, (reason, records)
        event = records[-1]
        assert event["event"] == "backup.restore_refused", event
        assert event["reason"] == reason and event["outcome"] == "failure", event
        assert event["detail"]["file"] == str(source.absolute())
        assert says in event["detail"]["error"] and "(uid " in event["actor"]
        assert not (state / "spool.sqlite3").exists()
        assert not list(config.parent.glob("**/planted"))
        assert not (config.parent / "inbox").exists()

    # A host without [backup] knows no backup signer: it trusts no bundle.
    bare = fresh_host(layout, "hospital-without-backup", layout.hospital)
    text = bare.read_text()
    bare.write_text(text[: text.index("\n[backup]\n")] + "\n")
    refused = medgw("restore", "--from", bundle, "--cert", cert, "--key", key, "--config", bare)
    assert refused.returncode == 1 and "no [backup] section" in refused.stderr
    [event] = read_audit(bare.parent / "audit" / "audit.jsonl")
    assert event["reason"] == "not-configured"

    # The trail holds only refusals: the host is still fresh, and they are kept.
    done = medgw(
        "restore", "--from", bundle, "--cert", cert, "--key", key, "--json", "--config", config
    )
    assert done.returncode == 0, done.stderr
    [kept] = json.loads(done.stdout)["refusals_kept_in"]
    kept_records = read_audit(Path(kept))
    assert [r["reason"] for r in kept_records] == [c[2] for c in cases]
    assert medgw("audit", "verify", "--file", kept).returncode == 0
    assert medgw("audit", "verify", "--config", config).returncode == 0
    [restored] = [r for r in read_audit(trail) if r["event"] == "backup.restored"]
    assert restored["detail"]["refusals_kept_in"] == [kept]
    assert (config.parent / "inbox" / "lab" / "result.hl7").exists()

    # Now it is not fresh: refused, and audited in the restored trail.
    again = medgw("restore", "--from", bundle, "--cert", cert, "--key", key, "--config", config)
    assert again.returncode == 1 and "is not empty" in again.stderr and "--force" in again.stderr
    last = read_audit(trail)[-1]
    assert last["event"] == "backup.restore_refused" and last["reason"] == "not-empty"
    assert medgw("audit", "verify", "--config", config).returncode == 0


def test_a_restore_while_the_daemon_runs_is_refused_and_recorded_by_the_daemon(
    layout: DemoLayout, processes: Any, tmp_path: Path
) -> None:
    bundle, key, cert = owed_handover_backup(layout, tmp_path)
    hospital = processes.start(layout.hospital.config_path)
    for force in ((), ("--force",)):
        refused = medgw(
            "restore", "--from", bundle, "--cert", cert, "--key", key, *force,
            "--config", hospital.config,
        )  # fmt: skip
        assert refused.returncode == 1, refused.stdout
        assert "already running" in refused.stderr and "systemctl stop medgw" in refused.stderr
    events = wait_for_events(layout.hospital.audit_log, "backup.restore_refused", count=2)
    assert [e["reason"] for e in events] == ["daemon-running"] * 2
    assert [e["detail"]["forced"] for e in events] == [False, True]
    assert medgw("audit", "verify", "--config", hospital.config).returncode == 0


def _spool_change(sql: str, *params: str) -> Callable[[dict[str, bytes], dict[str, Any]], None]:
    """A change of the bundle's spool copy (then its digest taken again)."""

    def change(files: dict[str, bytes], manifest: dict[str, Any]) -> None:
        path = Path(manifest["__work"]) / "state" / "spool.sqlite3"
        db = sqlite3.connect(path)
        db.execute(sql, params)
        db.commit()
        db.close()
        files["state/spool.sqlite3"] = path.read_bytes()
        del manifest["__work"]
        _digests(files, manifest)

    return change


def test_a_signed_bundle_whose_spool_names_a_file_outside_is_refused(
    layout: DemoLayout, tmp_path: Path
) -> None:
    """Restore may run as root, and the restored daemon reads, writes and removes the files
    its spool names: every one must lead into this host's state folder or inbox (a
    document still in intake: or its outbox), ``..`` counted where it leads."""
    bundle, key, cert = owed_handover_backup(layout, tmp_path)
    config = fresh_host(layout, "hospital-restored", layout.hospital)
    old = load_config(layout.hospital.config_path).storage
    outside = tmp_path / "outside" / "victim"
    outside.parent.mkdir()
    outside.write_bytes(b"not the gateway's")
    intake_row = (
        "INSERT INTO outbound (message_id, peer, filename, content_type, source_path, "
        "payload_path, state, created_at, updated_at) "
        "VALUES ('<in@take>', 'lab', 'x.hl7', 'application/hl7-v2', ?, ?, 'intake', 0, 0)"
    )
    variants = {
        "handover.path": _spool_change("UPDATE handover SET path=?", str(outside)),
        "inbound.target_path": _spool_change(
            "UPDATE inbound SET target_path=?", f"{old.inbox_dir}/lab/../../../outside/victim"
        ),
        "outbound.source_path": _spool_change(
            intake_row, str(outside), f"{old.state_dir}/payloads/x"
        ),
    }
    for number, (column, change) in enumerate(variants.items(), start=1):
        work = tmp_path / f"opened-{number}"
        manifest = _unpacked(bundle, key, cert, layout.hospital.config_path, work)
        manifest["__work"] = str(work)
        crafted = sealed_bundle(
            _repacked(work, manifest, change),
            tmp_path / f"outside-{number}.p7m",
            layout.hospital.config_path,
        )
        refused = medgw(
            "restore", "--from", crafted, "--cert", cert, "--key", key, "--force",
            "--config", config,
        )  # fmt: skip
        assert refused.returncode == 1, (column, refused.stdout)
        assert column in refused.stderr and "outside this host's" in refused.stderr
        assert "(fix: " in refused.stderr
        event = read_audit(config.parent / "audit" / "audit.jsonl")[-1]
        assert event["event"] == "backup.restore_refused"
        assert event["reason"] == "spool-path-outside", event
        assert outside.read_bytes() == b"not the gateway's"
        assert not (config.parent / "state" / "spool.sqlite3").exists()
        assert not (config.parent / "inbox").exists()
    # The same bundle unchanged restores: its paths are moved to this host's folders.
    done = medgw("restore", "--from", bundle, "--cert", cert, "--key", key, "--config", config)
    assert done.returncode == 0, done.stderr


def test_after_a_change_of_backup_signing_key_an_older_bundle_restores_only_if_trusted(
    layout: DemoLayout, tmp_path: Path
) -> None:
    """Restore accepts exactly the configured backup signer: after the key is replaced, a
    bundle signed with the old one is refused until the old certificate is listed in
    ``trusted_signers``."""
    bundle, key, cert = owed_handover_backup(layout, tmp_path)
    config = fresh_host(layout, "hospital-restored", layout.hospital)
    certs = config.parent / "certs"
    old = certs / "backup-signing-old.crt"
    (certs / "backup-signing.crt").rename(old)
    (certs / "backup-signing.key").unlink()
    backup_signer(config)  # a new key pair in the old one's place
    here = str(layout.hospital.root / "certs" / "backup-signing")
    config.write_text(config.read_text().replace(here, str(certs / "backup-signing")))
    refused = medgw("restore", "--from", bundle, "--cert", cert, "--key", key, "--config", config)
    assert refused.returncode == 1 and "cannot be opened" in refused.stderr
    assert "trusted_signers" in refused.stderr
    assert read_audit(config.parent / "audit" / "audit.jsonl")[-1]["reason"] == "bundle-signer"
    config.write_text(config.read_text() + f'trusted_signers = ["{old}"]\n')
    done = medgw("restore", "--from", bundle, "--cert", cert, "--key", key, "--config", config)
    assert done.returncode == 0, done.stderr


def test_a_state_folder_that_cannot_be_locked_is_a_refusal_not_a_traceback(
    layout: DemoLayout, tmp_path: Path
) -> None:
    bundle, key, cert = owed_handover_backup(layout, tmp_path)
    config = fresh_host(layout, "hospital-restored", layout.hospital)
    (config.parent / "state").write_bytes(b"a file where the state folder belongs\n")
    refused = medgw("restore", "--from", bundle, "--cert", cert, "--key", key, "--config", config)
    assert refused.returncode == 1 and "Traceback" not in refused.stderr, refused.stderr
    assert "cannot take the lock of the state folder" in refused.stderr
    assert "(fix: " in refused.stderr
    [event] = read_audit(config.parent / "audit" / "audit.jsonl")
    assert event["event"] == "backup.restore_refused" and event["reason"] == "state-unwritable"


def test_a_restore_that_cannot_finish_writing_takes_back_what_it_wrote(
    layout: DemoLayout, tmp_path: Path
) -> None:
    """A write that fails half-way (here: a file where the inbox folder belongs; in life, a
    full disk) leaves the fresh host as it was, so that the restore can simply be run
    again once the cause is fixed; the failure is audited."""
    bundle, key, cert = owed_handover_backup(layout, tmp_path)
    config = fresh_host(layout, "hospital-restored", layout.hospital)
    inbox = config.parent / "inbox"
    inbox.write_bytes(b"a file where the inbox folder belongs\n")
    wrong = medgw(
        "restore", "--from", bundle, "--cert", cert, "--key", "/nonexistent", "--config", config
    )
    assert wrong.returncode == 1  # a refusal first: its record must survive the failure
    failed = medgw("restore", "--from", bundle, "--cert", cert, "--key", key, "--config", config)
    assert failed.returncode == 1 and "Traceback" not in failed.stderr, failed.stderr
    assert "removed again; nothing was restored" in failed.stderr and "(fix: " in failed.stderr
    state = config.parent / "state"
    assert sorted(p.name for p in state.iterdir() if p.name != "medgw.lock") == []
    trail = config.parent / "audit" / "audit.jsonl"
    assert [r["reason"] for r in read_audit(trail)] == ["recipient-unreadable", "write-failed"]
    assert sorted(p.name for p in trail.parent.iterdir()) == ["audit.jsonl", "audit.jsonl.order"]
    inbox.unlink()
    done = medgw("restore", "--from", bundle, "--cert", cert, "--key", key, "--config", config)
    assert done.returncode == 0, done.stderr
    assert (inbox / "lab" / "result.hl7").read_bytes() == b"MSH|owed to the internal system\r"


def test_a_bundle_whose_data_keys_do_not_open_with_this_hosts_keys_is_refused(
    layout: DemoLayout, tmp_path: Path
) -> None:
    """The key folder holds a kek-1, but another gateway's: what the bundle keeps encrypted
    could not be read.  Refused (key-mismatch, audited), naming the key file and the fix;
    with the backed-up gateway's key folder the same bundle is restored."""
    hospital = load_config(layout.hospital.config_path)
    assert hospital.at_rest is not None
    spool = SqliteSpool(hospital.storage.spool_path, SystemClock())
    vault = Vault(KeyStore(hospital.at_rest.key_dir), spool)
    vault.open()
    with vault.storing("outbound-body:<kept@hospital>") as sealing:
        sealing.seal(b"kept encrypted at rest")
        assert sealing.key is not None
        spool.put_data_key(sealing.key)
    spool.close()
    bundle, key, cert = owed_handover_backup(layout, tmp_path)
    config = fresh_host(layout, "hospital-with-another-key", layout.hospital)
    fresh = load_config(config)
    assert fresh.at_rest is not None
    keys = fresh.at_rest.key_dir
    shutil.rmtree(keys, ignore_errors=True)
    KeyStore(keys).prepare()
    KeyStore(keys).create(1)  # another gateway's kek-1
    refused = medgw("restore", "--from", bundle, "--cert", cert, "--key", key, "--config", config)
    assert refused.returncode == 1, refused.stdout
    assert str(keys / "kek-1") in refused.stderr and "another gateway's key" in refused.stderr
    assert (
        "(fix: copy the key folder" in refused.stderr and "nothing was restored" in refused.stderr
    )
    [event] = read_audit(config.parent / "audit" / "audit.jsonl")
    assert event["event"] == "backup.restore_refused" and event["reason"] == "key-mismatch"
    assert not (fresh.storage.spool_path).exists()
    shutil.rmtree(keys)
    shutil.copytree(hospital.at_rest.key_dir, keys)
    done = medgw("restore", "--from", bundle, "--cert", cert, "--key", key, "--config", config)
    assert done.returncode == 0, done.stderr


def test_a_trail_inside_the_state_folder_leaves_a_fresh_host_restorable_after_refusals(
    layout: DemoLayout, tmp_path: Path
) -> None:
    """With ``[storage] audit_log`` directly in the state folder, the files the refused
    restores wrote there (the current trail file, the closed ones a rotation left, the
    writer's order notes) are those refusals' trail, not state in use: the restore that
    follows is not refused as "not empty", and keeps them aside."""
    bundle, key, cert = owed_handover_backup(layout, tmp_path)
    config = fresh_host(layout, "hospital-restored", layout.hospital)
    text = config.read_text().replace(
        'audit_log = "audit/audit.jsonl"', 'audit_log = "state/audit.jsonl"'
    )
    config.write_text(text + "\n[audit]\nrotate_mib = 0.01\n")  # rotated after a few records
    state = config.parent / "state"
    trail = state / "audit.jsonl"
    other_key, _ = recipient(tmp_path / "another-recipient")
    refusals = 0
    while not closed_files(trail) or not order_path(trail).exists():
        assert refusals < 100, sorted(p.name for p in state.iterdir())
        refused = medgw(
            "restore", "--from", bundle, "--cert", cert, "--key", other_key, "--config", config
        )
        assert refused.returncode == 1 and "cannot be opened" in refused.stderr, refused.stderr
        assert "NOT recorded" not in refused.stderr, refused.stderr
        refusals += 1
    done = medgw(
        "restore", "--from", bundle, "--cert", cert, "--key", key, "--json", "--config", config
    )
    assert done.returncode == 0, done.stderr
    kept = [Path(p) for p in json.loads(done.stdout)["refusals_kept_in"]]
    kept_records = [r for path in kept for r in read_audit(path)]
    assert [r["event"] for r in kept_records] == ["backup.restore_refused"] * refusals
    assert medgw("audit", "verify", "--config", config).returncode == 0
    assert (config.parent / "inbox" / "lab" / "result.hl7").exists()
