"""The wrapped data keys of what is kept encrypted at rest (gateway.atrest).

A key is stored in the same transaction as the item it encrypts (see the
``data_key`` arguments of the outbound, inbound and settling writes) and deleted
in the transaction that disposes of the item (gateway.spool.sqlite.retention).
The writer connection runs with ``secure_delete``: a deleted key's bytes are
overwritten in the database file, and the SQLite database's ``shred`` checkpoints the
write-ahead log and truncates it, so that no copy is left in the ``-wal`` file.
"""

from __future__ import annotations

from collections.abc import Callable

from gateway.spool.records import DataKey
from gateway.spool.sql import Connection, SqlStore

INSERT = (
    "INSERT INTO data_keys (item, kek, wrapped) VALUES (?, ?, ?)"
    " ON CONFLICT (item) DO UPDATE SET kek=excluded.kek, wrapped=excluded.wrapped"
)


def key_statement(key: DataKey) -> tuple[str, tuple[object, ...]]:
    """The statement that stores ``key`` (run in the transaction that stores its item);
    one :meth:`DataKey.cleared` deletes the item's key."""
    if key.is_cleared:
        return "DELETE FROM data_keys WHERE item=?", (key.item,)
    return INSERT, (key.item, key.kek, key.wrapped)


class DataKeys(SqlStore):
    """Wrapped data keys, by item."""

    def data_key(self, item: str) -> DataKey | None:
        row = self._one("SELECT item, kek, wrapped FROM data_keys WHERE item=?", (item,))
        return DataKey(row["item"], int(row["kek"]), bytes(row["wrapped"])) if row else None

    def put_data_key(self, key: DataKey) -> None:
        self._write(*key_statement(key))

    def data_key_versions(self) -> list[int]:
        """The key-encryption key versions the stored data keys are wrapped under."""
        return [int(r["kek"]) for r in self._read("SELECT DISTINCT kek FROM data_keys", ())]

    def rewrap_data_keys(self, old: int, new: int, rewrap: Callable[[DataKey], bytes]) -> int:
        """Every data key wrapped under ``old`` wrapped under ``new`` instead, in one
        transaction; returns how many."""

        def work(db: Connection) -> int:
            rows = db.execute("SELECT item, kek, wrapped FROM data_keys WHERE kek=?", (old,))
            changed = [
                (rewrap(DataKey(r["item"], int(r["kek"]), bytes(r["wrapped"]))), new, r["item"])
                for r in rows.fetchall()
            ]
            db.executemany("UPDATE data_keys SET wrapped=?, kek=? WHERE item=?", changed)
            return len(changed)

        return self._transact(work)
