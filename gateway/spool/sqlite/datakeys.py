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

from gateway.errors import InvalidTypeError
from gateway.spool.records import DataKey
from gateway.spool.sql import Connection, Row, SqlStore


class DataKeys(SqlStore):
    """Wrapped data keys, by item."""

    def data_key(self, item: str) -> DataKey | None:
        row = self._one("SELECT item, kek, wrapped FROM data_keys WHERE item=?", (item,))
        return _data_key(row) if row else None

    def put_data_key(self, key: DataKey) -> None:
        self._transact(lambda db: self._store_key(db, key))

    def sample_data_keys(self, kek: int, around: str) -> list[DataKey]:
        """The data keys wrapped under ``kek`` nearest ``around`` by item, one on each
        side (none of ``around`` itself): at most two, read through the keys' indexes.

        The version is written in the text (a checked integer, as :func:`state_is`
        writes a state): PostgreSQL's generic plan of a version given as a parameter
        is an average version's share of the table, read by a scan of the whole table
        when no other data key of a version is there; written so, it is planned for
        that version's own rows."""
        version = _version(kek)
        side = (
            "SELECT item, kek, wrapped FROM data_keys WHERE kek={v} AND item{op}?"
            " ORDER BY item{order} LIMIT 1"
        )
        below = side.format(v=version, op="<", order=" DESC")
        above = side.format(v=version, op=">", order="")
        rows = self._read(
            f"SELECT * FROM ({below}) AS below UNION ALL SELECT * FROM ({above}) AS above",  # noqa: S608 - a checked integer only
            (around, around),
        )
        return [_data_key(r) for r in rows]

    def data_key_versions(self) -> list[int]:
        """The key-encryption key versions the stored data keys are wrapped under."""
        return [int(r["kek"]) for r in self._read("SELECT DISTINCT kek FROM data_keys", ())]

    def rewrap_data_keys(
        self, newest: Callable[[], int], rewrap: Callable[[DataKey, int], bytes]
    ) -> int:
        """Under the lock every store of a data key takes (``key_lock``): ``newest()`` (which
        may create a new key-encryption key) gives the version to wrap under, and every data
        key wrapped under another is re-wrapped under it (``rewrap``), in one transaction;
        returns that version."""

        def work(db: Connection) -> int:
            if self.key_lock:
                db.execute(self.key_lock)
            new = newest()
            rows = db.execute("SELECT item, kek, wrapped FROM data_keys WHERE kek<>?", (new,))
            keys = [_data_key(r) for r in rows.fetchall()]
            changed = [(rewrap(key, new), new, key.item) for key in keys]
            db.executemany("UPDATE data_keys SET wrapped=?, kek=? WHERE item=?", changed)
            return new

        return self._transact(work)


def _data_key(row: Row) -> DataKey:
    return DataKey(row["item"], int(row["kek"]), bytes(row["wrapped"]))


def _version(kek: int) -> int:
    """``kek``, a key-encryption key version to write into a statement's text: an
    integer, never anything else."""
    if type(kek) is not int:
        raise InvalidTypeError(
            f"a key-encryption key version written into a spool statement must be an"
            f" integer, not {type(kek).__name__} {kek!r}",
            fix="this is a bug in medgw; report it",
        )
    return kek
