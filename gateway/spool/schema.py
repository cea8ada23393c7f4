"""The spool's SQLite tables, and the columns added to them since the first release."""

from __future__ import annotations

import re
import sqlite3

from gateway.audit.owed import KEPT_BY_ROW

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
-- must be index lookups, not a scan and sort of the whole queue per message (the
-- indexes of one state each: see ADDED_INDEXES).
DROP INDEX IF EXISTS outbound_due;
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
-- Its index, by version and item: see ADDED_INDEXES.
-- The record a node's change of a row owes (the row's audited_by, audit_owed and
-- audit_owed_at), once the row passes to another node before that node's change owes
-- its own (see DISPLACES): kept by the tables' triggers, in the transaction of that
-- change, until the owing node's next start has written it to its trail if a kill cut
-- it off.  One per node and row (source: the table), the row as it was then (JSON,
-- binary columns left out).
CREATE TABLE IF NOT EXISTS displaced_owed (
    node            TEXT NOT NULL,
    source          TEXT NOT NULL,
    peer            TEXT NOT NULL,
    message_id      TEXT NOT NULL,
    owed_at         TEXT NOT NULL,
    snapshot        TEXT NOT NULL,
    PRIMARY KEY (node, source, peer, message_id)
);
-- A row disposed of (retention) takes its kept copies with it.
CREATE INDEX IF NOT EXISTS displaced_owed_row ON displaced_owed (source, peer, message_id);
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
    # The Idempotency-Key a local submitter sent with the document (NULL: none): a resend
    # under the same key is answered with this message, never spooled again.
    ("submissions", "idempotency_key", "TEXT"),
    # The SHA-256 (hex) of the document as that submitter sent it, kept with its key: a
    # resend under the key with other content is refused, not answered with this message
    # (NULL: no key, or recorded before fingerprints were kept).
    ("submissions", "content_sha256", "TEXT"),
    # The signed receipt (MDN) received for a message, stored as its file was (its
    # Content-Type line, then its body; sealed under receipt_item when encrypted at
    # rest).  NULL: no receipt in the row (none yet, or kept in the file receipt_path
    # names: a receipt larger than a row keeps, or one settled before this column).
    ("outbound", "receipt", "BLOB"),
    # The SHA-256 (hex) of that receipt as received (before encryption at rest), which
    # the audit record of its settlement names: set and cleared with ``receipt``.  Text,
    # so that the copy of the row a displaced record keeps (binary columns left out)
    # still tells that the row kept a receipt, and which (NULL: none in the row).
    ("outbound", "receipt_sha256", "TEXT"),
    # 1 from the commit that disposes of a hand-over's inbox copy (copy_purged_at) until
    # its file is removed (gateway.retention): a process killed in between leaves the
    # file, found again by this; the record goes only once it is 0.
    ("handover", "copy_pending", "INTEGER NOT NULL DEFAULT 0"),
)


def columns(table: str) -> tuple[str, ...]:
    """The columns ``table`` has once created or upgraded: SCHEMA's, then those added."""
    found = re.search(rf"CREATE TABLE IF NOT EXISTS {table} \((.*?)\n\);", SCHEMA, re.S)
    assert found is not None, table
    lines = (line.split() for line in found.group(1).splitlines())
    first = [words[0] for words in lines if words and words[0] not in ("PRIMARY", "--")]
    return (*first, *(column for name, column, _ in ADDED_COLUMNS if name == table))


def file_name(column: str) -> str:
    """SQL for the file name in the path ``column`` holds (what follows its last "/"),
    in functions SQLite and PostgreSQL both have, neither having one of its own:
    ``rtrim`` strips the characters other than "/" from the end, what is left is the
    folder.  Deterministic, so an index can be built on it (the same text in a query
    finds that index)."""
    return f"substr({column}, length(rtrim({column}, replace({column}, '/', ''))) + 1)"


