"""Certificates that expire soon: the running daemon alerts 30, 7 and 1 day(s) before.

Pure functions over the loaded configuration's certificates (ours: TLS,
S/MIME signing and decryption, the audit export's client certificate, and the CA
certificates on the path a peer builds from one of those we send; each peer's TLS,
signing and encryption certificates).  The daemon calls
:func:`expiring` at start and at every trust refresh, and alerts once per
certificate and threshold crossed (gateway.daemon).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime

from cryptography import x509

from gateway.pki.tls import certificate_fingerprint

THRESHOLDS_DAYS = (30, 7, 1)


@dataclass(frozen=True)
class Held:
    """A certificate the configuration uses: whose (``"this gateway"``, ``"peer 'lab'"``)
    and for what (``"TLS"``, ``"S/MIME signing"``..., ``"CA"``: a CA certificate sent
    with ``sent_with``, the uses of the certificates it issued)."""

    owner: str
    use: str
    certificate: x509.Certificate
    peer: str | None = None  # the peer's name, when it is a peer's
    sent_with: tuple[str, ...] = ()


@dataclass(frozen=True)
class Expiring:
    held: Held
    fingerprint: str
    threshold_days: int  # the smallest threshold it is within
    days_left: float
    not_after: datetime

    def text(self) -> str:
        held = self.held
        what = f"{held.owner}'s {held.use} certificate {held.certificate.subject.rfc4514_string()}"
        if held.sent_with:
            what += f" (in the chain of its {' and '.join(held.sent_with)} certificate)"
        when = self.not_after.isoformat(timespec="seconds")
        if self.days_left <= 0:
            return f"{what} expired at {when}"
        return (
            f"{what} expires at {when}, in {self.days_left:.1f} day(s) "
            f"(within {self.threshold_days})"
        )


def expiring(held: Iterable[Held], now: datetime) -> list[Expiring]:
    """The certificates within 30 days of their notAfter (or past it), once each."""
    found: list[Expiring] = []
    seen: set[tuple[str, str, str]] = set()
    for item in held:
        fingerprint = certificate_fingerprint(item.certificate)
        key = (item.owner, item.use, fingerprint)
        if key in seen:
            continue
        seen.add(key)
        not_after = item.certificate.not_valid_after_utc
        days_left = (not_after - now).total_seconds() / 86400
        within = [t for t in THRESHOLDS_DAYS if days_left <= t]
        if within:
            found.append(Expiring(item, fingerprint, min(within), days_left, not_after))
    return found
