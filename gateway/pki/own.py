"""Our own certificates judged by the rules a peer's certificate is judged by.

A peer refuses our TLS certificate, our signature or our encryption certificate by
the same rules medgw applies to the peer's (:mod:`gateway.pki.validate`): validity,
keyUsage and extendedKeyUsage for the use, and a path to one of its trust anchors.
The first two a peer applies as we do, so breaking them is an error here (validity:
of every certificate we send, the CA certificates after ours in its file too).  This
host's clock judges validity, so such an error also names the clock reading: after a
clock step the certificate may be current and the clock wrong.  The path
a peer builds ends at its own trust anchors, which we cannot see: a certificate that
chains to none of ours is said, as a warning, with what a peer needs to accept it.

A certificate that chains to a zone's trust anchors is also judged by that zone's CRLs,
as a peer's is: listed there (ours, or a CA certificate on its path), our CA revoked it
and every peer that checks its CRLs refuses it, an error whatever the zone's revocation
policy (that policy says how the peers' certificates are judged, not ours).  A status
no CRL of the zone gives is no finding: our own CA's CRL is often not configured.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime

from cryptography import x509

from gateway.pki.tls import issues
from gateway.pki.validate import (
    Purpose,
    RevocationPolicy,
    check_purpose,
    check_validity,
    validate,
)
from gateway.policy import AlgorithmPolicy


@dataclass(frozen=True)
class OwnFinding:
    """One thing a peer would hold against our certificate: ``severity`` ``"error"``
    (every peer refuses it) or ``"warning"`` (a peer may), the rule broken and its fix;
    ``replace``: the fix is a new certificate (the caller says where it goes); ``clock``:
    the other cause, this host's clock, said after the fix."""

    severity: str
    message: str
    fix: str
    replace: bool = False
    clock: str = ""


def _error(reason: str, *, replace: bool) -> OwnFinding:
    message, _, fix = reason.partition("; fix: ")
    return OwnFinding("error", message, fix, replace)


def _outside_validity(
    reason: str, cert: x509.Certificate, at: datetime, *, sent_with: x509.Certificate | None
) -> OwnFinding:
    """The error for ``cert`` outside its validity period at ``at`` (``reason``, from
    :func:`check_validity`): ours (``sent_with`` None), or a CA certificate sent with
    ``sent_with``, which every peer refuses just the same."""
    expired = at > cert.not_valid_after_utc
    message, _, fix = reason.partition("; fix: ")
    reading = f"the clock reads {at.astimezone(UTC):%Y-%m-%d %H:%M}Z"
    if expired:
        clock = f"or, if the certificate is current, this host's clock is wrong ({reading}: "
        clock += "timedatectl)"
    else:
        clock = f"{reading} (timedatectl)"
    if sent_with is None:
        # Expired: a new certificate; not valid yet: this host's clock, or patience.
        return OwnFinding("error", message, fix, replace=expired, clock=clock)
    if expired:
        fix = (
            "put its CA's current certificate (ask the CA for it) in its place, after yours "
            "in the certificate file"
        )
    return OwnFinding(
        "error",
        f"certificate {sent_with.subject.rfc4514_string()}'s chain: CA {message}",
        fix,
        clock=clock,
    )