# Indexes on columns added after the first release (created after them).
ADDED_INDEXES = (
    # The sender's loop's lookups (see SCHEMA), each an index of the rows in the one state
    # it asks about: a message's other changes of state (taken in, claimed, sent, settled)
    # leave these indexes as they are, instead of moving its entry in each, a page
    # written per index and change.  Their first forms held every row, by state.
    "DROP INDEX IF EXISTS outbound_next",
    "DROP INDEX IF EXISTS outbound_expiry",
    "DROP INDEX IF EXISTS outbound_unanswered",
    "CREATE INDEX IF NOT EXISTS outbound_queued ON outbound"
    " (peer, next_attempt_at, created_at) WHERE state='queued'",
    "CREATE INDEX IF NOT EXISTS outbound_expiring ON outbound"
    " (peer, expires_at) WHERE state='queued' AND expires_at>0",
    "CREATE INDEX IF NOT EXISTS outbound_awaiting ON outbound"
    " (peer, updated_at) WHERE state='awaiting-receipt'",
    # Leases are renewed and taken over by state: index lookups.  The peer beside the
    # state makes it the index the queue is counted from (by state and peer, read whole
    # but a fraction of the table's pages: OutboundQueue.counts) at no write of its own:
    # every change of state moves a message's entry in it anyway, and the peer never
    # changes.  Its first form, (state, lease_until), had no peer: the count read the
    # whole table (an index of (peer, state) would move with every change of state, a
    # page more each time).
    "DROP INDEX IF EXISTS outbound_lease",
    "CREATE INDEX IF NOT EXISTS outbound_state ON outbound (state, peer, lease_until)",
    # And the received messages' and hand-overs' leases.
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
    # Retention's sweep asks for the inbox copies disposed of whose files are still to be
    # removed (few, and only after a kill): an index of those alone.
    "CREATE INDEX IF NOT EXISTS handover_copy_pending ON handover (peer, message_id)"
    " WHERE copy_pending=1",
    # One message per submitter and Idempotency-Key, whichever node took it: the index
    # decides between two submissions with one key at once.
    "CREATE UNIQUE INDEX IF NOT EXISTS submissions_key ON submissions"
    " (submitted_by, idempotency_key) WHERE idempotency_key IS NOT NULL",
    # An operator's listing of one peer's messages, newest first (`medgw queue list
    # --peer`, the local API's /v1/queue?peer=): that peer's rows in that order, not every
    # row newest first (mostly other peers' and delivered messages kept for months) until
    # enough are found.  Neither column changes once a message is taken in.
    "CREATE INDEX IF NOT EXISTS outbound_peer ON outbound (peer, created_at)",
    # One message's hand-overs, whichever peer sent it (an operator's retry: `medgw
    # handover retry`, the local API): the key begins with the peer, so without this the
    # whole table was read (mostly hand-overs done, kept for months).
    "CREATE INDEX IF NOT EXISTS handover_message ON handover (message_id)",
    # Retention's batches (gateway.spool.sqlite.retention), oldest first: the rows of each
    # rule in the order it takes them, not every row the table keeps read and sorted for
    # each batch of 64.  The inbox copies still kept are few beside the hand-overs done
    # whose copy went (kept for years, `handover_days` against `received_days`), and the
    # receipts sent still kept beside the received messages whose receipt went: each rule
    # has an index of its own rows, those of the records (what they held gone first)
    # apart from those of the copies and receipts.  A finished row's time never changes
    # (disposing of its copy or receipt moves it from one index to the other).  The state
    # before the time: SQLite, without statistics, reckons a lookup of one state in the
    # leases' indexes (state first) cheaper than a range of times in an index of the
    # time alone, and read every row in that state and sorted it for each batch; with
    # the state first, one index finds the batch by state and time, in its order.  Their
    # first forms had the time alone, and the records' indexes every row done or answered.
    "DROP INDEX IF EXISTS handover_copy_kept",
    "DROP INDEX IF EXISTS handover_done",
    "DROP INDEX IF EXISTS inbound_receipt_kept",
    "DROP INDEX IF EXISTS inbound_delivered",
    "CREATE INDEX IF NOT EXISTS handover_copy_kept_at ON handover (state, updated_at)"
    " WHERE state='done' AND copy_purged_at IS NULL",
    "CREATE INDEX IF NOT EXISTS handover_copy_gone_at ON handover (state, updated_at)"
    " WHERE state='done' AND copy_purged_at IS NOT NULL",
    "CREATE INDEX IF NOT EXISTS inbound_receipt_kept_at ON inbound (state, updated_at)"
    " WHERE state='delivered' AND receipt_body IS NOT NULL",
    "CREATE INDEX IF NOT EXISTS inbound_receipt_gone_at ON inbound (state, updated_at)"
    " WHERE state='delivered' AND receipt_body IS NULL",
    # The data keys of one version nearest an item (DataKeys.sample_data_keys, at every
    # status request of a receipt whose key does not unwrap): found in the index by
    # version and item, the nearest first, not every data key of the version read and
    # sorted.  Its first form had the version alone.
    "DROP INDEX IF EXISTS data_keys_kek",
    "CREATE INDEX IF NOT EXISTS data_keys_kek_item ON data_keys (kek, item)",
)
# SQLite's alone (PostgreSQL reads these rows through outbound_updated, by its statistics).
# Retention's batches of the records of messages sent (gateway.spool.sqlite.retention):
# the messages delivered or cancelled whose receipt went, oldest first, each state read
# apart (SqlStore.reads_states_apart), of every peer (a purge) or of one (the sweep).
# Without them, SQLite read every message delivered or cancelled through outbound_state
# and sorted them for each batch of 64.  A settlement never enters them (the row keeps
# its receipt): the disposal of a receipt does, and the record's removes it.  Those of
# the receipts still kept would be entered by every settlement, a page more each
# (bench/README.md): that rule still reads outbound_state.
SQLITE_INDEXES = (
    "CREATE INDEX IF NOT EXISTS outbound_receipt_gone_at ON outbound (state, updated_at)"
    " WHERE state IN ('delivered', 'cancelled') AND receipt_path IS NULL AND receipt IS NULL",
    "CREATE INDEX IF NOT EXISTS outbound_peer_receipt_gone_at ON outbound"
    " (state, peer, updated_at)"
    " WHERE state IN ('delivered', 'cancelled') AND receipt_path IS NULL AND receipt IS NULL",
)


