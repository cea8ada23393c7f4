"""Reading CMS EnvelopedData and AuthEnvelopedData: streamed, or held in memory.

:func:`decrypt_stream` decrypts DER or BER (indefinite lengths, constructed OCTET
STRINGs of any chunking) incrementally from a file object into another, checking
the GCM tag or CBC padding at the end; only the recipient infos are held in
memory.  :func:`decrypt_file` and :func:`decrypt_bytes` use it for a file and a
small message.  :func:`decrypt` returns the content in memory: the common DER
shapes are read directly (:func:`decrypt_der`), anything
else by the streaming reader, so a message gets the same result or error either
way.  Writing (encryption) is in :mod:`gateway.cms.enveloping`.
"""

from __future__ import annotations

import io
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

from asn1crypto import algos, cms, core
from cryptography import x509
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.decrepit.ciphers.algorithms import TripleDES
from cryptography.hazmat.primitives import padding as sym_padding
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from ..errors import DecryptionError, InvalidTypeError, MalformedMessageError
from ..fsutil import private_work_file
from ..policy import COMPAT_CONTENT_CIPHERS, COMPAT_KEY_TRANSPORTS, AlgorithmPolicy, PrivateKey
from . import enveloped_read
from .common import ASN1_ERRORS
from .der import Cursor, DerError, StreamReader, count_children, oid_der
from .envelope_algorithms import (
    CIPHERS,
    OID_AUTH_ENVELOPED,
    OID_ENVELOPED,
    Decrypted,
    bad_padding,
    cbc_iv,
    content_cipher_name,
    gcm_parameters,
)
from .enveloped_read import (
    ParsedEnvelope,
    check_recipient_counts,
    content_algorithm_direct,
    direct_recipients,
)
from .key_recovery import recover_cek
from .limits import MAX_ATTRIBUTES, MAX_HEADER_ELEMENT

__all__ = ["DecryptedFile", "decrypt", "decrypt_bytes", "decrypt_file", "decrypt_stream"]


@dataclass(frozen=True)
class DecryptedFile:
    size: int
    content_cipher: str
    key_transport: str
    compat_algorithms: tuple[str, ...]
    # False: the CBC padding of the content is invalid (the ciphertext was altered, or
    # the key is wrong).  The content is then passed on whole, unpadded by no rule,
    # and the caller must refuse it *after* the same work as for any other content,
    # with the answer a signature failure gets: answering "decryption failed" at once
    # would tell whoever sent it whether the padding was valid (a padding oracle).
    intact: bool = True


_KIND_OIDS = {oid_der(oid): oid for oid in (OID_AUTH_ENVELOPED, OID_ENVELOPED)}


@dataclass
class _Head:
    kind: str
    recipient_infos: Any
    cipher: str
    params: Any


def _read_head(r: StreamReader, policy: AlgorithmPolicy) -> tuple[_Head, list[int | None]]:
    ends: list[int | None] = [r.enter(0x30, "ContentInfo SEQUENCE")]
    oid_der = r.element(64)
    oid = _KIND_OIDS.get(oid_der) or core.ObjectIdentifier.load(oid_der).dotted
    if oid == OID_AUTH_ENVELOPED:
        kind = "authenticated_enveloped_data"
    elif oid == OID_ENVELOPED:
        kind = "enveloped_data"
    else:
        raise MalformedMessageError(
            f"{r.what} is a CMS {oid}, not EnvelopedData or AuthEnvelopedData",
            fix="check the message order: the gateway expects an encrypted message here",
        )
    ends.append(r.enter(0xA0, "[0] content"))
    ends.append(r.enter(0x30, f"{kind} SEQUENCE"))
    r.element(16)  # version
    if r.peek(1) == b"\xa0":
        r.element(MAX_HEADER_ELEMENT)  # originatorInfo: certificates we do not need
    ri_der = r.element(MAX_HEADER_ELEMENT)
    check_recipient_counts(ri_der)
    ris = direct_recipients(ri_der) or cms.RecipientInfos.load(ri_der)
    ends.append(r.enter(0x30, "EncryptedContentInfo"))
    r.element(64)  # content type
    alg_der = r.element(4096)
    try:
        c = Cursor(alg_der, 0, len(alg_der))
        oid_name, params = content_algorithm_direct(c, kind)
        c.finish()
    except DerError:  # not the common shape: asn1crypto reads it
        alg = algos.EncryptionAlgorithm.load(alg_der)
        oid_name, params = alg["algorithm"].native, alg["parameters"]
    cipher = content_cipher_name(oid_name, policy)
    return _Head(kind, ris, cipher, params), ends


