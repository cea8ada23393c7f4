"""The algorithm options of a peer file: which monitored-list algorithms are
accepted from the peer (``accept_legacy``), and how content-encryption keys are
wrapped for it (``key_transport``).  Every choice but the default is a warning."""

from __future__ import annotations

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import rsa

from gateway.policy import (
    DEFAULT_KEY_TRANSPORT,
    LEGACY_ALGORITHMS,
    LEGACY_SEND_KEY_TRANSPORT,
    SEND_KEY_TRANSPORTS,
    describe_legacy,
)
from gateway.tomlreader import Section


def read_accept_legacy(section: Section) -> frozenset[str]:
    """``accept_legacy``: the monitored-list algorithms accepted from this peer, each
    named on its own; a warning lists exactly what is admitted.  The old ``compat``
    switch admitted all of them at once: ``compat = true`` is refused, naming the
    replacement, so that an upgrade never widens or narrows what a peer may send
    without the admin deciding it."""
    names = LEGACY_ALGORITHMS
    every = ", ".join(f'"{n}"' for n in names)
    if section.has("compat"):
        if section.boolean("compat", default=False):
            section.problem(
                "compat",
                "compat = true is no longer read: it admitted every monitored-list algorithm "
                f"at once ({describe_legacy(tuple(names))}); each is now permitted on its own",
                "replace it with accept_legacy listing only the algorithms this peer still "
                "sends (its policy.compat_algorithm_used records in the audit trail name "
                'them), e.g. accept_legacy = ["rsaes-pkcs1-v1_5"]; every one of them: '
                f"accept_legacy = [{every}]",
            )
        else:
            section.problem(
                "compat",
                "compat is no longer read (it admitted nothing when false)",
                "remove the line; accept_legacy = [...] names any monitored-list algorithm "
                "to accept from this peer",
                "warning",
            )
    admitted: list[str] = []
    for entry in section.string_list("accept_legacy", required=False):
        name = entry.strip().lower()
        if name not in names:
            section.problem(
                "accept_legacy",
                f"{entry!r} is not a monitored-list algorithm the gateway can accept",
                f"use some of: {', '.join(names)}",
            )
        elif name in admitted:
            section.problem("accept_legacy", f"{name} is listed twice", "list each once")
        else:
            admitted.append(name)
    if admitted:
        section.problem(
            "accept_legacy",
            "accepts monitored-list algorithms from this peer (each use audited as a warning): "
            f"{describe_legacy(tuple(admitted))}",
            "ask the peer to upgrade to SHA-256, AES and RSAES-OAEP/ECDH with SHA-256, then "
            "remove each from accept_legacy",
            "warning",
        )
    return frozenset(admitted)


def read_key_transport(section: Section, encryption: list[x509.Certificate]) -> str:
    """``key_transport``: how we wrap content-encryption keys for this peer's RSA
    certificates.  RSAES-OAEP with SHA-256 by default, or with SHA-1 for a partner
    that decrypts nothing else; RSAES-PKCS1-v1_5 (monitored list) only when the
    peer's own legacy option ``legacy_send_rsaes_pkcs1_v1_5`` is also true.  Each
    choice but the default is a warning."""
    legacy = section.boolean("legacy_send_rsaes_pkcs1_v1_5", default=False)
    chosen = section.choice(
        "key_transport",
        (*SEND_KEY_TRANSPORTS, LEGACY_SEND_KEY_TRANSPORT),
        default=DEFAULT_KEY_TRANSPORT,
    )
    if chosen == LEGACY_SEND_KEY_TRANSPORT and not legacy:
        section.problem(
            "key_transport",
            f"{chosen} is on the CRYPTREC monitored list (padding-oracle attacks on the "
            "receiving side); it is sent only to a peer whose legacy_send_rsaes_pkcs1_v1_5 "
            "is true",
            'ask the peer to decrypt RSAES-OAEP and set key_transport = "rsaes-oaep-sha1" '
            "(or the default); only if it cannot, also set legacy_send_rsaes_pkcs1_v1_5 = true",
        )
        return DEFAULT_KEY_TRANSPORT
    if chosen == LEGACY_SEND_KEY_TRANSPORT:
        section.problem(
            "key_transport",
            "sends to this peer with RSAES-PKCS1-v1_5 key transport, on the CRYPTREC "
            "monitored list; every message is audited with a warning",
            'ask the peer to decrypt RSAES-OAEP, then set key_transport = "rsaes-oaep-sha1" '
            "(or the default) and legacy_send_rsaes_pkcs1_v1_5 = false",
            "warning",
        )
    elif legacy:
        section.problem(
            "legacy_send_rsaes_pkcs1_v1_5",
            f"has no effect: key_transport is {chosen}",
            "set it to false (RSAES-PKCS1-v1_5 is sent only with key_transport = "
            '"rsaes-pkcs1-v1_5" as well)',
            "warning",
        )
    if chosen == "rsaes-oaep-sha1":
        section.problem(
            "key_transport",
            "sends to this peer with RSAES-OAEP with SHA-1 (its default parameters) instead "
            "of SHA-256; every message is audited with a warning",
            "ask the peer to decrypt RSAES-OAEP with SHA-256, then set key_transport = "
            f'"{DEFAULT_KEY_TRANSPORT}" (the default)',
            "warning",
        )
    if (
        chosen != DEFAULT_KEY_TRANSPORT
        and encryption
        and not any(isinstance(cert.public_key(), rsa.RSAPublicKey) for cert in encryption)
    ):
        section.problem(
            "key_transport",
            "has no effect: every encryption certificate of this peer has an EC key, and "
            "an EC key is sent the content-encryption key by ECDH key agreement",
            f'remove the line, or set key_transport = "{DEFAULT_KEY_TRANSPORT}"',
            "warning",
        )
    return chosen
