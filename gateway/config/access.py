"""Whether the user medgw runs as may write where ``[storage]`` says medgw works.

Asked by ``medgw check-config``, at the daemon's start and by its readiness, never
while loading the configuration: other commands read it as other users.

* The state folder (the spool, the lock, the work folders) and the audit trail's
  folder and files (the log and its ``.order`` notes) must be writable: without them
  the daemon cannot start (errors).
* The inbox and the outbox, with their peers' folders that exist, should be: a
  document for an inbox folder medgw cannot write is answered 503, and the peer
  resends it once the folder is fixed; a file in an outbox folder medgw cannot
  change stays there (warnings: the daemon starts, and says it is not ready).
* An inbox folder's file system must make hard links (a delivery gives a document its
  name with one): each existing inbox folder is tried with a hidden file linked and
  removed (a warning, as above).

A folder that does not exist yet is judged by the nearest of its parents that
does: medgw creates it there.  Except the folders the nodes share, ``[cluster]
bodies_dir`` and, on a spool in PostgreSQL, an ``[at_rest] key_dir`` other than the
default beside the state folder: they must exist (an error), as medgw cannot tell a new
folder from a missing mount.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Callable
from pathlib import Path

from gateway.audit.order import order_path
from gateway.config.atrest import default_key_dir
from gateway.config.model import GatewayConfig
from gateway.config.storage import STATE_FILES, STATE_FOLDERS
from gateway.errors import ConfigProblem
from gateway.fsutil import HARD_LINK_RULE, hard_link_fix, no_hard_links, storage_fix, this_user

_STATE = "medgw keeps its spool, its lock and its work files there: it cannot start"
_AUDIT = "medgw appends the audit trail there: it cannot start"
_INBOX = (
    "medgw writes received documents there: until it can, the peers' documents are "
    "answered 503 and kept by the peers for a resend"
)
_OUTBOX = "medgw removes each file it takes from there: until it can, nothing is sent"


LinkProbe = Callable[[Path], OSError | None]


def _nowhere(_folder: Path) -> None:
    pass


def access_problems(
    config: GatewayConfig,
    *,
    daemon: bool = False,
    links: LinkProbe = no_hard_links,
    visit: Callable[[Path], None] = _nowhere,
) -> list[ConfigProblem]:
    """What this process's user may not write of what ``config``'s ``[storage]`` names
    (``daemon``: asked by the daemon, running as the user medgw runs as).  ``links``
    tries an inbox folder's hard links (see :func:`gateway.fsutil.no_hard_links`: the
    readiness asks it again only of a folder that has not passed); ``visit`` is told
    of each folder before its file-system calls, which a hung network mount holds
    (the readiness names the folder that does not answer)."""
    storage = config.storage
    visit(storage.state_dir)
    checks: list[tuple[str, str, Path, str, str]] = [
        ("storage.state_dir", "the state folder", storage.state_dir, _STATE, "error"),
        *(
            ("storage.state_dir", "the state folder's", storage.state_dir / name, _STATE, "error")
            for name in (*STATE_FOLDERS, *STATE_FILES)
            if name != "control.sock"  # made again at every start
            and os.path.lexists(storage.state_dir / name)
        ),
        ("storage.audit_log", "the audit log's folder", storage.audit_log.parent, _AUDIT, "error"),
    ]
    for what, file in (
        ("the audit log", storage.audit_log),
        ("the audit log's order notes", order_path(storage.audit_log)),  # opened at start too
    ):
        if os.path.lexists(file):
            checks.append(("storage.audit_log", what, file, _AUDIT, "error"))
    for key, what, top, rule in (
        ("storage.inbox_dir", "the inbox", storage.inbox_dir, _INBOX),
        ("storage.outbox_dir", "the outbox", storage.outbox_dir, _OUTBOX),
    ):
        checks.append((key, what, top, rule, "warning"))
        for peer in config.peers:
            for folder in (top / peer.name, *(top / peer.name / s for s in peer.services)):
                visit(folder)
                if _is_folder(folder):
                    checks.append((key, f"{what}'s folder", folder, rule, "warning"))
    problems = _shared_folders_missing(config, visit)
    for key, what, path, rule, severity in checks:
        visit(path)
        blocked = _not_writable(path)
        if blocked is None and key == "storage.inbox_dir" and path.is_dir():
            refused = links(path)
            if refused is not None:
                problems.append(
                    ConfigProblem(
                        str(config.source),
                        key,
                        f"{what} {path} is on a file system that refuses hard links "
                        f"(link: {refused.strerror}): {HARD_LINK_RULE}; until it can, "
                        "the peers' documents are answered 503 and kept by the peers for "
                        "a resend",
                        hard_link_fix(path),
                        severity,
                    )
                )
        if blocked is not None:
            where, code = blocked
            user = this_user()
            whom = "medgw" if daemon else "this command"
            said = (
                "is on a file system mounted read-only"
                if code == errno.EROFS
                else f"may not be read and written by user {user}, whom {whom} runs as"
                + _lacking(where)
            )
            named = (
                f"{what} {path} {said}"
                if where == path
                else f"{what} {path} does not exist, and {where}, where medgw creates it, {said}"
            )
            problems.append(
                ConfigProblem(
                    str(config.source),
                    key,
                    f"{named}; {rule}",
                    storage_fix(OSError(code, os.strerror(code)), where, daemon=daemon),
                    severity,
                )
            )
    return problems


def _shared_folders_missing(
    config: GatewayConfig, visit: Callable[[Path], None]
) -> list[ConfigProblem]:
    """The folders the nodes share must be there: medgw makes its own folders and files
    in them, never the folder itself, since a shared file system that is not mounted
    would leave what this node writes there where no other node reads it.
    ``[cluster] bodies_dir``, and the key folder of a spool in PostgreSQL (the data keys
    in the spool are wrapped under its keys) unless it is the default beside the state
    folder, which is this node's own."""
    problems = []
    bodies = config.cluster.bodies_dir
    if bodies is not None:
        visit(bodies)
    if bodies is not None and not bodies.is_dir():
        problems.append(
            _not_mounted(
                config,
                "cluster.bodies_dir",
                "the nodes' shared folder of bodies",
                bodies,
                "medgw does not create it: if the shared file system it is on is not mounted, "
                "the bodies this node queues would be where no other node can read them",
            )
        )
    at_rest = config.at_rest
    shared_keys = (
        at_rest is not None
        and config.spool.postgres is not None
        and at_rest.key_dir != default_key_dir(config.storage)
    )
    if at_rest is not None and shared_keys:
        visit(at_rest.key_dir)
    if at_rest is not None and shared_keys and not at_rest.key_dir.is_dir():
        keys = at_rest.key_dir
        problems.append(
            _not_mounted(
                config,
                "at_rest.key_dir",
                "the nodes' shared key folder",
                keys,
                "on a spool in PostgreSQL medgw does not create it: if the shared file system "
                "it is on is not mounted, the key-encryption key this node would make there "
                "is one no other node has, and what it encrypts at rest would be unreadable "
                "to them",
                mkdir="mkdir -m 700",
            )
        )
    return problems


