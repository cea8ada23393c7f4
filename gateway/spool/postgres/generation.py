"""The spool database's generation: a random token that every restore replaces.

A restore (gateway.backup.restore) replaces the spool's tables while no node is
connected to the database; but a node that is running while the database cannot be
reached (its connections lost, trying again after a back-off) has no session to be
seen, and what it holds in memory (claims, leases, owed records, the positions it
read) belongs to the spool it started on.  So each node reads the generation in its
start's transaction, and checks it on every connection it opens afterwards, before
the connection is used: a different token means the spool was restored while the
node ran, and the node stops (gateway.spool.postgres.database).

The token is in a table of its own, which no backup holds (a restored dump would
bring back the generation of the spool it was taken from).  A restore writes a new
one while it holds the lock every node's start takes (:data:`SCHEMA_LOCK`), and a
node's check takes that lock shared: a node reconnecting while a restore runs waits
for it (at most its ``connect_timeout``, then tries again later), and once the
restore is over it reads the new token.
"""

from __future__ import annotations

import secrets

from gateway.spool.postgres.schema import GENERATION_TABLE, SCHEMA_LOCK
from gateway.spool.sql import Connection

TABLE = "spool_generation"
# A node's check: the lock shared (a restore holds it whole), then the token, read by a
# statement of its own (its snapshot taken once the lock is held).
SHARED = f"SELECT pg_advisory_xact_lock_shared({SCHEMA_LOCK})"
READ = f"SELECT token FROM {TABLE}"  # noqa: S608 (our name)


def renew(db: Connection) -> str:
    """A fresh random token in place of the one there (the table made if missing), in
    the caller's transaction; the token."""
    token = secrets.token_hex(16)
    put(db, token)
    return token


def put(db: Connection, token: str) -> None:
    """``token`` in place of the one there (the table made if missing), in the caller's
    transaction."""
    db.execute(GENERATION_TABLE, ())
    db.execute(f"DELETE FROM {TABLE}", ())  # noqa: S608
    db.execute(f"INSERT INTO {TABLE} (token) VALUES (?)", (token,))  # noqa: S608


def read(db: Connection) -> str | None:
    """The token there, if the spool has one."""
    there = db.execute(f"SELECT to_regclass('{TABLE}') AS t", ()).fetchall()
    if there and there[0]["t"] is not None:
        rows = db.execute(READ, ()).fetchall()
        if len(rows) == 1:
            return str(rows[0]["token"])
    return None


def current(db: Connection) -> str:
    """The token (a new one if the spool has none yet: a spool made or upgraded now),
    in the caller's transaction, which holds :data:`SCHEMA_LOCK`."""
    token = read(db)
    return token if token is not None else renew(db)
