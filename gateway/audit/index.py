"""An index beside each audit log file, so that a review of a year stays fast.

``medgw audit query`` with ``--patient``, ``--actor``, ``--event`` or ``--peer``
and ``medgw audit patients`` would otherwise read every line of the window (and
the 31 days before it) in Python.  The index holds, per record, where its line
is, its time and what the filters look at: event, actor, peer, the document it
is about (peer and message ID, hashed), the patients it names.

It is derived data, never the authority:

- One SQLite file per log file, ``<log file>.index`` in the same folder, with the
  log's permissions.  A closed (rotated) file's index never changes; the current
  file's index is brought up to date by each review that uses it (only the lines
  appended since are read), so the writer does no work for it at all.
- It is bound to the log: it records the hash of the first and of the last record
  it covers and where they are.  A log that no longer has them there (rewritten,
  cut short, replaced, restored from a backup) gets its index built again from the
  log, as does an index that is missing, unreadable, of another version or corrupt.
  Deleting it is always safe.
- ``query`` reads every record it shows from the log itself: the line must be a
  whole line of the log at the place the index gives, carry the hash the index
  has for it, and pass the filters again.  So an index cannot show a record that
  is not in the log, nor one under a filter it does not match; a line that does
  not carry the expected hash makes the index be built again and the query go on.
- ``patients`` counts from the index (reading a year of lines is what it avoids).

The results are those of reading the log (:mod:`gateway.audit.query`): the same
window (found by the same bisection), the same linking of a document's records to
the patients it named up to 31 days before the window, the same filters applied
to the same lines.  The one difference: the scan remembers at most a million
documents for linking; the index remembers all.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import sqlite3
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, BinaryIO

from gateway.audit.files import closed_files, is_closed_name
from gateway.audit.order import ordered
from gateway.audit.query import (
    LINK_BEFORE,
    Filters,
    PatientAccesses,
    Window,
    actor_of,
    document_of,
    parse,
    patients_of,
    reach,
    select,
    start_offset,
    time_of,
    window,
)
from gateway.errors import MedgwError

VERSION = "1"
SUFFIX = ".index"
BATCH = 20_000  # rows inserted at once
CACHED_IDS = 100_000  # names and patient sets remembered while building; the rest in SQLite
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_MICROSECOND = timedelta(microseconds=1)
_LOW, _HIGH = -(2**62), 2**62  # an unbounded window's ends, in microseconds

_SCHEMA = """
CREATE TABLE meta(key TEXT PRIMARY KEY, value) WITHOUT ROWID;
CREATE TABLE names(id INTEGER PRIMARY KEY, value TEXT NOT NULL UNIQUE);
CREATE TABLE psets(id INTEGER PRIMARY KEY, patients TEXT NOT NULL UNIQUE);
CREATE TABLE members(patient TEXT NOT NULL, pset INTEGER NOT NULL);
CREATE TABLE records(
    offset INTEGER PRIMARY KEY,  -- of the line in the log file
    length INTEGER NOT NULL,     -- of the line, its newline included
    hash BLOB NOT NULL,          -- the first 8 bytes of the record's hash
    time INTEGER NOT NULL,       -- microseconds since 1970, UTC
    event INTEGER, actor INTEGER, peer INTEGER,  -- names.id
    document INTEGER,            -- the peer and message ID it is about, hashed
    pset INTEGER                 -- psets.id: the patients it names
);
"""
_INDEXES = """
CREATE INDEX IF NOT EXISTS members_patient ON members(patient);
CREATE INDEX IF NOT EXISTS records_event ON records(event, offset);
CREATE INDEX IF NOT EXISTS records_actor ON records(actor, offset);
CREATE INDEX IF NOT EXISTS records_document ON records(document, offset);
CREATE INDEX IF NOT EXISTS records_pset ON records(pset, offset) WHERE pset IS NOT NULL;
"""


class AuditIndexError(MedgwError):
    """An audit log's index cannot be used (not writable, or the log changes under it)."""


