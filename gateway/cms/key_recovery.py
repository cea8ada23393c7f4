"""The content-encryption key recovered from the recipient info addressed to our
certificate: RSA key transport (RSAES-OAEP; RSAES-PKCS1-v1_5 only where allowed)
or ephemeral-static ECDH with AES key unwrap."""

from __future__ import annotations

from typing import Any

from asn1crypto import cms, core
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.keywrap import InvalidUnwrap, aes_key_unwrap

from ..errors import DecryptionError, MalformedMessageError, PolicyError
from ..policy import AlgorithmPolicy, PrivateKey, normalize_digest
from .common import (
    ASN1_ERRORS,
    cert_der,
    cert_label,
    cert_ski,
    hash_for,
    issuer_serial_ders,
    matches_issuer_serial,
    name_string,
)
from .envelope_algorithms import KDF_SCHEMES, WRAP_KEYLEN, derive_kek
from .enveloped_read import DirectKtri, DirectRecipients, Rid


def _names(rid: Rid, cert: x509.Certificate, issuer_der: bytes, serial: int) -> bool | None:
    """Whether ``rid`` names ``cert``; None if only asn1crypto can tell (the same
    issuer encoded otherwise, an unreadable subjectKeyIdentifier extension)."""
    if rid.issuer_der is not None:
        if rid.serial != serial:
            return False
        return True if rid.issuer_der == issuer_der else None
    try:
        return cert_ski(cert) == rid.ski
    except ValueError:
        return None


def _recover_direct(
    recipients: DirectRecipients,
    cert: x509.Certificate,
    key: PrivateKey,
    policy: AlgorithmPolicy,
    label: str,
) -> tuple[bytes, str] | None:
    """The content-encryption key, as :func:`recover_cek` finds it; None if that
    takes the asn1crypto reading (found otherwise than by exactly our bytes, not
    found, or an error to report as the asn1crypto path reports it)."""
    issuer_der, _ = issuer_serial_ders(cert_der(cert))
    serial = cert.serial_number
    for info in recipients.infos:
        if isinstance(info, DirectKtri):
            found = _names(info.rid, cert, issuer_der, serial)
            if found is None:
                return None
            if not found:
                continue
            if not isinstance(key, rsa.RSAPrivateKey):
                return None
            policy.check_key_transport("rsaes-oaep", inbound=True)
            h, mgf_h = hash_for(info.hash_name), hash_for(info.mgf_hash_name)
            pad = padding.OAEP(mgf=padding.MGF1(algorithm=mgf_h), algorithm=h, label=None)
            return _rsa_decrypt_cek(key, info.encrypted_key, pad, "rsaes-oaep", label)
        for rid, encrypted_key in info.keys:
            found = _names(rid, cert, issuer_der, serial)
            if found is None:
                return None
            if not found:
                continue
            if not isinstance(key, ec.EllipticCurvePrivateKey):
                return None
            if info.curve is not None and info.curve != key.curve.name:
                return None
            policy.check_key_transport("ecdh", inbound=True)
            shared = _ecdh_shared(key, info.point)
            return _ecdh_unwrap_cek(
                shared,
                info.kdf_digest,
                info.wrap_der,
                info.ukm,
                info.kek_len,
                encrypted_key,
                "ecdh",
                label,
            )
    return None


def _rid_matches(cert: x509.Certificate, rid: Any) -> bool:
    if rid.name == "issuer_and_serial_number":
        return matches_issuer_serial(cert, rid.chosen)
    if rid.name == "subject_key_identifier":
        return bool(cert_ski(cert) == rid.chosen.native)
    if rid.name == "r_key_id":
        return bool(cert_ski(cert) == rid.chosen["subject_key_identifier"].native)
    return False


def _describe_rid(rid: Any) -> str:
    try:
        if rid.name == "issuer_and_serial_number":
            ias = rid.chosen
            return f"issuer {name_string(ias['issuer'])!r} serial 0x{ias['serial_number'].native:x}"
        if rid.name == "subject_key_identifier":
            return f"subjectKeyIdentifier {rid.chosen.native.hex()}"
        if rid.name == "r_key_id":
            return f"subjectKeyIdentifier {rid.chosen['subject_key_identifier'].native.hex()}"
    except ASN1_ERRORS:
        pass
    return "<unparseable recipient identifier>"