# The tables whose rows name the record their last audited change owes, and those of
# their columns that hold binary data (documents, bodies, receipts): left out of the
# snapshot a displaced record keeps.
OWING_TABLES = ("outbound", "inbound", "handover")
BINARY_COLUMNS = frozenset(re.findall(r"(\w+)\s+BLOB\b", SCHEMA)) | {
    column for _, column, kind in ADDED_COLUMNS if kind.split()[0] == "BLOB"
}
# When a change of a row passes it to another node, which may displace the record the
# row's last audited change owes: the change names another node as the one that holds
# the row (``node``: a claim, a take-over) or as the one whose record its own change
# owes (``audited_by``), and that record is not one the row keeps otherwise
# (KEPT_BY_ROW).  The row is kept as it was at the first such change after the audited
# one (as that change left it, before another node's claim counts its attempt).  Only
# work across nodes meets it (a take-over, another node's send of a message whose last
# attempt failed, an operator's action on another node): never a node's own steps, nor
# a message queued on one node and sent by another.
DISPLACES = (
    "OLD.audited_by IS NOT NULL AND OLD.audit_owed IS NOT NULL"
    " AND OLD.audit_owed_at IS NOT NULL"
    " AND (NEW.audited_by <> OLD.audited_by OR NEW.node <> OLD.audited_by)"
    " AND OLD.audit_owed NOT IN ({})".format(", ".join(sorted(f"'{e}'" for e in KEPT_BY_ROW)))
)
# The columns a change of which may displace a record (see DISPLACES).
DISPLACING_COLUMNS = "audited_by, node"


def keep_displaced(source: str, snapshot: str) -> str:
    """The statement of a trigger that keeps the record a change displaces (see
    DISPLACES) in ``displaced_owed``: ``source`` (the table's name) and ``snapshot`` (the
    row before the change, as JSON text), expressions of the trigger's language."""
    return (
        "INSERT INTO displaced_owed (node, source, peer, message_id, owed_at, snapshot)"  # noqa: S608 - fixed text
        f" VALUES (OLD.audited_by, {source}, OLD.peer, OLD.message_id, OLD.audit_owed_at,"
        f" {snapshot}) ON CONFLICT (node, source, peer, message_id)"
        " DO UPDATE SET owed_at=excluded.owed_at, snapshot=excluded.snapshot"
        # The same record displaced again (by a claim, then a change): the first stays.
        " WHERE displaced_owed.owed_at <> excluded.owed_at"
    )


def _displacing_trigger(db: sqlite3.Connection, table: str) -> str:
    """SQLite's trigger of ``table`` that keeps a displaced record (see DISPLACES), its
    snapshot of every column the table has now (but binary ones)."""
    columns = [r[1] for r in db.execute(f"PRAGMA table_info({table})")]
    pairs = ", ".join(f"'{c}', OLD.{c}" for c in columns if c not in BINARY_COLUMNS)
    keep = keep_displaced(f"'{table}'", f"json_object({pairs})")
    return (
        f"CREATE TRIGGER {table}_displaced_owed AFTER UPDATE OF {DISPLACING_COLUMNS} ON {table}"
        f" WHEN {DISPLACES} BEGIN {keep}; END"
    )


def create_or_upgrade(db: sqlite3.Connection) -> None:
    """Create the tables (a new spool) or add the columns an older one lacks, and the
    triggers that keep displaced records (made again when the columns changed)."""
    db.executescript(SCHEMA)
    for table, column, kind in ADDED_COLUMNS:
        present = {r[1] for r in db.execute(f"PRAGMA table_info({table})")}
        if column not in present:
            db.execute(f"ALTER TABLE {table} ADD COLUMN {column} {kind}")
    for statement in (*ADDED_INDEXES, *SQLITE_INDEXES):
        db.execute(statement)
    for table in OWING_TABLES:
        trigger = _displacing_trigger(db, table)
        name = f"{table}_displaced_owed"
        found = db.execute(
            "SELECT sql FROM sqlite_master WHERE type='trigger' AND name=?", (name,)
        ).fetchone()
        if found is None or found[0] != trigger:
            db.execute(f"DROP TRIGGER IF EXISTS {name}")
            db.execute(trigger)
