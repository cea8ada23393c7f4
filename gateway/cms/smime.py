"""S/MIME 4.0 framing (RFC 8551, RFC 1847) around our CMS engine.

Signed entities are ``multipart/signed`` with a detached
``application/pkcs7-signature`` part; the first part is the signed entity,
byte for byte.  Encrypted entities are ``application/pkcs7-mime`` with a DER
body (AS2 sends it binary).
"""

from __future__ import annotations

import base64
import binascii
import re
import secrets
from collections.abc import Iterator, Sequence
from datetime import datetime
from typing import Literal

from cryptography import x509

from ..errors import MalformedMessageError, SignatureError
from ..policy import DIGEST_TO_MICALG, AlgorithmPolicy, PrivateKey, normalize_digest
from .compressed import DEFAULT_MAX_DECOMPRESSED, compress, decompress
from .decrypting import decrypt
from .envelope_algorithms import Decrypted
from .enveloping import encrypt
from .mime import get_header, header_param, make_entity, media_type, parse_entity
from .signing import sign, sign_digest
from .trust import SignerValidator
from .verification import VerifiedSignature, verify

__all__ = [
    "canonical_crlf",
    "compress_entity",
    "decompress_entity",
    "envelope_entity",
    "is_compressed_entity",
    "open_envelope",
    "sign_entity",
    "verify_entity",
]

_SIGNATURE_TYPES = ("application/pkcs7-signature", "application/x-pkcs7-signature")
_MIME_TYPES = ("application/pkcs7-mime", "application/x-pkcs7-mime")


_BARE_LF = re.compile(rb"(?<!\r)\n")


def canonical_crlf(data: bytes) -> bytes:
    """``data`` with every bare LF turned into CRLF (MIME canonical form)."""
    return _BARE_LF.sub(b"\r\n", data)


def _canonical_readings(part: bytes) -> list[bytes]:
    """A part whose CRLFs became LF in transit, as it was signed.

    MIME headers are always CRLF; a binary body is signed as is, a text body in
    canonical CRLF form.  Only computed when the part has bare LFs.
    """
    if _BARE_LF.search(part) is None:
        return []
    sep = part.find(b"\n\n")
    out = []
    if sep >= 0 and part.find(b"\r\n\r\n") < 0:
        out.append(canonical_crlf(part[: sep + 2]) + part[sep + 2 :])
    out.append(canonical_crlf(part))
    return out


def _readings(content: bytes, alt_content: bytes | None) -> Iterator[bytes]:
    """The readings of a signed part to try, in order, each once; the canonical
    ones are only computed if the ones before do not verify."""
    tried = [content]
    yield content
    if alt_content is not None:
        tried.append(alt_content)
        yield alt_content
    for canonical in _canonical_readings(content):
        if canonical not in tried:
            tried.append(canonical)
            yield canonical


def b64_lines(data: bytes) -> bytes:
    text = base64.b64encode(data)
    return b"\r\n".join([text[i : i + 76] for i in range(0, len(text), 76)])


def sign_entity(
    entity: bytes,
    signer_cert: x509.Certificate,
    signer_key: PrivateKey,
    *,
    digest: str = "sha256",
    signing_time: datetime,
    policy: AlgorithmPolicy,
    certificates: Sequence[x509.Certificate] = (),
    rsa_padding: Literal["pss", "pkcs1v15"] = "pkcs1v15",
    entity_digest: bytes | None = None,
) -> bytes:
    """A complete ``multipart/signed`` entity whose first part is ``entity`` exactly.

    ``entity_digest``: the ``digest`` of ``entity``, when the caller has computed it
    already (the AS2 MIC is that digest); not computed again."""
    entity = bytes(entity)
    digest = normalize_digest(digest)
    if entity_digest is None:
        signature = sign(
            entity,
            signer_cert,
            signer_key,
            digest=digest,
            detached=True,
            rsa_padding=rsa_padding,
            certificates=certificates,
            signing_time=signing_time,
            policy=policy,
        )
    else:
        signature = sign_digest(
            entity_digest,
            signer_cert,
            signer_key,
            digest=digest,
            rsa_padding=rsa_padding,
            certificates=certificates,
            signing_time=signing_time,
            policy=policy,
        )
    while True:
        boundary = "----=_medgw_" + secrets.token_hex(16)
        if boundary.encode("ascii") not in entity:
            break
    head, tail = signed_frame(boundary, digest, signature)
    return b"".join((head, entity, tail))  # one copy of the entity, not one per concatenation


