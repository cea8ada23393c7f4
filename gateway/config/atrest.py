"""``[at_rest]``: encryption at rest of what the gateway keeps, and where its
key-encryption keys are (DSP-1, OUT-1; see README, "Encryption at rest").

::

    [at_rest]
    enabled = true                       # the default
    key_dir = "/var/lib/medgw-keys"      # default: beside state_dir, named <state_dir>-keys

``key_dir`` must be outside the state folder, the inbox, the outbox and the
audit log's folder: a copy or a backup of those must never carry the keys that
open what they hold.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from gateway.config.storage import Storage
from gateway.places import Place
from gateway.tomlreader import Reader, Section

KEY_DIR_SUFFIX = "-keys"


@dataclass(frozen=True)
class AtRestSettings:
    enabled: bool
    key_dir: Path


def default_key_dir(storage: Storage) -> Path:
    state = storage.state_dir
    return state.with_name(state.name + KEY_DIR_SUFFIX)


def load_at_rest(reader: Reader, section: Section | None, storage: Storage) -> AtRestSettings:
    """The ``[at_rest]`` table (its defaults when absent); problems go to ``reader``."""
    if section is None:
        return AtRestSettings(True, default_key_dir(storage))
    enabled = section.boolean("enabled", default=True)
    key_dir = (
        reader.path(section.string("key_dir", example='"/var/lib/medgw-keys"'))
        if section.has("key_dir")
        else default_key_dir(storage)
    )
    section.finish()
    resolved = key_dir.resolve()
    folders = (
        (storage.state_dir, "the state folder ([storage] state_dir)"),
        (storage.audit_log.parent, "the audit log's folder ([storage] audit_log)"),
    )
    for folder, what in folders:
        inside = folder.resolve()
        if resolved == inside or resolved.is_relative_to(inside) or inside.is_relative_to(resolved):
            section.problem(
                "key_dir",
                f"{key_dir} is inside or contains {what} {folder}: a copy or a backup of "
                "that folder would carry the keys that open what medgw keeps encrypted",
                f"set [at_rest] key_dir to a folder of its own outside {folder}, for example "
                f"{default_key_dir(storage)}",
            )
    return AtRestSettings(enabled, key_dir)


def key_dir_place(settings: AtRestSettings, source: Path) -> Place:
    """``key_dir`` among the places medgw writes (gateway.places: no overlap)."""
    return Place(
        settings.key_dir,
        source,
        "at_rest.key_dir",
        "the key folder ([at_rest] key_dir)",
        tree=True,
        use="medgw keeps its key-encryption keys there",
    )