def index_path(log: Path) -> Path:
    return log.with_name(log.name + SUFFIX)


def micros(stamp: bytes) -> int:
    """A time as :func:`gateway.audit.query.time_of` reads it, in microseconds since 1970."""
    return (datetime.fromisoformat(stamp.decode()) - _EPOCH) // _MICROSECOND


def _bound(stamp: bytes | None, default: int) -> int:
    return default if stamp is None else micros(stamp)


def document_key(document: tuple[bytes, bytes] | None) -> int | None:
    """The document (peer and message ID as written) as a 64-bit number.  A collision
    would need a second preimage of BLAKE2b-64: no sender can make its document be
    taken for another's."""
    if document is None:
        return None
    digest = hashlib.blake2b(document[0] + b"\0" + document[1], digest_size=8).digest()
    return int.from_bytes(digest, "big", signed=True)


def _hash_of(line: bytes) -> bytes | None:
    """The first 8 bytes of the record's ``hash``, read in place (the last key named
    ``hash``: top-level keys follow ``detail``)."""
    start = line.rfind(b'"hash":"')
    if start < 0:
        return None
    try:
        return bytes.fromhex(line[start + 8 : start + 24].decode())
    except (ValueError, UnicodeDecodeError):
        return None


@dataclass(frozen=True)
class _Row:
    offset: int
    length: int
    hash: bytes


class _Ids:
    """Ids of the values of one table (names, patient sets), remembered up to a bound."""

    def __init__(self, db: sqlite3.Connection, table: str, column: str, track: bool) -> None:
        self._db = db
        self._track = track
        self._insert = f"INSERT OR IGNORE INTO {table}({column}) VALUES (?)"  # noqa: S608 - fixed text only
        self._select = f"SELECT id FROM {table} WHERE {column} = ?"  # noqa: S608 - fixed text only
        self._known: dict[str, int] = {}
        self.added: list[tuple[int, str]] = []  # new since the caller took them (if tracked)

    def __call__(self, value: str) -> int:
        found = self._known.get(value)
        if found is not None:
            return found
        if len(self._known) >= CACHED_IDS:
            self._known.clear()
        row = self._db.execute(self._select, (value,)).fetchone()
        if row is None:
            cursor = self._db.execute(self._insert, (value,))
            found = int(cursor.lastrowid or 0)
            if self._track:
                self.added.append((found, value))
        else:
            found = int(row[0])
        self._known[value] = found
        return found


class FileIndex:
    """The index of one audit log file, up to date with it when opened."""

    def __init__(self, log: Path, db: sqlite3.Connection) -> None:
        self.log = log
        self.db = db
        self.last_time = int(self._meta("last_time", _LOW))

    def _meta(self, key: str, default: Any = None) -> Any:
        row = self.db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return default if row is None else row[0]

    def name_id(self, value: str | None) -> int | None:
        if value is None:
            return None
        row = self.db.execute("SELECT id FROM names WHERE value = ?", (value,)).fetchone()
        return -1 if row is None else int(row[0])  # -1: matches no record

    def close(self) -> None:
        self.db.close()


def open_index(log: Path) -> FileIndex:
    """The index of ``log``, built or brought up to date first.  Raises AuditIndexError if
    it cannot be written, OSError if the log cannot be read."""
    path = index_path(log)
    with log.open("rb") as handle:
        for _attempt in range(3):
            db = _connect(path) if path.exists() else None
            if db is not None:
                state = _state(db, handle)
                if state is not None:
                    try:
                        _extend(db, handle, state)
                    except sqlite3.DatabaseError:
                        db.close()
                        _remove(path)
                        continue
                    return FileIndex(log, db)
                db.close()
                _remove(path)
            _build(log, handle, path)
    raise AuditIndexError(
        f"the index of audit log {log} ({path}) could not be built: the log keeps changing "
        "under it",
        fix="run the review again, or with --no-index",
    )


