"""What each fuzz target feeds, and the contract it checks.

A target is one reader of bytes an outside party controls, called the way the
gateway calls it.  Its contract: it returns, or it raises one of the gateway's
own errors (``gateway.errors``) that its module documents; never an
``IndexError``, ``KeyError``, ``RecursionError``, ``UnicodeDecodeError``,
``MemoryError`` or any other exception, which would reach a peer as an HTTP 500
or stop a command with a traceback.  And it spends a bounded CPU time on one
input (:data:`CPU_SECONDS_PER_INPUT`, far above what a real message of that
size costs, so that it fails on super-linear work, not on a slow machine).

A broken contract raises :class:`ContractBroken`: the fuzzer records the input
as a finding, and a test replays it.
"""

from __future__ import annotations

import shutil
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives.serialization import load_pem_private_key

from gateway.as2.asyncmdn import async_receipt_url, is_receipt
from gateway.as2.entity import payload_digest, read_entity_info
from gateway.as2.headers import (
    check_message_id,
    parse_receipt_request,
    undecodable_header,
    unquote_as2_id,
)
from gateway.as2.mdn import parse_receipt, read_report
from gateway.cms.compressed import decompress
from gateway.cms.decrypting import decrypt_bytes
from gateway.cms.formats import detect
from gateway.cms.inspect import describe
from gateway.cms.mime import parse_entity
from gateway.cms.smime import decompress_entity, is_compressed_entity, open_envelope, verify_entity
from gateway.cms.stream import verify_entity_span
from gateway.cms.verification import verify
from gateway.config import load_config
from gateway.errors import (
    ConfigError,
    ObjectSecurityError,
    PolicyError,
    ProtocolError,
)
from gateway.pki.demo import init_demo
from gateway.pki.issue import issue, make_ca, write_pem
from gateway.policy import LEGACY_ALGORITHMS, AlgorithmPolicy, PrivateKey

# Far above a real message's cost at the fuzzer's input sizes (at most 64 KiB),
# instrumented and on a loaded machine; super-linear work on a crafted input
# shows up as seconds.
CPU_SECONDS_PER_INPUT = 2.0
MAX_INPUT_BYTES = 64 * 1024

# The legacy algorithms are admitted, so that the readers behind them are reached
# too; the strict policy refuses earlier, on a path the legacy one goes through.
LEGACY = AlgorithmPolicy(accept_legacy=frozenset(LEGACY_ALGORITHMS))
STRICT = AlgorithmPolicy()
PEER_URL = "https://lab.example:4080/as2"
CONFIG_PEER_SEPARATOR = b"\n#--- peers.d/lab.toml ---\n"


class ContractBroken(AssertionError):
    """A target raised what its module does not document, or took too long."""


@dataclass(frozen=True)
class Party:
    certificate: x509.Certificate
    key: PrivateKey


@dataclass(frozen=True)
class Material:
    """The keys and configuration the targets read with; made once per work folder."""

    work: Path
    recipients: tuple[Party, ...]  # our decryption keys (EC and RSA)
    signers: tuple[x509.Certificate, ...]  # pinned signers
    demo_config: Path  # a complete installation's gateway.toml

    @property
    def sender(self) -> Party:
        return _load_party(self.work / "demo" / "lab" / "certs", "sign")


def _load_party(folder: Path, role: str) -> Party:
    cert = x509.load_pem_x509_certificate((folder / f"{role}.crt").read_bytes())
    key = load_pem_private_key((folder / f"{role}.key").read_bytes(), None)
    return Party(cert, key)  # type: ignore[arg-type]


