"""Encryption at rest (DSP-1, OUT-1): the chunked file format, the key-encryption keys in
their folder, and the vault's rotation, on real files and a real SQLite spool; the
rotation killed at each of its steps in a real subprocess."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import tracemalloc
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.keywrap import InvalidUnwrap, aes_key_unwrap

from gateway.as2.headers import check_message_id
from gateway.atrest import KeyStore, Vault
from gateway.atrest.chunked import (
    CHUNK,
    TAG,
    OpeningReader,
    is_sealed,
    open_bytes,
    plaintext_size,
    seal_bytes,
    seal_stream,
)
from gateway.clock import SystemClock
from gateway.errors import AtRestError, AtRestTamperedError
from gateway.spool import DataKey, OutboundState, RetainedKind, SqliteSpool
from gateway.spool.records import body_item, receipt_item, sent_receipt_item
from tests.conftest import MakeSpool

KEY = bytes(range(32))
OTHER_KEY = bytes(range(1, 33))
ITEM = "outbound-body:<m1@hospital>"
ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("size", [0, 1, CHUNK - 1, CHUNK, CHUNK + 1, 3 * CHUNK + 7])
def test_round_trip_at_every_chunk_boundary(size: int) -> None:
    plain = os.urandom(size)
    sealed = seal_bytes(KEY, ITEM, plain)
    assert is_sealed(sealed)
    assert size < 16 or plain[:16] not in sealed
    assert open_bytes(KEY, ITEM, sealed) == plain
    assert plaintext_size(len(sealed), ITEM) == size


def _chunks(sealed: bytes) -> tuple[bytes, list[bytes]]:
    header_len = len(sealed) - (plaintext_size(len(sealed), ITEM))
    count = (len(sealed) - header_len) // (CHUNK + TAG) + 1
    header_len -= count * TAG
    body = sealed[header_len:]
    return sealed[:header_len], [
        body[i : i + CHUNK + TAG] for i in range(0, len(body), CHUNK + TAG)
    ]


def test_changed_truncated_reordered_or_swapped_ciphertext_is_refused() -> None:
    plain = os.urandom(3 * CHUNK + 100)
    sealed = seal_bytes(KEY, ITEM, plain)
    header, chunks = _chunks(sealed)
    assert len(chunks) == 4
    flipped = bytearray(sealed)
    flipped[len(header) + CHUNK + 5] ^= 1
    cases = {
        "changed byte": bytes(flipped),
        "last chunk cut off": header + b"".join(chunks[:3]),
        "cut inside a chunk": sealed[:-50],
        "chunks reordered": header + chunks[1] + chunks[0] + chunks[2] + chunks[3],
        "a chunk dropped": header + chunks[0] + chunks[2] + chunks[3],
        "header only": header,
    }
    for what, bad in cases.items():
        with pytest.raises(AtRestTamperedError, match="integrity check"):
            open_bytes(KEY, ITEM, bad)
        assert what
    # Another item's file, under the same key or its own: refused, named.
    other = seal_bytes(KEY, "outbound-body:<m2@hospital>", plain)
    with pytest.raises(AtRestTamperedError, match="another item"):
        open_bytes(KEY, ITEM, other)
    with pytest.raises(AtRestTamperedError, match="does not authenticate"):
        open_bytes(OTHER_KEY, ITEM, sealed)


def test_plaintext_from_before_is_told_apart() -> None:
    assert not is_sealed(b"0\x82\x01\x00")  # DER of a CMS body
    assert not is_sealed(b"Content-Type: multipart/report\r\n")  # a receipt


def test_streaming_keeps_memory_flat(tmp_path: Path) -> None:
    """32 MiB through the writer and the reader: the peak is a few chunks, not the size
    (the bench measures 1 GiB: bench/atrest_bench.py)."""
    size = 32 << 20
    block = os.urandom(1 << 20)
    target = tmp_path / "body"
    tracemalloc.start()
    try:
        with target.open("wb") as out:
            assert seal_stream(KEY, ITEM, (block for _ in range(size >> 20)), out) == size
        _, peak_write = tracemalloc.get_traced_memory()
        tracemalloc.reset_peak()
        total = 0
        with OpeningReader(KEY, ITEM, target.open("rb")) as reader:
            while chunk := reader.read(256 << 10):  # what an upload asks for at a time
                total += len(chunk)
        _, peak_read = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert total == size
    assert peak_write < 4 << 20 and peak_read < 4 << 20, (peak_write, peak_read)


def test_key_folder_is_private_and_refuses_links(tmp_path: Path) -> None:
    store = KeyStore(tmp_path / "keys")
    store.prepare()
    assert (tmp_path / "keys").stat().st_mode & 0o777 == 0o700
    store.create(1)
    assert (tmp_path / "keys" / "kek-1").stat().st_mode & 0o777 == 0o600
    assert len(store.load(1)) == 32
    os.chmod(tmp_path / "keys" / "kek-1", 0o644)
    with pytest.raises(AtRestError, match="not private") as caught:
        store.load(1)
    assert caught.value.fix and "chmod 600" in caught.value.fix
    os.chmod(tmp_path / "keys" / "kek-1", 0o600)
    with pytest.raises(AtRestError, match=r"version 7 .*is missing") as missing:
        store.load(7)
    assert "kek-7" in str(missing.value.fix)

    real = tmp_path / "elsewhere"
    real.mkdir(mode=0o700)
    (tmp_path / "linked").symlink_to(real)
    with pytest.raises(AtRestError, match="not a folder"):
        KeyStore(tmp_path / "linked").prepare()
    # A key file that is a link to a key elsewhere is not read.
    (real / "kek-1").write_bytes(os.urandom(32))
    os.chmod(real / "kek-1", 0o600)
    (tmp_path / "keys" / "kek-2").symlink_to(real / "kek-1")
    with pytest.raises(AtRestError, match="not private"):
        store.load(2)


def test_two_nodes_preparing_a_new_key_folder_at_once_both_start(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Nodes sharing a key folder start together: the one that finds the folder missing
    may see the other create it before its own mkdir, and must still start."""
    keys = tmp_path / "keys"
    looked = os.path.lexists

    def other_node_creates_it_after_the_look(path: str | os.PathLike[str]) -> bool:
        seen = looked(path)
        if Path(path) == keys and not seen:
            keys.mkdir(mode=0o700)  # the other node, between our look and our mkdir
        return seen

    monkeypatch.setattr("gateway.atrest.keys.os.path.lexists", other_node_creates_it_after_the_look)
    KeyStore(keys).prepare()
    assert keys.is_dir() and keys.stat().st_mode & 0o777 == 0o700


