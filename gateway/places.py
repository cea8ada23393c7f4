"""Where medgw reads and writes on disk, and the rule that no two uses share a file.

Every file and folder the configuration names is a :class:`Place`: the inbox
(every received document is written there), the outbox (every file put there
is sent to a peer, then removed), the state folder's spool and work folders,
the audit log, and what is only read: the configuration file, ``peers.d``,
certificates, keys, trust anchors, CRLs, the hand-over CA.

Two places overlap when they are the same file or folder, or one lies inside a
folder the other is, after symbolic links are resolved.  A place medgw writes
may overlap no other place, because the gateway would then turn into a
forwarder or leak what it keeps: ``inbox_dir = outbox_dir`` sends every
received document straight back out; an inbox inside ``outbox/<peer>/`` sends
it to that peer, in whatever zone; a key inside the outbox is sent to a peer; a
certificate inside the inbox can be replaced by a received document.  Places
that are only read may share folders (certificates next to ``gateway.toml``).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from gateway.errors import ConfigProblem


@dataclass(frozen=True)
class Place:
    """A file or folder the configuration names, and what medgw does with it."""

    path: Path
    file: Path  # the configuration file that names it
    key: str  # the key there ("" for the configuration file itself)
    what: str  # for an administrator, e.g. "the inbox folder ([storage] inbox_dir)"
    tree: bool  # a folder whose contents count too
    use: str | None = None  # what medgw writes there; None: only read

    @functools.cached_property
    def resolved(self) -> Path:
        """The path with every symbolic link resolved: the file or folder really used."""
        return self.path.resolve()

    def relation(self, other: Place) -> str | None:
        """'is' or 'is inside' when this place overlaps ``other``, else None."""
        mine, theirs = self.resolved, other.resolved
        if mine == theirs:
            return "is"
        if other.tree and mine.is_relative_to(theirs):
            return "is inside"
        return None

    def named(self) -> str:
        return f"{self.what} {self.path}"


def overlap_problems(places: Sequence[Place]) -> list[ConfigProblem]:
    """One error for each pair of places that overlap where at least one is written,
    reported on the inner one (the later one when they are the same)."""
    problems: list[ConfigProblem] = []
    reported: set[tuple[str, str, str, str]] = set()
    for index, later in enumerate(places):
        for earlier in places[:index]:
            if later.use is None and earlier.use is None:
                continue
            inner, outer = later, earlier
            relation = later.relation(earlier)
            if relation is None:
                inner, outer = earlier, later
                relation = earlier.relation(later)
            # The state folder's entries share one key: one problem per pair of keys.
            pair = (str(inner.file), inner.key, str(outer.file), outer.key)
            if relation is None or pair in reported:
                continue
            reported.add(pair)
            uses = [u for u in (outer.use, inner.use) if u is not None]
            problems.append(
                ConfigProblem(
                    str(inner.file),
                    inner.key,
                    f"{inner.named()} {relation} {outer.named()}: {'; '.join(uses)}. The "
                    "folders and files medgw reads and writes may not overlap (nor through "
                    "a symbolic link)",
                    f"give {_key(inner)} a place of its own, outside {_key(outer)} and "
                    "not containing it",
                )
            )
    return problems


def _key(place: Place) -> str:
    return place.key or str(place.file)
