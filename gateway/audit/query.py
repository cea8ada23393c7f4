"""Reviewing the audit trail (MNT-5): records in a time window, and accesses per patient.

The trail can hold a year of records, millions of lines: it is streamed, never
loaded.  Records are written in time order (the clock may have been set back a
little: CLOCK_MARGIN), so the first record of the window is found by bisecting
the file on its ``time`` field, and reading stops once records are well past
the window.  A file where the clock was set back further, or whose order is not
known (gateway.audit.order), is read whole instead: no record of the window is
missed, whatever the clock did.  A line is parsed only if its raw bytes can match: its time is
read in place, and each filter's value must appear in it.  Records written
before patients and actors were recorded simply lack them: they match no
``patient``/``actor`` filter and are counted under no patient.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, BinaryIO

from gateway.audit.order import CLOCK_MARGIN, ordered

TIME_KEY = b'"time":"'
TIME_LENGTH = len("2026-12-05T04:22:55.459825+00:00")
PATIENT_NEEDLE = b'"patient_ids":'
# Records about a document are linked to its patients when the document named them in
# the window or this long before it: operators read a document within weeks of it.
LINK_BEFORE = timedelta(days=31)
# Documents `audit patients` remembers to link later records to their patients: some
# 250 bytes each, so at most about 250 MB.
DOCUMENTS_REMEMBERED = 1_000_000


@dataclass(frozen=True)
class Filters:
    since: datetime | None = None  # inclusive
    until: datetime | None = None  # exclusive
    patient: str | None = None
    peer: str | None = None
    actor: str | None = None
    event: str | None = None
    with_patients: bool = False  # only records that name a patient

    def needles(self) -> list[bytes]:
        """Bytes every matching line contains (a JSON string as written), the patient aside:
        a record about a patient's document may name only the document."""
        values = (self.peer, self.actor, self.event)
        found = [_json(v) for v in values if v is not None]
        return [*found, PATIENT_NEEDLE] if self.with_patients else found

    def match(self, record: dict[str, Any]) -> bool:
        """Whether ``record`` passes the filters other than ``patient``."""
        if self.peer is not None and record.get("peer") != self.peer:
            return False
        if self.actor is not None and actor_of(record) != self.actor:
            return False
        if self.event is not None and record.get("event") != self.event:
            return False
        return not self.with_patients or bool(patients_of(record))


def _json(value: str) -> bytes:
    return json.dumps(value, ensure_ascii=False).encode()


def _stamp(at: datetime) -> bytes:
    """``at`` as the log writes times (UTC, microseconds): these compare as bytes."""
    return at.astimezone(UTC).isoformat(timespec="microseconds").encode()


def time_of(line: bytes) -> bytes | None:
    """The record's time, read in place, in the form :func:`_stamp` writes."""
    start = line.find(TIME_KEY)
    if start < 0:
        return None
    start += len(TIME_KEY)
    text = line[start : start + TIME_LENGTH]
    if text.endswith(b"+00:00"):
        return text
    try:  # written with another offset: compare it in UTC
        end = line.index(b'"', start)
        return _stamp(datetime.fromisoformat(line[start:end].decode()))
    except (ValueError, UnicodeDecodeError):
        return None


def actor_of(record: dict[str, Any]) -> str | None:
    actor = record.get("actor")
    if actor is None and isinstance(record.get("detail"), dict):
        actor = record["detail"].get("actor")  # records of older versions
    return actor if isinstance(actor, str) else None


def patients_of(record: dict[str, Any]) -> list[tuple[str, str]]:
    """(id, authority) of each patient a record names, once each; authority "" if none."""
    found = record.get("patient_ids")
    if found is None and isinstance(record.get("detail"), dict):
        found = record["detail"].get("patient_ids")
    if not isinstance(found, list):
        return []
    out: list[tuple[str, str]] = []
    for item in found:
        if isinstance(item, str):
            key = (item, "")
        elif isinstance(item, dict) and isinstance(item.get("id"), str):
            key = (item["id"], str(item.get("authority") or ""))
        else:
            continue
        if key not in out:
            out.append(key)
    return out


