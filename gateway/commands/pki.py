"""``medgw pki verify``, ``medgw pki check`` and ``medgw pki csr``: the admin's certificate tools.

Exit codes: 0 valid / no errors; 1 invalid / errors found; 2 usage error
(bad arguments, unreadable input files).
"""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import json
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from gateway.commands import add_config_option

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2

VERIFY_PURPOSES = ("tls-client", "tls-server", "smime-sign", "smime-encrypt", "any")
CSR_PURPOSES = ("tls", "tls-client", "tls-server", "smime-sign", "smime-encrypt")
EXPIRY_WARN_DAYS = 30


def register(pki_commands: Any) -> None:
    verify = pki_commands.add_parser(
        "verify", help="validate a certificate path (RFC 5280, policy, revocation)"
    )
    verify.add_argument("leaf", type=Path, help="the certificate to verify (PEM or DER)")
    verify.add_argument(
        "--intermediate", type=Path, action="append", default=[], metavar="F",
        help="intermediate CA certificate(s); repeatable",
    )  # fmt: skip
    verify.add_argument(
        "--trust", type=Path, action="append", required=True, metavar="F",
        help="trust anchor certificate(s); repeatable",
    )  # fmt: skip
    verify.add_argument(
        "--crl", type=Path, action="append", default=[], metavar="F",
        help="CRL file or folder of CRLs; repeatable. Makes revocation status required",
    )  # fmt: skip
    verify.add_argument(
        "--ocsp", action="store_true",
        help="ask the OCSP responders named in the certificates; makes revocation status required",
    )  # fmt: skip
    verify.add_argument("--at", metavar="ISO-TIME", help="verification time (default: now)")
    verify.add_argument(
        "--purpose",
        choices=VERIFY_PURPOSES,
        default="any",
        help="what the certificate must be fit for (keyUsage, extendedKeyUsage); default any",
    )
    verify.add_argument("--json", action="store_true", help="print one JSON object")
    verify.set_defaults(handler=_verify)

    check = pki_commands.add_parser(
        "check", help="expiry, key policy, CRL freshness and pins of the configuration"
    )
    add_config_option(check)
    check.add_argument(
        "--crl", type=Path, action="append", default=[], metavar="F",
        help="CRL file or folder to check for freshness, on top of the CRLs each zone is "
        "configured with; repeatable",
    )  # fmt: skip
    check.add_argument(
        "--warn-days",
        type=int,
        default=EXPIRY_WARN_DAYS,
        metavar="N",
        help=f"warn about certificates that expire within N days (default {EXPIRY_WARN_DAYS})",
    )
    check.set_defaults(handler=_check)

    csr = pki_commands.add_parser("csr", help="generate a private key and a CSR for a real CA")
    csr.add_argument(
        "--purpose",
        choices=CSR_PURPOSES,
        required=True,
        help="what the certificate is for: sets the requested keyUsage and extendedKeyUsage",
    )
    csr.add_argument("--cn", required=True, help="subject common name")
    csr.add_argument("--org", help="subject organisation")
    csr.add_argument("--country", help="subject country (two letters)")
    csr.add_argument("--dns", action="append", default=[], help="subjectAltName DNS name")
    csr.add_argument("--ip", action="append", default=[], help="subjectAltName IP address")
    csr.add_argument("--email", action="append", default=[], help="subjectAltName e-mail")
    csr.add_argument(
        "--key-type",
        choices=("ec-p256", "ec-p384", "rsa-3072"),
        default="ec-p256",
        help="the new private key (default ec-p256)",
    )
    csr.add_argument("--key-out", type=Path, required=True, help="private key file to create")
    csr.add_argument("--csr-out", type=Path, required=True, help="CSR file to create")
    csr.set_defaults(handler=_csr)


def _usage(message: str) -> int:
    print(f"medgw pki: {message}", file=sys.stderr)
    return EXIT_USAGE


# --- verify ---------------------------------------------------------------------


def _parse_time(text: str) -> datetime:
    value = datetime.fromisoformat(text.replace("Z", "+00:00"))
    return value if value.tzinfo is not None else value.replace(tzinfo=UTC)