def _read_tail(
    r: StreamReader, head: _Head, ends: list[int | None]
) -> tuple[bytes | None, bytes | None]:
    r.close(ends.pop())  # EncryptedContentInfo
    aad = mac = None
    if head.kind == "authenticated_enveloped_data":
        if r.peek(1) == b"\xa1":
            raw = r.element(MAX_HEADER_ELEMENT)
            count_children(raw, 0, MAX_ATTRIBUTES, "authenticated attributes")
            # RFC 5083 2.2: the AAD is the DER of authAttrs with a SET OF tag
            aad = cms.CMSAttributes.load(b"\x31" + raw[1:]).dump(force=True)
        mac_der = r.element(64)
        if mac_der[:1] == b"\x04" and mac_der[1:2] == bytes((len(mac_der) - 2,)):
            mac = mac_der[2:]
        else:
            mac = core.OctetString.load(mac_der).native
        if not r.end_of(ends[-1]) and r.peek(1) == b"\xa2":
            r.element(MAX_HEADER_ELEMENT)  # unauthAttrs
    elif not r.end_of(ends[-1]) and r.peek(1) == b"\xa1":
        r.element(MAX_HEADER_ELEMENT)  # unprotectedAttrs
    while ends:
        r.close(ends.pop())
    if not r.at_eof():
        raise r.malformed("trailing data after the ContentInfo")
    return aad, mac


class _CbcSink:
    """CBC decryption, holding back the last block until its padding can be judged."""

    def __init__(self, algo: Any, iv: bytes, block: int, out: Callable[[bytes], None]) -> None:
        self.dec = Cipher(algo, modes.CBC(iv)).decryptor()
        self.bits = block
        self.block = block // 8
        self.out = out
        self.n = 0
        self.held = b""

    def __call__(self, data: bytes) -> None:
        self.n += len(data)
        plain = self.held + self.dec.update(data)  # whole blocks only
        self.held = plain[-self.block :]
        if len(plain) > self.block:
            self.out(plain[: -self.block])

    def finish(self, cipher: str) -> bool:
        """Write the last block, unpadded; False when its padding is invalid (it is then
        written whole: see DecryptedFile.intact)."""
        if self.n % self.block or self.n == 0:
            raise DecryptionError(
                f"{cipher}: ciphertext of {self.n} bytes is not a whole number of blocks",
                fix="the message is corrupt or truncated; ask the peer to resend",
            )
        last = self.held + self.dec.finalize()
        unpadder = sym_padding.PKCS7(self.bits).unpadder()
        try:
            last, intact = unpadder.update(last) + unpadder.finalize(), True
        except ValueError:
            intact = False
        if last:
            self.out(last)
        return intact