def test_two_nodes_making_the_first_key_at_once_both_start_with_one_key(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Nodes sharing a new key folder start together: both find no key and write one.
    The other node's whole write falls between ours and our link: neither may take the
    other's file being written for a leftover, and ours starts with the key it made."""
    keys = tmp_path / "keys"
    linked = os.link
    others: list[bytes] = []

    def other_node_writes_its_key_first(source: str, target: str) -> None:
        monkeypatch.setattr("gateway.atrest.keys.os.link", linked)  # the other's, as is
        others.append(KeyStore(keys).create(1))  # the other node, start to end
        linked(source, target)

    monkeypatch.setattr("gateway.atrest.keys.os.link", other_node_writes_its_key_first)
    spool = SqliteSpool(tmp_path / "spool.sqlite3", SystemClock())
    vault = Vault(KeyStore(keys), spool)
    vault.open()
    assert KeyStore(keys).versions() == [1]
    assert (keys / "kek-1").read_bytes() == others[0]
    assert sorted(os.listdir(keys)) == ["kek-1"]  # no file being written left behind
    with vault.storing("inbound-receipt:lab:<1@lab>") as sealing:
        sealed = sealing.seal(b"receipt")
        assert sealing.key is not None and sealing.key.kek == 1
        spool.put_data_key(sealing.key)
    assert vault.open_bytes("inbound-receipt:lab:<1@lab>", sealed) == b"receipt"
    spool.close()


def test_a_key_write_a_kill_left_is_removed_by_the_next_one(tmp_path: Path) -> None:
    """A process killed while writing a key leaves random bytes that wrap nothing; the
    next key written removes them once no write can still be in progress."""
    store = KeyStore(tmp_path / "keys")
    store.prepare()
    left = tmp_path / "keys" / ".kek-1.0123456789abcdef.new"
    in_progress = tmp_path / "keys" / ".kek-1.fedcba9876543210.new"
    for path in (left, in_progress):
        path.write_bytes(os.urandom(32))
    hours_ago = left.stat().st_mtime - 2 * 3600
    os.utime(left, (hours_ago, hours_ago))
    store.create(1)
    assert sorted(os.listdir(tmp_path / "keys")) == [in_progress.name, "kek-1"]


def test_destroy_overwrites_then_removes(tmp_path: Path) -> None:
    store = KeyStore(tmp_path / "keys")
    store.prepare()
    key = store.create(1)
    inode_path = tmp_path / "keys" / "kek-1"
    with inode_path.open("rb") as kept:  # a handle open across the destruction
        store.destroy(1)
        assert kept.read() != key  # the bytes of the file itself were overwritten
    assert not inode_path.exists()
    assert store.versions() == []


def _spool_with_keys(tmp_path: Path, count: int = 5) -> tuple[SqliteSpool, Vault, dict[str, bytes]]:
    spool = SqliteSpool(tmp_path / "spool.sqlite3", SystemClock())
    vault = Vault(KeyStore(tmp_path / "keys"), spool)
    vault.open()
    sealed = {}
    for n in range(count):
        item = f"inbound-receipt:lab:<{n}@lab>"
        with vault.storing(item) as sealing:
            sealed[item] = sealing.seal(f"receipt {n} ".encode() * 100)
            assert sealing.key is not None
            spool.put_data_key(sealing.key)
    return spool, vault, sealed


def test_rotation_rewraps_survivors_and_destroys_the_old_key(tmp_path: Path) -> None:
    spool, vault, sealed = _spool_with_keys(tmp_path)
    old_kek = (tmp_path / "keys" / "kek-1").read_bytes()
    gone = next(iter(sealed))
    old_wrapped = spool.data_key(gone)
    assert old_wrapped is not None and old_wrapped.kek == 1
    spool._write("DELETE FROM data_keys WHERE item=?", (gone,))  # as a purge does
    assert vault.rotate() == (2, True)
    assert KeyStore(tmp_path / "keys").versions() == [2]
    assert spool.data_key_versions() == [2]
    for item, stored in sealed.items():
        if item == gone:
            with pytest.raises(AtRestError, match="not in the spool"):
                vault.open_bytes(item, stored)
        else:
            assert vault.open_bytes(item, stored).startswith(b"receipt")
    # The purged item's old wrapped key opens with nothing left in the key folder.
    new_kek = (tmp_path / "keys" / "kek-2").read_bytes()
    with pytest.raises(InvalidUnwrap):
        aes_key_unwrap(new_kek, old_wrapped.wrapped)
    assert aes_key_unwrap(old_kek, old_wrapped.wrapped)  # (only the destroyed key did)
    spool.close()


def test_missing_key_version_is_named_at_start(tmp_path: Path) -> None:
    spool, _, _ = _spool_with_keys(tmp_path)
    (tmp_path / "keys" / "kek-1").unlink()
    (tmp_path / "keys" / "kek-2").write_bytes(os.urandom(32))
    os.chmod(tmp_path / "keys" / "kek-2", 0o600)
    with pytest.raises(AtRestError, match=r"version 1 .*is missing"):
        Vault(KeyStore(tmp_path / "keys"), spool).open()
    spool.close()


def test_a_rotation_waits_for_an_item_being_stored(tmp_path: Path) -> None:
    """A data key wrapped under kek-1 but not yet stored when the rotation starts is
    re-wrapped too: the rotation waits for the store to finish."""
    spool, vault, _ = _spool_with_keys(tmp_path, 1)
    item = "outbound-body:<late@hospital>"
    rotated = threading.Event()
    with vault.storing(item) as sealing:
        stored = sealing.seal(b"late body")

        def rotate() -> None:
            vault.rotate()
            rotated.set()

        rotation = threading.Thread(target=rotate)
        rotation.start()
        assert not rotated.wait(0.3)  # blocked while the item is being stored
        assert sealing.key is not None and sealing.key.kek == 1
        spool.put_data_key(sealing.key)
    rotation.join(30)
    assert rotated.is_set()
    assert vault.open_bytes(item, stored) == b"late body"
    assert spool.data_key_versions() == [2]
    spool.close()


def test_items_stored_together_hold_off_a_rotation_that_starts_between_them(
    tmp_path: Path,
) -> None:
    """Several items sealed for one spool transaction (receipts settled in a group) are
    in one block: a rotation that starts after the first is sealed waits for them all,
    and every key they were wrapped under is re-wrapped once they are stored."""
    spool, vault, _ = _spool_with_keys(tmp_path, 1)
    items = [f"outbound-receipt:<{n}@hospital>" for n in range(3)]
    rotated = threading.Event()
    with vault.storing_all(items) as sealings:
        stored = [sealings[0].seal(b"receipt 0")]

        def rotate() -> None:
            vault.rotate()
            rotated.set()

        rotation = threading.Thread(target=rotate)
        rotation.start()
        assert not rotated.wait(0.3)  # blocked while the items are being stored
        stored += [sealing.seal(b"receipt %d" % n) for n, sealing in enumerate(sealings) if n]
        for sealing in sealings:
            assert sealing.key is not None and sealing.key.kek == 1
            spool.put_data_key(sealing.key)
    rotation.join(30)
    assert rotated.is_set()
    assert [vault.open_bytes(i, s) for i, s in zip(items, stored, strict=True)] == [
        b"receipt 0",
        b"receipt 1",
        b"receipt 2",
    ]
    assert spool.data_key_versions() == [2]
    spool.close()


@pytest.mark.parametrize(
    "fault",
    [
        "--kill-after=gateway.atrest.keys:KeyStore.create",
        "--kill-after=gateway.spool.sqlite.datakeys:DataKeys.rewrap_data_keys",
        "--kill-after=gateway.spool.sqlite.database:Database.shred",
        "--kill-before=gateway.atrest.keys:KeyStore.destroy",
        "--kill-after=gateway.atrest.keys:KeyStore.destroy",
    ],
)
def test_a_rotation_killed_at_any_step_is_finished_at_the_next_start(
    tmp_path: Path, fault: str
) -> None:
    spool, _, sealed = _spool_with_keys(tmp_path)
    spool.close()
    run = subprocess.run(
        [
            sys.executable,
            str(ROOT / "tests" / "faultpoint.py"),
            fault,
            "--",
            sys.executable,
            "-m",
            "tests.atrest_rotate",
            str(tmp_path / "spool.sqlite3"),
            str(tmp_path / "keys"),
        ],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        capture_output=True,
        timeout=120,
    )
    assert run.returncode == -9, run.stderr.decode()
    spool = SqliteSpool(tmp_path / "spool.sqlite3", SystemClock())
    vault = Vault(KeyStore(tmp_path / "keys"), spool)
    vault.open()
    assert KeyStore(tmp_path / "keys").versions() == [2]
    assert spool.data_key_versions() == [2]
    for item, stored in sealed.items():
        assert vault.open_bytes(item, stored).startswith(b"receipt")
    spool.close()


def test_disposing_of_an_item_deletes_its_data_key_in_the_same_transaction(
    tmp_path: Path,
) -> None:
    """Receipts (received and sent) and finished records go with their data keys; the
    keys of what is still kept stay."""
    spool, vault, _ = _spool_with_keys(tmp_path, 0)
    for message_id in ("<gone@hospital>", "<kept@hospital>"):
        spool.add_intake(message_id, "lab", "a.hl7", "text/plain", tmp_path / "s", tmp_path / "p")
        with vault.storing(body_item(message_id)) as sealing:
            body = sealing.seal(b"sealed body")
            spool.mark_queued(message_id, None, [], "mic", 3, body=body, data_key=sealing.key)
        spool.mark_sending(message_id)
        with vault.storing(receipt_item(message_id)) as sealing:
            sealing.write(tmp_path / f"{message_id}.mdn", [b"receipt"])
            spool.mark_done(
                message_id,
                OutboundState.DELIVERED,
                "processed",
                tmp_path / f"{message_id}.mdn",
                data_key=sealing.key,
            )
    spool.inbound_begin("lab", "<in@lab>", "00", tmp_path / "doc")
    with vault.storing(sent_receipt_item("lab", "<in@lab>")) as sealing:
        spool.inbound_delivered(
            "lab", "<in@lab>", [], sealing.seal(b"our receipt"), data_key=sealing.key
        )
    assert len(spool.data_key_versions()) == 1
    later = "2999-01-01T00:00:00+00:00"
    for kind in (RetainedKind.RECEIPTS, RetainedKind.SPOOL):  # a record after its receipt
        found = spool.disposable(kind, later)
        assert spool.dispose([d for d in found if "kept" not in d.message_id])
    for item in (
        body_item("<gone@hospital>"),
        receipt_item("<gone@hospital>"),
        sent_receipt_item("lab", "<in@lab>"),
    ):
        assert spool.data_key(item) is None, item
    for item in (body_item("<kept@hospital>"), receipt_item("<kept@hospital>")):
        assert spool.data_key(item) is not None, item
    assert (
        vault.read_file(receipt_item("<kept@hospital>"), tmp_path / "<kept@hospital>.mdn")
        == b"receipt"
    )
    spool.close()


class _RotatingBetween(SqliteSpool):
    """A spool where a rotation happens right after an item's data key was read (the
    interleaving a purge and a send can have)."""

    vault: Vault | None = None

    def data_key(self, item: str) -> DataKey | None:
        found = super().data_key(item)
        if self.vault is not None:
            vault, self.vault = self.vault, None
            vault.rotate()
        return found


def test_a_read_racing_a_rotation_reads_the_key_again(tmp_path: Path) -> None:
    spool = _RotatingBetween(tmp_path / "spool.sqlite3", SystemClock())
    writer = Vault(KeyStore(tmp_path / "keys"), spool)
    writer.open()
    item = "outbound-body:<raced@hospital>"
    with writer.storing(item) as sealing:
        stored = sealing.seal(b"raced body")
        assert sealing.key is not None
        spool.put_data_key(sealing.key)
    reader = Vault(KeyStore(tmp_path / "keys"), spool)  # another process: its own cache
    reader.open()
    writer.rotate()  # the data key is under kek-2 now ...
    spool.vault = writer  # ... and kek-2 goes right after the reader reads the data key
    assert reader.open_bytes(item, stored) == b"raced body"
    assert KeyStore(tmp_path / "keys").versions() == [3]
    spool.close()


def test_an_encrypted_item_replaced_by_plaintext_is_refused(tmp_path: Path) -> None:
    """Plaintext is told apart by its first bytes, to read what was stored before at-rest
    encryption; an item with a data key in the spool was stored encrypted, so the same
    item in the clear is a replacement, refused like a changed byte (never sent or used)."""
    spool, vault, sealed = _spool_with_keys(tmp_path, 1)
    item = next(iter(sealed))
    forged = b"Content-Type: message/disposition-notification\r\n\r\nforged receipt"
    with pytest.raises(AtRestTamperedError, match="in the clear"):
        vault.open_bytes(item, forged)
    body = tmp_path / "body.as2"
    body.write_bytes(b"0\x82\x01\x00 a DER body written by someone else")
    spool.put_data_key(DataKey(body_item("<m1@hospital>"), 1, b"\0" * 40))
    with pytest.raises(AtRestTamperedError, match="in the clear"):
        vault.reader(body_item("<m1@hospital>"), body).close()
    # One from before at-rest encryption (no data key) is read as it is.
    assert vault.open_bytes("inbound-receipt:lab:<old@lab>", forged) == forged
    with vault.reader(body_item("<old@hospital>"), body) as handle:
        assert handle.read() == body.read_bytes()
    # Stored again in the clear (at-rest encryption turned off): its key goes with it.
    off = Vault(KeyStore(tmp_path / "keys"), spool, encrypt=False)
    with off.storing(item) as sealing:
        stored = sealing.seal(b"receipt kept in the clear")
        assert sealing.key is not None
        spool.put_data_key(sealing.key)
    assert spool.data_key(item) is None
    assert vault.open_bytes(item, stored) == b"receipt kept in the clear"
    spool.close()


def test_the_longest_item_names_a_peer_can_cause_are_stored(tmp_path: Path) -> None:
    """A sent receipt's item names the peer (peers.d/<name>.toml: up to 250 bytes) and
    the Message-ID the peer chose (up to 998 characters, RFC 4130): the receipt of such
    a message is kept, and read back, like any other."""
    spool, vault, _ = _spool_with_keys(tmp_path, 1)
    message_id = check_message_id("<" + "x" * 984 + "@lab.example>")
    assert len(message_id) == 998
    item = sent_receipt_item("p" * 250, message_id)
    with vault.storing(item) as sealing:
        stored = sealing.seal(b"the receipt sent")
        assert sealing.key is not None
        spool.put_data_key(sealing.key)
    assert vault.open_bytes(item, stored) == b"the receipt sent"
    spool.close()


def test_a_node_sharing_the_key_folder_wraps_under_the_key_another_node_rotated_to(
    tmp_path: Path,
) -> None:
    """Nodes on one spool share the key folder: after one node's purge rotated the key,
    what another node stores is wrapped under the new key, not the destroyed one (which
    it read before and keeps for the items it seals): readable by every node, and by
    itself after a restart."""
    spool = SqliteSpool(tmp_path / "spool.sqlite3", SystemClock())
    a, b = (Vault(KeyStore(tmp_path / "keys"), spool) for _ in range(2))
    a.open()
    b.open()
    before = "outbound-body:<before@hospital>"
    with b.storing(before) as sealing:
        stored = {before: sealing.seal(b"stored before the purge")}
        assert sealing.key is not None
        spool.put_data_key(sealing.key)
    assert a.rotate().version == 2  # node a's purge
    after = "outbound-body:<after@hospital>"
    with b.storing(after) as sealing:
        stored[after] = sealing.seal(b"stored after the purge")
        assert sealing.key is not None
        spool.put_data_key(sealing.key)
    assert [spool.data_key(item).kek for item in stored] == [2, 2]  # type: ignore[union-attr]
    restarted = Vault(KeyStore(tmp_path / "keys"), spool)
    restarted.open()
    for reader in (a, b, restarted):
        assert reader.open_bytes(after, stored[after]) == b"stored after the purge"
        assert reader.open_bytes(before, stored[before]) == b"stored before the purge"
    spool.close()


def test_a_rotation_on_one_node_between_anothers_sealing_and_its_commit_loses_nothing(
    tmp_path: Path, make_spool: MakeSpool
) -> None:
    """Node b seals an item under kek-1; node a (same spool, same key folder) rotates to
    kek-2 and destroys kek-1 before b commits the item's key: b's transaction wraps it
    under kek-2, so every node (and b after a restart) reads it."""
    spool_a, spool_b = make_spool(SystemClock()), make_spool(SystemClock())
    a, b = Vault(KeyStore(tmp_path / "keys"), spool_a), Vault(KeyStore(tmp_path / "keys"), spool_b)
    a.open()
    b.open()
    item = "outbound-body:<during@hospital>"
    with b.storing(item) as sealing:
        stored = sealing.seal(b"sealed while another node rotated")
        assert sealing.key is not None and sealing.key.kek == 1
        assert a.rotate().version == 2  # node a's purge, between b's sealing and b's commit
        assert not (tmp_path / "keys" / "kek-1").exists()
        spool_b.put_data_key(sealing.key)
    assert spool_a.data_key(item) is not None and spool_a.data_key(item).kek == 2  # type: ignore[union-attr]
    restarted = Vault(KeyStore(tmp_path / "keys"), make_spool(SystemClock()))
    restarted.open()
    for reader in (a, b, restarted):
        assert reader.open_bytes(item, stored) == b"sealed while another node rotated"


def test_rotations_on_one_node_while_another_stores_lose_no_item(
    tmp_path: Path, make_spool: MakeSpool
) -> None:
    """Node a rotates again and again while two threads of node b store items on the
    same spool and key folder: every item's key is stored under a key that still exists."""
    spool_a, spool_b = make_spool(SystemClock()), make_spool(SystemClock())
    a, b = Vault(KeyStore(tmp_path / "keys"), spool_a), Vault(KeyStore(tmp_path / "keys"), spool_b)
    a.open()
    b.open()
    stored: dict[str, bytes] = {}
    done = threading.Event()
    failures: list[BaseException] = []

    def store(thread: int) -> None:
        try:
            for n in range(40):
                item = f"outbound-body:<{thread}-{n}@hospital>"
                with b.storing(item) as sealing:
                    stored[item] = sealing.seal(item.encode())
                    assert sealing.key is not None
                    spool_b.put_data_key(sealing.key)
        except BaseException as exc:
            failures.append(exc)

    def rotate() -> None:
        try:
            while not done.is_set():
                a.rotate()
        except BaseException as exc:
            failures.append(exc)

    rotator = threading.Thread(target=rotate)
    storers = [threading.Thread(target=store, args=(t,)) for t in range(2)]
    rotator.start()
    for thread in storers:
        thread.start()
    for thread in storers:
        thread.join(timeout=120)
    done.set()
    rotator.join(timeout=120)
    assert not failures, failures
    restarted = Vault(KeyStore(tmp_path / "keys"), make_spool(SystemClock()))
    restarted.open()
    assert len(stored) == 80
    for item, sealed in stored.items():
        assert restarted.open_bytes(item, sealed) == item.encode()