def _verify(args: argparse.Namespace) -> int:
    from gateway.egress import Network
    from gateway.pki.ocsp import OcspClient
    from gateway.pki.store import PkiFileError, load_certificates, load_crls, load_many
    from gateway.pki.validate import Purpose, RevocationPolicy, validate
    from gateway.policy import AlgorithmPolicy

    try:
        at = _parse_time(args.at) if args.at else datetime.now(UTC)
    except ValueError:
        return _usage(f"--at {args.at!r} is not an ISO 8601 time (e.g. 2026-04-01T09:00:00Z)")
    try:
        leaves = load_certificates(args.leaf)
        intermediates = load_many(args.intermediate) + leaves[1:]
        anchors = load_many(args.trust)
        crls = [crl for path in args.crl for crl in load_crls(path)]
    except PkiFileError as exc:
        return _usage(str(exc))
    checking = bool(args.crl or args.ocsp)
    result = asyncio.run(
        validate(
            leaves[0],
            anchors=anchors,
            intermediates=intermediates,
            purpose=Purpose(args.purpose),
            at=at,
            revocation=RevocationPolicy.REQUIRE if checking else RevocationPolicy.OFF,
            crls=crls,
            ocsp=bool(args.ocsp),
            # No configuration, so no zone: the responders the certificates name, from the
            # host's default route, as the operator asked.
            ocsp_client=OcspClient(Network.unconfigured()) if args.ocsp else None,
            policy=AlgorithmPolicy(),
            at_given=bool(args.at),
        )
    )
    if args.json:
        print(json.dumps(result.to_json(), indent=2))
    else:
        print("chain (leaf first):")
        statuses = {s.subject: s for s in result.statuses}
        for depth, cert in enumerate(result.chain):
            subject = cert.subject.rfc4514_string()
            role = "trust anchor" if depth == len(result.chain) - 1 and depth else ""
            status = statuses.get(subject)
            rev = f", revocation: {status.status}" if status and status.status != role else ""
            if status and status.source:
                rev += f" ({status.source})"
            until = f"valid until {cert.not_valid_after_utc:%Y-%m-%d}"
            extra = f" [{role}]" if role else ""
            print(f"  {depth}: {subject}{extra} ({until}{rev})")
        if checking:
            print(f"revocation: {result.revocation}")
        else:
            print("revocation: not-checked (give --crl or --ocsp to require it)")
        for warning in result.warnings:
            print(f"warning: {warning}")
        print("VALID" if result.valid else f"INVALID: {result.reason}")
    return EXIT_OK if result.valid else EXIT_FAILED


# --- check ----------------------------------------------------------------------


def _check(args: argparse.Namespace) -> int:
    from gateway.config import load_config
    from gateway.errors import ConfigError
    from gateway.pki.store import PkiFileError, load_crls

    try:
        config = load_config(args.config)
    except ConfigError as exc:
        for problem in exc.problems:
            print(problem, file=sys.stderr)
        return EXIT_FAILED
    try:
        crls = [crl for path in args.crl for crl in load_crls(path)]
    except PkiFileError as exc:
        return _usage(str(exc))
    rows = check_rows(config, crls, now=datetime.now(UTC), warn_days=args.warn_days)
    _print_table(rows)
    errors = sum(1 for r in rows if r[0] == "error")
    warnings = sum(1 for r in rows if r[0] == "warning")
    print(f"\n{errors} error(s), {warnings} warning(s)")
    return EXIT_FAILED if errors else EXIT_OK