def signed_frame(boundary: str, digest: str, signature: bytes) -> tuple[bytes, bytes]:
    """What goes before and after the entity in a ``multipart/signed`` (RFC 1847, RFC
    8551) with ``boundary``, signed with ``digest``: its header and first delimiter, then
    the detached ``signature`` part and the closing delimiter."""
    b = boundary.encode("ascii")
    micalg = DIGEST_TO_MICALG.get(digest, digest)
    head = (
        "Content-Type: multipart/signed; "
        f'protocol="application/pkcs7-signature"; micalg={micalg}; boundary="{boundary}"\r\n'
        "\r\n"
        f"--{boundary}\r\n"
    ).encode("ascii")
    tail = b"".join(
        (
            b"\r\n--",
            b,
            b"\r\n",
            b'Content-Type: application/pkcs7-signature; name="smime.p7s"\r\n',
            b"Content-Transfer-Encoding: base64\r\n",
            b'Content-Disposition: attachment; filename="smime.p7s"\r\n\r\n',
            b64_lines(signature),
            b"\r\n--",
            b,
            b"--\r\n",
        )
    )
    return head, tail


def decode_body(headers: Sequence[tuple[str, str]], body: bytes, what: str) -> bytes:
    cte = (get_header(headers, "Content-Transfer-Encoding") or "binary").strip().lower()
    if cte == "base64":
        try:
            return base64.b64decode(b"".join(body.split()), validate=True)
        except (binascii.Error, ValueError) as exc:
            raise MalformedMessageError(
                f"{what} is declared base64 but is not valid base64: {exc}",
                fix="the part was damaged in transit; ask the peer to resend",
            ) from exc
    if cte in ("binary", "8bit", "7bit"):
        return body
    raise MalformedMessageError(
        f"{what} has unsupported Content-Transfer-Encoding {cte!r}",
        fix="send the part as base64 or binary",
    )


def _find_delimiter(body: bytes, delim: bytes, start: int) -> int:
    """Index of the line break that starts the next ``delim`` line at/after ``start``.

    Returns the index of the CR (of CRLF) or LF preceding the delimiter, or -1.
    """
    pos = start
    while True:
        j = body.find(b"\n" + delim, pos)
        if j < 0:
            return -1
        after = body[j + 1 + len(delim) : j + 3 + len(delim)]
        if after[:1] in (b"", b"\r", b"\n", b" ", b"\t") or after == b"--":
            return j - 1 if j > 0 and body[j - 1 : j] == b"\r" else j
        pos = j + 1


def _line_end(body: bytes, pos: int) -> int:
    nl = body.find(b"\n", pos)
    return len(body) if nl < 0 else nl + 1


