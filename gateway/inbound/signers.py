"""Who may sign what a peer sends, and what is said about the one who did.

A peer's messages are signed with one of its signing certificates (those that
validate now, as the PKI layer judges them), or, where the peer allows
``personal_signers``, with a person's certificate under its zone's PKI.  Once a
signature verified, its signer is described for the audit record (subject, kind,
HPKI roles) and, when it holds HPKI roles, in a line of the receipt.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from cryptography import x509

from gateway.clock import Clock
from gateway.cms.verification import VerifiedSignature
from gateway.config import GatewayConfig, Peer
from gateway.egress import Network
from gateway.pki.hpki import hcroles
from gateway.pki.peers import TrustSettings
from gateway.pki.signers import PersonalSigners
from gateway.pki.tls import certificate_fingerprint


@dataclass(frozen=True)
class SignerDescription:
    """The signer of a verified message: ``detail`` for its audit records, and a line
    for the receipt (None: nothing to add)."""

    detail: dict[str, object]
    receipt_line: str | None


class AcceptedSigners:
    def __init__(
        self,
        config: GatewayConfig,
        network: Network,
        clock: Clock,
        signers: Mapping[str, tuple[x509.Certificate, ...]] | None,
    ) -> None:
        """``signers``: each peer's signing certificates that validate now (PKI layer);
        None (tests of the receiving layer alone): every configured one."""
        self._config = config
        self._network = network
        self._clock = clock
        self._signers = signers

    def pinned(self, peer: Peer) -> tuple[x509.Certificate, ...]:
        """The peer's own signing certificates that may sign now."""
        if self._signers is None:
            return peer.signing_certificates
        return self._signers.get(peer.name, ())

    def personal(self, peer: Peer) -> PersonalSigners | None:
        """With ``personal_signers = true``: accept a person's certificate under the
        zone's PKI (never one of another peer's certificates)."""
        if not peer.personal_signers:
            return None
        zone = self._config.require_zone(peer.zone)
        others = {
            certificate_fingerprint(cert): other.name
            for other in self._config.peers
            if other.name != peer.name
            for cert in (
                *other.tls_certificates,
                *other.signing_certificates,
                *other.encryption_certificates,
            )
        }
        return PersonalSigners(
            peer=peer.name,
            zone=zone.name,
            trust=TrustSettings.of_zone(zone, self._network.zone(zone.name)),
            at=self._clock.now(),
            policy=peer.policy,
            others=others,
        )


def describe_signer(
    verified: VerifiedSignature, personal: PersonalSigners | None
) -> SignerDescription:
    """What the audit trail and the receipt say about ``verified``'s signer; an HPKI
    qualification is recorded, never a reason to refuse."""
    signer = verified.signer.subject.rfc4514_string()
    roles = hcroles(verified.signer)
    detail: dict[str, object] = {"signer": signer}
    if personal is not None and personal.accepted is not None:
        detail["signer_kind"] = "personal"
        detail["signer_revocation"] = personal.accepted.revocation
    if roles.present:
        detail["signer_role"] = roles.summary
        detail["signer_roles"] = [r.to_json() for r in roles.roles]
        if roles.problem is not None:
            detail["signer_role_problem"] = roles.problem
    line = f"Signed by {signer}, {roles.describe()}" if roles.present else None
    return SignerDescription(detail, line)