def check_rows(
    config: Any, crls: list[Any], *, now: datetime, warn_days: int
) -> list[tuple[str, str, str]]:
    """(severity, item, finding) for every configured certificate and CRL.

    ``crls`` are extra CRLs (``--crl``), checked on top of each zone's ``crls``.
    """
    from gateway.pki.validate import Purpose, RevocationPolicy, validate
    from gateway.policy import AlgorithmPolicy
    from gateway.report import own_certificate_problems

    rows: list[tuple[str, str, str]] = []
    # Trust anchors are per zone (older configurations: one set under [tls]).
    zones = {z.name: z for z in getattr(config, "zones", ())}
    all_anchors = list(getattr(config.tls, "trust_anchors", ()))
    anchor_rows: list[tuple[str, Any]] = [("tls trust anchor", c) for c in all_anchors]
    for zone in zones.values():
        anchor_rows += [(f"zone {zone.name} trust anchor", c) for c in zone.trust_anchors]
        all_anchors += [c for c in zone.trust_anchors if c not in all_anchors]
        if getattr(zone, "revocation", "off") == "off":
            rows.append(
                (
                    "warning",
                    f"zone {zone.name}",
                    "revocation = off: a revoked peer certificate is still accepted "
                    '(fix: set revocation = "require" and keep its CRLs current)',
                )
            )
    # Our end-entity certificates' validity, purpose and path are judged below, as a
    # peer judges them; their rows here say how long they have left.
    leaves = ("tls certificate", "smime signing certificate", "smime encryption certificate")
    own: list[tuple[str, Any]] = [
        ("tls certificate", config.tls.identity.certificate),
        *(("tls chain", c) for c in config.tls.identity.chain),
        *anchor_rows,
        ("smime signing certificate", config.smime.signing.certificate),
        ("smime encryption certificate", config.smime.encryption.certificate),
    ]
    for label, cert in own:
        rows.extend(
            _cert_rows(
                label,
                cert,
                now,
                warn_days,
                encryption="encryption" in label,
                validity=label not in leaves,
            )
        )
    for problem in asyncio.run(own_certificate_problems(config, at=now)):
        rows.append((problem.severity, problem.key, f"{problem.message} (fix: {problem.fix})"))
    intermediates = list(config.tls.identity.chain)
    for peer in config.peers:
        zone = zones.get(getattr(peer, "zone", ""))
        anchors = list(zone.trust_anchors) if zone is not None else all_anchors
        groups = (
            ("tls", peer.tls_certificates, Purpose.TLS_CLIENT),
            ("signing", peer.signing_certificates, Purpose.SMIME_SIGN),
            ("encryption", peer.encryption_certificates, Purpose.SMIME_ENCRYPT),
        )
        for kind, certs, purpose in groups:
            for cert in certs:
                label = f"peer {peer.name} {kind} pin"
                rows.extend(
                    _cert_rows(label, cert, now, warn_days, encryption=kind == "encryption")
                )
                result = asyncio.run(
                    validate(
                        cert,
                        anchors=anchors,
                        intermediates=intermediates,
                        purpose=purpose,
                        at=now,
                        revocation=RevocationPolicy.OFF,
                        policy=AlgorithmPolicy(),
                    )
                )
                if not result.valid:
                    rows.append(
                        (
                            "error" if kind == "tls" else "warning",
                            f"{label} {cert.subject.rfc4514_string()}",
                            f"pin matches no certificate that can be accepted: {result.reason}",
                        )
                    )
    # The CRLs each zone is configured with, judged as the daemon judges them (its
    # crl_warn_days), then any given with --crl on top.
    for zone in zones.values():
        zone_crls = list(getattr(zone, "crls", ()))
        label = f"zone {zone.name} CRL"
        rows.extend(_crl_rows(label, zone_crls, now, getattr(zone, "crl_warn_days", 7), zone))
        if getattr(zone, "fetch_crls", False):
            rows.extend(_fetched_crl_rows(config, zone, now))
            continue
        if zone_crls or getattr(zone, "revocation", "off") == "off" or getattr(zone, "ocsp", False):
            continue
        paths = ", ".join(str(p) for p in getattr(zone, "crl_paths", ()))
        where = f"`crls` ({paths}) holds no CRL" if paths else "no `crls` and ocsp = false"
        rows.append(
            (
                "error" if zone.revocation == "require" else "warning",
                f"zone {zone.name}",
                f"revocation = {zone.revocation!r} but {where}: no certificate's status can "
                "be established (fix: put the CA's current CRL files there and reload)",
            )
        )
    rows.extend(_crl_rows("CRL", crls, now, min(warn_days, 7)))
    if not crls and not any(
        getattr(z, "crls", ()) or getattr(z, "ocsp", False) for z in zones.values()
    ):
        rows.append(
            (
                "warning",
                "revocation",
                "no CRL configured or given: revocation is not checked (fix: list the CA's "
                "CRL files in each zone's `crls`, or pass --crl FOLDER)",
            )
        )
    return rows


