"""Building and taking apart DER by hand, to give the CMS readers shapes our writer
never makes (BER, constructed OCTET STRINGs, extra elements, too many of something)."""

from __future__ import annotations


def der_tlv(tag: int, content: bytes) -> bytes:
    n = len(content)
    if n < 0x80:
        return bytes([tag, n]) + content
    size = n.to_bytes((n.bit_length() + 7) // 8, "big")
    return bytes([tag, 0x80 | len(size)]) + size + content


def der_elements(data: bytes) -> list[tuple[int, bytes, bytes]]:
    """(tag, contents, whole encoding) of each DER element in ``data``."""
    out = []
    pos = 0
    while pos < len(data):
        tag, first = data[pos], data[pos + 1]
        start = pos + 2
        if first < 0x80:
            n = first
        else:
            n = int.from_bytes(data[start : start + (first & 0x7F)], "big")
            start += first & 0x7F
        out.append((tag, data[start : start + n], data[pos : start + n]))
        pos = start + n
    return out


def enveloped_parts(message: bytes) -> tuple[bytes, int, list[tuple[int, bytes, bytes]]]:
    """(content type OID element, EnvelopedData's tag, its elements) of a DER ContentInfo."""
    [(_, content_info, _)] = der_elements(message)
    (_, _, oid), (_, explicit, _) = der_elements(content_info)
    [(tag, enveloped, _)] = der_elements(explicit)
    return oid, tag, der_elements(enveloped)


def content_info_der(oid: bytes, tag: int, elements: list[bytes], after: bytes = b"") -> bytes:
    return der_tlv(0x30, oid + der_tlv(0xA0, der_tlv(tag, b"".join(elements))) + after)
