"""What emergency mode relaxes, and nothing more: the revocation checks that
``[emergency]`` names, turned from "required" into "when known" (a certificate whose
status cannot be established is accepted; one found revoked, also in a stale CRL, is
still refused).  Path validation, the zones and signature verification are untouched.

* ``ocsp_unreachable_peers``: the named peers' certificates, in a zone that asks OCSP,
  while its responder cannot be reached;
* ``crl_stale_days``: the certificates of a zone that relies on CRL files alone, when
  every one of them is at most that many days past its nextUpdate.
"""

from __future__ import annotations

from dataclasses import replace
from datetime import datetime, timedelta

from gateway.config.emergency import EmergencySettings
from gateway.pki.peers import TrustSettings
from gateway.pki.validate import RevocationPolicy


def relaxed(
    settings: EmergencySettings, peer: str, trust: TrustSettings, at: datetime
) -> TrustSettings:
    """``trust`` as emergency mode judges ``peer``'s certificates (mode on)."""
    if trust.revocation is not RevocationPolicy.REQUIRE:
        return trust
    if trust.ocsp and peer in settings.ocsp_unreachable_peers:
        return replace(trust, revocation=RevocationPolicy.PREFER)
    if not trust.ocsp and trust.crls and settings.crl_stale_days:
        grace = timedelta(days=settings.crl_stale_days)
        if all(
            crl.next_update_utc is not None and at <= crl.next_update_utc + grace
            for crl in trust.crls
        ):
            return replace(trust, revocation=RevocationPolicy.PREFER)
    return trust
