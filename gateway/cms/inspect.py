"""A human-readable account of a CMS object: structure, algorithms, parties.

For interop debugging: every algorithm is shown with the policy's verdict
(recommended, monitored list, refused) so an admin sees at once why a partner's
message would be refused.
"""

from __future__ import annotations

from typing import Any

from asn1crypto import core

from ..errors import MalformedMessageError, PolicyError
from ..policy import LEGACY_ALGORITHMS, AlgorithmPolicy
from .common import ASN1_ERRORS, name_string
from .contentinfo import load_content_info
from .envelope_algorithms import CIPHER_BY_OID_NAME, KDF_SCHEMES
from .enveloped_read import check_recipient_counts

__all__ = ["describe"]

_STRICT = AlgorithmPolicy()
_LEGACY = AlgorithmPolicy(accept_legacy=frozenset(LEGACY_ALGORITHMS))


def _legacy(name: str) -> str:
    return f'monitored list: only with accept_legacy = ["{name}"]'


def _verdict(check: Any, legacy: str) -> str:
    try:
        check(_STRICT)
        return "recommended"
    except PolicyError:
        pass
    try:
        check(_LEGACY)
        return _legacy(legacy)
    except PolicyError as exc:
        return f"refused: {exc.rule}"


def _digest_verdict(name: str) -> str:
    """The digest of a received signature (SHA-1: only from a peer that accepts it)."""
    return _verdict(lambda p: p.check_digest(name, inbound=True), "sha1")


def _sid(sid: Any) -> str:
    if sid.name == "issuer_and_serial_number":
        ias = sid.chosen
        return f"issuer {name_string(ias['issuer'])!r} serial 0x{ias['serial_number'].native:x}"
    if sid.name in ("subject_key_identifier",):
        return f"subjectKeyIdentifier {sid.chosen.native.hex()}"
    if sid.name == "r_key_id":
        return f"subjectKeyIdentifier {sid.chosen['subject_key_identifier'].native.hex()}"
    return str(sid.name)


def _signed(sd: Any, out: list[str]) -> None:
    encap = sd["encap_content_info"]
    content = encap["content"]
    if isinstance(content, core.Void):
        out.append("  content: detached (not in the message)")
    else:
        ctype = encap["content_type"].native
        out.append(f"  content: attached, {len(bytes(content))} bytes, type {ctype}")
    certs = sd["certificates"]
    n = 0 if isinstance(certs, core.Void) else len(certs)
    out.append(f"  certificates: {n}")
    if n:
        for c in certs:
            if c.name == "certificate":
                tbs = c.chosen["tbs_certificate"]
                out.append(
                    f"    - subject {name_string(tbs['subject'])!r}, issuer "
                    f"{name_string(tbs['issuer'])!r}, serial 0x{tbs['serial_number'].native:x}"
                )
    for i, si in enumerate(sd["signer_infos"]):
        digest = si["digest_algorithm"]["algorithm"].native
        sig = si["signature_algorithm"]["algorithm"].native
        out.append(f"  signer #{i}: {_sid(si['sid'])}")
        out.append(f"    digest: {digest} ({_digest_verdict(digest)})")
        if sig == "rsassa_pss":
            params = si["signature_algorithm"]["parameters"]
            pss_hash = params["hash_algorithm"]["algorithm"].native
            sig += f" (hash {pss_hash}, salt {params['salt_length'].native})"
        out.append(f"    signature: {sig}")
        attrs = si["signed_attrs"]
        if isinstance(attrs, core.Void):
            out.append("    signed attributes: none")
        else:
            names = []
            for a in attrs:
                t = a["type"].native
                if t == "signing_time":
                    names.append(f"signingTime={a['values'][0].native.isoformat()}")
                else:
                    names.append(str(t))
            out.append("    signed attributes: " + ", ".join(names))


def _recipients(infos: Any, out: list[str]) -> None:
    out.append(f"  recipients: {len(infos)}")
    for ri in infos:
        if ri.name == "ktri":
            k = ri.chosen
            alg = k["key_encryption_algorithm"]
            name = alg["algorithm"].native
            if name == "rsaes_oaep" and isinstance(alg["parameters"], core.Void):
                name = "rsaes-oaep (no parameters)"
                verdict = "refused: RFC 4055 requires RSAES-OAEP-params"
            elif name == "rsaes_oaep":
                h = alg["parameters"]["hash_algorithm"]["algorithm"].native
                name = f"rsaes-oaep ({h})"
                verdict = "recommended" if h != "sha1" else _legacy("rsaes-oaep-sha1")
            elif name == "rsaes_pkcs1v15":
                verdict = _legacy("rsaes-pkcs1-v1_5")
            else:
                verdict = "refused"
            out.append(f"    - key transport {name} [{verdict}] to {_sid(k['rid'])}")
        elif ri.name == "kari":
            k = ri.chosen
            oid = k["key_encryption_algorithm"]["algorithm"].dotted
            kdf = KDF_SCHEMES.get(oid)
            verdict = (
                "refused (unknown scheme)"
                if kdf is None
                else (_legacy("ecdh-sha1kdf") if kdf == "sha1" else "recommended")
            )
            for rek in k["recipient_encrypted_keys"]:
                out.append(
                    f"    - key agreement ECDH (KDF {kdf or oid}) [{verdict}] to {_sid(rek['rid'])}"
                )
        else:
            out.append(f"    - {ri.name} recipient (not supported)")


def _cipher(alg: Any) -> str:
    oid_name = alg["algorithm"].native
    name = CIPHER_BY_OID_NAME.get(oid_name, oid_name)
    verdict = _verdict(lambda p: p.check_content_cipher(name, inbound=True), name)
    return f"{name} ({verdict})"


def describe(der: bytes) -> list[str]:
    """Lines describing a DER/BER ContentInfo."""
    ci = load_content_info(der, "input")
    kind = ci["content_type"].native
    encoding = "BER (indefinite lengths)" if der[1:2] == b"\x80" else "DER"
    out = [f"CMS {kind}, {len(der)} bytes, {encoding}"]
    try:
        body = ci["content"]
        if kind == "signed_data":
            _signed(body, out)
        elif kind == "enveloped_data":
            check_recipient_counts(body["recipient_infos"].dump())
            eci = body["encrypted_content_info"]
            out.append(f"  content cipher: {_cipher(eci['content_encryption_algorithm'])}")
            _recipients(body["recipient_infos"], out)
        elif kind == "authenticated_enveloped_data":
            check_recipient_counts(body["recipient_infos"].dump())
            eci = body["auth_encrypted_content_info"]
            out.append(f"  content cipher: {_cipher(eci['content_encryption_algorithm'])}")
            out.append(f"  tag: {len(body['mac'].native)} bytes")
            _recipients(body["recipient_infos"], out)
        elif kind == "compressed_data":
            out.append(f"  compression: {body['compression_algorithm']['algorithm'].native}")
        else:
            out.append("  (content not described)")
    except ASN1_ERRORS as exc:
        raise MalformedMessageError(
            f"input has a malformed {kind} structure: {exc}",
            fix="check that the file was not truncated or altered",
        ) from exc
    return out