def _decrypt_pass(
    src: BinaryIO,
    sink: Callable[[bytes], None],
    cert: x509.Certificate,
    key: PrivateKey,
    policy: AlgorithmPolicy,
    what: str,
    aad: bytes | None,
) -> tuple[_Head, str, int, bytes | None, bool, bool]:
    """One pass: (head, key transport, plaintext size, AAD found, tag verified, CBC
    padding valid)."""
    r = StreamReader(src, what)
    head, ends = _read_head(r, policy)
    cek, key_transport = recover_cek(head.recipient_infos, cert, key, policy)
    _name, key_len, mode = CIPHERS[head.cipher]
    if len(cek) != key_len:
        raise DecryptionError(
            f"content-encryption key has {len(cek)} bytes, {head.cipher} needs {key_len}",
            fix="the message is corrupt or not for our key; ask the peer to resend",
        )
    size = 0

    def counted(data: bytes) -> None:
        nonlocal size
        size += len(data)
        sink(data)

    if r.peek(1) not in (b"\x80", b"\xa0"):
        raise MalformedMessageError(
            f"{what} has no encrypted content (detached encrypted content is not supported)",
            fix="ask the peer to send the encrypted content inside the CMS structure",
        )
    if mode == "gcm":
        if head.kind != "authenticated_enveloped_data":
            raise MalformedMessageError(
                f"{head.cipher} used in EnvelopedData; GCM requires AuthEnvelopedData (RFC 5084)",
                fix="ask the peer to send AuthEnvelopedData for AES-GCM",
            )
        nonce, icvlen = gcm_parameters(head.params)
        # RFC 5084 allows tags of 12 to 16 bytes (the tag length itself is checked
        # against ICVlen when the tail is read); cryptography wants 16 unless told.
        dec = Cipher(algorithms.AES(cek), modes.GCM(nonce, min_tag_length=12)).decryptor()
        if aad is not None:
            dec.authenticate_additional_data(aad)

        def gcm_sink(data: bytes) -> None:
            out = dec.update(data)
            if out:
                counted(out)

        r.octets(gcm_sink)
        found_aad, mac = _read_tail(r, head, ends)
        if found_aad is not None and aad is None:
            return head, key_transport, size, found_aad, False, True
        if mac is None or len(mac) != icvlen or not 12 <= icvlen <= 16:
            raise DecryptionError(
                f"{head.cipher} tag length does not match GCMParameters ICV length {icvlen}",
                fix="the message is corrupt; ask the peer to resend",
            )
        try:
            tail = dec.finalize_with_tag(mac)
        except (InvalidTag, ValueError) as exc:
            raise DecryptionError(
                f"{head.cipher} authentication tag does not verify: the encrypted content or "
                "its authenticated attributes were altered, or the key is wrong",
                fix="ask the peer to resend the message",
            ) from exc
        if tail:
            counted(tail)
        return head, key_transport, size, found_aad, True, True
    if head.kind != "enveloped_data":
        raise MalformedMessageError(
            f"{head.cipher} used in AuthEnvelopedData; only AEAD ciphers are allowed there",
            fix="ask the peer to use AES-GCM for AuthEnvelopedData",
        )
    iv = cbc_iv(head.params)
    if head.cipher in COMPAT_CONTENT_CIPHERS:
        algo: Any = TripleDES(cek)
        block = 64
    else:
        algo = algorithms.AES(cek)
        block = 128
    if not isinstance(iv, bytes) or len(iv) * 8 != block:
        raise DecryptionError(f"{head.cipher}: bad IV", fix="the message is corrupt")
    cbc = _CbcSink(algo, iv, block, counted)
    r.octets(cbc)
    intact = cbc.finish(head.cipher)
    _read_tail(r, head, ends)
    return head, key_transport, size, None, True, intact