def material(work: Path, vendors: Path | None = None) -> Material:
    """The keys under ``work`` (made on first use: a demo installation and an RSA
    recipient), plus the interop fixtures' test key when ``vendors`` is given."""
    demo = work / "demo"
    if not (demo / "hospital" / "gateway.toml").is_file():
        init_demo(demo, now=datetime.now(UTC), hospital_port=18443, lab_port=18444)
    rsa_dir = work / "rsa"
    if not (rsa_dir / "encrypt.key").is_file():
        now = datetime.now(UTC)
        ca = make_ca("medgw fuzz RSA CA", now=now, key_kind="rsa-2048")
        for role, purpose in (("encrypt", "smime-encrypt"), ("sign", "smime-sign")):
            pair = issue(ca, f"FUZZ-RSA-{role}", purpose=purpose, now=now, key_kind="rsa-2048")
            rsa_dir.mkdir(parents=True, exist_ok=True)
            write_pem(rsa_dir / f"{role}.crt", pair.certificate)
            write_pem(rsa_dir / f"{role}.key", pair.key)
    certs = demo / "hospital" / "certs"
    recipients = [_load_party(certs, "encrypt"), _load_party(rsa_dir, "encrypt")]
    signers = [
        _load_party(demo / "lab" / "certs", "sign").certificate,
        _load_party(rsa_dir, "sign").certificate,
    ]
    if vendors is not None and (vendors / "cert_test.pem").is_file():
        pem = (vendors / "cert_test.pem").read_bytes()
        key = load_pem_private_key(pem, b"test")
        recipients.append(Party(x509.load_pem_x509_certificate(pem), key))  # type: ignore[arg-type]
        for name in ("cert_mecas2_public.pem", "cert_sb2bi_public.pem"):
            if (vendors / name).is_file():
                signers.append(x509.load_pem_x509_certificate((vendors / name).read_bytes()))
    return Material(work, tuple(recipients), tuple(signers), demo / "hospital" / "gateway.toml")


@contextmanager
def _bounded(name: str, allowed: tuple[type[BaseException], ...]) -> Iterator[None]:
    """Let ``allowed`` errors through silently; anything else, or too much CPU, breaks
    the contract of target ``name``."""
    start = time.thread_time()
    try:
        yield
    except allowed:
        pass
    except ContractBroken:
        raise
    except BaseException as exc:
        if isinstance(exc, KeyboardInterrupt | SystemExit):
            raise
        where = traceback.extract_tb(exc.__traceback__)[-1]
        raise ContractBroken(
            f"{name}: {type(exc).__module__}.{type(exc).__qualname__} escaped "
            f"from {where.filename}:{where.lineno} "
            f"(only {', '.join(a.__name__ for a in allowed)} may): {str(exc)[:300]}"
        ) from exc
    spent = time.thread_time() - start
    if spent > CPU_SECONDS_PER_INPUT:
        raise ContractBroken(f"{name}: {spent:.2f} s of CPU on one input")


CMS_ERRORS: tuple[type[BaseException], ...] = (ObjectSecurityError, PolicyError)


def cms(m: Material, data: bytes) -> None:
    """A CMS ContentInfo (DER or BER) as a peer sends it: described, decrypted with
    each of our keys, verified, decompressed."""
    with _bounded("cms.describe", CMS_ERRORS):
        describe(data)
    for party in m.recipients:
        with _bounded("cms.decrypt", CMS_ERRORS):
            decrypt_bytes(data, party.certificate, party.key, policy=LEGACY)
    with _bounded("cms.verify", CMS_ERRORS):
        verify(data, trusted_signers=m.signers, policy=LEGACY)
    with _bounded("cms.decompress", CMS_ERRORS):
        decompress(data, max_size=1 << 20)