def _connect(path: Path) -> sqlite3.Connection | None:
    try:
        db = sqlite3.connect(path, timeout=60, isolation_level=None)
        db.execute("PRAGMA synchronous=OFF")  # derived data: a crash leaves it to be rebuilt
        return db
    except sqlite3.DatabaseError:
        return None


def _remove(path: Path) -> None:
    try:
        path.unlink(missing_ok=True)
    except OSError as exc:
        raise _unwritable(path, exc) from exc


def _unwritable(path: Path, exc: OSError | sqlite3.Error) -> AuditIndexError:
    return AuditIndexError(
        f"cannot write the audit log's index {path}: {exc}",
        fix="run the review as the gateway's user (sudo -u medgw medgw audit ...), or give "
        "--no-index to read the log alone",
    )


def _state(db: sqlite3.Connection, handle: BinaryIO) -> dict[str, Any] | None:
    """The index's record of what it covers, if it is of this version and the log still
    holds that (its first and last indexed records where they were); else None."""
    try:
        meta = dict(db.execute("SELECT key, value FROM meta").fetchall())
    except sqlite3.DatabaseError:
        return None
    if meta.get("version") != VERSION:
        return None
    size = os.fstat(handle.fileno()).st_size
    if int(meta["size"]) > size:
        return None  # cut short
    for which in ("first", "last"):
        at = meta.get(f"{which}_offset")
        if at is None:
            continue
        handle.seek(int(at))
        line = handle.read(int(meta[f"{which}_length"]))
        if not line.endswith(b"\n") or _hash_of(line) != meta[f"{which}_hash"]:
            return None
    return meta