def decrypt_stream(
    src: BinaryIO,
    sink: BinaryIO,
    cert: x509.Certificate,
    key: PrivateKey,
    *,
    policy: AlgorithmPolicy,
    what: str = "encrypted message",
) -> DecryptedFile:
    """Decrypt DER/BER from ``src`` into ``sink`` incrementally.

    The plaintext is written *before* the GCM tag or CBC padding is checked at
    the end: on any exception the caller must discard ``sink``.  ``src`` must
    be seekable if the message has GCM authenticated attributes (rare: they
    follow the ciphertext, so a second pass is needed).
    """
    start = src.tell()
    sink_start = sink.tell()

    def write(data: bytes) -> None:
        sink.write(data)

    try:
        head, kt, size, aad, done, intact = _decrypt_pass(src, write, cert, key, policy, what, None)
        if not done:
            src.seek(start)
            sink.seek(sink_start)
            sink.truncate()
            head, kt, size, aad, done, intact = _decrypt_pass(
                src, write, cert, key, policy, what, aad
            )
    except ASN1_ERRORS as exc:
        raise MalformedMessageError(
            f"{what} has a malformed structure: {exc}",
            fix="check that the message was not truncated or altered in transit",
        ) from exc
    compat = tuple(
        n for n in (head.cipher, kt) if n in COMPAT_CONTENT_CIPHERS + COMPAT_KEY_TRANSPORTS
    )
    return DecryptedFile(size, head.cipher, kt, compat, intact)


def decrypt_file(
    src: Path | bytes,
    dst: Path,
    cert: x509.Certificate,
    key: PrivateKey,
    *,
    policy: AlgorithmPolicy,
) -> DecryptedFile:
    """Decrypt ``src`` (DER/BER: a file, or a small message held in memory) into the
    file ``dst`` (mode 0600); ``dst`` appears only on success."""
    if isinstance(src, Path):
        source: BinaryIO = src.open("rb")
        what = f"encrypted file {src}"
    else:
        source, what = io.BytesIO(src), "encrypted message"
    # Plaintext: mode 0600, and nameless until it is complete (nothing is left behind
    # by a process killed meanwhile).
    with source as f, private_work_file(dst) as out:
        return decrypt_stream(f, out, cert, key, policy=policy, what=what)


def decrypt_bytes(
    src: bytes,
    cert: x509.Certificate,
    key: PrivateKey,
    *,
    policy: AlgorithmPolicy,
) -> tuple[bytes, DecryptedFile]:
    """Decrypt a small message held in memory (the same reader as :func:`decrypt_file`)."""
    sink = io.BytesIO()
    result = decrypt_stream(
        io.BytesIO(src), sink, cert, key, policy=policy, what="encrypted message"
    )
    return sink.getvalue(), result


def decrypt(
    enveloped: bytes,
    cert: x509.Certificate,
    key: PrivateKey,
    *,
    policy: AlgorithmPolicy,
) -> Decrypted:
    """Decrypt a DER/BER EnvelopedData or AuthEnvelopedData addressed to ``cert``.

    The common DER shapes are read directly; anything else (BER, other recipient
    forms, a malformed message) by the streaming reader that the daemon's file
    path uses, so that a message gets the same result or error either way.
    """
    if not isinstance(enveloped, bytes | bytearray | memoryview):
        raise InvalidTypeError(
            f"encrypted message is a {type(enveloped).__name__}: a CMS ContentInfo is read "
            "from bytes",
            fix="pass the DER or BER bytes (decode base64 first)",
        )
    direct = decrypt_der(bytes(enveloped), cert, key, policy=policy)
    if direct is not None:
        return direct
    if not enveloped:
        raise MalformedMessageError(
            "encrypted message is empty: expected a DER/BER CMS ContentInfo",
            fix="check that the peer sent a CMS/S-MIME body",
        )
    plaintext = io.BytesIO()
    opened = decrypt_stream(io.BytesIO(enveloped), plaintext, cert, key, policy=policy)
    if not opened.intact:
        raise bad_padding(opened.content_cipher)
    return Decrypted(
        content=plaintext.getvalue(),
        content_cipher=opened.content_cipher,
        key_transport=opened.key_transport,
        compat_algorithms=opened.compat_algorithms,
    )