def _first_offset(handle: BinaryIO, size: int, since: bytes) -> int:
    """An offset at or before the first line written at ``since`` or later (bisection;
    times may step back by up to CLOCK_MARGIN, so the caller starts earlier by that)."""
    low, high = 0, size
    while high - low > 65536:
        middle = (low + high) // 2
        handle.seek(middle)
        handle.readline()  # the rest of a line cut in the middle
        at = None
        while at is None:
            line = handle.readline()
            if not line:
                break
            at = time_of(line)
        if at is None or at >= since:
            high = middle
        else:
            low = middle
    return low


@dataclass(frozen=True)
class Window:
    """The times that bound a read, in the form :func:`_stamp` writes (None: unbounded)."""

    since: bytes | None  # the window, inclusive
    until: bytes | None  # exclusive
    early: bytes | None  # reading starts here: ``before`` the window, less CLOCK_MARGIN
    late: bytes | None  # and stops here: the window's end plus CLOCK_MARGIN

    def inside(self, at: bytes) -> bool:
        return (self.since is None or at >= self.since) and (self.until is None or at < self.until)


def window(filters: Filters, before: timedelta = timedelta(0)) -> Window:
    return Window(
        _stamp(filters.since) if filters.since else None,
        _stamp(filters.until) if filters.until else None,
        _stamp(filters.since - CLOCK_MARGIN - before) if filters.since else None,
        _stamp(filters.until + CLOCK_MARGIN) if filters.until else None,
    )


def reach(filters: Filters) -> timedelta:
    """How far before the window records are read: a patient's documents are linked."""
    return LINK_BEFORE if filters.patient is not None else timedelta(0)


def start_offset(handle: BinaryIO, early: bytes | None, in_order: bool = True) -> int:
    """Where reading a file for a window starting at ``early`` begins: the start of a line
    at or before the first one written at ``early`` or later (its start if the file is
    not ``in_order``: see gateway.audit.order)."""
    if early is None or not in_order:
        return 0
    handle.seek(_first_offset(handle, os.fstat(handle.fileno()).st_size, early))
    if handle.tell():
        handle.readline()
    return handle.tell()


def _lines(
    paths: Sequence[Path], filters: Filters, *, before: timedelta = timedelta(0)
) -> Iterator[tuple[bytes, bool]]:
    """Each line from ``before`` the window's start (found by bisection) up to its end
    (both plus CLOCK_MARGIN), with whether it is inside the window; every line of a file
    not known to be in time order."""
    bounds = window(filters, before)
    in_order = ordered(paths)
    for number, path in enumerate(paths):
        with path.open("rb") as handle:
            handle.seek(start_offset(handle, bounds.early, in_order[number]))
            for line in handle:
                if not line.endswith(b"\n"):
                    break  # the file's end, unfinished: a record being written, or torn
                at = time_of(line)
                if at is None:
                    continue  # a torn line after a crash: `audit verify` reports it
                if bounds.late is not None and at >= bounds.late and in_order[number]:
                    if all(in_order[number:]):
                        return  # past the window, even allowing for a clock set back
                    break  # a later file's clock went back: it may hold some
                if bounds.early is not None and at < bounds.early:
                    continue  # before the window (bisection stops a block short)
                if bounds.late is not None and at >= bounds.late:
                    continue  # after it, in a file not in order
                yield line, bounds.inside(at)


def parse(line: bytes) -> dict[str, Any] | None:
    try:
        record = json.loads(line)
    except ValueError:
        return None
    return record if isinstance(record, dict) else None


def records(paths: Sequence[Path], filters: Filters) -> Iterator[dict[str, Any]]:
    """The records of ``paths`` (oldest file first) in the window that match ``filters``.

    With ``patient``: the records that name the patient, and every record about the same
    document (same ``peer`` and ``message_id``: sent, receipt, operator reads...) when
    the document named the patient in the window or up to LINK_BEFORE before it.
    """
    return select(_lines(paths, filters, before=reach(filters)), filters)


