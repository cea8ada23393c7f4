"""Crypto-shredding (DSP-1): a purge leaves nothing readable of what it purged, not even
in a disk image of the state folder or a backup taken before it.

Real ``medgw run`` processes exchange documents; the state folder is imaged (copied
whole, spool and write-ahead log included, while the daemon runs) and a ``medgw
backup`` bundle taken; ``medgw purge`` disposes of the first documents' records and
receipts; the state folder is imaged again.  Then, with the key folder as it is after
the purge: no image and no file of the decrypted backup holds any part of a purged
receipt's plaintext, no purged item's data key unwraps under any key left, and
``medgw restore`` of the old bundle names the key version it lacks; what survived is
still readable, and a message queued before the purge is still sent."""

from __future__ import annotations

import json
import os
import shutil
import sqlite3
import tarfile
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.keywrap import InvalidUnwrap, aes_key_unwrap

from gateway.atrest.chunked import MAGIC
from gateway.config import load_config
from gateway.demo_run import drop_file
from gateway.pki.demo import DemoLayout
from gateway.spool.records import body_item, payload_item, receipt_item
from tests.cli import medgw
from tests.helpers.atrest import kept_receipt
from tests.helpers.audit import wait_for_event, wait_for_events
from tests.helpers.backup import add_backup, backup_signer, fresh_host, openssl_opens, recipient
from tests.helpers.demo import revoke
from tests.helpers.local_api import LIS_TOKEN, enable_api

BIG = 200 << 10  # above the size kept in the spool row: a body file


def _document(tag: str, n: int) -> bytes:
    head = f"MSH|^~\\&|LAB|KITA|HIS|HOSP|{tag}-DOCUMENT-{n}-Q7Z\r".encode()
    return head + (os.urandom(BIG) if n == 0 else b"")


def _send(layout: DemoLayout, tag: str, count: int, done_before: int) -> list[dict[str, Any]]:
    """``count`` documents from the lab, their receipts verified; their receipt records."""
    for n in range(count):
        drop_file(layout.lab.outbox_for("hospital"), f"{tag}-{n}.hl7", _document(tag, n))
    received = wait_for_events(
        layout.lab.audit_log, "receipt.received", count=done_before + count, timeout=120
    )
    return received[done_before:]


def _image(state: Path, target: Path) -> None:
    """What a disk image holds of the state folder: every file and folder (a socket is no
    data)."""

    def sockets(folder: str, names: list[str]) -> list[str]:
        return [n for n in names if not (Path(folder) / n).is_file() | (Path(folder) / n).is_dir()]

    shutil.copytree(state, target, ignore=sockets)


def _files(tree: Path) -> dict[Path, bytes]:
    return {p: p.read_bytes() for p in sorted(tree.rglob("*")) if p.is_file()}