def _fetched_crl_rows(config: Any, zone: Any, now: datetime) -> list[tuple[str, str, str]]:
    """The CRLs the daemon keeps for a zone with ``fetch_crls`` (its cache, verified as the
    daemon verifies it), judged as :func:`_crl_rows` judges a zone's."""
    from gateway.clock import SystemClock
    from gateway.egress import Network
    from gateway.pki.crlfetch import CrlKeeper, wanted_points

    certificates = [
        cert
        for peer in config.peers
        if peer.zone == zone.name
        for cert in (
            *peer.tls_certificates,
            *peer.signing_certificates,
            *peer.encryption_certificates,
        )
    ]
    wanted = wanted_points(zone.name, zone.trust_anchors, certificates)
    keeper = CrlKeeper(
        config.storage.state_dir / "crls", SystemClock(), Network.fixed(config.network_map).zone
    )
    keeper.plan(wanted, {zone.name: zone.crl_refresh_hours})
    held = keeper.crls(zone.name)
    rows = _crl_rows(
        f"zone {zone.name} fetched CRL", list(held), now, zone.crl_warn_days, zone, fetched=True
    )
    have = {crl.issuer for crl in held}
    for point in wanted:
        if not any(ca.subject in have for ca in point.issuers):
            rows.append(
                (
                    "warning",
                    f"zone {zone.name} CRL {point.url}",
                    "not fetched yet: the running daemon downloads it (fix: if this stays, "
                    "look for pki.crl_fetch_failed in the audit trail)",
                )
            )
    return rows


def _crl_rows(
    label: str,
    crls: list[Any],
    now: datetime,
    warn_days: int,
    zone: Any = None,
    *,
    fetched: bool = False,
) -> list[tuple[str, str, str]]:
    """``zone``: the zone the CRLs are of (None: given with --crl), whose revocation
    policy says what a CRL that cannot be used (stale, or dated after ``now``) does: an
    error under "require", which refuses its CA's certificates for it; a warning under
    "prefer" and "off", which refuse nothing for it, in check-config's words for a file.
    ``fetched``: the daemon's (near its nextUpdate is fine: the daemon fetches the next
    one well before)."""
    from gateway.pki.crl import crl_findings
    from gateway.report import crl_policy, unused_crl

    rows: list[tuple[str, str, str]] = []
    for finding in crl_findings(crls, at=now, warn_days=warn_days):
        severity, message, fix = finding.severity, finding.message, finding.fix
        if fetched and severity == "warning":
            severity = "ok"
        elif zone is not None and severity == "error":
            if zone.revocation != "require":
                severity = "warning"
            if severity == "warning" and not fetched:
                message, fix = unused_crl(zone, finding, now)
            else:
                does, fix = crl_policy(zone, fix)
                message = f"{message}; {does}"
        text = message + (f" (fix: {fix})" if fix else "")
        rows.append((severity, f"{label} {finding.issuer}", text))
    return rows


def _cert_rows(
    label: str,
    cert: Any,
    now: datetime,
    warn_days: int,
    *,
    encryption: bool,
    validity: bool = True,
) -> list[tuple[str, str, str]]:
    """``validity``: report a certificate outside its validity period (False: the caller
    reports it)."""
    from gateway.errors import PolicyError
    from gateway.policy import AlgorithmPolicy, certificate_key

    item = f"{label} {cert.subject.rfc4514_string()}"
    rows: list[tuple[str, str, str]] = []
    left = cert.not_valid_after_utc - now
    if left.total_seconds() <= 0:
        if validity:
            rows.append(
                ("error", item, f"expired on {cert.not_valid_after_utc:%Y-%m-%d} (fix: renew it)")
            )
    elif left.days < warn_days:
        rows.append(("warning", item, f"expires in {left.days} days (fix: renew it now)"))
    else:
        rows.append(("ok", item, f"{left.days} days to expiry"))
    if validity and cert.not_valid_before_utc > now:
        rows.append(("error", item, f"not valid before {cert.not_valid_before_utc:%Y-%m-%d}"))
    policy = AlgorithmPolicy()
    try:
        key = certificate_key(cert, "certificate key")
        if encryption:
            policy.check_recipient_key(key)
        else:
            policy.check_signature_key(key)
        for warning in policy.warnings_for_key(key):
            rows.append(("warning", item, warning))
    except PolicyError as exc:
        rows.append(("error", item, str(exc)))
    return rows