def _not_mounted(
    config: GatewayConfig, key: str, what: str, folder: Path, why: str, *, mkdir: str = "mkdir"
) -> ConfigProblem:
    """``what``, the folder the nodes share that ``key`` names, is missing: ``why`` medgw
    does not make it, and the fix (mount it, or ``mkdir`` it on a new file system)."""
    return ConfigProblem(
        str(config.source),
        key,
        f"{what} {folder} does not exist (or is not a folder); {why}",
        f"mount the shared file system (findmnt -T {folder.parent}), or, on a new one, "
        f"create the folder in it ({mkdir} {folder}, owned by the medgw user); keep it a folder "
        "inside the mount, not the mount point itself, so that a missing mount is seen",
        "error",
    )


def _is_folder(path: Path) -> bool:
    """``path`` is a folder, as far as this user can see: one inside a folder it may not
    search cannot be looked at (Path.is_dir raises PermissionError on Python 3.11), and
    that folder's own check names the permission missing."""
    try:
        return path.is_dir()
    except OSError:
        return False


def _lacking(where: Path) -> str:
    """Which permission this user lacks on the folder ``where``, and why medgw needs it
    (a folder it may write but not read would take each document, then fail to sync
    it: the peer's resend settles it, one 503 each)."""
    if not where.is_dir():
        return ""
    missing = [
        name
        for bit, name in ((os.R_OK, "read"), (os.W_OK, "write"), (os.X_OK, "search"))
        if not os.access(where, bit, effective_ids=os.access in os.supports_effective_ids)
    ]
    return (
        f" (no {' or '.join(missing)} permission: medgw needs read, write and search "
        "permission on a folder, read to sync it after each change)"
    )


def _not_writable(path: Path) -> tuple[Path, int] | None:
    """Where ``path`` (or the nearest parent that exists) may not be read and written
    (a folder: listed and entered too), and why (EROFS or EACCES); None when it may."""
    where = next((p for p in (path, *path.parents) if os.path.lexists(p)), None)
    if where is None:
        return None
    mode = os.R_OK | os.W_OK | (os.X_OK if where.is_dir() else 0)
    if os.access(where, mode, effective_ids=os.access in os.supports_effective_ids):
        return None
    try:
        read_only = bool(os.statvfs(where).f_flag & os.ST_RDONLY)
    except OSError:
        read_only = False
    return where, errno.EROFS if read_only else errno.EACCES