def _samples(plain: bytes) -> list[bytes]:
    """Distinctive 48-byte slices of a receipt (its signature and MIC, not its headers)."""
    return [plain[i : i + 48] for i in range(len(plain) // 4, len(plain) - 48, len(plain) // 6)]


def _data_keys(spool: Path) -> dict[str, tuple[int, bytes]]:
    db = sqlite3.connect(spool)
    try:
        return {r[0]: (r[1], bytes(r[2])) for r in db.execute("SELECT * FROM data_keys")}
    finally:
        db.close()


@pytest.mark.timeout(600)
def test_a_purge_leaves_nothing_readable_in_earlier_images_and_backups(
    layout: DemoLayout, processes: Any, tmp_path: Path
) -> None:
    key, cert = recipient(tmp_path / "offline")
    add_backup(layout.lab.config_path, cert)
    state = layout.lab.root / "state"
    key_dir = layout.lab.root / "state-keys"
    hospital = processes.start(layout.hospital.config_path)
    lab = processes.start(layout.lab.config_path)

    purged = _send(layout, "PURGED", 3, 0)
    purged_ids = [r["message_id"] for r in purged]
    # Their receipts in the clear, read while they still can be (the plaintext to look for).
    plain = {r["message_id"]: kept_receipt(layout.lab.config_path, r["message_id"]) for r in purged}
    before = datetime.now(UTC).isoformat()
    kept = _send(layout, "KEPT", 2, 3)
    # One more waits in the queue while the hospital is down: owed, never purged.
    hospital.stop()
    waiting = _document("QUEUED", 0)
    drop_file(layout.lab.outbox_for("hospital"), "QUEUED-0.hl7", waiting)
    queued = wait_for_event(layout.lab.audit_log, "message.send_failed")

    # A disk image of the state folder, and a backup, before the purge.
    image_before = tmp_path / "image-before"
    _image(state, image_before)
    bundle = tmp_path / "before-purge.p7m"
    taken = medgw("backup", "--to", str(bundle), "--config", str(lab.config))
    assert taken.returncode == 0, taken.stderr
    assert sorted(p.name for p in key_dir.iterdir()) == ["kek-1"]
    first_kek = (key_dir / "kek-1").read_bytes()

    done = medgw("purge", "--before", before, "--json", "--config", str(lab.config))
    assert done.returncode == 0, done.stderr
    counts = json.loads(done.stdout)["counts"]
    assert counts["receipts"] == 3 and counts["spool"] == 3, counts
    rotated = wait_for_event(layout.lab.audit_log, "atrest.key_rotated")
    assert rotated["detail"]["kek_version"] == 2
    image_after = tmp_path / "image-after"
    _image(state, image_after)

    # The backup, decrypted and unpacked as anyone with the recipient's key would.
    opened = tmp_path / "opened"
    opened.mkdir()
    openssl_opens(bundle, key, cert, backup_signer(layout.lab.config_path)[1], opened)
    backup_tree = tmp_path / "backup-tree"
    with tarfile.open(opened / "tar") as tar:
        tar.extractall(backup_tree, filter="data")

    # 1. No part of a purged receipt in the clear, anywhere: files, spool, its WAL.
    trees = {"image before": image_before, "image after": image_after, "backup": backup_tree}
    contents = {name: _files(tree) for name, tree in trees.items()}
    assert any(p.name.endswith("-wal") and data for p, data in contents["image before"].items())
    for message_id, receipt in plain.items():
        assert receipt.startswith(b"Content-Type: ")
        for name, files in contents.items():
            for path, data in files.items():
                for sample in _samples(receipt):
                    assert sample not in data, f"{message_id}'s receipt in {name}: {path}"

    # Neither the state folder nor the backup ever carries a key-encryption key.
    for name, files in contents.items():
        assert not any(first_kek in data for data in files.values()), name

    # 2. Their data keys, as the earlier copies hold them, unwrap under no key left.
    keks = {p.name: p.read_bytes() for p in key_dir.iterdir()}
    assert sorted(keks) == ["kek-2"]
    old_keys: dict[str, tuple[int, bytes]] = {}
    for tree in (image_before, backup_tree):
        [spool] = list(tree.rglob("spool.sqlite3"))
        old_keys |= {
            item: value
            for item, value in _data_keys(spool).items()
            if any(item.endswith(m) for m in purged_ids)
        }
    wanted = {receipt_item(m) for m in purged_ids} | {body_item(m) for m in purged_ids}
    assert {receipt_item(m) for m in purged_ids} <= old_keys.keys() <= wanted
    for item, (version, wrapped) in old_keys.items():
        assert version == 1
        for name, kek in keks.items():
            with pytest.raises(InvalidUnwrap):
                aes_key_unwrap(kek, wrapped)
            assert name
        # Not even their wrapped bytes are left in the spool after the purge.
        for path, data in contents["image after"].items():
            assert wrapped not in data, f"{item}'s wrapped key still in {path}"
    [spool_after] = list(image_after.rglob("spool.sqlite3"))
    assert not set(_data_keys(spool_after)) & wanted

    # 3. The old bundle cannot be restored: it names the key version it lacks.
    config = fresh_host(layout, "fresh")
    # (with the lab's key folder as it is now: fresh_host copies it)
    assert sorted(p.name for p in (config.parent / "state-keys").iterdir()) == ["kek-2"]
    refused = medgw(
        "restore",
        "--from",
        str(bundle),
        "--cert",
        str(cert),
        "--key",
        str(key),
        "--config",
        str(config),
    )
    assert refused.returncode != 0
    assert "key-encryption key version 1 (kek-1)" in refused.stderr, refused.stderr
    assert "restore a backup taken after the last purge" in refused.stderr

    # 4. What survived is readable, and the queued message is still sent.
    for record in kept:
        stored = kept_receipt(layout.lab.config_path, record["message_id"])
        assert stored.startswith(b"Content-Type: ")
    [body] = [p for p in (state / "outgoing").iterdir() if p.suffix == ".as2"]
    assert body.read_bytes().startswith(MAGIC)
    processes.start(layout.hospital.config_path)
    wait_for_event(
        layout.lab.audit_log,
        "receipt.received",
        where=lambda r: r["message_id"] == queued["message_id"],
        timeout=120,
    )
    assert (layout.hospital.inbox_dir / "lab" / "QUEUED-0.hl7").read_bytes() == waiting


@pytest.mark.timeout(300)
def test_documents_whose_preparation_failed_are_kept_encrypted_and_shredded_by_cancel_and_purge(
    layout: DemoLayout, processes: Any, tmp_path: Path
) -> None:
    # The hospital's encryption certificate revoked in the lab's CRL: the lab cannot
    # seal the document, and keeps it (until a retry, or a cancel) in state/payloads.
    hospital_enc = load_config(layout.hospital.config_path).smime.encryption.certificate
    revoke(layout, layout.lab.root / "certs" / "crls" / "loopback" / "ca.crl", hospital_enc)
    state = layout.lab.root / "state"
    key_dir = layout.lab.root / "state-keys"
    api = enable_api(layout)
    lab = processes.start(layout.lab.config_path)
    # Two from the outbox (a small one, kept in its spool row), one from the local API.
    small = _document("SMALL", 1) + os.urandom(4096)
    documents = [_document("UNSEALED", 0), _document("SUBMITTED", 0), small]
    drop_file(layout.lab.outbox_for("hospital"), "UNSEALED-0.hl7", documents[0])
    drop_file(layout.lab.outbox_for("hospital"), "SMALL-1.hl7", documents[2])
    status, _ = api.request(
        "POST",
        "/v1/messages?to=hospital&filename=SUBMITTED-0.hl7",
        token=LIS_TOKEN,
        body=documents[1],
    )
    assert status == 202
    failed = wait_for_events(layout.lab.audit_log, "message.failed", count=3)
    assert all("the document is kept" in f["reason"] for f in failed)
    message_ids = [f["message_id"] for f in failed]

    # Kept encrypted at rest from the moment they were taken: no plaintext in an image.
    kept = [p for p in (state / "payloads").iterdir() if not p.name.startswith(".")]
    assert len(kept) == 2 and all(p.read_bytes().startswith(MAGIC) for p in kept)
    image_before = tmp_path / "image-before"
    _image(state, image_before)
    samples = [sample for document in documents for sample in _samples(document)]
    for path, data in _files(image_before).items():
        for sample in samples:
            assert sample not in data, f"a kept document in the clear in {path}"
    [spool_before] = list(image_before.rglob("spool.sqlite3"))
    old_keys = _data_keys(spool_before)
    wrapped = [old_keys[payload_item(m)][1] for m in message_ids]
    assert {old_keys[payload_item(m)][0] for m in message_ids} == {1}

    # Cancelled, then purged: their files and data keys go, and the key is rotated.
    for message_id in message_ids:
        cancelled = medgw("queue", "cancel", message_id, "--config", str(lab.config))
        assert cancelled.returncode == 0, cancelled.stderr
    assert not [p for p in (state / "payloads").iterdir() if not p.name.startswith(".")]
    done = medgw(
        "purge", "--before", datetime.now(UTC).isoformat(), "--json", "--config", str(lab.config)
    )
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["counts"]["spool"] == 3
    wait_for_event(layout.lab.audit_log, "atrest.key_rotated")
    image_after = tmp_path / "image-after"
    _image(state, image_after)
    [spool_after] = list(image_after.rglob("spool.sqlite3"))
    assert not {payload_item(m) for m in message_ids} & _data_keys(spool_after).keys()
    after = _files(image_after)
    # The earlier image's copies of the documents open under no key left.
    assert [p.name for p in key_dir.iterdir()] == ["kek-2"]
    kek = (key_dir / "kek-2").read_bytes()
    for key in wrapped:
        assert not any(key in data for data in after.values())
        with pytest.raises(InvalidUnwrap):
            aes_key_unwrap(kek, key)
    for path, data in after.items():
        for sample in samples:
            assert sample not in data, f"a cancelled document in the clear in {path}"
