"""Unusual but legal BER is read, illegal extra elements are refused, in memory as from a file.

``medgw smime decrypt`` (in memory) and the daemon (a file, streamed) must agree:
an admin debugging a partner's message with the tool has to see what the
daemon does.  BER lets a sender split the encrypted content into a constructed
OCTET STRING of definite length (not only the indefinite length that
``openssl cms -stream`` writes); such a message must decrypt.  An element after
the last field of a CMS structure is not allowed and must be refused, whichever
way the message is read.  The same holds for signatures: the encapsulated
content of an attached SignedData may be split, and nothing may follow the
last field of a SignedData, its SignerInfo or its ContentInfo (that would be
data outside everything the signature covers).  The messages are made by
``openssl cms`` and then re-encoded here, element by element; openssl, the
reference, reads or refuses each the same way.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from gateway.cms import decrypt, verify
from gateway.cms.decrypting import decrypt_file
from gateway.errors import MalformedMessageError
from tests.helpers.cms_pki import STRICT, Pki, build_pki
from tests.helpers.der_shapes import content_info_der, der_elements, der_tlv, enveloped_parts
from tests.helpers.openssl_cms import PAYLOAD, openssl, openssl_encrypted, openssl_signed


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return build_pki(tmp_path_factory.mktemp("pki"))


def _both(message: bytes, pki: Pki, tmp_path: Path) -> tuple[object, object]:
    """What in-memory decryption and the daemon's file path make of ``message``."""
    p = pki["rsa2048"]
    try:
        in_memory: object = decrypt(message, p.cert, p.key, policy=STRICT).content
    except MalformedMessageError as exc:
        in_memory = exc.message
    src, dst = tmp_path / "message.p7m", tmp_path / "out"
    src.write_bytes(message)
    try:
        decrypt_file(src, dst, p.cert, p.key, policy=STRICT)
        from_file: object = dst.read_bytes()
    except MalformedMessageError as exc:
        from_file = exc.message.replace(f"encrypted file {src}", "encrypted message")
    return in_memory, from_file


@pytest.mark.parametrize("cipher", ["-aes-256-gcm", "-aes-128-cbc"])
@pytest.mark.parametrize("split", ["definite", "nested", "indefinite"])
def test_encrypted_content_split_into_a_constructed_octet_string_decrypts(
    pki: Pki, tmp_path: Path, cipher: str, split: str
) -> None:
    oid, tag, elements = enveloped_parts(openssl_encrypted(pki, tmp_path, "rsa2048", cipher))
    [index] = [
        i
        for i, (t, contents, _) in enumerate(elements)
        if t == 0x30 and len(der_elements(contents)) == 3 and der_elements(contents)[2][0] == 0x80
    ]
    content_type, algorithm, (_, encrypted, _) = der_elements(elements[index][1])
    half = len(encrypted) // 2
    pieces = der_tlv(0x04, encrypted[:half]) + der_tlv(0x04, encrypted[half:])
    constructed = {
        "definite": der_tlv(0xA0, pieces),
        "nested": der_tlv(0xA0, der_tlv(0x24, pieces)),
        "indefinite": b"\xa0\x80" + pieces + b"\x00\x00",
    }[split]
    info = der_tlv(0x30, content_type[2] + algorithm[2] + constructed)
    parts = [info if i == index else whole for i, (_, _, whole) in enumerate(elements)]

    message = content_info_der(oid, tag, parts)
    assert _both(message, pki, tmp_path) == (PAYLOAD, PAYLOAD)
    # openssl, the reference, reads it too: it is a legal BER form, not our invention.
    (tmp_path / "split.der").write_bytes(message)
    p = pki["rsa2048"]
    given, out = tmp_path / "split.der", tmp_path / "by-openssl"
    openssl("-decrypt", "-inform", "DER", "-in", given, "-binary",
            "-recip", p.cert_path, "-inkey", p.key_path, "-out", out)  # fmt: skip
    assert out.read_bytes() == PAYLOAD


