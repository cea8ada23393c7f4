"""Received documents that could not be stored here, told once per cause.

While the spool's database does not answer, or a disk is full, every document a
peer sends, and each resend of it, is answered 503 (``InboundProcessor.unavailable``).
The first failure of a cause is an error log line and one alert
(``storage.unavailable``); the next ones of that cause are counted, each a warning
log line with the count so far (an alert the audit log could not take, its disk
full, is not taken as written: the next failure of the cause tries it again), until
the outage ends: when a document is stored again where its cause was
(``storage.available``: a log line and a record saying how many documents were
answered 503 during it).  An inbox folder's cause (not writable, its disk full) ends
with a document stored in that folder: one stored in another folder (another
service's) proves nothing of it; any other cause (the spool, the work folder) ends
with any document stored.  A resend answered with the receipt kept from before, or a
negative receipt, stores nothing and ends nothing.  The spool database's outage also
ends when it answers again (its ``spool.reachable`` record says how many).  The same
cause after that is a new outage, alerted again.

A cause is the kind of failure and its fix, which names the folder or database,
never the text of the error (which may name the free bytes, or the server's
words of the moment).  The daemon's readiness (gateway.daemon.observe) reads the
latest failure, with its cause and fix.  One per daemon, shared by the inbound
processors of every reload; called from the worker threads.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from gateway.clock import Clock

# The kind of the failures of a spool database that does not answer: its outage ends
# when it answers again, whichever peer sends next.
SPOOL_UNREACHABLE = "spool-unreachable"


@dataclass(frozen=True)
class Failure:
    """The latest received document that could not be stored."""

    cause: str
    fix: str
    at: datetime
    spool_unreachable: bool  # the spool's database did not answer


@dataclass
class Outage:
    """The failures of one cause, from the first (alerted) on."""

    cause: str  # the first one's
    fix: str
    since: datetime
    folder: Path | None  # the inbox folder it refused documents for (None: not a folder's)
    refused: int = 0  # documents answered 503 for it, the first one too
    alert: str = "due"  # its alert: "due" (not written yet), "writing" (by one thread), "written"


class StorageOutages:
    """The outages in progress, by cause (see module doc)."""

    def __init__(self, clock: Clock) -> None:
        self._clock = clock
        self._lock = threading.Lock()
        self._open: dict[str, Outage] = {}
        self._latest: Failure | None = None

    def refused(
        self, kind: str, cause: str, fix: str, folder: Path | None = None
    ) -> tuple[int, Outage | None]:
        """A document could not be stored (``kind``: the cause, as compared;
        :data:`SPOOL_UNREACHABLE` for a spool database that does not answer; ``folder``:
        the inbox folder it was to be stored in, if the cause is that folder's): how many
        documents that cause refused so far, this one too (1: a new outage); and its
        outage if the caller is to write its alert (not written yet, nor being written
        by another thread), then to say how that went with :meth:`alert_written`."""
        now = self._clock.now()
        with self._lock:
            outage = self._open.get(kind)
            if outage is None:
                outage = self._open[kind] = Outage(cause, fix, now, folder)
            outage.refused += 1
            self._latest = Failure(cause, fix, now, kind == SPOOL_UNREACHABLE)
            if outage.alert != "due":
                return outage.refused, None
            outage.alert = "writing"
            return outage.refused, outage

    def alert_written(self, outage: Outage, written: bool) -> None:
        """The alert of ``outage`` :meth:`refused` handed out was written to the audit log;
        else (``written`` False) it is due again, tried at the cause's next failure."""
        with self._lock:
            outage.alert = "written" if written else "due"

    def stored(self, folder: Path) -> list[Outage]:
        """A document was stored: delivered into inbox ``folder`` and its receipt written
        to the spool.  The outages that proves over ended: every one not of an inbox
        folder, and that folder's (another folder's cause may still be there)."""
        if not self._open:  # every request asks: without the lock while none is open
            return []
        with self._lock:
            ended = [
                kind
                for kind, outage in self._open.items()
                if outage.folder is None or outage.folder == folder
            ]
            return [self._open.pop(kind) for kind in ended]

    def spool_answers(self) -> Outage | None:
        """The spool's database answers again: the outage of its failures ended (None:
        it refused no document), and the latest failure, if it was one of them, no
        longer keeps the node not ready (every node sharing the database is ready
        again as soon as it answers, not a minute later)."""
        with self._lock:
            if self._latest is not None and self._latest.spool_unreachable:
                self._latest = None
            return self._open.pop(SPOOL_UNREACHABLE, None)

    def latest(self) -> Failure | None:
        return self._latest
