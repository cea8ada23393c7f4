"""A SignedData as read (:class:`ParsedSignature` and its signers), and the
asn1crypto reader that takes any shape a real product sends (DER or BER:
indefinite lengths, constructed OCTET STRINGs)."""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from asn1crypto import core
from asn1crypto import x509 as asn1_x509
from cryptography import x509

from ..errors import MalformedMessageError, SignatureError
from .common import (
    ASN1_ERRORS,
    cert_der,
    cert_ski,
    issuer_serial_ders,
    matches_issuer_serial,
    name_string,
)
from .contentinfo import load_content_info
from .der import MAX_NESTING


@dataclass
class ParsedSigner:
    """A SignerInfo read with asn1crypto (any shape the asn1crypto path accepts)."""

    index: int
    sid_issuer_serial: Any | None
    sid_ski: bytes | None
    digest: str  # asn1crypto name or dotted OID
    digest_alg: Any
    sig_alg: Any
    sig_alg_name: str
    signature: bytes
    attrs_present: bool
    attrs_original: bytes | None  # the signed attributes as received, tagged SET OF
    attrs: Any  # the asn1crypto [0] IMPLICIT signedAttrs, or Void
    content_type_attr: str | None
    message_digest: bytes | None
    signing_time: datetime | None
    algorithm_protection: Any | None
    _forced: bytes | None = field(default=None, repr=False)

    def attrs_der(self) -> Iterator[bytes]:
        """The encodings the signature may be over: the signed attributes as received
        (tagged SET OF), then - only if that one does not verify - their DER
        re-encoding, if it differs (a BER SET OF, or an unsorted one, that an
        intermediary re-encoded, or that its signer encoded in DER for signing)."""
        if self.attrs_original is None:
            return
        yield self.attrs_original
        if self._forced is None:
            self._forced = self.attrs.untag().dump(force=True)
        if self._forced != self.attrs_original:
            yield self._forced

    def describe(self) -> str:
        if self.sid_issuer_serial is not None:
            return (
                f"issuer {name_string(self.sid_issuer_serial['issuer'])!r}, serial "
                f"0x{self.sid_issuer_serial['serial_number'].native:x}"
            )
        return f"subjectKeyIdentifier {(self.sid_ski or b'').hex()}"

    def names(self, cert: x509.Certificate) -> bool:
        """True if the signer identifier names ``cert``."""
        if self.sid_issuer_serial is not None:
            return matches_issuer_serial(cert, self.sid_issuer_serial)
        return self.sid_ski is not None and cert_ski(cert) == self.sid_ski

    def check_protection(self, who: str) -> None:
        """RFC 6211: the CMSAlgorithmProtection attribute, if any, names the signer
        info's own digest and signature algorithms."""
        prot = self.algorithm_protection
        if prot is None:
            return
        if not isinstance(prot["mac_algorithm"], core.Void) or isinstance(
            prot["signature_algorithm"], core.Void
        ):
            raise SignatureError(
                f"{who}: CMSAlgorithmProtection must carry a signatureAlgorithm and no "
                "macAlgorithm in SignedData (RFC 6211)",
                fix="the message was built incorrectly; ask the peer to fix it",
            )
        if prot["digest_algorithm"]["algorithm"].dotted != self.digest_alg[
            "algorithm"
        ].dotted or not same_algorithm(prot["signature_algorithm"], self.sig_alg):
            raise SignatureError(
                f"{who}: CMSAlgorithmProtection does not match the algorithms in the "
                "signer info (algorithm substitution, RFC 6211)",
                fix="the message was altered; ask the peer to resend",
            )


class Asn1Twin:
    """The asn1crypto reading of a signature the direct reader took, made only when
    a rare path needs an asn1crypto object (a Name compared as a Name, a DER
    re-encoding of the signed attributes, an error message)."""

    __slots__ = ("_der", "_parsed")

    def __init__(self, der: bytes) -> None:
        self._der = der
        self._parsed: ParsedSignature | None = None

    def signer(self, index: int) -> ParsedSigner:
        if self._parsed is None:
            self._parsed = parse_signed_data_asn1(self._der)
        signer = self._parsed.signers[index]
        assert isinstance(signer, ParsedSigner)
        return signer


