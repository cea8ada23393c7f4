"""The outbox folder: ``outbox/<peer>/<file>`` is a document for that peer.

``outbox/<peer>/<service>/<file>`` is a document for that peer's service (a
routing key agreed with the peer, listed in its ``services``).  A subfolder
that names no service of the peer is reported and left alone.

Writers must create the file under a hidden name (``.name``) or with a
``.tmp`` / ``.part`` suffix and then *rename* it into place: only a completed
rename makes a file visible to medgw.  Symbolic links and anything that is not
a regular file are ignored (a link could make the gateway send a file its
writer may not read).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
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
    service: str | None = None

    @property
    def content_type(self) -> str:
        return CONTENT_TYPES.get(self.path.suffix.lower(), "application/octet-stream")


@dataclass(frozen=True)
class ScanResult:
    candidates: tuple[Candidate, ...]
    unknown_folders: tuple[str, ...]
    skipped: tuple[Path, ...]  # symlinks and other non-regular files
    unknown_services: tuple[tuple[str, str], ...] = ()  # (peer, subfolder) of no service
    # Files whose names are not UTF-8 (say Shift_JIS from a Windows share): a name is
    # recorded, logged and sent as text, so they are left alone until renamed.
    bad_names: tuple[Path, ...] = ()


def scan(outbox_dir: Path, peers: Mapping[str, tuple[str, ...]]) -> ScanResult:
    """Documents waiting in the outbox; ``peers`` maps each peer to its services."""
    candidates: list[Candidate] = []
    unknown: list[str] = []
    skipped: list[Path] = []
    unknown_services: list[tuple[str, str]] = []
    bad_names: list[Path] = []

    def take(peer: str, entry: os.DirEntry[str], service: str | None = None) -> None:
        if _is_utf8(entry.name):
            candidates.append(Candidate(peer, Path(entry.path), service))
        else:
            bad_names.append(Path(entry.path))

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
        services = peers[folder.name]
        for entry in _entries(folder.path):
            if entry.is_dir(follow_symlinks=False):
                if entry.name not in services:
                    unknown_services.append((folder.name, entry.name))
                    continue
                for inner in _entries(entry.path):
                    if inner.is_file(follow_symlinks=False):
                        take(folder.name, inner, entry.name)
                    else:
                        skipped.append(Path(inner.path))
            elif entry.is_file(follow_symlinks=False):
                take(folder.name, entry)
            else:
                skipped.append(Path(entry.path))
    return ScanResult(
        tuple(candidates),
        tuple(unknown),
        tuple(skipped),
        tuple(unknown_services),
        tuple(bad_names),
    )


def _is_utf8(name: str) -> bool:
    """False for a name the file system gave as bytes that are not UTF-8 (they come
    back as lone surrogates, which cannot be encoded)."""
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _entries(folder: str) -> list[os.DirEntry[str]]:
    """The visible, complete entries of a folder, by name (temporary names are skipped)."""
    try:
        entries = sorted(os.scandir(folder), key=lambda e: e.name)
    except FileNotFoundError:  # removed while we looked
        return []
    return [
        e for e in entries if not e.name.startswith(".") and not e.name.endswith(IGNORED_SUFFIXES)
    ]