def split_multipart(
    body: bytes, boundary: str, *, most: int = 2
) -> list[tuple[bytes, bytes | None]]:
    """The parts of a multipart body, byte-exact (MalformedMessageError beyond ``most``).

    Each part comes with an alternative reading (or None): when a delimiter is
    preceded by CR LF we take the CR LF as part of the delimiter (RFC 2046), but
    producers that frame with bare LF (``openssl cms`` does) make a part that
    ends in CR ambiguous; the alternative keeps that CR.
    """
    delim = b"--" + boundary.encode("latin-1")
    if body.startswith(delim):
        first = 0
    else:
        first = _find_delimiter(body, delim, 0)
        if first < 0:
            raise MalformedMessageError(
                f"multipart/signed body does not contain its boundary {boundary!r}",
                fix="the message was damaged in transit or its Content-Type header is wrong",
            )
        first = body.index(delim, first)
    parts: list[tuple[bytes, bytes | None]] = []
    pos = _line_end(body, first)
    if body[first + len(delim) : first + len(delim) + 2] == b"--":
        raise MalformedMessageError(
            "multipart/signed body has no parts", fix="ask the peer to resend"
        )
    while True:
        j = _find_delimiter(body, delim, pos)
        if j < 0:
            raise MalformedMessageError(
                "multipart/signed body has no closing boundary",
                fix="the message was truncated in transit; ask the peer to resend",
            )
        alt = body[pos : j + 1] if body[j : j + 2] == b"\r\n" and j >= pos else None
        if len(parts) == most:  # one more: nothing more is read or copied
            raise MalformedMessageError(
                "multipart/signed must have exactly 2 parts (content, signature), found "
                f"more than {most}",
                fix="ask the peer to send a standard S/MIME signed message",
            )
        parts.append((body[pos:j], alt))
        d = body.index(delim, j)
        if body[d + len(delim) : d + len(delim) + 2] == b"--":
            return parts
        pos = _line_end(body, d)


def check_signature_part(headers: Sequence[tuple[str, str]]) -> None:
    """The second part of a multipart/signed must say it is a CMS signature."""
    sig_type = media_type(get_header(headers, "Content-Type") or "")
    if sig_type not in _SIGNATURE_TYPES:
        raise MalformedMessageError(
            f"second part of multipart/signed is {sig_type or 'untyped'}, expected "
            "application/pkcs7-signature",
            fix="ask the peer to send an S/MIME (CMS) signature",
        )


def verify_entity(
    signed_entity: bytes,
    *,
    trusted_signers: Sequence[x509.Certificate],
    policy: AlgorithmPolicy,
    validate_signer: SignerValidator | None = None,
) -> tuple[bytes, VerifiedSignature]:
    """Verify ``multipart/signed`` (or pkcs7-mime signed-data); return (entity, verification).

    ``validate_signer`` as in :func:`gateway.cms.verification.verify`.
    """
    headers, body = parse_entity(signed_entity)
    ctype = get_header(headers, "Content-Type")
    if ctype is None:
        raise MalformedMessageError(
            "signed entity has no Content-Type header",
            fix="pass the whole MIME entity including its Content-Type header",
        )
    mtype = media_type(ctype)
    if mtype == "multipart/signed":
        return verify_multipart_signed(
            ctype,
            body,
            trusted_signers=trusted_signers,
            policy=policy,
            validate_signer=validate_signer,
        )
    if mtype in _MIME_TYPES:
        smime_type = (header_param(ctype, "smime-type") or "signed-data").lower()
        if smime_type != "signed-data":
            raise MalformedMessageError(
                f"application/pkcs7-mime with smime-type={smime_type} is not a signed message",
                fix="decrypt enveloped data with open_envelope() first",
            )
        der = decode_body(headers, body, "pkcs7-mime body")
        result = verify(
            der, trusted_signers=trusted_signers, policy=policy, validate_signer=validate_signer
        )
        return result.content, result
    raise MalformedMessageError(
        f"entity of type {mtype} is not signed (expected multipart/signed or "
        "application/pkcs7-mime; smime-type=signed-data)",
        fix="the peer did not sign the message; check its AS2 configuration",
    )