def smime(m: Material, data: bytes) -> None:
    """A MIME entity (headers, blank line, body) as it arrives or comes out of a
    decryption: its form detected, opened, verified, decompressed."""
    with _bounded("smime.parse_entity", CMS_ERRORS):
        parse_entity(data)
    with _bounded("smime.detect", CMS_ERRORS):
        detect(data)
    for party in m.recipients:
        with _bounded("smime.open_envelope", CMS_ERRORS):
            _headers, body = parse_entity(data)
            open_envelope(body, party.certificate, party.key, policy=LEGACY)
    with _bounded("smime.verify_entity", CMS_ERRORS):
        verify_entity(data, trusted_signers=m.signers, policy=LEGACY)
    with (
        _bounded("smime.verify_entity_span", CMS_ERRORS),
        tempfile.TemporaryDirectory(dir=m.work) as spill,
    ):
        verify_entity_span(data, Path(spill) / "spill", trusted_signers=m.signers, policy=LEGACY)
    with _bounded("smime.decompress_entity", CMS_ERRORS):
        if is_compressed_entity(data):
            decompress_entity(data, max_size=1 << 20)


def _http_headers(head: bytes) -> dict[str, str]:
    """Header lines as aiohttp hands them on: UTF-8 with lone surrogates for other
    bytes, names lower-cased by the daemon."""
    headers: dict[str, str] = {}
    for line in head.split(b"\r\n"):
        name, colon, value = line.partition(b":")
        if colon:
            key = name.strip().decode("utf-8", "surrogateescape").lower()
            headers[key] = value.strip().decode("utf-8", "surrogateescape")
    return headers


AS2_ERRORS: tuple[type[BaseException], ...] = (ProtocolError, ObjectSecurityError)


def as2(m: Material, data: bytes) -> None:
    """An AS2 request: its HTTP headers read as the daemon reads them, then the
    document entity (after the blank line) as the receiver reads it."""
    head, _, entity = data.partition(b"\r\n\r\n")
    headers = _http_headers(head)
    with _bounded("as2.headers", AS2_ERRORS):
        is_receipt(headers)
        if undecodable_header(headers) is None:
            async_receipt_url(headers.get("receipt-delivery-option"), PEER_URL)
            unquote_as2_id(headers.get("as2-from", ""))
            unquote_as2_id(headers.get("as2-to", ""))
            parse_receipt_request(headers).choose_digest("sha256")
            check_message_id(headers.get("message-id"))
    with _bounded("as2.entity", AS2_ERRORS):
        info = read_entity_info(entity)
        payload_digest(entity, info)


MDN_ERRORS: tuple[type[BaseException], ...] = (ProtocolError, ObjectSecurityError, PolicyError)


def mdn(m: Material, data: bytes) -> None:
    """A receipt: the Content-Type line, a blank line, the body, as the sender of the
    original message reads it; and its report part as read after verification."""
    head, _, body = data.partition(b"\r\n\r\n")
    content_type = head.decode("latin-1").partition(":")[2].strip()
    with _bounded("mdn.parse_receipt", MDN_ERRORS):
        parse_receipt(content_type, body, trusted_signers=m.signers, policy=LEGACY)
    with _bounded("mdn.read_report", MDN_ERRORS):
        read_report(data)


def config(m: Material, data: bytes) -> None:
    """``gateway.toml`` text (and, after a separator line, a peer file) loaded in a
    copy of a complete installation: an admin's typo must get a ConfigError."""
    gateway_text, _, peer_text = data.partition(CONFIG_PEER_SEPARATOR)
    root = m.work / "config"
    if not root.is_dir():
        shutil.copytree(m.demo_config.parent, root, symlinks=True)
    peer = root / "peers.d" / "lab.toml"
    if peer_text:
        peer.write_bytes(peer_text)
    else:
        shutil.copyfile(m.demo_config.parent / "peers.d" / "lab.toml", peer)
    (root / "gateway.toml").write_bytes(gateway_text)
    with _bounded("config.load_config", (ConfigError,)):
        load_config(root / "gateway.toml")


TARGETS: dict[str, Callable[[Material, bytes], None]] = {
    "cms": cms,
    "smime": smime,
    "as2": as2,
    "mdn": mdn,
    "config": config,
}

__all__ = [
    "CPU_SECONDS_PER_INPUT",
    "MAX_INPUT_BYTES",
    "STRICT",
    "TARGETS",
    "ContractBroken",
    "Material",
    "material",
]