@pytest.mark.parametrize("where", ["EnvelopedData", "ContentInfo"])
def test_an_element_after_the_last_field_is_refused_either_way(
    pki: Pki, tmp_path: Path, where: str
) -> None:
    oid, tag, elements = enveloped_parts(
        openssl_encrypted(pki, tmp_path, "rsa2048", "-aes-256-gcm")
    )
    extra = der_tlv(0x04, b"hidden")
    parts = [whole for _, _, whole in elements]
    if where == "EnvelopedData":
        message = content_info_der(oid, tag, [*parts, extra])
    else:
        message = content_info_der(oid, tag, parts, after=extra)
    in_memory, from_file = _both(message, pki, tmp_path)
    assert in_memory == from_file
    (tmp_path / "extra.der").write_bytes(message)
    p = pki["rsa2048"]
    refused = openssl("-decrypt", "-inform", "DER", "-in", tmp_path / "extra.der",
                      "-recip", p.cert_path, "-inkey", p.key_path, ok=False)  # fmt: skip
    assert refused.returncode != 0  # openssl refuses it as well
    assert isinstance(in_memory, str) and "unexpected trailing elements" in in_memory


def _signed_parts(message: bytes) -> tuple[bytes, list[tuple[int, bytes, bytes]]]:
    """(content type OID element, SignedData's elements) of a DER ContentInfo."""
    oid, tag, elements = enveloped_parts(message)
    assert tag == 0x30
    return oid, elements


def _openssl_verifies(tmp_path: Path, message: bytes) -> bool:
    """openssl checks the signature (not the signer's chain: that is ours to judge)."""
    given, content = tmp_path / "given.der", tmp_path / "content"
    given.write_bytes(message)
    done = openssl("-verify", "-noverify", "-inform", "DER", "-in", given, "-binary",
                   "-out", content, ok=False)  # fmt: skip
    return done.returncode == 0 and content.read_bytes() == PAYLOAD


@pytest.mark.parametrize("split", ["definite", "nested", "indefinite"])
def test_encapsulated_content_split_into_a_constructed_octet_string_verifies(
    pki: Pki, tmp_path: Path, split: str
) -> None:
    oid, elements = _signed_parts(openssl_signed(pki, tmp_path, "rsa2048"))
    # version, digestAlgorithms, encapContentInfo { eContentType, [0] { OCTET STRING } }, ...
    content_type, (_, explicit, _) = der_elements(elements[2][1])
    [(_, content, _)] = der_elements(explicit)
    half = len(content) // 2
    pieces = der_tlv(0x04, content[:half]) + der_tlv(0x04, content[half:])
    constructed = {
        "definite": der_tlv(0x24, pieces),
        "nested": der_tlv(0x24, der_tlv(0x24, pieces)),
        "indefinite": b"\x24\x80" + pieces + b"\x00\x00",
    }[split]
    encap = der_tlv(0x30, content_type[2] + der_tlv(0xA0, constructed))
    parts = [encap if i == 2 else whole for i, (_, _, whole) in enumerate(elements)]
    message = content_info_der(oid, 0x30, parts)

    verified = verify(message, trusted_signers=[pki["rsa2048"].cert], policy=STRICT)
    assert verified.content == PAYLOAD
    assert _openssl_verifies(tmp_path, message)


@pytest.mark.parametrize("where", ["SignerInfo", "SignedData", "ContentInfo"])
@pytest.mark.parametrize("attached", [True, False], ids=["attached", "detached"])
def test_an_element_after_the_last_field_of_a_signature_is_refused(
    pki: Pki, tmp_path: Path, where: str, attached: bool
) -> None:
    message = openssl_signed(pki, tmp_path, "rsa2048")  # attached; made detached below
    oid, elements = _signed_parts(message)
    if not attached:  # drop the encapsulated content: a detached signature
        content_type, _ = der_elements(elements[2][1])
        elements[2] = (0x30, content_type[2], der_tlv(0x30, content_type[2]))
    hidden = der_tlv(0x04, b"hidden")
    parts = [whole for _, _, whole in elements]
    after = b""
    if where == "SignerInfo":
        [(_, signer, _)] = der_elements(elements[-1][1])
        parts[-1] = der_tlv(0x31, der_tlv(0x30, signer + hidden))
    elif where == "SignedData":
        parts.append(hidden)
    else:
        after = hidden
    altered = content_info_der(oid, 0x30, parts, after)

    with pytest.raises(MalformedMessageError) as refused:
        verify(
            altered,
            content=None if attached else PAYLOAD,
            trusted_signers=[pki["rsa2048"].cert],
            policy=STRICT,
        )
    assert "unexpected element" in refused.value.message
    assert where in refused.value.message
    if attached:
        assert not _openssl_verifies(tmp_path, altered)  # openssl refuses it too
