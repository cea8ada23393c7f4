"""What the audit trail says of the maintainer accounts in ``maintainers.d/``.

The files are the accounts: adding, removing or changing one takes effect at the
next start or reload.  So that the day an account was given or revoked can be proven
(MNT-2), the start records every account in force, and each reload records each
account added, removed or changed (role, keys, expiry, name) as an event of its own,
with who reloaded."""

from __future__ import annotations

from typing import Any

from gateway.audit import AuditEvent, EventType
from gateway.config.maintenance import Maintainer, MaintenanceSettings


def summary(account: Maintainer) -> dict[str, Any]:
    """What the trail keeps of an account: never its TOTP secret."""
    return {
        "person": account.person,
        "name": account.name,
        "role": account.role,
        "keys": list(account.fingerprints),
        "expires": account.expires.isoformat(),
    }


def in_force(settings: MaintenanceSettings | None) -> list[dict[str, Any]]:
    """Every account of ``settings`` (none without ``[maintenance]``)."""
    return [summary(m) for m in settings.maintainers] if settings is not None else []


def changes(
    old: MaintenanceSettings | None, new: MaintenanceSettings | None, actor: str
) -> list[AuditEvent]:
    """One event per account that a reload from ``old`` to ``new`` added, removed or
    changed, in the order of the persons' names."""
    before = {m.person: summary(m) for m in (old.maintainers if old else ())}
    after = {m.person: summary(m) for m in (new.maintainers if new else ())}
    found: list[AuditEvent] = []
    for person in sorted(before.keys() | after.keys()):
        was, now = before.get(person), after.get(person)
        if was is None and now is not None:
            found.append(AuditEvent(EventType.MAINTENANCE_ACCOUNT_ADDED, actor=actor, detail=now))
        elif was is not None and now is None:
            found.append(AuditEvent(EventType.MAINTENANCE_ACCOUNT_REMOVED, actor=actor, detail=was))
        elif was is not None and now is not None and was != now:
            changed = {k: {"was": was[k], "now": now[k]} for k in now if was[k] != now[k]}
            found.append(
                AuditEvent(
                    EventType.MAINTENANCE_ACCOUNT_CHANGED,
                    actor=actor,
                    detail={**now, "changed": changed},
                )
            )
    return found