def _build(log: Path, handle: BinaryIO, path: Path) -> None:
    """Index ``log`` from its start into a new file, then put it in place."""
    building = path.with_name(f"{path.name}.{os.getpid()}.new")
    try:
        fd = os.open(building, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        with contextlib.suppress(OSError):  # the log's group may read its index too
            os.fchmod(fd, os.stat(log).st_mode & 0o660)
        os.close(fd)
    except OSError as exc:
        raise _unwritable(path, exc) from exc
    try:
        db = sqlite3.connect(building, isolation_level=None)
        try:
            db.execute("PRAGMA journal_mode=OFF")
            db.execute("PRAGMA synchronous=OFF")
            db.executescript(_SCHEMA)
            db.execute("INSERT INTO meta VALUES ('version', ?), ('size', 0)", (VERSION,))
            _extend(db, handle, {"size": 0})
            db.executescript(_INDEXES)
        finally:
            db.close()
        try:
            os.replace(building, path)
        except OSError as exc:
            raise sqlite3.OperationalError(f"cannot put it in place: {exc}") from exc
    except (OSError, sqlite3.Error) as exc:
        with contextlib.suppress(OSError):
            building.unlink()
        if isinstance(exc, sqlite3.Error):
            raise _unwritable(path, exc) from exc
        raise


def _extend(db: sqlite3.Connection, handle: BinaryIO, meta: dict[str, Any]) -> None:
    """Index the complete lines written after what ``meta`` says is covered."""
    if os.fstat(handle.fileno()).st_size <= int(meta["size"]):
        return
    db.execute("BEGIN IMMEDIATE")  # one process extends it at a time
    try:
        size = int(db.execute("SELECT value FROM meta WHERE key = 'size'").fetchone()[0])
        names = _Ids(db, "names", "value", track=False)
        psets = _Ids(db, "psets", "patients", track=True)
        handle.seek(size)
        offset = size
        rows: list[tuple[Any, ...]] = []
        first: tuple[int, int, bytes] | None = None
        last: tuple[int, int, bytes] | None = None
        last_time = _LOW
        for line in handle:
            if not line.endswith(b"\n"):
                break  # being written: indexed next time
            row = _row(offset, line, names, psets)
            offset += len(line)
            if row is None:
                continue
            rows.append(row)
            last = (row[0], row[1], row[2])
            first = first or last
            last_time = max(last_time, row[3])
            if psets.added:
                db.executemany(
                    "INSERT INTO members VALUES (?, ?)",
                    [(p, i) for i, text in psets.added for p, _ in json.loads(text)],
                )
                psets.added.clear()
            if len(rows) >= BATCH:
                db.executemany("INSERT INTO records VALUES (?,?,?,?,?,?,?,?,?)", rows)
                rows.clear()
        db.executemany("INSERT INTO records VALUES (?,?,?,?,?,?,?,?,?)", rows)
        updates: dict[str, Any] = {"size": offset}
        if last is not None:
            updates.update(last_offset=last[0], last_length=last[1], last_hash=last[2])
            old_time = db.execute("SELECT value FROM meta WHERE key = 'last_time'").fetchone()
            updates["last_time"] = max(last_time, int(old_time[0]) if old_time else _LOW)
        if first is not None and size == 0:
            updates.update(first_offset=first[0], first_length=first[1], first_hash=first[2])
        db.executemany("INSERT OR REPLACE INTO meta VALUES (?, ?)", list(updates.items()))
        db.execute("COMMIT")
    except BaseException:
        if db.in_transaction:
            db.execute("ROLLBACK")
        raise


def _row(offset: int, line: bytes, names: _Ids, psets: _Ids) -> tuple[Any, ...] | None:
    values = _values(offset, line)
    if values is None:
        return None  # not a record a review shows: `audit verify` names it
    event, actor, peer, patients = values[4], values[5], values[6], values[8]
    return (
        *values[:4],
        None if event is None else names(event),
        None if actor is None else names(actor),
        None if peer is None else names(peer),
        values[7],
        None if patients is None else psets(patients),
    )


# -- reviews through the indexes -------------------------------------------------------


def records(paths: Sequence[Path], filters: Filters) -> Iterator[dict[str, Any]]:
    """What :func:`gateway.audit.query.records` finds, reading only the lines that can
    match.  The indexes are built or brought up to date first."""
    return select(_candidates(paths, filters), filters)


def _candidates(paths: Sequence[Path], filters: Filters) -> Iterator[tuple[bytes, bool]]:
    """The lines of ``paths`` that may match ``filters`` (a superset of those that match
    or link a document to the patient), in order, each read from the log and checked."""
    bounds = window(filters, reach(filters))
    documents: set[int] = set()  # the patient's documents, in the files so far
    in_order = ordered(paths)
    for number, path in enumerate(paths):
        index = open_index(path)
        try:
            with path.open("rb") as handle:
                start = start_offset(handle, bounds.early, in_order[number])
                # Every row is checked against the log before anything is shown: an index
                # found wrong is built again, and the review answered from that one.
                if any(
                    _read(handle, row) is None
                    for row in _rows(index, filters, bounds, start, documents)
                ):
                    index.close()
                    _remove(index_path(path))
                    index = open_index(path)
                for row in _rows(index, filters, bounds, start, documents):
                    line = _read(handle, row)
                    if line is None:
                        raise AuditIndexError(
                            f"audit log {path} does not hold at offset {row.offset} the record "
                            "its index, just built or checked, has: it changes under the review",
                            fix="run the review again; if it keeps failing, run medgw audit verify",
                        )
                    at = time_of(line)
                    if at is None or (bounds.late is not None and at >= bounds.late):
                        continue
                    if bounds.early is not None and at < bounds.early:
                        continue
                    yield line, bounds.inside(at)
        finally:
            index.close()


def _rows(
    index: FileIndex,
    filters: Filters,
    bounds: Window,
    start: int,
    documents: set[int],
) -> Iterator[_Row]:
    db = index.db
    if filters.patient is not None:
        naming = "SELECT pset FROM members WHERE patient = :patient"
        found = db.execute(
            f"SELECT DISTINCT document FROM records WHERE pset IN ({naming}) "  # noqa: S608 - fixed text only
            "AND offset >= :start AND document IS NOT NULL",
            {"patient": filters.patient, "start": start},
        )
        documents.update(int(d) for (d,) in found)
        db.execute("CREATE TEMP TABLE IF NOT EXISTS documents(id INTEGER PRIMARY KEY)")
        db.execute("DELETE FROM temp.documents")
        db.executemany("INSERT INTO temp.documents VALUES (?)", ((d,) for d in documents))
        query = (
            f"SELECT offset, length, hash FROM records WHERE pset IN ({naming}) "  # noqa: S608 - fixed text only
            "AND offset >= :start UNION SELECT offset, length, hash FROM records "
            "WHERE document IN (SELECT id FROM temp.documents) AND offset >= :start "
            "ORDER BY offset"
        )
        cursor = db.execute(query, {"patient": filters.patient, "start": start})
    else:
        where = ["offset >= :start", "time >= :since", "time < :until"]
        values: dict[str, Any] = {
            "start": start,
            "since": _bound(bounds.since, _LOW),
            "until": _bound(bounds.until, _HIGH),
        }
        for column in ("event", "actor", "peer"):
            value = getattr(filters, column)
            if value is not None:
                where.append(f"{column} = :{column}")
                values[column] = index.name_id(value)
        if filters.with_patients:
            where.append("pset IS NOT NULL")
        cursor = db.execute(
            f"SELECT offset, length, hash FROM records WHERE {' AND '.join(where)} ORDER BY offset",  # noqa: S608 - fixed text only
            values,
        )
    for offset, length, digest in cursor:
        yield _Row(offset, length, digest)


def _read(handle: BinaryIO, row: _Row) -> bytes | None:
    """The line at ``row`` if it is a whole line of the log with the hash the index has."""
    before = 1 if row.offset else 0
    handle.seek(row.offset - before)
    data = handle.read(row.length + before)
    line = data[before:]
    if before and data[:1] != b"\n":
        return None
    if len(line) != row.length or line.find(b"\n") != row.length - 1:
        return None
    return line if _hash_of(line) == row.hash else None


def accesses(paths: Sequence[Path], filters: Filters) -> tuple[Iterator[PatientAccesses], bool]:
    """What :func:`gateway.audit.query.accesses` counts, from the indexes alone.  The counts
    are summed and sorted by SQLite in a scratch database on disk, and the rows read
    from it one at a time: memory does not grow with the records or with the patients."""
    bounds = window(filters, LINK_BEFORE)
    early = _bound(bounds.early, _LOW)
    done: list[tuple[Path, int, int]] = []  # earlier files: path, start offset, last time
    scratch = sqlite3.connect("", isolation_level=None)  # a private file, gone when closed
    try:
        scratch.execute("CREATE TABLE counted(patients TEXT, actor TEXT, n INTEGER)")
        in_order = ordered(paths)
        for number, path in enumerate(paths):
            index = open_index(path)
            try:
                with path.open("rb") as handle:
                    start = start_offset(handle, bounds.early, in_order[number])
                found = _count(index, bounds, early, start, done)
                scratch.executemany("INSERT INTO counted VALUES (?, ?, ?)", found)
                done.append((path, start, index.last_time))
            finally:
                index.close()
        scratch.executescript(_TOTALS)
    except BaseException:
        scratch.close()
        raise
    return _accesses(scratch), False


_TOTALS = """
CREATE TABLE expanded AS SELECT json_extract(j.value, '$[0]') AS patient,
    json_extract(j.value, '$[1]') AS authority, actor, sum(n) AS n
    FROM counted, json_each(counted.patients) j GROUP BY 1, 2, 3;
CREATE INDEX expanded_patient ON expanded(patient, authority);
CREATE TABLE totals AS SELECT patient, authority, sum(n) AS total FROM expanded GROUP BY 1, 2;
"""


def _accesses(scratch: sqlite3.Connection) -> Iterator[PatientAccesses]:
    """The rows of the report, most accessed first, as :func:`gateway.audit.query.tally`
    orders them (SQLite compares text as UTF-8 bytes: in code point order, as Python)."""
    try:
        found = scratch.execute(
            "SELECT t.patient, t.authority, t.total, e.actor, e.n FROM totals t "
            "JOIN expanded e ON e.patient = t.patient AND e.authority = t.authority "
            "ORDER BY t.total DESC, t.patient, t.authority, e.n DESC, e.actor"
        )
        current: tuple[str, str, int] | None = None
        actors: list[tuple[str, int]] = []
        for patient, authority, total, actor, count in found:
            if current != (patient, authority, total):
                if current is not None:
                    yield PatientAccesses(*current, tuple(actors))
                current, actors = (patient, authority, total), []
            actors.append((actor, count))
        if current is not None:
            yield PatientAccesses(*current, tuple(actors))
    finally:
        scratch.close()


def _count(
    index: FileIndex,
    bounds: Window,
    early: int,
    start: int,
    done: list[tuple[Path, int, int]],
) -> Iterator[tuple[str, str, int]]:
    """Per patient set and actor, how many records in the window concern them."""
    db = index.db
    window_values = {
        "start": start,
        "since": _bound(bounds.since, _LOW),
        "until": _bound(bounds.until, _HIGH),
        "early": early,
    }
    inside = "offset >= :start AND time >= :since AND time < :until"
    db.execute(
        "CREATE TEMP TABLE IF NOT EXISTS carried(document INTEGER PRIMARY KEY, patients TEXT)"
    )
    db.execute("DELETE FROM temp.carried")
    # Documents named in an earlier file: the newest naming first, kept.
    for path, earlier_start, last_time in reversed(done):
        if last_time < early:
            continue  # that file ends before reading starts
        db.execute("ATTACH DATABASE ? AS earlier", (str(index_path(path)),))
        try:
            db.execute(
                "INSERT OR IGNORE INTO temp.carried "  # noqa: S608 - fixed text only
                "SELECT document, (SELECT p.patients FROM earlier.records r "
                "JOIN earlier.psets p ON p.id = r.pset WHERE r.document = d.document "
                "AND r.pset IS NOT NULL AND r.offset >= :earlier_start AND r.time >= :early "
                "ORDER BY r.offset DESC LIMIT 1) AS named "
                f"FROM (SELECT DISTINCT document FROM main.records WHERE {inside} "
                "AND pset IS NULL AND document IS NOT NULL) d WHERE named IS NOT NULL",
                {**window_values, "earlier_start": earlier_start},
            )
        finally:
            db.execute("DETACH DATABASE earlier")
    found = db.execute(
        "SELECT COALESCE(p.patients, c.patients), COALESCE(n.value, ''), count(*) FROM ("  # noqa: S608 - fixed text only
        "  SELECT actor, document, pset IS NULL AS unnamed, COALESCE(pset, CASE WHEN "
        "  document IS NULL THEN NULL ELSE (SELECT r.pset FROM records r "
        "  WHERE r.document = x.document AND r.pset IS NOT NULL AND r.offset < x.offset "
        "  AND r.offset >= :start AND r.time >= :early ORDER BY r.offset DESC LIMIT 1) END) "
        f"  AS linked FROM records x WHERE {inside}"
        ") w LEFT JOIN psets p ON p.id = w.linked "
        "LEFT JOIN temp.carried c ON w.linked IS NULL AND c.document = w.document "
        "LEFT JOIN names n ON n.id = w.actor "
        "WHERE COALESCE(p.patients, c.patients) IS NOT NULL GROUP BY 1, 2",
        window_values,
    )
    yield from found


def prepare(paths: Sequence[Path]) -> None:
    """Build or bring up to date the index of each file of ``paths``.  Raises
    AuditIndexError if one cannot be written, OSError if a log cannot be read."""
    for path in paths:
        open_index(path).close()


def check(log: Path) -> str | None:
    """Compare the index of ``log`` with the log, row by row (for ``medgw audit verify``):
    None if it matches, or if there is none; else what differs, and the index is removed
    (the next review builds it again).  Reads the whole log, as building it would."""
    path = index_path(log)
    if not path.exists():
        return None
    db = _connect(path)
    problem = None
    try:
        with log.open("rb") as handle:
            problem = _differs(db, handle) if db is not None else "not an index"
        if problem is not None and db is not None and _rotated_away(db, log):
            problem = None  # the index of the file the current one was before it rotated
            _remove(path)
    except sqlite3.DatabaseError as exc:
        problem = f"unreadable ({exc})"
    finally:
        if db is not None:
            db.close()
    if problem is not None:
        _remove(path)
    return problem


def _rotated_away(db: sqlite3.Connection, log: Path) -> bool:
    """Whether the index of the current file ``log`` is that of a file it was before a
    rotation gave it its closed name (the index stays under the current file's name):
    its first record is the first of one of the trail's closed files."""
    if is_closed_name(log):
        return False
    try:
        first = db.execute("SELECT value FROM meta WHERE key = 'first_hash'").fetchone()
    except sqlite3.DatabaseError:
        return False
    if first is None:
        return False
    for closed in reversed(closed_files(log)):
        try:
            with closed.open("rb") as handle:
                line = handle.readline(1 << 20)
        except OSError:
            continue
        if line.endswith(b"\n") and _hash_of(line) == first[0]:
            return True
    return False


def _differs(db: sqlite3.Connection, handle: BinaryIO) -> str | None:
    meta = _state(db, handle)
    if meta is None:
        return "it does not match the log's first or last record, or is of another version"
    members = db.execute(
        "SELECT p.id, p.patients, (SELECT group_concat(patient, char(10)) FROM "
        "(SELECT patient FROM members m WHERE m.pset = p.id ORDER BY patient)) FROM psets p"
    )
    for pset, patients, named in members:
        if sorted(p for p, _ in json.loads(patients)) != (named or "").split("\n"):
            return f"the patients of patient set {pset} are not those it lists"
    if db.execute(
        "SELECT count(*) FROM members WHERE pset NOT IN (SELECT id FROM psets)"
    ).fetchone()[0]:
        return "it lists patients of no patient set"
    rows = db.execute(
        "SELECT r.offset, r.length, r.hash, r.time, e.value, a.value, p.value, r.document, "
        "s.patients FROM records r LEFT JOIN names e ON e.id = r.event "
        "LEFT JOIN names a ON a.id = r.actor LEFT JOIN names p ON p.id = r.peer "
        "LEFT JOIN psets s ON s.id = r.pset ORDER BY r.offset"
    )
    handle.seek(0)
    offset = 0
    size = int(meta["size"])
    for line in handle:
        if offset >= size:
            break
        expected = _values(offset, line)
        offset += len(line)
        if expected is None:
            continue
        found = rows.fetchone()
        if found != expected:
            return f"its entry for the line at byte {expected[0]} differs from the log"
    if rows.fetchone() is not None:
        return "it has entries for lines the log does not have"
    return None


def _values(offset: int, line: bytes) -> tuple[Any, ...] | None:
    """What the index holds for ``line``, names and patients as text: see :func:`_row`."""
    at = time_of(line)
    record = parse(line) if at is not None else None
    digest = _hash_of(line)
    if at is None or record is None or digest is None or not line.endswith(b"\n"):
        return None

    def text(value: Any) -> str | None:
        return value if isinstance(value, str) else None

    patients = patients_of(record)
    return (
        offset,
        len(line),
        digest,
        micros(at),
        text(record.get("event")),
        text(actor_of(record)),
        text(record.get("peer")),
        document_key(document_of(line)),
        json.dumps(patients, ensure_ascii=False) if patients else None,
    )
