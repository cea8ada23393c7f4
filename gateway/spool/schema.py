"""The spool's SQLite tables, and the columns added to them since the first release."""

from __future__ import annotations

import sqlite3

SCHEMA = """
CREATE TABLE IF NOT EXISTS outbound (
    message_id      TEXT PRIMARY KEY,
    peer            TEXT NOT NULL,
    filename        TEXT NOT NULL,
    content_type    TEXT NOT NULL,
    source_path     TEXT NOT NULL,
    payload_path    TEXT NOT NULL,
    body_path       TEXT,
    headers         TEXT,
    mic             TEXT,
    size            INTEGER,
    state           TEXT NOT NULL,
    attempts        INTEGER NOT NULL DEFAULT 0,
    next_attempt_at REAL NOT NULL DEFAULT 0,
    last_error      TEXT,
    disposition     TEXT,
    receipt_path    TEXT,
    expires_at      REAL NOT NULL DEFAULT 0,
    zone            TEXT,
    origin_peer     TEXT,
    origin_zone     TEXT,
    created_at      TEXT NOT NULL,
    updated_at      TEXT NOT NULL
);
-- The sender's loop asks for the next message, and for the expired ones, after
-- every send: with a backlog of thousands (a peer back after an outage) these
-- must be index lookups, not a scan and sort of the whole queue per message.
DROP INDEX IF EXISTS outbound_due;
CREATE INDEX IF NOT EXISTS outbound_next ON outbound (peer, state, next_attempt_at, created_at);
CREATE INDEX IF NOT EXISTS outbound_expiry ON outbound (peer, state, expires_at);
CREATE INDEX IF NOT EXISTS outbound_unanswered ON outbound (peer, state, updated_at);
CREATE INDEX IF NOT EXISTS outbound_created ON outbound (created_at);
CREATE TABLE IF NOT EXISTS inbound (
    peer            TEXT NOT NULL,
    message_id      TEXT NOT NULL,
    sha256          TEXT NOT NULL,
    target_path     TEXT NOT NULL,
    state           TEXT NOT NULL,
    receipt_headers TEXT,
    receipt_body    BLOB,
    received_at     TEXT NOT NULL,
    updated_at      TEXT NOT NULL,
    PRIMARY KEY (peer, message_id)
);
CREATE INDEX IF NOT EXISTS inbound_target ON inbound (target_path);
CREATE TABLE IF NOT EXISTS submissions (
    message_id      TEXT PRIMARY KEY,
    submitted_by    TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS handover (
    peer            TEXT NOT NULL,
    message_id      TEXT NOT NULL,
    service         TEXT,
    path            TEXT NOT NULL,
    content_type    TEXT NOT NULL,
    sha256          TEXT NOT NULL,
    size            INTEGER NOT NULL,
    state           TEXT NOT NULL,
    attempts        INTEGER NOT NULL DEFAULT 0,
    next_attempt_at REAL NOT NULL DEFAULT 0,
    last_error      TEXT,
    created_at      TEXT NOT NULL,
    updated_at      TEXT NOT NULL,
    expires_at      REAL NOT NULL DEFAULT 0,
    PRIMARY KEY (peer, message_id)
);
DROP INDEX IF EXISTS handover_due;
CREATE INDEX IF NOT EXISTS handover_next ON handover (state, next_attempt_at, created_at);
-- The data key of each item kept encrypted at rest (gateway.atrest), wrapped under the
-- key-encryption key of version kek (a file outside the state folder).
CREATE TABLE IF NOT EXISTS data_keys (
    item            TEXT PRIMARY KEY,
    kek             INTEGER NOT NULL,
    wrapped         BLOB NOT NULL
);
CREATE INDEX IF NOT EXISTS data_keys_kek ON data_keys (kek);
CREATE TABLE IF NOT EXISTS peer_control (
    peer            TEXT PRIMARY KEY,
    suspended       INTEGER NOT NULL,
    reason          TEXT,
    actor           TEXT,
    changed_at      TEXT NOT NULL
);
"""


