"""What a gateway keeps encrypted at rest (gateway.atrest), read back the way the daemon
does: its spool's data keys, its key folder's key-encryption keys."""

from __future__ import annotations

from pathlib import Path

from gateway.atrest import KeyStore, Vault
from gateway.clock import SystemClock
from gateway.config import load_config
from gateway.outbound.status import MAX_SEALED_RECEIPT
from gateway.spool import SqliteSpool
from gateway.spool.records import receipt_item, sent_receipt_item


def kept_file(config_path: Path, item: str, path: Path) -> bytes:
    """The plaintext of the kept file ``path`` of ``item``."""
    config = load_config(config_path)
    assert config.at_rest is not None
    spool = SqliteSpool(config.storage.spool_path, SystemClock())
    try:
        return Vault(KeyStore(config.at_rest.key_dir), spool).read_file(item, path)
    finally:
        spool.close()


def kept_receipt(config_path: Path, message_id: str, path: Path | None = None) -> bytes:
    """The receipt received for outbound ``message_id``, as stored (headers, body): from
    its spool row, or (a receipt kept as a file) from the file ``path``."""
    config = load_config(config_path)
    assert config.at_rest is not None
    spool = SqliteSpool(config.storage.spool_path, SystemClock())
    try:
        vault = Vault(KeyStore(config.at_rest.key_dir), spool)
        stored = spool.stored_receipt(message_id, MAX_SEALED_RECEIPT)
        if stored is not None:
            return vault.open_bytes(receipt_item(message_id), stored)
        assert path is not None, f"no receipt of {message_id} in its row, and no file named"
        return vault.read_file(receipt_item(message_id), path)
    finally:
        spool.close()


def stored_receipt(config_path: Path, message_id: str) -> bytes | None:
    """The receipt of outbound ``message_id`` as its spool row keeps it (sealed), if any."""
    config = load_config(config_path)
    spool = SqliteSpool(config.storage.spool_path, SystemClock())
    try:
        return spool.stored_receipt(message_id, MAX_SEALED_RECEIPT)
    finally:
        spool.close()


def sent_receipt(config_path: Path, peer: str, message_id: str) -> bytes | None:
    """The receipt stored for inbound ``message_id`` of ``peer`` (None: none stored), as
    its sender keeps the receipt it receives: its Content-Type line and body."""
    config = load_config(config_path)
    assert config.at_rest is not None
    spool = SqliteSpool(config.storage.spool_path, SystemClock())
    try:
        record = spool.inbound_get(peer, message_id)
        if record is None or record.state != "delivered" or record.receipt_body is None:
            return None
        vault = Vault(KeyStore(config.at_rest.key_dir), spool)
        body = vault.open_bytes(sent_receipt_item(peer, message_id), record.receipt_body)
        content_type = dict(record.receipt_headers)["Content-Type"]
        return f"Content-Type: {content_type}\r\n\r\n".encode() + body
    finally:
        spool.close()
