"""``medgw smime sign|verify|encrypt|decrypt|inspect``: like ``openssl cms``, with our policy.

Exit codes: 0 success (``verify``: the signature is valid), 1 the operation
failed or the message is invalid (the reason is printed), 2 usage error (bad
arguments, unreadable files, keys or certificates).  Input formats (DER, BER,
PEM, base64, S/MIME) are detected from the content.
"""

from __future__ import annotations

import argparse
import base64
import sys
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from gateway.clock import SystemClock
from gateway.errors import MedgwError, SignerNotTrustedError
from gateway.policy import CONTENT_CIPHERS, DIGESTS, LEGACY_ALGORITHMS, AlgorithmPolicy

EXIT_OK = 0
EXIT_INVALID = 1
EXIT_USAGE = 2


class _UsageError(Exception):
    pass


def register(commands: Any) -> None:
    smime = commands.add_parser(
        "smime",
        help="sign, verify, encrypt, decrypt and inspect S/MIME and CMS files",
        description="Interop tools like 'openssl cms', under the gateway's CRYPTREC policy.",
    )
    sub = smime.add_subparsers(dest="smime_command", required=True, metavar="COMMAND")

    p = sub.add_parser("sign", help="sign a file (CMS SignedData or S/MIME)")
    p.add_argument("--cert", type=Path, required=True, help="signer certificate (PEM or DER)")
    p.add_argument("--key", type=Path, required=True, help="signer private key (PEM or DER)")
    p.add_argument("--key-password-file", type=Path, help="file holding the key's password")
    p.add_argument(
        "--certfile",
        type=Path,
        action="append",
        default=[],
        help="extra certificates to include",
    )
    p.add_argument("--detached", action="store_true", help="leave the content out of the signature")
    p.add_argument(
        "--format",
        choices=("der", "smime"),
        default="der",
        help="output format (default der)",
    )
    p.add_argument(
        "--digest", choices=DIGESTS, default="sha256", help="message digest (default sha256)"
    )
    p.add_argument(
        "--rsa-padding",
        choices=("pss", "pkcs1v15"),
        default="pkcs1v15",
        help="for RSA keys (default pkcs1v15)",
    )
    p.add_argument("input", type=Path, help="content to sign ('-' for stdin)")
    p.add_argument("output", type=Path, help="where to write ('-' for stdout)")
    p.set_defaults(handler=_guard(_sign))

    p = sub.add_parser("verify", help="verify a signed file against trust anchors")
    p.add_argument(
        "--trust",
        type=Path,
        action="append",
        required=True,
        help="trust anchor certificate (repeatable)",
    )
    p.add_argument("--content", type=Path, help="the signed content, for a detached signature")
    p.add_argument("--at", help="verification time, ISO 8601 (default: now)")
    p.add_argument("input", type=Path, help="signature or signed message ('-' for stdin)")
    p.add_argument("output", type=Path, nargs="?", help="where to write the verified content")
    p.set_defaults(handler=_guard(_verify))

    p = sub.add_parser("encrypt", help="encrypt a file for recipients")
    p.add_argument(
        "--recipient",
        type=Path,
        action="append",
        required=True,
        help="recipient certificate (repeatable)",
    )
    p.add_argument(
        "--cipher",
        choices=CONTENT_CIPHERS,
        default="aes-256-gcm",
        help="content encryption (default aes-256-gcm: AuthEnvelopedData)",
    )
    p.add_argument(
        "--format",
        choices=("der", "smime"),
        default="der",
        help="output format (default der)",
    )
    p.add_argument("input", type=Path, help="content to encrypt ('-' for stdin)")
    p.add_argument("output", type=Path, help="where to write ('-' for stdout)")
    p.set_defaults(handler=_guard(_encrypt))

    p = sub.add_parser("decrypt", help="decrypt a file addressed to us")
    p.add_argument("--cert", type=Path, required=True, help="our certificate (PEM or DER)")
    p.add_argument("--key", type=Path, required=True, help="our private key (PEM or DER)")
    p.add_argument("--key-password-file", type=Path, help="file holding the key's password")
    p.add_argument(
        "--accept-legacy",
        action="append",
        default=[],
        choices=tuple(LEGACY_ALGORITHMS),
        metavar="ALGORITHM",
        help="also accept this monitored-list algorithm (repeat for several): "
        + ", ".join(LEGACY_ALGORITHMS),
    )
    p.add_argument("--compat", action="store_true", help=argparse.SUPPRESS)  # replaced
    p.add_argument("input", type=Path, help="encrypted message ('-' for stdin)")
    p.add_argument("output", type=Path, help="where to write the content ('-' for stdout)")
    p.set_defaults(handler=_guard(_decrypt))

    p = sub.add_parser("inspect", help="show structure, algorithms, recipients and signers")
    p.add_argument("input", type=Path, help="CMS or S/MIME file ('-' for stdin)")
    p.set_defaults(handler=_guard(_inspect))


