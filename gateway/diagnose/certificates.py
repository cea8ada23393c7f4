"""Step 4 of ``medgw diagnose``: our certificates and the peer's, judged as the daemon does."""

from __future__ import annotations

from datetime import datetime

from cryptography import x509

from gateway.diagnose.base import Steps
from gateway.diagnose.result import (
    EXPIRY_WARNING,
    Status,
    StepResult,
    day_of,
    step_failed,
    step_ok,
    subject_of,
)
from gateway.pki.ocsp import OcspClient
from gateway.pki.peers import TrustSettings, assess_peer
from gateway.pki.validate import Purpose, check_purpose


class CertificateSteps(Steps):
    """Validity windows, purposes and trust of both sides' certificates."""

    def certificates(self) -> StepResult:
        """Validity windows and purposes of our certificates and the peer's, at ``clock.now()``."""
        now = self._clock.now()
        config, peer = self._config, self._peer
        ours = str(config.source)
        roles: tuple[tuple[str, tuple[x509.Certificate, ...], Purpose, str, bool], ...] = (
            ("our TLS certificate", (config.tls.identity.certificate,), Purpose.TLS_CLIENT,
             f"[tls] certificate in {ours}", True),
            ("our signing certificate", (config.smime.signing.certificate,), Purpose.SMIME_SIGN,
             f"[smime] signing_certificate in {ours}", True),
            ("our encryption certificate", (config.smime.encryption.certificate,),
             Purpose.SMIME_ENCRYPT, f"[smime] encryption_certificate in {ours}", True),
            ("the peer's TLS certificate", peer.tls_certificates, Purpose.TLS_SERVER,
             f"tls_certificates in {self._peer_file}", False),
            ("the peer's signing certificate", peer.signing_certificates, Purpose.SMIME_SIGN,
             f"signing_certificates in {self._peer_file}", False),
            ("the peer's encryption certificate", peer.encryption_certificates,
             Purpose.SMIME_ENCRYPT, f"encryption_certificates in {self._peer_file}", False),
        )  # fmt: skip
        failures: list[tuple[str, str, bool]] = []  # (problem, where, ours)
        warnings: list[tuple[str, str, bool]] = []
        earliest: tuple[datetime, str] | None = None
        count = 0
        for role, certs, purpose, where, is_ours in roles:
            usable = []
            for cert in certs:
                count += 1
                start, end = cert.not_valid_before_utc, cert.not_valid_after_utc
                label = f"{role} {subject_of(cert)}"
                if now > end:
                    problem = f"{label} expired on {day_of(end)}"
                elif now < start:
                    problem = f"{label} is not valid before {day_of(start)}"
                else:
                    problem = check_purpose(cert, purpose) or ""
                if problem:
                    (warnings if len(certs) > 1 else failures).append((problem, where, is_ours))
                    continue
                usable.append(cert)
                if end - now < EXPIRY_WARNING:
                    days = (end - now).days
                    warnings.append(
                        (f"{label} expires in {days} day(s), on {day_of(end)}", where, is_ours)
                    )
                if earliest is None or end < earliest[0]:
                    earliest = (end, role)
            if certs and not usable and len(certs) > 1:
                failures.append((f"none of {role}s is valid now", where, is_ours))
                warnings = [w for w in warnings if w[1] != where]
        if failures:
            problem, where, is_ours = failures[0]
            also = f" (and {len(failures) - 1} more problem(s))" if len(failures) > 1 else ""
            if is_ours:
                meaning = (
                    f"{problem}: peers refuse what we sign, encrypt or present with it; "
                    "every exchange that needs it fails"
                )
                action = (
                    f"get a new certificate from your CA, install it at {where}, send it to "
                    "every peer (they must list it for us), then reload: systemctl reload medgw"
                )
            else:
                meaning = (
                    f"{problem}: the peer has probably renewed it and we still have the old one; "
                    "exchanges that need it fail"
                )
                action = (
                    "ask the peer for its current certificate through a trusted channel, confirm "
                    f"its fingerprint by phone, put it in {where} and reload: "
                    "systemctl reload medgw"
                )
            return step_failed("certificates", problem + also, meaning, action)
        if warnings:
            problem, where, is_ours = warnings[0]
            also = f" (and {len(warnings) - 1} more)" if len(warnings) > 1 else ""
            return StepResult(
                "certificates",
                Status.WARN,
                problem + also,
                "it still works, but will fail when the certificate runs out",
                (
                    f"renew it in time: new certificate at {where}, send it to every peer"
                    if is_ours
                    else f"ask the peer for its next certificate and add it to {where}"
                )
                + "; the peer's certificates are also validated (revocation included) "
                "as the daemon validates them",
            )
        until = (
            f"; the first to expire is {earliest[1]}, on {day_of(earliest[0])}" if earliest else ""
        )
        return step_ok("certificates", f"{count} certificates valid now and for 30 days{until}")

    async def peer_trust(self) -> StepResult | None:
        """The peer's certificates validated the way the daemon does before it uses them
        (chain, revocation by the zone's CRLs or OCSP, algorithm policy): a failure when a
        role has no acceptable certificate left, a warning when some are refused, else None."""
        peer = self._peer
        zone = self._config.require_zone(peer.zone)
        trust = await assess_peer(
            peer.name,
            tls=peer.tls_certificates,
            signing=peer.signing_certificates,
            encryption=peer.encryption_certificates,
            trust=TrustSettings.of_zone(zone, self._route),
            at=self._clock.now(),
            policy=peer.policy,
            ocsp_client=OcspClient(self._route),
        )
        roles = (
            ("TLS certificate", trust.tls, "tls_certificates"),
            ("signing certificate", trust.signing, "signing_certificates"),
            ("encryption certificate", trust.encryption, "encryption_certificates"),
        )
        for failing in (True, False):
            for role, verdicts, key in roles:
                refused = [v for v in verdicts if not v.valid]
                if not refused or failing != (len(refused) == len(verdicts)):
                    continue
                verdict = refused[0]
                where = f"{key} in {self._peer_file}"
                detail = (
                    f"the peer's {role} {verdict.subject} (sha256 {verdict.fingerprint[:16]}...) "
                    f"is refused: {verdict.result.reason}"
                )
                if not failing:
                    return StepResult(
                        "certificates",
                        Status.WARN,
                        detail,
                        f"the gateway does not use this certificate; another one in {where} "
                        "is still accepted",
                        f"remove it from {where}, or ask the peer for its current one, and reload",
                    )
                revoked = "revoked" in (verdict.result.reason or "")
                return step_failed(
                    "certificates",
                    detail,
                    (
                        "the peer's CA has revoked it"
                        if revoked
                        else f"it does not validate under zone {zone.name!r} (trust anchors, "
                        f"revocation = {zone.revocation!r} with its CRLs or OCSP)"
                    )
                    + f": the gateway refuses it, and {where} holds no other acceptable one, "
                    "so every exchange that needs it fails",
                    (
                        "do not use it; ask the peer for its new certificate through a trusted "
                        f"channel, confirm its fingerprint by phone, put it in {where} and "
                        "reload: systemctl reload medgw"
                        if revoked
                        else "if a CRL is missing or out of date, fetch the CA's current CRL into "
                        f"crls of the [[zones]] table {zone.name!r} in {self._config.source} and "
                        "reload; otherwise ask the peer for its current certificate and put it "
                        f"in {where}"
                    ),
                )
        return None