# Columns added after the first release, for spools created before them.
ADDED_COLUMNS = (
    ("outbound", "zone", "TEXT"),
    ("outbound", "origin_peer", "TEXT"),
    ("outbound", "origin_zone", "TEXT"),
    ("outbound", "service", "TEXT"),
    ("inbound", "service", "TEXT"),
    # The hidden file a received document is written to before it takes its name in
    # the inbox (NULL: recorded before work files), and the document's size.
    ("inbound", "work_path", "TEXT"),
    ("inbound", "size", "INTEGER"),
    ("handover", "expires_at", "REAL NOT NULL DEFAULT 0"),
    # SHA-256 of the peer certificate a queued message is encrypted to (NULL: before this
    # was recorded): a rotation that drops it can be told about (see daemon).
    ("outbound", "encrypted_for", "TEXT"),
    # The AS2 body of a small message (see OutboundRecord.body); NULL: in body_path.
    ("outbound", "body", "BLOB"),
    # When the inbox copy of a handed-over document was disposed of (gateway.retention).
    ("handover", "copy_purged_at", "TEXT"),
    # Claims of several nodes sharing a spool: the node holding a message (preparing or
    # sending it, writing a received one) and until when (seconds since the epoch; 0:
    # no lease).  NULL node: claimed before nodes were recorded.
    ("outbound", "node", "TEXT"),
    ("outbound", "lease_until", "REAL NOT NULL DEFAULT 0"),
    ("inbound", "node", "TEXT"),
    ("inbound", "lease_until", "REAL NOT NULL DEFAULT 0"),
    # The node handing a document over to the internal system (a pending hand-over it
    # took to POST) and until when; NULL node: nobody holds it.
    ("handover", "node", "TEXT"),
    ("handover", "lease_until", "REAL NOT NULL DEFAULT 0"),
    # A small document taken in, its copy (encrypted at rest) kept in the row until it
    # is sealed (see OutboundRecord.payload); NULL: in payload_path.
    ("outbound", "payload", "BLOB"),
    # The node that made the message's last change an audit record follows (queued,
    # settled, given up, retried): that record is in its trail (NULL: before this was
    # recorded).  Its recovery writes the record if a kill cut it off.
    ("outbound", "audited_by", "TEXT"),
    # The node that queued it (signed and encrypted it): its message.accepted is in that
    # node's trail, whichever node sends it (NULL: before this was recorded).
    ("outbound", "queued_by", "TEXT"),
    # The audit event that change of audited_by's owes (written after the commit), and
    # when the change was made: a record of it at that time or later is in that node's
    # trail unless a kill cut it off (NULL: changed before this was recorded).
    ("outbound", "audit_owed", "TEXT"),
    ("outbound", "audit_owed_at", "TEXT"),
    # The same of a received message (its receipt stored: receipt.sent) and of a
    # hand-over (done, failed, retried by an operator).
    ("inbound", "audited_by", "TEXT"),
    ("inbound", "audit_owed", "TEXT"),
    ("inbound", "audit_owed_at", "TEXT"),
    ("handover", "audited_by", "TEXT"),
    ("handover", "audit_owed", "TEXT"),
    ("handover", "audit_owed_at", "TEXT"),
    # The identity of the outbox file a message was taken from, as it was then (device,
    # inode, size, modification and change times; NULL: not from an outbox, or before
    # this was recorded): a node killed before removing it tells, at its next start,
    # the file another node sent from a new document dropped under the same name.
    ("outbound", "source_file", "TEXT"),
)


def file_name(column: str) -> str:
    """SQL for the file name in the path ``column`` holds (what follows its last "/"),
    in functions SQLite and PostgreSQL both have, neither having one of its own:
    ``rtrim`` strips the characters other than "/" from the end, what is left is the
    folder.  Deterministic, so an index can be built on it (the same text in a query
    finds that index)."""
    return f"substr({column}, length(rtrim({column}, replace({column}, '/', ''))) + 1)"


# Indexes on columns added after the first release (created after them).
ADDED_INDEXES = (
    # Leases are renewed and taken over by state and expiry: index lookups.
    "CREATE INDEX IF NOT EXISTS outbound_lease ON outbound (state, lease_until)",
    "CREATE INDEX IF NOT EXISTS inbound_lease ON inbound (state, lease_until)",
    "CREATE INDEX IF NOT EXISTS handover_lease ON handover (state, lease_until)",
    # Recovery reads the rows changed since the audit trail's last record.
    "CREATE INDEX IF NOT EXISTS outbound_updated ON outbound (updated_at)",
    # And the received messages and hand-overs whose audited change came since.
    "CREATE INDEX IF NOT EXISTS inbound_owed ON inbound (audit_owed_at)",
    "CREATE INDEX IF NOT EXISTS handover_owed ON handover (audit_owed_at)",
    # The start's sweeps of the payloads and receipts folders ask about the files they
    # find, by file name (a row keeps the whole path, and the state folder may have been
    # moved or restored elsewhere since): an index lookup per file, however many rows.
    f"CREATE INDEX IF NOT EXISTS outbound_payload_name ON outbound ({file_name('payload_path')})",
    # A receipts folder holds as many files as the receipts its node keeps: the path
    # beside the name, so that SQLite answers from the index alone (and PostgreSQL need
    # not work the name out again for each row found).  Its first form had the name only.
    "DROP INDEX IF EXISTS outbound_receipt_name",
    "CREATE INDEX IF NOT EXISTS outbound_receipt_file ON outbound"
    f" ({file_name('receipt_path')}, receipt_path)",
    # The start's sweep of the outbox asks about the files it finds, by path.
    "CREATE INDEX IF NOT EXISTS outbound_source ON outbound (source_path)",
)


def create_or_upgrade(db: sqlite3.Connection) -> None:
    """Create the tables (a new spool) or add the columns an older one lacks."""
    db.executescript(SCHEMA)
    for table, column, kind in ADDED_COLUMNS:
        present = {r[1] for r in db.execute(f"PRAGMA table_info({table})")}
        if column not in present:
            db.execute(f"ALTER TABLE {table} ADD COLUMN {column} {kind}")
    for statement in ADDED_INDEXES:
        db.execute(statement)
