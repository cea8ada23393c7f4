"""The outbox folder: ``outbox/<peer>/<file>`` is a document for that peer.

``outbox/<peer>/<service>/<file>`` is a document for that peer's service (a
routing key agreed with the peer, listed in its ``services``).  A subfolder
that names no service of the peer is reported and left alone.

Writers must create the file under a hidden name (``.name``) or with a
``.tmp`` / ``.part`` suffix and then *rename* it into place: only a completed
rename makes a file visible to medgw.  Symbolic links and anything that is not
a regular file are ignored (a link could make the gateway send a file its
writer may not read).

Documents are offered in rounds, fairly between peers: a round offers each peer
at most ``per_peer`` of its waiting documents, taken from its folders
(``outbox/<peer>/`` and one per service) in turn, in name order within each
folder, and the peers' documents in turn.  So a peer's first document waits
behind at most ``per_peer`` documents of each other peer, however many those
have waiting.  A folder is listed again only once every document its last
listing found has been offered: a folder of 100,000 files is listed once for
them all, not once a round, while an idle peer's folder is listed every round.
"""

from __future__ import annotations

import itertools
import os
import stat
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

CONTENT_TYPES = {
    ".hl7": "application/hl7-v2",
    ".json": "application/fhir+json",
    ".pdf": "application/pdf",
    ".dcm": "application/dicom",
    ".xml": "application/xml",
}
IGNORED_SUFFIXES = (".tmp", ".part", ".partial")


@dataclass(frozen=True)
class Candidate:
    peer: str
    path: Path
    service: str | None = None

    @property
    def content_type(self) -> str:
        return CONTENT_TYPES.get(self.path.suffix.lower(), "application/octet-stream")


@dataclass(frozen=True)
class ScanResult:
    candidates: tuple[Candidate, ...]  # this round's, in the order to take them
    unknown_folders: tuple[str, ...]
    skipped: tuple[Path, ...]  # symlinks and other non-regular files
    unknown_services: tuple[tuple[str, str], ...] = ()  # (peer, subfolder) of no service
    # Files whose names are not UTF-8 (say Shift_JIS from a Windows share): a name is
    # recorded, logged and sent as text, so they are left alone until renamed.
    bad_names: tuple[Path, ...] = ()
    waiting: int = 0  # documents listed and left for the next rounds


@dataclass
class _Listing:
    """What one listing of a round found beside the documents."""

    unknown: list[str] = field(default_factory=list)
    skipped: list[Path] = field(default_factory=list)
    unknown_services: list[tuple[str, str]] = field(default_factory=list)
    bad_names: list[Path] = field(default_factory=list)


class Outbox:
    """The outbox folder's documents, offered in rounds (see the module's docstring)."""

    def __init__(self) -> None:
        # Each folder's documents listed and not yet offered, by name, in name order.
        self._listed: dict[Path, deque[str]] = {}

    @property
    def waiting(self) -> int:
        """Documents listed and not yet offered: the next round offers some at once."""
        return sum(len(names) for names in self._listed.values())

    def forget(self) -> None:
        """List every folder again at the next round (after a take failed, what it left
        in the outbox comes first again, in name order)."""
        self._listed.clear()

    def next_round(
        self, outbox_dir: Path, peers: Mapping[str, tuple[str, ...]], per_peer: int
    ) -> ScanResult:
        """The next round of documents; ``peers`` maps each peer to its services."""
        found = _Listing()
        offered: list[list[Candidate]] = []
        listed: dict[Path, deque[str]] = {}
        try:
            folders = sorted(os.scandir(outbox_dir), key=lambda e: e.name)
        except FileNotFoundError:
            folders = []
        for folder in folders:
            if folder.name.startswith(".") or not folder.is_dir(follow_symlinks=False):
                continue
            if folder.name not in peers:
                found.unknown.append(folder.name)
                continue
            services = peers[folder.name]
            own = Path(folder.path)
            queues: list[tuple[deque[str], Path, str | None]] = []
            for path, service in [(own, None), *((own / s, s) for s in sorted(services))]:
                names = self._listed.get(path)
                if not names:
                    names = deque(_documents(path, folder.name, services, service, found))
                listed[path] = names
                queues.append((names, path, service))
            offered.append(_take_turns(folder.name, queues, per_peer))
        self._listed = listed  # folders of peers removed since are forgotten
        turns = itertools.zip_longest(*offered)
        return ScanResult(
            tuple(c for turn in turns for c in turn if c is not None),
            tuple(found.unknown),
            tuple(found.skipped),
            tuple(found.unknown_services),
            tuple(found.bad_names),
            self.waiting,
        )


def _take_turns(
    peer: str, queues: list[tuple[deque[str], Path, str | None]], limit: int
) -> list[Candidate]:
    """Up to ``limit`` of one peer's documents, one from each of its folders in turn."""
    taken: list[Candidate] = []
    while len(taken) < limit and any(names for names, _, _ in queues):
        for names, path, service in queues:
            if names and len(taken) < limit:
                taken.append(Candidate(peer, path / names.popleft(), service))
    return taken


def _documents(
    path: Path,
    peer: str,
    services: tuple[str, ...],
    service: str | None,
    found: _Listing,
) -> list[str]:
    """The names of the documents in ``outbox/<peer>/`` (``service`` None) or in its
    service folder ``outbox/<peer>/<service>/`` (if that is a folder, not a link); what
    is not a document there is added to ``found``."""
    if service is not None:
        try:
            if not stat.S_ISDIR(os.lstat(path).st_mode):
                return []  # a file of that name is a document of the peer's own folder
        except FileNotFoundError:
            return []
    names: list[str] = []
    for entry in _entries(path):
        if entry.is_dir(follow_symlinks=False) and service is None:
            if entry.name not in services:
                found.unknown_services.append((peer, entry.name))
        elif not entry.is_file(follow_symlinks=False):
            found.skipped.append(Path(entry.path))
        elif _is_utf8(entry.name):
            names.append(entry.name)
        else:
            found.bad_names.append(Path(entry.path))
    return names


def _is_utf8(name: str) -> bool:
    """False for a name the file system gave as bytes that are not UTF-8 (they come
    back as lone surrogates, which cannot be encoded)."""
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _entries(folder: Path) -> list[os.DirEntry[str]]:
    """The visible, complete entries of a folder, by name (temporary names are skipped)."""
    try:
        entries = sorted(os.scandir(folder), key=lambda e: e.name)
    except (FileNotFoundError, NotADirectoryError):  # removed or replaced while we looked
        return []
    return [
        e for e in entries if not e.name.startswith(".") and not e.name.endswith(IGNORED_SUFFIXES)
    ]