def _oaep_name(params: Any) -> tuple[str, hashes.HashAlgorithm, hashes.HashAlgorithm]:
    if isinstance(params, core.Void):
        # Which hash the sender meant is not ours to guess (openssl refuses it too).
        raise MalformedMessageError(
            "the RSAES-OAEP key transport identifier has no parameters: RFC 4055 section 4.1 "
            "requires RSAES-OAEP-params, an empty SEQUENCE for the SHA-1 defaults",
            fix="ask the peer to write the OAEP parameters (openssl cms does), or to use "
            "RSAES-OAEP with SHA-256 (openssl: -keyopt rsa_padding_mode:oaep -keyopt "
            "rsa_oaep_md:sha256)",
        )
    h_name = normalize_digest(params["hash_algorithm"]["algorithm"].native)
    mgf = params["mask_gen_algorithm"]
    if mgf["algorithm"].native != "mgf1":
        raise PolicyError(
            f"RSAES-OAEP with mask generation {mgf['algorithm'].native}",
            "only MGF1 is supported",
            "use RSAES-OAEP with MGF1-SHA-256",
        )
    mgf_name = normalize_digest(mgf["parameters"]["algorithm"].native)
    if params["p_source_algorithm"]["parameters"].native not in (b"", None):
        raise DecryptionError(
            "RSAES-OAEP with a non-empty label is not supported",
            fix="ask the peer to use RSAES-OAEP without a label",
        )
    names = {h_name, mgf_name}
    if "sha1" in names and names <= {"sha1", "sha256", "sha384", "sha512"}:
        return (
            "rsaes-oaep-sha1",
            hash_for(h_name, allow_sha1=True),
            hash_for(mgf_name, allow_sha1=True),
        )
    for n in names:
        AlgorithmPolicy().check_digest(n)
    return "rsaes-oaep", hash_for(h_name), hash_for(mgf_name)


def _unwrap_ktri(
    ktri: Any, key: rsa.RSAPrivateKey, policy: AlgorithmPolicy, label: str
) -> tuple[bytes, str]:
    alg = ktri["key_encryption_algorithm"]
    alg_name = alg["algorithm"].native
    pad: padding.AsymmetricPadding
    if alg_name == "rsaes_oaep":
        name, h, mgf_h = _oaep_name(alg["parameters"])
        policy.check_key_transport(name, inbound=True)
        pad = padding.OAEP(mgf=padding.MGF1(algorithm=mgf_h), algorithm=h, label=None)
    elif alg_name == "rsaes_pkcs1v15":
        name = "rsaes-pkcs1-v1_5"
        policy.check_key_transport(name, inbound=True)
        pad = padding.PKCS1v15()
    else:
        raise PolicyError(
            f"key transport {alg_name}",
            "only RSAES-OAEP (and RSAES-PKCS1-v1_5, if accept_legacy names it) are "
            "supported for RSA",
            "ask the peer to use RSAES-OAEP with SHA-256",
        )
    return _rsa_decrypt_cek(key, ktri["encrypted_key"].native, pad, name, label)


def _rsa_decrypt_cek(
    key: rsa.RSAPrivateKey,
    encrypted_key: bytes,
    pad: padding.AsymmetricPadding,
    name: str,
    label: str,
) -> tuple[bytes, str]:
    try:
        cek = key.decrypt(encrypted_key, pad)
    except ValueError as exc:
        raise DecryptionError(
            f"the content-encryption key for {label} cannot be decrypted with our private key "
            f"({name})",
            fix="check that the configured private key matches our encryption certificate",
        ) from exc
    return cek, name


def _unwrap_kari(
    kari: Any, rek: Any, key: ec.EllipticCurvePrivateKey, policy: AlgorithmPolicy, label: str
) -> tuple[bytes, str]:
    alg = kari["key_encryption_algorithm"]
    oid = alg["algorithm"].dotted
    kdf_digest = KDF_SCHEMES.get(oid)
    if kdf_digest is None:
        raise PolicyError(
            f"key agreement {oid}",
            "only dhSinglePass-stdDH/cofactorDH with an X9.63 KDF are supported (RFC 5753)",
            "ask the peer to use ECDH with dhSinglePass-stdDH-sha256kdf-scheme",
        )
    if kdf_digest == "sha1":
        name = "ecdh-sha1kdf"
    else:
        AlgorithmPolicy().check_digest(kdf_digest)
        name = "ecdh"
    policy.check_key_transport(name, inbound=True)
    params = alg["parameters"]
    if isinstance(params, core.Void | core.Null):
        raise MalformedMessageError(
            "ECDH KeyAgreeRecipientInfo lacks its key-wrap algorithm parameter",
            fix="the sender's CMS implementation is broken",
        )
    wrap_der = params.dump()
    wrap_name = cms.KeyEncryptionAlgorithm.load(wrap_der)["algorithm"].native
    kek_len = WRAP_KEYLEN.get(wrap_name)
    if kek_len is None:
        raise PolicyError(
            f"key wrap {wrap_name}",
            "only AES key wrap (RFC 3394) is supported",
            "ask the peer to use aes128-wrap or aes256-wrap",
        )
    originator = kari["originator"]
    if originator.name != "originator_key":
        raise DecryptionError(
            f"ECDH recipient info for {label} uses a static originator key "
            f"({originator.name}); only ephemeral-static ECDH is supported",
            fix="ask the peer to use ephemeral-static ECDH (RFC 5753 section 3.1)",
        )
    orig = originator.chosen
    orig_params = orig["algorithm"]["parameters"]
    if not isinstance(orig_params, core.Void | core.Null):
        named = orig_params.chosen.native if orig_params.name == "named" else None
        if named is not None and named != key.curve.name:
            raise DecryptionError(
                f"ECDH originator key is on curve {named} but our key for {label} is on "
                f"{key.curve.name}",
                fix="the peer encrypted with the wrong certificate; ask it to resend",
            )
    shared = _ecdh_shared(key, bytes(orig["public_key"]))
    ukm_v = kari["ukm"]
    ukm = None if isinstance(ukm_v, core.Void) else ukm_v.native
    return _ecdh_unwrap_cek(
        shared, kdf_digest, wrap_der, ukm, kek_len, rek["encrypted_key"].native, name, label
    )


