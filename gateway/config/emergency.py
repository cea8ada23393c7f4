"""``[emergency]`` in gateway.toml: how long an emergency may last, and exactly which
checks it may relax.

Only the checks named here are relaxed, and only while emergency mode is on.  The
zones (NET-4: a peer on its own zone's listener, no transit between zones) and
signature verification (NET-5) are never relaxed: a key that tries to list them is
an error naming that rule, and so is any other unknown key.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from gateway.tomlreader import Section

DEFAULT_MAX_HOURS = 24.0
DEFAULT_BREAK_GLASS_HOURS = 4.0
MAX_HOURS = 7 * 24.0  # an emergency longer than a week is a new normal: declare it again
MAX_CRL_STALE_DAYS = 30
MAX_NAMED_PEERS = 64

# Keys an administrator might write to relax what can never be relaxed, and why not.
NEVER: dict[str, str] = {
    "zones": "the zones (NET-4)",
    "zone": "the zones (NET-4)",
    "zone_checks": "the zones (NET-4)",
    "transit": "the rule against transit between zones (NET-4)",
    "allow_transit": "the rule against transit between zones (NET-4)",
    "signatures": "signature verification (NET-5)",
    "signature": "signature verification (NET-5)",
    "verify_signatures": "signature verification (NET-5)",
    "skip_signature_verification": "signature verification (NET-5)",
    "unsigned_peers": "signature verification (NET-5)",
}


@dataclass(frozen=True)
class EmergencySettings:
    max_hours: float = DEFAULT_MAX_HOURS  # the longest emergency an admin may declare
    break_glass_hours: float = DEFAULT_BREAK_GLASS_HOURS  # what a break-glass login opens
    crl_stale_days: int = 0  # CRLs up to this many days past nextUpdate are accepted
    ocsp_unreachable_peers: tuple[str, ...] = ()  # may send while their OCSP is down

    def relaxations(self) -> dict[str, object]:
        """What is relaxed while the mode is on, as the audit trail records it."""
        found: dict[str, object] = {}
        if self.crl_stale_days:
            found["crl_stale_days"] = self.crl_stale_days
        if self.ocsp_unreachable_peers:
            found["ocsp_unreachable_peers"] = list(self.ocsp_unreachable_peers)
        return found


def load_emergency(section: Section, peers: Sequence[str]) -> EmergencySettings:
    for key, what in NEVER.items():
        if section.has(key):
            section.mark_seen(key)
            section.problem(
                key,
                f"{what} can never be relaxed, not even in emergency mode",
                "remove the key; [emergency] may relax only crl_stale_days and "
                "ocsp_unreachable_peers",
            )
    most = section.number("max_hours", default=DEFAULT_MAX_HOURS, minimum=0.25, maximum=MAX_HOURS)
    glass = section.number(
        "break_glass_hours",
        default=min(DEFAULT_BREAK_GLASS_HOURS, most),
        minimum=0.25,
        maximum=most,
    )
    stale = section.integer("crl_stale_days", default=0, minimum=0, maximum=MAX_CRL_STALE_DAYS)
    named = section.string_list("ocsp_unreachable_peers", required=False)
    if len(named) > MAX_NAMED_PEERS:
        section.problem(
            "ocsp_unreachable_peers", f"{len(named)} peers", f"name at most {MAX_NAMED_PEERS}"
        )
        named = named[:MAX_NAMED_PEERS]
    for name in named:
        if name not in peers:
            section.problem(
                "ocsp_unreachable_peers",
                f"{name!r} is not a configured peer",
                f"name peers of peers.d/: {', '.join(peers) or '(none)'}",
            )
    section.finish()
    return EmergencySettings(most, glass, stale, tuple(n for n in named if n in peers))
