"""Which of a peer's configured certificates are acceptable right now.

A peer lists certificates per use (TLS, S/MIME signing, S/MIME encryption);
during a rotation it lists the old and the new one.  Each is judged on its
own by full path validation (RFC 5280, purpose, CRYPTREC policy, revocation
per the zone's policy) at a given time.  The daemon pins only the acceptable
ones in its TLS contexts, accepts signatures only from acceptable signing
certificates, and encrypts to the newest acceptable encryption certificate.
So an expired, not-yet-valid or revoked certificate drops out by itself, and
an overlap window (both valid) needs no switch at an exact instant.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, replace
from datetime import datetime
from pathlib import Path
from typing import Protocol, TypeVar

from cryptography import x509

from gateway.egress import Route
from gateway.pki.ocsp import OcspClient
from gateway.pki.tls import certificate_fingerprint
from gateway.pki.validate import Purpose, RevocationPolicy, ValidationResult, validate
from gateway.policy import AlgorithmPolicy


class Zone(Protocol):
    """What trust needs to know about a zone (``gateway.config.Zone`` is one)."""

    @property
    def name(self) -> str: ...
    @property
    def trust_anchors(self) -> tuple[x509.Certificate, ...]: ...
    @property
    def crls_in_use(self) -> tuple[x509.CertificateRevocationList, ...]: ...
    @property
    def revocation(self) -> str: ...
    @property
    def ocsp(self) -> bool: ...
    @property
    def fetch_crls(self) -> bool: ...


class Peer(Protocol):
    """What trust needs to know about a peer (``gateway.config.Peer`` is one)."""

    @property
    def name(self) -> str: ...
    @property
    def source(self) -> Path: ...
    @property
    def zone(self) -> str: ...
    @property
    def tls_certificates(self) -> tuple[x509.Certificate, ...]: ...
    @property
    def signing_certificates(self) -> tuple[x509.Certificate, ...]: ...
    @property
    def encryption_certificates(self) -> tuple[x509.Certificate, ...]: ...
    @property
    def policy(self) -> AlgorithmPolicy: ...


Z = TypeVar("Z", bound=Zone)

# Each use of a peer's certificates: the peers.d key that lists them, and its name.
ROLES = (
    ("tls", "tls_certificates", "TLS"),
    ("signing", "signing_certificates", "S/MIME signing"),
    ("encryption", "encryption_certificates", "S/MIME encryption"),
)


@dataclass(frozen=True)
class TrustSettings:
    """What one zone trusts and how strictly it checks revocation."""

    anchors: tuple[x509.Certificate, ...]
    intermediates: tuple[x509.Certificate, ...] = ()
    crls: tuple[x509.CertificateRevocationList, ...] = ()
    revocation: RevocationPolicy = RevocationPolicy.OFF
    ocsp: bool = False
    # The daemon downloads the CRLs the certificates name (gateway.pki.crlfetch).
    fetch_crls: bool = False
    # How OCSP requests about certificates met in traffic (personal signers) leave:
    # the zone's route (its source address, into its egress only); None: not asked.
    ocsp_route: Route | None = None

    @classmethod
    def of_zone(cls, zone: Zone, route: Route | None = None) -> TrustSettings:
        """What ``zone`` trusts, how it checks revocation, and how its OCSP requests
        leave (``route``: the zone's)."""
        return cls(
            anchors=zone.trust_anchors,
            crls=zone.crls_in_use,
            revocation=RevocationPolicy(zone.revocation),
            ocsp=zone.ocsp,
            fetch_crls=zone.fetch_crls,
            ocsp_route=route,
        )


@dataclass(frozen=True)
class CertVerdict:
    certificate: x509.Certificate
    purpose: Purpose
    result: ValidationResult

    @property
    def valid(self) -> bool:
        return self.result.valid

    @property
    def fingerprint(self) -> str:
        return certificate_fingerprint(self.certificate)

    @property
    def subject(self) -> str:
        return self.certificate.subject.rfc4514_string()


@dataclass(frozen=True)
class PeerTrust:
    peer: str
    tls: tuple[CertVerdict, ...]
    signing: tuple[CertVerdict, ...]
    encryption: tuple[CertVerdict, ...]

    @property
    def tls_certificates(self) -> tuple[x509.Certificate, ...]:
        return tuple(v.certificate for v in self.tls if v.valid)

    @property
    def signing_certificates(self) -> tuple[x509.Certificate, ...]:
        return tuple(v.certificate for v in self.signing if v.valid)

    @property
    def encryption_recipient(self) -> x509.Certificate | None:
        """The newest acceptable encryption certificate (latest notBefore)."""
        valid = [v.certificate for v in self.encryption if v.valid]
        return max(valid, key=lambda c: c.not_valid_before_utc) if valid else None

    @property
    def rejected(self) -> tuple[CertVerdict, ...]:
        return tuple(v for v in (*self.tls, *self.signing, *self.encryption) if not v.valid)

    def role(self, name: str) -> tuple[CertVerdict, ...]:
        """The verdicts of one use: ``tls``, ``signing`` or ``encryption``."""
        verdicts: tuple[CertVerdict, ...] = getattr(self, name)
        return verdicts

    @property
    def unusable(self) -> str | None:
        """Why the exchange with this peer cannot work (None: it can): a use for which
        none of its configured certificates is acceptable."""
        missing = []
        for name, _, label in ROLES:
            verdicts = self.role(name)
            if not any(v.valid for v in verdicts):
                why = next((v.result.reason for v in verdicts if v.result.reason), None)
                missing.append(f"no acceptable {label} certificate" + (f" ({why})" if why else ""))
        return "; ".join(missing) or None

    @property
    def unusable_cause(self) -> tuple[tuple[str, tuple[tuple[str, tuple[str, ...]], ...]], ...]:
        """What makes this peer unusable, without the time it was judged at (empty: it is
        usable): each use with no acceptable certificate, with the fingerprint of each of
        its certificates and their revocation statuses.  The reason's text names the clock
        (a stale CRL), so the same problem reads differently at each re-check; this stays
        the same until another certificate is refused or the cause changes."""
        uses = ((name, self.role(name)) for name, _, _ in ROLES)
        return tuple(
            (name, tuple((v.fingerprint, tuple(s.status for s in v.result.statuses)) for v in vs))
            for name, vs in uses
            if not any(v.valid for v in vs)
        )


async def _judge(
    certs: Sequence[x509.Certificate],
    purpose: Purpose,
    trust: TrustSettings,
    *,
    at: datetime,
    policy: AlgorithmPolicy,
    ocsp_client: OcspClient | None,
) -> tuple[CertVerdict, ...]:
    verdicts = []
    for cert in certs:
        result = await validate(
            cert,
            anchors=trust.anchors,
            intermediates=trust.intermediates,
            purpose=purpose,
            at=at,
            revocation=trust.revocation,
            crls=trust.crls,
            ocsp=trust.ocsp,
            ocsp_client=ocsp_client,
            policy=policy,
        )
        verdicts.append(CertVerdict(cert, purpose, result))
    return tuple(verdicts)


async def assess_peer(
    name: str,
    *,
    tls: Sequence[x509.Certificate],
    signing: Sequence[x509.Certificate],
    encryption: Sequence[x509.Certificate],
    trust: TrustSettings,
    at: datetime,
    policy: AlgorithmPolicy,
    ocsp_client: OcspClient | None = None,
) -> PeerTrust:
    """Judge every configured certificate of one peer for its use."""

    async def judge(certs: Sequence[x509.Certificate], purpose: Purpose) -> tuple[CertVerdict, ...]:
        return await _judge(certs, purpose, trust, at=at, policy=policy, ocsp_client=ocsp_client)

    return PeerTrust(
        peer=name,
        # The same certificate serves as client (it sends to us) and server (we send to it).
        tls=await judge(tls, Purpose.TLS_CLIENT),
        signing=await judge(signing, Purpose.SMIME_SIGN),
        encryption=await judge(encryption, Purpose.SMIME_ENCRYPT),
    )


def offline(trust: TrustSettings) -> TrustSettings:
    """``trust`` judged from local files only (``check-config``): no OCSP request; where
    the zone relies on OCSP or on CRLs the daemon downloads, a status the local CRLs
    cannot establish is not a refusal (the daemon asks the responder, or fetches the
    CRL), while a revocation in a local CRL still is."""
    if not trust.ocsp and not trust.fetch_crls:
        return trust
    revocation = trust.revocation
    if revocation is RevocationPolicy.REQUIRE:
        revocation = RevocationPolicy.PREFER
    return replace(trust, ocsp=False, revocation=revocation)


async def assess_peers(
    peers: Iterable[Peer],
    zones: Iterable[Z],
    *,
    at: datetime,
    ocsp_client: Callable[[Z], OcspClient] | None = None,
    adjust: Callable[[str, TrustSettings], TrustSettings] | None = None,
) -> dict[str, PeerTrust]:
    """Judge every configured certificate of every peer, with its zone's trust.

    ``ocsp_client`` gives each zone's OCSP client (the daemon); without it the
    judgement uses local files only (see :func:`offline`).  ``adjust`` may change a
    peer's trust settings (the daemon's emergency mode: gateway.emergency.relax).
    """
    by_name = {z.name: z for z in zones}
    trust = {}
    for peer in peers:
        zone = by_name[peer.zone]
        settings = TrustSettings.of_zone(zone)
        if adjust is not None:
            settings = adjust(peer.name, settings)
        trust[peer.name] = await assess_peer(
            peer.name,
            tls=peer.tls_certificates,
            signing=peer.signing_certificates,
            encryption=peer.encryption_certificates,
            trust=settings if ocsp_client is not None else offline(settings),
            at=at,
            policy=peer.policy,
            ocsp_client=ocsp_client(zone) if ocsp_client is not None else None,
        )
    return trust