class DirectSigner:
    """A SignerInfo of the common shape, read directly from its DER.

    The values read are exactly those :func:`_parse_signer` gives; anything
    needing an asn1crypto object comes from the asn1crypto reading of the same
    bytes (``_twin``), so that rare paths behave exactly as there.  Its
    CMSAlgorithmProtection, if present, was checked when it was read: it is
    accepted only as the byte-exact copy of the signer info's algorithms.
    """

    __slots__ = (
        "_twin",
        "attrs_original",
        "attrs_present",
        "content_type_attr",
        "digest",
        "index",
        "message_digest",
        "sid_issuer_der",
        "sid_serial",
        "sid_ski",
        "sig_alg_name",
        "signature",
        "signing_time",
    )

    def __init__(self, index: int, twin: Asn1Twin) -> None:
        self.index = index
        self._twin = twin
        self.sid_issuer_der: bytes | None = None
        self.sid_serial = 0
        self.sid_ski: bytes | None = None
        self.digest = ""
        self.sig_alg_name = ""
        self.signature = b""
        self.attrs_present = False
        self.attrs_original: bytes | None = None
        self.content_type_attr: str | None = None
        self.message_digest: bytes | None = None
        self.signing_time: datetime | None = None

    @property
    def sig_alg(self) -> Any:
        return self._twin.signer(self.index).sig_alg

    def attrs_der(self) -> Iterator[bytes]:
        if self.attrs_original is None:
            return
        yield self.attrs_original
        # not verified as received: as the asn1crypto path, try the DER re-encoding
        yield from itertools.islice(self._twin.signer(self.index).attrs_der(), 1, None)

    def describe(self) -> str:
        return self._twin.signer(self.index).describe()

    def names(self, cert: x509.Certificate) -> bool:
        if self.sid_issuer_der is None:
            return self.sid_ski is not None and cert_ski(cert) == self.sid_ski
        if self.sid_serial != cert.serial_number:
            return False
        issuer_der, _ = issuer_serial_ders(cert_der(cert))
        if issuer_der == self.sid_issuer_der:
            return True
        # the same name encoded otherwise? compared as a Name, as the asn1crypto path does
        return self._twin.signer(self.index).names(cert)

    def check_protection(self, who: str) -> None:
        return None  # checked when read


Signer = ParsedSigner | DirectSigner


@dataclass
class ParsedSignature:
    content_type: str
    content: bytes | None
    certificates: tuple[x509.Certificate, ...]
    signers: tuple[Signer, ...]


def _params_native(alg: Any) -> Any:
    p = alg["parameters"]
    if isinstance(p, core.Void | core.Null):
        return None
    return p.native


def same_algorithm(a: Any, b: Any) -> bool:
    return bool(a["algorithm"].dotted == b["algorithm"].dotted) and _params_native(
        a
    ) == _params_native(b)


def _single(attr: Any, name: str) -> Any:
    values = attr["values"]
    if len(values) != 1:
        raise MalformedMessageError(
            f"signed attribute {name} has {len(values)} values; RFC 5652 requires exactly one",
            fix="the sender's CMS implementation is broken; ask the peer to fix it",
        )
    return values[0]


