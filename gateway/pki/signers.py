"""Personal signers: a person of a peer institution signs, not the institution's key.

A peer whose ``peers.d`` file says ``personal_signers = true`` may send
messages signed by one of its people - a doctor with an HPKI card - instead of
(or besides) its institutional signing certificates.  Such a signer is
accepted only when its certificate validates for S/MIME signing under the
trust anchors of the peer's zone, with the zone's revocation policy, at the
time of verification, and is not a certificate configured for another peer.

:class:`PersonalSigners` is the ``validate_signer`` hook of
:func:`gateway.cms.stream.verify_entity_file`: it is called only for a signer
that is not one of the peer's acceptable signing certificates, and raises
:class:`SignerNotTrustedError` naming the signer and the reason to refuse.
One instance serves one message (it records what it accepted).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime

from cryptography import x509

from gateway.errors import SignerNotTrustedError
from gateway.pki.ocsp import OcspClient
from gateway.pki.peers import TrustSettings
from gateway.pki.tls import certificate_fingerprint
from gateway.pki.validate import Purpose, ValidationResult, validate
from gateway.policy import AlgorithmPolicy


@dataclass
class PersonalSigners:
    """Accept a person's certificate under ``trust`` for peer ``peer`` (zone ``zone``).

    ``others`` maps the SHA-256 fingerprint of every certificate configured
    for another peer to that peer's name: an institution's certificate never
    passes as a person of this peer.  ``accepted`` is the validation of the
    signer this hook accepted (None until it accepts one).
    """

    peer: str
    zone: str
    trust: TrustSettings
    at: datetime
    policy: AlgorithmPolicy
    others: Mapping[str, str] = field(default_factory=dict)
    accepted: ValidationResult | None = None

    def __call__(self, signer: x509.Certificate, carried: Sequence[x509.Certificate]) -> None:
        who = signer.subject.rfc4514_string() or f"(serial 0x{signer.serial_number:x})"
        owner = self.others.get(certificate_fingerprint(signer))
        if owner is not None:
            raise SignerNotTrustedError(
                f"signer {who} is a certificate of peer {owner!r}, not of {self.peer!r}: "
                "one institution's certificate does not sign for another",
                fix=f"ask {self.peer!r} to sign with its own or its staff's certificates",
            )
        carried_certs = tuple(carried)

        def check() -> ValidationResult:
            return asyncio.run(
                validate(
                    signer,
                    anchors=self.trust.anchors,
                    intermediates=(*self.trust.intermediates, *carried_certs),
                    purpose=Purpose.SMIME_SIGN,
                    at=self.at,
                    revocation=self.trust.revocation,
                    crls=self.trust.crls,
                    ocsp=self.trust.ocsp,
                    ocsp_client=(
                        OcspClient(self.trust.ocsp_route)
                        if self.trust.ocsp_route is not None
                        else None
                    ),
                    policy=self.policy,
                )
            )

        result = _off_loop(check)
        if not result.valid:
            raise SignerNotTrustedError(
                f"signer {who} (issuer {signer.issuer.rfc4514_string()}) is not one of peer "
                f"{self.peer!r}'s signing certificates, and as a personal signer it does not "
                f"validate for smime-sign under the trust anchors of zone {self.zone!r}: "
                f"{result.reason}",
                fix="if this person belongs to the peer, their certificate must come from a CA "
                f"under zone {self.zone!r}'s trust_anchors and be valid and unrevoked; "
                "otherwise reject the message",
            )
        self.accepted = result


def _off_loop(job: Callable[[], ValidationResult]) -> ValidationResult:
    """Run ``job`` (which runs its own event loop) from synchronous code.

    The inbound pipeline runs in a worker thread without a loop; should a
    caller hold a running loop in this thread, the job gets a thread of its own.
    """
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return job()
    with ThreadPoolExecutor(max_workers=1) as pool:
        return pool.submit(job).result()
