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

from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import TYPE_CHECKING

from cryptography import x509

from gateway.egress import ZonePath
from gateway.pki.ocsp import OcspClient
from gateway.pki.tls import certificate_fingerprint
from gateway.pki.validate import Purpose, RevocationPolicy, ValidationResult, validate
from gateway.policy import AlgorithmPolicy

if TYPE_CHECKING:
    from gateway.config import Zone


@dataclass(frozen=True)
class TrustSettings:
    """What one zone trusts and how strictly it checks revocation."""

    anchors: tuple[x509.Certificate, ...]
    intermediates: tuple[x509.Certificate, ...] = ()
    crls: tuple[x509.CertificateRevocationList, ...] = ()
    revocation: RevocationPolicy = RevocationPolicy.OFF
    ocsp: bool = False
    # How OCSP requests leave: from the zone's source address, into its egress only.
    network: ZonePath = field(default_factory=ZonePath)

    @classmethod
    def of_zone(cls, zone: Zone) -> TrustSettings:
        """What ``zone`` trusts, how it checks revocation, and how its OCSP requests leave."""
        return cls(
            anchors=zone.trust_anchors,
            crls=zone.crls,
            revocation=RevocationPolicy(zone.revocation),
            ocsp=zone.ocsp,
            network=zone.network,
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