def select(lines: Iterable[tuple[bytes, bool]], filters: Filters) -> Iterator[dict[str, Any]]:
    """The records that match ``filters`` among ``lines`` (each with whether it is inside
    the window), read from ``reach(filters)`` before the window, in the trail's order."""
    if filters.patient is None:
        needles = filters.needles()
        for line, inside in lines:
            if inside and all(n in line for n in needles):
                record = parse(line)
                if record is not None and filters.match(record):
                    yield record
        return
    patient = _json(filters.patient)
    documents: set[tuple[bytes, bytes]] = set()  # the patient's documents
    for line, inside in lines:
        document = document_of(line)
        if patient not in line and document not in documents:
            continue
        record = parse(line)
        if record is None:
            continue
        if any(p == filters.patient for p, _ in patients_of(record)):
            if document is not None:
                documents.add(document)
        elif document not in documents:
            continue
        if inside and filters.match(record):
            yield record


def document_of(line: bytes) -> tuple[bytes, bytes] | None:
    """The record's peer and message_id as written (JSON strings), read in place: which
    document it is about.  Top-level keys come after ``detail`` in a record (sorted), and
    no string value holds an unescaped quote, so the last occurrence is the record's own."""
    peer = _string_field(line, b'"peer":')
    message_id = _string_field(line, b'"message_id":')
    return (peer, message_id) if peer is not None and message_id is not None else None


def _string_field(line: bytes, key: bytes) -> bytes | None:
    start = line.rfind(key)
    if start < 0 or line[start + len(key) : start + len(key) + 1] != b'"':
        return None
    start += len(key)
    end = start + 1
    while True:
        end = line.find(b'"', end)
        if end < 0:
            return None
        slashes = end - len(line[:end].rstrip(b"\\"))
        if slashes % 2 == 0:  # not an escaped quote
            return line[start : end + 1]
        end += 1


@dataclass(frozen=True)
class PatientAccesses:
    patient: str
    authority: str
    total: int
    by_actor: tuple[tuple[str, int], ...]  # most first; "" for records without an actor


def accesses(
    paths: Sequence[Path], filters: Filters, limit: int = DOCUMENTS_REMEMBERED
) -> tuple[list[PatientAccesses], bool]:
    """How many records in the window concern each patient, in all and per actor, most
    accessed first: records that name the patient, and records about a document that
    named them before (same peer and message_id: a send, a receipt, an operator's read).

    Reads from LINK_BEFORE before the window to link documents; the documents remembered are
    bounded by ``limit`` (the oldest forgotten first); the second value says whether any
    was forgotten, so that records about it may have gone uncounted.
    """
    documents: dict[tuple[bytes, bytes], tuple[tuple[str, str], ...]] = {}
    peers: dict[bytes, bytes] = {}  # one copy of each peer name
    shared: dict[tuple[tuple[str, str], ...], tuple[tuple[str, str], ...]] = {}  # and patients
    forgot = False
    counts: Counter[tuple[str, str, str]] = Counter()
    for line, inside in _lines(paths, filters, before=LINK_BEFORE):
        document = document_of(line)
        names = PATIENT_NEEDLE in line
        if not names and (not inside or document not in documents):
            continue
        record = parse(line)
        if record is None:
            continue
        patients = tuple(patients_of(record))
        if patients and document is not None:
            patients = shared.setdefault(patients, patients)
            document = (peers.setdefault(document[0], document[0]), document[1])
            if document not in documents and len(documents) >= limit:
                forgot = True
                del documents[next(iter(documents))]
            documents[document] = patients
        elif not patients and document is not None:
            patients = documents.get(document, ())
        if inside and patients:
            actor = actor_of(record) or ""
            for patient, authority in patients:
                counts[(patient, authority, actor)] += 1
    return tally(counts), forgot


def tally(counts: Counter[tuple[str, str, str]]) -> list[PatientAccesses]:
    """Rows of :func:`accesses` from counts per (patient, authority, actor)."""
    per: dict[tuple[str, str], Counter[str]] = {}
    for (patient, authority, actor), count in counts.items():
        per.setdefault((patient, authority), Counter())[actor] = count
    rows = [
        PatientAccesses(
            p, a, sum(c.values()), tuple(sorted(c.items(), key=lambda i: (-i[1], i[0])))
        )
        for (p, a), c in per.items()
    ]
    return sorted(rows, key=lambda r: (-r.total, r.patient, r.authority))