def _decrypt_content(parsed: ParsedEnvelope, cipher: str, cek: bytes) -> bytes:
    _oid_name, key_len, mode = CIPHERS[cipher]
    if len(cek) != key_len:
        raise DecryptionError(
            f"content-encryption key has {len(cek)} bytes, {cipher} needs {key_len}",
            fix="the message is corrupt or not for our key; ask the peer to resend",
        )
    data = parsed.encrypted_content
    if mode == "gcm":
        if parsed.kind != "authenticated_enveloped_data" or parsed.mac is None:
            raise MalformedMessageError(
                f"{cipher} used in EnvelopedData; GCM requires AuthEnvelopedData (RFC 5084)",
                fix="ask the peer to send AuthEnvelopedData for AES-GCM",
            )
        nonce, icvlen = gcm_parameters(parsed.cipher_params)
        if icvlen != len(parsed.mac) or not 12 <= icvlen <= 16:
            raise DecryptionError(
                f"{cipher} tag length {len(parsed.mac)} does not match GCMParameters "
                f"ICV length {icvlen} (must be 12..16)",
                fix="the message is corrupt; ask the peer to resend",
            )
        try:
            decryptor = Cipher(
                algorithms.AES(cek), modes.GCM(nonce, parsed.mac, min_tag_length=12)
            ).decryptor()
            if parsed.auth_attrs_der is not None:
                decryptor.authenticate_additional_data(parsed.auth_attrs_der)
            return decryptor.update(data) + decryptor.finalize()
        except (InvalidTag, ValueError) as exc:
            raise DecryptionError(
                f"{cipher} authentication tag does not verify: the encrypted content or its "
                "authenticated attributes were altered, or the key is wrong",
                fix="ask the peer to resend the message",
            ) from exc
    if parsed.kind != "enveloped_data":
        raise MalformedMessageError(
            f"{cipher} used in AuthEnvelopedData; only AEAD ciphers are allowed there",
            fix="ask the peer to use AES-GCM for AuthEnvelopedData",
        )
    iv = cbc_iv(parsed.cipher_params)
    if cipher == "des-ede3-cbc":
        algo: Any = TripleDES(cek)
        block = 64
    else:
        algo = algorithms.AES(cek)
        block = 128
    if not isinstance(iv, bytes) or len(iv) * 8 != block or len(data) % (block // 8):
        raise DecryptionError(
            f"{cipher}: bad IV or ciphertext length", fix="the message is corrupt"
        )
    cbc = Cipher(algo, modes.CBC(iv)).decryptor()
    padded = cbc.update(data) + cbc.finalize()
    try:
        unpadder = sym_padding.PKCS7(block).unpadder()
        return unpadder.update(padded) + unpadder.finalize()
    except ValueError as exc:
        raise bad_padding(cipher) from exc


def decrypt_der(
    enveloped: bytes,
    cert: x509.Certificate,
    key: PrivateKey,
    *,
    policy: AlgorithmPolicy,
) -> Decrypted | None:
    """Decrypt the common DER shapes of EnvelopedData or AuthEnvelopedData addressed to
    ``cert`` directly; None for anything else (BER, other recipient forms, a malformed
    message), which :func:`gateway.cms.decrypting.decrypt` reads as a stream."""
    try:
        # through the module: tests switch the direct reader off to compare both paths
        parsed = enveloped_read.parse_enveloped_der(enveloped)
    except DerError:
        return None
    cipher = content_cipher_name(parsed.cipher_oid_name, policy)
    cek, key_transport = recover_cek(parsed.recipient_infos, cert, key, policy)
    try:
        content = _decrypt_content(parsed, cipher, cek)
    except ASN1_ERRORS as exc:
        raise MalformedMessageError(
            f"encrypted message has malformed {cipher} parameters: {exc}",
            fix="check that the message was not truncated or altered in transit",
        ) from exc
    compat = tuple(
        n for n in (cipher, key_transport) if n in COMPAT_CONTENT_CIPHERS + COMPAT_KEY_TRANSPORTS
    )
    return Decrypted(
        content=content,
        content_cipher=cipher,
        key_transport=key_transport,
        compat_algorithms=compat,
    )
