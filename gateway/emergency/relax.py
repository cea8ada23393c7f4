"""What emergency mode relaxes, and nothing more: the revocation checks that
``[emergency]`` names, turned from "required" into "when known" (a certificate whose
status cannot be established is accepted; one found revoked, also in a stale CRL, is
still refused).  Path validation, the zones and signature verification are untouched.

* ``ocsp_unreachable_peers``: the named peers' certificates, in a zone that asks OCSP,
  while its responder cannot be reached;
* ``crl_stale_days``: the certificates of a zone that relies on CRL files alone, when
  every one of them is at most that many days past its nextUpdate, and the issuer of
  each of the peer's certificates has one (a CA without any CRL is not a stale CRL:
  its certificates stay refused; so are those of an intermediate CA while a trust
  anchor of the zone has no CRL, as the intermediate's own status rests on it).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import replace
from datetime import datetime, timedelta

from cryptography import x509

from gateway.config.emergency import EmergencySettings
from gateway.pki.peers import TrustSettings
from gateway.pki.validate import RevocationPolicy


def relaxed(
    settings: EmergencySettings,
    peer: str,
    trust: TrustSettings,
    at: datetime,
    certificates: Iterable[x509.Certificate],
) -> TrustSettings:
    """``trust`` as emergency mode judges ``peer``'s ``certificates`` (mode on)."""
    if trust.revocation is not RevocationPolicy.REQUIRE:
        return trust
    if trust.ocsp and peer in settings.ocsp_unreachable_peers:
        return replace(trust, revocation=RevocationPolicy.PREFER)
    if not trust.ocsp and settings.crl_stale_days and _crls_cover(trust, certificates):
        grace = timedelta(days=settings.crl_stale_days)
        if all(
            crl.next_update_utc is not None and at <= crl.next_update_utc + grace
            for crl in trust.crls
        ):
            return replace(trust, revocation=RevocationPolicy.PREFER)
    return trust


def _crls_cover(trust: TrustSettings, certificates: Iterable[x509.Certificate]) -> bool:
    """Whether the zone holds a CRL of each CA whose word the peer's certificates need."""
    issuers = {crl.issuer for crl in trust.crls}
    anchors = {anchor.subject for anchor in trust.anchors}
    needed = {cert.issuer for cert in certificates}
    if not needed <= anchors:  # an intermediate CA: its own status is in an anchor's CRL
        needed |= anchors
    return bool(needed) and needed <= issuers