def _parse_signer(index: int, si: Any) -> ParsedSigner:
    sid = si["sid"]
    ias = sid.chosen if sid.name == "issuer_and_serial_number" else None
    ski = sid.chosen.native if sid.name == "subject_key_identifier" else None
    digest_alg = si["digest_algorithm"]
    sig_alg = si["signature_algorithm"]
    attrs = si["signed_attrs"]
    attrs_present = not isinstance(attrs, core.Void)
    ct_attr = md = st = prot = None
    original: bytes | None = None
    if attrs_present:
        seen: set[str] = set()
        for attr in attrs:
            typ = attr["type"].native
            if typ in seen and typ in (
                "content_type",
                "message_digest",
                "signing_time",
                "cms_algorithm_protection",
            ):
                raise MalformedMessageError(
                    f"signed attribute {typ} appears twice in signer info #{index}; "
                    "RFC 5652 forbids repeated attributes",
                    fix="the sender's CMS implementation is broken; ask the peer to fix it",
                )
            seen.add(typ)
            if typ == "content_type":
                ct_attr = _single(attr, typ).native
            elif typ == "message_digest":
                md = _single(attr, typ).native
            elif typ == "signing_time":
                st = _single(attr, typ).native
            elif typ == "cms_algorithm_protection":
                prot = _single(attr, typ)
        original = b"\x31" + attrs.dump()[1:]
    return ParsedSigner(
        index=index,
        sid_issuer_serial=ias,
        sid_ski=ski,
        digest=digest_alg["algorithm"].native,
        digest_alg=digest_alg,
        sig_alg=sig_alg,
        sig_alg_name=sig_alg["algorithm"].native,
        signature=si["signature"].native,
        attrs_present=attrs_present,
        attrs_original=original,
        attrs=attrs,
        content_type_attr=ct_attr,
        message_digest=md,
        signing_time=st,
        algorithm_protection=prot,
    )


def parse_signed_data_asn1(signed: bytes) -> ParsedSignature:
    ci = load_content_info(signed, "signed message")
    ctype = ci["content_type"].native
    if ctype != "signed_data":
        raise MalformedMessageError(
            f"signed message is a CMS {ctype}, not SignedData",
            fix="check the message order: the gateway expects a signature here",
        )
    try:
        _refuse_extra_elements(ci, "signed message")
        sd = ci["content"]
        encap = sd["encap_content_info"]
        econtent_type = encap["content_type"].native
        econtent = encap["content"]
        content: bytes | None = None
        if not isinstance(econtent, core.Void):
            # the content octets: chunks of a BER constructed OCTET STRING merged
            content = bytes(econtent)
        certs: list[x509.Certificate] = []
        if not isinstance(sd["certificates"], core.Void):
            for choice in sd["certificates"]:
                if choice.name != "certificate":
                    continue
                certs.append(x509.load_der_x509_certificate(choice.chosen.dump()))
        signers = tuple(_parse_signer(i, si) for i, si in enumerate(sd["signer_infos"]))
    except MalformedMessageError:
        raise
    except ASN1_ERRORS as exc:
        raise MalformedMessageError(
            f"signed message has a malformed SignedData structure: {exc}",
            fix="check that the message was not truncated or altered in transit",
        ) from exc
    if not signers:
        raise MalformedMessageError(
            "signed message has no SignerInfo (it carries no signature)",
            fix="ask the peer to sign the message",
        )
    return ParsedSignature(
        content_type=econtent_type,
        content=content,
        certificates=tuple(certs),
        signers=signers,
    )


def _refuse_extra_elements(value: core.Asn1Value, what: str) -> None:
    """Refuse an element after the last field of any SEQUENCE in ``value``.

    asn1crypto keeps such elements aside instead of refusing them; they are
    outside everything the signature covers, and the direct reader (and
    openssl) refuse them.  Certificates are left to ``cryptography``'s strict
    reader, OCTET STRING and ANY contents to whoever reads them.
    """
    stack: list[tuple[core.Asn1Value, int]] = [(value, 0)]
    while stack:
        item, depth = stack.pop()
        if depth > MAX_NESTING:
            raise MalformedMessageError(
                f"{what} nests elements more than {MAX_NESTING} deep",
                fix="check that the message was not altered in transit",
            )
        if isinstance(item, core.Choice):
            stack.append((item.chosen, depth + 1))
        elif isinstance(item, asn1_x509.Certificate):
            continue
        elif isinstance(item, core.Sequence):
            fields = len(item._fields)
            if len(item) > fields:
                raise MalformedMessageError(
                    f"{what} has {len(item) - fields} unexpected element(s) after the last "
                    f"field of its {type(item).__name__}",
                    fix="check that the message was not altered in transit; the sender's "
                    "product writes CMS that is not valid",
                )
            stack.extend((item._lazy_child(i), depth + 1) for i in range(fields))
        elif isinstance(item, core.SequenceOf):
            stack.extend((child, depth + 1) for child in item)
