"""``[retention]``: how long finished messages' records, receipts, copies and audit files
are kept (DSP-1; see README, "Retention and disposal").

::

    [retention]
    received_days = 90       # inbox copies of documents handed over to the internal system
    receipts_days = 1825     # receipts received, and the receipts we sent
    handover_days = 1825     # hand-over records
    spool_days = 1825        # records of finished messages
    audit_days = 1825        # closed audit log files
    sweep_interval_seconds = 3600

    [[retention.rule]]       # a peer (and service) kept differently
    peer = "sakura-lab"
    service = "lab-results"  # optional: every service of the peer when absent
    received_days = 30

A kind without a value is kept for ever (the default for all of them).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timedelta

from gateway.spool.records import RetainedKind
from gateway.tomlreader import Section

# The audit trail answers for who accessed which medical record: keep it at least as
# long as the records themselves (5 years for medical records, Medical Practitioners'
# Act art. 24); a shorter limit is a warning in check-config.
AUDIT_GUIDELINE_DAYS = 5 * 365
MAX_DAYS = 100 * 366
# What a record holds goes first: a record kept shorter than what it holds would take
# it along early (see gateway.spool.sqlite.retention).
HOLDS: dict[RetainedKind, tuple[RetainedKind, ...]] = {
    RetainedKind.RECEIVED: (),
    RetainedKind.RECEIPTS: (),
    RetainedKind.HANDOVER: (RetainedKind.RECEIVED,),
    RetainedKind.SPOOL: (RetainedKind.RECEIPTS, RetainedKind.HANDOVER, RetainedKind.RECEIVED),
}


NAMES = {
    RetainedKind.RECEIVED: "inbox copies of handed-over documents",
    RetainedKind.RECEIPTS: "receipts",
    RetainedKind.HANDOVER: "hand-over records",
    RetainedKind.SPOOL: "records of finished messages",
}


def _key(kind: RetainedKind) -> str:
    return f"{kind.value}_days"


@dataclass(frozen=True)
class RetentionRule:
    """Days to keep each kind for one peer (and one service; None: any of the peer's)."""

    peer: str
    service: str | None
    days: dict[RetainedKind, int | None] = field(default_factory=dict)  # None: for ever


@dataclass(frozen=True)
class RetentionSettings:
    days: dict[RetainedKind, int | None] = field(default_factory=dict)  # None: for ever
    audit_days: int | None = None
    rules: tuple[RetentionRule, ...] = ()
    sweep_interval_seconds: float = 3600.0

    def days_for(self, kind: RetainedKind, peer: str, service: str | None) -> int | None:
        """How long ``kind`` is kept for ``peer``'s ``service``: the rule naming the peer and
        service, else the peer's rule without a service, else the section's value."""
        for rule in sorted(self.rules, key=lambda r: r.service is None):
            if rule.peer == peer and rule.service in (None, service) and kind in rule.days:
                return rule.days[kind]
        return self.days.get(kind)

    def cutoff(
        self, kind: RetainedKind, peer: str, service: str | None, now: datetime
    ) -> datetime | None:
        """What finished before this time is disposed of (None: kept for ever)."""
        days = self.days_for(kind, peer, service)
        return None if days is None else now - timedelta(days=days)


KEEP = RetentionSettings()


def _days(section: Section, kind: RetainedKind) -> int | None:
    if not section.has(_key(kind)):
        section.mark_seen(_key(kind))
        return None
    return section.integer(_key(kind), default=None, minimum=0, maximum=MAX_DAYS)


def load_retention(
    section: Section, services: dict[str, tuple[str, ...]], message_expiry_seconds: float
) -> RetentionSettings:
    """Read ``[retention]``; problems go to the section's reader.  ``services``: every
    configured peer and its services (a rule naming another is an error)."""
    days = {kind: _days(section, kind) for kind in RetainedKind}
    audit_days = (
        section.integer("audit_days", default=None, minimum=1, maximum=MAX_DAYS)
        if section.has("audit_days")
        else None
    )
    section.mark_seen("audit_days")
    if audit_days is not None and audit_days < AUDIT_GUIDELINE_DAYS:
        section.problem(
            "audit_days",
            f"audit files are kept {audit_days} days, less than the {AUDIT_GUIDELINE_DAYS} "
            "days (5 years) medical records are kept: the trail of who accessed a record "
            "would go before the record",
            f"keep audit files at least {AUDIT_GUIDELINE_DAYS} days, or remove audit_days "
            "(kept for ever), unless your records manager decided otherwise",
            severity="warning",
        )
    interval = section.number(
        "sweep_interval_seconds", default=3600.0, minimum=60, maximum=7 * 86400
    )
    rules: list[RetentionRule] = []
    for item in section.tables("rule") if section.has("rule") else []:
        peer = item.string("peer", example='"sakura-lab"')
        service = item.string("service", default="") or None
        if peer and peer not in services:
            item.problem(
                "peer",
                f"no peer named {peer!r}",
                f"use a peer from peers.d/ ({', '.join(sorted(services)) or 'none yet'})",
            )
        elif peer and service is not None and service not in services[peer]:
            item.problem(
                "service",
                f"peer {peer!r} has no service {service!r}",
                f"use one of its services ({', '.join(services[peer]) or 'none'}), or remove "
                "`service` for all of them",
            )
        rule_days = {kind: _days(item, kind) for kind in RetainedKind if item.has(_key(kind))}
        for kind in RetainedKind:
            item.mark_seen(_key(kind))
        if any(r.peer == peer and r.service == service for r in rules):
            item.problem(
                "peer",
                f"a rule for peer {peer!r}"
                + (f" service {service!r}" if service else "")
                + " is there already",
                "merge the two [[retention.rule]] tables into one",
            )
        item.finish()
        rules.append(RetentionRule(peer, service, rule_days))
    section.finish()
    settings = RetentionSettings(days, audit_days, tuple(rules), interval)
    _check_holds(section, settings, services, message_expiry_seconds)
    return settings


def _check_holds(
    section: Section,
    settings: RetentionSettings,
    services: dict[str, tuple[str, ...]],
    message_expiry_seconds: float,
) -> None:
    """A record is kept at least as long as what it holds, for every peer and service; a
    received message's record (the resend detection) at least the message expiry."""
    groups: list[tuple[str, str | None]] = [("", None)]
    groups += [(p, s) for p, names in services.items() for s in (None, *names)]
    reported: set[tuple[RetainedKind, RetainedKind]] = set()
    for peer, service in groups:
        for record, held in HOLDS.items():
            mine = settings.days_for(record, peer, service)
            for other in held:
                theirs = settings.days_for(other, peer, service)
                if mine is None or (record, other) in reported:
                    continue
                if theirs is None or theirs > mine:
                    reported.add((record, other))
                    who = f" for peer {peer!r}" + (f" service {service!r}" if service else "")
                    section.problem(
                        _key(record),
                        f"{NAMES[record]} are kept {mine} days{who if peer else ''}, "
                        f"{NAMES[other]} {'for ever' if theirs is None else f'{theirs} days'}: "
                        f"the {NAMES[other]} would go with their records",
                        f"set {_key(other)} to at most {mine}"
                        + (f" (or {_key(record)} to at least {theirs})" if theirs else ""),
                    )
    spool = settings.days.get(RetainedKind.SPOOL)
    if spool is not None and spool * 86400 < message_expiry_seconds:
        section.problem(
            _key(RetainedKind.SPOOL),
            f"records are kept {spool} days, less than [runtime] message_expiry_seconds: "
            "a peer's resend after its record is gone would be delivered a second time",
            "keep records longer than any peer resends a message (at least "
            f"{int(message_expiry_seconds // 86400) + 1} days)",
            severity="warning",
        )