def _guard(fn: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
    def run(args: argparse.Namespace) -> int:
        try:
            return fn(args)
        except _UsageError as exc:
            print(f"medgw smime {args.smime_command}: {exc}", file=sys.stderr)
            return EXIT_USAGE
        except MedgwError as exc:
            print(f"medgw smime {args.smime_command}: FAILED: {exc}", file=sys.stderr)
            return EXIT_INVALID

    return run


# ---------------------------------------------------------------------------
# files


def _read(path: Path, what: str) -> bytes:
    if str(path) == "-":
        return sys.stdin.buffer.read()
    try:
        return path.read_bytes()
    except OSError as exc:
        raise _UsageError(f"cannot read {what} {path}: {exc.strerror or exc}") from exc


def _write(path: Path, data: bytes) -> None:
    if str(path) == "-":
        sys.stdout.buffer.write(data)
        sys.stdout.buffer.flush()
        return
    try:
        path.write_bytes(data)
    except OSError as exc:
        raise _UsageError(f"cannot write {path}: {exc.strerror or exc}") from exc


def _certs(path: Path) -> list[x509.Certificate]:
    data = _read(path, "certificate")
    try:
        if b"-----BEGIN" in data:
            return x509.load_pem_x509_certificates(data)
        return [x509.load_der_x509_certificate(data)]
    except ValueError as exc:
        raise _UsageError(f"{path} is not a PEM or DER X.509 certificate: {exc}") from exc


def _cert(path: Path) -> x509.Certificate:
    return _certs(path)[0]


def _key(path: Path, password_file: Path | None) -> Any:
    data = _read(path, "private key")
    password = None
    if password_file is not None:
        password = _read(password_file, "password file").rstrip(b"\r\n")
    try:
        if b"-----BEGIN" in data:
            return serialization.load_pem_private_key(data, password)
        return serialization.load_der_private_key(data, password)
    except TypeError as exc:
        raise _UsageError(f"{path}: {exc} (give the password with --key-password-file)") from exc
    except ValueError as exc:
        raise _UsageError(f"{path} is not a readable PEM or DER private key: {exc}") from exc


def _b64_lines(data: bytes) -> bytes:
    text = base64.b64encode(data)
    return b"".join(text[i : i + 64] + b"\r\n" for i in range(0, len(text), 64))


def _pkcs7_mime(smime_type: str, der: bytes, filename: str = "smime.p7m") -> bytes:
    return (
        f"MIME-Version: 1.0\r\n"
        f'Content-Disposition: attachment; filename="{filename}"\r\n'
        f'Content-Type: application/pkcs7-mime; smime-type={smime_type}; name="{filename}"\r\n'
        "Content-Transfer-Encoding: base64\r\n\r\n"
    ).encode("ascii") + _b64_lines(der)


# ---------------------------------------------------------------------------
# commands


def _sign(args: argparse.Namespace) -> int:
    from gateway.cms import sign
    from gateway.cms.smime import sign_entity

    cert = _cert(args.cert)
    key = _key(args.key, args.key_password_file)
    extra = [c for path in args.certfile for c in _certs(path)]
    content = _read(args.input, "input")
    policy = AlgorithmPolicy()
    now = SystemClock().now()
    if args.format == "smime" and args.detached:
        out = b"MIME-Version: 1.0\r\n" + sign_entity(
            content,
            cert,
            key,
            digest=args.digest,
            rsa_padding=args.rsa_padding,
            signing_time=now,
            policy=policy,
            certificates=extra,
        )
    else:
        der = sign(
            content,
            cert,
            key,
            digest=args.digest,
            detached=args.detached,
            rsa_padding=args.rsa_padding,
            certificates=extra,
            signing_time=now,
            policy=policy,
        )
        out = _pkcs7_mime("signed-data", der) if args.format == "smime" else der
    _write(args.output, out)
    return EXIT_OK


def _parse_time(text: str | None) -> datetime:
    if text is None:
        return SystemClock().now()
    try:
        at = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError as exc:
        raise _UsageError(
            f"--at {text!r} is not an ISO 8601 time (e.g. 2025-06-01T09:30:00Z)"
        ) from exc
    return at if at.tzinfo is not None else at.replace(tzinfo=UTC)


def _verify(args: argparse.Namespace) -> int:
    from gateway.cms import verify
    from gateway.cms.formats import detect
    from gateway.cms.smime import verify_entity
    from gateway.cms.trust import TrustAnchors
    from gateway.pki.validate import Purpose, check_purpose

    anchors = tuple(c for path in args.trust for c in _certs(path))
    at = _parse_time(args.at)
    data = _read(args.input, "input")
    detached = None if args.content is None else _read(args.content, "content")
    chains = TrustAnchors(anchors, at)

    def validate(signer: x509.Certificate, carried: Sequence[x509.Certificate]) -> None:
        # As `medgw pki verify --purpose smime-sign` and `openssl cms -verify` do: a TLS
        # certificate, a key-agreement-only one or the CA itself signs no documents.
        problem = check_purpose(signer, Purpose.SMIME_SIGN)
        if problem is not None:
            raise SignerNotTrustedError(problem)
        chains(signer, carried)

    policy = AlgorithmPolicy()
    found = detect(data)
    try:
        if found.format == "smime":
            assert found.entity is not None
            if detached is not None:
                raise _UsageError("--content is for detached CMS signatures, not S/MIME messages")
            content, v = verify_entity(
                found.entity, trusted_signers=(), policy=policy, validate_signer=validate
            )
        else:
            assert found.der is not None
            v = verify(
                found.der,
                content=detached,
                trusted_signers=(),
                policy=policy,
                validate_signer=validate,
            )
            content = v.content
    except MedgwError as exc:
        print(f"Verification FAILED: {exc}", file=sys.stderr)
        return EXIT_INVALID
    signed_at = v.signing_time.isoformat() if v.signing_time else "not stated"
    print(
        f"Verification successful: signer {v.signer.subject.rfc4514_string()} "
        f"(issuer {v.signer.issuer.rfc4514_string()}, serial 0x{v.signer.serial_number:x}); "
        f"{v.signature_algorithm} with {v.digest}; signed at {signed_at}",
        file=sys.stderr,
    )
    if args.output is not None:
        _write(args.output, content)
    return EXIT_OK


def _encrypt(args: argparse.Namespace) -> int:
    from gateway.cms import encrypt

    recipients = [_cert(p) for p in args.recipient]
    content = _read(args.input, "input")
    der = encrypt(content, recipients, cipher=args.cipher, policy=AlgorithmPolicy())
    if args.format == "smime":
        kind = "authEnveloped-data" if args.cipher.endswith("gcm") else "enveloped-data"
        _write(args.output, _pkcs7_mime(kind, der))
    else:
        _write(args.output, der)
    return EXIT_OK


def _decrypt(args: argparse.Namespace) -> int:
    from gateway.cms import decrypt
    from gateway.cms.formats import detect
    from gateway.cms.mime import parse_entity
    from gateway.cms.smime import open_envelope

    if args.compat:
        print(
            "medgw smime decrypt: --compat is no longer accepted: it admitted every "
            "monitored-list algorithm at once (fix: name each one the message needs with "
            f"--accept-legacy, one of {', '.join(LEGACY_ALGORITHMS)})",
            file=sys.stderr,
        )
        return EXIT_USAGE
    cert = _cert(args.cert)
    key = _key(args.key, args.key_password_file)
    policy = AlgorithmPolicy(accept_legacy=frozenset(args.accept_legacy))
    found = detect(_read(args.input, "input"))
    if found.format == "smime":
        assert found.entity is not None
        _headers, body = parse_entity(found.entity)
        result = open_envelope(body, cert, key, policy=policy)
    else:
        assert found.der is not None
        result = decrypt(found.der, cert, key, policy=policy)
    for algorithm in result.compat_algorithms:
        print(
            f"warning: monitored-list algorithm {algorithm} accepted because of --accept-legacy",
            file=sys.stderr,
        )
    print(
        f"Decrypted: {len(result.content)} bytes, {result.content_cipher}, "
        f"key transport {result.key_transport}",
        file=sys.stderr,
    )
    _write(args.output, result.content)
    return EXIT_OK


def _inspect(args: argparse.Namespace) -> int:
    from gateway.cms.formats import Detected, detect
    from gateway.cms.inspect import describe
    from gateway.cms.limits import MAX_REPORT_PARTS
    from gateway.cms.mime import get_header, header_param, parse_entity
    from gateway.cms.smime import decode_body, split_multipart

    found = detect(_read(args.input, "input"))
    lines = [f"format: {found.format}"]

    def cms_lines(d: Detected) -> None:
        assert d.der is not None
        lines.extend(describe(d.der))

    if found.format == "smime":
        assert found.entity is not None
        headers, body = parse_entity(found.entity)
        ctype = get_header(headers, "Content-Type") or ""
        smime_type = f"; smime-type={found.smime_type}" if found.smime_type else ""
        lines.append(f"MIME type: {found.mime_type}{smime_type}")
        if found.mime_type == "multipart/signed":
            boundary = header_param(ctype, "boundary") or ""
            parts = split_multipart(body, boundary, most=MAX_REPORT_PARTS)
            lines.append(f"  parts: {len(parts)}; micalg={header_param(ctype, 'micalg')}")
            if parts:
                first_headers, _ = parse_entity(parts[0][0])
                first_type = get_header(first_headers, "Content-Type")
                lines.append(f"  signed part: {len(parts[0][0])} bytes, Content-Type {first_type}")
            if len(parts) == 2:
                sig_headers, sig_body = parse_entity(parts[1][0])
                der = decode_body(sig_headers, sig_body, "signature part")
                cms_lines(Detected("der", der=der))
        else:
            der = decode_body(headers, body, "body")
            cms_lines(detect(der, "body"))
    else:
        cms_lines(found)
    print("\n".join(lines))
    return EXIT_OK
