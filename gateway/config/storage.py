"""``[storage]``: where medgw keeps its state, outbox, inbox and audit log, and every
file and folder the configuration names (for the overlap rules of gateway.places)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from gateway.config.zones import Zone
from gateway.places import Place
from gateway.tomlreader import Reader, Section

SPOOL_FILE = "spool.sqlite3"  # in [storage] state_dir


@dataclass(frozen=True)
class Storage:
    state_dir: Path
    outbox_dir: Path
    inbox_dir: Path
    audit_log: Path

    @property
    def spool_path(self) -> Path:
        """The spool database."""
        return self.state_dir / SPOOL_FILE

    @property
    def receipts_dir(self) -> Path:
        """The receipts this node received, a file each (named in its message's row)."""
        return self.state_dir / "receipts"


def load_storage(reader: Reader, root: Section) -> Storage:
    st = root.table("storage")
    storage = Storage(
        state_dir=reader.path(st.string("state_dir", example='"/var/lib/medgw"')),
        outbox_dir=reader.path(st.string("outbox_dir", example='"/var/lib/medgw/outbox"')),
        inbox_dir=reader.path(st.string("inbox_dir", example='"/var/lib/medgw/inbox"')),
        audit_log=reader.path(st.string("audit_log", example='"/var/log/medgw/audit.jsonl"')),
    )
    st.finish()
    return storage


# Files and folders under ``[storage] state_dir`` that medgw keeps its work in.
STATE_FILES = (
    SPOOL_FILE,
    f"{SPOOL_FILE}-wal",
    f"{SPOOL_FILE}-shm",
    f"{SPOOL_FILE}-journal",
    "medgw.lock",  # gateway.instance.LOCK_NAME
    "control.sock",  # gateway.control.SOCKET_NAME
)
STATE_FOLDERS = ("incoming", "payloads", "outgoing", "receipts", "crls")


def named_places(
    source: Path, peers_dir: Path, storage: Storage, zones: Sequence[Zone], read: Sequence[Place]
) -> list[Place]:
    """Every file and folder the configuration names (gateway.places)."""
    state = storage.state_dir
    state_use = "medgw keeps its spool and work files there"
    # The inbox and outbox may be folders of their own inside the state folder, so it
    # is not a tree here: its own entries are.
    places = [
        Place(
            state,
            source,
            "storage.state_dir",
            "the state folder ([storage] state_dir)",
            tree=False,
            use=state_use,
        ),
    ]
    places += [
        Place(
            state / n,
            source,
            "storage.state_dir",
            f"the spool's {n} in state_dir",
            tree=False,
            use=state_use,
        )
        for n in STATE_FILES
    ]
    places += [
        Place(
            state / n,
            source,
            "storage.state_dir",
            f"the work folder {n}/ in state_dir",
            tree=True,
            use=state_use,
        )
        for n in STATE_FOLDERS
    ]
    places += [
        Place(
            storage.outbox_dir,
            source,
            "storage.outbox_dir",
            "the outbox folder ([storage] outbox_dir)",
            tree=True,
            use="medgw sends every file put there to a peer and removes it",
        ),
        Place(
            storage.inbox_dir,
            source,
            "storage.inbox_dir",
            "the inbox folder ([storage] inbox_dir)",
            tree=True,
            use="medgw writes every received document there",
        ),
        Place(
            storage.audit_log,
            source,
            "storage.audit_log",
            "the audit log ([storage] audit_log)",
            tree=False,
            use="medgw appends the audit trail to it",
        ),
        Place(
            peers_dir,
            source,
            "gateway.peers_dir",
            "the peers folder ([gateway] peers_dir)",
            tree=True,
        ),
        Place(source, source, "", "this configuration file", tree=False),
    ]
    for index, zone in enumerate(zones):
        places += [
            Place(path, source, f"zones[{index}].crls", "a CRL file or folder", _is_dir(path))
            for path in zone.crl_paths
        ]
    return places + list(read)


def _is_dir(path: Path) -> bool:
    """Whether ``path`` is a folder; False when this user may not look (the zone's
    ``crls`` problem says so: gateway.pki.store.load_crls)."""
    try:
        return path.is_dir()
    except OSError:
        return False