def verify_multipart_signed(
    ctype: str,
    body: bytes,
    *,
    trusted_signers: Sequence[x509.Certificate],
    policy: AlgorithmPolicy,
    validate_signer: SignerValidator | None = None,
) -> tuple[bytes, VerifiedSignature]:
    """:func:`verify_entity` of a ``multipart/signed`` entity given as its Content-Type
    value ``ctype`` and its ``body`` (an HTTP body, e.g. a receipt): not copied into an
    entity to be split again."""
    boundary = header_param(ctype, "boundary")
    if not boundary:
        raise MalformedMessageError(
            f"multipart/signed Content-Type has no boundary: {ctype!r}",
            fix="the sender produced a broken Content-Type header",
        )
    parts = split_multipart(body, boundary)
    if len(parts) != 2:
        raise MalformedMessageError(
            f"multipart/signed must have exactly 2 parts (content, signature), found {len(parts)}",
            fix="ask the peer to send a standard S/MIME signed message",
        )
    (content, alt_content), (sig_part, _) = parts
    sig_headers, sig_body = parse_entity(sig_part)
    check_signature_part(sig_headers)
    signature = decode_body(sig_headers, sig_body, "signature part")
    # The exact bytes first; then the reading that keeps a CR before the
    # delimiter; then the canonical CRLF form of a part whose line endings
    # were converted to bare LF in transit (RFC 8551 3.1.1: text is signed
    # in canonical form).  What verifies is what we return and deliver.
    first_error: SignatureError | None = None
    for reading in _readings(content, alt_content):
        try:
            return reading, verify(
                signature,
                content=reading,
                trusted_signers=trusted_signers,
                policy=policy,
                validate_signer=validate_signer,
            )
        except SignatureError as exc:
            first_error = first_error or exc
    assert first_error is not None
    raise first_error


def envelope_entity(
    entity: bytes,
    recipients: Sequence[x509.Certificate],
    *,
    cipher: str = "aes-256-gcm",
    policy: AlgorithmPolicy,
) -> tuple[str, bytes]:
    """Encrypt a MIME entity; returns (Content-Type value, DER body)."""
    der = encrypt(entity, recipients, cipher=cipher, policy=policy)
    smime_type = (
        "authEnveloped-data" if cipher.strip().lower().endswith("gcm") else "enveloped-data"
    )
    return f'application/pkcs7-mime; smime-type={smime_type}; name="smime.p7m"', der


def open_envelope(
    body: bytes, cert: x509.Certificate, key: PrivateKey, *, policy: AlgorithmPolicy
) -> Decrypted:
    """Decrypt an ``application/pkcs7-mime`` body (DER, BER or base64)."""
    body = bytes(body)
    if body[:1] != b"\x30":
        try:
            body = base64.b64decode(b"".join(body.split()), validate=True)
        except (binascii.Error, ValueError) as exc:
            raise MalformedMessageError(
                f"encrypted body ({len(body)} bytes) is neither DER/BER CMS nor base64",
                fix="the body was damaged in transit; ask the peer to resend",
            ) from exc
    return decrypt(body, cert, key, policy=policy)


def compress_entity(entity: bytes) -> bytes:
    """A complete ``application/pkcs7-mime; smime-type=compressed-data`` entity (RFC 3274)."""
    return make_entity(
        'application/pkcs7-mime; smime-type=compressed-data; name="smime.p7z"',
        compress(entity),
        [("Content-Disposition", 'attachment; filename="smime.p7z"')],
    )


def is_compressed_entity(entity: bytes) -> bool:
    """True if ``entity``'s Content-Type is pkcs7-mime with smime-type=compressed-data."""
    try:
        headers, _ = parse_entity(entity[:65536])
    except MalformedMessageError:
        return False
    ctype = get_header(headers, "Content-Type") or ""
    smime_type = (header_param(ctype, "smime-type") or "").lower()
    return media_type(ctype) in _MIME_TYPES and smime_type == "compressed-data"


def decompress_entity(entity: bytes, *, max_size: int = DEFAULT_MAX_DECOMPRESSED) -> bytes:
    """The MIME entity inside a compressed-data entity (base64 or binary body)."""
    headers, body = parse_entity(entity)
    ctype = get_header(headers, "Content-Type") or ""
    smime_type = (header_param(ctype, "smime-type") or "").lower()
    if media_type(ctype) not in _MIME_TYPES or smime_type != "compressed-data":
        raise MalformedMessageError(
            f"entity of type {ctype or 'untyped'!r} is not S/MIME compressed data",
            fix="expected application/pkcs7-mime; smime-type=compressed-data",
        )
    return decompress(decode_body(headers, body, "compressed-data body"), max_size=max_size)