def _print_table(rows: list[tuple[str, str, str]]) -> None:
    width = max([len("ITEM")] + [len(r[1]) for r in rows])
    width = min(width, 70)
    print(f"{'SEVERITY':<8}  {'ITEM':<{width}}  FINDING")
    for severity, item, finding in rows:
        print(f"{severity:<8}  {item:<{width}}  {finding}")


# --- csr ------------------------------------------------------------------------


def _csr(args: argparse.Namespace) -> int:
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    from gateway.pki.issue import leaf_extensions, new_key, signature_hash, write_pem

    for option, path in (("--key-out", args.key_out), ("--csr-out", args.csr_out)):
        if path.exists():
            return _usage(f"{path} exists; refusing to overwrite (move it away first)")
        folder = path.absolute().parent
        if not folder.is_dir():
            return _usage(
                f"{option} {path}: the folder {folder} does not exist "
                "(fix: create it first, or give a path in an existing folder)"
            )
    if args.key_out.absolute() == args.csr_out.absolute():
        return _usage("--key-out and --csr-out name the same file; give two different paths")
    try:
        ips = [ipaddress.ip_address(ip) for ip in args.ip]
    except ValueError as exc:
        return _usage(str(exc))
    if args.country and len(args.country) != 2:
        return _usage("--country must be a two-letter code, e.g. JP")
    key = new_key(args.key_type)
    is_rsa = isinstance(key, rsa.RSAPrivateKey)
    purpose = args.purpose
    tls = purpose.startswith("tls")
    usage = {
        "digital_signature": tls or purpose == "smime-sign",
        "content_commitment": purpose == "smime-sign",
        "key_encipherment": is_rsa and purpose == "smime-encrypt",
        "key_agreement": not is_rsa and purpose == "smime-encrypt",
    }
    eku = {
        "tls": [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH],
        "tls-client": [ExtendedKeyUsageOID.CLIENT_AUTH],
        "tls-server": [ExtendedKeyUsageOID.SERVER_AUTH],
    }.get(purpose, [ExtendedKeyUsageOID.EMAIL_PROTECTION])
    attributes = []
    if args.country:
        attributes.append(x509.NameAttribute(NameOID.COUNTRY_NAME, args.country.upper()))
    if args.org:
        attributes.append(x509.NameAttribute(NameOID.ORGANIZATION_NAME, args.org))
    attributes.append(x509.NameAttribute(NameOID.COMMON_NAME, args.cn))
    builder = x509.CertificateSigningRequestBuilder().subject_name(x509.Name(attributes))
    for extension, critical in leaf_extensions(usage, eku):
        builder = builder.add_extension(extension, critical=critical)
    names: list[x509.GeneralName] = [x509.DNSName(d) for d in args.dns]
    names += [x509.IPAddress(ip) for ip in ips]
    names += [x509.RFC822Name(e) for e in args.email]
    if names:
        builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
    csr = builder.sign(key, signature_hash(key))
    try:
        write_pem(args.key_out, key)
    except OSError as exc:
        return _usage(f"cannot write --key-out {args.key_out}: {exc.strerror or exc}")
    try:
        args.csr_out.write_bytes(csr.public_bytes(serialization.Encoding.PEM))
    except OSError as exc:
        args.key_out.unlink()  # a key without its CSR is of no use; a rerun starts clean
        return _usage(
            f"cannot write --csr-out {args.csr_out}: {exc.strerror or exc} "
            f"(nothing kept: {args.key_out} removed again)"
        )
    print(f"private key: {args.key_out} (mode 0600; keep it on this host)")
    print(f"CSR:         {args.csr_out} - send it to your CA for a {purpose} certificate")
    return EXIT_OK