async def judge_own(
    certificate: x509.Certificate,
    *,
    chain: Sequence[x509.Certificate],
    purposes: Sequence[Purpose],
    anchors: Mapping[str, Sequence[x509.Certificate]] | None,
    at: datetime,
    policy: AlgorithmPolicy,
    crls: Mapping[str, Sequence[x509.CertificateRevocationList]] | None = None,
) -> list[OwnFinding]:
    """What a peer would hold against ``certificate`` for each of ``purposes`` at ``at``.

    ``chain``: the CA certificates sent with it; ``anchors``: each zone's trust anchors
    (by zone name), None for a certificate the zones' peers never see (the audit
    export's client certificate: its collector trusts a CA of its own); ``crls``: each
    zone's CRLs (by zone name).  Errors: outside its validity period, or not made for a
    purpose; else revoked by a CRL of a zone it chains to.  Else a warning when it
    chains to the trust anchors of no zone (none at all when it chains to one's)."""
    path = peer_path(certificate, chain, at)
    errors: list[OwnFinding] = []
    aside: list[OwnFinding] = []
    for cert in (certificate, *chain):
        reason = check_validity(cert, at)
        if reason is None:
            continue
        sent_with = None if cert is certificate else certificate
        finding = _outside_validity(reason, cert, at, sent_with=sent_with)
        if sent_with is None or any(cert is c for c in path):
            errors.append(finding)
        else:
            # In the file but on no path from ours (a root, an old cross-certificate,
            # the next intermediate put there early): a peer does not need it.
            aside.append(dataclasses.replace(finding, severity="warning"))
    for reason in dict.fromkeys(check_purpose(certificate, p) for p in purposes):
        if reason is not None:
            errors.append(_error(reason, replace=True))
    if errors or anchors is None:
        return errors + aside
    refused: dict[str, str] = {}  # zone -> why a path to its anchors was refused
    chained: list[str] = []  # the zones it chains to
    for zone, trusted in anchors.items():
        result = await validate(
            certificate,
            anchors=trusted,
            intermediates=chain,
            purpose=purposes[0],
            at=at,
            revocation=RevocationPolicy.OFF,
            policy=policy,
        )
        if result.valid:
            chained.append(zone)
        elif len(result.chain) > 1:  # a path was built, and refused
            refused[zone] = (result.reason or "refused").partition("; fix: ")[0]
    if chained:
        revoked: dict[str, OwnFinding] = {}  # one per message: zones may share a CRL
        for zone in chained:
            found = await _revoked(
                certificate,
                chain=chain,
                purpose=purposes[0],
                zone=zone,
                anchors=anchors[zone],
                crls=(crls or {}).get(zone, ()),
                at=at,
                policy=policy,
            )
            if found is not None:
                revoked.setdefault(found.message, found)
        return [*revoked.values(), *aside]
    subject = certificate.subject.rfc4514_string()
    issuer = certificate.issuer.rfc4514_string()
    zones = ", ".join(anchors) or "none is configured"
    paths = "".join(f"; zone {zone}: {reason}" for zone, reason in refused.items())
    unanchored = OwnFinding(
        "warning",
        f"certificate {subject} chains to the trust anchors of no zone ({zones}){paths}: "
        f"a peer accepts it only if its own trust anchors hold the root CA of its issuer "
        f"{issuer}",
        "ask each peer's administrator to trust that root CA (send them its certificate), "
        "or use a certificate from a CA your peers trust",
    )
    return [unanchored, *aside]


async def _revoked(
    certificate: x509.Certificate,
    *,
    chain: Sequence[x509.Certificate],
    purpose: Purpose,
    zone: str,
    anchors: Sequence[x509.Certificate],
    crls: Sequence[x509.CertificateRevocationList],
    at: datetime,
    policy: AlgorithmPolicy,
) -> OwnFinding | None:
    """The error for ``certificate``, or a CA certificate on its path to ``zone``'s
    ``anchors``, revoked by one of the zone's ``crls``: judged as a peer's certificate
    is under "prefer" (a status no CRL gives is no finding; one a stale CRL lists stays
    revoked)."""
    if not crls:
        return None
    result = await validate(
        certificate,
        anchors=anchors,
        intermediates=chain,
        purpose=purpose,
        at=at,
        revocation=RevocationPolicy.PREFER,
        crls=crls,
        policy=policy,
    )
    # The statuses go leaf first, as the chain does: each one's CRL is its issuer's.
    for index, status in enumerate(result.statuses[: len(result.chain) - 1]):
        if status.status != "revoked":
            continue
        what = status.detail.partition("; fix: ")[0]
        issuer = result.chain[index + 1].subject.rfc4514_string()
        where = f"by the CRL of {issuer} that zone {zone} holds"
        if index == 0:
            fix = (
                f"ask the CA ({issuer}) for a new certificate (`medgw pki csr` makes the "
                "request): every peer that checks its CRL refuses this one"
            )
            return OwnFinding("error", f"{what}, {where}", fix, replace=True)
        subject = certificate.subject.rfc4514_string()
        return OwnFinding(
            "error",
            f"certificate {subject}'s chain: CA {what}, {where}",
            "ask the CA for a new certificate issued by a CA certificate that is not revoked, "
            "and that CA certificate to put after yours in the certificate file: every peer "
            "that checks its CRL refuses this chain",
            replace=True,
        )
    return None


def peer_path(
    certificate: x509.Certificate, chain: Sequence[x509.Certificate], at: datetime
) -> list[x509.Certificate]:
    """The CA certificates of ``chain`` a peer's path from ``certificate`` goes through:
    each the issuer of the one before (by name and by the key that signed it, as a peer
    builds its path: of two with one name during a CA rollover, the one whose key did; of
    two with that key too, one valid at ``at`` first), up to a self-issued one, which a
    peer's own trust anchors stand for."""
    path: list[x509.Certificate] = []
    current, left = certificate, list(chain)
    while True:
        issuers = [c for c in left if c.issuer != c.subject and issues(c, current)]
        if not issuers:
            return path
        current = next((c for c in issuers if check_validity(c, at) is None), issuers[0])
        path.append(current)
        left = [c for c in left if c is not current]
