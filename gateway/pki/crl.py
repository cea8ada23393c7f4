"""CRL files: freshness, and the early alarm before a CRL goes stale.

Signature, issuer, scope (issuingDistributionPoint) and delta CRLs are checked
during path validation (:mod:`gateway.pki.validate`).  This module answers
the operator's question "which of my CRL files will stop the traffic soon?":
a CRL past its ``nextUpdate`` makes every path under ``require`` invalid, so
the alarm goes off ``warn_days`` before that moment, not after the outage.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime, timedelta

from cryptography import x509

from gateway.errors import InvalidValueError

DEFAULT_WARN_DAYS = 7


@dataclass(frozen=True)
class CrlFinding:
    """One observation about one CRL: ``severity`` is ``"ok"``, ``"warning"`` or ``"error"``."""

    issuer: str
    severity: str
    message: str
    fix: str
    next_update: datetime | None

    def __str__(self) -> str:
        return f"{self.severity}: CRL of {self.issuer}: {self.message} (fix: {self.fix})"

    @property
    def cause(self) -> tuple[str, str, datetime | None]:
        """What this finding is about, without the time it was judged at: the CRL (its
        issuer and nextUpdate) and the kind of finding.  The message counts the time left
        (or names a download's last error), so the same finding reads differently at each
        re-check; this stays the same until the CRL or the kind of finding changes."""
        return (self.issuer, self.severity, self.next_update)


def is_delta(crl: x509.CertificateRevocationList) -> bool:
    try:
        crl.extensions.get_extension_for_class(x509.DeltaCRLIndicator)
    except x509.ExtensionNotFound:
        return False
    return True


def crl_findings(
    crls: Iterable[x509.CertificateRevocationList],
    *,
    at: datetime,
    warn_days: int = DEFAULT_WARN_DAYS,
) -> list[CrlFinding]:
    """Freshness of every CRL at ``at``: expired and not-yet-valid are errors,
    a ``nextUpdate`` within ``warn_days`` (or none at all) is a warning."""
    if at.tzinfo is None:
        raise InvalidValueError(
            f"at={at.isoformat()}: CRL freshness is judged at a time with a time zone",
            fix="pass an aware time, e.g. the injected clock's now()",
        )
    out: list[CrlFinding] = []
    for crl in crls:
        issuer = crl.issuer.rfc4514_string()
        kind = "delta CRL" if is_delta(crl) else "CRL"
        next_update = crl.next_update_utc
        this_update = crl.last_update_utc
        if this_update > at:
            out.append(
                CrlFinding(
                    issuer,
                    "error",
                    f"{kind} is not valid before {this_update:%Y-%m-%d %H:%M}Z (thisUpdate)",
                    "check this machine's clock, or wait until the CRL is valid",
                    next_update,
                )
            )
            continue
        if next_update is None:
            out.append(
                CrlFinding(
                    issuer,
                    "warning",
                    f"{kind} has no nextUpdate, so its freshness cannot be judged",
                    "ask the CA to publish CRLs with nextUpdate (RFC 5280 requires it)",
                    None,
                )
            )
            continue
        if next_update <= at:
            out.append(
                CrlFinding(
                    issuer,
                    "error",
                    f"{kind} is stale: nextUpdate {next_update:%Y-%m-%d %H:%M}Z has passed",
                    "download the current CRL from the CA into the CRL folder and reload",
                    next_update,
                )
            )
        elif next_update - at <= timedelta(days=warn_days):
            left = next_update - at
            hours = int(left.total_seconds() // 3600)
            out.append(
                CrlFinding(
                    issuer,
                    "warning",
                    f"{kind} goes stale in {hours // 24} d {hours % 24} h "
                    f"(nextUpdate {next_update:%Y-%m-%d %H:%M}Z)",
                    "fetch the CA's next CRL now, before traffic is refused",
                    next_update,
                )
            )
        else:
            days = (next_update - at).days
            out.append(
                CrlFinding(
                    issuer,
                    "ok",
                    f"{kind} fresh for {days} more days (nextUpdate {next_update:%Y-%m-%d}Z)",
                    "",
                    next_update,
                )
            )
    return out


def stale_crl_warnings(
    crls: Iterable[x509.CertificateRevocationList],
    *,
    at: datetime,
    warn_days: int = DEFAULT_WARN_DAYS,
) -> list[CrlFinding]:
    """Only the findings an operator must act on (warnings and errors)."""
    return [f for f in crl_findings(crls, at=at, warn_days=warn_days) if f.severity != "ok"]
