"""The outbox folder: ``outbox/<peer>/<file>`` is a document for that peer.

Writers must create the file under a hidden name (``.name``) or with a
``.tmp`` / ``.part`` suffix and then *rename* it into place: only a completed
rename makes a file visible to medgw.  Symbolic links and anything that is not
a regular file are ignored (a link could make the gateway send a file its
writer may not read).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
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

    @property
    def content_type(self) -> str:
        return CONTENT_TYPES.get(self.path.suffix.lower(), "application/octet-stream")


@dataclass(frozen=True)
class ScanResult:
    candidates: tuple[Candidate, ...]
    unknown_folders: tuple[str, ...]
    skipped: tuple[Path, ...]  # symlinks and other non-regular files


def scan(outbox_dir: Path, peers: frozenset[str]) -> ScanResult:
    candidates: list[Candidate] = []
    unknown: list[str] = []
    skipped: list[Path] = []
    try:
        folders = sorted(os.scandir(outbox_dir), key=lambda e: e.name)
    except FileNotFoundError:
        return ScanResult((), (), ())
    for folder in folders:
        if folder.name.startswith(".") or not folder.is_dir(follow_symlinks=False):
            continue
        if folder.name not in peers:
            unknown.append(folder.name)
            continue
        entries = sorted(os.scandir(folder.path), key=lambda e: e.name)
        for entry in entries:
            if entry.name.startswith(".") or entry.name.endswith(IGNORED_SUFFIXES):
                continue
            if not entry.is_file(follow_symlinks=False):
                skipped.append(Path(entry.path))
                continue
            candidates.append(Candidate(folder.name, Path(entry.path)))
    return ScanResult(tuple(candidates), tuple(unknown), tuple(skipped))