def _ecdh_shared(key: ec.EllipticCurvePrivateKey, point: bytes) -> bytes:
    try:
        peer = ec.EllipticCurvePublicKey.from_encoded_point(key.curve, point)
        return key.exchange(ec.ECDH(), peer)
    except ValueError as exc:
        raise DecryptionError(
            f"ECDH originator public key is not a valid point on {key.curve.name}",
            fix="the message is corrupt; ask the peer to resend",
        ) from exc


def _ecdh_unwrap_cek(
    shared: bytes,
    kdf_digest: str,
    wrap_der: bytes,
    ukm: bytes | None,
    kek_len: int,
    encrypted_key: bytes,
    name: str,
    label: str,
) -> tuple[bytes, str]:
    kek = derive_kek(shared, kdf_digest, wrap_der, ukm, kek_len)
    try:
        cek = aes_key_unwrap(kek, encrypted_key)
    except (InvalidUnwrap, ValueError) as exc:
        raise DecryptionError(
            f"the content-encryption key for {label} cannot be unwrapped (ECDH {name})",
            fix="check that the configured private key matches our encryption certificate",
        ) from exc
    return cek, name


def recover_cek(
    recipient_infos: Any, cert: x509.Certificate, key: PrivateKey, policy: AlgorithmPolicy
) -> tuple[bytes, str]:
    """The content-encryption key from the recipient info addressed to ``cert``.

    Returns (key, key transport name).  ``recipient_infos`` is asn1crypto's
    RecipientInfos or what :func:`direct_recipients` read.
    """
    label = cert_label(cert)
    if isinstance(recipient_infos, DirectRecipients):
        found_direct = _recover_direct(recipient_infos, cert, key, policy, label)
        if found_direct is not None:
            return found_direct
        # not the common case (ours not named by exactly our bytes, not found, ...):
        # the asn1crypto reading, for exactly its result or error
        recipient_infos = cms.RecipientInfos.load(recipient_infos.der)
    try:
        found: tuple[bytes, str] | None = None
        seen: list[Any] = []  # recipient identifiers, described only if none is ours
        for ri in recipient_infos:
            if ri.name == "ktri":
                ktri = ri.chosen
                seen.append(ktri["rid"])
                if _rid_matches(cert, ktri["rid"]):
                    if not isinstance(key, rsa.RSAPrivateKey):
                        raise DecryptionError(
                            f"message was encrypted for {label} with RSA key transport, but "
                            "our key is not an RSA key",
                            fix="configure the private key that matches our certificate",
                        )
                    found = _unwrap_ktri(ktri, key, policy, label)
                    break
            elif ri.name == "kari":
                kari = ri.chosen
                for rek in kari["recipient_encrypted_keys"]:
                    seen.append(rek["rid"])
                    if _rid_matches(cert, rek["rid"]):
                        if not isinstance(key, ec.EllipticCurvePrivateKey):
                            raise DecryptionError(
                                f"message was encrypted for {label} with ECDH, but our key "
                                "is not an EC key",
                                fix="configure the private key that matches our certificate",
                            )
                        found = _unwrap_kari(kari, rek, key, policy, label)
                        break
                if found is not None:
                    break
            else:
                seen.append(f"<{ri.name} recipient>")
    except ASN1_ERRORS as exc:
        raise MalformedMessageError(
            f"encrypted message has a malformed RecipientInfo: {exc}",
            fix="check that the message was not truncated or altered in transit",
        ) from exc
    if found is None:
        raise DecryptionError(
            f"the message was encrypted for someone else: it has no recipient info for our "
            f"certificate ({label}); recipients in the message: "
            + (
                "; ".join(r if isinstance(r, str) else _describe_rid(r) for r in seen)
                if seen
                else "none"
            ),
            fix="ask the peer to encrypt with our current encryption certificate "
            "(it may be using an old or another institution's certificate)",
        )
    return found
