"""CMS CompressedData (RFC 3274): zlib compression, read and write.

AS2 products (Mendelson, IBM Sterling) compress before or after signing; the
content is ``application/pkcs7-mime; smime-type=compressed-data``.  Reading is
bounded: a peer cannot make us inflate more than ``max_size`` bytes.
"""

from __future__ import annotations

import zlib

from asn1crypto import cms, core

from ..errors import MalformedMessageError, PolicyError
from .common import ASN1_ERRORS
from .contentinfo import load_content_info

__all__ = ["DEFAULT_MAX_DECOMPRESSED", "compress", "decompress"]

# 4 GiB: larger than any study we expect, small enough to stop a zip bomb.
DEFAULT_MAX_DECOMPRESSED = 4 << 30
_ZLIB_OID = "1.2.840.113549.1.9.16.3.8"


def compress(content: bytes, *, level: int = 6) -> bytes:
    """``ContentInfo(CompressedData)`` in DER with the content zlib-compressed."""
    data = zlib.compress(bytes(content), level)
    compressed = cms.CompressedData(
        {
            "version": "v0",
            "compression_algorithm": {"algorithm": "zlib"},
            "encap_content_info": {"content_type": "data", "content": data},
        }
    )
    out: bytes = cms.ContentInfo({"content_type": "compressed_data", "content": compressed}).dump()
    return out


def inflate_bounded(data: bytes, max_size: int, what: str) -> bytes:
    """zlib-inflate ``data``; at most ``max_size`` bytes, the stream must be complete."""
    d = zlib.decompressobj()
    try:
        out = d.decompress(data, max_size + 1)
    except zlib.error as exc:
        raise MalformedMessageError(
            f"{what}: the zlib stream is corrupt ({exc})",
            fix="the message was altered or truncated in transit; ask the peer to resend",
        ) from exc
    if len(out) > max_size:
        raise MalformedMessageError(
            f"{what}: decompresses to more than {max_size} bytes (the limit for one message)",
            fix="ask the peer to send smaller documents, or raise the limit",
        )
    if not d.eof:
        raise MalformedMessageError(
            f"{what}: the zlib stream ends early (truncated compressed content)",
            fix="the message was truncated in transit; ask the peer to resend",
        )
    return out


def decompress(der: bytes, *, max_size: int = DEFAULT_MAX_DECOMPRESSED) -> bytes:
    """The content of a DER/BER ``ContentInfo(CompressedData)``."""
    ci = load_content_info(der, "compressed message")
    ctype = ci["content_type"].native
    if ctype != "compressed_data":
        raise MalformedMessageError(
            f"compressed message is a CMS {ctype}, not CompressedData",
            fix="check the message order: the gateway expects compressed data here",
        )
    try:
        body = ci["content"]
        alg = body["compression_algorithm"]["algorithm"]
        encap = body["encap_content_info"]
        content = encap["content"]
        data = None if isinstance(content, core.Void) else bytes(content)
        alg_oid = alg.dotted
    except ASN1_ERRORS as exc:
        raise MalformedMessageError(
            f"compressed message has a malformed CompressedData structure: {exc}",
            fix="check that the message was not truncated or altered in transit",
        ) from exc
    if alg_oid != _ZLIB_OID:
        raise PolicyError(
            f"compression algorithm {alg_oid}",
            "only zlib (RFC 3274) is supported",
            "ask the peer to compress with zlib or not at all",
        )
    if data is None:
        raise MalformedMessageError(
            "compressed message has no content", fix="ask the peer to resend"
        )
    return inflate_bounded(data, max_size, "compressed message")
